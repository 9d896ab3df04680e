// jax_moe_act_quant: activation of the GEMM1 output in float32 and FP8 re-quantization per
// 1x128 block (SPEC section 3 steps 3-4). The GEMM1 output is float32 (what the pipeline passes)
// or bfloat16; the math is the same float32 either way. A group of lanes handles one (row,
// 128-block), each lane 32 bytes of the input and 32 of the gate half (float32: 16 lanes of 8
// values; bfloat16: 8 lanes of 16 values), so a lane has the same bytes in flight for either
// type; amax by shuffles within the group. Only rows below expert_offsets[E_loc] (read on the
// device) are processed; scales go to the grouped MN-major layout.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "ffi_common.h"
#include "stages.h"

namespace jax_moe {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kMaxGroups = 4096;
constexpr int kLaneBytes = 32;  // input bytes per lane and half (x, gate)

// Values per lane and lanes per (row, 128-block) for input element type T.
template <class T> constexpr int kLaneValues = kLaneBytes / static_cast<int>(sizeof(T));
template <class T> constexpr int kUnitLanes = 128 / kLaneValues<T>;
template <class T> constexpr int kUnitsPerBlock = kThreads / kUnitLanes<T>;
// Blocks resident at once (launch bounds: the grid below is one wave), 64 registers each.
constexpr int kBlocksPerSm = 4;

// A lane's 32 bytes as loaded (float32: 8 values, bfloat16: 16), and as float32.
template <class T> struct LaneBytes;
template <> struct LaneBytes<float> { float4 lo, hi; };
template <> struct LaneBytes<__nv_bfloat16> { uint4 lo, hi; };

template <class T>
__device__ __forceinline__ LaneBytes<T> LoadLane(const T* p) {
  using V = decltype(LaneBytes<T>::lo);
  const V* v = reinterpret_cast<const V*>(p);
  return {v[0], v[1]};
}

__device__ __forceinline__ void ToFloats(const LaneBytes<__nv_bfloat16>& b, float* f) {
  UnpackBf16x8(b.lo, f);
  UnpackBf16x8(b.hi, f + 8);
}

__device__ __forceinline__ void ToFloats(const LaneBytes<float>& b, float* f) {
  f[0] = b.lo.x, f[1] = b.lo.y, f[2] = b.lo.z, f[3] = b.lo.w;
  f[4] = b.hi.x, f[5] = b.hi.y, f[6] = b.hi.z, f[7] = b.hi.w;
}

// A lane's N (8 or 16) values a / s as fp8 -> q (N-byte aligned); one division per lane.
template <int N>
__device__ __forceinline__ void StoreFp8(const float* a, float s, __nv_fp8_storage_t* q) {
  const float inv_s = 1.0f / s;
  static_assert(N == 8 || N == 16, "8 or 16 values per lane");
  uint32_t w[N / 4];  // packed by shifts: a byte array would live in local memory
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    w[i] = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      w[i] |= static_cast<uint32_t>(__nv_cvt_float_to_fp8(DivideByScale(a[4 * i + j], s, inv_s), __NV_SATFINITE, __NV_E4M3)) << (8 * j);
  }
  if constexpr (N == 8) {
    *reinterpret_cast<uint2*>(q) = make_uint2(w[0], w[1]);
  } else {
    *reinterpret_cast<uint4*>(q) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// T: element type of the GEMM1 output, __nv_bfloat16 or float.
template <int ACT, class T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    ActQuantKernel(const T* __restrict__ g, const int32_t* __restrict__ offsets,
                   int num_groups, int64_t num_rows, int64_t inter,
                   __nv_fp8_storage_t* __restrict__ q, float* __restrict__ scales,
                   ZeroInts zero) {
  constexpr int kValues = kLaneValues<T>;
  constexpr int kLanes = kUnitLanes<T>;
  constexpr int kUnits = kUnitsPerBlock<T>;
  StageKernelBegin(zero);
  extern __shared__ int offs[];  // [G + 1]
  const int64_t valid_rows = LoadGroupOffsets(offsets, num_groups, offs, num_rows);
  const int64_t kb_count = inter / 128;
  const int64_t valid_units = valid_rows * kb_count;
  constexpr bool kGated = IsGatedActivation(ACT);
  const int64_t in_cols = kGated ? 2 * inter : inter;
  const int sub = threadIdx.x % kLanes;
  const int my_unit = threadIdx.x / kLanes;

  // Each block takes a contiguous, balanced share of the valid units (the count is known only
  // here), kUnits per step, so a lane's rows advance slowly and its cached group of the scale
  // layout rarely changes.
  const int64_t steps = (valid_units + kUnits - 1) / kUnits;
  const int64_t steps_per_block = (steps + gridDim.x - 1) / gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * steps_per_block * kUnits;
  const int64_t last = min(first + steps_per_block * kUnits, valid_units);
  int64_t unit = first + my_unit;
  // the lane's row and 128-block (rows < 2^31, checked by ActQuantStage)
  int r = static_cast<int>(unit / kb_count);
  int kb = static_cast<int>(unit % kb_count);
  const int d_r = static_cast<int>(kUnits / kb_count);
  const int d_kb = static_cast<int>(kUnits % kb_count);
  int64_t g_lo = 0, g_hi = 0;  // cached group [g_lo, g_hi) of the scale layout (empty: none)
  int grp = -1;

  // Uniform trip count for the whole block (every lane reaches every shuffle).
  for (int64_t base = first; base < last; base += kUnits) {
    const bool valid = unit < last;
    const int64_t offset = static_cast<int64_t>(r) * inter + kb * 128 + sub * kValues;  // in q
    float a[kValues];
    if (valid) {
      const T* src = g + static_cast<int64_t>(r) * in_cols + kb * 128 + sub * kValues;
      const LaneBytes<T> xb = LoadLane(src);
      LaneBytes<T> gb;
      if (kGated) gb = LoadLane(src + inter);
      float x[kValues], gate[kValues] = {};
      ToFloats(xb, x);
      if (kGated) ToFloats(gb, gate);
#pragma unroll
      for (int i = 0; i < kValues; ++i) a[i] = Activate<ACT>(x[i], gate[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kValues; ++i) a[i] = 0.0f;
    }
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kValues; ++i) amax = fmaxf(amax, fabsf(a[i]));
#pragma unroll
    for (int o = kLanes / 2; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, o));
    if (valid) {
      const float s = fmaxf(amax / 448.0f, FLT_MIN);
      StoreFp8<kValues>(a, s, q + offset);
      if (sub == 0) {
        if (r < g_lo || r >= g_hi) {
          grp = FindGroup(offs, num_groups, r);
          g_lo = grp >= 0 ? offs[grp] : 0;
          g_hi = grp >= 0 ? offs[grp + 1] : 0;
        }
        if (grp >= 0 && r >= g_lo && r < g_hi) {
          const int64_t idx = GroupedScaleIndex(g_lo, g_hi, r, kb, kb_count);
          if (idx >= 0 && idx < num_rows * kb_count) scales[idx] = s;
        }
      }
    }
    unit += kUnits;
    kb += d_kb;
    r += d_r;
    if (kb >= kb_count) {
      kb -= kb_count;
      ++r;
    }
  }
}

template <class T>
void LaunchActQuant(cudaStream_t stream, unsigned grid, size_t smem, int32_t activation,
                    const void* g, const int32_t* offsets, int num_groups, int64_t m,
                    int64_t inter, __nv_fp8_storage_t* q, float* scales, ZeroInts zero) {
  auto* gp = static_cast<const T*>(g);
  switch (activation) {
    case kSwiglu:
      ActQuantKernel<kSwiglu, T><<<grid, kThreads, smem, stream>>>(gp, offsets, num_groups, m,
                                                                   inter, q, scales, zero);
      break;
    case kGeglu:
      ActQuantKernel<kGeglu, T><<<grid, kThreads, smem, stream>>>(gp, offsets, num_groups, m,
                                                                  inter, q, scales, zero);
      break;
    case kRelu2:
      ActQuantKernel<kRelu2, T><<<grid, kThreads, smem, stream>>>(gp, offsets, num_groups, m,
                                                                  inter, q, scales, zero);
      break;
    default:
      ActQuantKernel<kIdentity, T><<<grid, kThreads, smem, stream>>>(gp, offsets, num_groups, m,
                                                                     inter, q, scales, zero);
      break;
  }
}

}  // namespace

ffi::Error ActQuantStage(cudaStream_t stream, const ffi::AnyBuffer& g, const ffi::Buffer<ffi::S32>& offsets,
                         ffi::AnyBuffer& q, ffi::Buffer<ffi::F32>& scales, int32_t activation,
                         ZeroInts zero) {
  const bool gated = IsGatedActivation(activation);
  if (!IsSupportedActivation(activation)) {
    return InvalidArgument("jax_moe_act_quant: activation: expected Swiglu (3), Geglu (4), "
                           "Relu2 (6) or Identity (9), got " + std::to_string(activation));
  }
  const ffi::DataType g_type = g.element_type();
  if (g_type != ffi::DataType::F32 && g_type != ffi::DataType::BF16) {
    return InvalidArgument("jax_moe_act_quant: gemm1 output: expected dtype float32 or bfloat16");
  }
  if (g.dimensions().size() != 2) {
    return InvalidArgument("jax_moe_act_quant: gemm1 output: expected rank 2 [M, N], got rank " +
                           std::to_string(g.dimensions().size()));
  }
  const int64_t m = g.dimensions()[0];
  const int64_t n = g.dimensions()[1];
  if (m > 0x7fffffffLL) return InvalidArgument("jax_moe_act_quant: gemm1 output: rows must be < 2^31");
  const int64_t inter = gated ? n / 2 : n;
  if ((gated && n % 2 != 0) || inter % 128 != 0) {
    return InvalidArgument(std::string("jax_moe_act_quant: gemm1 output: columns must be ") +
                           (gated ? "2*I" : "I") + " with I a multiple of 128, got " +
                           std::to_string(n));
  }
  if (!IsFp8E4M3(q)) {
    return InvalidArgument("jax_moe_act_quant: output: expected dtype float8_e4m3fn");
  }
  int num_groups = 0;
  JAX_MOE_RETURN_IF_ERROR(CheckOffsets(offsets, "jax_moe_act_quant", kMaxGroups, &num_groups));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(q, "act_quant output", {m, inter}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(scales, "act_quant scales (output)", {m * inter / 128}));
  if (m == 0 || inter == 0) return ffi::Error::Success();

  const bool f32 = g_type == ffi::DataType::F32;
  const unsigned grid = GridStrideBlocks(m * (inter / 128),  // (row, block) units, one wave
                                         f32 ? kUnitsPerBlock<float> : kUnitsPerBlock<__nv_bfloat16>,
                                         kBlocksPerSm);
  const size_t smem = (num_groups + 1) * sizeof(int);
  auto* qp = static_cast<__nv_fp8_storage_t*>(q.untyped_data());
  auto launch = f32 ? LaunchActQuant<float> : LaunchActQuant<__nv_bfloat16>;
  launch(stream, grid, smem, activation, g.untyped_data(), offsets.typed_data(), num_groups, m,
         inter, qp, scales.typed_data(), zero);
  JAX_MOE_CHECK_LAUNCH("jax_moe_act_quant kernel launch");
  return ffi::Error::Success();
}

namespace {

ffi::Error ActQuantImpl(cudaStream_t stream, ffi::AnyBuffer g, ffi::Buffer<ffi::S32> offsets,
                        ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::Buffer<ffi::F32>> scales,
                        int32_t activation) {
  return ActQuantStage(stream, g, offsets, *q, *scales, activation);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(ActQuantHandler, ActQuantImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()           // gemm1 output f32|bf16 [M, 2I] or [M, I]
                           .Arg<ffi::Buffer<ffi::S32>>()    // expert_offsets [E_loc + 1]
                           .Ret<ffi::AnyBuffer>()           // fp8 [M, I]
                           .Ret<ffi::Buffer<ffi::F32>>()    // scales [M*I/128]
                           .Attr<int32_t>("activation"),
                       {ffi::Traits::kCmdBufferCompatible});

JAX_MOE_REGISTER_TARGET("jax_moe_act_quant", ActQuantHandler);

}  // namespace jax_moe
