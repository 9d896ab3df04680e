"""Every argument rule of SPEC sections 1, 2 and 6 in one place, one clear message each.

All checks run at trace time on shapes, dtypes and static parameters; nothing here reads data.
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .enums import (ActivationType, RoutingMethodType, SUPPORTED_ACTIVATIONS, is_gated)
from .quant import BLOCK, FP8

FLOAT_LOGITS = (jnp.float32, jnp.bfloat16)
BACKENDS = ("auto", "cuda", "xla")


class MoEConfig(NamedTuple):
    num_tokens: int
    hidden_size: int
    intermediate_size: int
    num_experts: int
    local_num_experts: int
    local_expert_offset: object  # int, or a traced int32 scalar (e.g. under shard_map)
    top_k: int
    routing_method_type: RoutingMethodType
    n_group: Optional[int]
    topk_group: Optional[int]
    routed_scaling_factor: Optional[float]
    activation_type: ActivationType
    do_finalize: bool
    backend: str


def _shape(x):
    return tuple(np.shape(x))


def _dtype(x):
    return jnp.dtype(x.dtype) if hasattr(x, "dtype") else jnp.asarray(x).dtype


def _fmt_dtypes(dtypes):
    return " or ".join(jnp.dtype(d).name for d in dtypes)


def check_array(x, name, ndim, dtypes):
    if x is None:
        raise ValueError(f"{name}: expected an array, got None")
    if not hasattr(x, "shape"):
        x = jnp.asarray(x)
    if len(_shape(x)) != ndim:
        raise ValueError(f"{name}: expected a rank-{ndim} array, got shape {_shape(x)}")
    if _dtype(x) not in [jnp.dtype(d) for d in dtypes]:
        raise TypeError(f"{name}: expected dtype {_fmt_dtypes(dtypes)}, got {_dtype(x).name}")
    return x


def expect_shape(x, name, expected, meaning=""):
    if _shape(x) != tuple(expected):
        note = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name}: expected shape {tuple(expected)}{note}, got {_shape(x)}")


def _static_int(v, name, minimum=None):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected a Python int, got {type(v).__name__} {v!r}")
    v = int(v)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return v


def routing_method(v):
    try:
        return RoutingMethodType(int(v))
    except (ValueError, TypeError):
        raise ValueError(f"routing_method_type: expected one of "
                         f"{[f'{m.name}={m.value}' for m in RoutingMethodType]}, got {v!r}") from None


def activation(v):
    try:
        act = ActivationType(int(v))
    except (ValueError, TypeError):
        raise ValueError(f"activation_type: expected one of "
                         f"{[f'{a.name}={a.value}' for a in SUPPORTED_ACTIVATIONS]}, got {v!r}") from None
    if act not in SUPPORTED_ACTIVATIONS:
        raise NotImplementedError(
            f"activation_type: {act.name} ({act.value}) is not implemented; supported: "
            f"{', '.join(f'{a.name}={a.value}' for a in SUPPORTED_ACTIVATIONS)}")
    return act


def backend_name(v):
    if v not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {v!r}")
    return v


def check_routing(num_experts, top_k, method, n_group, topk_group, routed_scaling_factor):
    """Rules of SPEC section 2; returns (top_k, n_group, topk_group, rsf) normalized."""
    top_k = _static_int(top_k, "top_k", minimum=1)
    if top_k > num_experts:
        raise ValueError(f"top_k: expected top_k <= num_experts = {num_experts}, got {top_k}")
    if method == RoutingMethodType.Llama4 and top_k != 1:
        raise ValueError(f"top_k: Llama4 routing needs top_k == 1, got {top_k}")
    if (n_group is None) != (topk_group is None):
        raise ValueError(f"n_group/topk_group: give both or neither, got n_group={n_group!r}, "
                         f"topk_group={topk_group!r}")
    if n_group is not None:
        n_group = _static_int(n_group, "n_group", minimum=1)
        topk_group = _static_int(topk_group, "topk_group", minimum=1)
        if n_group > 1 and method != RoutingMethodType.DeepSeekV3:
            raise ValueError(f"n_group: group-limited routing is only defined for DeepSeekV3, "
                             f"got n_group={n_group} with {method.name}")
        if num_experts % n_group:
            raise ValueError(f"n_group: num_experts ({num_experts}) must be divisible by n_group, "
                             f"got n_group={n_group}")
        if topk_group > n_group:
            raise ValueError(f"topk_group: expected topk_group <= n_group = {n_group}, got {topk_group}")
        if n_group > 1 and top_k > topk_group * (num_experts // n_group):
            raise ValueError(
                f"top_k: DeepSeekV3 grouped routing needs top_k <= topk_group * num_experts / "
                f"n_group = {topk_group * (num_experts // n_group)}, got {top_k}")
    if routed_scaling_factor is not None:
        try:
            routed_scaling_factor = float(routed_scaling_factor)
        except TypeError:
            raise TypeError(f"routed_scaling_factor: expected a float or None, got "
                            f"{type(routed_scaling_factor).__name__}") from None
    return top_k, n_group, topk_group, routed_scaling_factor


def check_logits(routing_logits, routing_bias, num_experts):
    routing_logits = check_array(routing_logits, "routing_logits", 2, FLOAT_LOGITS)
    e = _shape(routing_logits)[1]
    if num_experts is None:
        num_experts = e
    num_experts = _static_int(num_experts, "num_experts", minimum=1)
    if e != num_experts:
        raise ValueError(f"routing_logits: expected shape [T, num_experts={num_experts}], got "
                         f"{_shape(routing_logits)}")
    check_bias(routing_bias, num_experts)
    return num_experts


def check_bias(routing_bias, num_experts):
    if routing_bias is not None:
        check_array(routing_bias, "routing_bias", 1, FLOAT_LOGITS)
        expect_shape(routing_bias, "routing_bias", (num_experts,), "[num_experts]")


def check_topk_ids(topk_ids):
    """Packed int32 [T, k] or a tuple (ids int32 [T, k], weights bf16/f32 [T, k]) -> (T, k)."""
    if isinstance(topk_ids, (tuple, list)):
        if len(topk_ids) != 2:
            raise ValueError(f"topk_ids: a tuple must be (ids, weights), got {len(topk_ids)} items")
        ids, w = topk_ids
        check_array(ids, "topk_ids[0] (ids)", 2, (jnp.int32,))
        check_array(w, "topk_ids[1] (weights)", 2, (jnp.bfloat16, jnp.float32))
        if _shape(w) != _shape(ids):
            raise ValueError(f"topk_ids[1] (weights): expected shape {_shape(ids)} like the ids, got "
                             f"{_shape(w)}")
        return _shape(ids)
    check_array(topk_ids, "topk_ids", 2, (jnp.int32,))
    return _shape(topk_ids)


def check_experts(hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
                  gemm2_weights, gemm2_weights_scale, *, num_tokens, num_experts,
                  intermediate_size, local_expert_offset, local_num_experts, activation_type):
    """Shapes and dtypes of the token and weight arrays; returns (H, I, E_loc, offset)."""
    act = activation(activation_type)
    hidden_states = check_array(hidden_states, "hidden_states", 2, (FP8,))
    t, h = _shape(hidden_states)
    if num_tokens is not None and t != num_tokens:
        raise ValueError(f"hidden_states: expected {num_tokens} tokens (rows) like the routing "
                         f"input, got shape {(t, h)}")
    if h % BLOCK:
        raise ValueError(f"hidden_states: hidden size must be a multiple of {BLOCK}, got {h}")
    check_array(hidden_states_scale, "hidden_states_scale", 2, (jnp.float32,))
    expect_shape(hidden_states_scale, "hidden_states_scale", (h // BLOCK, t), "[H/128, T], token axis contiguous")

    check_array(gemm2_weights, "gemm2_weights", 3, (FP8,))
    e_loc, h2, i = _shape(gemm2_weights)
    if h2 != h:
        raise ValueError(f"gemm2_weights: expected shape [E_loc, H={h}, I], got {_shape(gemm2_weights)}")
    if i % BLOCK:
        raise ValueError(f"gemm2_weights: intermediate size (dim 2) must be a multiple of {BLOCK}, got {i}")
    if intermediate_size is not None and int(intermediate_size) != i:
        raise ValueError(f"intermediate_size: expected {i} (gemm2_weights.shape[2]), got {intermediate_size}")
    rows1 = 2 * i if is_gated(act) else i
    check_array(gemm1_weights, "gemm1_weights", 3, (FP8,))
    expect_shape(gemm1_weights, "gemm1_weights", (e_loc, rows1, h),
                 f"[E_loc, {'2I' if is_gated(act) else 'I'}, H] for {act.name}")
    check_array(gemm1_weights_scale, "gemm1_weights_scale", 3, (jnp.float32,))
    expect_shape(gemm1_weights_scale, "gemm1_weights_scale", (e_loc, rows1 // BLOCK, h // BLOCK))
    check_array(gemm2_weights_scale, "gemm2_weights_scale", 3, (jnp.float32,))
    expect_shape(gemm2_weights_scale, "gemm2_weights_scale", (e_loc, h // BLOCK, i // BLOCK))

    if local_num_experts is None:
        local_num_experts = e_loc
    local_num_experts = _static_int(local_num_experts, "local_num_experts", minimum=1)
    if local_num_experts != e_loc:
        raise ValueError(f"local_num_experts: expected gemm1_weights.shape[0] = {e_loc}, got "
                         f"{local_num_experts}")
    if isinstance(local_expert_offset, jax.Array) and not isinstance(local_expert_offset, jax.core.Tracer):
        local_expert_offset = int(local_expert_offset)
    if isinstance(local_expert_offset, (int, np.integer)):
        local_expert_offset = int(local_expert_offset)
        if local_expert_offset < 0 or local_expert_offset + e_loc > num_experts:
            raise ValueError(
                f"local_expert_offset: expected 0 <= local_expert_offset and local_expert_offset + "
                f"local_num_experts ({e_loc}) <= num_experts ({num_experts}), got {local_expert_offset}")
    elif _shape(local_expert_offset) != () or not jnp.issubdtype(_dtype(local_expert_offset), jnp.integer):
        raise TypeError(f"local_expert_offset: expected an int or a traced integer scalar, got "
                        f"{local_expert_offset!r}")
    if e_loc > num_experts:
        raise ValueError(f"local_num_experts: expected <= num_experts ({num_experts}), got {e_loc}")
    return h, i, e_loc, local_expert_offset
