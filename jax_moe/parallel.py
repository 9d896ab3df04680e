"""Expert parallelism (SPEC section 4): the MoE layer with its experts sharded over a mesh axis.

Two levels:

* `ep_moe` / `ep_routed_moe` run **inside** a `shard_map` (yours or ours). They take the
  per-shard arrays: expert weights sharded on their leading (expert) axis over `axis_name`, so a
  shard holds E_loc = E / P experts and computes them with `local_expert_offset =
  axis_index(axis_name) * E_loc`.
* `expert_parallel_moe` / `expert_parallel_routed_moe` take a `Mesh`, the expert axis name and
  global arrays (e.g. `NamedSharding`-placed, under `jax.jit`), build the `shard_map` with the right
  `PartitionSpec`s, pad the token count to a multiple of the token shards and strip the padding.

The expert stages run per shard, so with `backend="cuda"`/`"auto"` each device calls the CUDA
custom calls on its own rows; nothing is all-gathered around them. Everything is differentiable
like the single-device entries (SPEC section 5): the collectives transpose, and in the all_to_all
mode the logits' gradient is that of the routing-weight formula with the selection held fixed.
The wrappers build their `shard_map` with `check_vma=False`, which the CUDA custom calls need
(they carry no varying-axes typing); with backend="xla" your own `shard_map` may also use
`check_vma=True` (this module and the pure-JAX stages are `check_vma`-clean).

Combine modes (`mode=`):

``"psum"``
    Tokens replicated over `axis_name`. Every shard routes all of its tokens, computes the slots
    whose expert it owns, and the partial [T, H] outputs are summed with `psum` in `reduce_dtype`
    and rounded to bfloat16. With the default float32 the partials are formed in float32 from
    the per-slot bf16 expert outputs (do_finalize=False internally, a [T, k, H] bf16 buffer per
    shard), so the result matches the single-device one up to float32 re-association; with
    bfloat16 each shard finalizes (bf16 partials) and the psum moves half the bytes.
``"psum_scatter"``
    As "psum", but the sum comes back token-sharded over `axis_name` (`psum_scatter`): shard i
    receives tokens [i*T/P, (i+1)*T/P). Needs T divisible by P (the wrapper pads).
``"all_to_all"``
    Tokens sharded over `axis_name`. Each shard routes its own tokens (routing runs once per
    token), sends every routed row (fp8 hidden row + its [H/128] float32 scales + expert id) only
    to the shard owning its expert, that shard runs its experts on the rows it received, the bf16
    per-row expert outputs travel back, and the source combines them like SPEC section 3 step 6:
    out[t] = bf16(sum_j float32(w[t, j]) * float32(y[t, j])), summed in slot order. The result
    is the single-device result (same rounding points), token-sharded.

All-to-all transports (`dispatch=`):

``"dense"`` (default, every backend)
    `lax.all_to_all` of static [P, C] row buffers. C = min(worst, round_up_8(capacity_factor *
    T_loc * k / P)), where worst = T_loc * min(k, E_loc) (T_loc * k for pre-routed ids, which may
    repeat an expert) is the most rows one shard can send to one other shard. Rows bound for a
    destination go in rounds of C (slot order): the shards agree (`pmax`) on rounds =
    ceil(max rows for one destination / C) and run that many exchanges, inside a static-length
    loop of ceil(T_loc * k / C) iterations whose unused ones are skipped (a `cond`), so no row is
    ever dropped, whatever the routing, and balanced routing takes one round.
    `capacity_factor=None` means C = worst (one round).
``"ragged"`` (GPU)
    `lax.ragged_all_to_all` with the exact per-destination row counts (exchanged first with a
    small `all_gather` of the [P, P] count matrix); only routed rows move. The receive buffer has
    P * T_loc * k rows (everything could come to one shard), so nothing can overflow. XLA:CPU
    does not implement `ragged-all-to-all` (jax 0.10), so this raises on CPU. On one host's GPUs
    XLA's collective itself is slow (2x H200, jaxlib 0.11: 93 ms vs 4.7 ms for dense at
    T=4096; openxla/xla#33386): prefer "dense" there.

Bytes sent per device, dispatch + return (row = H fp8 + 4 id bytes + 4*H/128 scale bytes out,
2*H bf16 back): dense rounds * (P-1) * C * (3H + H/32 + 4); ragged n_remote * (3H + H/32 + 4) with
n_remote <= k * T_loc the routed rows whose expert is on another shard. The psum mode all-reduces
T * H * 4 bytes (float32) instead, i.e. it scales with P * T_loc rather than k * T_loc.
"""
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from . import _checks, api, reference, routing
from .api import MoEOutputs
from .enums import ActivationType, RoutingMethodType
from .routing import unpack_topk

MODES = ("psum", "psum_scatter", "all_to_all")
DISPATCH = ("dense", "ragged")

# The collective used by dispatch="ragged"; tests on CPU swap in `_emulated_ragged_all_to_all`.
_RAGGED_ALL_TO_ALL = None


# ----------------------------------------------------------------------------- helpers
def _axis_tuple(axis_name):
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _check_mode(mode, dispatch, capacity_factor):
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if dispatch not in DISPATCH:
        raise ValueError(f"dispatch: expected one of {DISPATCH}, got {dispatch!r}")
    if capacity_factor is not None and not (float(capacity_factor) > 0):
        raise ValueError(f"capacity_factor: expected a float > 0 or None, got {capacity_factor!r}")


def _ep_geometry(axis_name, num_experts, gemm1_weights):
    """-> (P, E_loc, offset traced int32) for this shard; checks E == P * E_loc."""
    size = jax.lax.axis_size(axis_name)
    e_loc = gemm1_weights.shape[0]
    if num_experts != size * e_loc:
        expected = num_experts // size if num_experts % size == 0 else "num_experts / P"
        raise ValueError(
            f"gemm1_weights: expected {expected} experts per shard (num_experts={num_experts} "
            f"over axis {axis_name!r} of size {size}), got a shard of {e_loc} (per-shard shape "
            f"{tuple(gemm1_weights.shape)}); shard the weights' expert axis over {axis_name!r} "
            f"and make num_experts divisible by {size}")
    offset = jax.lax.axis_index(axis_name).astype(jnp.int32) * np.int32(e_loc)
    return size, e_loc, offset


def _varying(x, axes):
    """Marks x as varying over `axes` (for shard_map's check_vma) unless it already is."""
    have = set(reference.varying_axes(jax.typeof(x)))
    missing = tuple(a for a in axes if a not in have)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


@jax.custom_jvp
def _straight_through(x, value):
    """Returns `value`; derivatives pass to `x` as if it were returned."""
    del x
    return value


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    return primals[1], tangents[0]


def _check_token_mask(token_mask, t):
    if token_mask is None:
        return None
    _checks.check_array(token_mask, "token_mask", 1, (jnp.bool_,))
    _checks.expect_shape(token_mask, "token_mask", (t,), "[T] per shard")
    return token_mask


# ----------------------------------------------------------------------------- psum modes
def _local_finalize(reduce_dtype):
    """psum modes: with a reduce dtype wider than bf16 the shards' partial sums are formed from
    the unweighted per-slot outputs without rounding them to bf16 first (finalize in float32)."""
    return jnp.dtype(reduce_dtype) == jnp.dtype(jnp.bfloat16)


def _psum_combine(out, axis_name, mode, do_finalize, reduce_dtype, token_mask):
    scatter = mode == "psum_scatter"
    if do_finalize and not _local_finalize(reduce_dtype):
        out = reference.combine_slots(out.expert_outputs, out.topk_weights, jnp.dtype(reduce_dtype))

    def reduce(x, dtype):
        x = x.astype(dtype)
        if x.shape[0] == 0:  # T = 0: nothing to reduce (reduce_scatter rejects empty arrays)
            return x
        if scatter:
            return jax.lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=True)
        return jax.lax.psum(x, axis_name)

    def shard_rows(x):  # this shard's slice of a replicated token-major array
        if not scatter:
            return x
        size = jax.lax.axis_size(axis_name)
        n = x.shape[0] // size
        return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis_name) * n, n, 0)

    if do_finalize:
        if token_mask is not None:
            out = jnp.where(token_mask[:, None], out, jnp.zeros((), out.dtype))
        return reduce(out, reduce_dtype).astype(jnp.bfloat16)
    y, w, ids = out
    if token_mask is not None:
        y = jnp.where(token_mask[:, None, None], y, jnp.zeros((), y.dtype))
    # exactly one shard holds each slot's (nonzero) output: the bf16 sum is exact.
    return MoEOutputs(reduce(y, jnp.bfloat16), shard_rows(w), shard_rows(ids))


# ----------------------------------------------------------------------------- all-to-all
def _dispatch_plan(ids, num_experts, e_loc, size, token_mask):
    """Groups the T*k slots by destination shard (stable, slot order within a destination).

    -> dest [n] (size = not sent), pos [n] (position within its destination group),
    order [n] (slots sorted by destination), counts [size], starts [size]."""
    t, k = ids.shape
    n = t * k
    flat = ids.reshape(n)
    valid = (flat >= 0) & (flat < num_experts)
    if token_mask is not None:
        valid = valid & jnp.repeat(token_mask, k)
    dest = jnp.where(valid, flat // e_loc, size).astype(jnp.int32)
    order = jnp.argsort(dest, stable=True).astype(jnp.int32)
    counts = jnp.zeros(size + 1, jnp.int32).at[dest].add(1)[:size]
    starts = (jnp.cumsum(counts) - counts).astype(jnp.int32)
    sorted_dest = dest[order]
    rank = jnp.arange(n, dtype=jnp.int32) - starts[jnp.minimum(sorted_dest, size - 1)]
    pos = jnp.zeros(n, jnp.int32).at[order].set(rank)
    return dest, pos, order, counts, starts


def _pack_rows(hidden_states, ids, slot, k):
    """Rows for the slots `slot` [R] (-1: empty row): payload uint8 [R, H + 4] = fp8 hidden row
    bytes + int32 expert id (-1 for empty rows)."""
    ok = slot >= 0
    tok = jnp.where(ok, slot // k, 0)
    hid = jax.lax.bitcast_convert_type(hidden_states[tok], jnp.uint8)
    hid = jnp.where(ok[:, None], hid, jnp.zeros((), jnp.uint8))
    eid = jnp.where(ok, ids.reshape(-1)[jnp.maximum(slot, 0)], -1).astype(jnp.int32)
    return jnp.concatenate([hid, jax.lax.bitcast_convert_type(eid, jnp.uint8)], axis=1)


def _unpack_rows(payload, h):
    hidden = jax.lax.bitcast_convert_type(payload[:, :h], jnp.float8_e4m3fn)
    eid = jax.lax.bitcast_convert_type(payload[:, h:h + 4], jnp.int32)
    return hidden, eid


def _row_scales(hidden_states_scale, slot, k):
    ok = slot >= 0
    s = hidden_states_scale.T[jnp.where(ok, slot // k, 0)]
    return jnp.where(ok[:, None], s, 0.0)


def _dense_exchange(capacity, max_rounds, stuff, compute):
    """Dispatch -> compute -> return through `all_to_all` of static [P, capacity] row buffers.

    Round r carries, for every destination d, the slots of rank [r*C, (r+1)*C) among those bound
    for d (slot order). All shards of the axis run `rounds = ceil(pmax(max count) / C)` rounds
    (<= max_rounds = ceil(T_loc * k / C), a static bound, so the loop is a differentiable scan whose
    extra iterations are skipped by a `cond`): no row is ever dropped, and the usual case is one
    round."""
    (ids, hidden_states, hidden_states_scale, axis_name, size, dest, pos, order, counts,
     starts) = stuff
    t, k = ids.shape
    n = t * k
    h = hidden_states.shape[1]
    c = capacity
    b = jnp.arange(size * c, dtype=jnp.int32)
    d, rb = b // c, b % c  # buffer row b = d * C + rb: bound for shard d
    sent = dest < size

    def one_round(r, acc):
        rank = r * c + rb
        slot = jnp.where(rank < counts[d], order[jnp.minimum(starts[d] + rank, n - 1)], -1)
        payload = jax.lax.all_to_all(_pack_rows(hidden_states, ids, slot, k), axis_name, 0, 0,
                                     tiled=True)
        scales = jax.lax.all_to_all(_row_scales(hidden_states_scale, slot, k), axis_name, 0, 0,
                                    tiled=True)
        y = jax.lax.all_to_all(compute(payload, scales), axis_name, 0, 0, tiled=True)
        mine = sent & (pos >= r * c) & (pos < (r + 1) * c)
        idx = jnp.where(mine, dest * c + pos - r * c, 0)
        return jnp.where(mine[:, None], y[idx], acc)

    acc = _varying(jnp.zeros_like(hidden_states, shape=(n, h), dtype=jnp.bfloat16),
                   _axis_tuple(axis_name))
    if max_rounds == 1:
        return one_round(0, acc)
    rounds = jax.lax.pmax((jnp.max(counts) + c - 1) // c, axis_name)

    def body(r, acc):
        return jax.lax.cond(r < rounds, partial(one_round, r), lambda a: a, acc)

    return jax.lax.fori_loop(0, max_rounds, body, acc)


def _platform():
    """Platform of the devices being traced for (the shard_map's mesh), else the default one."""
    try:
        device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    except Exception:  # pragma: no cover - older jax
        device = None
    return getattr(device, "platform", None) or jax.default_backend()


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
    """`lax.ragged_all_to_all` semantics from a dense worst-case `all_to_all` (for CPU tests)."""
    del recv_sizes
    cap = operand.shape[0]
    r = jnp.arange(cap, dtype=jnp.int32)
    src = input_offsets[:, None] + r[None, :]  # [size, cap]
    ok = r[None, :] < send_sizes[:, None]
    chunks = jnp.where(ok.reshape(ok.shape + (1,) * (operand.ndim - 1)),
                       operand[jnp.where(ok, src, 0)], jnp.zeros((), operand.dtype))
    chunks = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=False)
    where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    sizes = jax.lax.all_to_all(send_sizes, axis_name, 0, 0, tiled=True)
    dst = jnp.where(r[None, :] < sizes[:, None], where[:, None] + r[None, :], output.shape[0])
    return output.at[dst.reshape(-1)].set(chunks.reshape((-1,) + operand.shape[1:]), mode="drop")


def _ragged_exchange(recv_rows, stuff, compute):
    """Exact-size dispatch -> compute -> return with `lax.ragged_all_to_all`."""
    (ids, hidden_states, hidden_states_scale, axis_name, size, dest, pos, order, counts,
     starts) = stuff
    ragged = _RAGGED_ALL_TO_ALL
    if ragged is None:
        if _platform() == "cpu":
            raise NotImplementedError(
                "dispatch='ragged': XLA:CPU does not implement ragged-all-to-all; use "
                "dispatch='dense' on CPU")
        ragged = jax.lax.ragged_all_to_all
    t, k = ids.shape
    me = jax.lax.axis_index(axis_name)
    # m[s, d] = rows shard s sends to shard d
    m = jax.lax.all_gather(counts, axis_name, axis=0, tiled=False)
    excl_rows = jnp.cumsum(m, axis=1) - m  # [s, d] start of s's chunk for d in s's send buffer
    excl_cols = jnp.cumsum(m, axis=0) - m  # [s, d] start of s's chunk in d's receive buffer
    slot = jnp.where(dest[order] < size, order, -1)  # send buffer = slots sorted by destination
    payload = _pack_rows(hidden_states, ids, slot, k)
    scales = _row_scales(hidden_states_scale, slot, k)
    axes = _axis_tuple(axis_name)
    recv_payload = jnp.zeros((recv_rows, payload.shape[1]), jnp.uint8).at[:, -4:].set(0xFF)  # id -1
    recv_payload = _varying(recv_payload, axes)
    recv_scales = _varying(jnp.zeros((recv_rows, scales.shape[1]), scales.dtype), axes)
    out_off = excl_cols[me]  # where my chunk for d lands in d's buffer
    recv_sizes = m[:, me]
    recv_payload = ragged(payload, recv_payload, starts, counts, out_off, recv_sizes,
                          axis_name=axis_name)
    recv_scales = ragged(scales, recv_scales, starts, counts, out_off, recv_sizes,
                         axis_name=axis_name)
    y = compute(recv_payload, recv_scales)  # bf16 [recv_rows, H]
    back = ragged(y, _varying(jnp.zeros((t * k, y.shape[1]), y.dtype), axes), excl_cols[:, me],
                  recv_sizes,
                  excl_rows[:, me], counts, axis_name=axis_name)
    sent = dest < size
    idx = jnp.where(sent, starts[jnp.minimum(dest, size - 1)] + pos, 0)
    return jnp.where(sent[:, None], back[idx], jnp.zeros((), back.dtype))


def _all_to_all_moe(ids, weights, hidden_states, hidden_states_scale, gemm1_weights,
                    gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, axis_name,
                    num_experts, intermediate_size, activation_type, do_finalize, backend,
                    token_mask, dispatch, capacity_factor, distinct_ids):
    t, k = ids.shape
    h = hidden_states.shape[1]
    size, e_loc, offset = _ep_geometry(axis_name, num_experts, gemm1_weights)

    def compute(payload, scales):
        hidden, eid = _unpack_rows(payload, h)
        ones = jnp.ones((eid.shape[0], 1), jnp.bfloat16)
        out = api.fp8_block_scale_routed_moe(
            (eid[:, None], ones), None, hidden, scales.T, gemm1_weights, gemm1_weights_scale,
            gemm2_weights, gemm2_weights_scale, top_k=1, num_experts=num_experts,
            intermediate_size=intermediate_size, local_expert_offset=offset,
            activation_type=activation_type, do_finalize=False, backend=backend)
        return out.expert_outputs[:, 0, :]

    if t == 0:
        per_slot = jnp.zeros((0, k, h), jnp.bfloat16)
    else:
        dest, pos, order, counts, starts = _dispatch_plan(ids, num_experts, e_loc, size, token_mask)
        stuff = (ids, hidden_states, hidden_states_scale, axis_name, size, dest, pos, order,
                 counts, starts)
        # rows one shard can send to one other shard: t * k in any case (ids repeated within a
        # token), t * min(k, E_loc) when the router picks k distinct experts
        bound = t * k
        worst = t * min(k, e_loc) if distinct_ids else bound
        if dispatch == "ragged":
            per_slot = _ragged_exchange(size * bound, stuff, compute)
        else:
            cap = worst
            if capacity_factor is not None:
                cap = min(worst, max(8, -(-math.ceil(capacity_factor * t * k / size) // 8) * 8))
            per_slot = _dense_exchange(cap, -(-bound // cap), stuff, compute)
        per_slot = per_slot.reshape(t, k, h)
    if do_finalize:
        return reference.combine_slots(per_slot, weights)
    return MoEOutputs(per_slot, weights, ids)


# ----------------------------------------------------------------------------- inside shard_map
def ep_moe(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
           gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, axis_name, top_k,
           mode="psum", num_experts=None, n_group=None, topk_group=None, intermediate_size=None,
           routed_scaling_factor=None, routing_method_type=RoutingMethodType.DeepSeekV3,
           activation_type=ActivationType.Swiglu, do_finalize=True, backend="auto",
           token_mask=None, dispatch="dense", capacity_factor=2.0, reduce_dtype=jnp.float32):
    """Expert-parallel `fp8_block_scale_moe`, to call inside `shard_map` over `axis_name`.

    Arrays are this shard's blocks: expert weights [E_loc, ...] (the expert axis sharded over
    `axis_name`, E = P * E_loc), `routing_logits` [T, E] with all E experts, token arrays
    [T, ...] (`hidden_states_scale` [H/128, T]). With mode "psum"/"psum_scatter" the T tokens
    must be the same on every shard of `axis_name`; with "all_to_all" each shard holds its own.
    `local_expert_offset` is `axis_index(axis_name) * E_loc`.

    Returns bf16 [T, H] ("psum", "all_to_all") or [T/P, H] ("psum_scatter"), or `MoEOutputs`
    with `do_finalize=False` (complete per-slot outputs, not partial). `token_mask` bool [T]
    (optional): tokens where it is False are not computed (all_to_all: not dispatched) and come
    out zero. `dispatch`, `capacity_factor` (all_to_all) and `reduce_dtype` (psum modes): see the
    module docstring. Other arguments as `jax_moe.fp8_block_scale_moe`."""
    _check_mode(mode, dispatch, capacity_factor)
    method = _checks.routing_method(routing_method_type)
    e = _checks.check_logits(routing_logits, routing_bias, num_experts)
    token_mask = _check_token_mask(token_mask, routing_logits.shape[0])
    if mode != "all_to_all":
        _ep_geometry(axis_name, e, gemm1_weights)
        offset = jax.lax.axis_index(axis_name).astype(jnp.int32) * np.int32(gemm1_weights.shape[0])
        out = api.fp8_block_scale_moe(
            routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
            gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, top_k=top_k, num_experts=e,
            n_group=n_group, topk_group=topk_group, intermediate_size=intermediate_size,
            local_expert_offset=offset, routed_scaling_factor=routed_scaling_factor,
            routing_method_type=method, activation_type=activation_type,
            do_finalize=do_finalize and _local_finalize(reduce_dtype), backend=backend)
        return _psum_combine(out, axis_name, mode, do_finalize, reduce_dtype, token_mask)
    _checks.check_experts(
        hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights,
        gemm2_weights_scale, num_tokens=routing_logits.shape[0], num_experts=e,
        intermediate_size=intermediate_size, local_expert_offset=0, local_num_experts=None,
        activation_type=activation_type)
    ids, weights = api.route(routing_logits, routing_bias, top_k=top_k, num_experts=e,
                             n_group=n_group, topk_group=topk_group,
                             routed_scaling_factor=routed_scaling_factor,
                             routing_method_type=method, backend=backend)
    # SPEC section 5: the logits' gradient is that of the weight formula with the selection fixed
    # and the bf16 rounding passed straight through (as in the single-device entry).
    ids = jax.lax.stop_gradient(ids)
    rsf = None if routed_scaling_factor is None else float(routed_scaling_factor)
    weights = _straight_through(
        routing.routing_weights(routing_logits, ids, method, rsf),
        jax.lax.stop_gradient(weights).astype(jnp.float32)).astype(jnp.bfloat16)
    return _all_to_all_moe(ids, weights, hidden_states, hidden_states_scale, gemm1_weights,
                           gemm1_weights_scale, gemm2_weights, gemm2_weights_scale,
                           axis_name=axis_name, num_experts=e, intermediate_size=intermediate_size,
                           activation_type=activation_type, do_finalize=do_finalize,
                           backend=backend, token_mask=token_mask, dispatch=dispatch,
                           capacity_factor=capacity_factor, distinct_ids=True)


def ep_routed_moe(topk_ids, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                  gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, axis_name, top_k,
                  num_experts, mode="psum", n_group=None, topk_group=None, intermediate_size=None,
                  routed_scaling_factor=None, routing_method_type=RoutingMethodType.DeepSeekV3,
                  activation_type=ActivationType.Swiglu, do_finalize=True, backend="auto",
                  token_mask=None, dispatch="dense", capacity_factor=2.0,
                  reduce_dtype=jnp.float32):
    """Expert-parallel `fp8_block_scale_routed_moe` (pre-routed), inside `shard_map`.

    `topk_ids`: packed int32 [T, k] or (ids int32 [T, k], weights [T, k]) with global expert ids
    (ids outside [0, num_experts) are skipped). `num_experts` (the global E) is required.
    Everything else as `ep_moe`."""
    _check_mode(mode, dispatch, capacity_factor)
    t, k = _checks.check_topk_ids(topk_ids)
    num_experts = _checks._static_int(num_experts, "num_experts", minimum=1)
    token_mask = _check_token_mask(token_mask, t)
    if mode != "all_to_all":
        _ep_geometry(axis_name, num_experts, gemm1_weights)
        offset = jax.lax.axis_index(axis_name).astype(jnp.int32) * np.int32(gemm1_weights.shape[0])
        out = api.fp8_block_scale_routed_moe(
            topk_ids, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
            gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, top_k=top_k,
            num_experts=num_experts, n_group=n_group, topk_group=topk_group,
            intermediate_size=intermediate_size, local_expert_offset=offset,
            routed_scaling_factor=routed_scaling_factor, routing_method_type=routing_method_type,
            activation_type=activation_type,
            do_finalize=do_finalize and _local_finalize(reduce_dtype), backend=backend)
        return _psum_combine(out, axis_name, mode, do_finalize, reduce_dtype, token_mask)
    top_k = _checks._static_int(top_k, "top_k", minimum=1)
    if k != top_k:
        raise ValueError(f"topk_ids: expected shape [T, top_k={top_k}], got {(t, k)}")
    _checks.routing_method(routing_method_type)
    _checks.check_bias(routing_bias, num_experts)
    _checks.check_experts(
        hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights,
        gemm2_weights_scale, num_tokens=t, num_experts=num_experts,
        intermediate_size=intermediate_size, local_expert_offset=0, local_num_experts=None,
        activation_type=activation_type)
    ids, weights = topk_ids if isinstance(topk_ids, (tuple, list)) else unpack_topk(topk_ids)
    return _all_to_all_moe(ids, weights, hidden_states, hidden_states_scale, gemm1_weights,
                           gemm1_weights_scale, gemm2_weights, gemm2_weights_scale,
                           axis_name=axis_name, num_experts=num_experts,
                           intermediate_size=intermediate_size, activation_type=activation_type,
                           do_finalize=do_finalize, backend=backend, token_mask=token_mask,
                           dispatch=dispatch, capacity_factor=capacity_factor, distinct_ids=False)


# ----------------------------------------------------------------------------- mesh wrappers
def _mesh_axes(mesh, axis_name, token_axis):
    names = tuple(mesh.axis_names)
    expert = _axis_tuple(axis_name)
    tok = () if token_axis is None else _axis_tuple(token_axis)
    for a in expert + tok:
        if a not in names:
            raise ValueError(f"axis {a!r}: not an axis of the mesh {names}")
    if set(expert) & set(tok):
        raise ValueError(f"token_axis: must not contain the expert axis {axis_name!r}, "
                         f"got {token_axis!r}")
    return expert, tok


def _spec_entry(axes):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _is_explicit(mesh):
    return any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _place(x, mesh, spec):
    """Explicit-axis meshes need inputs resharded to the shard_map's specs; Auto meshes don't."""
    if x is None or not _is_explicit(mesh):
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def _expert_parallel(entry, mesh, axis_name, first, routing_bias, hidden_states,
                     hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights,
                     gemm2_weights_scale, mode, token_axis, do_finalize, kwargs):
    _check_mode(mode, kwargs.get("dispatch", "dense"), kwargs.get("capacity_factor"))
    expert, tok = _mesh_axes(mesh, axis_name, token_axis)
    size = math.prod(mesh.shape[a] for a in expert)
    shards_in = math.prod(mesh.shape[a] for a in tok) * (size if mode == "all_to_all" else 1)
    shards_out = math.prod(mesh.shape[a] for a in tok) * (size if mode != "psum" else 1)
    in_tok = _spec_entry(tok + expert if mode == "all_to_all" else tok)
    out_tok = _spec_entry(tok + expert if mode != "psum" else tok)
    ep_axis = _spec_entry(expert)

    pair = isinstance(first, (tuple, list))  # pre-routed (ids, weights)
    t = (first[0] if pair else first).shape[0]
    mult = math.lcm(shards_in, shards_out)
    t_pad = -(-t // mult) * mult
    pad = t_pad - t

    def pad_rows(x, axis=0, value=0):
        if pad == 0 or x is None:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        return jnp.pad(x, widths, constant_values=value)

    # padded ids are -1 (packed: id 0xFFFF), i.e. skipped; the token mask covers padded logits
    if pair:
        first = (pad_rows(first[0], value=-1), pad_rows(first[1]))
        first_spec = (P(in_tok, None), P(in_tok, None))
    else:
        first = pad_rows(first, value=-1 if first.dtype == jnp.int32 else 0)
        first_spec = P(in_tok, None)
    hidden_states = pad_rows(hidden_states)
    hidden_states_scale = pad_rows(hidden_states_scale, axis=1)
    mask = None if pad == 0 else jnp.arange(t_pad) < t

    wspec = P(ep_axis, None, None)
    args = [first, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
            gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, mask]
    specs = [first_spec, None if routing_bias is None else P(None), P(in_tok, None),
             P(None, in_tok), wspec, wspec, wspec, wspec, None if mask is None else P(in_tok)]
    args = [tuple(_place(x, mesh, sx) for x, sx in zip(a, s)) if isinstance(a, tuple)
            else _place(a, mesh, s) for a, s in zip(args, specs)]

    def body(first, bias, hs, hss, w1, s1, w2, s2, m):
        return entry(first, bias, hs, hss, w1, s1, w2, s2, axis_name=_spec_entry(expert),
                     mode=mode, do_finalize=do_finalize, token_mask=m, **kwargs)

    if do_finalize:
        out_specs = P(out_tok, None)
    else:
        out_specs = MoEOutputs(P(out_tok, None, None), P(out_tok, None), P(out_tok, None))
    fn = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=out_specs,
                       check_vma=False)
    out = fn(*args)
    if pad:
        out_axes = tok + expert if mode != "psum" else tok
        out = jax.tree.map(lambda x: _strip(x, t, mesh, out_axes), out)
    return out


def _strip(x, t, mesh, tok_axes):
    """x[:t]; on an Explicit-axes mesh the token axis is first resharded over the longest prefix of
    its mesh axes whose size divides t (explicit sharding does not allow ragged shards)."""
    if _is_explicit(mesh):
        keep = ()
        for a in tok_axes:
            if t % math.prod(mesh.shape[b] for b in keep + (a,)):
                break
            keep += (a,)
        spec = P(_spec_entry(keep), *([None] * (x.ndim - 1)))
        x = jax.sharding.reshard(x, NamedSharding(mesh, spec))
    return x[:t]


def expert_parallel_moe(mesh, axis_name, routing_logits, routing_bias, hidden_states,
                        hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights,
                        gemm2_weights_scale, *, top_k, mode="psum", token_axis=None,
                        do_finalize=True, **kwargs):
    """`fp8_block_scale_moe` with the experts sharded over `mesh` axis `axis_name`.

    Global arrays in, global arrays out (jit-able; inputs may carry any sharding, typically
    `NamedSharding(mesh, ...)`): weights [E, ...] are sharded on E over `axis_name`; tokens
    [T, ...] are sharded over `token_axis` (None, a mesh axis name or a tuple of them, e.g.
    "data" for data x expert parallelism) and, with mode="all_to_all", also over `axis_name`.
    The output [T, H] (or `MoEOutputs`) is token-sharded the same way ("psum": over `token_axis`;
    "psum_scatter" and "all_to_all": over `token_axis` and `axis_name`). T need not divide the
    number of token shards: the wrapper pads and strips. `kwargs`: the keyword arguments of
    `ep_moe` (num_experts, n_group, topk_group, routed_scaling_factor, routing_method_type,
    activation_type, backend, dispatch, capacity_factor, reduce_dtype, ...)."""
    kwargs = dict(kwargs, top_k=top_k)
    return _expert_parallel(
        ep_moe, mesh, axis_name, routing_logits, routing_bias, hidden_states,
        hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights,
        gemm2_weights_scale, mode, token_axis, do_finalize, kwargs)


def expert_parallel_routed_moe(mesh, axis_name, topk_ids, routing_bias, hidden_states,
                               hidden_states_scale, gemm1_weights, gemm1_weights_scale,
                               gemm2_weights, gemm2_weights_scale, *, top_k, num_experts,
                               mode="psum", token_axis=None, do_finalize=True, **kwargs):
    """`fp8_block_scale_routed_moe` with the experts sharded over `mesh` axis `axis_name`;
    `topk_ids` packed int32 [T, k] or (ids, weights). See `expert_parallel_moe`."""
    kwargs = dict(kwargs, top_k=top_k, num_experts=num_experts)
    return _expert_parallel(
        ep_routed_moe, mesh, axis_name, topk_ids, routing_bias, hidden_states,
        hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights,
        gemm2_weights_scale, mode, token_axis, do_finalize, kwargs)
