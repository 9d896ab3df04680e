// The plan's block-level pieces (see permute.cu), shared by jax_moe_plan's kernels and the
// decode-size jax_moe_route_plan kernel (routing.cu). Every function here is called by all
// kPlanThreads threads of a block.
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>
#include <cstdint>

#include "ffi_common.h"

namespace jax_moe {
namespace plan_block {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxLocalExperts = 512;
constexpr int kPlanThreads = 256;
constexpr int kPlanWarps = kPlanThreads / 32;
// PlanChunk: slots per chunk (one round of AssignChunk) and the scan's items per thread
constexpr int kFusedChunk = kPlanThreads;
constexpr int kScanItems = (kMaxLocalExperts + 1 + kPlanThreads - 1) / kPlanThreads;

// Which ids are local: id - offset in [0, E), and id in [0, num_global) when num_global > 0.
struct LocalRange {
  int32_t offset;
  int32_t num_global;
};

__device__ __forceinline__ int Bucket(int32_t id, int num_experts, LocalRange lr) {
  if (lr.num_global > 0 && (id < 0 || id >= lr.num_global)) return num_experts;
  const int64_t local = static_cast<int64_t>(id) - lr.offset;
  return (local >= 0 && local < num_experts) ? static_cast<int>(local) : num_experts;
}

// Adds the bucket counts of slots [begin, end) to the shared-memory histogram `hist` [E + 1]:
// a shared atomic per local slot, the non-local ones (bucket E: most slots of an expert-parallel
// slice) summed per warp first. (A warp match_any per round, which aggregates every bucket,
// costs several times more: the fused plan kernel counts all slots in every block.) Each thread
// loads kBatch ids before its first atomic, so the loads of a batch are in flight together.
__device__ __forceinline__ void CountChunk(const int32_t* __restrict__ ids, int64_t begin,
                                           int64_t end, int num_experts, LocalRange lr, int* hist) {
  constexpr int kBatch = 8;
  int not_local = 0;
  for (int64_t base = begin; base < end; base += int64_t(kBatch) * blockDim.x) {  // uniform
    int b[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t s = base + int64_t(u) * blockDim.x + threadIdx.x;
      b[u] = s < end ? Bucket(ids[s], num_experts, lr) : -1;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (b[u] >= 0 && b[u] < num_experts) atomicAdd(&hist[b[u]], 1);
      else if (b[u] == num_experts) ++not_local;
    }
  }
  not_local = __reduce_add_sync(kFull, not_local);  // every lane is here: the loop has no sync
  if ((threadIdx.x & 31) == 0 && not_local > 0) atomicAdd(&hist[num_experts], not_local);
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

// Count, scan and assign of chunk `chunk` (kFusedChunk slots) of num_slots slots by one block,
// which first counts every slot itself, those before its chunk and the rest, so no block waits
// for another; chunk 0 also writes the offsets. `smem`: PlanChunkSmemInts(num_experts) ints of
// dynamic shared memory. jax_moe_plan's fused kernel runs one block per chunk up to 8192 slots;
// jax_moe_route_plan one block in all (<= kFusedChunk slots), on ids in shared memory.
__host__ __device__ constexpr int PlanChunkSmemInts(int num_experts) {
  return (kPlanWarps + 2) * (num_experts + 1);
}

__device__ __forceinline__ void PlanChunk(const int32_t* __restrict__ ids, int64_t num_slots, int64_t chunk,
                                          int num_experts, LocalRange lr, int* smem,
                                          int32_t* __restrict__ offsets, int32_t* __restrict__ slot_to_row,
                                          int32_t* __restrict__ row_to_slot) {
  using Scan = cub::BlockScan<int, kPlanThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int nb = num_experts + 1;
  int* before = smem;          // [nb] slots of each bucket before this chunk, then its next free row
  int* rest = smem + nb;       // [nb] slots of each bucket from this chunk on
  int* table = smem + 2 * nb;  // [kPlanWarps][nb]
  for (int i = threadIdx.x; i < PlanChunkSmemInts(num_experts); i += blockDim.x) smem[i] = 0;
  __syncthreads();
  const int64_t begin = chunk * kFusedChunk;
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
      if (chunk == 0) offsets[b] = items[i];
    }
  }
  __syncthreads();
  AssignChunk(ids, num_slots, begin, end, num_experts, lr, before, table, slot_to_row,
              row_to_slot);
}

}  // namespace plan_block
}  // namespace jax_moe
