"""Routing formulas of SPEC section 2 in pure JAX, and the packed top-k format."""
import jax
import jax.numpy as jnp

from .enums import RoutingMethodType as R


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _softmax(x):
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _topk(v, k):
    """k largest along the last axis, descending; on ties the smaller index wins.

    lax.top_k already breaks ties by the lower index; NaN ranks above every number.
    """
    return jax.lax.top_k(v, k)


def _grouped_select(b, k, n_group, topk_group):
    """DeepSeekV3 group-limited selection over the biased scores b [T, E] -> ids [T, k]."""
    t, e = b.shape
    per_group = e // n_group
    grouped = b.reshape(t, n_group, per_group)
    top2, _ = _topk(grouped, min(2, per_group))
    group_score = jnp.sum(top2, axis=-1)  # [T, n_group]
    _, kept = _topk(group_score, topk_group)  # [T, topk_group]
    keep = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], kept].set(True)
    masked = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, e)
    _, ids = _topk(masked, k)
    return ids


def select(logits, bias, top_k, method, n_group=None, topk_group=None):
    """The selection of SPEC section 2: float32 logits [T, E] (+ bias [E]) -> ids int32 [T, k]."""
    if method == R.Default or method == R.RenormalizeNaive:
        scores = _softmax(logits)
    elif method in (R.DeepSeekV3, R.MiniMax2):
        scores = _sigmoid(logits) + bias
        if method == R.DeepSeekV3 and n_group is not None and n_group > 1:
            return _grouped_select(scores, top_k, n_group, topk_group)
    elif method in (R.SigmoidRenorm, R.Sigmoid):
        scores = _sigmoid(logits)
    else:  # Renormalize, Llama4, TopK, TopKSigmoid select on the raw logits
        scores = logits
    return _topk(scores, top_k)[1]


def routing_weights(routing_logits, topk_ids, routing_method_type, routed_scaling_factor=None):
    """The weight formula of SPEC section 2 as a (differentiable) function of the logits with the
    selection `topk_ids` [T, k] held fixed -> float32 [T, k], before the bf16 rounding."""
    method = R(routing_method_type)
    logits = jnp.asarray(routing_logits).astype(jnp.float32)
    rsf = 1.0 if routed_scaling_factor is None else float(routed_scaling_factor)

    def take(v):
        return jnp.take_along_axis(v, topk_ids, axis=-1)

    if method == R.Default:
        return take(_softmax(logits))
    if method == R.Renormalize:
        return _softmax(take(logits))
    if method in (R.DeepSeekV3, R.MiniMax2):
        s = _sigmoid(take(logits))
        return s / (jnp.sum(s, axis=-1, keepdims=True) + 1e-20) * rsf
    if method in (R.Llama4, R.Sigmoid, R.TopKSigmoid):
        return _sigmoid(take(logits))
    if method == R.RenormalizeNaive:
        p = take(_softmax(logits))
        return p / jnp.sum(p, axis=-1, keepdims=True)
    if method == R.TopK:
        return take(logits)
    if method == R.SigmoidRenorm:
        s = _sigmoid(take(logits))
        return s / jnp.maximum(jnp.sum(s, axis=-1, keepdims=True), 1e-20)
    raise NotImplementedError(f"routing_method_type {method!r}")  # pragma: no cover


def route_xla(routing_logits, routing_bias, *, top_k, routing_method_type, n_group=None,
              topk_group=None, routed_scaling_factor=None):
    """logits [T, E] (+ bias [E]) -> (topk_ids int32 [T, k], topk_weights bfloat16 [T, k])."""
    method = R(routing_method_type)
    logits = jnp.asarray(routing_logits).astype(jnp.float32)
    bias = (jnp.zeros(logits.shape[-1], jnp.float32) if routing_bias is None
            else jnp.asarray(routing_bias).astype(jnp.float32))
    ids = select(logits, bias, 1 if method == R.Llama4 else top_k, method, n_group, topk_group)
    w = routing_weights(logits, ids, method, routed_scaling_factor)
    return ids.astype(jnp.int32), w.astype(jnp.bfloat16)


def pack_topk(topk_ids, topk_weights):
    """(ids int32 [T, k], weights [T, k]) -> packed int32 [T, k]: (id << 16) | bf16 bits of weight."""
    ids = jnp.asarray(topk_ids).astype(jnp.int32)
    bits = jax.lax.bitcast_convert_type(jnp.asarray(topk_weights).astype(jnp.bfloat16), jnp.uint16)
    return (ids << 16) | bits.astype(jnp.int32)


def unpack_topk(packed):
    """packed int32 [T, k] -> (ids int32 [T, k], weights bfloat16 [T, k])."""
    packed = jnp.asarray(packed).astype(jnp.int32)
    ids = (packed >> 16) & 0xFFFF
    bits = (packed & 0xFFFF).astype(jnp.uint16)
    return ids.astype(jnp.int32), jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
