// Stage launches shared between FFI targets: the permute and act_quant stages (checks + kernel
// launch, exactly what their own targets run) for the targets that chain one of them with the
// own GEMM in a single call (blockwise_gemm_sm90.cu: "jax_moe_permute_gemm",
// "jax_moe_act_quant_gemm"). Their kernels begin with StageKernelBegin (below): it waits for the
// kernel before (they may be launched as its PDL dependents, StagePdl()), then triggers the grid
// dependency, so a GEMM launched after them with PDL starts loading its weights while they run,
// and sets `zero` (none by default) to 0: the GEMM's tile counter (and the decode chain's group
// counters), which the GEMM reads only after its grid-dependency wait, so the pair needs no
// memset of its own. The kernel runs whenever the GEMM does (both need M > 0 and K > 0).
#pragma once

#include <cuda_runtime.h>

#include "ffi_common.h"

namespace jax_moe {

// Local experts a plan covers at most (jax_moe_plan, jax_moe_route_plan, the permute's offsets).
constexpr int kMaxLocalExperts = 512;

// Which expert ids a plan counts as local (jax_moe_plan, jax_moe_route_plan): id - offset in
// [0, E_loc), and id in [0, num_global) when num_global > 0.
struct LocalRange {
  int32_t offset;
  int32_t num_global;
};

// The plan attributes' checks jax_moe_plan and jax_moe_route_plan share: num_local_experts in
// [1, kMaxLocalExperts], expert_offset and num_experts >= 0, offsets [num_local_experts + 1].
ffi::Error CheckPlanAttrs(const char* op, int32_t num_local_experts, int32_t expert_offset, int32_t num_experts,
                          const ffi::Buffer<ffi::S32>& offsets);

// Ints a stage kernel sets to 0 before anything else (StageKernelBegin): count ints at ptr.
struct ZeroInts {
  int32_t* ptr = nullptr;
  int count = 0;
};

// jax_moe_permute: hidden fp8 [T, H], hidden_scale f32 [H/128, T], slot_to_row and row_to_slot
// int32 [T*k] (the plan's), offsets int32 [E + 1] -> rows fp8 [T*k, H], row_scales f32
// [T*k*H/128] (grouped MN-major).
ffi::Error PermuteStage(cudaStream_t stream, const ffi::AnyBuffer& hidden, const ffi::Buffer<ffi::F32>& hidden_scale,
                        const ffi::Buffer<ffi::S32>& slot_to_row, const ffi::Buffer<ffi::S32>& row_to_slot,
                        const ffi::Buffer<ffi::S32>& offsets, ffi::AnyBuffer& rows,
                        ffi::Buffer<ffi::F32>& row_scales, int32_t top_k, ZeroInts zero = {});

// jax_moe_act_quant: g f32|bf16 [M, 2I] (gated) or [M, I], offsets int32 [G + 1] -> q fp8 [M, I],
// scales f32 [M*I/128] (grouped MN-major).
ffi::Error ActQuantStage(cudaStream_t stream, const ffi::AnyBuffer& g, const ffi::Buffer<ffi::S32>& offsets,
                         ffi::AnyBuffer& q, ffi::Buffer<ffi::F32>& scales, int32_t activation,
                         ZeroInts zero = {});

#ifdef __CUDACC__
// The plan's bucket of expert id: id - lr.offset when that is a local expert (LocalRange), else
// num_local (every slot that is not local).
__device__ __forceinline__ int Bucket(int32_t id, int num_local, LocalRange lr) {
  if (lr.num_global > 0 && (id < 0 || id >= lr.num_global)) return num_local;
  const int64_t local = static_cast<int64_t>(id) - lr.offset;
  return (local >= 0 && local < num_local) ? static_cast<int>(local) : num_local;
}

// Lets the kernel's PDL dependent (the pair's GEMM) start and zeroes that GEMM's counters (`zero`,
// none outside a pair) with block 0's threads. Only once the kernel before has finished (after
// GridDependencyWait, or in a kernel whose start implies it): what the dependent reads before its
// own wait -- the plan's offsets -- must be complete when it starts.
__device__ __forceinline__ void StageKernelTrigger(ZeroInts zero) {
  GridDependencyTrigger();
  if (blockIdx.x == 0)
    for (int i = threadIdx.x; i < zero.count; i += blockDim.x) zero.ptr[i] = 0;
}

// First thing a stage kernel does: wait for the kernel before (a no-op unless launched with PDL;
// nothing is read or written before it, so XLA's reuse of a finished buffer's memory is safe),
// then StageKernelTrigger.
__device__ __forceinline__ void StageKernelBegin(ZeroInts zero) {
  GridDependencyWait();
  StageKernelTrigger(zero);
}
#endif

}  // namespace jax_moe
