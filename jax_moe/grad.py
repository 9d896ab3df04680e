"""Differentiation of the public MoE functions (SPEC section 5) and their batching under vmap.

Design
------
`moe(forward, cfg, ...)` is a `jax.custom_vjp` function around the stage pipeline of `api.py`:

* Forward: runs `forward` (the selected backend: CUDA stages on a GPU, pure JAX otherwise).
  Residuals are the inputs themselves plus the routing actually used (ids int32 [T, k],
  weights [T, k]); no intermediate (GEMM outputs, activations, permuted rows) is saved.
* Second-order derivatives and forward mode (`jax.jvp`) are not supported (custom VJP).
* Backward (pure JAX, `reference.plan/permute` + a tiled pass over the expert-grouped rows):
  recomputes GEMM1 -> activation -> re-quantization -> GEMM2 one tile of rows at a time (each
  tile belongs to one expert), and takes the VJP of that tile's float math with the rounding
  points (bf16 GEMM1 output, FP8 re-quantization, bf16 GEMM2 output, bf16 routing weights)
  passed straight through
  (their values are the forward's, their derivative is the identity). Per tile it produces the
  row cotangents and the tile's contribution to the weight-scale cotangents (dW ⊙ fp8(W),
  summed per 128x128 block), which are added per expert. Memory: O(rows x H) for the row
  buffers plus one expert's dequantized W1/W2 and their cotangents per tile; nothing of size
  [T, E, H] and no dense expansion of the experts.
* Cotangents: FP8 arrays, integer ids and the local-expert offset get zero (None); routing_bias
  gets zero (it only selects; with the selection fixed the output does not depend on it);
  routing_logits get the VJP of the routing-weight formula of SPEC section 2 with the ids fixed
  (`routing_weights`); hidden_states_scale and the weight scales get the gradient of the
  dequantized float math; float hidden states (the `moe_bf16` entries) get the row cotangent
  straight through their quantization.

vmap
----
The CUDA custom calls have no batching rules, so both the forward and the backward pipelines
are wrapped in `jax.custom_batching.custom_vmap` with a rule that folds the batch axis into the
token axis (tokens are independent), calls the unbatched pipeline once, and unfolds the result.
The backward keeps per-example weight-scale cotangents (needed by `vmap(grad(f))`) by planning
the folded rows with one "virtual expert" per (batch element, expert), so the folded pass still
tiles rows by expert. If an expert-side input (weights, scales, bias, offset) is itself batched,
the rule falls back to `lax.map` over the batch.
"""
import functools
import operator
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from . import quant, reference
from .enums import RoutingMethodType as R
from .routing import routing_weights
from .enums import ActivationType


class Config(NamedTuple):
    """Static (hashable) description of one public call."""
    routed: bool  # pre-routed entry: routing inputs are (ids int32 [T, k], weights [T, k])
    float_hidden: bool  # hidden states in float [T, H], quantized inside (straight through)
    top_k: int
    routing_method_type: R
    n_group: Optional[int]
    topk_group: Optional[int]
    routed_scaling_factor: Optional[float]
    num_experts: int
    activation_type: ActivationType
    do_finalize: bool
    use_cuda: bool
    strict: bool
    # local_expert_offset when it is a Python int: the forward passes it to the stages as a
    # constant (the plan kernel takes it as an attribute instead of XLA shifting the ids)
    static_offset: Optional[int] = None


# --------------------------------------------------------------------------- vmap by folding
def _fold_in(x, axis, batched, size):
    """Batched [B, ...] array whose unbatched token axis is `axis` -> the batch merged into it."""
    if x is None or axis is None:
        return x
    if not batched:
        x = jnp.broadcast_to(x[None], (size,) + x.shape)
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _fold_out(x, axis, size):
    x = x.reshape(x.shape[:axis] + (size, x.shape[axis] // size) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


@functools.lru_cache(maxsize=None)
def _folded(body, in_axes, out_axes, chunks):
    """`body(chunks, *args)` as a `custom_vmap` function that vmaps by folding the batch into the
    token axis. `in_axes[i]` is the token axis of argument i (None: expert-side, unbatched);
    `out_axes` gives the token (or chunk-major) axis of each output leaf (an int for all)."""

    @jax.custom_batching.custom_vmap
    def f(*args):
        return body(chunks, *args)

    @f.def_vmap
    def rule(size, in_batched, *args):
        in_batched = [bool(b) for b in in_batched]
        if any(b and a is None for b, a in zip(in_batched, in_axes)):
            # An expert-side input is batched: no fold possible, map over the batch instead.
            mapped = [a if b else None for a, b in zip(args, in_batched)]

            def one(xs):
                full = [x if b else a for x, a, b in zip(xs, args, in_batched)]
                return f(*full)

            out = jax.lax.map(one, mapped)
            return out, jax.tree_util.tree_map(lambda _: True, out)
        folded = [_fold_in(a, ax, b, size) for a, ax, b in zip(args, in_axes, in_batched)]
        out = _folded(body, in_axes, out_axes, chunks * size)(*folded)
        leaves, tree = jax.tree_util.tree_flatten(out)
        axes = out_axes if isinstance(out_axes, tuple) else (out_axes,) * len(leaves)
        out = jax.tree_util.tree_unflatten(
            tree, [_fold_out(x, ax, size) for x, ax in zip(leaves, axes)])
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return f


# --------------------------------------------------------------------------- backward pass
def _ste(x, rounded):
    """Value `rounded`, derivative of x (straight through)."""
    return x + jax.lax.stop_gradient(rounded - x)


def _cast_ste(x, dtype=jnp.bfloat16):
    """x rounded to `dtype` (back in float32), passed straight through."""
    return _ste(x, x.astype(dtype).astype(jnp.float32))


def _requant_ste(a):
    return _ste(a, quant.dequantize_rows(*quant.quantize_rows(a)))


def _match_vma(ct, primal):
    """Types a cotangent like its primal inside shard_map(check_vma=True): a cotangent that
    varies over mesh axes its (replicated) primal does not is summed over them (the transpose
    of the implicit broadcast), and one that varies less is marked varying. No-op elsewhere."""
    if ct is None or primal is None:
        return ct
    have = set(reference.varying_axes(jax.typeof(ct)))
    want = set(reference.varying_axes(jax.typeof(primal)))
    if have - want:
        ct = jax.lax.psum(ct, tuple(sorted(have - want)))
    if want - have:
        ct = jax.lax.pcast(ct, tuple(sorted(want - have)), to="varying")
    return ct


def _block_sum(x, bn, bk):
    """[N, K] -> [N/bn, K/bk] sums over blocks."""
    n, k = x.shape
    return x.reshape(n // bn, bn, k // bk, bk).sum(axis=(1, 3))


def _backward_body(cfg, chunks, ids, weights, hidden, hidden_scale, w1, s1, w2, s2, offset, ct):
    """Cotangents of one (folded) pipeline call.

    ids int32 [T, k] and weights [T, k]: the routing the forward used; hidden fp8 [T, H] with
    hidden_scale [H/128, T], or float [T, H] with hidden_scale None (cfg.float_hidden);
    ct: cotangent of the output bf16 [T, H] (do_finalize) or of the expert outputs [T, k, H].
    Tokens form `chunks` equal consecutive groups (the folded vmap batch); weight-scale
    cotangents are returned per chunk.
    -> (d weights f32 [T, k], d hidden_scale f32 [H/128, T] or d hidden f32 [T, H],
        d s1 f32 [chunks * E_loc, ...], d s2 f32 [chunks * E_loc, ...])."""
    t, k = ids.shape
    h = hidden.shape[1]
    e_loc = w1.shape[0]
    groups = chunks * e_loc
    d_hidden_shape = (t, h) if cfg.float_hidden else (h // quant.BLOCK, t)
    zeros_s1 = jnp.zeros((groups,) + s1.shape[1:], jnp.float32)
    zeros_s2 = jnp.zeros((groups,) + s2.shape[1:], jnp.float32)
    if t == 0:
        return (jnp.zeros((t, k), jnp.float32), jnp.zeros(d_hidden_shape, jnp.float32),
                zeros_s1, zeros_s2)

    if cfg.float_hidden:
        hq, hs = quant.quantize_activations(hidden)
    else:
        hq, hs = hidden, hidden_scale
    local = reference.local_expert_ids(ids, offset, cfg.num_experts)
    valid = (local >= 0) & (local < e_loc)
    chunk = (jnp.arange(t, dtype=jnp.int32) // (t // chunks))[:, None]
    p = reference.plan(jnp.where(valid, chunk * e_loc + local, -1), groups)
    rows, row_scales = reference.permute(hq, hs, p, k)
    num_rows = rows.shape[0]
    tm = p.tile_m
    num_tiles = num_rows // tm

    slot = p.row_to_slot
    live = slot >= 0
    safe = jnp.maximum(slot, 0)
    if cfg.do_finalize:  # dy = w * dout[t]; dw = <dout[t], y>
        ct_rows = jnp.where(live[:, None], ct[safe // k], jnp.zeros((), ct.dtype))
        w_rows = jnp.where(live, weights.reshape(-1)[safe].astype(jnp.float32), 0.0)
    else:  # dy = d expert_outputs[t, j]
        ct_rows = jnp.where(live[:, None], ct.reshape(t * k, h)[safe], jnp.zeros((), ct.dtype))
        w_rows = live.astype(jnp.float32)
    act = cfg.activation_type
    hb = h // quant.BLOCK

    def tile(args):
        xq, xs, ct_t, w_t, v = args

        def compute(_):
            e = v % e_loc
            q1, q2 = w1[e], w2[e]
            x = quant.dequantize_rows(xq, xs)
            W1 = quant.dequantize_weights(q1, s1[e])
            W2 = quant.dequantize_weights(q2, s2[e])

            def f(x, W1, W2):
                g = jnp.dot(x, W1.T, precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
                g = _cast_ste(g, reference.G_DTYPE)  # like the forward
                a = _requant_ste(reference.activation(g, act))
                return _cast_ste(jnp.dot(a, W2.T, precision=jax.lax.Precision.HIGHEST,
                                         preferred_element_type=jnp.float32))

            ctf = ct_t.astype(jnp.float32)
            y, vjp = jax.vjp(f, x, W1, W2)
            dx, dW1, dW2 = vjp(w_t[:, None] * ctf)
            dw = jnp.sum(ctf * y, axis=-1)
            ds1 = _block_sum(dW1 * q1.astype(jnp.float32), quant.BLOCK, quant.BLOCK)
            ds2 = _block_sum(dW2 * q2.astype(jnp.float32), quant.BLOCK, quant.BLOCK)
            if not cfg.float_hidden:
                dx = _block_sum(dx * xq.astype(jnp.float32), 1, quant.BLOCK)
            return dx, dw, ds1, ds2

        shapes = jax.eval_shape(compute, None)

        def skip(_):  # zeros typed like compute's results (varying axes under shard_map too)
            return jax.tree_util.tree_map(reference.zeros_like_struct, shapes)

        return jax.lax.cond(v < groups, compute, skip, None)

    dx_rows, dw_rows, ds1_t, ds2_t = jax.lax.map(tile, (
        rows.reshape(num_tiles, tm, h), row_scales.reshape(num_tiles, tm, hb),
        ct_rows.reshape(num_tiles, tm, h), w_rows.reshape(num_tiles, tm), p.tile_expert))
    dx_rows = dx_rows.reshape(num_rows, -1)
    dw_rows = dw_rows.reshape(num_rows)
    ds1 = jax.ops.segment_sum(ds1_t, p.tile_expert, num_segments=groups + 1)[:groups]
    ds2 = jax.ops.segment_sum(ds2_t, p.tile_expert, num_segments=groups + 1)[:groups]

    # Rows back to tokens (the finalize pattern, unit weights, fixed slot order).
    row_of = p.slot_to_row.reshape(t, k)
    here = row_of >= 0
    safe_row = jnp.maximum(row_of, 0)
    d_x = jnp.zeros((t, dx_rows.shape[1]), jnp.float32)
    for j in range(k):
        d_x = d_x + jnp.where(here[:, j, None], dx_rows[safe_row[:, j]], 0.0)
    d_hidden = d_x if cfg.float_hidden else d_x.T
    dw = jnp.where(here, dw_rows[safe_row], 0.0) if cfg.do_finalize else jnp.zeros((t, k), jnp.float32)
    return dw, d_hidden, ds1, ds2


# --------------------------------------------------------------------------- custom VJP
def _forward_body(forward, cfg, chunks, *args):
    del chunks  # tokens are independent in the forward
    if cfg.static_offset is not None:
        args = args[:-1] + (cfg.static_offset,)
    return forward(cfg, *args)


@functools.lru_cache(maxsize=None)
def _core(forward, cfg):
    routing_b_axis = 0 if cfg.routed else None  # routed weights [T, k] / routing bias [E]
    hidden_scale_axis = None if cfg.float_hidden else 1
    fwd_pipeline = _folded(functools.partial(_forward_body, forward, cfg),
                           (0, routing_b_axis, 0, hidden_scale_axis, None, None, None, None, None),
                           0, 1)
    bwd_pipeline = _folded(functools.partial(_backward_body, cfg),
                           (0, 0, 0, hidden_scale_axis, None, None, None, None, None, 0),
                           (0, 0 if cfg.float_hidden else 1, 0, 0), 1)

    @jax.custom_vjp
    def core(routing_a, routing_b, hidden, hidden_scale, w1, s1, w2, s2, offset):
        out, _, _ = fwd_pipeline(routing_a, routing_b, hidden, hidden_scale, w1, s1, w2, s2, offset)
        return out

    def core_fwd(routing_a, routing_b, hidden, hidden_scale, w1, s1, w2, s2, offset):
        out, ids, weights = fwd_pipeline(routing_a, routing_b, hidden, hidden_scale, w1, s1, w2,
                                         s2, offset)
        return out, (routing_a, routing_b, hidden, hidden_scale, w1, s1, w2, s2, offset, ids,
                     weights)

    def core_bwd(res, ct):
        routing_a, routing_b, hidden, hidden_scale, w1, s1, w2, s2, offset, ids, weights = res
        ct_y = ct if cfg.do_finalize else ct.expert_outputs
        dw, d_hidden, ds1, ds2 = bwd_pipeline(ids, weights, hidden, hidden_scale, w1, s1, w2, s2,
                                              offset, ct_y)
        if not cfg.do_finalize:
            dw = dw + ct.topk_weights.astype(jnp.float32)
        dw = _match_vma(dw, weights)
        if cfg.routed:
            d_a, d_b = None, dw.astype(routing_b.dtype)
        else:
            _, vjp = jax.vjp(lambda l: routing_weights(l, ids, cfg.routing_method_type,
                                                       cfg.routed_scaling_factor), routing_a)
            (d_a,) = vjp(dw)
            d_a = d_a.astype(routing_a.dtype)
            d_b = None if routing_b is None else jnp.zeros_like(routing_b)
        if cfg.float_hidden:
            d_h, d_hs = d_hidden.astype(hidden.dtype), None
        else:
            d_h, d_hs = None, d_hidden
        return (_match_vma(d_a, routing_a), _match_vma(d_b, routing_b), _match_vma(d_h, hidden),
                _match_vma(d_hs, hidden_scale), None, _match_vma(ds1, s1), None,
                _match_vma(ds2, s2), None)

    core.defvjp(core_fwd, core_bwd)
    # jit: called eagerly, the pipeline compiles once per shape instead of running op by op.
    return jax.jit(core)


def moe(forward, cfg, routing_a, routing_b, hidden_states, hidden_states_scale, gemm1_weights,
        gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, local_expert_offset):
    """Differentiable, vmappable MoE call.

    `forward(cfg, routing_a, routing_b, hidden, hidden_scale, w1, s1, w2, s2, offset)` runs the
    stages of the selected backend and returns (result, ids int32 [T, k], weights [T, k]), where
    result is the public output (bf16 [T, H] or `MoEOutputs`). Routing inputs are
    (logits [T, E], bias [E] or None) or, with cfg.routed, (ids int32 [T, k], weights [T, k]);
    with cfg.float_hidden, `hidden_states` is float [T, H] and `hidden_states_scale` None."""
    try:
        cfg = cfg._replace(static_offset=operator.index(local_expert_offset))
    except TypeError:  # traced, e.g. axis_index * E_loc inside shard_map
        pass
    offset = jnp.asarray(local_expert_offset, jnp.int32)
    return _core(forward, cfg)(routing_a, routing_b, hidden_states, hidden_states_scale,
                               gemm1_weights, gemm1_weights_scale, gemm2_weights,
                               gemm2_weights_scale, offset)
