// jax_moe_route: top-k routing of SPEC section 2, one warp per token.
//
// Expert e of a token lives in lane e % 32, register slot e / 32. Values compare through their
// ordered bits (an unsigned integer order equal to the float order), so a selection is a warp
// max of values, then of ~index among the lanes holding the max: a larger value wins and, on
// equal values, the smaller expert index wins. NaN ranks above every number (as
// lax.top_k does); -0 and +0 compare equal. Everything stays inside the token's warp, so a NaN
// row cannot affect another row.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ffi_common.h"
#include "stages.h"

namespace jax_moe {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxExperts = 512;
constexpr int kWarpsPerBlock = 4;

enum Method : int {
  kDefault = 0,
  kRenormalize = 1,
  kDeepSeekV3 = 2,
  kLlama4 = 3,
  kRenormalizeNaive = 4,
  kTopK = 5,
  kSigmoidRenorm = 6,
  kMiniMax2 = 7,
  kSigmoid = 8,
  kTopKSigmoid = 9,
};

struct RouteParams {
  int num_tokens, num_experts, top_k, method, n_group, topk_group;
  float rsf;
};

__device__ __forceinline__ float Sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ uint32_t OrderedBits(float v) {
  if (v != v) return 0xffffffffu;  // NaN first
  if (v == 0.0f) v = 0.0f;         // -0 == +0
  uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float FromOrderedBits(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// Valid keys are > 0 (the ordered bits of -inf are 0x007fffff); 0 means "not a candidate".
__device__ __forceinline__ uint64_t MakeKey(float v, int idx) {
  return (static_cast<uint64_t>(OrderedBits(v)) << 32) | static_cast<uint32_t>(~idx);
}


__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// S: register slots per lane (experts per lane), E <= 32 * S.
template <typename LogitT, int S>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    RouteKernel(const LogitT* __restrict__ logits, const float* __restrict__ bias,
                int32_t* __restrict__ ids_out, __nv_bfloat16* __restrict__ w_out, RouteParams p) {
  GridDependencyWait();     // launched early (RoutePdl): the kernel before may still run
  GridDependencyTrigger();  // the plan (a PDL dependent, StagePdl) may start; it waits for this grid
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= p.num_tokens) return;  // uniform per warp
  const int E = p.num_experts;
  const int k = p.top_k;
  const LogitT* row = logits + t * E;

  float sel[S];  // value the selection ranks
  float aux[S];  // value the weight is computed from
  float bias_e[S];  // the expert's bias, loaded with the logits (one memory round trip, not two)
  uint32_t present = 0;  // bit i: slot i holds an expert

#pragma unroll
  for (int i = 0; i < S; ++i) {
    int e = i * 32 + lane;
    float l = 0.0f, b = 0.0f;
    if (e < E) {
      l = ToFloat(row[e]);
      b = bias[e];
      present |= 1u << i;
    }
    sel[i] = l;
    aux[i] = l;
    bias_e[i] = b;
  }

  switch (p.method) {
    case kDefault:
    case kRenormalizeNaive: {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < S; ++i)
        if (present & (1u << i)) mx = fmaxf(mx, sel[i]);
      mx = WarpMax(mx);
      float ex[S];
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < S; ++i) {
        ex[i] = (present & (1u << i)) ? expf(sel[i] - mx) : 0.0f;
        sum += ex[i];
      }
      sum = WarpSum(sum);
#pragma unroll
      for (int i = 0; i < S; ++i) {
        sel[i] = ex[i] / sum;
        aux[i] = sel[i];
      }
      break;
    }
    case kDeepSeekV3:
    case kMiniMax2:
#pragma unroll
      for (int i = 0; i < S; ++i) {
        float s = Sigmoid(sel[i]);
        aux[i] = s;
        sel[i] = (present & (1u << i)) ? s + bias_e[i] : 0.0f;
      }
      break;
    case kSigmoidRenorm:
    case kSigmoid:
#pragma unroll
      for (int i = 0; i < S; ++i) {
        sel[i] = Sigmoid(sel[i]);
        aux[i] = sel[i];
      }
      break;
    default:  // Renormalize, Llama4, TopK, TopKSigmoid: select on the logits themselves
      break;
  }

  // Candidates as ordered value bits, built once; 0 = not a candidate (absent or masked).
  uint32_t cand[S];
#pragma unroll
  for (int i = 0; i < S; ++i) cand[i] = (present & (1u << i)) ? OrderedBits(sel[i]) : 0u;

  // DeepSeekV3 group-limited selection: group score = sum of the 2 largest biased scores
  // (as a multiset: two equal maxima both count; NaN scores are skipped).
  if (p.method == kDeepSeekV3 && p.n_group > 1) {
    const int pg = E / p.n_group;
    float gscore[8];
    if (pg == 32) {
      // Group g is register slot g of every lane (DeepSeek-V3: 256 experts, 8 groups): its top
      // two are one warp max, a ballot for a tie at the max, and a second warp max. Every slot's
      // group is scored unconditionally (no branch on n_group), so the groups' warp reductions
      // overlap; groups >= n_group are dropped by their keys below.
#pragma unroll
      for (int g = 0; g < 8; ++g) {
        float b1 = -INFINITY, b2 = -INFINITY;
        if (g < S) {  // compile-time
          const float v = sel[g < S ? g : 0];
          const uint32_t ob = OrderedBits(v != v ? -INFINITY : v);
          const uint32_t m1 = __reduce_max_sync(kFull, ob);
          const uint32_t m2 = __popc(__ballot_sync(kFull, ob == m1)) > 1
                                  ? m1
                                  : __reduce_max_sync(kFull, ob == m1 ? 0u : ob);
          b1 = FromOrderedBits(m1);
          b2 = FromOrderedBits(m2);
        }
        gscore[g] = b1 + b2;
      }
    } else {
      int grp[S];
#pragma unroll
      for (int i = 0; i < S; ++i) grp[i] = (i * 32 + lane) / pg;
#pragma unroll
      for (int g = 0; g < 8; ++g) {
        float b1 = -INFINITY, b2 = -INFINITY;
        if (g < p.n_group) {  // uniform across the warp
#pragma unroll
          for (int i = 0; i < S; ++i) {
            if ((present & (1u << i)) && grp[i] == g) {
              const float v = sel[i];
              if (v > b1) {
                b2 = b1;
                b1 = v;
              } else if (v > b2) {
                b2 = v;
              }
            }
          }
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) {
            const float o1 = __shfl_xor_sync(kFull, b1, o);
            const float o2 = __shfl_xor_sync(kFull, b2, o);
            const float n2 = fmaxf(fminf(b1, o1), fmaxf(b2, o2));
            b1 = fmaxf(b1, o1);
            b2 = n2;
          }
        }
        gscore[g] = pg >= 2 ? b1 + b2 : b1;
      }
    }
    // Keep the topk_group best groups, ties to the lower group (every lane computes the same).
    uint64_t gkey[8];
#pragma unroll
    for (int g = 0; g < 8; ++g) gkey[g] = g < p.n_group ? MakeKey(gscore[g], g) : 0;
    uint32_t kept = 0;
    for (int r = 0; r < p.topk_group; ++r) {
      uint64_t best = 0;
      int best_g = 0;
#pragma unroll
      for (int g = 0; g < 8; ++g) {
        if (!(kept & (1u << g)) && gkey[g] > best) {
          best = gkey[g];
          best_g = g;
        }
      }
      kept |= 1u << best_g;
    }
#pragma unroll
    for (int i = 0; i < S; ++i) {
      const int grp = (i * 32 + lane) / pg;
      if (grp >= 8 || !(kept & (1u << grp))) cand[i] = 0;
    }
  }

  // Iterative top-k: lane j keeps the j-th selection. Per round each lane offers its best
  // untaken candidate (strict > in slot order: on a tie, the lower slot, i.e. the lower expert);
  // the warp maximum of the values and then, among the lanes holding that value, of ~expert
  // (the smaller expert wins) are two redux.sync instructions; the winner's lane hands over
  // its aux value.
  int my_id = 0;
  float my_val = 0.0f;
  uint32_t taken = 0;  // bit i: slot i already selected (a mask keeps cand[] in registers)
  for (int j = 0; j < k; ++j) {
    uint32_t best = 0;
    int best_slot = 0;
    float val = 0.0f;
#pragma unroll
    for (int i = 0; i < S; ++i) {
      const uint32_t c = (taken & (1u << i)) ? 0u : cand[i];
      if (c > best) {
        best = c;
        best_slot = i;
        val = aux[i];
      }
    }
    const uint32_t max_val = __reduce_max_sync(kFull, best);
    const uint32_t not_id = (best != 0 && best == max_val) ? ~static_cast<uint32_t>(best_slot * 32 + lane) : 0u;
    const uint32_t max_not_id = __reduce_max_sync(kFull, not_id);
    int id = max_val ? static_cast<int>(~max_not_id) : 0;  // no candidate: impossible for valid parameters
    if (id < 0 || id >= E) id = 0;
    val = __shfl_sync(kFull, val, id & 31);
    if ((id & 31) == lane) taken |= 1u << (id >> 5);
    if (lane == j) {
      my_id = id;
      my_val = val;
    }
  }

  // Weights.
  float w = my_val;
  switch (p.method) {
    case kRenormalize: {
      float mx = __shfl_sync(kFull, my_val, 0);
      float ex = (lane < k) ? expf(my_val - mx) : 0.0f;
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) sum += __shfl_sync(kFull, ex, j);
      w = ex / sum;
      break;
    }
    case kRenormalizeNaive: {
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) sum += __shfl_sync(kFull, my_val, j);
      w = my_val / sum;
      break;
    }
    case kSigmoidRenorm: {
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) sum += __shfl_sync(kFull, my_val, j);
      w = my_val / fmaxf(sum, 1e-20f);
      break;
    }
    case kDeepSeekV3:
    case kMiniMax2: {
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) sum += __shfl_sync(kFull, my_val, j);
      w = my_val / (sum + 1e-20f) * p.rsf;
      break;
    }
    case kLlama4:
    case kTopKSigmoid:
      w = Sigmoid(my_val);
      break;
    default:  // Default, TopK, Sigmoid: the selected value itself
      break;
  }
  if (lane < k) {
    ids_out[t * k + lane] = my_id;
    w_out[t * k + lane] = __float2bfloat16_rn(w);
  }
}

// The plan of one token's k slots (jax_moe_route_plan): where RouteGroupsKernel writes it too,
// the same offsets [E_loc + 1], slot_to_row and row_to_slot [k] as jax_moe_plan (permute.cu).
struct PlanOut {
  int32_t* offsets;
  int32_t* slot_to_row;
  int32_t* row_to_slot;
  int num_local;  // E_loc, as jax_moe_plan's num_local_experts
  LocalRange lr;  // which ids are local, as jax_moe_plan's
};

// DeepSeek-V3 routing with groups of 32 experts (E = 32 x n_group, n_group <= 8) for small
// batches: one block per token, one warp per group, expert e in warp e / 32, lane e % 32. The
// one-warp kernel above runs ~1.9 k mostly dependent instructions per token (ncu, H100: 5.1
// cycles each, ~4.8 us at T=1 -- the whole decode op waits on it); here each warp scores its
// group in parallel and the top-k is one rank count instead of k rounds of warp reductions.
// The same float operations on the same values and the same orders (value, then the lower
// index; NaN first) as RouteKernel, so the same ids and weight bits (tests/test_gpu_stages.py).
// kPlan (one token, jax_moe_route_plan): the block also writes the plan of the token's k slots
// (PlanOut), which saves the plan kernel's launch, grid-dependency wait and reload of the ids on
// the decode op's path to its first weight load.
template <typename LogitT, bool kPlan>
__global__ void __launch_bounds__(256)
    RouteGroupsKernel(const LogitT* __restrict__ logits, const float* __restrict__ bias,
                      int32_t* __restrict__ ids_out, __nv_bfloat16* __restrict__ w_out, RouteParams p,
                      PlanOut q) {
  GridDependencyWait();  // as RouteKernel's
  GridDependencyTrigger();
  __shared__ int bucket[8];  // kPlan: the plan bucket of each slot
  __shared__ float group_score[8];
  __shared__ __align__(16) uint64_t key[8][32];  // the biased score's ordered bits, then ~expert
  __shared__ int32_t chosen_id[8];
  __shared__ float chosen_score[8];  // the unbiased score the weight is computed from
  const int lane = threadIdx.x & 31, g = threadIdx.x >> 5;
  const int64_t t = blockIdx.x;
  const int E = p.num_experts, k = p.top_k, n_group = p.n_group;
  const int e = g * 32 + lane;  // < E: the block has E threads
  const float score = Sigmoid(ToFloat(logits[t * E + e]));
  const float biased = score + bias[e];
  if (threadIdx.x < 8) {  // no candidate: impossible for valid parameters (as in RouteKernel)
    chosen_id[threadIdx.x] = 0;
    chosen_score[threadIdx.x] = 0.0f;
  }
  {  // group score: the sum of the group's 2 largest biased scores (NaN skipped), as RouteKernel
    const uint32_t ob = OrderedBits(biased != biased ? -INFINITY : biased);
    const uint32_t m1 = __reduce_max_sync(kFull, ob);
    const uint32_t m2 = __popc(__ballot_sync(kFull, ob == m1)) > 1 ? m1
                                                                    : __reduce_max_sync(kFull, ob == m1 ? 0u : ob);
    if (lane == 0) group_score[g] = FromOrderedBits(m1) + FromOrderedBits(m2);
  }
  key[g][lane] = MakeKey(biased, e);
  __syncthreads();
  // The topk_group best groups (ties to the lower group): lane h < n_group ranks group h.
  const int h = lane & 7;
  const uint64_t key_h = h < n_group ? MakeKey(group_score[h], h) : 0;
  int group_rank = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < n_group) group_rank += MakeKey(group_score[j], j) > key_h;
  const uint32_t kept = __ballot_sync(kFull, lane < n_group && group_rank < p.topk_group) & 0xffu;
  if (kept & (1u << g)) {
    // This expert's rank among the kept groups' experts; the k best take output slots 0..k-1.
    const uint64_t mine = key[g][lane];
    int rank = 0;
    for (uint32_t rest = kept; rest != 0; rest &= rest - 1) {
      const ulonglong2* row = reinterpret_cast<const ulonglong2*>(key[__ffs(rest) - 1]);
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const ulonglong2 two = row[j];
        rank += (two.x > mine) + (two.y > mine);
      }
    }
    if (rank < k) {
      chosen_id[rank] = e;
      chosen_score[rank] = score;
    }
  }
  __syncthreads();
  if (g == 0) {
    const int id = lane < k ? chosen_id[lane] : 0;
    const float my_val = lane < k ? chosen_score[lane] : 0.0f;
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += __shfl_sync(kFull, my_val, j);
    if (lane < k) {
      ids_out[t * k + lane] = id;
      w_out[t * k + lane] = __float2bfloat16_rn(my_val / (sum + 1e-20f) * p.rsf);
      if (kPlan) bucket[lane] = Bucket(id, q.num_local, q.lr);
    }
  }
  if (!kPlan) return;
  __syncthreads();
  // offsets[b]: the slots in buckets below b (offsets[E_loc]: the local ones); slot j's row: its
  // bucket's offset plus the earlier slots of that bucket (non-local slots after the local
  // rows, in slot order; slot_to_row -1 and row_to_slot -1 for them)
  for (int b = threadIdx.x; b <= q.num_local; b += blockDim.x) {
    int below = 0;
    for (int j = 0; j < k; ++j) below += bucket[j] < b;
    q.offsets[b] = below;
  }
  if (threadIdx.x < k) {
    const int j = threadIdx.x, b = bucket[j];
    int row = 0;
    for (int i = 0; i < k; ++i) row += bucket[i] < b || (bucket[i] == b && i < j);
    const bool local = b < q.num_local;
    q.slot_to_row[j] = local ? row : -1;
    q.row_to_slot[row] = local ? j : -1;
  }
}

// RouteGroupsKernel is used up to this many tokens (beyond, the one-warp kernel's 4 tokens per
// block fill the GPU with fewer threads); $JAX_MOE_ROUTE_GROUPS=off (read once per process)
// keeps the one-warp kernel everywhere, for A/B runs.
constexpr int64_t kRouteGroupsMaxTokens = 128;
inline bool RouteGroupsEnabled() {
  static const bool enabled = !EnvSwitchedOff("JAX_MOE_ROUTE_GROUPS");
  return enabled;
}

template <typename LogitT, int S>
void LaunchRoute(cudaStream_t stream, const void* logits, const float* bias, int32_t* ids,
                 __nv_bfloat16* w, const RouteParams& p) {
  LaunchKernel(RouteKernel<LogitT, S>, dim3(CeilDiv(p.num_tokens, kWarpsPerBlock)), kWarpsPerBlock * 32, 0, stream,
               RoutePdl(), static_cast<const LogitT*>(logits), bias, ids, w, p);
}

template <typename LogitT>
void DispatchRoute(cudaStream_t stream, const void* logits, const float* bias, int32_t* ids,
                   __nv_bfloat16* w, const RouteParams& p) {
  const int e = p.num_experts;
  if (p.method == kDeepSeekV3 && p.n_group > 1 && e == 32 * p.n_group &&
      p.num_tokens <= kRouteGroupsMaxTokens && RouteGroupsEnabled()) {
    LaunchKernel(RouteGroupsKernel<LogitT, false>, p.num_tokens, e, 0, stream, RoutePdl(),
                 static_cast<const LogitT*>(logits), bias, ids, w, p, PlanOut{});
    return;
  }
  if (e <= 32) LaunchRoute<LogitT, 1>(stream, logits, bias, ids, w, p);
  else if (e <= 64) LaunchRoute<LogitT, 2>(stream, logits, bias, ids, w, p);
  else if (e <= 128) LaunchRoute<LogitT, 4>(stream, logits, bias, ids, w, p);
  else if (e <= 256) LaunchRoute<LogitT, 8>(stream, logits, bias, ids, w, p);
  else LaunchRoute<LogitT, 16>(stream, logits, bias, ids, w, p);
}

// The checks jax_moe_route and jax_moe_route_plan share: the logits, bias and outputs, and the
// routing parameters; `p` gets them.
ffi::Error CheckRoute(const char* op, const ffi::AnyBuffer& logits, const ffi::Buffer<ffi::F32>& bias,
                      const ffi::Buffer<ffi::S32>& ids, const ffi::Buffer<ffi::BF16>& weights, int32_t top_k,
                      int32_t routing_method, int32_t n_group, int32_t topk_group, float routed_scaling_factor,
                      RouteParams* p) {
  const std::string o = op;
  const auto ltype = logits.element_type();
  if (ltype != ffi::DataType::F32 && ltype != ffi::DataType::BF16) {
    return InvalidArgument(o + ": routing_logits: expected dtype float32 or bfloat16, got "
                           "dtype code " + std::to_string(static_cast<int>(ltype)));
  }
  if (logits.dimensions().size() != 2) {
    return InvalidArgument(o + ": routing_logits: expected rank 2 [T, E], got rank " +
                           std::to_string(logits.dimensions().size()));
  }
  const int64_t T = Dim(logits, 0);
  const int64_t E = Dim(logits, 1);
  if (E < 1 || E > kMaxExperts) {
    return InvalidArgument(o + ": routing_logits: number of experts must be in [1, " +
                           std::to_string(kMaxExperts) + "], got " + std::to_string(E));
  }
  if (T > 0x7fffffffLL) return InvalidArgument(o + ": routing_logits: too many tokens");
  if (routing_method < 0 || routing_method > 9) {
    return InvalidArgument(o + ": routing_method: expected a value in [0, 9], got " +
                           std::to_string(routing_method));
  }
  const int max_k = routing_method == kDeepSeekV3 ? 8 : 32;
  if (top_k < 1 || top_k > max_k || top_k > E) {
    return InvalidArgument(o + ": top_k: expected 1 <= top_k <= min(E=" + std::to_string(E) + ", " +
                           std::to_string(max_k) + ") for this routing method, got " + std::to_string(top_k));
  }
  if (routing_method == kLlama4 && top_k != 1) {
    return InvalidArgument(o + ": top_k: Llama4 routing needs top_k == 1, got " + std::to_string(top_k));
  }
  if (n_group < 1 || E % n_group != 0) {
    return InvalidArgument(o + ": n_group: expected a divisor of E=" + std::to_string(E) + ", got " +
                           std::to_string(n_group));
  }
  if (routing_method == kDeepSeekV3 && n_group > 1) {
    const int64_t pg = E / n_group;
    if (n_group > 8) {
      return InvalidArgument(o + ": n_group: at most 8 groups supported, got " + std::to_string(n_group));
    }
    if (pg > 32) {
      return InvalidArgument(o + ": n_group: at most 32 experts per group supported, got " + std::to_string(pg));
    }
    if (topk_group < 1 || topk_group > n_group) {
      return InvalidArgument(o + ": topk_group: expected 1 <= topk_group <= n_group=" + std::to_string(n_group) +
                             ", got " + std::to_string(topk_group));
    }
    if (top_k > topk_group * pg) {
      return InvalidArgument(o + ": top_k: expected top_k <= topk_group * E / n_group = " +
                             std::to_string(topk_group * pg) + ", got " + std::to_string(top_k));
    }
  }
  JAX_MOE_RETURN_IF_ERROR(CheckShape(bias, "routing_bias", {E}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(ids, "topk_ids (output)", {T, top_k}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(weights, "topk_weights (output)", {T, top_k}));
  *p = RouteParams{static_cast<int>(T), static_cast<int>(E), top_k, routing_method,
                   n_group, topk_group, routed_scaling_factor};
  return ffi::Error::Success();
}

ffi::Error RouteImpl(cudaStream_t stream, ffi::AnyBuffer logits, ffi::Buffer<ffi::F32> bias,
                     ffi::Result<ffi::Buffer<ffi::S32>> ids,
                     ffi::Result<ffi::Buffer<ffi::BF16>> weights, int32_t top_k,
                     int32_t routing_method, int32_t n_group, int32_t topk_group,
                     float routed_scaling_factor) {
  RouteParams p;
  JAX_MOE_RETURN_IF_ERROR(CheckRoute("jax_moe_route", logits, bias, *ids, *weights, top_k, routing_method,
                                     n_group, topk_group, routed_scaling_factor, &p));
  if (p.num_tokens == 0) return ffi::Error::Success();
  auto* w = reinterpret_cast<__nv_bfloat16*>(weights->typed_data());
  if (logits.element_type() == ffi::DataType::F32) {
    DispatchRoute<float>(stream, logits.untyped_data(), bias.typed_data(), ids->typed_data(), w, p);
  } else {
    DispatchRoute<__nv_bfloat16>(stream, logits.untyped_data(), bias.typed_data(),
                                 ids->typed_data(), w, p);
  }
  JAX_MOE_CHECK_LAUNCH("jax_moe_route kernel launch");
  return ffi::Error::Success();
}

// jax_moe_route_plan: jax_moe_route and then jax_moe_plan of its ids, in one kernel, for one
// token with DeepSeek-V3 routing over groups of 32 experts (RouteGroupsKernel<kPlan>): the same
// ids, weights, offsets, slot_to_row and row_to_slot bits as the two calls.
ffi::Error RoutePlanImpl(cudaStream_t stream, ffi::AnyBuffer logits, ffi::Buffer<ffi::F32> bias,
                         ffi::Result<ffi::Buffer<ffi::S32>> ids, ffi::Result<ffi::Buffer<ffi::BF16>> weights,
                         ffi::Result<ffi::Buffer<ffi::S32>> offsets, ffi::Result<ffi::Buffer<ffi::S32>> slot_to_row,
                         ffi::Result<ffi::Buffer<ffi::S32>> row_to_slot, int32_t top_k, int32_t routing_method,
                         int32_t n_group, int32_t topk_group, float routed_scaling_factor,
                         int32_t num_local_experts, int32_t expert_offset, int32_t num_experts) {
  const char* o = "jax_moe_route_plan";
  RouteParams p;
  JAX_MOE_RETURN_IF_ERROR(CheckRoute(o, logits, bias, *ids, *weights, top_k, routing_method, n_group, topk_group,
                                     routed_scaling_factor, &p));
  if (p.num_tokens != 1) {
    return InvalidArgument(std::string(o) + ": routing_logits: expected one token, got T=" +
                           std::to_string(p.num_tokens));
  }
  if (p.method != kDeepSeekV3 || p.n_group < 2 || p.num_experts != 32 * p.n_group) {
    return InvalidArgument(std::string(o) + ": routing_method: expected DeepSeekV3 with groups of 32 experts, got "
                           "method " + std::to_string(p.method) + ", E=" + std::to_string(p.num_experts) +
                           ", n_group=" + std::to_string(p.n_group));
  }
  JAX_MOE_RETURN_IF_ERROR(CheckPlanAttrs(o, num_local_experts, expert_offset, num_experts, *offsets));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(*slot_to_row, "slot_to_row (output)", {top_k}));
  JAX_MOE_RETURN_IF_ERROR(CheckShape(*row_to_slot, "row_to_slot (output)", {top_k}));
  const PlanOut q{offsets->typed_data(), slot_to_row->typed_data(), row_to_slot->typed_data(), num_local_experts,
                  LocalRange{expert_offset, num_experts}};
  auto* w = reinterpret_cast<__nv_bfloat16*>(weights->typed_data());
  const cudaError_t err =
      logits.element_type() == ffi::DataType::F32
          ? LaunchKernel(RouteGroupsKernel<float, true>, 1, p.num_experts, 0, stream, RoutePdl(),
                         static_cast<const float*>(logits.untyped_data()), bias.typed_data(), ids->typed_data(), w,
                         p, q)
          : LaunchKernel(RouteGroupsKernel<__nv_bfloat16, true>, 1, p.num_experts, 0, stream, RoutePdl(),
                         static_cast<const __nv_bfloat16*>(logits.untyped_data()), bias.typed_data(),
                         ids->typed_data(), w, p, q);
  if (err != cudaSuccess) return CudaError(err, o, "kernel launch");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(RouteHandler, RouteImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()            // routing_logits [T, E]
                           .Arg<ffi::Buffer<ffi::F32>>()     // routing_bias [E]
                           .Ret<ffi::Buffer<ffi::S32>>()     // topk_ids [T, k]
                           .Ret<ffi::Buffer<ffi::BF16>>()    // topk_weights [T, k]
                           .Attr<int32_t>("top_k")
                           .Attr<int32_t>("routing_method")
                           .Attr<int32_t>("n_group")
                           .Attr<int32_t>("topk_group")
                           .Attr<float>("routed_scaling_factor"),
                       {ffi::Traits::kCmdBufferCompatible});

JAX_MOE_REGISTER_TARGET("jax_moe_route", RouteHandler);

XLA_FFI_DEFINE_HANDLER(RoutePlanHandler, RoutePlanImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()            // routing_logits [1, E]
                           .Arg<ffi::Buffer<ffi::F32>>()     // routing_bias [E]
                           .Ret<ffi::Buffer<ffi::S32>>()     // topk_ids [1, k]
                           .Ret<ffi::Buffer<ffi::BF16>>()    // topk_weights [1, k]
                           .Ret<ffi::Buffer<ffi::S32>>()     // expert_offsets [E_loc + 1]
                           .Ret<ffi::Buffer<ffi::S32>>()     // slot_to_row [k]
                           .Ret<ffi::Buffer<ffi::S32>>()     // row_to_slot [k]
                           .Attr<int32_t>("top_k")
                           .Attr<int32_t>("routing_method")
                           .Attr<int32_t>("n_group")
                           .Attr<int32_t>("topk_group")
                           .Attr<float>("routed_scaling_factor")
                           .Attr<int32_t>("num_local_experts")
                           .Attr<int32_t>("expert_offset")   // local id = id - expert_offset
                           .Attr<int32_t>("num_experts"),    // > 0: ids outside [0, E) not local
                       {ffi::Traits::kCmdBufferCompatible});

JAX_MOE_REGISTER_TARGET("jax_moe_route_plan", RoutePlanHandler);

}  // namespace jax_moe
