// Blockwise-FP8 grouped GEMM for Hopper (sm_90a): XLA FFI target "jax_moe_grouped_gemm".
//
//   d[r, :] = dequant(a[r, :]) @ dequant(b[g]).T   for every row r of group g,
//
// with a fp8 [M, K] (1x128 scales, grouped MN-major, see jax_moe/ops.py), b fp8 [G, N, K]
// (128x128 scales [G, N/128, K/128]), groups = contiguous row ranges given by
// expert_offsets int32 [G+1], d bfloat16 or float32 [M, N] (the dtype of the result buffer
// picks the kernel). Rows past offsets[G] are not written.
//
// Built on CUTLASS 4.2's sm90 pointer-array grouped GEMM with software blockwise scaling
// (KernelPtrArrayTmaWarpSpecialized{Cooperative,Pingpong}FP8Blockwise): fp32 accumulation,
// every 128-wide K block's partial sum is scaled by sfa * sfb and added in fp32.
//
// Everything the grouped kernel reads per group (problem shapes, pointer arrays, strides,
// scale layouts) is written on the device by `SetupGroupsKernel` into the caller's workspace,
// and CUTLASS's own workspace (per-SM TMA descriptors) is carved from the same buffer; the
// host never sees the offsets, so the handler is CUDA-graph safe (no sync, no allocation).
//
// Scale layouts as CUTLASS reads them (Sm90BlockwiseScaleConfig<1, 128, 128, MN, K>):
//   SFA, MN-major per group: group g's scales start at a_scale + offsets[g]*K/128 and form a
//     [K/128, M_g] row-major block -- exactly the grouped MN-major layout of ops.py.
//   SFB, K-major: scale(n_blk, k_blk) of group g at b_scale + g*(N/128)*(K/128)
//     + n_blk*(K/128) + k_blk -- the user's [G, N/128, K/128] row-major array, unchanged.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>

// The XLA FFI headers come first: CUTLASS's cute/atom/mma_traits_sm100.hpp turns
// -Wmissing-field-initializers into an error, which newer XLA FFI headers trip.
#include "ffi_common.h"
#include "blockwise_gemm_sm90.h"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/numeric_types.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#endif

namespace jax_moe {
namespace {

using namespace cute;

constexpr int kBlock = 128;  // scale block along K (and N for the weights)

// --------------------------------------------------------------------------------------------
// Kernel configuration: one template, instantiated for three tile configs x two output types
// (6 kernels). Most of this file's compile time is CUTLASS's headers and shared templates; a
// second translation unit would redo ~60 s of it.
// --------------------------------------------------------------------------------------------
// SwapAB_: the kernel computes d^T = b . a^T per group -- the weights are CUTLASS's A (the
// 128-row M tiles run over the N output columns) and the token rows are its B (the 32-row N
// tile runs over the group's rows), so a group pads to 32 rows instead of a 64/128-row M tile
// while both math warpgroups stay busy. d^T is stored column-major, which
// is d row-major: the memory layouts of a, b, d and of both scale arrays are unchanged.
template <class ElementD_, class TileShape_, class ClusterShape_, class KernelSchedule_,
          class EpilogueSchedule_, bool SwapAB_ = false>
struct GroupedGemmConfig {
  static constexpr bool kSwapAB = SwapAB_;
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = ElementD_;  // cutlass::bfloat16_t or float
  static_assert(std::is_same_v<ElementD, cutlass::bfloat16_t> || std::is_same_v<ElementD, float>);
  using ElementAcc = float;  // also the element type of the block scales
  // Operand A: the token rows a [M, K] (swapped: the weights b[g] [N, K]); operand B: b[g]
  // (swapped: a). Both K contiguous, i.e. A row-major and B column-major either way.
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  // d [M, N] row-major; swapped, CUTLASS's output is d^T [N, M] -- the same bytes, column-major.
  using LayoutD = std::conditional_t<kSwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  // 16 bytes each: 16 fp8, 8 bf16 or 4 float. D rows start at offsets[g]*N elements with
  // N % 128 == 0, so every group's D pointer stays 16-byte aligned for both output types.
  static constexpr int kAlignA = 16, kAlignB = 16;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

  // Token scales: one per row and 128-block of K, grouped MN-major (rows contiguous); weight
  // scales: one per 128x128 block, K-major. Swapped, the two trade places (SFA = weights).
  using ScaleConfig = std::conditional_t<
      kSwapAB,
      cutlass::detail::Sm90BlockwiseScaleConfig<kBlock, 1, kBlock, cute::GMMA::Major::K, cute::GMMA::Major::MN>,
      cutlass::detail::Sm90BlockwiseScaleConfig<1, kBlock, kBlock, cute::GMMA::Major::MN, cute::GMMA::Major::K>>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape_, ClusterShape_,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc,
      void, LayoutD*, kAlignD,  // no C operand
      ElementD, LayoutD*, kAlignD, EpilogueSchedule_,
      cutlass::epilogue::fusion::LinearCombination<ElementD, ElementAcc, void, ElementAcc>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementA, cute::tuple<LayoutA*, LayoutSFA*>, kAlignA,
      ElementB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignB,
      ElementAcc, TileShape_, ClusterShape_,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule_>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
  static_assert(std::is_same_v<StrideA, cute::Stride<int64_t, cute::_1, cute::_0>>);
  static_assert(std::is_same_v<StrideB, cute::Stride<int64_t, cute::_1, cute::_0>>);
  static_assert(std::is_same_v<StrideD, std::conditional_t<kSwapAB, cute::Stride<cute::_1, int64_t, cute::_0>,
                                                            cute::Stride<int64_t, cute::_1, cute::_0>>>);
};

// The 128x128x128 cooperative tile with a given cluster shape.
template <class ElementD, class ClusterShape>
using Cooperative128Config = GroupedGemmConfig<ElementD, Shape<_128, _128, _128>, ClusterShape,
                                               cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                                               cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
// Many rows per group: 2-CTA clusters along N (A multicast).
template <class ElementD>
using BigConfig = Cooperative128Config<ElementD, Shape<_1, _2, _1>>;
// Few rows per group (decode): 64x128x128 ping-pong, less padding waste along M.
template <class ElementD>
using SmallConfig = GroupedGemmConfig<ElementD, Shape<_64, _128, _128>, Shape<_1, _1, _1>,
                                      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise,
                                      cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>;

// Swapped operands, 128 weight rows x 32 token rows per tile: for groups of a few rows (decode),
// where 64/128-row M tiles are mostly padding. (A 64-token variant never won in the sweep.)
template <class ElementD>
using SwapConfig = GroupedGemmConfig<ElementD, Shape<_128, _32, _128>, Shape<_1, _1, _1>,
                                     cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                                     cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, true>;

#ifdef JAX_MOE_GEMM_EXPERIMENTS
// Experiment builds only (-DJAX_MOE_GEMM_EXPERIMENTS=ON): the 128x128 cooperative tile with
// clusters of 2 along M (the weights' N tile multicast to both M tiles of a group) and 2x2.
template <class ElementD>
using BigM2Config = Cooperative128Config<ElementD, Shape<_2, _1, _1>>;
template <class ElementD>
using BigM2N2Config = Cooperative128Config<ElementD, Shape<_2, _2, _1>>;
// What cuBLAS runs for the blockwise GEMM at these shapes (nvjet ..._128x128_128x6_1x2_...
// _coopA_..._Ablk128_Bvec128: benchmarks/RESULTS.md, twenty-eighth session): swapped operands
// (the weights on A), a 128 x 128 x 128 cooperative tile, 1 x 2 clusters (each weight tile
// multicast to two token tiles of its group).
template <class ElementD>
using SwapBigConfig = GroupedGemmConfig<ElementD, Shape<_128, _128, _128>, Shape<_1, _2, _1>,
                                        cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                                        cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, true>;
#endif

// --------------------------------------------------------------------------------------------
// Per-group argument arrays in the workspace (offsets computed on the host from G only).
// --------------------------------------------------------------------------------------------
template <class Cfg>
struct GroupArrays {
  using Shape3 = typename Cfg::ProblemShape::UnderlyingProblemShape;
  Shape3* shapes;
  const typename Cfg::ElementA** ptr_a;
  const typename Cfg::ElementB** ptr_b;
  typename Cfg::ElementD** ptr_d;
  const float** ptr_sfa;
  const float** ptr_sfb;
  typename Cfg::StrideA* stride_a;
  typename Cfg::StrideB* stride_b;
  typename Cfg::StrideD* stride_d;
  typename Cfg::LayoutSFA* layout_sfa;
  typename Cfg::LayoutSFB* layout_sfb;

  static constexpr size_t kAlign = 256;
  static size_t Round(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

  // Carves the arrays from `base` (nullptr: only measures). Returns the bytes used.
  static size_t Carve(uint8_t* base, int64_t g, GroupArrays* out) {
    size_t off = 0;
    auto take = [&](auto*& p, size_t elem_bytes) {
      using P = std::remove_reference_t<decltype(p)>;
      p = base ? reinterpret_cast<P>(base + off) : nullptr;
      off += Round(elem_bytes * static_cast<size_t>(g));
    };
    take(out->shapes, sizeof(Shape3));
    take(out->ptr_a, sizeof(void*));
    take(out->ptr_b, sizeof(void*));
    take(out->ptr_d, sizeof(void*));
    take(out->ptr_sfa, sizeof(void*));
    take(out->ptr_sfb, sizeof(void*));
    take(out->stride_a, sizeof(typename Cfg::StrideA));
    take(out->stride_b, sizeof(typename Cfg::StrideB));
    take(out->stride_d, sizeof(typename Cfg::StrideD));
    take(out->layout_sfa, sizeof(typename Cfg::LayoutSFA));
    take(out->layout_sfb, sizeof(typename Cfg::LayoutSFB));
    return off;
  }
};

// One thread per group: problem shape, pointers, strides and scale layouts of group g.
// Offsets are clamped into [0, M] and made non-decreasing, so bad offsets cannot make the GEMM
// read or write out of bounds.
template <class Cfg>
__global__ void SetupGroupsKernel(GroupArrays<Cfg> arr, const int32_t* __restrict__ offsets, int num_groups,
                                  int m, int n, int k, const uint8_t* a, const float* a_scale,
                                  const uint8_t* b, const float* b_scale, typename Cfg::ElementD* d) {
  int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= num_groups) return;
  int start = min(max(offsets[g], 0), m);
  int end = min(max(offsets[g + 1], start), m);
  int rows = end - start;
  int64_t kb = k / kBlock, nb = n / kBlock;

  const uint8_t* tokens = a + int64_t(start) * k;
  const uint8_t* weights = b + int64_t(g) * n * k;
  const float* token_scales = a_scale + int64_t(start) * kb;
  const float* weight_scales = b_scale + int64_t(g) * nb * kb;
  using EA = typename Cfg::ElementA;
  using EB = typename Cfg::ElementB;
  arr.ptr_d[g] = d + int64_t(start) * n;
  arr.stride_a[g] = typename Cfg::StrideA{int64_t(k), {}, {}};
  arr.stride_b[g] = typename Cfg::StrideB{int64_t(k), {}, {}};
  if constexpr (Cfg::kSwapAB) {  // (M, N, K) = (n, rows, k): A = weights, B = tokens
    arr.shapes[g] = typename GroupArrays<Cfg>::Shape3(n, rows, k);
    arr.ptr_a[g] = reinterpret_cast<const EA*>(weights);
    arr.ptr_b[g] = reinterpret_cast<const EB*>(tokens);
    arr.ptr_sfa[g] = weight_scales;
    arr.ptr_sfb[g] = token_scales;
    arr.stride_d[g] = typename Cfg::StrideD{{}, int64_t(n), {}};
    arr.layout_sfa[g] = Cfg::ScaleConfig::tile_atom_to_shape_SFA(make_shape(n, rows, k, 1));
    arr.layout_sfb[g] = Cfg::ScaleConfig::tile_atom_to_shape_SFB(make_shape(n, rows, k, 1));
  } else {  // (M, N, K) = (rows, n, k): A = tokens, B = weights
    arr.shapes[g] = typename GroupArrays<Cfg>::Shape3(rows, n, k);
    arr.ptr_a[g] = reinterpret_cast<const EA*>(tokens);
    arr.ptr_b[g] = reinterpret_cast<const EB*>(weights);
    arr.ptr_sfa[g] = token_scales;
    arr.ptr_sfb[g] = weight_scales;
    arr.stride_d[g] = typename Cfg::StrideD{int64_t(n), {}, {}};
    arr.layout_sfa[g] = Cfg::ScaleConfig::tile_atom_to_shape_SFA(make_shape(rows, n, k, 1));
    arr.layout_sfb[g] = Cfg::ScaleConfig::tile_atom_to_shape_SFB(make_shape(rows, n, k, 1));
  }
}

// SM count and co-resident clusters of the kernel on a device: host queries, done once per
// (config, device) and cached (never inside the data path; no stream work).
template <class Cfg>
cutlass::KernelHardwareInfo HardwareInfo(int device) {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static cutlass::KernelHardwareInfo info[kMaxDevices];
  int slot = (device >= 0 && device < kMaxDevices) ? device : 0;
  std::call_once(once[slot], [&] {
    using Kernel = typename Cfg::GemmKernel;
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    cudaDeviceGetAttribute(&hw.sm_count, cudaDevAttrMultiProcessorCount, device);
    int smem = Kernel::SharedStorageSize;
    auto kernel = cutlass::device_kernel<Kernel>;
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = size<0>(typename Kernel::ClusterShape{});
    attr.val.clusterDim.y = size<1>(typename Kernel::ClusterShape{});
    attr.val.clusterDim.z = size<2>(typename Kernel::ClusterShape{});
    cfg.gridDim = dim3(attr.val.clusterDim.x, attr.val.clusterDim.y, attr.val.clusterDim.z);
    cfg.blockDim = Kernel::get_block_shape();
    cfg.dynamicSmemBytes = smem;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) clusters = 0;
    cudaGetLastError();  // a failed query only costs the better grid size; clear it
    hw.max_active_clusters = clusters;
    info[slot] = hw;
  });
  return info[slot];
}

template <class Cfg>
typename Cfg::Gemm::Arguments MakeArguments(const GroupArrays<Cfg>& arr, int num_groups,
                                            cutlass::KernelHardwareInfo hw) {
  typename Cfg::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {num_groups, arr.shapes, nullptr},  // problem shapes live on the device only
      {arr.ptr_a, arr.stride_a, arr.ptr_b, arr.stride_b, arr.ptr_sfa, arr.layout_sfa, arr.ptr_sfb,
       arr.layout_sfb},
      {{}, nullptr, nullptr, arr.ptr_d, arr.stride_d},
      hw};
#ifdef JAX_MOE_GEMM_EXPERIMENTS
  // Experiment builds: the tile scheduler's raster order (0 along M, 1 along N) and swizzle.
  if (const char* r = std::getenv("JAX_MOE_EXP_RASTER")) {
    using Raster = decltype(args.scheduler.raster_order);
    args.scheduler.raster_order = std::atoi(r) == 1 ? Raster::AlongN : Raster::AlongM;
  }
  if (const char* sw = std::getenv("JAX_MOE_EXP_SWIZZLE")) args.scheduler.max_swizzle_size = std::atoi(sw);
#endif
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  return args;
}

// Host-side size of everything the handler needs in its workspace; depends on G and the
// device only (CUTLASS's part is per-SM TMA descriptors), never on the data.
template <class Cfg>
size_t WorkspaceBytes(int num_groups, cutlass::KernelHardwareInfo hw, size_t* setup_bytes) {
  GroupArrays<Cfg> arr{};
  *setup_bytes = GroupArrays<Cfg>::Carve(nullptr, num_groups, &arr);
  auto args = MakeArguments<Cfg>(arr, num_groups, hw);
  return *setup_bytes + Cfg::Gemm::get_workspace_size(args);
}

template <class Cfg>
ffi::Error RunGroupedGemm(cudaStream_t stream, int device, int num_groups, int m, int n, int k,
                          const void* a, const float* a_scale, const void* b, const float* b_scale,
                          const int32_t* offsets, void* d, uint8_t* workspace, size_t workspace_size) {
  cutlass::KernelHardwareInfo hw = HardwareInfo<Cfg>(device);
  size_t setup_bytes = 0;
  // The carve starts at the first 256-byte boundary (TMA descriptors want 64-byte alignment).
  size_t pad = (256 - reinterpret_cast<uintptr_t>(workspace) % 256) % 256;
  size_t need = WorkspaceBytes<Cfg>(num_groups, hw, &setup_bytes) + pad;
  if (workspace_size < need) {
    return InvalidArgument("jax_moe_grouped_gemm: workspace: need " + std::to_string(need) +
                           " bytes for " + std::to_string(num_groups) + " groups on " +
                           std::to_string(hw.sm_count) + " SMs, got " + std::to_string(workspace_size) +
                           " (fix grouped_gemm_workspace_bytes in jax_moe/ops.py)");
  }
  workspace += pad;

  GroupArrays<Cfg> arr{};
  GroupArrays<Cfg>::Carve(workspace, num_groups, &arr);
  constexpr int kThreads = 256;
  SetupGroupsKernel<Cfg><<<CeilDiv(num_groups, kThreads), kThreads, 0, stream>>>(
      arr, offsets, num_groups, m, n, k, static_cast<const uint8_t*>(a), a_scale,
      static_cast<const uint8_t*>(b), b_scale, static_cast<typename Cfg::ElementD*>(d));
  JAX_MOE_CHECK_LAUNCH("jax_moe_grouped_gemm setup kernel");

  typename Cfg::Gemm gemm;
  auto args = MakeArguments<Cfg>(arr, num_groups, hw);
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess) {
    return InvalidArgument(std::string("jax_moe_grouped_gemm: CUTLASS cannot implement this problem: ") +
                           cutlassGetStatusString(st));
  }
  st = gemm.initialize(args, workspace + setup_bytes, stream);
  if (st != cutlass::Status::kSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_moe_grouped_gemm: CUTLASS initialize failed: ") +
                          cutlassGetStatusString(st));
  }
  st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess) {
    cudaError_t err = cudaGetLastError();
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_moe_grouped_gemm: CUTLASS launch failed: ") + cutlassGetStatusString(st) +
                          " (" + cudaGetErrorString(err) + ")");
  }
  JAX_MOE_CHECK_LAUNCH("jax_moe_grouped_gemm kernel");
  return ffi::Error::Success();
}

// Tile configs, the handler's `tile` attribute (jax_moe/ops.py GEMM_TILES lists the same
// numbers and chooses one per call, "auto" included): 1 = cooperative 128x128, 2 = ping-pong
// 64x128, 3 = swapped operands with 32 token rows per tile; 4, 5, 20 in experiment builds; 6, 8 =
// the own TMA + wgmma kernel (blockwise_gemm_sm90.cu) with 128x128 and 64x256 tiles (7, its
// 128x192 tile until 2026-11, is retired: it never won and spilled); 9, 10, 11 = its trimmed
// 64x256 tiles with 32, 16 and 8 rows of a per tile (decode batches).
enum Tile : int32_t {
  kBig = 1, kSmall = 2, kSwap32 = 3, kBigM2 = 4, kBigM2N2 = 5, kOwn128 = 6, kOwn64 = 8, kOwn32 = 9, kOwn16 = 10,
  kOwn8 = 11, kSwapBig = 20
};
// The own kernel's row tile of an own tile config, 0 for the CUTLASS ones.
constexpr int OwnBlockM(int32_t t) {
  return t == kOwn128 ? 128 : t == kOwn64 ? 64 : t == kOwn32 ? 32 : t == kOwn16 ? 16 : t == kOwn8 ? 8 : 0;
}
#ifdef JAX_MOE_GEMM_EXPERIMENTS
constexpr bool kExperimentTiles = true;
#else
constexpr bool kExperimentTiles = false;
#endif
constexpr bool IsKnownTile(int32_t t) {
  return t == kBig || t == kSmall || t == kSwap32 || OwnBlockM(t) > 0 ||
         (kExperimentTiles && (t == kBigM2 || t == kBigM2N2 || t == kSwapBig));
}

// The tile ids IsKnownTile accepts, for error messages: "1, 2, 3, 6, 8, 9, 10 or 11".
std::string KnownTilesText() {
  std::string text;
  int last = -1;
  for (int t = 0; t < 64; ++t) {
    if (!IsKnownTile(t)) continue;
    if (last >= 0) text += (text.empty() ? "" : ", ") + std::to_string(last);
    last = t;
  }
  return text + " or " + std::to_string(last);
}

// --------------------------------------------------------------------------------------------
// The handler.
// --------------------------------------------------------------------------------------------
ffi::Error GroupedGemmImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer a,
                           ffi::Buffer<ffi::F32> a_scale, ffi::AnyBuffer b, ffi::Buffer<ffi::F32> b_scale,
                           ffi::Buffer<ffi::S32> offsets, ffi::Result<ffi::AnyBuffer> d,
                           ffi::Result<ffi::Buffer<ffi::U8>> workspace, int32_t tile) {
  const char* op = "jax_moe_grouped_gemm";
  if (!IsKnownTile(tile))
    return InvalidArgument(std::string(op) + ": tile: expected " + KnownTilesText() + ", got " +
                           std::to_string(tile));
  GemmShape sh;
  JAX_MOE_RETURN_IF_ERROR(CheckGemmOperands(op, a, a_scale, b, b_scale, offsets, &sh));
  const int64_t m = sh.m, n = sh.n, k = sh.k, g = sh.g;
  bool f32_out = false;
  JAX_MOE_RETURN_IF_ERROR(CheckGemmOutput(op, *d, sh, &f32_out));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(*workspace, "jax_moe_grouped_gemm: workspace", {-1}));
  if (m == 0 || n == 0 || g == 0) return ffi::Error::Success();  // nothing to write

  if (OwnBlockM(tile) > 0) {
    JAX_MOE_RETURN_IF_ERROR(CheckOwnGemm(op, g, {a.untyped_data(), b.untyped_data(), d->untyped_data()}));
    const char* what = "";
    cudaError_t err = LaunchOwnGroupedGemm(stream, false, OwnBlockM(tile), f32_out, int(g), int(m), int(n),
                                           int(k), a.untyped_data(), a_scale.typed_data(), b.untyped_data(),
                                           b_scale.typed_data(), offsets.typed_data(), d->untyped_data(),
                                           reinterpret_cast<int*>(workspace->typed_data()), &what);
    if (err != cudaSuccess) return CudaError(err, std::string(op) + " (own kernel)", what);
    return ffi::Error::Success();
  }

  auto run = [&](auto cfg_tag) {
    using Cfg = decltype(cfg_tag);
    return RunGroupedGemm<Cfg>(stream, device, int(g), int(m), int(n), int(k), a.untyped_data(),
                               a_scale.typed_data(), b.untyped_data(), b_scale.typed_data(), offsets.typed_data(),
                               d->untyped_data(), workspace->typed_data(), workspace->size_bytes());
  };
  auto run_d = [&](auto d_tag) {
    using D = decltype(d_tag);
    switch (tile) {
      case kSwap32: return run(SwapConfig<D>{});
      case kSmall: return run(SmallConfig<D>{});
#ifdef JAX_MOE_GEMM_EXPERIMENTS
      case kBigM2: return run(BigM2Config<D>{});
      case kBigM2N2: return run(BigM2N2Config<D>{});
      case kSwapBig: return run(SwapBigConfig<D>{});
#endif
      default: return run(BigConfig<D>{});  // kBig
    }
  };
  return f32_out ? run_d(float{}) : run_d(cutlass::bfloat16_t{});
}

}  // namespace
}  // namespace jax_moe

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMoeGroupedGemm, jax_moe::GroupedGemmImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<xla::ffi::DeviceOrdinal>()
                                  .Arg<xla::ffi::AnyBuffer>()                   // a
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()       // a_scale
                                  .Arg<xla::ffi::AnyBuffer>()                   // b
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()       // b_scale
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()       // expert_offsets
                                  .Ret<xla::ffi::AnyBuffer>()                   // d: bf16 or f32
                                  .Ret<xla::ffi::Buffer<xla::ffi::U8>>()        // workspace
                                  .Attr<int32_t>("tile"),                       // Tile above
                              {xla::ffi::Traits::kCmdBufferCompatible});

JAX_MOE_REGISTER_TARGET("jax_moe_grouped_gemm", JaxMoeGroupedGemm);
