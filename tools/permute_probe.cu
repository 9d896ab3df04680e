// Standalone timing of the permute kernels (tools only; not part of the library):
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -I ffi -I <jaxlib>/include \
//     tools/permute_probe.cu -o /tmp/permute_probe && /tmp/permute_probe 8192 [E] [k] [H] [E_glob]
// Builds a realistic plan on the host (k distinct uniform experts per token, rows grouped by
// expert in slot order), checks every kernel against the token kernel, and prints the median
// time of each (CUDA events, 30 runs after 5 warm-ups) and the rate of the bytes it writes.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../ffi/permute.cu"

namespace jax_moe {
std::vector<std::pair<std::string, HandlerFn>>& ffi_targets() {
  static std::vector<std::pair<std::string, HandlerFn>> t;
  return t;
}
}  // namespace jax_moe

using namespace jax_moe;

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e_)); exit(1); } } while (0)

__global__ void WriteSeqKernel(uint8_t* rows, int64_t n_rows, int64_t h) {  // block per row, like the row kernel
  const int64_t vecs = h / 16;
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    uint4* dst = reinterpret_cast<uint4*>(rows + r * h);
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) dst[v] = make_uint4(r, v, 1, 2);
  }
}

int main(int argc, char** argv) {
  const int64_t T = argc > 1 ? atol(argv[1]) : 8192;
  const int E = argc > 2 ? atoi(argv[2]) : 256;
  const int k = argc > 3 ? atoi(argv[3]) : 8;
  const int64_t H = argc > 4 ? atol(argv[4]) : 7168;
  const int E_glob = argc > 5 ? atoi(argv[5]) : E;  // > E: an expert-parallel slice [0, E)
  const int64_t M = T * k, KB = H / 128;
  std::mt19937 rng(1234);
  std::vector<uint8_t> hidden(T * H);
  for (auto& b : hidden) b = rng() & 0x7e;
  std::vector<float> hs(KB * T);
  for (auto& f : hs) f = std::uniform_real_distribution<float>(0.01f, 1.f)(rng);
  std::vector<int> ids(M);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> perm(E_glob);
    for (int i = 0; i < E_glob; ++i) perm[i] = i;
    for (int j = 0; j < k; ++j) {
      std::swap(perm[j], perm[j + rng() % (E_glob - j)]);
      ids[t * k + j] = perm[j];
    }
  }
  std::vector<int> counts(E + 1, 0), offs(E + 1, 0), s2r(M, -1), r2s(M, -1);
  for (int i : ids) counts[i < E ? i : E]++;
  for (int e = 0; e < E; ++e) offs[e + 1] = offs[e] + counts[e];
  std::vector<int> next(offs.begin(), offs.end());
  int nl = offs[E];
  for (int64_t s = 0; s < M; ++s) {
    if (ids[s] < E) { s2r[s] = next[ids[s]]++; r2s[s2r[s]] = s; }
    else { r2s[nl++] = -1; }
  }
  uint8_t *d_hidden, *d_rows, *d_rows_ref;
  float *d_hs, *d_rs, *d_rs_ref;
  int *d_s2r, *d_r2s, *d_offs;
  CK(cudaMalloc(&d_hidden, T * H)); CK(cudaMalloc(&d_rows, M * H)); CK(cudaMalloc(&d_rows_ref, M * H));
  CK(cudaMalloc(&d_hs, KB * T * 4)); CK(cudaMalloc(&d_rs, M * KB * 4)); CK(cudaMalloc(&d_rs_ref, M * KB * 4));
  CK(cudaMalloc(&d_s2r, M * 4)); CK(cudaMalloc(&d_r2s, M * 4)); CK(cudaMalloc(&d_offs, (E + 1) * 4));
  CK(cudaMemcpy(d_hidden, hidden.data(), T * H, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_hs, hs.data(), KB * T * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_s2r, s2r.data(), M * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_r2s, r2s.data(), M * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_offs, offs.data(), (E + 1) * 4, cudaMemcpyHostToDevice));
  const int64_t local = offs[E];
  const int sms = NumSms();
  const size_t tok_smem = (E + 1 + 2 * k) * sizeof(int);

  auto token = [&](uint8_t* rows, float* rs) {  // the landed kernel before this change
    PermuteTokensKernel<true><<<GridStrideBlocks(T, 1, kPermuteBlocksPerSm), kPermuteThreads, tok_smem>>>(
        d_hidden, d_hs, d_s2r, d_offs, E, T, k, H, rows, rs, ZeroInts{});
  };
  auto rowk = [&](uint8_t* rows, float* rs) {
    PermuteRowsKernel<<<GridStrideBlocks(M, 1, kPermuteBlocksPerSm), kPermuteThreads, (E + 1) * sizeof(int)>>>(
        d_hidden, d_hs, d_r2s, d_offs, E, T, k, H, rows, rs, ZeroInts{});
  };
  auto data_only = [&](uint8_t* rows) {
    PermuteTokensKernel<false><<<GridStrideBlocks(T, 1, kPermuteBlocksPerSm), kPermuteThreads, tok_smem>>>(
        d_hidden, d_hs, d_s2r, d_offs, E, T, k, H, rows, nullptr, ZeroInts{});
  };
  auto scales = [&](float* rs) {  // as PermuteStage launches it: a PDL dependent
    CK(LaunchPermuteScales(0, d_hs, d_r2s, d_offs, E, int(T), k, int(KB), rs, ZeroInts{}));
  };
  auto split = [&](uint8_t* rows, float* rs) { data_only(rows); scales(rs); };
  // correctness: every kernel against the token kernel (rows [0, local), all scales)
  CK(cudaMemset(d_rows_ref, 0, M * H)); CK(cudaMemset(d_rs_ref, 0, M * KB * 4));
  token(d_rows_ref, d_rs_ref);
  CK(cudaDeviceSynchronize());
  std::vector<uint8_t> a(local * H), b(local * H);
  std::vector<float> fa(M * KB), fb(M * KB);
  CK(cudaMemcpy(a.data(), d_rows_ref, local * H, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(fa.data(), d_rs_ref, M * KB * 4, cudaMemcpyDeviceToHost));
  bool host_ok = true;  // the token kernel against the host plan
  for (int64_t s = 0; s < M && host_ok; ++s)
    if (s2r[s] >= 0) host_ok = memcmp(&a[s2r[s] * H], &hidden[(s / k) * H], H) == 0;
  printf("T=%ld E=%d k=%d H=%ld E_glob=%d: rows %ld local, token kernel vs host: %s\n", T, E, k, H, E_glob,
         local, host_ok ? "ok" : "MISMATCH");
  auto check = [&](const char* name) {
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(b.data(), d_rows, local * H, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(fb.data(), d_rs, M * KB * 4, cudaMemcpyDeviceToHost));
    const bool ok = memcmp(a.data(), b.data(), local * H) == 0 && memcmp(fa.data(), fb.data(), M * KB * 4) == 0;
    printf("  %-12s %s\n", name, ok ? "equal" : "DIFFERENT");
  };
  CK(cudaMemset(d_rows, 0, M * H)); CK(cudaMemset(d_rs, 0, M * KB * 4)); rowk(d_rows, d_rs); check("rows");
  CK(cudaMemset(d_rows, 0, M * H)); CK(cudaMemset(d_rs, 0, M * KB * 4)); split(d_rows, d_rs); check("split");

  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  auto time = [&](const char* name, double bytes, auto fn) {
    std::vector<float> ms;
    for (int i = 0; i < 35; ++i) {
      CK(cudaEventRecord(e0)); fn(); CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1));
      float x; CK(cudaEventElapsedTime(&x, e0, e1)); if (i >= 5) ms.push_back(x);
    }
    CK(cudaGetLastError());
    std::sort(ms.begin(), ms.end());
    const double med = ms[ms.size() / 2];
    printf("  %-28s %9.1f us  %6.2f TB/s written\n", name, med * 1e3, bytes / (med * 1e-3) / 1e12);
  };
  const double wbytes = double(local) * H;
  time("memset (all T*k rows)", double(M) * H, [&] { cudaMemsetAsync(d_rows, 1, M * H); });
  time("sequential row writes", wbytes, [&] { WriteSeqKernel<<<sms * 10, 128>>>(d_rows, local, H); });
  time("token kernel with scales", wbytes, [&] { token(d_rows, d_rs); });
  time("row kernel", wbytes, [&] { rowk(d_rows, d_rs); });
  time("token kernel, data only", wbytes, [&] { data_only(d_rows); });
  time("scale kernel alone", double(local) * KB * 4, [&] { scales(d_rs); });
  time("data + scales (landed)", wbytes, [&] { split(d_rows, d_rs); });
  return 0;
}
