"""The pure-JAX MoE pipeline: one function per stage of ARCHITECTURE.md.

This is the CPU path, the `backend="xla"` path and the reference the CUDA stages are tested
against. Rows are grouped by expert and padded per expert to a tile of `tile_m` rows, so each
tile multiplies one expert's weights: the work is proportional to the routed rows, and nothing of
size [T, E_loc, H] (or dense over experts) is ever built.

Rounding points (SPEC section 3): GEMM1 output (accumulated in float32) rounded to bfloat16
(`G_DTYPE`; SPEC 3 step 2 allows it, and every backend and fused kernel rounds there), activation
in float32, re-quantization to fp8 per 128-block, GEMM2 output rounded to bfloat16, finalize
summed in float32 and rounded to bfloat16.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import quant
from .enums import ActivationType as A
from .routing import route_xla as route  # noqa: F401  (the route stage)

# GEMM1's output g (SPEC 3 step 2: accumulated in float32, "may be rounded to bfloat16 before
# step 3"). Every path rounds it: this pipeline, the CUDA split GEMM1 (which then writes and
# act_quant reads half the bytes of float32: H100, prefill T=8192 ~3 % per op), the fused
# GEMM1 + act_quant epilogue, the stage pairs and the backward pass's recomputation.
G_DTYPE = jnp.bfloat16


class Plan(NamedTuple):
    """Where each routed (token, slot) pair lives in the expert-grouped row buffer."""
    expert_offsets: jax.Array  # int32 [E_loc + 1], padded group starts (multiples of tile_m)
    slot_to_row: jax.Array  # int32 [T * k], row of slot t*k + j, -1 if the expert is not local
    row_to_slot: jax.Array  # int32 [rows], slot held by a row, -1 for padding rows
    tile_expert: jax.Array  # int32 [rows / tile_m], local expert of each tile, E_loc if unused
    tile_m: int


def _tile_m(num_slots, num_local_experts):
    """Rows per tile: about the expected rows per expert, a power of two in [8, 128]."""
    per_expert = max(1, -(-num_slots // max(1, min(num_local_experts, num_slots))))
    t = 8
    while t < per_expert and t < 128:
        t *= 2
    return t


def local_expert_ids(ids, expert_offset, num_experts=None):
    """ids - expert_offset as int32, -1 for negative ids and (if `num_experts` is given) ids
    >= num_experts. `expert_offset` may be traced."""
    ids = ids.astype(jnp.int32)
    if num_experts is not None:
        ids = jnp.where(ids < num_experts, ids, -1)
    return jnp.where(ids >= 0, ids - jnp.asarray(expert_offset, jnp.int32), -1)


def plan(ids, num_local_experts, tile_m=None, *, expert_offset=0, num_experts=None):
    """Expert ids int32 [T, k] -> Plan. Slot (t, j) goes to local expert ids[t, j] -
    expert_offset when that is in [0, E_loc) and, if `num_experts` is given, ids[t, j] is in
    [0, num_experts); other slots are not local. Rows of one expert keep slot order (stable)."""
    local_ids = local_expert_ids(ids, expert_offset, num_experts)
    num_slots = local_ids.size
    e_loc = num_local_experts
    tm = tile_m or _tile_m(num_slots, e_loc)
    num_tiles = -(-num_slots // tm) + min(e_loc, num_slots)
    num_rows = num_tiles * tm

    flat = local_ids.reshape(-1)
    key = jnp.where((flat >= 0) & (flat < e_loc), flat, e_loc)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    sorted_key = key[order]
    counts = jnp.zeros(e_loc + 1, jnp.int32).at[key].add(1)[:e_loc]
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts)]).astype(jnp.int32)
    padded = (counts + tm - 1) // tm * tm
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(padded)]).astype(jnp.int32)

    is_local = sorted_key < e_loc
    safe_key = jnp.minimum(sorted_key, e_loc - 1)
    row = offsets[safe_key] + jnp.arange(num_slots, dtype=jnp.int32) - starts[safe_key]
    row = jnp.where(is_local, row, -1)
    slot_to_row = jnp.zeros(num_slots, jnp.int32).at[order].set(row)
    row_to_slot = jnp.full(num_rows, -1, jnp.int32).at[jnp.where(is_local, row, num_rows)].set(
        order, mode="drop")
    tile_start = jnp.arange(num_tiles, dtype=jnp.int32) * tm
    tile_expert = jnp.searchsorted(offsets[1:], tile_start, side="right").astype(jnp.int32)
    return Plan(offsets, slot_to_row, row_to_slot, tile_expert, tm)


def permute(hidden_states, hidden_states_scale, p: Plan, top_k):
    """Gathers routed token rows into expert-grouped order.

    -> (rows fp8 [rows, H], row scales float32 [rows, H/128]); padding rows are zero."""
    valid = p.row_to_slot >= 0
    token = jnp.where(valid, p.row_to_slot // top_k, 0)
    rows = jnp.where(valid[:, None], hidden_states[token], jnp.zeros((), hidden_states.dtype))
    scales = jnp.where(valid[:, None], hidden_states_scale.T[token], 0.0)
    return rows, scales


def varying_axes(x):
    """Mesh axes a value (or its abstract type) varies over inside shard_map; empty elsewhere."""
    axes = getattr(x, "vma", None)
    if axes is None:
        axes = getattr(getattr(x, "manual_axis_type", None), "varying", None)
    return tuple(sorted(axes or ()))


def zeros_like_struct(s):
    """Zeros of a ShapeDtypeStruct, typed as varying over the same mesh axes (so both branches of
    a lax.cond agree inside shard_map(check_vma=True))."""
    z = jnp.zeros(s.shape, s.dtype)
    axes = varying_axes(s)
    return jax.lax.pcast(z, axes, to="varying") if axes else z


def grouped_gemm(rows, row_scales, weights, weight_scales, p: Plan, out_dtype=jnp.bfloat16,
                 rows_per_group=None):
    """Blockwise-FP8 grouped GEMM: out[r] = dequant(rows[r]) @ dequant(W[expert(r)]).T.

    rows fp8 [R, K], row_scales f32 [R, K/128], weights fp8 [G, N, K], weight_scales
    f32 [G, N/128, K/128] -> [R, N] in out_dtype, accumulated in float32. Tiles of unused
    experts are skipped (their rows come out zero). `rows_per_group` (a tiling hint for the
    CUDA stage) is accepted and ignored."""
    num_rows, k = rows.shape
    g, n, _ = weights.shape
    tm = p.tile_m
    num_tiles = num_rows // tm

    def tile(args):
        a_q, a_s, e = args

        def compute(_):
            w = quant.dequantize_weights(weights[e], weight_scales[e])
            a = quant.dequantize_rows(a_q, a_s)
            return jnp.dot(a, w.T, precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32).astype(out_dtype)

        skipped = zeros_like_struct(jax.eval_shape(compute, None))
        return jax.lax.cond(e < g, compute, lambda _: skipped, None)

    out = jax.lax.map(tile, (rows.reshape(num_tiles, tm, k),
                             row_scales.reshape(num_tiles, tm, k // quant.BLOCK), p.tile_expert))
    return out.reshape(num_rows, n)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def activation(g, activation_type):
    """GEMM1 output [R, 2I] (gated) or [R, I] -> activation in float32 [R, I]."""
    g = g.astype(jnp.float32)
    act = A(activation_type)
    if act in (A.Swiglu, A.Geglu):
        i = g.shape[-1] // 2
        up, gate = g[:, :i], g[:, i:]
        if act == A.Swiglu:
            return gate / (1.0 + jnp.exp(-gate)) * up
        return _gelu_tanh(gate) * up
    if act == A.Relu2:
        r = jnp.maximum(g, 0.0)
        return r * r
    if act == A.Identity:
        return g
    raise NotImplementedError(f"activation_type {act!r}")


def act_quant(g, p: Plan, activation_type):
    """GEMM1 output -> activation -> fp8 per 1x128 block: (fp8 [R, I], float32 [R, I/128])."""
    del p  # every row is processed; padding rows are zero and stay zero
    return quant.quantize_rows(activation(g, activation_type))


def gemm1_act_quant(rows, row_scales, weights, weight_scales, p: Plan, activation_type,
                    rows_per_group=None):
    """Steps 2-4: GEMM1 (float32 accumulation, output rounded to G_DTYPE), then `act_quant` (the
    CUDA stage may fuse the two)."""
    g = grouped_gemm(rows, row_scales, weights, weight_scales, p, out_dtype=G_DTYPE,
                     rows_per_group=rows_per_group)
    return act_quant(g, p, activation_type)


def expert_gemms(hidden_states, hidden_states_scale, p: Plan, top_k, gemm1_weights, gemm1_weights_scale,
                 gemm2_weights, gemm2_weights_scale, activation_type, rows_per_group=None):
    """Steps 1-4 on the plan's rows: permute, GEMM1 + activation + re-quantization, GEMM2 ->
    bf16 [rows, H] (the CUDA stages may run these as fewer calls)."""
    rows, row_scales = permute(hidden_states, hidden_states_scale, p, top_k)
    act, act_scales = gemm1_act_quant(rows, row_scales, gemm1_weights, gemm1_weights_scale, p,
                                      activation_type, rows_per_group=rows_per_group)
    return grouped_gemm(act, act_scales, gemm2_weights, gemm2_weights_scale, p,
                        rows_per_group=rows_per_group)


def finalize(y, p: Plan, topk_weights, do_finalize=True):
    """GEMM2 output rows [R, H] bf16 -> out bf16 [T, H] = sum_j w[t, j] * y[row(t, j)] in float32,
    or, with do_finalize=False, the unweighted expert outputs bf16 [T, k, H] (zeros if not local)."""
    t, k = topk_weights.shape
    rows = p.slot_to_row.reshape(t, k)
    local = rows >= 0
    per_slot = jnp.where(local[..., None], y[jnp.maximum(rows, 0)], jnp.zeros((), y.dtype))
    if not do_finalize:
        return per_slot.astype(jnp.bfloat16)
    return combine_slots(per_slot, topk_weights)


def combine_slots(per_slot, topk_weights, out_dtype=jnp.bfloat16):
    """SPEC section 3 step 6: expert outputs [T, k, H] -> [T, H] = sum_j float32(w[t, j]) *
    float32(y[t, j]), summed in float32 in slot order (slot 0 first), cast to `out_dtype`."""
    w = topk_weights.astype(jnp.float32)
    acc = jnp.zeros((per_slot.shape[0], per_slot.shape[2]), jnp.float32)
    for j in range(per_slot.shape[1]):
        acc = acc + w[:, j, None] * per_slot[:, j].astype(jnp.float32)
    return acc.astype(out_dtype)
