// The own TMA + wgmma blockwise-FP8 grouped GEMM (blockwise_gemm_sm90.cu), called by the
// "jax_moe_grouped_gemm" handler for its "own" tile configs after it has checked the arguments.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace jax_moe {

constexpr int kOwnGemmMaxGroups = 512;  // group offsets live in shared memory

// block_n: 128 or 192 output columns per tile; d is float32 if f32_out, else bfloat16. a, b and d
// must be 16-byte aligned and k, n multiples of 128 (TMA). On failure *what names the step.
cudaError_t LaunchOwnGroupedGemm(cudaStream_t stream, int block_n, bool f32_out, int num_groups, int m, int n, int k,
                                 const void* a, const float* a_scale, const void* b, const float* b_scale,
                                 const int32_t* offsets, void* d, const char** what);

}  // namespace jax_moe
