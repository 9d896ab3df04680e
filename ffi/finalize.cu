// jax_moe_finalize: out[t] = sum_j float(w[t, j]) * float(y[row(t, j)]) in float32, slot order
// j = 0..k-1, rounded to bfloat16 (SPEC section 3 step 6); or, with do_finalize=False, the
// unweighted rows [T, k, H] with zeros where the slot's expert is not local. Each thread owns
// 8 consecutive columns (one 16-byte vector) of one output row.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "ffi_common.h"

namespace jax_moe {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ uint4 Pack8(const float* f) {
  uint4 v;
  __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return v;
}

// A block per (token, kReduceThreads 8-column vectors); W: float or __nv_bfloat16 (widened
// exactly). Warp 0 loads the token's k row indices and weights at once and lists the local slots
// in slot order in shared memory; then each thread sums its vector over that list, kLoadBatch
// row loads in flight at a time. So a thread waits for about two dependent loads however many
// slots are not local (expert-parallel slices: most of them), where a loop over the slots
// waited for each slot's row index in turn.
constexpr int kReduceThreads = 128;
constexpr int kLoadBatch = 4;

template <class W>
__global__ void __launch_bounds__(kReduceThreads)
    FinalizeReduceKernel(const uint4* __restrict__ y, const int32_t* __restrict__ slot_to_row,
                         const W* __restrict__ w, int top_k, int64_t num_rows,
                         int64_t vecs_per_row, int64_t blocks_per_token, uint4* __restrict__ out) {
  extern __shared__ int2 local[];  // [top_k]: (row, weight bits) of the local slots, slot order
  __shared__ int num_local;
  const int64_t t = blockIdx.x / blocks_per_token;
  const int64_t v = (blockIdx.x % blocks_per_token) * kReduceThreads + threadIdx.x;
  GridDependencyWait();  // launched early (PDL): every input may come from the kernel before
  GridDependencyTrigger();  // the next op's route (RoutePdl) may start; it waits for this grid
  if (threadIdx.x < 32) {
    int count = 0;
    for (int j0 = 0; j0 < top_k; j0 += 32) {  // uniform across the warp
      const int j = j0 + static_cast<int>(threadIdx.x);
      int32_t row = -1;
      float wt = 0.0f;
      if (j < top_k) {
        row = slot_to_row[t * top_k + j];
        wt = ToFloat(w[t * top_k + j]);
        if (row >= num_rows) row = -1;
      }
      const unsigned is_local = __ballot_sync(0xffffffffu, row >= 0);
      if (row >= 0) local[count + __popc(is_local & LaneMaskLt())] = make_int2(row, __float_as_int(wt));
      count += __popc(is_local);
    }
    if (threadIdx.x == 0) num_local = count;
  }
  __syncthreads();
  if (v >= vecs_per_row) return;
  const int n = num_local;
  float acc[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) acc[c] = 0.0f;
  for (int j0 = 0; j0 < n; j0 += kLoadBatch) {
    uint4 yv[kLoadBatch];
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j)
      if (j0 + j < n) yv[j] = y[static_cast<int64_t>(local[j0 + j].x) * vecs_per_row + v];
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      if (j0 + j >= n) break;
      const float wt = __int_as_float(local[j0 + j].y);
      float x[8];
      UnpackBf16x8(yv[j], x);
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[c] = __fadd_rn(acc[c], __fmul_rn(wt, x[c]));
    }
  }
  out[t * vecs_per_row + v] = Pack8(acc);
}

// One thread per (token, slot, 8-column vector).
__global__ void __launch_bounds__(kThreads)
    FinalizeGatherKernel(const uint4* __restrict__ y, const int32_t* __restrict__ slot_to_row,
                         int64_t num_slots, int64_t num_rows, int64_t vecs_per_row,
                         uint4* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  GridDependencyWait();
  GridDependencyTrigger();  // as FinalizeReduceKernel's
  if (i >= num_slots * vecs_per_row) return;
  const int64_t s = i / vecs_per_row;
  const int64_t v = i % vecs_per_row;
  const int32_t row = slot_to_row[s];
  uint4 val = make_uint4(0, 0, 0, 0);
  if (row >= 0 && row < num_rows) val = y[row * vecs_per_row + v];
  out[i] = val;
}

ffi::Error FinalizeImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> y,
                        ffi::Buffer<ffi::S32> slot_to_row, ffi::AnyBuffer weights,
                        ffi::Result<ffi::Buffer<ffi::BF16>> out, bool do_finalize) {
  if (y.dimensions().size() != 2) {
    return InvalidArgument("jax_moe_finalize: gemm2 output: expected rank 2 [M, H], got rank " +
                           std::to_string(y.dimensions().size()));
  }
  if (weights.dimensions().size() != 2) {
    return InvalidArgument("jax_moe_finalize: topk_weights: expected rank 2 [T, k], got rank " +
                           std::to_string(weights.dimensions().size()));
  }
  const bool f32_weights = weights.element_type() == ffi::DataType::F32;
  if (!f32_weights && weights.element_type() != ffi::DataType::BF16) {
    return InvalidArgument("jax_moe_finalize: topk_weights: dtype must be float32 or bfloat16");
  }
  const int64_t m = y.dimensions()[0];
  const int64_t h = y.dimensions()[1];
  const int64_t t = weights.dimensions()[0];
  const int64_t k = weights.dimensions()[1];
  if (h % 8 != 0) {
    return InvalidArgument("jax_moe_finalize: gemm2 output: H must be a multiple of 8, got " +
                           std::to_string(h));
  }
  if (k > 0x7fffffffLL) return InvalidArgument("jax_moe_finalize: topk_weights: k too large");
  JAX_MOE_RETURN_IF_ERROR(CheckShape(slot_to_row, "slot_to_row", {t * k}));
  if (do_finalize) {
    JAX_MOE_RETURN_IF_ERROR(CheckShape(*out, "finalize output", {t, h}));
  } else {
    JAX_MOE_RETURN_IF_ERROR(CheckShape(*out, "finalize output (do_finalize=False)", {t, k, h}));
  }
  const int64_t vecs = h / 8;
  const int64_t work = (do_finalize ? t : t * k) * vecs;
  if (work == 0) return ffi::Error::Success();
  const int64_t blocks_per_token = (vecs + kReduceThreads - 1) / kReduceThreads;
  const int64_t blocks = do_finalize ? t * blocks_per_token : (work + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffffLL) return InvalidArgument("jax_moe_finalize: problem too large");
  if (do_finalize && k > 4096) {  // the local-slot list lives in shared memory
    return InvalidArgument("jax_moe_finalize: topk_weights: k must be <= 4096, got " + std::to_string(k));
  }
  auto* yp = reinterpret_cast<const uint4*>(y.typed_data());
  auto* op = reinterpret_cast<uint4*>(out->typed_data());
  // Launched as a programmatic dependent (PDL) of the kernel before it: where that one lets its
  // dependents go early (the own GEMM kernel, once it has no tile left to load), the finalize's
  // blocks are scheduled during its last tiles and wait for it in GridDependencyWait.
  const bool pdl = StagePdl();
  cudaError_t err;
  if (do_finalize) {
    auto reduce = [&](auto* w) {  // w: the weights as float or __nv_bfloat16
      using W = std::remove_const_t<std::remove_pointer_t<decltype(w)>>;
      return LaunchKernel(FinalizeReduceKernel<W>, dim3(static_cast<unsigned>(blocks)), dim3(kReduceThreads),
                          k * sizeof(int2), stream, pdl, yp, slot_to_row.typed_data(), w,
                          static_cast<int>(k), m, vecs, blocks_per_token, op);
    };
    err = f32_weights ? reduce(static_cast<const float*>(weights.untyped_data()))
                      : reduce(static_cast<const __nv_bfloat16*>(weights.untyped_data()));
  } else {
    err = LaunchKernel(FinalizeGatherKernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream,
                       pdl, yp, slot_to_row.typed_data(), t * k, m, vecs, op);
  }
  if (err != cudaSuccess) return CudaError(err, "jax_moe_finalize", "kernel launch");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(FinalizeHandler, FinalizeImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::Buffer<ffi::BF16>>()   // gemm2 output [M, H]
                           .Arg<ffi::Buffer<ffi::S32>>()    // slot_to_row [T*k]
                           .Arg<ffi::AnyBuffer>()           // topk_weights [T, k], float32 or bfloat16
                           .Ret<ffi::Buffer<ffi::BF16>>()   // [T, H] or [T, k, H]
                           .Attr<bool>("do_finalize"),
                       {ffi::Traits::kCmdBufferCompatible});

JAX_MOE_REGISTER_TARGET("jax_moe_finalize", FinalizeHandler);

}  // namespace jax_moe
