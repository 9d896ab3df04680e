// Standalone check (no JAX): nvcc -O2 -gencode arch=compute_90a,code=sm_90a tools/pdl_check.cu
// -o /tmp/pdl_check && /tmp/pdl_check
// Does programmatic dependent launch overlap two kernels (a) on a plain stream, (b) in a graph
// captured from the stream, (c) in that graph used as a child-graph node (how XLA nests a
// custom call's captured kernels in its command buffer)? B's first instruction time minus A's
// last: negative = B started while A ran.
#include <cuda_runtime.h>
#include <cstdio>
__device__ unsigned long long Now() { unsigned long long t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t; }
__global__ void A(unsigned long long* t) {
  asm volatile("griddepcontrol.launch_dependents;");
  unsigned long long s = Now();
  while (Now() - s < 50000) {}
  if (threadIdx.x == 0) atomicMax(&t[0], Now());
}
__global__ void B(unsigned long long* t) {
  if (threadIdx.x == 0) atomicMin(&t[1], Now());
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (threadIdx.x == 0) atomicMin(&t[2], Now());
}
void Enqueue(cudaStream_t s, unsigned long long* t) {
  A<<<16, 32, 0, s>>>(t);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = 16; cfg.blockDim = 32; cfg.stream = s;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = at; cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, B, t);
}
void Report(const char* what, unsigned long long* t) {
  unsigned long long h[3];
  cudaMemcpy(h, t, sizeof(h), cudaMemcpyDeviceToHost);
  printf("%-28s B start - A end: %8.1f us, B after wait - A end: %6.1f us  (%s)\n", what,
         ((double)h[1] - (double)h[0]) / 1e3, ((double)h[2] - (double)h[0]) / 1e3, cudaGetErrorString(cudaGetLastError()));
}
void Reset(unsigned long long* t) {
  unsigned long long h[3] = {0, ~0ull, ~0ull};
  cudaMemcpy(t, h, sizeof(h), cudaMemcpyHostToDevice);
}
int main() {
  unsigned long long* t; cudaMalloc(&t, 24);
  cudaStream_t s; cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  for (int i = 0; i < 2; ++i) { Reset(t); Enqueue(s, t); cudaStreamSynchronize(s); }
  Report("plain stream", t);
  cudaGraph_t g; cudaGraphExec_t ge;
  cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed); Enqueue(s, t); cudaStreamEndCapture(s, &g);
  cudaGraphInstantiate(&ge, g, 0);
  for (int i = 0; i < 2; ++i) { Reset(t); cudaGraphLaunch(ge, s); cudaStreamSynchronize(s); }
  Report("captured graph", t);
  cudaGraph_t parent; cudaGraphCreate(&parent, 0);
  cudaGraphNode_t child;
  cudaError_t e = cudaGraphAddChildGraphNode(&child, parent, nullptr, 0, g);
  printf("child node add: %s\n", cudaGetErrorString(e));
  cudaGraphExec_t pe; e = cudaGraphInstantiate(&pe, parent, 0);
  printf("parent instantiate: %s\n", cudaGetErrorString(e));
  for (int i = 0; i < 2; ++i) { Reset(t); cudaGraphLaunch(pe, s); cudaStreamSynchronize(s); }
  Report("child graph in a parent", t);
  // no PDL for reference
  for (int i = 0; i < 2; ++i) { Reset(t); A<<<16, 32, 0, s>>>(t); B<<<16, 32, 0, s>>>(t); cudaStreamSynchronize(s); }
  Report("plain stream, no PDL", t);
  return 0;
}
