// Shared glue between XLA FFI handlers and CUDA kernels: error conversion, buffer checks.
// Kernels know nothing of XLA; handlers use only these helpers to talk to it.
#pragma once

#include <cuda_runtime.h>
#ifdef __CUDACC__
#include <cuda_bf16.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>

#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace jax_moe {

namespace ffi = xla::ffi;

inline ffi::Error InvalidArgument(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, msg);
}

inline ffi::Error CudaError(cudaError_t err, const char* what) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("jax_moe: ") + what + ": " + cudaGetErrorString(err));
}

// The same for a step of target `op`: "<op>: <what>: <CUDA error>".
inline ffi::Error CudaError(cudaError_t err, const std::string& op, const char* what) {
  return ffi::Error(ffi::ErrorCode::kInternal, op + ": " + what + ": " + cudaGetErrorString(err));
}

// Checks the last launch; returns from the handler with an ffi::Error on failure.
#define JAX_MOE_CHECK_LAUNCH(what)                          \
  do {                                                      \
    cudaError_t jax_moe_err_ = cudaGetLastError();          \
    if (jax_moe_err_ != cudaSuccess)                        \
      return ::jax_moe::CudaError(jax_moe_err_, what);      \
  } while (0)

#define JAX_MOE_RETURN_IF_ERROR(expr)        \
  do {                                       \
    ::xla::ffi::Error jax_moe_e_ = (expr);   \
    if (jax_moe_e_.failure()) return jax_moe_e_; \
  } while (0)

inline bool IsFp8E4M3(const ffi::AnyBuffer& b) {
  return b.element_type() == ffi::DataType::F8E4M3FN;
}

// Checks rank and each dimension of a buffer; `name` is the argument's user-facing name.
template <typename Buf>
ffi::Error CheckShape(const Buf& b, const char* name, std::initializer_list<int64_t> dims) {
  auto d = b.dimensions();
  if (d.size() != dims.size()) {
    return InvalidArgument(std::string("jax_moe: ") + name + ": expected rank " +
                           std::to_string(dims.size()) + ", got " + std::to_string(d.size()));
  }
  int i = 0;
  for (int64_t want : dims) {
    if (want >= 0 && d[i] != want) {
      return InvalidArgument(std::string("jax_moe: ") + name + ": dimension " + std::to_string(i) +
                             " expected " + std::to_string(want) + ", got " +
                             std::to_string(d[i]));
    }
    ++i;
  }
  return ffi::Error::Success();
}

inline int64_t Dim(const ffi::AnyBuffer& b, int i) { return b.dimensions()[i]; }

// expert_offsets int32 [G + 1] with 1 <= G <= max_groups; sets *num_groups = G.
inline ffi::Error CheckOffsets(const ffi::Buffer<ffi::S32>& offsets, const char* op, int max_groups,
                               int* num_groups) {
  auto d = offsets.dimensions();
  if (d.size() != 1 || d[0] < 2 || d[0] > max_groups + 1) {
    return InvalidArgument(std::string(op) + ": expert_offsets: expected shape [E_loc + 1] with " +
                           "1 <= E_loc <= " + std::to_string(max_groups));
  }
  *num_groups = static_cast<int>(d[0] - 1);
  return ffi::Error::Success();
}

// Activations of SPEC section 3 step 3 (the ActivationType values of jax_moe/enums.py).
enum Activation : int32_t { kSwiglu = 3, kGeglu = 4, kRelu2 = 6, kIdentity = 9 };
constexpr bool IsGatedActivation(int32_t a) { return a == kSwiglu || a == kGeglu; }
constexpr bool IsSupportedActivation(int32_t a) { return IsGatedActivation(a) || a == kRelu2 || a == kIdentity; }

inline unsigned CeilDiv(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// Whether environment variable `name` is set to `value`.
inline bool EnvEquals(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == value;
}

// Whether environment variable `name` is "off": a kernel launcher's A/B switch. Callers read it
// once per process (a function-local static), as tools/env_ab.sh expects, unless it says otherwise.
inline bool EnvSwitchedOff(const char* name) { return EnvEquals(name, "off"); }


// Number of SMs of the current device (cached per device; no stream work, graph-capture safe).
inline int NumSms() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0)
      n = 132;
    cached[dev] = n;
  }
  return cached[dev];
}

// Grid of a grid-stride kernel: enough blocks for `items` at `items_per_block` each, at most
// `blocks_per_sm` per SM (the blocks loop over the rest). A cap no larger than what fits on an SM
// at once makes the grid one wave: a kernel whose real work (rows below expert_offsets[E], read
// on the device) is a small part of its grid then does not spend waves on blocks with nothing to
// do, and its PDL dependent (which starts once every block has started) is not held back.
inline unsigned GridStrideBlocks(int64_t items, int64_t items_per_block, int blocks_per_sm = 16) {
  const int64_t needed = (items + items_per_block - 1) / items_per_block;
  const int64_t cap = static_cast<int64_t>(NumSms()) * blocks_per_sm;
  return static_cast<unsigned>(needed < cap ? needed : cap);
}

// Programmatic dependent launch (PDL): a kernel launched with `pdl` may start while the kernel
// before it on the stream is still running, once every block of that one has called
// GridDependencyTrigger() (or exited). Before reading anything the previous kernel writes, it
// calls GridDependencyWait(), which returns when that kernel has finished and its writes are
// visible. Both are no-ops for a kernel launched without the attribute, so kernels call them
// unconditionally. Callers trigger only after their own wait, so what a dependent reads before
// its wait (buffers written two or more kernels back, the call's inputs) is complete.
template <typename... KernelArgs, typename... Args>
cudaError_t LaunchKernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                         bool pdl, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// Whether the stage kernels of the decode path -- the plan, the permute, the finalize -- are
// launched as PDL dependents of the kernel before them (each waits for it before touching
// memory), so their launch and block start overlap that kernel's end. On unless
// $JAX_MOE_STAGE_PDL=off. Measured on an H100 (RESULTS.md, thirty-first session): no gain with
// the stage pairs, but with the decode chain (5 kernels per op instead of 7) the T=1 op runs
// ahead of the host's launches and plain launches leave ~1.1 us before the plan, the permute and
// the finalize each (T=1 134.5 us with it, 139.5 without); every measured gain of the chain
// was with it on. Read at each launch (a getenv, well under a microsecond of host time), so a
// test can compare both in one process.
inline bool StagePdl() { return !EnvSwitchedOff("JAX_MOE_STAGE_PDL"); }

// Whether the route, the op's first kernel, is also launched as a PDL dependent of whatever
// kernel precedes it on the stream (the op before, another layer's kernel): it waits for that
// kernel before reading or writing anything, so only its launch and block start overlap that
// kernel's end (the finalize, the op's last kernel, always lets a PDL dependent start after its
// own wait). Off until measured on an H100: on with stage PDL where $JAX_MOE_ROUTE_PDL=on; read
// at each launch.
inline bool RoutePdl() { return StagePdl() && EnvEquals("JAX_MOE_ROUTE_PDL", "on"); }

#ifdef __CUDACC__
__device__ __forceinline__ void GridDependencyWait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void GridDependencyTrigger() { asm volatile("griddepcontrol.launch_dependents;" :::); }

// Bit i set for the lanes below this one (a ballot's bits for a lane's rank among the lanes).
__device__ __forceinline__ unsigned LaneMaskLt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// Group g of row r in a grouped row buffer: the largest g in [0, num_groups) with
// offsets[g] <= r (empty groups before a non-empty one are skipped). `offsets` has
// num_groups + 1 entries (usually in shared memory); the caller ensures r < offsets[num_groups].
__device__ __forceinline__ int FindGroup(const int* offsets, int num_groups, int64_t r) {
  int lo = 0, hi = num_groups;
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    if (offsets[mid] <= r) lo = mid + 1; else hi = mid;
  }
  return lo - 1;
}

// A block's copy of the group offsets [num_groups + 1] in shared memory `offs` (all threads
// call it; it syncs) and the rows they cover, offsets[num_groups] clamped to [0, num_rows].
__device__ __forceinline__ int64_t LoadGroupOffsets(const int32_t* offsets, int num_groups, int* offs,
                                                    int64_t num_rows) {
  for (int i = threadIdx.x; i <= num_groups; i += blockDim.x) offs[i] = offsets[i];
  __syncthreads();
  return min(static_cast<int64_t>(max(offs[num_groups], 0)), num_rows);
}

// Index of the scale of row r (in group [g0, g1)) and 128-column block kb in the grouped
// MN-major layout of a buffer with kb_count blocks per row: group g's scales form a
// [kb_count, g1 - g0] row-major block starting at g0 * kb_count. In 64 bits unless the caller
// asks for `int` (GroupedScaleIndex<int>: it guarantees rows * kb_count < 2^31).
template <typename T> struct NotDeduced { using type = T; };
template <typename Index = int64_t>
__device__ __forceinline__ Index GroupedScaleIndex(typename NotDeduced<Index>::type g0,
                                                   typename NotDeduced<Index>::type g1,
                                                   typename NotDeduced<Index>::type r,
                                                   typename NotDeduced<Index>::type kb,
                                                   typename NotDeduced<Index>::type kb_count) {
  return g0 * kb_count + kb * (g1 - g0) + (r - g0);
}

__device__ __forceinline__ float GeluTanh(float x) {
  // 0.5 * x * (1 + tanh(c * (x + 0.044715 * x * x * x))), evaluated left to right like the
  // reference.
  const float inner = x + ((0.044715f * x) * x) * x;
  return (0.5f * x) * (1.0f + tanhf(0.7978845608028654f * inner));
}

// Step 3 in float32, in the reference's order of operations: the gated activations act on
// `gate` (second half of the GEMM1 row) and multiply by `x` (first half, "up"); the others act
// on `x` and ignore `gate`.
template <int ACT>
__device__ __forceinline__ float Activate(float x, float gate) {
  // silu(gate) = gate / (1 + exp(-gate)) as gate * rcp(1 + exp(-gate)) (rcp correctly rounded:
  // within one float32 ulp of the division, at a fraction of an IEEE division's instructions)
  if (ACT == kSwiglu) return gate * __frcp_rn(1.0f + expf(-gate)) * x;
  if (ACT == kGeglu) return GeluTanh(gate) * x;
  if (ACT == kRelu2) {
    const float v = fmaxf(x, 0.0f);
    return v * v;
  }
  return x;
}

// a / s correctly rounded, given inv_s = 1 / s correctly rounded (one division per block of
// values, not per value): the quotient a * inv_s (within an ulp) corrected by its residual,
// computed exactly by an FMA (Markstein). A plain a * inv_s would break the exact ties of
// a / s -- frequent where a and s carry few bits (bfloat16 input, Identity) -- the wrong way
// for ~0.1 % of the fp8 codes.
__device__ __forceinline__ float DivideByScale(float a, float s, float inv_s) {
  const float q = a * inv_s;
  return fmaf(fmaf(-q, s, a), inv_s, q);
}

// x rounded to the nearest bfloat16 (ties to even), as float32.
__device__ __forceinline__ float RoundToBf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// float32 value of a float or bfloat16 element (exact).
__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

// 8 bfloat16 packed in 16 bytes -> 8 float32.
__device__ __forceinline__ void UnpackBf16x8(const uint4& v, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
#endif

}  // namespace jax_moe
