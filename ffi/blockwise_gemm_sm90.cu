// Blockwise-FP8 grouped GEMM for Hopper (sm_90a) written directly on TMA + wgmma: the "own128"
// and "own64" tile configs of the "jax_moe_grouped_gemm" target (grouped_gemm_sm90.cu checks
// the arguments and calls LaunchOwnGroupedGemm). Same contract and memory layouts as the
// CUTLASS configs there:
//
//   d[r, :] = dequant(a[r, :]) @ dequant(b[g]).T   for every row r of group g,
//
// a fp8 [M, K] with 1x128 scales grouped MN-major (group g's scales form a [K/128, M_g]
// row-major block starting at a_scale + offsets[g]*K/128), b fp8 [G, N, K] with 128x128 scales
// [G, N/128, K/128], groups = row ranges [offsets[g], offsets[g+1]), d bf16 or f32 [M, N]; rows
// past offsets[G] are not written.
//
// Design (DeepGEMM-style): persistent CTAs walk the (group, column block, row tile) list,
// ordered so that the row tiles sharing a weight tile run together. Tile shapes, BM x BN
// (rows of a x rows of b): 128 x 128 ("own128": math warpgroup w on tile rows [64w, 64w+64))
// and 64 x 256 ("own64": both on the same 64 rows, warpgroup w on b rows [128w, 128w+128)).
// Either way a warpgroup computes a 64 x 128 block; own64 pads each group's rows to 64, not
// 128, at the price of a 40 KB instead of 32 KB pipeline stage. The fused GEMM1 with a gated
// activation and BM = 128 takes 128 x 256 tiles ("wide": warpgroup w on rows [64w, 64w+64) and
// all 256 b rows, as two 64 x 128 blocks one after the other through the same float32 partial),
// so each weight tile has one reader for up to 128 rows of a group. Per CTA:
//   warpgroup 0: thread 0 issues the TMA loads of each 128-wide K block (A: BM rows, B: BN rows
//     in 64-row boxes) into a ring of shared-memory stages; warp 1 copies the K block's scales
//     (BM row scales, two weight-block scales) into the same stage, so the math never waits on a
//     global load. The stage's "full" barrier counts the TMA bytes and the 32 scale lanes.
//   warpgroups 1, 2: wgmma m64n128k32 into a float32 partial per K block, then
//     acc += partial * (row scale * weight scale) -- float32 promotion every 128 of K. Every
//     own128 / own64 tile runs all its MMAs, even a half past its group's end (zero row scales
//     there): skipping such halves made tile costs unequal, the CTAs that share a weight tile
//     drifted apart and re-read it from DRAM (ncu, 256 groups of 256 +- 20 % rows: 20 GB read
//     for 8 GB of operands, 7.9 ms; without the skip 5.7 ms). The wide tile does skip them (and
//     loads a in 64-row boxes, only those the group reaches): it is chosen where groups have
//     about 64 rows, so a weight tile has one reader and there is nothing to drift apart.
//   epilogue: each math warpgroup writes its 64 x 128 block into shared memory (128-byte swizzled
//     boxes, bank-conflict free) and thread 0 stores it by TMA, asynchronously: the next tile's
//     MMAs start while the store drains. A half tile that runs past its group's end is copied
//     out by the warpgroup's threads with a row check instead (a TMA box cannot stop at a group
//     boundary, and the rows beyond belong to the next group).
// The group offsets are read on the device (clamped to [0, M] and made non-decreasing) and the
// tensor maps are encoded on the host from the buffer addresses: no setup kernel, no host sync.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cfloat>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <string>

#include "blockwise_gemm_sm90.h"
#include "ffi_common.h"  // NumSms
#include "stages.h"

namespace jax_moe {
namespace {

constexpr int BK = 128;
constexpr int kThreads = 384;  // warpgroup 0: loads; warpgroups 1, 2: math
constexpr int kSmemLimit = 227 * 1024;
constexpr int kTileSlots = 4;     // tile indices handed from the TMA thread to the other roles
constexpr int kTileReaders = 9;   // the scale warp and the 8 math warps

// What the epilogue writes (see OwnGroupedGemmKernel).
enum Epilogue : int { kStore = 0, kActGated = 1, kActPlain = 2 };

// Weight tiles that only this CTA reads go through the L2 with an evict_first policy when the
// GEMM has at most this many rows (below offsets[G]): the decode calls, whose weight stream
// (0.35-4.4 GB) otherwise pushes the small kernels' code and buffers out of the L2 between one
// op and the next. On an H100 (benchmarks/RESULTS.md, twenty-third session): decode T=1 144 ->
// 141 us, T=16 1457 -> 1445, EP T=64 430 -> 427; from ~1000 rows (decode T=128, prefill T=2048)
// evict_first on every one-reader tile was 1-2 % slower, so those calls load as before.
// $JAX_MOE_WEIGHT_EVICT_FIRST=off (read once per process) turns it off for A/B runs.
constexpr int kEvictFirstMaxRows = 256;
inline int EvictFirstMaxRows() {
  static const int rows = EnvSwitchedOff("JAX_MOE_WEIGHT_EVICT_FIRST") ? -1 : kEvictFirstMaxRows;
  return rows;
}

// The wide tile (see the design note): 128 x 256 for the fused GEMM1 of a gated activation.
template <int BM, int EPI>
constexpr bool WideTile() {
  return BM == 128 && EPI == kActGated;
}

// The trimmed tiles (own32, own16, own8): own64's 64 x 256 tile with only BM = 32, 16 or 8 rows of a
// loaded per stage, for decode batches whose groups have at most a few rows. The wgmma still reads
// 64 rows of a: the rows past the BM loaded ones are whatever lies behind them in shared memory
// (the next stages' a, then b), so those accumulator rows are garbage and never stored. The
// epilogue stores the tile's rows below the group's end straight from the registers, with no
// shared-memory output buffer. Both savings go into pipeline stages: 6 in flight instead of own64's
// 4 (bf16 out), i.e. 192 KB of weights per SM instead of 128 KB -- at decode sizes the weight
// stream of one SM is bound by the bytes it has in flight (a grid with fewer CTAs than SMs streamed
// slower, twenty-fourth session). Same sums in the same order as own64: bit-identical results.
// On an H100 (benchmarks/RESULTS.md, twenty-sixth session): decode T=1 143.0 -> 139.2 us.
template <int BM>
constexpr bool TrimmedTile() {
  return BM < 64;
}

// Rows of b per tile for BM rows of a (see the design note): 256, except own128's 128.
template <int BM, int EPI>
constexpr int TileBRows() {
  static_assert(BM == 128 || BM == 64 || BM == 32 || BM == 16 || BM == 8, "tile rows");
  return BM == 128 && !WideTile<BM, EPI>() ? 128 : 256;
}

// Rows of a per TMA box: the wide tile loads its two 64-row halves separately.
template <int BM, int EPI>
constexpr int ABoxRows() {
  return WideTile<BM, EPI>() ? 64 : BM;
}

template <int BM, int BN, int OUT_BYTES>  // OUT_BYTES: one math warpgroup's output buffer (0: none)
struct Smem {
  static constexpr int kOutBytes = OUT_BYTES;
  static constexpr int kStageBytes = (BM + BN) * BK;
  static constexpr int kStages = std::min(6, (kSmemLimit - 2 * kOutBytes - 8 * 1024) / kStageBytes);
  alignas(1024) uint8_t out[2][kOutBytes > 0 ? kOutBytes : 1];
  // a before b: a trimmed tile's 64-row wgmma reads on past its BM rows into the memory behind
  alignas(1024) uint8_t a[kStages][BM * BK];
  alignas(1024) uint8_t b[kStages][BN * BK];
  float sa[kStages][BM < 64 ? 64 : BM];  // row scales of the K block (0 past the group's end)
  float sb[kStages][2];   // scales of the two 128-row weight blocks the tile's b rows come from
  float amax[2][64];      // own64 gated epilogue: each warpgroup's row maxima over its 64 columns
  uint64_t full[kStages];
  uint64_t empty[kStages];
  uint64_t tile_full[kTileSlots];
  uint64_t tile_empty[kTileSlots];
  int tile[kTileSlots];
  int tile_start[kOwnGemmMaxGroups + 1];  // prefix sum of ceil(rows_g / BM)
  int offsets[kOwnGemmMaxGroups + 1];
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void MbarInit(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(SmemAddr(bar)), "r"(count));
}
__device__ __forceinline__ void MbarExpectTx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SmemAddr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void MbarArrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(SmemAddr(bar)) : "memory");
}
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred P1;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE_%=;\nbra WAIT_%=;\nDONE_%=:\n}\n" ::"r"(SmemAddr(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void TmaLoad(void* dst, const CUtensorMap* map, uint64_t* bar, int x, int y) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
          SmemAddr(dst)),
      "l"(map), "r"(SmemAddr(bar)), "r"(x), "r"(y)
      : "memory");
}
// Pulls the box at (x, y) of `map` into the L2 only (no shared memory, no barrier): a later TmaLoad
// of it reads the L2 instead of the DRAM.
__device__ __forceinline__ void TmaPrefetchL2(const CUtensorMap* map, int x, int y) {
  asm volatile("cp.async.bulk.prefetch.tensor.2d.L2.global [%0, {%1, %2}];" ::"l"(map), "r"(x), "r"(y) : "memory");
}
// The same load with an L2 cache policy (createpolicy): for weight tiles that no other CTA reads,
// evict_first keeps the stream from pushing everything else (the small kernels' code and buffers)
// out of the L2.
__device__ __forceinline__ void TmaLoadHint(void* dst, const CUtensorMap* map, uint64_t* bar, int x, int y,
                                            uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(
          SmemAddr(dst)),
      "l"(map), "r"(SmemAddr(bar)), "r"(x), "r"(y), "l"(policy)
      : "memory");
}
__device__ __forceinline__ uint64_t EvictFirstPolicy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void TmaStore(const CUtensorMap* map, const void* src, int x, int y) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(map),
               "r"(SmemAddr(src)), "r"(x), "r"(y)
               : "memory");
}
// Named barrier of one math warpgroup (ids 1 and 2; 0 is __syncthreads).
__device__ __forceinline__ void WarpgroupBarrier(int wg) {
  if (wg == 1)
    asm volatile("bar.sync 1, 128;" ::: "memory");
  else
    asm volatile("bar.sync 2, 128;" ::: "memory");
}

// Before a math warpgroup writes its output buffer: its thread 0 (which issued the previous
// tile's TMA store) waits until that store has read the buffer, then the warpgroup syncs.
__device__ __forceinline__ void AwaitOutBuffer(int ct, int wg) {
  if (ct == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
  WarpgroupBarrier(wg);
}

// Dynamic tile scheduling: a CTA's first tile is its blockIdx.x, each next one the TMA thread
// claims from a global counter (zeroed before the launch) when it has issued the loads of the
// previous one, and hands it to the scale warp and the math warps through a ring of kTileSlots
// shared-memory slots. So consecutive tiles -- the row tiles that share a weight tile -- start
// within a few hundred ns of each other however far the CTAs have drifted apart, and the second
// reader finds the weights in L2 (a static blockIdx.x + i * gridDim.x walk let CTAs drift apart
// under uneven group sizes and re-read weight tiles from DRAM).
template <class S>
__device__ __forceinline__ void PublishTile(S& s, int& slot, uint32_t& phase, int t) {
  MbarWait(&s.tile_empty[slot], phase ^ 1);
  s.tile[slot] = t;
  MbarArrive(&s.tile_full[slot]);
  if (++slot == kTileSlots) { slot = 0; phase ^= 1; }
}
// Every lane of the calling warp reads the tile; lane 0 releases the slot.
template <class S>
__device__ __forceinline__ int ReceiveTile(S& s, int& slot, uint32_t& phase, int lane) {
  MbarWait(&s.tile_full[slot], phase);
  const int t = s.tile[slot];
  __syncwarp();
  if (lane == 0) MbarArrive(&s.tile_empty[slot]);
  if (++slot == kTileSlots) { slot = 0; phase ^= 1; }
  return t;
}

// Shared-memory matrix descriptor: K-major rows of 128 bytes, 128-byte swizzle, 8-row groups
// 1024 bytes apart. Advancing K by 32 bytes adds 2 to the start-address field.
__device__ __forceinline__ uint64_t SmemDesc(const void* p) {
  const uint64_t addr = SmemAddr(p);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
__device__ __forceinline__ void WgmmaFence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void WgmmaCommit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void WgmmaWait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

// d (+)= A[64 x 32] * B[128 x 32]^T, e4m3 inputs, float32 accumulators (scale_d = 0 overwrites).
__device__ __forceinline__ void Wgmma(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, "
      "%10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "
      "%30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, "
      "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

__device__ __forceinline__ void Put2(uint8_t* p, float x, float y, float) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}
__device__ __forceinline__ void Put2(uint8_t* p, float x, float y, __nv_bfloat16) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}

// Group, first row, the group's row end and first output column of this CTA's linear tile t
// (tiles of BM rows and tn output columns). A group's tiles run column block-major, row tile
// fastest.
template <int BM, class S>
__device__ __forceinline__ void TileCoords(const S& s, int num_groups, int num_units, int tn, int t, int* g,
                                           int* row0, int* end, int* n0) {
  int lo = 0, hi = num_groups;  // the last g with tile_start[g] * num_units <= t
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (s.tile_start[mid] * num_units <= t) lo = mid; else hi = mid - 1;
  }
  const int tiles = s.tile_start[lo + 1] - s.tile_start[lo];
  const int local = t - s.tile_start[lo] * num_units;
  *g = lo;
  *n0 = (local / tiles) * tn;
  *row0 = s.offsets[lo] + (local % tiles) * BM;
  *end = s.offsets[lo + 1];
}

// What the epilogue writes.
//   kStore: d = the GEMM result, bf16 or f32 [M, N].
//   kActGated, kActPlain: an MoE's GEMM1 with SPEC 3 steps 3-4 fused: d = fp8 [M, I], the
//     activation re-quantized per 1x128 block, d_scale = the blocks' scales in the grouped
//     MN-major layout of act_quant. kActGated (Swiglu, Geglu; b's rows per group are
//     [up (I); gate (I)]) loads b in 64-row boxes alternating up and gate rows of the same
//     columns, so a thread's accumulators hold the up and gate values of the same output
//     columns; a tile is one 128-column quantization block: the wide tile's warpgroups each
//     hold all of it for their 64 rows, own64's each 64 of its columns (the row maxima are
//     combined through shared memory). kActPlain (Relu2, Identity; N = I): each warpgroup's
//     128 columns are one quantization block.

// Output columns of a tile.
template <int BM, int EPI>
constexpr int TileOutCols() {
  return EPI == kActGated ? 128 : TileBRows<BM, EPI>();
}

// First row of b (within the group) of the tile's 64-row box i.
template <int EPI>
__device__ __forceinline__ int BBoxRow(int i, int n0, int n_out) {
  if (EPI == kActGated) return (i & 1 ? n_out : 0) + n0 + 64 * (i >> 1);
  return n0 + 64 * i;
}

// Step 3 on a warpgroup's 64 x 128 accumulators into act (the layout of a 128-column
// accumulator: act[4j + q] is column 8j + 2 (lane % 4) + (q & 1), row + 8 (q >> 1)). Gated: the
// first 64 columns of acc are up, the last 64 gate, giving 32 values at act[0..31]. g is rounded
// to bfloat16 first, the rounding point every path shares (reference.G_DTYPE, SPEC 3 step 2).
template <int ACT, int EPI>
__device__ __forceinline__ void ActivateTile(const float (&acc)[64], float* act) {
  if (EPI == kActGated) {
#pragma unroll
    for (int i = 0; i < 32; ++i) act[i] = Activate<ACT>(RoundToBf16(acc[i]), RoundToBf16(acc[32 + i]));  // up, gate
  } else {
#pragma unroll
    for (int i = 0; i < 64; ++i) act[i] = Activate<ACT>(RoundToBf16(acc[i]), 0.0f);
  }
}

// Per-row maxima of |act[0..cols/2)| for the thread's two rows, over the 4 lanes of the row.
template <int N>
__device__ __forceinline__ float2 RowAbsMax(const float* act) {
  float amax0 = 0.0f, amax1 = 0.0f;
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    amax0 = fmaxf(amax0, fmaxf(fabsf(act[4 * j + 0]), fabsf(act[4 * j + 1])));
    amax1 = fmaxf(amax1, fmaxf(fabsf(act[4 * j + 2]), fabsf(act[4 * j + 3])));
  }
#pragma unroll
  for (int o = 1; o <= 2; o *= 2) {
    amax0 = fmaxf(amax0, __shfl_xor_sync(0xffffffffu, amax0, o));
    amax1 = fmaxf(amax1, __shfl_xor_sync(0xffffffffu, amax1, o));
  }
  return make_float2(amax0, amax1);
}

// fp8 codes of act[0..N) / scale into a 64 x 128-byte swizzled tile at byte column c0.
template <int N>
__device__ __forceinline__ void PutFp8(uint8_t* out, int rl0, int lane, int c0, const float* act, float s0, float s1) {
  const float inv0 = 1.0f / s0, inv1 = 1.0f / s1;  // a / s as act_quant's StoreFp8 computes it
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    const int cb = c0 + 8 * j + (lane % 4) * 2;  // byte column in the 128-byte row
    uint8_t* q = out + rl0 * 128 + (((cb >> 4) ^ (rl0 & 7)) << 4) + (cb & 15);
    *reinterpret_cast<__nv_fp8x2_storage_t*>(q) =
        __nv_cvt_float2_to_fp8x2(make_float2(DivideByScale(act[4 * j + 0], s0, inv0), DivideByScale(act[4 * j + 1], s0, inv0)), __NV_SATFINITE, __NV_E4M3);
    *reinterpret_cast<__nv_fp8x2_storage_t*>(q + 8 * 128) =
        __nv_cvt_float2_to_fp8x2(make_float2(DivideByScale(act[4 * j + 2], s1, inv1), DivideByScale(act[4 * j + 3], s1, inv1)), __NV_SATFINITE, __NV_E4M3);
  }
}

// The scales of rows row and row + 8 (those below the group's end) of 1x128 block `col / 128`
// in the grouped MN-major layout: scale(row r of group g, block c) = d_scale[g0 * I/128 +
// c * rows_g + r - g0], g0 = the group's first row.
__device__ __forceinline__ void PutRowScales(float* d_scale, int g0, int end, int n_out, int col, int row, float s0,
                                             float s1) {
  float* ds = d_scale + int64_t(g0) * (n_out / 128) + int64_t(col / 128) * (end - g0) - g0;
  if (row < end) ds[row] = s0;
  if (row + 8 < end) ds[row + 8] = s1;
}

// A 64-row output block whose group ends inside it: 16-byte copies of the rows below `end` from
// its swizzled shared-memory boxes (8192 bytes per 128-byte column box) to d [., n_out] at
// (row0, col0), by `threads` threads from `first`. CHUNKS: 16-byte chunks per row.
template <int CHUNKS, class OutT>
__device__ __forceinline__ void CopyRowsBelow(const uint8_t* out, OutT* d, int row0, int end, int col0, int n_out,
                                              int first, int threads) {
  constexpr int kPerChunk = 16 / int(sizeof(OutT));
  for (int q = first; q < 64 * CHUNKS; q += threads) {
    const int row = q / CHUNKS, cc = q % CHUNKS, col = col0 + cc * kPerChunk;
    const uint8_t* src = out + (cc / 8) * 8192 + row * 128 + (((cc % 8) ^ (row & 7)) << 4);
    if (row0 + row < end && col < n_out)
      *reinterpret_cast<int4*>(d + int64_t(row0 + row) * n_out + col) = *reinterpret_cast<const int4*>(src);
  }
}

// Named barrier of both math warpgroups (id 3).
__device__ __forceinline__ void MathBarrier() { asm volatile("bar.sync 3, 256;" ::: "memory"); }

// One math warpgroup's output buffer: its 64 x 128 output block (none for a trimmed tile).
template <int BM, class OutT>
constexpr int OutBufferBytes() {
  return TrimmedTile<BM>() ? 0 : 64 * 128 * int(sizeof(OutT));
}

// Start of every own-kernel CTA: the group offsets (clamped to [0, m], made non-decreasing) in
// s.offsets, the prefix of row tiles (BM rows each) in s.tile_start, the pipeline's barriers
// initialized; ends with __syncthreads.
template <int BM, int STAGES, class S>
__device__ __forceinline__ void InitTileSchedule(S& s, const int32_t* __restrict__ offsets, int num_groups, int m) {
  const int tid = threadIdx.x;
  // In parallel: a serial walk by one thread costs ~0.1 us of load latency per group (25 us at 256).
  for (int i = tid; i <= num_groups; i += kThreads) s.offsets[i] = min(max(offsets[i], 0), m);
  if (tid == 0) {
    for (int i = 0; i < STAGES; ++i) {
      MbarInit(&s.full[i], 33);  // the TMA thread and the 32 scale lanes
      MbarInit(&s.empty[i], 2);  // both math warpgroups
    }
    for (int i = 0; i < kTileSlots; ++i) {
      MbarInit(&s.tile_full[i], 1);
      MbarInit(&s.tile_empty[i], kTileReaders);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (tid < 32) {  // warp 0: each lane a contiguous chunk of entries; prefix max, then prefix sum
    const int per = (num_groups + 1 + 31) / 32, lo = tid * per, hi = min(lo + per, num_groups + 1);
    int chunk_max = 0;
    for (int i = lo; i < hi; ++i) chunk_max = max(chunk_max, s.offsets[i]);
    int run_max = chunk_max;  // inclusive scan of the chunk maxima
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, run_max, d);
      if (tid >= d) run_max = max(run_max, v);
    }
    const int below = __shfl_up_sync(0xffffffffu, run_max, 1);  // every lane shuffles
    const int chunk_prev = tid == 0 ? 0 : below;                  // the max before this chunk
    int prev = chunk_prev;
    int chunk_tiles = 0;
    for (int i = lo; i < hi; ++i) {
      const int o = max(s.offsets[i], prev);
      if (i > 0) chunk_tiles += (o - prev + BM - 1) / BM;
      prev = o;
    }
    int run_tiles = chunk_tiles;  // inclusive scan of the chunk tile counts
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, run_tiles, d);
      if (tid >= d) run_tiles += v;
    }
    int acc = run_tiles - chunk_tiles;
    prev = chunk_prev;
    __syncwarp();
    for (int i = lo; i < hi; ++i) {
      const int o = max(s.offsets[i], prev);
      if (i > 0) acc += (o - prev + BM - 1) / BM;
      s.offsets[i] = o;
      s.tile_start[i] = acc;
      prev = o;
    }
  }
  __syncthreads();
}

template <int BM, class OutT, int EPI>
__global__ void __launch_bounds__(kThreads, 1)
    OwnGroupedGemmKernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                         const __grid_constant__ CUtensorMap map_d, const float* __restrict__ a_scale,
                         const float* __restrict__ b_scale, const int32_t* __restrict__ offsets, int num_groups,
                         int m, int n, int k, OutT* __restrict__ d, float* __restrict__ d_scale, int activation,
                         int* __restrict__ tile_counter, int evict_first_max_rows) {
  constexpr bool kAct = EPI != kStore;
  static_assert(!kAct || sizeof(OutT) == 1, "the fused epilogue writes fp8");
  constexpr bool kGated = EPI == kActGated;
  constexpr bool kSplitRows = BM == 128;   // warpgroups on different rows (own128) or columns (own64)
  // the wide tile: each warpgroup's 64 rows x all 256 b rows, as two 128-row halves
  constexpr bool kWide = WideTile<BM, EPI>();
  constexpr bool kTrim = TrimmedTile<BM>();
  static_assert(!kTrim || !kAct, "the trimmed tiles store the GEMM result only");
  constexpr int OB = int(sizeof(OutT));
  constexpr int BN = TileBRows<BM, EPI>(), TN = TileOutCols<BM, EPI>();
  using S = Smem<BM, BN, OutBufferBytes<BM, OutT>()>;
  constexpr int STAGES = S::kStages;
  extern __shared__ uint8_t smem_raw[];
  S& s = *reinterpret_cast<S*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int tid = threadIdx.x;
  const int n_out = kGated ? n / 2 : n;  // columns of d
  const int num_units = (n_out + TN - 1) / TN, kb_count = k / BK, nb_count = n / 128;

  InitTileSchedule<BM, STAGES>(s, offsets, num_groups, m);
  const int total = s.tile_start[num_groups] * num_units;
  const int wg = tid / 128;

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (tid == 0) {  // TMA loads of A and B; claims the tiles
      // 64-row boxes of b: the same swizzled layout as one box
      const uint64_t evict_first = EvictFirstPolicy();
      auto load_b = [&](int st, int g, int n0, int kb, bool one_reader) {
#pragma unroll
        for (int i = 0; i < BN / 64; ++i) {
          uint8_t* dst = s.b[st] + i * 64 * BK;
          const int row = g * n + BBoxRow<EPI>(i, n0, n_out);
          if (one_reader)
            TmaLoadHint(dst, &map_b, &s.full[st], kb * BK, row, evict_first);
          else
            TmaLoad(dst, &map_b, &s.full[st], kb * BK, row);
        }
      };
      // a weight tile whose group fits one row tile has this CTA as its only reader
      const bool few_rows = s.offsets[num_groups] <= evict_first_max_rows;
      auto one_reader = [&](int g, int end) { return few_rows && end - s.offsets[g] <= BM; };
      // kWide: a in boxes of half the tile's rows, the second only if the group reaches it (a
      // half past the group's end runs no MMAs, so a tile of one reader per weight tile moves no
      // more of a through the L2 than the group has rows)
      constexpr int kABox = ABoxRows<BM, EPI>();
      auto a_rows = [&](int row0, int end) { return kWide && row0 + kABox >= end ? kABox : BM; };
      // The first tile's weight loads for the first stages go out before the grid-dependency
      // wait (see LaunchOwnGroupedGemm: b is complete when the kernel before this one starts),
      // so under PDL they overlap that kernel; a, its output, is loaded after the wait.
      int early = 0;  // stages of the first tile whose b loads are issued
      if (int(blockIdx.x) < total) {
        int g, row0, end, n0;
        TileCoords<BM>(s, num_groups, num_units, TN, blockIdx.x, &g, &row0, &end, &n0);
        early = min(STAGES, kb_count);
        const bool lone = one_reader(g, end);
        for (int kb = 0; kb < early; ++kb) {  // fresh stages: no empty wait
          MbarExpectTx(&s.full[kb], (a_rows(row0, end) + BN) * BK);
          load_b(kb, g, n0, kb, lone);
        }
      }
      GridDependencyWait();
      int stage = 0, slot = 0;
      uint32_t phase = 0, slot_phase = 0;
      for (int t = blockIdx.x;; t = gridDim.x + atomicAdd(tile_counter, 1)) {
        PublishTile(s, slot, slot_phase, t);
        if (t >= total) {
          // no tile left to load: the kernel after this one (the finalize) may launch on the SMs
          // this grid leaves; it reads nothing of ours before its grid-dependency wait
          GridDependencyTrigger();
          break;
        }
        int g, row0, end, n0;
        TileCoords<BM>(s, num_groups, num_units, TN, t, &g, &row0, &end, &n0);
        const int rows_a = a_rows(row0, end);
        const bool lone = one_reader(g, end);
        for (int kb = 0; kb < kb_count; ++kb) {
          const bool b_issued = kb < early;
          if (!b_issued) {
            MbarWait(&s.empty[stage], phase ^ 1);
            MbarExpectTx(&s.full[stage], (rows_a + BN) * BK);
          }
          for (int r = 0; r < rows_a; r += kABox)
            TmaLoad(s.a[stage] + r * BK, &map_a, &s.full[stage], kb * BK, row0 + r);
          if (!b_issued) load_b(stage, g, n0, kb, lone);
          if (++stage == STAGES) { stage = 0; phase ^= 1; }
        }
        early = 0;
      }
    } else if (tid >= 32 && tid < 64) {  // warp 1: the scales of every K block
      GridDependencyWait();  // a's scales come from the kernel before
      const int lane = tid - 32;
      int stage = 0, slot = 0;
      uint32_t phase = 0, slot_phase = 0;
      for (;;) {
        const int t = ReceiveTile(s, slot, slot_phase, lane);
        if (t >= total) break;
        int g, row0, end, n0;
        TileCoords<BM>(s, num_groups, num_units, TN, t, &g, &row0, &end, &n0);
        const int g0 = s.offsets[g], rows_g = end - g0;
        const float* sa = a_scale + int64_t(g0) * kb_count + (row0 - g0);
        const float* sb = b_scale + int64_t(g) * nb_count * kb_count;
        // gated: the blocks of the up and the gate rows; else of b rows [0, 128) and [128, 256)
        const int nb0 = kGated ? BBoxRow<EPI>(0, n0, n_out) / 128 : min(n0 / 128, nb_count - 1);
        const int nb1 = kGated ? BBoxRow<EPI>(1, n0, n_out) / 128 : min(n0 / 128 + 1, nb_count - 1);
        constexpr int kRegs = (BM + 31) / 32;  // row scales per lane
        for (int kb = 0; kb < kb_count; ++kb) {
          float v[kRegs];
#pragma unroll
          for (int i = 0; i < kRegs; ++i) {
            const int r = lane + 32 * i;
            v[i] = r < BM && row0 + r < end ? __ldg(sa + int64_t(kb) * rows_g + r) : 0.0f;
          }
          const float vb = lane < 2 ? __ldg(sb + int64_t(lane == 0 ? nb0 : nb1) * kb_count + kb) : 0.0f;
          MbarWait(&s.empty[stage], phase ^ 1);
#pragma unroll
          for (int i = 0; i < kRegs; ++i)
            if (lane + 32 * i < BM) s.sa[stage][lane + 32 * i] = v[i];
          if (lane < 2) s.sb[stage][lane] = vb;
          MbarArrive(&s.full[stage]);
          if (++stage == STAGES) { stage = 0; phase ^= 1; }
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    // math warpgroup w = wg - 1: own128 rows [64w, 64w + 64) x b rows [0, 128) of the tile
    // (wide: [0, 256), as two halves); own64 rows [0, 64) x b rows [128w, 128w + 128)
    const int w = wg - 1;
    const int ct = tid - 128 * wg;
    const int warp = ct / 32, lane = ct % 32;
    const int rl0 = warp * 16 + lane / 4;  // first of this thread's two rows in its 64-row block
    const int row_in = kSplitRows ? 64 * w : 0, brow_in = kSplitRows ? 0 : 128 * w;
    const int r_in = row_in + rl0;
    // which of the stage's two weight-block scales multiplies accumulator columns below / from
    // `split`: gated up / gate; else the one of this warpgroup's 128 b rows
    const int sb_lo = kGated || kSplitRows ? 0 : w, sb_hi = kGated ? 1 : sb_lo;
    constexpr int split = kGated ? 64 : 128;
    uint8_t* out = s.out[w];
    int stage = 0, slot = 0;
    uint32_t phase = 0, slot_phase = 0;
    float acc[64], part[64];
    float acc_hi[kWide ? 64 : 1];  // kWide: the accumulators of the second 128 b rows
    auto next = [&] { if (++stage == STAGES) { stage = 0; phase ^= 1; } };
    // acc (+)= part * (row scale * weight scale): float32 promotion of one K block's partial sum
    auto promote = [&](float (&to)[64], float f0a, float f1a, float b0, float b1) {
#pragma unroll
      for (int j = 0; j < 16; ++j) {  // 8-column groups never straddle a scale block
        const float sb = (8 * j < split) ? b0 : b1;
        const float f0 = f0a * sb, f1 = f1a * sb;
        to[4 * j + 0] += part[4 * j + 0] * f0;
        to[4 * j + 1] += part[4 * j + 1] * f0;
        to[4 * j + 2] += part[4 * j + 2] * f1;
        to[4 * j + 3] += part[4 * j + 3] * f1;
      }
    };
    for (;;) {
      const int t = ReceiveTile(s, slot, slot_phase, lane);
      if (t >= total) break;
      int g, row0, end, n0;
      TileCoords<BM>(s, num_groups, num_units, TN, t, &g, &row0, &end, &n0);
      const int row0h = row0 + row_in;
      const int col0 = n0 + (kGated ? 0 : brow_in);  // this warpgroup's first output column
      if (kWide && row0h >= end) {
        // no row of this half is in the group (its a rows were not even loaded): release the
        // stages without MMAs; nothing to store. A weight tile has one such tile reading it
        // (up to 128 rows per group), so its cost cannot pull CTAs that share one apart.
        for (int kb = 0; kb < kb_count; ++kb) {
          if (ct == 0) {
            MbarWait(&s.full[stage], phase);
            MbarArrive(&s.empty[stage]);
          }
          next();
        }
        continue;
      }
      float act[kAct ? 64 : 1];
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
      if constexpr (kWide) {
#pragma unroll
        for (int i = 0; i < 64; ++i) acc_hi[i] = 0.0f;
      }
      for (int kb = 0; kb < kb_count; ++kb) {
        MbarWait(&s.full[stage], phase);
        const int st = stage;
        const float b0 = s.sb[st][sb_lo], b1 = s.sb[st][sb_hi];
        const float f0a = s.sa[st][r_in], f1a = s.sa[st][r_in + 8];
        const uint64_t da = SmemDesc(s.a[st] + row_in * BK);
        const uint64_t db = SmemDesc(s.b[st] + brow_in * BK);
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < BK / 32; ++kk) Wgmma(part, da + 2 * kk, db + 2 * kk, kk > 0);
        WgmmaCommit();
        if constexpr (kWide) {  // b rows [0, 128), then [128, 256) into the same partial
          WgmmaWait0();
          promote(acc, f0a, f1a, b0, b1);
          const uint64_t db_hi = SmemDesc(s.b[st] + 128 * BK);
          WgmmaFence();
#pragma unroll
          for (int kk = 0; kk < BK / 32; ++kk) Wgmma(part, da + 2 * kk, db_hi + 2 * kk, kk > 0);
          WgmmaCommit();
        }
        next();
        WgmmaWait0();
        if (ct == 0) MbarArrive(&s.empty[st]);
        if constexpr (kWide) promote(acc_hi, f0a, f1a, b0, b1);
        else promote(acc, f0a, f1a, b0, b1);
      }
      if constexpr (kGated) {
        // 32 activations of each 128 b rows (64 up + 64 gate): own64's warpgroup has one such
        // half, own128's two (the tile's 128 columns)
        if (activation == kGeglu) ActivateTile<kGeglu, EPI>(acc, act);
        else ActivateTile<kSwiglu, EPI>(acc, act);
        if constexpr (kWide) {
          if (activation == kGeglu) ActivateTile<kGeglu, EPI>(acc_hi, act + 32);
          else ActivateTile<kSwiglu, EPI>(acc_hi, act + 32);
        }
      } else if constexpr (EPI == kActPlain) {
        if (activation == kRelu2) ActivateTile<kRelu2, EPI>(acc, act);
        else ActivateTile<kIdentity, EPI>(acc, act);
      }
      const int g0 = s.offsets[g];
      if constexpr (kGated && !kSplitRows) {
        // own64 gated: this warpgroup holds columns [64w, 64w + 64) of the tile's quantization
        // block; the row maxima meet in shared memory, both halves go to one 64 x 128-byte
        // buffer that warpgroup 1's thread 0 stores
        const bool store_thread = w == 1 && ct == 0;
        float2 amax = RowAbsMax<32>(act);
        if (lane % 4 == 0) {
          s.amax[w][rl0] = amax.x;
          s.amax[w][rl0 + 8] = amax.y;
        }
        if (store_thread) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
        MathBarrier();
        amax = make_float2(fmaxf(s.amax[0][rl0], s.amax[1][rl0]), fmaxf(s.amax[0][rl0 + 8], s.amax[1][rl0 + 8]));
        const float s0 = fmaxf(amax.x / 448.0f, FLT_MIN), s1 = fmaxf(amax.y / 448.0f, FLT_MIN);
        if (w == 0 && lane % 4 == 0) PutRowScales(d_scale, g0, end, n_out, n0, row0 + rl0, s0, s1);
        PutFp8<32>(s.out[0], rl0, lane, 64 * w, act, s0, s1);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        MathBarrier();
        if (row0 + 64 <= end) {
          if (store_thread) {
            TmaStore(&map_d, s.out[0], n0, row0);
            asm volatile("cp.async.bulk.commit_group;" ::: "memory");
          }
        } else {  // the group ends inside the tile
          CopyRowsBelow<8>(s.out[0], d, row0, end, n0, n_out, tid - 128, 256);
        }
        continue;
      }
      if constexpr (kAct) {
        // step 4: per row, amax over the 128 columns (32 in this thread, the rest in the 3 other
        // lanes of the row), s = max(amax / 448, FLT_MIN), q = fp8(a / s)
        const float2 amax = RowAbsMax<64>(act);
        const float s0 = fmaxf(amax.x / 448.0f, FLT_MIN), s1 = fmaxf(amax.y / 448.0f, FLT_MIN);
        if (lane % 4 == 0 && col0 < n_out) PutRowScales(d_scale, g0, end, n_out, col0, row0h + rl0, s0, s1);
        AwaitOutBuffer(ct, wg);
        PutFp8<64>(out, rl0, lane, 0, act, s0, s1);
      } else if constexpr (kTrim) {
        // the tile's rows below the group's end, straight from the registers (rows rl0 and
        // rl0 + 8, columns 8j + 2 (lane % 4) + {0, 1} of the warpgroup's 128)
        const int rows = min(BM, end - row0);
        if (col0 < n_out) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = rl0 + 8 * h;
            if (r < rows) {
              OutT* dr = d + int64_t(row0 + r) * n_out + col0 + 2 * (lane % 4);
#pragma unroll
              for (int j = 0; j < 16; ++j)
                Put2(reinterpret_cast<uint8_t*>(dr + 8 * j), acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], OutT());
            }
          }
        }
        continue;
      } else {
        // epilogue: registers -> swizzled shared memory -> global
        AwaitOutBuffer(ct, wg);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const int cb = (8 * j + (lane % 4) * 2) * OB;  // byte column in the block
          const int box = cb / 128, chunk = (cb % 128) / 16, wb = cb % 16;
          uint8_t* p = out + box * 8192 + rl0 * 128 + ((chunk ^ (rl0 & 7)) << 4) + wb;
          Put2(p, acc[4 * j + 0], acc[4 * j + 1], OutT());
          Put2(p + 8 * 128, acc[4 * j + 2], acc[4 * j + 3], OutT());  // row rl0 + 8: same swizzle
        }
      }
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      WarpgroupBarrier(wg);
      if (col0 >= n_out) continue;  // own64: the second 128 columns of the last, partial column block
      if (row0h + 64 <= end) {
        if (ct == 0) {
#pragma unroll
          for (int box = 0; box < OB; ++box) TmaStore(&map_d, out + box * 8192, col0 + box * 128 / OB, row0h);
          asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        }
      } else {  // the group ends inside this block
        CopyRowsBelow<128 * OB / 16>(out, d, row0h, end, col0, n_out, ct, 128);
      }
    }
    if (ct == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  }
}

// ---------------------------------------------------------------------------------------------
// The decode chain ("jax_moe_permute_gemm_chain"): an MoE's GEMM1 with the gated activation and
// FP8 re-quantization in its epilogue (SPEC 3 steps 2-4, the arithmetic of act_quant) and its
// GEMM2, in one persistent launch of the trimmed (BM = 8, 16, 32) or 64-row tiles, 64 x 256:
//   tiles [0, total1): GEMM1, a tile = one 128-column quantization block of one row tile (b's
//     up and gate rows of those columns, 64-row boxes alternating as in the fused GEMM1);
//   tiles [total1, total): GEMM2, a tile = 256 output columns of one row tile, bfloat16 out.
// The tile counter hands out every GEMM1 tile before any GEMM2 tile. A GEMM1 tile's epilogue
// writes its fp8 block and scales straight from the registers and then adds 1 to its group's
// counter (workspace[kChainCountersAt + g], release); a GEMM2 tile issues its first stages'
// weight loads, then waits until its group's counter reaches the group's GEMM1 tiles (acquire)
// before it loads the activations. So GEMM2's weights stream while the last GEMM1 tiles finish,
// with no act_quant kernel, launch or ramp between the GEMMs. Same sums in the same order as
// GEMM1 (bf16 out) -> act_quant -> GEMM2: bit-identical results.
// (A per-K-block wait -- GEMM2's K block kb waiting only for the one GEMM1 tile that wrote it,
// each GEMM1 tile with its own flag -- was measured slower on an H100 at T=1, 143.9 against
// 136.7 us: GEMM2 tiles started earlier, then stalled on their last blocks while holding SMs;
// RESULTS.md, thirty-second session. It was removed.)
// No deadlock whichever CTAs are resident: CTA b < num_static starts with GEMM1 tile b (its
// weight loads go out before the grid-dependency wait) and claims it (claim[b]) after the wait;
// the other tiles come from the counter in order, so every GEMM1 tile from it is handed out
// before any GEMM2 tile; and before a CTA takes a GEMM2 tile it claims any static tile still
// unclaimed (its CTA not resident: an SM limit such as MPS's, or a kernel beside this one) and
// computes it. So every GEMM1 tile a GEMM2 tile waits for is held by a CTA that runs. A CTA
// that finds its static tile claimed passes the stages it had loaded for it through unused (a
// "ghost" tile). JAX_MOE_CHAIN_CTAS (a test's knob, read at each launch) sets the grid: more CTAs
// than fit exercises the stealing.
// workspace: [0] tile counter, [1] static tiles claimed, [4, 4 + G) group counters,
// [4 + G, 4 + G + kChainMaxCtas) claim flags
constexpr int kChainCountersAt = kOwnGemmWorkspaceInts;
constexpr int kChainMaxCtas = 1024;
constexpr int kChainGhostTile = 1 << 29;  // tile ids from here: a ghost of static tile id - this
constexpr uint64_t kChainStealAfterNs = 20000;
// $JAX_MOE_CHAIN_TRACE=1 (read at each launch, a diagnostic): each CTA records its first
// kChainTraceTiles tiles (when the math warpgroups got the tile, when its first stage's data
// arrived, when its epilogue was done; %globaltimer ns) in shared memory behind the pipeline and
// prints them at its end, one line per tile (tools/chain_trace.py reads them).
constexpr int kChainTraceTiles = 16;
constexpr size_t kChainTraceBytes = (3 * kChainTraceTiles + 1) * sizeof(uint64_t) + kChainTraceTiles * sizeof(int);

__device__ __forceinline__ int LoadAcquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void AddRelease(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// Orders this thread's generic-proxy global accesses with its async-proxy (TMA) ones.
__device__ __forceinline__ void FenceProxyAsyncGlobal() { asm volatile("fence.proxy.async.global;" ::: "memory"); }
__device__ __forceinline__ int LoadVolatile(const int* p) { return *reinterpret_cast<const volatile int*>(p); }
__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned SmId() {
  unsigned id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}
__device__ __forceinline__ void AwaitCount(const int* counter, int target) {
  while (LoadAcquire(counter) < target) __nanosleep(32);
}

struct ChainTile {
  bool gemm2;
  int g, row0, end, n0;  // group, first row, the group's row end, first column (GEMM1: of the I outputs)
};

template <int BM>
__global__ void __launch_bounds__(kThreads, 1)
    OwnDecodeChainKernel(const __grid_constant__ CUtensorMap map_a1, const __grid_constant__ CUtensorMap map_b1,
                         const __grid_constant__ CUtensorMap map_a2, const __grid_constant__ CUtensorMap map_b2,
                         const float* __restrict__ a1_scale, const float* __restrict__ b1_scale,
                         const float* __restrict__ b2_scale, const int32_t* __restrict__ offsets, int num_groups,
                         int m, int hidden, int inter, uint8_t* __restrict__ act, float* __restrict__ act_scale,
                         __nv_bfloat16* __restrict__ d, int activation, int* __restrict__ workspace,
                         int evict_first_max_rows, int l2_prefetch, int trace) {
  static_assert(BM <= 64, "64 x 256 tiles, trimmed or not");
  constexpr int BN = 256;
  using S = Smem<BM, BN, 0>;
  constexpr int STAGES = S::kStages;
  constexpr uint32_t kStageTx = (BM + BN) * BK;
  extern __shared__ uint8_t smem_raw[];
  S& s = *reinterpret_cast<S*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int tid = threadIdx.x;
  const int units1 = inter / 128, units2 = (hidden + BN - 1) / BN;  // column tiles per row tile
  const int kb1 = hidden / BK, kb2 = inter / BK;                     // K blocks
  const int nb1 = 2 * inter / 128, nb2 = hidden / 128;               // weight-scale blocks along N
  int* tile_counter = workspace;
  int* static_claimed = workspace + 1;  // static tiles claimed so far
  int* done = workspace + kChainCountersAt;  // [num_groups]: GEMM1 tiles of group g done
  int* claim = done + num_groups;  // [gridDim.x]: static tile b claimed (by CTA b or another)
  InitTileSchedule<BM, STAGES>(s, offsets, num_groups, m);
  const int total1 = s.tile_start[num_groups] * units1;
  const int total = total1 + s.tile_start[num_groups] * units2;
  // CTA b < num_static starts with GEMM1 tile b (its static tile), if no other CTA has claimed it
  const int num_static = min(int(gridDim.x), total1);
  auto coords = [&](int t, ChainTile& c) {
    c.gemm2 = t >= total1;
    TileCoords<BM>(s, num_groups, c.gemm2 ? units2 : units1, c.gemm2 ? BN : 128, c.gemm2 ? t - total1 : t, &c.g,
                   &c.row0, &c.end, &c.n0);
  };
  // GEMM1 tiles of group g, which its GEMM2 tiles wait for
  auto gemm1_tiles = [&](int g) { return units1 * (s.tile_start[g + 1] - s.tile_start[g]); };
  const int wg = tid / 128;

  if (wg == 0) {
    // 56 registers for the load warpgroup (the two GEMMs' coordinates and maps: with the own
    // kernel's 40, ptxas spills 40 bytes there) and 224 for the math warpgroups: the 168 x 384
    // of the launch, redistributed
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
    if (tid == 0) {  // TMA loads of A and B; claims the tiles
      const uint64_t evict_first = EvictFirstPolicy();
      const bool few_rows = s.offsets[num_groups] <= evict_first_max_rows;
      auto load_b = [&](int st, const ChainTile& c, int kb) {
        const bool lone = few_rows && c.end - s.offsets[c.g] <= BM;  // the weight tile's only reader
        const CUtensorMap* map = c.gemm2 ? &map_b2 : &map_b1;
#pragma unroll
        for (int i = 0; i < BN / 64; ++i) {
          const int row = c.gemm2 ? c.g * hidden + c.n0 + 64 * i : c.g * 2 * inter + BBoxRow<kActGated>(i, c.n0, inter);
          if (lone)
            TmaLoadHint(s.b[st] + i * 64 * BK, map, &s.full[st], kb * BK, row, evict_first);
          else
            TmaLoad(s.b[st] + i * 64 * BK, map, &s.full[st], kb * BK, row);
        }
      };
      // stages of the current tile whose b loads are issued, from its first stage on: the static
      // tile's go out before the grid-dependency wait (the weights and offsets are complete when
      // the kernel before this one starts), a GEMM2 tile's before the wait for its group
      int early = 0, a_issued = 0;  // and whose a loads are issued
      ChainTile c;
      if (int(blockIdx.x) < num_static) {
        coords(blockIdx.x, c);
        early = min(STAGES, kb1);
        for (int kb = 0; kb < early; ++kb) {  // fresh stages: no empty wait
          MbarExpectTx(&s.full[kb], kStageTx);
          load_b(kb, c, kb);
        }
      }
      GridDependencyWait();
      int stage = 0, slot = 0;
      uint32_t phase = 0, slot_phase = 0;
      auto next = [&] { if (++stage == STAGES) { stage = 0; phase ^= 1; } };
      // The next tile: from the counter (after the static ones), but before a GEMM2 tile or the
      // end, any static tile no CTA has claimed yet (its CTA not resident: an SM limit, a kernel
      // beside this one), so that every GEMM1 tile a GEMM2 tile waits for is held by a CTA that
      // runs. A resident CTA claims its static tile within a few us of the start: the scan waits
      // kChainStealAfterNs from this CTA's start for that (CTAs without a static tile reach their
      // first GEMM2 tile at once). Claims are never undone: the scan goes over each flag once.
      const uint64_t started = GlobalTimerNs();
      int held = -1, scan = 0;
      bool all_claimed = false;
      auto claim_next = [&]() -> int {
        if (held < 0) held = num_static + atomicAdd(tile_counter, 1);
        if (held >= total1 && !all_claimed) {
          while (!(all_claimed = LoadVolatile(static_claimed) >= num_static) &&
                 GlobalTimerNs() - started < kChainStealAfterNs)
            __nanosleep(256);
          for (; !all_claimed && scan < num_static; ++scan)
            if (LoadVolatile(claim + scan) == 0 && atomicExch(claim + scan, 1) == 0) {
              atomicAdd(static_claimed, 1);
              return scan++;
            }
          all_claimed = true;
        }
        const int t = held;
        held = -1;
        return t;
      };
      int t;
      if (early > 0) {  // the static tile: its activations load now, whoever computes it
        for (int kb = 0; kb < early; ++kb) TmaLoad(s.a[kb], &map_a1, &s.full[kb], kb * BK, c.row0);
        if (atomicExch(claim + blockIdx.x, 1) == 0) {
          atomicAdd(static_claimed, 1);
          t = blockIdx.x;
          a_issued = early;
        } else {  // another CTA took it (this one started late): its stages pass through unused
          PublishTile(s, slot, slot_phase, kChainGhostTile + int(blockIdx.x));
          for (int kb = 0; kb < early; ++kb) next();
          early = 0;
          t = claim_next();
        }
      } else {
        t = claim_next();
      }
      for (;; t = claim_next()) {
        PublishTile(s, slot, slot_phase, t);
        if (t >= total) {
          // no tile left to load: the kernel after this one (the finalize) may launch on the SMs
          // this grid leaves; it reads nothing of ours before its grid-dependency wait
          GridDependencyTrigger();
          break;
        }
        coords(t, c);
        const int kbs = c.gemm2 ? kb2 : kb1;
        if (c.gemm2) {
          if (early == 0) {
            const int first = stage;
            const uint32_t first_phase = phase;
            early = min(STAGES, kbs);
            for (int kb = 0; kb < early; ++kb) {
              MbarWait(&s.empty[stage], phase ^ 1);
              MbarExpectTx(&s.full[stage], kStageTx);
              load_b(stage, c, kb);
              next();
            }
            stage = first;
            phase = first_phase;
          }
          // l2_prefetch: while its group's GEMM1 tiles are still running, the tile's remaining
          // weight blocks go to the L2, so the DRAM streams them during the wait
          if (l2_prefetch && LoadAcquire(done + c.g) < gemm1_tiles(c.g))
            for (int kb = early; kb < kbs; ++kb)
#pragma unroll
              for (int i = 0; i < BN / 64; ++i) TmaPrefetchL2(&map_b2, kb * BK, c.g * hidden + c.n0 + 64 * i);
          AwaitCount(done + c.g, gemm1_tiles(c.g));
          FenceProxyAsyncGlobal();  // the activations were written through the generic proxy
        }
        const CUtensorMap* map_a = c.gemm2 ? &map_a2 : &map_a1;
        for (int kb = 0; kb < kbs; ++kb) {
          const bool b_issued = kb < early;
          if (!b_issued) {
            MbarWait(&s.empty[stage], phase ^ 1);
            MbarExpectTx(&s.full[stage], kStageTx);
          }
          if (kb >= a_issued) TmaLoad(s.a[stage], map_a, &s.full[stage], kb * BK, c.row0);
          if (!b_issued) load_b(stage, c, kb);
          next();
        }
        early = a_issued = 0;
      }
    } else if (tid >= 32 && tid < 64) {  // warp 1: the scales of every K block
      GridDependencyWait();  // a1's scales come from the kernel before
      const int lane = tid - 32;
      int stage = 0, slot = 0;
      uint32_t phase = 0, slot_phase = 0;
      // k blocks [kb_begin, kb_end) of tile c: the row scales and the two weight-block scales
      auto stage_scales = [&](const ChainTile& c, int kb_begin, int kb_end) {
        const int kbs = c.gemm2 ? kb2 : kb1;
        const int g0 = s.offsets[c.g], rows_g = c.end - g0;
        const float* sa = (c.gemm2 ? act_scale : a1_scale) + int64_t(g0) * kbs + (c.row0 - g0);
        const float* sb = c.gemm2 ? b2_scale + int64_t(c.g) * nb2 * kb2 : b1_scale + int64_t(c.g) * nb1 * kb1;
        // GEMM1: the blocks of the up and the gate rows; GEMM2: of b rows [0, 128) and [128, 256)
        const int sb0 = c.gemm2 ? min(c.n0 / 128, nb2 - 1) : c.n0 / 128;
        const int sb1 = c.gemm2 ? min(c.n0 / 128 + 1, nb2 - 1) : (inter + c.n0) / 128;
        constexpr int kRegs = (BM + 31) / 32;  // row scales per lane
        for (int kb = kb_begin; kb < kb_end; ++kb) {
          float v[kRegs];
#pragma unroll
          for (int i = 0; i < kRegs; ++i) {
            const int r = lane + 32 * i;
            const float* p = sa + int64_t(kb) * rows_g + r;
            // the activations' scales through the L2 only (other SMs wrote them in this kernel)
            v[i] = r < BM && c.row0 + r < c.end ? (c.gemm2 ? __ldcg(p) : __ldg(p)) : 0.0f;
          }
          const float vb = lane < 2 ? __ldg(sb + int64_t(lane == 0 ? sb0 : sb1) * kbs + kb) : 0.0f;
          MbarWait(&s.empty[stage], phase ^ 1);
#pragma unroll
          for (int i = 0; i < kRegs; ++i)
            if (lane + 32 * i < BM) s.sa[stage][lane + 32 * i] = v[i];
          if (lane < 2) s.sb[stage][lane] = vb;
          MbarArrive(&s.full[stage]);
          if (++stage == STAGES) { stage = 0; phase ^= 1; }
        }
      };
      // The static tile's first stages are staged before it is published, so its claim's round
      // trip overlaps these loads; its ghost (claimed elsewhere) passes exactly those stages.
      int staged = 0;
      if (int(blockIdx.x) < num_static) {
        ChainTile c;
        coords(blockIdx.x, c);
        staged = min(STAGES, kb1);
        stage_scales(c, 0, staged);
      }
      for (;;) {
        const int t = ReceiveTile(s, slot, slot_phase, lane);
        if (t >= kChainGhostTile) {
          staged = 0;
          continue;
        }
        if (t >= total) break;
        ChainTile c;
        coords(t, c);
        if (c.gemm2) AwaitCount(done + c.g, gemm1_tiles(c.g));  // act_scale: written by GEMM1's tiles
        stage_scales(c, staged, c.gemm2 ? kb2 : kb1);
        staged = 0;
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");
    GridDependencyWait();  // the group counters are zeroed by the kernel before
    // math warpgroup w = wg - 1: the tile's 64 rows (BM of them real) x b rows [128w, 128w + 128):
    // GEMM1 the up and gate rows of output columns [64w, 64w + 64) of the tile's 128, GEMM2
    // output columns [128w, 128w + 128) of its 256
    const int w = wg - 1;
    const int ct = tid - 128 * wg;
    const int warp = ct / 32, lane = ct % 32;
    const int rl0 = warp * 16 + lane / 4;  // first of this thread's two rows
    int stage = 0, slot = 0;
    uint32_t phase = 0, slot_phase = 0;
    float acc[64], part[64];
    // $JAX_MOE_CHAIN_TRACE: [start, then per tile (received, first data, done)] and the tile ids
    const bool tracer = trace != 0 && w == 0 && ct == 0;
    uint64_t* trace_ns = reinterpret_cast<uint64_t*>(reinterpret_cast<uint8_t*>(&s) + sizeof(S));
    int* trace_tile = reinterpret_cast<int*>(trace_ns + 1 + 3 * kChainTraceTiles);
    int traced = 0;
    if (tracer) trace_ns[0] = GlobalTimerNs();
    for (;;) {
      const int t = ReceiveTile(s, slot, slot_phase, lane);
      const bool trace_tile_now = tracer && traced < kChainTraceTiles && t < total;
      if (trace_tile_now) {
        trace_tile[traced] = t;
        trace_ns[1 + 3 * traced] = GlobalTimerNs();
      }
      if (t >= kChainGhostTile) {  // the static tile, computed by another CTA: release its stages
        for (int kb = 0; kb < min(STAGES, kb1); ++kb) {
          MbarWait(&s.full[stage], phase);
          if (ct == 0) MbarArrive(&s.empty[stage]);
          if (++stage == STAGES) { stage = 0; phase ^= 1; }
        }
        continue;
      }
      if (t >= total) break;
      ChainTile c;
      coords(t, c);
      const int kbs = c.gemm2 ? kb2 : kb1;
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
      for (int kb = 0; kb < kbs; ++kb) {
        MbarWait(&s.full[stage], phase);
        if (trace_tile_now && kb == 0) trace_ns[2 + 3 * traced] = GlobalTimerNs();
        const int st = stage;
        // GEMM1: columns [0, 64) of the accumulators are up (scale block 0), [64, 128) gate (1)
        const float b0 = s.sb[st][c.gemm2 ? w : 0], b1 = s.sb[st][c.gemm2 ? w : 1];
        const float f0a = s.sa[st][rl0], f1a = s.sa[st][rl0 + 8];
        const uint64_t da = SmemDesc(s.a[st]);
        const uint64_t db = SmemDesc(s.b[st] + 128 * w * BK);
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < BK / 32; ++kk) Wgmma(part, da + 2 * kk, db + 2 * kk, kk > 0);
        WgmmaCommit();
        if (++stage == STAGES) { stage = 0; phase ^= 1; }
        WgmmaWait0();
        if (ct == 0) MbarArrive(&s.empty[st]);
#pragma unroll
        for (int j = 0; j < 16; ++j) {  // acc += part * (row scale * weight scale)
          const float sb = j < 8 ? b0 : b1;
          const float f0 = f0a * sb, f1 = f1a * sb;
          acc[4 * j + 0] += part[4 * j + 0] * f0;
          acc[4 * j + 1] += part[4 * j + 1] * f0;
          acc[4 * j + 2] += part[4 * j + 2] * f1;
          acc[4 * j + 3] += part[4 * j + 3] * f1;
        }
      }
      const int rows = min(BM, c.end - c.row0);  // the tile's rows in its group
      if (c.gemm2) {  // rows rl0, rl0 + 8; columns 8j + 2 (lane % 4) + {0, 1} of the warpgroup's 128
        const int col0 = c.n0 + 128 * w;
        if (col0 < hidden) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = rl0 + 8 * h;
            if (r < rows) {
              __nv_bfloat16* dr = d + int64_t(c.row0 + r) * hidden + col0 + 2 * (lane % 4);
#pragma unroll
              for (int j = 0; j < 16; ++j)
                Put2(reinterpret_cast<uint8_t*>(dr + 8 * j), acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1],
                     __nv_bfloat16());
            }
          }
        }
        if (trace_tile_now) trace_ns[3 + 3 * traced++] = GlobalTimerNs();
        continue;
      }
      // GEMM1's epilogue: 32 activations (64 up x 64 gate columns), the row maxima of the
      // tile's 128-column block over both warpgroups, scales, fp8 codes straight to memory
      float a[32];
      if (activation == kGeglu) ActivateTile<kGeglu, kActGated>(acc, a);
      else ActivateTile<kSwiglu, kActGated>(acc, a);
      float2 amax = RowAbsMax<32>(a);
      if (lane % 4 == 0) {
        s.amax[w][rl0] = amax.x;
        s.amax[w][rl0 + 8] = amax.y;
      }
      MathBarrier();
      amax = make_float2(fmaxf(s.amax[0][rl0], s.amax[1][rl0]), fmaxf(s.amax[0][rl0 + 8], s.amax[1][rl0 + 8]));
      const float sc[2] = {fmaxf(amax.x / 448.0f, FLT_MIN), fmaxf(amax.y / 448.0f, FLT_MIN)};
      const int g0 = s.offsets[c.g];
      // scale(row r of group g, block c) = act_scale[g0 * I/128 + c * rows_g + r - g0]
      float* ds = act_scale + int64_t(g0) * units1 + int64_t(c.n0 / 128) * (c.end - g0) - g0;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = rl0 + 8 * h;
        if (r >= rows) continue;
        if (w == 0 && lane % 4 == 0) ds[c.row0 + r] = sc[h];
        const float inv = 1.0f / sc[h];  // a / s as act_quant's StoreFp8 computes it
        uint8_t* q = act + int64_t(c.row0 + r) * inter + c.n0 + 64 * w + 2 * (lane % 4);
#pragma unroll
        for (int j = 0; j < 8; ++j)
          *reinterpret_cast<__nv_fp8x2_storage_t*>(q + 8 * j) = __nv_cvt_float2_to_fp8x2(
              make_float2(DivideByScale(a[4 * j + 2 * h], sc[h], inv), DivideByScale(a[4 * j + 2 * h + 1], sc[h], inv)),
              __NV_SATFINITE, __NV_E4M3);
      }
      FenceProxyAsyncGlobal();  // GEMM2's TMA loads read these codes
      MathBarrier();            // both warpgroups' stores done (and s.amax free again)
      if (w == 0 && ct == 0) AddRelease(done + c.g, 1);
      if (trace_tile_now) trace_ns[3 + 3 * traced++] = GlobalTimerNs();
    }
    for (int i = 0; tracer && i < traced; ++i)
      printf("chain_trace cta %d sm %u start %llu tile %d gemm2 %d received %llu first %llu done %llu\n",
             int(blockIdx.x), SmId(), (unsigned long long)trace_ns[0], trace_tile[i], int(trace_tile[i] >= total1),
             (unsigned long long)trace_ns[1 + 3 * i], (unsigned long long)trace_ns[2 + 3 * i],
             (unsigned long long)trace_ns[3 + 3 * i]);
  }
}

PFN_cuTensorMapEncodeTiled_v12000 TensorMapEncoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A row-major [rows, cols] matrix read or written in boxes of [box_rows, 128 bytes] through a
// 128-byte swizzle (the layout the wgmma descriptors and the epilogue above assume).
bool EncodeMap(CUtensorMap* map, const void* base, uint64_t rows, uint64_t cols, int elem_bytes, uint32_t box_rows) {
  auto encode = TensorMapEncoder();
  if (encode == nullptr) return false;
  cuuint64_t dims[2] = {cols, rows};
  cuuint64_t strides[1] = {cols * elem_bytes};
  cuuint32_t box[2] = {uint32_t(128 / elem_bytes), box_rows};
  cuuint32_t elem_strides[2] = {1, 1};
  const CUtensorMapDataType type = elem_bytes == 1   ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                   : elem_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                     : CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
  return encode(map, type, 2, const_cast<void*>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The own kernel's row tile attribute: 128 (128 x 128 tiles) or 64 (64 x 256); where the GEMM
// stores its result (`trimmed`), also 32, 16 or 8 (the trimmed 64 x 256 tiles).
ffi::Error CheckBlockM(const char* op, int32_t block_m, bool trimmed = false) {
  const bool ok = block_m == 128 || block_m == 64 || (trimmed && (block_m == 32 || block_m == 16 || block_m == 8));
  if (!ok)
    return InvalidArgument(std::string(op) + ": block_m: expected 128 or 64" + (trimmed ? ", 32, 16 or 8" : "") +
                           ", got " + std::to_string(block_m));
  return ffi::Error::Success();
}

template <int BM, class OutT, int EPI>
cudaError_t Launch(cudaStream_t stream, bool pdl, int g, int m, int n, int k, const void* a, const float* a_scale,
                   const void* b, const float* b_scale, const int32_t* offsets, void* d, float* d_scale,
                   int activation, int* tile_counter, const char** what) {
  const int n_out = EPI == kActGated ? n / 2 : n;
  CUtensorMap map_a, map_b, map_d;
  if (!EncodeMap(&map_a, a, m, k, 1, ABoxRows<BM, EPI>()) || !EncodeMap(&map_b, b, uint64_t(g) * n, k, 1, 64) ||
      !EncodeMap(&map_d, d, m, n_out, int(sizeof(OutT)), 64)) {
    *what = "cuTensorMapEncodeTiled failed";
    return cudaErrorInvalidValue;
  }
  using S = Smem<BM, TileBRows<BM, EPI>(), OutBufferBytes<BM, OutT>()>;
  const size_t smem = sizeof(S) + 1024;
  static_assert(sizeof(S) + 1024 <= kSmemLimit, "shared memory");
  auto kernel = OwnGroupedGemmKernel<BM, OutT, EPI>;
  *what = "cudaFuncSetAttribute";
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  if (!pdl) {
    *what = "cudaMemsetAsync (tile counter)";
    err = cudaMemsetAsync(tile_counter, 0, sizeof(int), stream);
    if (err != cudaSuccess) return err;
  }
  *what = "kernel launch";
  return LaunchKernel(kernel, NumSms(), kThreads, smem, stream, pdl, map_a, map_b, map_d, a_scale, b_scale, offsets, g,
                      m, n, k, static_cast<OutT*>(d), d_scale, activation, tile_counter, EvictFirstMaxRows());
}

// GEMM1 of an MoE with SPEC 3 steps 3-4 in its epilogue: the result of act_quant(grouped_gemm)
// without GEMM1's float32 [M, N] output going through memory.
ffi::Error Gemm1ActQuantImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> a_scale, ffi::AnyBuffer b,
                             ffi::Buffer<ffi::F32> b_scale, ffi::Buffer<ffi::S32> offsets,
                             ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::Buffer<ffi::F32>> q_scale,
                             ffi::Result<ffi::Buffer<ffi::S32>> workspace, int32_t activation, int32_t block_m) {
  const char* op = "jax_moe_gemm1_act_quant";
  if (!IsSupportedActivation(activation))
    return InvalidArgument(std::string(op) + ": activation: expected Swiglu (3), Geglu (4), Relu2 (6) or Identity (9), got " +
                           std::to_string(activation));
  JAX_MOE_RETURN_IF_ERROR(CheckBlockM(op, block_m));
  const bool gated = IsGatedActivation(activation);
  GemmShape sh;
  JAX_MOE_RETURN_IF_ERROR(CheckGemmOperands(op, a, a_scale, b, b_scale, offsets, &sh));
  const int64_t inter = gated ? sh.n / 2 : sh.n;
  if (inter % 128 != 0)
    return InvalidArgument(std::string(op) + ": b: N (dimension 1) must be " + (gated ? "2*I" : "I") +
                           " with I a multiple of 128, got " + std::to_string(sh.n));
  if (!IsFp8E4M3(*q)) return InvalidArgument(std::string(op) + ": output: expected dtype float8_e4m3fn");
  JAX_MOE_RETURN_IF_ERROR(CheckShape(*q, "jax_moe_gemm1_act_quant: output", {sh.m, inter}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(*q_scale, "jax_moe_gemm1_act_quant: output scales", {sh.m * inter / 128}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(*workspace, "jax_moe_gemm1_act_quant: workspace", {kOwnGemmWorkspaceInts}));
  JAX_MOE_RETURN_IF_ERROR(CheckOwnGemm(op, sh.g, {a.untyped_data(), b.untyped_data(), q->untyped_data()}));
  if (sh.m == 0 || inter == 0) return ffi::Error::Success();
  const char* what = "";
  auto launch = block_m == 64 ? (gated ? Launch<64, uint8_t, kActGated> : Launch<64, uint8_t, kActPlain>)
                              : (gated ? Launch<128, uint8_t, kActGated> : Launch<128, uint8_t, kActPlain>);
  cudaError_t err = launch(stream, false, int(sh.g), int(sh.m), int(sh.n), int(sh.k), a.untyped_data(), a_scale.typed_data(),
                           b.untyped_data(), b_scale.typed_data(), offsets.typed_data(), q->untyped_data(),
                           q_scale->typed_data(), activation, workspace->typed_data(), &what);
  if (err != cudaSuccess) return CudaError(err, op, what);
  return ffi::Error::Success();
}

}  // namespace

ffi::Error CheckGemmOperands(const char* op, const ffi::AnyBuffer& a, const ffi::Buffer<ffi::F32>& a_scale,
                             const ffi::AnyBuffer& b, const ffi::Buffer<ffi::F32>& b_scale,
                             const ffi::Buffer<ffi::S32>& offsets, GemmShape* shape) {
  const std::string o(op);
  if (!IsFp8E4M3(a)) return InvalidArgument(o + ": a: dtype must be float8_e4m3fn");
  if (!IsFp8E4M3(b)) return InvalidArgument(o + ": b: dtype must be float8_e4m3fn");
  if (a.dimensions().size() != 2) return InvalidArgument(o + ": a: expected rank 2 [M, K]");
  if (b.dimensions().size() != 3) return InvalidArgument(o + ": b: expected rank 3 [G, N, K]");
  const int64_t m = Dim(a, 0), k = Dim(a, 1), g = Dim(b, 0), n = Dim(b, 1);
  if (k <= 0 || k % 128 != 0)
    return InvalidArgument(o + ": a: K (dimension 1) must be a positive multiple of 128, got " + std::to_string(k));
  if (n % 128 != 0)
    return InvalidArgument(o + ": b: N (dimension 1) must be a multiple of 128, got " + std::to_string(n));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(b, (o + ": b").c_str(), {g, n, k}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(a_scale, (o + ": a_scale").c_str(), {m * (k / 128)}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(b_scale, (o + ": b_scale").c_str(), {g, n / 128, k / 128}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(offsets, (o + ": expert_offsets").c_str(), {g + 1}));
  if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX || g > INT32_MAX / 2 || m * (k / 128) > INT32_MAX ||
      g * n > INT32_MAX)
    return InvalidArgument(o + ": sizes exceed the 32-bit range of the kernel");
  *shape = GemmShape{m, n, k, g};
  return ffi::Error::Success();
}

ffi::Error CheckGemmOutput(const char* op, const ffi::AnyBuffer& d, const GemmShape& shape, bool* f32_out) {
  *f32_out = d.element_type() == ffi::DataType::F32;
  if (!*f32_out && d.element_type() != ffi::DataType::BF16)
    return InvalidArgument(std::string(op) + ": d: output dtype must be bfloat16 or float32");
  return CheckShape(d, (std::string(op) + ": d").c_str(), {shape.m, shape.n});
}

ffi::Error CheckOwnGemm(const char* op, int64_t num_groups, std::initializer_list<const void*> tma_buffers) {
  if (num_groups > kOwnGemmMaxGroups)
    return InvalidArgument(std::string(op) + ": the own kernel takes at most " + std::to_string(kOwnGemmMaxGroups) +
                           " groups, got " + std::to_string(num_groups));
  for (const void* p : tma_buffers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
      return InvalidArgument(std::string(op) + ": a, b and the output must be 16-byte aligned for TMA");
  return ffi::Error::Success();
}

cudaError_t LaunchOwnGroupedGemm(cudaStream_t stream, bool pdl, int block_m, bool f32_out, int num_groups, int m,
                                 int n, int k, const void* a, const float* a_scale, const void* b, const float* b_scale,
                                 const int32_t* offsets, void* d, int* tile_counter, const char** what) {
  decltype(&Launch<64, float, kStore>) launch = nullptr;
  switch (block_m) {
    case 128: launch = f32_out ? Launch<128, float, kStore> : Launch<128, __nv_bfloat16, kStore>; break;
    case 64: launch = f32_out ? Launch<64, float, kStore> : Launch<64, __nv_bfloat16, kStore>; break;
    case 32: launch = f32_out ? Launch<32, float, kStore> : Launch<32, __nv_bfloat16, kStore>; break;
    case 16: launch = f32_out ? Launch<16, float, kStore> : Launch<16, __nv_bfloat16, kStore>; break;
    case 8: launch = f32_out ? Launch<8, float, kStore> : Launch<8, __nv_bfloat16, kStore>; break;
    default: *what = "block_m"; return cudaErrorInvalidValue;
  }
  return launch(stream, pdl, num_groups, m, n, k, a, a_scale, b, b_scale, offsets, d, nullptr, 0, tile_counter, what);
}

XLA_FFI_DEFINE_HANDLER(Gemm1ActQuantHandler, Gemm1ActQuantImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()          // a: fp8 [M, K] (permuted rows)
                           .Arg<ffi::Buffer<ffi::F32>>()   // a_scale [M*K/128], grouped MN-major
                           .Arg<ffi::AnyBuffer>()          // b: fp8 [G, N, K] (GEMM1 weights)
                           .Arg<ffi::Buffer<ffi::F32>>()   // b_scale [G, N/128, K/128]
                           .Arg<ffi::Buffer<ffi::S32>>()   // expert_offsets [G + 1]
                           .Ret<ffi::AnyBuffer>()          // fp8 [M, I]
                           .Ret<ffi::Buffer<ffi::F32>>()   // scales [M*I/128], grouped MN-major
                           .Ret<ffi::Buffer<ffi::S32>>()   // workspace [kOwnGemmWorkspaceInts]: the tile counter
                           .Attr<int32_t>("activation")
                           .Attr<int32_t>("block_m"),      // 128 (own128 tiles) or 64 (own64)
                       {ffi::Traits::kCmdBufferCompatible});

JAX_MOE_REGISTER_TARGET("jax_moe_gemm1_act_quant", Gemm1ActQuantHandler);

// A stage and the own GEMM (64 x 256 or 128 x 128 tiles) that consumes its output, in one call:
// the stage's kernel runs first, the GEMM is launched after it with PDL and issues its first
// weight loads while the stage still runs (separate FFI calls cannot overlap this way: XLA
// records each call into its own CUDA graph node). Same results as the two targets in sequence.
namespace {

// The GEMM half of both pair targets: checks (a and a_scale are the stage's outputs), runs
// `stage(counter)`, whose kernel zeroes the GEMM's tile counter (stages.h), and launches the
// GEMM as its programmatic dependent.
template <class Stage>
ffi::Error StageThenGemm(const char* op, cudaStream_t stream, Stage stage, const ffi::AnyBuffer& a,
                         const ffi::Buffer<ffi::F32>& a_scale, const ffi::AnyBuffer& b,
                         const ffi::Buffer<ffi::F32>& b_scale, const ffi::Buffer<ffi::S32>& offsets,
                         ffi::AnyBuffer& d, ffi::Buffer<ffi::S32>& workspace, int32_t block_m) {
  JAX_MOE_RETURN_IF_ERROR(CheckBlockM(op, block_m, /*trimmed=*/true));
  GemmShape sh;
  JAX_MOE_RETURN_IF_ERROR(CheckGemmOperands(op, a, a_scale, b, b_scale, offsets, &sh));
  bool f32_out = false;
  JAX_MOE_RETURN_IF_ERROR(CheckGemmOutput(op, d, sh, &f32_out));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(workspace, (std::string(op) + ": workspace").c_str(), {kOwnGemmWorkspaceInts}));
  JAX_MOE_RETURN_IF_ERROR(CheckOwnGemm(op, sh.g, {a.untyped_data(), b.untyped_data(), d.untyped_data()}));
  JAX_MOE_RETURN_IF_ERROR(stage(workspace.typed_data()));
  if (sh.m == 0 || sh.n == 0) return ffi::Error::Success();  // else the stage's kernel ran (M, K > 0)
  const char* what = "";
  cudaError_t err = LaunchOwnGroupedGemm(stream, true, block_m, f32_out, int(sh.g), int(sh.m), int(sh.n), int(sh.k),
                             a.untyped_data(), a_scale.typed_data(), b.untyped_data(), b_scale.typed_data(),
                             offsets.typed_data(), d.untyped_data(), workspace.typed_data(), &what);
  if (err != cudaSuccess) return CudaError(err, op, what);
  return ffi::Error::Success();
}

ffi::Error PermuteGemmImpl(cudaStream_t stream, ffi::AnyBuffer hidden, ffi::Buffer<ffi::F32> hidden_scale,
                           ffi::Buffer<ffi::S32> slot_to_row, ffi::Buffer<ffi::S32> row_to_slot,
                           ffi::Buffer<ffi::S32> offsets, ffi::AnyBuffer b,
                           ffi::Buffer<ffi::F32> b_scale, ffi::Result<ffi::AnyBuffer> d,
                           ffi::Result<ffi::AnyBuffer> rows, ffi::Result<ffi::Buffer<ffi::F32>> row_scales,
                           ffi::Result<ffi::Buffer<ffi::S32>> workspace, int32_t top_k, int32_t block_m) {
  auto stage = [&](int32_t* counter) {
    return PermuteStage(stream, hidden, hidden_scale, slot_to_row, row_to_slot, offsets, *rows, *row_scales, top_k,
                        ZeroInts{counter, 1});
  };
  return StageThenGemm("jax_moe_permute_gemm", stream, stage, *rows, *row_scales, b, b_scale, offsets, *d, *workspace,
                       block_m);
}

ffi::Error ActQuantGemmImpl(cudaStream_t stream, ffi::AnyBuffer h, ffi::Buffer<ffi::S32> offsets, ffi::AnyBuffer b,
                            ffi::Buffer<ffi::F32> b_scale, ffi::Result<ffi::AnyBuffer> d,
                            ffi::Result<ffi::AnyBuffer> act, ffi::Result<ffi::Buffer<ffi::F32>> act_scales,
                            ffi::Result<ffi::Buffer<ffi::S32>> workspace, int32_t activation, int32_t block_m) {
  auto stage = [&](int32_t* counter) {
    return ActQuantStage(stream, h, offsets, *act, *act_scales, activation, ZeroInts{counter, 1});
  };
  return StageThenGemm("jax_moe_act_quant_gemm", stream, stage, *act, *act_scales, b, b_scale, offsets, *d,
                       *workspace, block_m);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(PermuteGemmHandler, PermuteGemmImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()          // hidden_states fp8 [T, H]
                           .Arg<ffi::Buffer<ffi::F32>>()   // hidden_states_scale [H/128, T]
                           .Arg<ffi::Buffer<ffi::S32>>()   // slot_to_row [T*k]
                           .Arg<ffi::Buffer<ffi::S32>>()   // row_to_slot [T*k]
                           .Arg<ffi::Buffer<ffi::S32>>()   // expert_offsets [G + 1]
                           .Arg<ffi::AnyBuffer>()          // b: fp8 [G, N, H] (GEMM1 weights)
                           .Arg<ffi::Buffer<ffi::F32>>()   // b_scale [G, N/128, H/128]
                           .Ret<ffi::AnyBuffer>()          // d: f32 or bf16 [T*k, N]
                           .Ret<ffi::AnyBuffer>()          // permuted rows fp8 [T*k, H] (workspace)
                           .Ret<ffi::Buffer<ffi::F32>>()   // their scales [T*k*H/128] (workspace)
                           .Ret<ffi::Buffer<ffi::S32>>()   // [kOwnGemmWorkspaceInts]: the tile counter
                           .Attr<int32_t>("top_k")
                           .Attr<int32_t>("block_m"),
                       {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER(ActQuantGemmHandler, ActQuantGemmImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()          // GEMM1 output f32|bf16 [M, 2I] or [M, I]
                           .Arg<ffi::Buffer<ffi::S32>>()   // expert_offsets [G + 1]
                           .Arg<ffi::AnyBuffer>()          // b: fp8 [G, N, I] (GEMM2 weights)
                           .Arg<ffi::Buffer<ffi::F32>>()   // b_scale [G, N/128, I/128]
                           .Ret<ffi::AnyBuffer>()          // d: bf16 or f32 [M, N]
                           .Ret<ffi::AnyBuffer>()          // activations fp8 [M, I] (workspace)
                           .Ret<ffi::Buffer<ffi::F32>>()   // their scales [M*I/128] (workspace)
                           .Ret<ffi::Buffer<ffi::S32>>()   // [kOwnGemmWorkspaceInts]: the tile counter
                           .Attr<int32_t>("activation")
                           .Attr<int32_t>("block_m"),
                       {ffi::Traits::kCmdBufferCompatible});

JAX_MOE_REGISTER_TARGET("jax_moe_permute_gemm", PermuteGemmHandler);
JAX_MOE_REGISTER_TARGET("jax_moe_act_quant_gemm", ActQuantGemmHandler);

// The decode chain (OwnDecodeChainKernel): permute, then GEMM1 + activation + re-quantization
// and GEMM2 in one persistent kernel launched as the permute's programmatic dependent. The
// permute kernel zeroes the chain's whole workspace: its counters and claim flags.
namespace {

// Whether a GEMM2 tile of the chain that has to wait for its group's GEMM1 tiles first sends its
// weight blocks past the pipeline's stages to the L2 (TmaPrefetchL2), so that the DRAM streams
// them during the wait (at T=1 the CTAs finish their GEMM1 tiles over several microseconds and
// idle until the group's last one is done). Same loads, same sums: the same bits. Off until
// measured on an H100: on where $JAX_MOE_CHAIN_L2_PREFETCH=on, read at each launch.
inline bool ChainL2Prefetch() { return EnvEquals("JAX_MOE_CHAIN_L2_PREFETCH", "on"); }

template <int BM>
cudaError_t LaunchChain(cudaStream_t stream, int g, int m, int hidden, int inter, const void* rows,
                        const float* row_scales, const void* w1, const float* w1_scale, const void* w2,
                        const float* w2_scale, const int32_t* offsets, void* act, float* act_scales, void* d,
                        int activation, int* workspace, const char** what) {
  CUtensorMap map_a1, map_b1, map_a2, map_b2;
  if (!EncodeMap(&map_a1, rows, m, hidden, 1, BM) || !EncodeMap(&map_b1, w1, uint64_t(g) * 2 * inter, hidden, 1, 64) ||
      !EncodeMap(&map_a2, act, m, inter, 1, BM) || !EncodeMap(&map_b2, w2, uint64_t(g) * hidden, inter, 1, 64)) {
    *what = "cuTensorMapEncodeTiled failed";
    return cudaErrorInvalidValue;
  }
  using S = Smem<BM, 256, 0>;
  const size_t smem = sizeof(S) + 1024 + kChainTraceBytes;
  static_assert(sizeof(S) + 1024 + kChainTraceBytes <= kSmemLimit, "shared memory");
  auto kernel = OwnDecodeChainKernel<BM>;
  *what = "cudaFuncSetAttribute";
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  *what = "kernel launch";
  int ctas = std::min(NumSms(), kChainMaxCtas);  // one per SM; $JAX_MOE_CHAIN_CTAS (a test's knob) sets another count
  const char* forced = std::getenv("JAX_MOE_CHAIN_CTAS");
  if (forced != nullptr && std::atoi(forced) > 0) ctas = std::min(std::atoi(forced), kChainMaxCtas);
  return LaunchKernel(kernel, ctas, kThreads, smem, stream, /*pdl=*/true, map_a1, map_b1, map_a2, map_b2,
                      row_scales, w1_scale, w2_scale, offsets, g, m, hidden, inter, static_cast<uint8_t*>(act),
                      act_scales, static_cast<__nv_bfloat16*>(d), activation, workspace, EvictFirstMaxRows(),
                      int(ChainL2Prefetch()), int(EnvEquals("JAX_MOE_CHAIN_TRACE", "1")));  // both read at each launch
}

ffi::Error PermuteGemmChainImpl(cudaStream_t stream, ffi::AnyBuffer hidden, ffi::Buffer<ffi::F32> hidden_scale,
                                ffi::Buffer<ffi::S32> slot_to_row, ffi::Buffer<ffi::S32> row_to_slot,
                                ffi::Buffer<ffi::S32> offsets, ffi::AnyBuffer w1, ffi::Buffer<ffi::F32> w1_scale,
                                ffi::AnyBuffer w2, ffi::Buffer<ffi::F32> w2_scale, ffi::Result<ffi::AnyBuffer> d,
                                ffi::Result<ffi::AnyBuffer> rows, ffi::Result<ffi::Buffer<ffi::F32>> row_scales,
                                ffi::Result<ffi::AnyBuffer> act, ffi::Result<ffi::Buffer<ffi::F32>> act_scales,
                                ffi::Result<ffi::Buffer<ffi::S32>> workspace, int32_t top_k, int32_t activation,
                                int32_t block_m) {
  const char* op = "jax_moe_permute_gemm_chain";
  const std::string o(op);
  if (!IsGatedActivation(activation))
    return InvalidArgument(o + ": activation: expected Swiglu (3) or Geglu (4), got " + std::to_string(activation));
  if (block_m != 64 && block_m != 32 && block_m != 16 && block_m != 8)
    return InvalidArgument(o + ": block_m: expected 64, 32, 16 or 8, got " + std::to_string(block_m));
  // GEMM1: permuted rows (a) x gemm1_weights (b) [G, 2I, H]; GEMM2: activations x gemm2_weights [G, H, I]
  GemmShape sh1, sh2;
  JAX_MOE_RETURN_IF_ERROR(CheckGemmOperands("jax_moe_permute_gemm_chain (GEMM1)", *rows, *row_scales, w1, w1_scale,
                                            offsets, &sh1));
  if (sh1.n % 256 != 0)
    return InvalidArgument(o + ": gemm1_weights: N (dimension 1) must be 2*I with I a multiple of 128, got " +
                           std::to_string(sh1.n));
  if (w2.dimensions().size() != 3 || Dim(w2, 0) != sh1.g || Dim(w2, 1) != sh1.k || Dim(w2, 2) != sh1.n / 2)
    return InvalidArgument(o + ": gemm2_weights: expected shape [G, H, I] = [" + std::to_string(sh1.g) + ", " +
                           std::to_string(sh1.k) + ", " + std::to_string(sh1.n / 2) + "]");
  JAX_MOE_RETURN_IF_ERROR(CheckGemmOperands("jax_moe_permute_gemm_chain (GEMM2)", *act, *act_scales, w2, w2_scale,
                                            offsets, &sh2));
  if (d->element_type() != ffi::DataType::BF16) return InvalidArgument(o + ": d: output dtype must be bfloat16");
  JAX_MOE_RETURN_IF_ERROR(CheckShape(*d, (o + ": d").c_str(), {sh1.m, sh1.k}));
  JAX_MOE_RETURN_IF_ERROR(
      CheckShape(*workspace, (o + ": workspace").c_str(), {kChainCountersAt + sh1.g + kChainMaxCtas}));
  // tile ids stay below the ghost ids: at most M / 8 + G row tiles, times the column tiles
  if ((sh1.m / 8 + sh1.g) * (sh1.n / 256 + (sh1.k + 255) / 256) >= kChainGhostTile)
    return InvalidArgument(o + ": too many tiles for one launch (T*k = " + std::to_string(sh1.m) + ")");
  JAX_MOE_RETURN_IF_ERROR(CheckOwnGemm(
      op, sh1.g, {rows->untyped_data(), w1.untyped_data(), act->untyped_data(), w2.untyped_data(), d->untyped_data()}));
  JAX_MOE_RETURN_IF_ERROR(PermuteStage(stream, hidden, hidden_scale, slot_to_row, row_to_slot, offsets, *rows,
                                       *row_scales, top_k,
                                       ZeroInts{workspace->typed_data(), int(workspace->element_count())}));
  if (sh1.m == 0) return ffi::Error::Success();  // else the permute's kernel ran (M, H > 0)
  decltype(&LaunchChain<8>) launch = block_m == 8 ? LaunchChain<8>
                                     : block_m == 16 ? LaunchChain<16>
                                     : block_m == 32 ? LaunchChain<32>
                                                     : LaunchChain<64>;
  const char* what = "";
  cudaError_t err = launch(stream, int(sh1.g), int(sh1.m), int(sh1.k), int(sh2.k), rows->untyped_data(),
                           row_scales->typed_data(), w1.untyped_data(), w1_scale.typed_data(), w2.untyped_data(),
                           w2_scale.typed_data(), offsets.typed_data(), act->untyped_data(), act_scales->typed_data(),
                           d->untyped_data(), activation, workspace->typed_data(), &what);
  if (err != cudaSuccess) return CudaError(err, op, what);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(PermuteGemmChainHandler, PermuteGemmChainImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()          // hidden_states fp8 [T, H]
                           .Arg<ffi::Buffer<ffi::F32>>()   // hidden_states_scale [H/128, T]
                           .Arg<ffi::Buffer<ffi::S32>>()   // slot_to_row [T*k]
                           .Arg<ffi::Buffer<ffi::S32>>()   // row_to_slot [T*k]
                           .Arg<ffi::Buffer<ffi::S32>>()   // expert_offsets [G + 1]
                           .Arg<ffi::AnyBuffer>()          // gemm1_weights fp8 [G, 2I, H]
                           .Arg<ffi::Buffer<ffi::F32>>()   // their scales [G, 2I/128, H/128]
                           .Arg<ffi::AnyBuffer>()          // gemm2_weights fp8 [G, H, I]
                           .Arg<ffi::Buffer<ffi::F32>>()   // their scales [G, H/128, I/128]
                           .Ret<ffi::AnyBuffer>()          // d: bf16 [T*k, H], GEMM2's rows
                           .Ret<ffi::AnyBuffer>()          // permuted rows fp8 [T*k, H] (workspace)
                           .Ret<ffi::Buffer<ffi::F32>>()   // their scales [T*k*H/128] (workspace)
                           .Ret<ffi::AnyBuffer>()          // activations fp8 [T*k, I] (workspace)
                           .Ret<ffi::Buffer<ffi::F32>>()   // their scales [T*k*I/128] (workspace)
                           .Ret<ffi::Buffer<ffi::S32>>()   // [4 + G + 1024]: counters, claim flags
                           .Attr<int32_t>("top_k")
                           .Attr<int32_t>("activation")
                           .Attr<int32_t>("block_m"),
                       {ffi::Traits::kCmdBufferCompatible});

JAX_MOE_REGISTER_TARGET("jax_moe_permute_gemm_chain", PermuteGemmChainHandler);

}  // namespace jax_moe
