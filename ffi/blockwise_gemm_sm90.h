// The own TMA + wgmma blockwise-FP8 grouped GEMM (blockwise_gemm_sm90.cu): called by the
// "jax_moe_grouped_gemm" handler for its "own" tile configs after it has checked the arguments,
// and the kernel of the "jax_moe_gemm1_act_quant" target (GEMM1 with the activation and FP8
// re-quantization in its epilogue). The operand checks both handlers share.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "ffi_common.h"

namespace jax_moe {

constexpr int kOwnGemmMaxGroups = 512;  // group offsets live in shared memory
constexpr int kOwnGemmWorkspaceInts = 4;  // the own kernel's device workspace: its tile counter

struct GemmShape {
  int64_t m, n, k, g;  // a [M, K], b [G, N, K]
};

// a fp8 [M, K], a_scale f32 [M*K/128] (grouped MN-major), b fp8 [G, N, K], b_scale f32
// [G, N/128, K/128], expert_offsets int32 [G + 1]; K and N multiples of 128; sizes within the
// kernels' 32-bit range. `op` names the target in the error.
ffi::Error CheckGemmOperands(const char* op, const ffi::AnyBuffer& a, const ffi::Buffer<ffi::F32>& a_scale,
                             const ffi::AnyBuffer& b, const ffi::Buffer<ffi::F32>& b_scale,
                             const ffi::Buffer<ffi::S32>& offsets, GemmShape* shape);

// d, the GEMM's output: bfloat16 or float32 (*f32_out says which) of shape [M, N].
ffi::Error CheckGemmOutput(const char* op, const ffi::AnyBuffer& d, const GemmShape& shape, bool* f32_out);

// What the own kernel needs beyond that: at most kOwnGemmMaxGroups groups, 16-byte aligned
// buffers for TMA.
ffi::Error CheckOwnGemm(const char* op, int64_t num_groups, std::initializer_list<const void*> tma_buffers);

// block_m: 128 (128 x 128 tiles), 64 (64 x 256) or 32, 16, 8 (64 x 256 with that many rows of a per
// tile: the trimmed tiles of blockwise_gemm_sm90.cu); d is float32 if f32_out, else bfloat16. a, b and d
// must be 16-byte aligned and k, n multiples of 128 (TMA). tile_counter: kOwnGemmWorkspaceInts
// ints of device memory, zeroed here on the stream before the launch unless `pdl`. On failure
// *what names the step.
// pdl: launched as a programmatic dependent of the kernel before it on the stream (ffi_common.h),
// which the caller launched after zeroing tile_counter and which must call GridDependencyTrigger
// only after its own inputs are complete. That kernel may write a and a_scale; the GEMM reads
// offsets, b and b_scale (and issues its first weight loads) before the wait, so those must be
// complete when that kernel starts.
cudaError_t LaunchOwnGroupedGemm(cudaStream_t stream, bool pdl, int block_m, bool f32_out, int num_groups, int m,
                                 int n, int k, const void* a, const float* a_scale, const void* b, const float* b_scale,
                                 const int32_t* offsets, void* d, int* tile_counter, const char** what);

}  // namespace jax_moe
