"""Thin wrappers, one per XLA FFI target: the result shapes (abstract-eval rule) + `ffi_call`.

Each wrapper is usable on its own (e.g. `grouped_gemm` for other models). The stage functions at
the bottom give the CUDA targets the same signatures as the stages in `reference.py`.

Layout contract shared by the CUDA stages (M = T*k rows, no padding):
  * expert_offsets int32 [G+1]: rows of local expert g are [offsets[g], offsets[g+1]); rows past
    offsets[G] are unused (their contents are unspecified and never read by later stages).
  * Activation-side scales of a grouped row buffer with K columns use the *grouped MN-major*
    layout (CUTLASS's default for 1x128 A-scales): a float32 vector of M*K/128 values where group
    g occupies [offsets[g]*K/128, offsets[g+1]*K/128) as a [K/128, M_g] row-major block, i.e.
    scale(row r of group g, k-block kb) = s[offsets[g]*K/128 + kb*M_g + (r - offsets[g])].
  * Weight scales are [G, N/128, K/128] float32 as given by the user.
"""
import operator
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _native, quant, reference
from .enums import RoutingMethodType, is_gated

BLOCK = quant.BLOCK
FP8 = quant.FP8


def _ffi_call(target, result_shapes, **kwargs):
    """`jax.ffi.ffi_call` after making sure this module's targets are registered with XLA."""
    _native.register_targets()
    return jax.ffi.ffi_call(target, result_shapes, **kwargs)


def _i32(v):
    return np.int32(v)


def _auto_or_off(env, default="auto"):
    """Whether the switch in $`env` (read now, at trace time; `default` when unset) is "auto";
    "off" is False, anything else an error naming the variable."""
    mode = os.environ.get(env, default)
    if mode not in ("auto", "off"):
        raise ValueError(f"${env}: expected 'auto' or 'off', got {mode!r}")
    return mode == "auto"


# --------------------------------------------------------------------------- route
def route(routing_logits, routing_bias, *, top_k, routing_method_type, n_group=None,
          topk_group=None, routed_scaling_factor=None):
    """`jax_moe_route`: logits [T, E] f32|bf16, bias f32 [E] (zeros when absent)
    -> (ids int32 [T, k], weights bf16 [T, k]). SPEC section 2, ties to the lower index."""
    t, _ = routing_logits.shape
    return _ffi_call(
        "jax_moe_route",
        (jax.ShapeDtypeStruct((t, top_k), jnp.int32), jax.ShapeDtypeStruct((t, top_k), jnp.bfloat16)),
        vmap_method="broadcast_all",
    )(*_route_operands(routing_logits, routing_bias),
      **_route_attrs(top_k, routing_method_type, n_group, topk_group, routed_scaling_factor))


def _route_operands(routing_logits, routing_bias):
    """The routing kernels' operands: the logits and the bias in f32 (zeros when absent)."""
    e = routing_logits.shape[1]
    bias = jnp.zeros((e,), jnp.float32) if routing_bias is None else routing_bias.astype(jnp.float32)
    return routing_logits, bias


def _route_attrs(top_k, routing_method_type, n_group, topk_group, routed_scaling_factor):
    """The routing kernels' attributes (the scaling factor 1 when absent)."""
    rsf = 1.0 if routed_scaling_factor is None else routed_scaling_factor
    return dict(top_k=_i32(top_k), routing_method=_i32(routing_method_type), n_group=_i32(n_group or 1),
                topk_group=_i32(topk_group or 1), routed_scaling_factor=np.float32(rsf))


# --------------------------------------------------------------------------- plan / permute
class Plan(NamedTuple):
    expert_offsets: jax.Array  # int32 [E_loc + 1]
    slot_to_row: jax.Array  # int32 [T*k], -1 where the expert is not local
    row_to_slot: jax.Array  # int32 [T*k], -1 past expert_offsets[E_loc]


ROUTE_PLAN_ENV = "JAX_MOE_ROUTE_PLAN"  # "auto" or "off": route and plan as two calls
ROUTE_PLAN_DEFAULT = "off"  # until measured on an H100 (written in the thirty-second session)


def route_plan_applies(num_experts, routing_method_type, n_group, expert_offset):
    """Whether `route_plan` serves a one-token call (read at trace time): DeepSeek-V3 routing
    over groups of 32 experts, a static expert offset, and $JAX_MOE_ROUTE_PLAN "auto" (default
    ROUTE_PLAN_DEFAULT)."""
    try:
        operator.index(expert_offset)
    except TypeError:
        return False
    return (routing_method_type == RoutingMethodType.DeepSeekV3 and (n_group or 1) > 1
            and num_experts == 32 * n_group and _auto_or_off(ROUTE_PLAN_ENV, ROUTE_PLAN_DEFAULT))


def route_plan(routing_logits, routing_bias, *, top_k, routing_method_type, n_group, topk_group,
               routed_scaling_factor, num_local_experts, expert_offset=0, num_experts=None):
    """`jax_moe_route_plan`: `route` and then `plan` of its ids in one kernel, for one token
    (`route_plan_applies`) -> (ids int32 [1, k], weights bf16 [1, k], Plan): the same bits as the
    two calls, one launch and one grid-dependency wait fewer before the first weight load."""
    t, _ = routing_logits.shape
    ids, weights, offsets, slot_to_row, row_to_slot = _ffi_call(
        "jax_moe_route_plan",
        (jax.ShapeDtypeStruct((t, top_k), jnp.int32), jax.ShapeDtypeStruct((t, top_k), jnp.bfloat16),
         jax.ShapeDtypeStruct((num_local_experts + 1,), jnp.int32),
         jax.ShapeDtypeStruct((t * top_k,), jnp.int32), jax.ShapeDtypeStruct((t * top_k,), jnp.int32)),
        vmap_method="sequential",
    )(*_route_operands(routing_logits, routing_bias),
      **_route_attrs(top_k, routing_method_type, n_group, topk_group, routed_scaling_factor),
      num_local_experts=_i32(num_local_experts), expert_offset=_i32(operator.index(expert_offset)),
      num_experts=_i32(num_experts or 0))
    return ids, weights, Plan(offsets, slot_to_row, row_to_slot)


def plan(ids, num_local_experts, *, expert_offset=0, num_experts=None):
    """`jax_moe_plan`: expert ids int32 [T, k] -> Plan. Slot (t, j) goes to local expert
    ids[t, j] - expert_offset when that is in [0, E_loc) and, if `num_experts` is given,
    ids[t, j] is in [0, num_experts); other slots are not local. Within an expert, rows keep
    slot order, so the result is deterministic. `expert_offset` may be traced (then the local
    ids are computed in XLA before the call)."""
    num_slots = ids.size
    ids = ids.astype(jnp.int32)
    try:
        offset = operator.index(expert_offset)
    except TypeError:  # traced (e.g. axis_index * E_loc inside shard_map): shift in XLA
        ids = reference.local_expert_ids(ids, expert_offset, num_experts)
        offset, num_experts = 0, None
    offsets, slot_to_row, row_to_slot, _ = _ffi_call(
        "jax_moe_plan",
        (jax.ShapeDtypeStruct((num_local_experts + 1,), jnp.int32),
         jax.ShapeDtypeStruct((num_slots,), jnp.int32),
         jax.ShapeDtypeStruct((num_slots,), jnp.int32),
         # scratch: per-chunk bucket counts (the kernel derives the chunk size from its rows)
         jax.ShapeDtypeStruct((_plan_chunks(num_slots), num_local_experts + 1), jnp.int32)),
    )(ids, num_local_experts=_i32(num_local_experts), expert_offset=_i32(offset),
      num_experts=_i32(num_experts or 0))
    return Plan(offsets, slot_to_row, row_to_slot)


def _plan_chunks(num_slots):
    """Chunks the plan kernels cut the slots into: about 1024 slots each, at most 128."""
    return max(1, min(128, -(-num_slots // 1024)))


def permute(hidden_states, hidden_states_scale, p: Plan, top_k):
    """`jax_moe_permute`: hidden fp8 [T, H], scale f32 [H/128, T] -> (rows fp8 [T*k, H],
    row scales f32 [T*k*H/128] in the grouped MN-major layout)."""
    t, h = hidden_states.shape
    m = t * top_k
    return _ffi_call(
        "jax_moe_permute",
        (jax.ShapeDtypeStruct((m, h), FP8), jax.ShapeDtypeStruct((m * h // BLOCK,), jnp.float32)),
    )(hidden_states, hidden_states_scale, p.slot_to_row, p.row_to_slot, p.expert_offsets,
      top_k=_i32(top_k))


# --------------------------------------------------------------------------- grouped GEMM
def grouped_gemm_workspace_bytes(num_groups):
    """Device workspace of `jax_moe_grouped_gemm`: per-group problem shapes, pointer arrays,
    strides and scale layouts written by its setup kernel (~120 B per group, 256-B aligned
    arrays), plus CUTLASS's own workspace (128-B TMA descriptors, 3-4 per SM: ~68 KB on 132
    SMs). 256 KiB covers GPUs of up to ~500 SMs; the handler errors out if this is too small."""
    return 1024 * num_groups + (1 << 18)


# The kernel's tile configs (the `tile` attribute of jax_moe_grouped_gemm): "128": cooperative
# 128x128 tiles; "64": ping-pong 64x128 tiles; "swap32": swapped operands (the weights are the
# kernel's M side), 32 token rows per tile; "own128" / "own64": the library's own TMA + wgmma
# kernel (ffi/blockwise_gemm_sm90.cu), 128 x 128 / 64 x 256 tiles (rows x columns), no setup
# kernel, at most 512 groups; "own32" / "own16" / "own8": its 64 x 256 tile trimmed to 32 / 16 /
# 8 rows of a per tile, for decode batches (more weight stages in flight, bit-identical to
# own64). "auto" (resolved here, at trace time) picks one by the rows per group.
GEMM_TILES = {"128": 1, "64": 2, "swap32": 3, "own128": 6, "own64": 8, "own32": 9, "own16": 10,
              "own8": 11}
TILE_ENV = "JAX_MOE_GEMM_TILE"


OWN_GEMM_MAX_GROUPS = 512  # the own kernel keeps the group offsets in shared memory
OWN_GEMM_WORKSPACE_INTS = 4  # its device workspace: the dynamic tile scheduler's counter


def gemm_tile_for(rows_per_group, num_groups=1, gemm2=False):
    """The config for `num_groups` groups of about `rows_per_group` rows (tools/tile_sweep.py on
    an H100, DeepSeek-V3 MoE, benchmarks/RESULTS.md, ninth session): up to 64 rows per group the
    own kernel's 64 x 256 tiles with dynamic tile scheduling stream the weights fastest (decode
    T=128 3.91 -> 3.68 ms against swapped-operand CUTLASS tiles, EP T=64 0.480 -> 0.465);
    above, CUTLASS's 128 x 128 cooperative tile wins. Except for an MoE's GEMM2 (`gemm2`) at
    33-64 rows: there the own 128 x 128 tile, which reads each weight tile once for up to 128
    rows, is faster (prefill T=2048, 64 rows: 1403 -> 1367 us, sixteenth session). Beyond the
    own kernel's 512 groups: swapped operands up to 16 rows, 64 x 128 ping-pong up to 32, else
    128 x 128."""
    if gemm2 and 32 < rows_per_group <= 64 and num_groups <= OWN_GEMM_MAX_GROUPS:
        return "own128"
    if rows_per_group <= 64 and num_groups <= OWN_GEMM_MAX_GROUPS:
        return "own64"
    if rows_per_group <= 16:
        return "swap32"
    if rows_per_group <= 32:
        return "64"
    return "128"


def _gemm_tile(tile, rows_per_group, num_groups=1, gemm2=False):
    """The `tile` attribute for a tile argument (None: $JAX_MOE_GEMM_TILE, else "auto", read
    when the op is traced); "auto" follows `rows_per_group` (and `gemm2`: gemm_tile_for)."""
    tile = tile if tile is not None else os.environ.get(TILE_ENV, "auto")
    if tile == "auto":
        tile = gemm_tile_for(rows_per_group, num_groups, gemm2)
    if tile not in GEMM_TILES:
        raise ValueError(f"tile: expected one of {sorted(GEMM_TILES) + ['auto']} "
                         f"(argument or ${TILE_ENV}), got {tile!r}")
    return GEMM_TILES[tile]


def grouped_gemm_raw(a, a_scale, b, b_scale, expert_offsets, out_dtype=jnp.bfloat16, tile=None,
                     rows_per_group=None, gemm2=False):
    """`jax_moe_grouped_gemm`: a fp8 [M, K], a_scale f32 [M*K/128] (grouped MN-major),
    b fp8 [G, N, K], b_scale f32 [G, N/128, K/128], offsets int32 [G+1] -> d [M, N] in
    out_dtype (bfloat16 or float32) with d[r] = dequant(a[r]) @ dequant(b[g]).T for r in group g
    (float32 accumulation, block scales applied per 128 of K). Rows past offsets[G] are not
    written. `tile`: a key of GEMM_TILES or "auto" (by `rows_per_group`, default M/G); None
    reads $JAX_MOE_GEMM_TILE at trace time (so an override needs a fresh trace: a new jit or
    `jax.clear_caches()`). `gemm2`: "auto" picks the tile for an MoE's GEMM2 (gemm_tile_for)."""
    m, _ = a.shape
    g, n, _ = b.shape
    tile_attr = _i32(_gemm_tile(tile, rows_per_group if rows_per_group is not None else m / max(g, 1), g,
                                gemm2))
    d, _ = _ffi_call(
        "jax_moe_grouped_gemm",
        (jax.ShapeDtypeStruct((m, n), out_dtype),
         jax.ShapeDtypeStruct((grouped_gemm_workspace_bytes(g),), jnp.uint8)),
    )(a, a_scale, b, b_scale, expert_offsets, tile=tile_attr)
    return d


def grouped_gemm(rows, row_scales, weights, weight_scales, p: Plan, out_dtype=jnp.bfloat16,
                 rows_per_group=None, gemm2=False):
    """The pipeline's GEMM stage (`gemm2`: the MoE's second GEMM). `rows_per_group`: the expected
    rows per local expert (`api.expected_rows_per_expert`); picks the tile unless
    $JAX_MOE_GEMM_TILE is set."""
    return grouped_gemm_raw(rows, row_scales, weights, weight_scales, p.expert_offsets, out_dtype,
                            rows_per_group=rows_per_group, gemm2=gemm2)


# --------------------------------------------------------------------------- activation
def act_quant(g, p: Plan, activation_type):
    """`jax_moe_act_quant`: GEMM1 output bf16 (what the pipeline passes) or float32 [M, 2I]
    (gated) or [M, I] -> (fp8 [M, I], scales f32 [M*I/128] grouped MN-major). The activation is
    computed in float32 either way. Only rows below offsets[E_loc] are processed."""
    m, n = g.shape
    i = n // 2 if is_gated(activation_type) else n
    return _ffi_call(
        "jax_moe_act_quant",
        (jax.ShapeDtypeStruct((m, i), FP8), jax.ShapeDtypeStruct((m * i // BLOCK,), jnp.float32)),
    )(g, p.expert_offsets, activation=_i32(activation_type))


# --------------------------------------------------------------------------- GEMM1 + activation
GEMM1_ENV = "JAX_MOE_GEMM1"
GEMM1_MODES = ("auto", "fused", "fused128", "fused64", "split")
GEMM1_BLOCK_M = (128, 64)  # row tiles of the fused kernel: 128 x 256 (gated) / 128 x 128, or 64 x 256
# "auto" and "fused" take the 128-row tile above this many rows per expert, else the 64-row one
GEMM1_WIDE_ABOVE_ROWS = 48


def gemm1_fused_for(rows_per_group, num_groups):
    """Whether "auto" runs the pipeline's GEMM1 with the activation and re-quantization fused
    into its epilogue (`jax_moe_gemm1_act_quant`) rather than as grouped_gemm (bfloat16 out) +
    act_quant. On an H100 (tools/tile_sweep.py, benchmarks/RESULTS.md, ninth session) fused
    64 x 256 tiles win from 17 to 64 rows per group (T=1024: 4.068 -> 4.014 ms, prefill T=2048
    4.494 -> 4.434); at <= 16 rows the split stages are 1-3 % faster, and above 64 rows the
    fused kernel loses to CUTLASS's GEMM + act_quant (prefill T=8192 9.4 vs 8.9 ms; with the
    128 x 256 tile of the twenty-second session still at EP T=4096, 718 vs 727 us, and EP
    T=16384, 1897 vs 1960 us). The row tile: `gemm1_fused_block_m_for`."""
    return 16 < rows_per_group <= 64 and num_groups <= OWN_GEMM_MAX_GROUPS


def gemm1_act_quant_raw(a, a_scale, b, b_scale, expert_offsets, activation_type, block_m=128):
    """`jax_moe_gemm1_act_quant`: a fp8 [M, K], a_scale f32 [M*K/128] (grouped MN-major),
    b fp8 [G, N, K] (N = 2I gated, I otherwise), b_scale f32 [G, N/128, K/128], offsets int32
    [G+1] (G <= 512) -> (fp8 [M, I], scales f32 [M*I/128] grouped MN-major): act_quant of the
    grouped GEMM (float32 accumulation, rounded to bfloat16 like the split GEMM1's output),
    computed in the GEMM's epilogue (no [M, N] intermediate in memory). Rows
    past offsets[G] are not written. `block_m`: the own kernel's row tile, 128 (gated: 128 x 256
    tiles, each math warpgroup on 64 rows and the up and gate rows of 128 columns; otherwise
    128 x 128) or 64 (64 x 256 tiles, the warpgroups on the same rows)."""
    if block_m not in GEMM1_BLOCK_M:
        raise ValueError(f"block_m: expected one of {GEMM1_BLOCK_M}, got {block_m!r}")
    m, _ = a.shape
    g, n, _ = b.shape
    i = n // 2 if is_gated(activation_type) else n
    q, q_scale, _ = _ffi_call(
        "jax_moe_gemm1_act_quant",
        (jax.ShapeDtypeStruct((m, i), FP8), jax.ShapeDtypeStruct((m * i // BLOCK,), jnp.float32),
         jax.ShapeDtypeStruct((OWN_GEMM_WORKSPACE_INTS,), jnp.int32)),
    )(a, a_scale, b, b_scale, expert_offsets, activation=_i32(activation_type), block_m=_i32(block_m))
    return q, q_scale


def gemm1_act_quant(rows, row_scales, weights, weight_scales, p: Plan, activation_type,
                    rows_per_group=None):
    """The pipeline's GEMM1 + act_quant stage: fused (`gemm1_act_quant_raw`) or split (grouped
    GEMM with bfloat16 output (reference.G_DTYPE), then `act_quant`), by `gemm1_fused_for` unless
    $JAX_MOE_GEMM1 says "fused" (row tile by `gemm1_fused_block_m_for`), "fused128", "fused64" or
    "split" (read at trace time). A tile forced by $JAX_MOE_GEMM_TILE means split, unless
    $JAX_MOE_GEMM1 says otherwise."""
    g = weights.shape[0]
    rows_per_group = rows_per_group if rows_per_group is not None else rows.shape[0] / max(g, 1)
    block_m = _gemm1_fused_block_m(rows_per_group, g)
    if block_m:
        return gemm1_act_quant_raw(rows, row_scales, weights, weight_scales, p.expert_offsets,
                                   activation_type, block_m)
    h = grouped_gemm(rows, row_scales, weights, weight_scales, p,
                     out_dtype=reference.G_DTYPE, rows_per_group=rows_per_group)
    return act_quant(h, p, activation_type)


def _gemm1_fused_block_m(rows_per_group, num_groups):
    """The fused GEMM1's row tile if the pipeline's GEMM1 runs fused ($JAX_MOE_GEMM1, else
    `gemm1_fused_for`), else 0 (split)."""
    mode = os.environ.get(GEMM1_ENV, "auto")
    if mode not in GEMM1_MODES:
        raise ValueError(f"${GEMM1_ENV}: expected one of {GEMM1_MODES}, got {mode!r}")
    if mode == "auto":
        forced_tile = os.environ.get(TILE_ENV, "auto") != "auto"
        fused = not forced_tile and gemm1_fused_for(rows_per_group, num_groups)
    else:
        fused = mode.startswith("fused")
    if not fused or num_groups > OWN_GEMM_MAX_GROUPS:
        return 0
    return {"fused128": 128, "fused64": 64}.get(mode, gemm1_fused_block_m_for(rows_per_group))


def gemm1_fused_block_m_for(rows_per_group):
    """The fused GEMM1's row tile for "auto" and "fused". 64 x 256 tiles pad each group's rows
    to 64, so a group of 65-128 rows gets two tiles that read each weight tile twice through the
    L2; 128-row tiles (gated: 128 x 256, each math warpgroup on 64 rows and all 256 weight rows,
    a half past the group's end loading no rows and running no MMAs) read it once. On an H100
    (benchmarks/RESULTS.md, twenty-second session) the 128-row tile wins at 64 rows per expert
    (prefill T=2048: 4204 -> 4111 us) and loses at 48 (T=1536: 3974 -> 3996) and 32 (EP T=1024:
    532 -> 551), where few groups exceed 64 rows."""
    return 128 if rows_per_group > GEMM1_WIDE_ABOVE_ROWS else 64


# --------------------------------------------------------------------------- stage + GEMM pairs
# A stage and the own GEMM that consumes its output as one call: the GEMM is launched as the
# stage kernel's programmatic dependent (PDL) and issues its first weight loads while the stage
# still runs. XLA records every FFI call into its own CUDA graph node, so only kernels of one
# call can overlap this way. Results equal the two stage calls in sequence.
PAIRS_ENV = "JAX_MOE_STAGE_PAIRS"  # "auto" (default) or "off": always separate stage calls


def _stage_gemm_call(target, m, n, out_dtype, stage_cols, *operands, **attrs):
    """A stage + own GEMM pair call: d [m, n] in out_dtype, with the stage's fp8 [m, stage_cols]
    output, its scales and the GEMM's tile counter as workspace outputs. Returns d."""
    d, _, _, _ = _ffi_call(
        target,
        (jax.ShapeDtypeStruct((m, n), out_dtype), jax.ShapeDtypeStruct((m, stage_cols), FP8),
         jax.ShapeDtypeStruct((m * stage_cols // BLOCK,), jnp.float32),
         jax.ShapeDtypeStruct((OWN_GEMM_WORKSPACE_INTS,), jnp.int32)),
    )(*operands, **attrs)
    return d


def permute_gemm(hidden_states, hidden_states_scale, p: Plan, top_k, weights, weight_scales,
                 out_dtype=jnp.float32, block_m=64):
    """`jax_moe_permute_gemm`: `permute`, then the own grouped GEMM (row tile `block_m`: 128, 64
    or a trimmed 32, 16, 8) on its rows -> d [T*k, N] in out_dtype, equal to
    grouped_gemm_raw(*permute(...), weights, weight_scales, p.expert_offsets, out_dtype,
    tile=f"own{block_m}")."""
    t, h = hidden_states.shape
    return _stage_gemm_call(
        "jax_moe_permute_gemm", t * top_k, weights.shape[1], out_dtype, h, hidden_states,
        hidden_states_scale, p.slot_to_row, p.row_to_slot, p.expert_offsets, weights, weight_scales,
        top_k=_i32(top_k), block_m=_i32(block_m))


def act_quant_gemm(g, p: Plan, activation_type, weights, weight_scales, out_dtype=jnp.bfloat16,
                   block_m=64):
    """`jax_moe_act_quant_gemm`: `act_quant` of GEMM1's output g, then the own grouped GEMM (row
    tile `block_m`) on the result -> d [M, N] in out_dtype, equal to
    grouped_gemm_raw(*act_quant(g, p, activation_type), weights, weight_scales,
    p.expert_offsets, out_dtype, tile=f"own{block_m}")."""
    m, n_in = g.shape
    i = n_in // 2 if is_gated(activation_type) else n_in
    return _stage_gemm_call(
        "jax_moe_act_quant_gemm", m, weights.shape[1], out_dtype, i, g, p.expert_offsets,
        weights, weight_scales, activation=_i32(activation_type), block_m=_i32(block_m))


# The decode chain: permute, then GEMM1 + activation + re-quantization and GEMM2 in one persistent
# kernel (ffi/blockwise_gemm_sm90.cu, OwnDecodeChainKernel): GEMM2's tiles wait per expert for
# GEMM1's, so its weights stream while GEMM1's last tiles finish.
CHAIN_ENV = "JAX_MOE_DECODE_CHAIN"  # "auto" or "off": the two stage pairs instead
CHAIN_DEFAULT = "auto"  # measured on an H100: benchmarks/RESULTS.md, thirty-first session
CHAIN_BLOCK_M = (64, 32, 16, 8)
CHAIN_MAX_CTAS = 1024  # the chain's claim flags (ffi/blockwise_gemm_sm90.cu, kChainMaxCtas)


def permute_gemm_chain_raw(hidden_states, hidden_states_scale, p: Plan, top_k, gemm1_weights,
                           gemm1_weights_scale, gemm2_weights, gemm2_weights_scale,
                           activation_type, block_m=8):
    """`jax_moe_permute_gemm_chain`: `permute`, GEMM1 with the gated activation (Swiglu, Geglu)
    and FP8 re-quantization in its epilogue, GEMM2 (bf16 out), all own-kernel tiles of `block_m`
    rows (64, 32, 16, 8) -> (d bf16 [T*k, H], activations fp8 [T*k, I], their scales f32
    [T*k*I/128] grouped MN-major). d equals act_quant_gemm(permute_gemm(...)) up to the fused
    epilogue's rare one-code differences in the activations (as `gemm1_act_quant_raw`'s); given
    the activations it returns, d is grouped_gemm_raw(act, act_scales, gemm2_weights, ...,
    tile=f"own{block_m}") bit for bit."""
    if block_m not in CHAIN_BLOCK_M:
        raise ValueError(f"block_m: expected one of {CHAIN_BLOCK_M}, got {block_m!r}")
    t, h = hidden_states.shape
    g, n1, _ = gemm1_weights.shape
    m, i = t * top_k, n1 // 2
    d, _, _, act, act_scales, _ = _ffi_call(
        "jax_moe_permute_gemm_chain",
        (jax.ShapeDtypeStruct((m, h), jnp.bfloat16), jax.ShapeDtypeStruct((m, h), FP8),
         jax.ShapeDtypeStruct((m * h // BLOCK,), jnp.float32), jax.ShapeDtypeStruct((m, i), FP8),
         jax.ShapeDtypeStruct((m * i // BLOCK,), jnp.float32),
         jax.ShapeDtypeStruct((OWN_GEMM_WORKSPACE_INTS + g + CHAIN_MAX_CTAS,), jnp.int32)),
    )(hidden_states, hidden_states_scale, p.slot_to_row, p.row_to_slot, p.expert_offsets,
      gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale,
      top_k=_i32(top_k), activation=_i32(activation_type), block_m=_i32(block_m))
    return d, act, act_scales


def decode_chain_for(block_m, activation_type):
    """Whether the decode pairs' GEMMs (own-kernel tiles of `block_m` rows) run as the decode
    chain: gated activations and up to 64-row tiles, if $JAX_MOE_DECODE_CHAIN (read at trace
    time, default CHAIN_DEFAULT) is "auto"."""
    return (_auto_or_off(CHAIN_ENV, CHAIN_DEFAULT) and block_m in CHAIN_BLOCK_M
            and is_gated(activation_type))


_OWN_BLOCK_M = {GEMM_TILES[f"own{m}"]: m for m in (128, 64, 32, 16, 8)}
TRIM_ENV = "JAX_MOE_TRIM"  # "auto" (default) or "off": the decode pairs keep own64's 64-row tiles


def trimmed_block_m_for(num_tokens):
    """The stage pairs' row tile in place of own64's 64 for a batch of `num_tokens` tokens: 8, 16
    or 32 rows, the least that holds every group's rows in one tile (a group has at most one row
    per token), or 64. $JAX_MOE_TRIM=off (read at trace time) keeps 64."""
    if not _auto_or_off(TRIM_ENV):
        return 64
    return next((m for m in (8, 16, 32) if num_tokens <= m), 64)


def expert_gemms(hidden_states, hidden_states_scale, p: Plan, top_k, gemm1_weights,
                 gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, activation_type,
                 rows_per_group=None):
    """The pipeline's steps 1-4: permute, GEMM1 + act_quant, GEMM2 -> bf16 [T*k, H]. Where both
    GEMMs run the own kernel and GEMM1 runs split (decode: up to 16 rows per expert), as the two
    pairs permute + GEMM1 and act_quant + GEMM2 (unless $JAX_MOE_STAGE_PAIRS=off), with own64's
    tile trimmed to the batch (`trimmed_block_m_for`) unless a tile is forced -- for a gated
    activation as the decode chain, one call (`decode_chain_for`); otherwise as the separate
    stages."""
    g = gemm1_weights.shape[0]
    rows_per_group = (rows_per_group if rows_per_group is not None
                      else hidden_states.shape[0] * top_k / max(g, 1))
    pairs = _auto_or_off(PAIRS_ENV)
    tile = os.environ.get(TILE_ENV, "auto")  # read once: a forced own64 is not trimmed
    block_m = _OWN_BLOCK_M.get(_gemm_tile(tile, rows_per_group, g))
    if block_m == 64 and tile == "auto":
        block_m = trimmed_block_m_for(hidden_states.shape[0])
    if pairs and block_m and not _gemm1_fused_block_m(rows_per_group, g):
        if decode_chain_for(block_m, activation_type):
            return permute_gemm_chain_raw(hidden_states, hidden_states_scale, p, top_k,
                                          gemm1_weights, gemm1_weights_scale, gemm2_weights,
                                          gemm2_weights_scale, activation_type, block_m)[0]
        h = permute_gemm(hidden_states, hidden_states_scale, p, top_k, gemm1_weights,
                         gemm1_weights_scale, reference.G_DTYPE, block_m)
        return act_quant_gemm(h, p, activation_type, gemm2_weights, gemm2_weights_scale,
                              jnp.bfloat16, block_m)
    rows, row_scales = permute(hidden_states, hidden_states_scale, p, top_k)
    act, act_scales = gemm1_act_quant(rows, row_scales, gemm1_weights, gemm1_weights_scale, p,
                                      activation_type, rows_per_group=rows_per_group)
    return grouped_gemm(act, act_scales, gemm2_weights, gemm2_weights_scale, p,
                        rows_per_group=rows_per_group, gemm2=True)


# --------------------------------------------------------------------------- finalize
def finalize(y, p: Plan, topk_weights, do_finalize=True):
    """`jax_moe_finalize`: GEMM2 rows bf16 [M, H], slot_to_row, weights [T, k] (bfloat16 or
    float32 go in as they are, widened exactly in the kernel; other float dtypes are cast to
    float32 first) ->
    out bf16 [T, H] (float32 weighted sum in slot order) or, with do_finalize=False, the
    unweighted per-slot outputs bf16 [T, k, H] (zeros where not local)."""
    t, k = topk_weights.shape
    h = y.shape[1]
    shape = (t, h) if do_finalize else (t, k, h)
    weights = topk_weights
    if weights.dtype not in (jnp.bfloat16, jnp.float32):
        weights = weights.astype(jnp.float32)
    return _ffi_call("jax_moe_finalize", jax.ShapeDtypeStruct(shape, jnp.bfloat16))(
        y, p.slot_to_row, weights, do_finalize=bool(do_finalize))


# --------------------------------------------------------------------------- layout helpers
def rows_scales_to_grouped(scales, offsets):
    """Per-row block scales f32 [M, K/128] + expert_offsets int32 [G+1] -> the grouped MN-major
    vector f32 [M*K/128] of the module docstring (group g's scales as a [K/128, M_g] row-major
    block at offsets[g]*K/128). Pure jnp, works under jit with traced offsets. Positions past
    offsets[G]*K/128 (rows past the last group) hold the row-major scales unchanged."""
    m, kb = scales.shape
    offsets = jnp.asarray(offsets, jnp.int32)
    p = jnp.arange(m * kb, dtype=jnp.int32)
    starts = offsets * kb
    # group of position p: the last g with offsets[g]*kb <= p (empty groups are skipped)
    g = jnp.clip(jnp.searchsorted(starts, p, side="right") - 1, 0, offsets.shape[0] - 2)
    lo = offsets[g]
    rows_g = jnp.maximum(offsets[g + 1] - lo, 1)
    q = p - lo * kb
    row = lo + q % rows_g
    blk = q // rows_g
    inside = p < starts[-1]
    row = jnp.where(inside, row, p // kb)
    blk = jnp.where(inside, blk, p % kb)
    return scales[jnp.clip(row, 0, m - 1), jnp.clip(blk, 0, kb - 1)]
