// jax_moe_plan and jax_moe_permute: grouping routed (token, slot) pairs by local expert.
//
// plan: slot s belongs to bucket id[s] - expert_offset when that is in [0, E) (and, with
// num_experts > 0, id[s] itself is in [0, num_experts)), else to bucket E (not local).
// Up to 8192 slots one kernel does all of it (PlanFusedKernel: every block counts all slots);
// above, three kernels, no host sync, deterministic and stable:
//   1. count:  the slots are cut into C contiguous chunks (C = scratch rows, chosen by the Python
//              wrapper); block c writes the per-bucket histogram of chunk c into scratch[c, :].
//              Bucket b in [0, E) is a local expert, bucket E collects every non-local slot.
//   2. scan:   one block: scratch[c, b] becomes the exclusive prefix over chunks, and
//              offsets[b] = sum of the counts of buckets < b (offsets[E] = local rows).
//   3. assign: block c walks its chunk in order, 256 slots per round; a slot's row is
//              offsets[b] + scratch[c, b] + (earlier slots of bucket b in this chunk), the last
//              term from warp match_any ranks plus a per-warp count table in shared memory.
//              Non-local slots fill rows [offsets[E], T*k) in slot order, so every row is
//              written exactly once (row_to_slot = -1 there).
// permute: a block per row (row_to_slot) below 16384 slots, else a block per token whose row is
// read once and written to the rows of its local slots (slot_to_row), followed by a scale kernel
// (its PDL dependent) that writes the scales in the grouped MN-major layout in output order;
// 16-byte copies.
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>
#include <algorithm>
#include <cstdint>

#include "ffi_common.h"
#include "stages.h"

namespace jax_moe {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kPlanThreads = 256;
constexpr int kPlanWarps = kPlanThreads / 32;
constexpr int kScanThreads = 1024;

// Adds the bucket counts of slots [begin, end) to the shared-memory histogram `hist` [E + 1]:
// a shared atomic per local slot, the non-local ones (bucket E: most slots of an expert-parallel
// slice) summed per warp first. (A warp match_any per round, which aggregates every bucket,
// costs several times more: the fused plan kernel counts all slots in every block.)
__device__ __forceinline__ void CountChunk(const int32_t* __restrict__ ids, int64_t begin,
                                           int64_t end, int num_experts, LocalRange lr, int* hist) {
  int not_local = 0;
#pragma unroll 4
  for (int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) {
    const int b = Bucket(ids[s], num_experts, lr);
    if (b < num_experts) atomicAdd(&hist[b], 1);
    else ++not_local;
  }
  not_local = __reduce_add_sync(kFull, not_local);  // every lane is here: the loop has no sync
  if ((threadIdx.x & 31) == 0 && not_local > 0) atomicAdd(&hist[num_experts], not_local);
}

// Kernel 1: histogram of each chunk over E + 1 buckets.
__global__ void __launch_bounds__(kPlanThreads)
    PlanCountKernel(const int32_t* __restrict__ ids, int64_t num_slots, int64_t chunk,
                    int num_experts, LocalRange lr, int32_t* __restrict__ scratch) {
  extern __shared__ int hist[];  // [E + 1]
  const int nb = num_experts + 1;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  CountChunk(ids, begin, min(begin + chunk, num_slots), num_experts, lr, hist);
  __syncthreads();
  int32_t* out = scratch + static_cast<int64_t>(blockIdx.x) * nb;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) out[b] = hist[b];
}

// Kernel 2: exclusive prefix over chunks (in place) and over buckets (offsets).
__global__ void __launch_bounds__(kScanThreads)
    PlanScanKernel(int32_t* __restrict__ scratch, int num_chunks, int num_experts,
                   int32_t* __restrict__ offsets) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int nb = num_experts + 1;
  const int b = threadIdx.x;
  int total = 0;
  if (b < nb) {
    int c = 0;
    constexpr int U = 8;
    for (; c + U <= num_chunks; c += U) {
      int v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) v[u] = scratch[static_cast<int64_t>(c + u) * nb + b];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        scratch[static_cast<int64_t>(c + u) * nb + b] = total;
        total += v[u];
      }
    }
    for (; c < num_chunks; ++c) {
      int v = scratch[static_cast<int64_t>(c) * nb + b];
      scratch[static_cast<int64_t>(c) * nb + b] = total;
      total += v;
    }
  }
  int excl;
  Scan(temp).ExclusiveSum(b < num_experts ? total : 0, excl);
  if (b < nb) offsets[b] = excl;  // offsets[E] = sum over local experts
}

// The assign loop over slots [begin, end) of one block: `next` holds each bucket's first free
// row, `table` is zeroed per-warp scratch [kPlanWarps][E + 1] (both in shared memory).
__device__ __forceinline__ void AssignChunk(const int32_t* __restrict__ ids, int64_t num_slots,
                                            int64_t begin, int64_t end, int num_experts,
                                            LocalRange lr, int* next, int* table,
                                            int32_t* __restrict__ slot_to_row,
                                            int32_t* __restrict__ row_to_slot) {
  const int nb = num_experts + 1;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const unsigned lt = LaneMaskLt();
  for (int64_t base = begin; base < end; base += blockDim.x) {  // uniform trip count
    const int64_t s = base + threadIdx.x;
    const bool valid = s < end;
    const int b = valid ? Bucket(ids[s], num_experts, lr) : -1;
    const unsigned peers = __match_any_sync(kFull, b);
    const bool leader = valid && lane == __ffs(peers) - 1;
    const int cnt = __popc(peers);
    if (leader) table[warp * nb + b] = cnt;
    __syncthreads();
    if (valid) {
      int row = next[b] + __popc(peers & lt);
      for (int w = 0; w < warp; ++w) row += table[w * nb + b];
      const bool local = b < num_experts;
      slot_to_row[s] = local ? row : -1;
      if (row >= 0 && row < num_slots) row_to_slot[row] = local ? static_cast<int32_t>(s) : -1;
    }
    __syncthreads();
    if (leader) {
      atomicAdd(&next[b], cnt);
      table[warp * nb + b] = 0;
    }
    __syncwarp();
  }
}

// Kernel 3: stable rank of every slot within its bucket.
__global__ void __launch_bounds__(kPlanThreads)
    PlanAssignKernel(const int32_t* __restrict__ ids, int64_t num_slots, int64_t chunk,
                     int num_experts, LocalRange lr, const int32_t* __restrict__ scratch,
                     const int32_t* __restrict__ offsets, int32_t* __restrict__ slot_to_row,
                     int32_t* __restrict__ row_to_slot) {
  extern __shared__ int smem[];
  const int nb = num_experts + 1;
  int* next = smem;            // [nb] next free row of each bucket in this chunk
  int* table = smem + nb;      // [kPlanWarps][nb] per-warp counts of the current round
  const int64_t c = blockIdx.x;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) next[b] = offsets[b] + scratch[c * nb + b];
  for (int i = threadIdx.x; i < kPlanWarps * nb; i += blockDim.x) table[i] = 0;
  __syncthreads();
  const int64_t begin = c * chunk;
  AssignChunk(ids, num_slots, begin, min(begin + chunk, num_slots), num_experts, lr, next, table,
              slot_to_row, row_to_slot);
}

// Count, scan and assign in one launch for up to kFusedMaxSlots slots (decode, small EP
// batches): block c assigns chunk c (kFusedChunk slots: one round of AssignChunk), but first
// counts every slot itself, those before its chunk and the rest, so no block waits for another.
// Each block reads all the ids (n / 256 loads per thread); up to ~8K slots that costs less than
// the three-kernel path's two extra launches.
constexpr int kFusedChunk = kPlanThreads;
constexpr int64_t kFusedMaxSlots = 8192;
constexpr int kScanItems = (kMaxLocalExperts + 1 + kPlanThreads - 1) / kPlanThreads;

__global__ void __launch_bounds__(kPlanThreads)
    PlanFusedKernel(const int32_t* __restrict__ ids, int64_t num_slots, int num_experts,
                    LocalRange lr, int32_t* __restrict__ offsets, int32_t* __restrict__ slot_to_row,
                    int32_t* __restrict__ row_to_slot) {
  using Scan = cub::BlockScan<int, kPlanThreads>;
  __shared__ typename Scan::TempStorage temp;
  extern __shared__ int smem[];
  // a PDL dependent of the route (StagePdl): the ids are complete after the wait; the permute
  // after this kernel may start once every block has passed it
  GridDependencyWait();
  GridDependencyTrigger();
  const int nb = num_experts + 1;
  int* before = smem;          // [nb] slots of each bucket before this chunk, then its next free row
  int* rest = smem + nb;       // [nb] slots of each bucket from this chunk on
  int* table = smem + 2 * nb;  // [kPlanWarps][nb]
  for (int i = threadIdx.x; i < (kPlanWarps + 2) * nb; i += blockDim.x) smem[i] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kFusedChunk;
  const int64_t end = min(begin + kFusedChunk, num_slots);
  CountChunk(ids, 0, begin, num_experts, lr, before);
  CountChunk(ids, begin, num_slots, num_experts, lr, rest);
  __syncthreads();
  // exclusive prefix over the local buckets; bucket E (not local) starts after all of them
  int items[kScanItems];
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) {
    const int b = threadIdx.x * kScanItems + i;
    items[i] = b < num_experts ? before[b] + rest[b] : 0;
  }
  Scan(temp).ExclusiveSum(items, items);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) {
    const int b = threadIdx.x * kScanItems + i;
    if (b < nb) {
      before[b] += items[i];
      if (blockIdx.x == 0) offsets[b] = items[i];
    }
  }
  __syncthreads();
  AssignChunk(ids, num_slots, begin, end, num_experts, lr, before, table, slot_to_row,
              row_to_slot);
}

// The permute kernels: blocks of kPermuteThreads, kPermuteBatch 16-byte loads in flight per
// thread, one wave of blocks (grid-stride). Below kPermuteTokenMajorSlots slots (decode,
// expert-parallel slices of a few hundred tokens: latency-bound) a block per row; above, a
// block per token.
constexpr int kPermuteThreads = 128;
constexpr int kPermuteBatch = 4;
constexpr int kPermuteBlocksPerSm = 10;  // one wave: <= 48 registers x 128 threads
constexpr int64_t kPermuteTokenMajorSlots = 16384;

// permute by tokens: one block per token (grid-stride over the tokens). The block finds the
// rows of the token's local slots (slot_to_row; a slot whose row is not below offsets[E] is not
// local), then reads the token's row once and writes it to each of them, with (kScales: only
// where PermuteScalesKernel cannot stage T scales) its 128-blocks' scales into the grouped
// MN-major layout. A block per row reads a token k times (from DRAM once the hidden states
// outgrow the L2: prefill T=8192, 58.7 MB), and in an expert-parallel slice tokens without a
// local slot are not read at all.
template <bool kScales>
__global__ void __launch_bounds__(kPermuteThreads, kPermuteBlocksPerSm)
    PermuteTokensKernel(const uint8_t* __restrict__ hidden, const float* __restrict__ hidden_scale,
                        const int32_t* __restrict__ slot_to_row, const int32_t* __restrict__ offsets,
                        int num_experts, int64_t num_tokens, int top_k, int64_t hidden_size,
                        uint8_t* __restrict__ rows, float* __restrict__ row_scales,
                        ZeroInts zero) {
  StageKernelBegin(zero);
  extern __shared__ int smem[];
  int* offs = smem;                            // [E + 1]
  int* slot_row = smem + num_experts + 1;      // [k]: the row of each slot of the token, -1: not local
  int* slot_group = slot_row + top_k;          // [k]: its local expert
  const int64_t num_rows = num_tokens * top_k;
  const int64_t valid_rows = LoadGroupOffsets(offsets, num_experts, offs, num_rows);
  const int64_t kb_count = hidden_size / 128;
  const int64_t vecs = hidden_size / 16;
  constexpr int64_t kChunk = kPermuteBatch * kPermuteThreads;  // vectors per batch of the block
  // The rows of the block's next token are loaded ahead (thread j < top_k: slot j), so a token
  // waits for one global round trip (its data), not two.
  int64_t tok = blockIdx.x;
  int32_t next_row = tok < num_tokens && threadIdx.x < top_k ? slot_to_row[tok * top_k + threadIdx.x] : -1;
  for (; tok < num_tokens; tok += gridDim.x) {
    const int32_t my_row = next_row;
    const int64_t next_tok = tok + gridDim.x;
    next_row = next_tok < num_tokens && threadIdx.x < top_k ? slot_to_row[next_tok * top_k + threadIdx.x] : -1;
    int any_local = 0;
    for (int j = threadIdx.x; j < top_k; j += blockDim.x) {
      const int32_t r = j == static_cast<int>(threadIdx.x) ? my_row : slot_to_row[tok * top_k + j];
      const int g = r >= 0 && r < valid_rows ? FindGroup(offs, num_experts, r) : -1;
      slot_row[j] = g >= 0 ? r : -1;
      slot_group[j] = g;
      any_local |= g >= 0;
    }
    if (__syncthreads_or(any_local) == 0) continue;  // no local slot (uniform: no barrier skipped)
    const uint4* src = reinterpret_cast<const uint4*>(hidden + tok * hidden_size);
    const float first_scale = kScales && threadIdx.x < kb_count ? hidden_scale[threadIdx.x * num_tokens + tok] : 0.0f;
    for (int64_t v0 = 0; v0 < vecs; v0 += kChunk) {
      uint4 buf[kPermuteBatch];
#pragma unroll
      for (int i = 0; i < kPermuteBatch; ++i) {
        const int64_t v = v0 + threadIdx.x + i * kPermuteThreads;
        if (v < vecs) buf[i] = src[v];
      }
      for (int j = 0; j < top_k; ++j) {
        const int32_t r = slot_row[j];
        if (r < 0) continue;
        uint4* dst = reinterpret_cast<uint4*>(rows + static_cast<int64_t>(r) * hidden_size);
#pragma unroll
        for (int i = 0; i < kPermuteBatch; ++i) {
          const int64_t v = v0 + threadIdx.x + i * kPermuteThreads;
          if (v < vecs) dst[v] = buf[i];
        }
      }
    }
    for (int64_t kb = threadIdx.x; kScales && kb < kb_count; kb += kPermuteThreads) {
      const float sc = kb < kPermuteThreads ? first_scale : hidden_scale[kb * num_tokens + tok];
      for (int j = 0; j < top_k; ++j) {
        const int32_t r = slot_row[j];
        if (r < 0) continue;
        const int g = slot_group[j];
        const int64_t idx = GroupedScaleIndex(offs[g], offs[g + 1], r, kb, kb_count);
        if (idx >= 0 && idx < num_rows * kb_count) row_scales[idx] = sc;
      }
    }
    __syncthreads();  // slot_row / slot_group are rewritten for the next token
  }
}

// permute's scales, after the token kernel without them (its PDL dependent): a block per
// (128-column block kb, slice of the rows) stages the token scales of kb (hidden_scale[kb, :],
// T floats) in shared memory, then writes row_scales[GroupedScaleIndex(g, r, kb)] =
// staged[row_to_slot[r] / k] for the rows r of its slice: loads and stores coalesced (a group's
// rows are consecutive in the MN-major layout). Written per token, each (slot, block) scale is a
// 4-byte store to its own 32-byte sector: ~100 us of the token kernel's ~300 at prefill T=8192
// (H100; tools/permute_probe.cu: 302 -> 228 us for both kernels). Its last step waits for the
// token kernel, so a kernel that waits for this one (the pair's GEMM) sees the rows too.
constexpr int kScaleThreads = 512;
constexpr int kScaleBatch = 4;  // loads in flight per thread
constexpr size_t kScaleMaxSmem = 160 * 1024;  // T up to ~40K tokens staged; beyond, the token kernel writes them

__global__ void __launch_bounds__(kScaleThreads)
    PermuteScalesKernel(const float* __restrict__ hidden_scale, const int32_t* __restrict__ row_to_slot,
                        const int32_t* __restrict__ offsets, int num_experts, int num_tokens, int top_k,
                        int kb_count, float* __restrict__ row_scales, ZeroInts zero) {
  // 32-bit indices: the caller checks T * k * kb_count < 2^31
  // No wait first: the token kernel lets this one start only after its own wait, so the plan's
  // outputs read here are complete; its rows are awaited at the end.
  StageKernelTrigger(zero);
  extern __shared__ float staged[];                          // [T]
  int* offs = reinterpret_cast<int*>(staged + num_tokens);   // [E + 1]
  const int kb = static_cast<int>(blockIdx.x % kb_count);
  const int slices = static_cast<int>(gridDim.x / kb_count);
  const int slice = static_cast<int>(blockIdx.x / kb_count);
  constexpr int kStep = kScaleBatch * kScaleThreads;
  const float* src = hidden_scale + static_cast<int64_t>(kb) * num_tokens;
  for (int t0 = threadIdx.x; t0 < num_tokens; t0 += kStep) {
    float v[kScaleBatch];
#pragma unroll
    for (int u = 0; u < kScaleBatch; ++u) {
      const int t = t0 + u * kScaleThreads;
      v[u] = t < num_tokens ? src[t] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kScaleBatch; ++u) {
      const int t = t0 + u * kScaleThreads;
      if (t < num_tokens) staged[t] = v[u];
    }
  }
  const int num_rows = num_tokens * top_k;
  const int valid_rows = static_cast<int>(LoadGroupOffsets(offsets, num_experts, offs, num_rows));  // syncs
  const int per_slice = (valid_rows + slices - 1) / slices;
  const int begin = slice * per_slice;
  const int end = min(begin + per_slice, valid_rows);
  for (int r0 = begin + threadIdx.x; r0 < end; r0 += kStep) {
    int32_t slot[kScaleBatch];
#pragma unroll
    for (int u = 0; u < kScaleBatch; ++u) {
      const int r = r0 + u * kScaleThreads;
      slot[u] = r < end ? row_to_slot[r] : -1;
    }
#pragma unroll
    for (int u = 0; u < kScaleBatch; ++u) {
      const int r = r0 + u * kScaleThreads;
      if (slot[u] < 0 || slot[u] >= num_rows) continue;
      const int g = FindGroup(offs, num_experts, r);
      if (g < 0) continue;
      // below num_rows * kb_count: offs[g] <= r < offs[g + 1] <= valid_rows
      row_scales[GroupedScaleIndex<int>(offs[g], offs[g + 1], r, kb, kb_count)] = staged[slot[u] / top_k];
    }
  }
  GridDependencyWait();  // complete only after the token kernel (see above)
}

// Shared memory of the scale kernel for T tokens and E local experts; above kScaleMaxSmem the
// token kernel writes the scales (PermuteTokensKernel<true>).
size_t PermuteScalesSmem(int64_t num_tokens, int num_experts) {
  return static_cast<size_t>(num_tokens + num_experts + 1) * sizeof(float);
}

// Launches the scale kernel as a PDL dependent of the kernel before it on `stream` (PermuteStage
// and tools/permute_probe.cu): ~4 blocks per SM, at least 2048 rows per slice.
cudaError_t LaunchPermuteScales(cudaStream_t stream, const float* hidden_scale, const int32_t* row_to_slot,
                                const int32_t* offsets, int num_experts, int num_tokens, int top_k, int kb_count,
                                float* row_scales, ZeroInts zero) {
  cudaError_t err = cudaFuncSetAttribute(PermuteScalesKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kScaleMaxSmem));
  if (err != cudaSuccess) return err;
  const int64_t num_rows = static_cast<int64_t>(num_tokens) * top_k;
  const int64_t slices =
      std::max<int64_t>(1, std::min<int64_t>(CeilDiv(4 * NumSms(), kb_count), CeilDiv(num_rows, 2048)));
  return LaunchKernel(PermuteScalesKernel, dim3(static_cast<unsigned>(kb_count * slices)), dim3(kScaleThreads),
                      PermuteScalesSmem(num_tokens, num_experts), stream, /*pdl=*/true, hidden_scale, row_to_slot,
                      offsets, num_experts, num_tokens, top_k, kb_count, row_scales, zero);
}

// permute by rows (below kPermuteTokenMajorSlots slots): one block per row (grid-stride over
// rows [0, offsets[E]) only); the block's threads split the row's 16-byte vectors,
// kPermuteBatch loads in flight each, and its 128-blocks' scales. A row then costs about three dependent global round trips (offsets,
// the row's slot, the data) where a warp per row waited for a round trip per 512 bytes; at
// decode and in expert-parallel slices, where one wave of rows is the whole kernel, that
// latency is the kernel's time. The slot of the block's next row is loaded ahead.
__global__ void __launch_bounds__(kPermuteThreads, kPermuteBlocksPerSm)
    PermuteRowsKernel(const uint8_t* __restrict__ hidden, const float* __restrict__ hidden_scale,
                      const int32_t* __restrict__ row_to_slot, const int32_t* __restrict__ offsets,
                      int num_experts, int64_t num_tokens, int top_k, int64_t hidden_size,
                      uint8_t* __restrict__ rows, float* __restrict__ row_scales,
                      ZeroInts zero) {
  StageKernelBegin(zero);
  extern __shared__ int offs[];  // [E + 1]
  const int64_t num_rows = num_tokens * top_k;
  const int64_t valid_rows = LoadGroupOffsets(offsets, num_experts, offs, num_rows);
  const int64_t kb_count = hidden_size / 128;
  const int64_t vecs = hidden_size / 16;
  int64_t r = blockIdx.x;
  int32_t slot = r < valid_rows ? row_to_slot[r] : -1;
  for (; r < valid_rows; r += gridDim.x) {
    const int64_t next = r + gridDim.x;
    const int32_t next_slot = next < valid_rows ? row_to_slot[next] : -1;
    if (slot >= 0 && slot < num_rows) {
      const int64_t tok = slot / top_k;
      // the first kPermuteThreads blocks' scales load with the data (one round trip per row)
      const float first_scale = threadIdx.x < kb_count ? hidden_scale[threadIdx.x * num_tokens + tok] : 0.0f;
      const uint4* src = reinterpret_cast<const uint4*>(hidden + tok * hidden_size);
      uint4* dst = reinterpret_cast<uint4*>(rows + r * hidden_size);
      for (int64_t v0 = threadIdx.x; v0 < vecs; v0 += kPermuteBatch * kPermuteThreads) {
        uint4 buf[kPermuteBatch];
#pragma unroll
        for (int i = 0; i < kPermuteBatch; ++i) {
          const int64_t v = v0 + i * kPermuteThreads;
          if (v < vecs) buf[i] = src[v];
        }
#pragma unroll
        for (int i = 0; i < kPermuteBatch; ++i) {
          const int64_t v = v0 + i * kPermuteThreads;
          if (v < vecs) dst[v] = buf[i];
        }
      }
      const int g = FindGroup(offs, num_experts, r);
      if (g >= 0) {
        for (int64_t kb = threadIdx.x; kb < kb_count; kb += kPermuteThreads) {
          const int64_t idx = GroupedScaleIndex(offs[g], offs[g + 1], r, kb, kb_count);
          const float sc = kb < kPermuteThreads ? first_scale : hidden_scale[kb * num_tokens + tok];
          if (idx >= 0 && idx < num_rows * kb_count) row_scales[idx] = sc;
        }
      }
    }
    slot = next_slot;
  }
}

ffi::Error PlanImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> local_ids,
                    ffi::Result<ffi::Buffer<ffi::S32>> offsets,
                    ffi::Result<ffi::Buffer<ffi::S32>> slot_to_row,
                    ffi::Result<ffi::Buffer<ffi::S32>> row_to_slot,
                    ffi::Result<ffi::Buffer<ffi::S32>> scratch, int32_t num_local_experts,
                    int32_t expert_offset, int32_t num_experts) {
  if (local_ids.dimensions().size() != 2) {
    return InvalidArgument("jax_moe_plan: local_ids: expected rank 2 [T, k], got rank " +
                           std::to_string(local_ids.dimensions().size()));
  }
  const int64_t n = static_cast<int64_t>(local_ids.element_count());
  const int64_t e = num_local_experts;
  JAX_MOE_RETURN_IF_ERROR(CheckPlanAttrs("jax_moe_plan", num_local_experts, expert_offset, num_experts, *offsets));
  if (n > 0x7fffffffLL) {
    return InvalidArgument("jax_moe_plan: local_ids: T*k must be < 2^31, got " + std::to_string(n));
  }
  JAX_MOE_RETURN_IF_ERROR(CheckShape(*slot_to_row, "slot_to_row (output)", {n}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(*row_to_slot, "row_to_slot (output)", {n}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(*scratch, "plan scratch (output)", {-1, e + 1}));
  const int64_t num_chunks = scratch->dimensions()[0];
  if (num_chunks < 1) return InvalidArgument("jax_moe_plan: plan scratch: needs at least 1 chunk");

  if (n == 0) {
    cudaError_t err = cudaMemsetAsync(offsets->typed_data(), 0, (e + 1) * sizeof(int32_t), stream);
    if (err != cudaSuccess) return CudaError(err, "jax_moe_plan memset");
    return ffi::Error::Success();
  }
  const int nb = static_cast<int>(e + 1);
  const LocalRange lr{expert_offset, num_experts};
  if (n <= kFusedMaxSlots) {  // scratch is left untouched
    const unsigned blocks = static_cast<unsigned>((n + kFusedChunk - 1) / kFusedChunk);
    cudaError_t err = LaunchKernel(PlanFusedKernel, dim3(blocks), dim3(kPlanThreads),
                                   (kPlanWarps + 2) * nb * sizeof(int), stream, StagePdl(), local_ids.typed_data(),
                                   n, static_cast<int>(e), lr, offsets->typed_data(), slot_to_row->typed_data(),
                                   row_to_slot->typed_data());
    if (err != cudaSuccess) return CudaError(err, "jax_moe_plan fused kernel launch");
    return ffi::Error::Success();
  }
  const int64_t chunk = (n + num_chunks - 1) / num_chunks;
  const int64_t used_chunks = (n + chunk - 1) / chunk;  // <= num_chunks
  int32_t* scr = scratch->typed_data();  // rows past used_chunks are left untouched
  PlanCountKernel<<<static_cast<unsigned>(used_chunks), kPlanThreads, nb * sizeof(int), stream>>>(
      local_ids.typed_data(), n, chunk, static_cast<int>(e), lr, scr);
  JAX_MOE_CHECK_LAUNCH("jax_moe_plan count kernel launch");
  PlanScanKernel<<<1, kScanThreads, 0, stream>>>(scr, static_cast<int>(used_chunks),
                                                  static_cast<int>(e), offsets->typed_data());
  JAX_MOE_CHECK_LAUNCH("jax_moe_plan scan kernel launch");
  PlanAssignKernel<<<static_cast<unsigned>(used_chunks), kPlanThreads,
                     (kPlanWarps + 1) * nb * sizeof(int), stream>>>(
      local_ids.typed_data(), n, chunk, static_cast<int>(e), lr, scr, offsets->typed_data(),
      slot_to_row->typed_data(), row_to_slot->typed_data());
  JAX_MOE_CHECK_LAUNCH("jax_moe_plan assign kernel launch");
  return ffi::Error::Success();
}

}  // namespace

ffi::Error CheckPlanAttrs(const char* op, int32_t num_local_experts, int32_t expert_offset, int32_t num_experts,
                          const ffi::Buffer<ffi::S32>& offsets) {
  const std::string o = op;
  if (num_local_experts < 1 || num_local_experts > kMaxLocalExperts) {
    return InvalidArgument(o + ": num_local_experts: expected a value in [1, " + std::to_string(kMaxLocalExperts) +
                           "], got " + std::to_string(num_local_experts));
  }
  if (expert_offset < 0 || num_experts < 0) {
    return InvalidArgument(o + ": expert_offset and num_experts must be >= 0, got " + std::to_string(expert_offset) +
                           " and " + std::to_string(num_experts));
  }
  return CheckShape(offsets, "expert_offsets (output)", {int64_t(num_local_experts) + 1});
}

ffi::Error PermuteStage(cudaStream_t stream, const ffi::AnyBuffer& hidden, const ffi::Buffer<ffi::F32>& hidden_scale,
                        const ffi::Buffer<ffi::S32>& slot_to_row, const ffi::Buffer<ffi::S32>& row_to_slot,
                        const ffi::Buffer<ffi::S32>& offsets, ffi::AnyBuffer& rows,
                        ffi::Buffer<ffi::F32>& row_scales, int32_t top_k, ZeroInts zero) {
  if (!IsFp8E4M3(hidden)) {
    return InvalidArgument("jax_moe_permute: hidden_states: expected dtype float8_e4m3fn, got dtype code " +
                           std::to_string(static_cast<int>(hidden.element_type())));
  }
  if (!IsFp8E4M3(rows)) {
    return InvalidArgument("jax_moe_permute: rows (output): expected dtype float8_e4m3fn");
  }
  if (hidden.dimensions().size() != 2) {
    return InvalidArgument("jax_moe_permute: hidden_states: expected rank 2 [T, H], got rank " +
                           std::to_string(hidden.dimensions().size()));
  }
  const int64_t t = Dim(hidden, 0);
  const int64_t h = Dim(hidden, 1);
  if (h % 128 != 0) {
    return InvalidArgument("jax_moe_permute: hidden_states: H must be a multiple of 128, got " +
                           std::to_string(h));
  }
  if (top_k < 1) {
    return InvalidArgument("jax_moe_permute: top_k: expected >= 1, got " + std::to_string(top_k));
  }
  const int64_t m = t * top_k;
  if (m > 0x7fffffffLL) return InvalidArgument("jax_moe_permute: T*k must be < 2^31");
  JAX_MOE_RETURN_IF_ERROR(CheckShape(hidden_scale, "hidden_states_scale", {h / 128, t}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(slot_to_row, "slot_to_row", {m}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(row_to_slot, "row_to_slot", {m}));
  int e = 0;
  JAX_MOE_RETURN_IF_ERROR(CheckOffsets(offsets, "jax_moe_permute", kMaxLocalExperts, &e));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(rows, "rows (output)", {m, h}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(row_scales, "row_scales (output)", {m * h / 128}));
  if (m == 0 || h == 0) return ffi::Error::Success();

  const auto* hidden_bytes = static_cast<const uint8_t*>(hidden.untyped_data());
  auto* row_bytes = static_cast<uint8_t*>(rows.untyped_data());
  if (m < kPermuteTokenMajorSlots) {
    const unsigned grid = GridStrideBlocks(m, 1, kPermuteBlocksPerSm);  // a block per row
    cudaError_t err = LaunchKernel(PermuteRowsKernel, dim3(grid), dim3(kPermuteThreads), (e + 1) * sizeof(int),
                                   stream, StagePdl(), hidden_bytes, hidden_scale.typed_data(),
                                   row_to_slot.typed_data(), offsets.typed_data(), e, t, int(top_k), h, row_bytes,
                                   row_scales.typed_data(), zero);
    if (err != cudaSuccess) return CudaError(err, "jax_moe_permute row kernel launch");
  } else {
    const unsigned grid = GridStrideBlocks(t, 1, kPermuteBlocksPerSm);  // a block per token
    const size_t smem = (e + 1 + 2 * static_cast<size_t>(top_k)) * sizeof(int);
    if (smem > 48 * 1024) return InvalidArgument("jax_moe_permute: top_k: too large, got " + std::to_string(top_k));
    if (PermuteScalesSmem(t, e) > kScaleMaxSmem || m * (h / 128) > 0x7fffffffLL) {  // the token kernel writes the scales too
      PermuteTokensKernel<true><<<grid, kPermuteThreads, smem, stream>>>(
          hidden_bytes, hidden_scale.typed_data(), slot_to_row.typed_data(), offsets.typed_data(), e, t, top_k, h,
          row_bytes, row_scales.typed_data(), zero);
    } else {  // the data, then the scales as its PDL dependent (the last kernel: it zeroes the counter)
      PermuteTokensKernel<false><<<grid, kPermuteThreads, smem, stream>>>(  // no scale pointers: it reads none
          hidden_bytes, nullptr, slot_to_row.typed_data(), offsets.typed_data(), e, t, top_k, h, row_bytes, nullptr,
          ZeroInts{});
      JAX_MOE_CHECK_LAUNCH("jax_moe_permute token kernel launch");
      cudaError_t err = LaunchPermuteScales(stream, hidden_scale.typed_data(), row_to_slot.typed_data(),
                                            offsets.typed_data(), e, static_cast<int>(t), top_k,
                                            static_cast<int>(h / 128), row_scales.typed_data(), zero);
      if (err != cudaSuccess) return CudaError(err, "jax_moe_permute scale kernel launch");
    }
  }
  JAX_MOE_CHECK_LAUNCH("jax_moe_permute kernel launch");
  return ffi::Error::Success();
}

namespace {

ffi::Error PermuteImpl(cudaStream_t stream, ffi::AnyBuffer hidden, ffi::Buffer<ffi::F32> hidden_scale,
                       ffi::Buffer<ffi::S32> slot_to_row, ffi::Buffer<ffi::S32> row_to_slot,
                       ffi::Buffer<ffi::S32> offsets, ffi::Result<ffi::AnyBuffer> rows,
                       ffi::Result<ffi::Buffer<ffi::F32>> row_scales, int32_t top_k) {
  return PermuteStage(stream, hidden, hidden_scale, slot_to_row, row_to_slot, offsets, *rows, *row_scales, top_k);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(PlanHandler, PlanImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::Buffer<ffi::S32>>()   // local_ids [T, k]
                           .Ret<ffi::Buffer<ffi::S32>>()   // expert_offsets [E_loc + 1]
                           .Ret<ffi::Buffer<ffi::S32>>()   // slot_to_row [T*k]
                           .Ret<ffi::Buffer<ffi::S32>>()   // row_to_slot [T*k]
                           .Ret<ffi::Buffer<ffi::S32>>()   // scratch [chunks, E_loc + 1]
                           .Attr<int32_t>("num_local_experts")
                           .Attr<int32_t>("expert_offset")   // local id = id - expert_offset
                           .Attr<int32_t>("num_experts"),    // > 0: ids outside [0, E) not local
                       {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER(PermuteHandler, PermuteImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()           // hidden_states fp8 [T, H]
                           .Arg<ffi::Buffer<ffi::F32>>()    // hidden_states_scale [H/128, T]
                           .Arg<ffi::Buffer<ffi::S32>>()    // slot_to_row [T*k]
                           .Arg<ffi::Buffer<ffi::S32>>()    // row_to_slot [T*k]
                           .Arg<ffi::Buffer<ffi::S32>>()    // expert_offsets [E_loc + 1]
                           .Ret<ffi::AnyBuffer>()           // rows fp8 [T*k, H]
                           .Ret<ffi::Buffer<ffi::F32>>()    // row scales [T*k*H/128]
                           .Attr<int32_t>("top_k"),
                       {ffi::Traits::kCmdBufferCompatible});

JAX_MOE_REGISTER_TARGET("jax_moe_plan", PlanHandler);
JAX_MOE_REGISTER_TARGET("jax_moe_permute", PermuteHandler);

}  // namespace jax_moe
