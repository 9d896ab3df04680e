"""SPEC section 6: bad input raises ValueError/TypeError at trace time, naming the argument.

Every call goes through jax.eval_shape, so the errors are proven to come from tracing (shapes,
dtypes, static arguments) and nothing is compiled or run.
"""
import functools

import jax
import jax.numpy as jnp
import pytest

import jax_moe
from jax_moe import ActivationType as A
from jax_moe import RoutingMethodType as R

FP8 = jnp.float8_e4m3fn
T, H, I, E, K = 4, 256, 128, 8, 2


def base(t=T, h=H, i=I, e=E, e_loc=E, gated=True):
    n1 = 2 * i if gated else i
    arrays = dict(
        routing_logits=jnp.zeros((t, e), jnp.float32),
        routing_bias=jnp.zeros((e,), jnp.float32),
        hidden_states=jnp.zeros((t, h), FP8),
        hidden_states_scale=jnp.ones((h // 128, t), jnp.float32),
        gemm1_weights=jnp.zeros((e_loc, n1, h), FP8),
        gemm1_weights_scale=jnp.ones((e_loc, n1 // 128, h // 128), jnp.float32),
        gemm2_weights=jnp.zeros((e_loc, h, i), FP8),
        gemm2_weights_scale=jnp.ones((e_loc, h // 128, i // 128), jnp.float32),
    )
    static = dict(top_k=K, routing_method_type=R.Renormalize, backend="xla")
    return arrays, static


ORDER = ["routing_logits", "routing_bias", "hidden_states", "hidden_states_scale", "gemm1_weights",
         "gemm1_weights_scale", "gemm2_weights", "gemm2_weights_scale"]


def call_moe(arrays, static):
    args = [arrays[n] for n in ORDER]
    return jax.eval_shape(functools.partial(jax_moe.fp8_block_scale_moe, **static), *args)


def call_routed(arrays, static, topk_ids):
    args = [topk_ids] + [arrays[n] for n in ORDER[1:]]
    return jax.eval_shape(functools.partial(jax_moe.fp8_block_scale_routed_moe, **static), *args)


def name_re(name):
    """The argument name as a word: `hidden_states` must not be matched by `hidden_states_scale`."""
    return rf"(?<![\w.]){name}(?![\w])"


def test_valid_base_configs_trace():
    arrays, static = base()
    out = call_moe(arrays, static)
    assert out.shape == (T, H) and out.dtype == jnp.bfloat16
    arrays, static = base(gated=False)
    out = call_moe(arrays, dict(static, activation_type=A.Relu2, do_finalize=False))
    assert out.expert_outputs.shape == (T, K, H)
    arrays, static = base()
    ids = jnp.zeros((T, K), jnp.int32)
    assert call_routed(arrays, static, ids).shape == (T, H)
    assert call_routed(arrays, static, (ids, jnp.zeros((T, K), jnp.bfloat16))).shape == (T, H)


def _arr(shape, dtype):
    return jnp.zeros(shape, dtype)


# (id, {array replacements}, {static replacements}, exception, argument name, text that must appear)
CASES = [
    # routing_logits
    ("logits_rank3", dict(routing_logits=_arr((T, E, 1), jnp.float32)), {}, ValueError, "routing_logits", None),
    ("logits_rank1", dict(routing_logits=_arr((E,), jnp.float32)), {}, ValueError, "routing_logits", None),
    ("logits_f16", dict(routing_logits=_arr((T, E), jnp.float16)), {}, TypeError, "routing_logits", "float16"),
    ("logits_int", dict(routing_logits=_arr((T, E), jnp.int32)), {}, TypeError, "routing_logits", "int32"),
    ("num_experts_mismatch", {}, dict(num_experts=16), ValueError, "num_experts|routing_logits", "16"),
    # routing_bias
    ("bias_len", dict(routing_bias=_arr((E + 1,), jnp.float32)), {}, ValueError, "routing_bias", str(E + 1)),
    ("bias_rank2", dict(routing_bias=_arr((1, E), jnp.float32)), {}, ValueError, "routing_bias", None),
    ("bias_f16", dict(routing_bias=_arr((E,), jnp.float16)), {}, TypeError, "routing_bias", "float16"),
    # hidden_states
    ("hidden_bf16", dict(hidden_states=_arr((T, H), jnp.bfloat16)), {}, TypeError, "hidden_states", "bfloat16"),
    ("hidden_f32", dict(hidden_states=_arr((T, H), jnp.float32)), {}, TypeError, "hidden_states", "float32"),
    ("hidden_e5m2", dict(hidden_states=_arr((T, H), jnp.float8_e5m2)), {}, TypeError, "hidden_states", None),
    ("hidden_rank3", dict(hidden_states=_arr((T, H, 1), FP8)), {}, ValueError, "hidden_states", None),
    ("hidden_tokens", dict(hidden_states=_arr((T + 1, H), FP8)), {}, ValueError, "hidden_states", str(T + 1)),
    ("hidden_H_not_128", dict(hidden_states=_arr((T, 200), FP8)), {}, ValueError, "hidden_states", "200"),
    # hidden_states_scale
    ("scale_layout_T_first", dict(hidden_states_scale=_arr((T, H // 128), jnp.float32)), {}, ValueError,
     "hidden_states_scale", None),
    ("scale_per_token_only", dict(hidden_states_scale=_arr((T,), jnp.float32)), {}, ValueError,
     "hidden_states_scale", None),
    ("scale_bf16", dict(hidden_states_scale=_arr((H // 128, T), jnp.bfloat16)), {}, TypeError,
     "hidden_states_scale", "bfloat16"),
    # gemm1_weights / scale
    ("w1_rank2", dict(gemm1_weights=_arr((2 * I, H), FP8)), {}, ValueError, "gemm1_weights", None),
    ("w1_bf16", dict(gemm1_weights=_arr((E, 2 * I, H), jnp.bfloat16)), {}, TypeError, "gemm1_weights", "bfloat16"),
    ("w1_not_gated_rows", dict(gemm1_weights=_arr((E, I, H), FP8),
                               gemm1_weights_scale=_arr((E, I // 128, H // 128), jnp.float32)), {},
     ValueError, "gemm1_weights", None),
    ("w1_H", dict(gemm1_weights=_arr((E, 2 * I, H + 128), FP8)), {}, ValueError, "gemm1_weights", None),
    ("w1_E_loc", dict(gemm1_weights=_arr((E - 1, 2 * I, H), FP8)), {}, ValueError, "gemm1_weights", None),
    ("w1_scale_shape", dict(gemm1_weights_scale=_arr((E, 2 * I // 128, H // 128 + 1), jnp.float32)), {},
     ValueError, "gemm1_weights_scale", None),
    ("w1_scale_per_row", dict(gemm1_weights_scale=_arr((E, 2 * I, H // 128), jnp.float32)), {},
     ValueError, "gemm1_weights_scale", None),
    ("w1_scale_f16", dict(gemm1_weights_scale=_arr((E, 2 * I // 128, H // 128), jnp.float16)), {},
     TypeError, "gemm1_weights_scale", "float16"),
    # gemm2_weights / scale
    ("w2_rank2", dict(gemm2_weights=_arr((H, I), FP8)), {}, ValueError, "gemm2_weights", None),
    ("w2_bf16", dict(gemm2_weights=_arr((E, H, I), jnp.bfloat16)), {}, TypeError, "gemm2_weights", "bfloat16"),
    ("w2_H", dict(gemm2_weights=_arr((E, H + 128, I), FP8)), {}, ValueError, "gemm2_weights", None),
    ("w2_transposed", dict(gemm2_weights=_arr((E, I, H), FP8)), {}, ValueError, "gemm[12]_weights", None),
    ("w2_scale_shape", dict(gemm2_weights_scale=_arr((E, H // 128, I // 128 + 1), jnp.float32)), {},
     ValueError, "gemm2_weights_scale", None),
    ("w2_scale_transposed", dict(gemm2_weights_scale=_arr((E, I // 128, H // 128), jnp.float32)), {},
     ValueError, "gemm2_weights_scale", None),
    ("w2_scale_f16", dict(gemm2_weights_scale=_arr((E, H // 128, I // 128), jnp.float16)), {},
     TypeError, "gemm2_weights_scale", "float16"),
    # I not a multiple of 128
    ("I_not_128", dict(gemm1_weights=_arr((E, 400, H), FP8), gemm1_weights_scale=_arr((E, 4, H // 128), jnp.float32),
                       gemm2_weights=_arr((E, H, 200), FP8), gemm2_weights_scale=_arr((E, H // 128, 2), jnp.float32)),
     {}, ValueError, "gemm[12]_weights|intermediate_size", "200"),
    ("intermediate_size", {}, dict(intermediate_size=2 * I), ValueError, "intermediate_size", str(2 * I)),
    # experts
    ("local_num_experts", {}, dict(local_num_experts=E // 2), ValueError, "local_num_experts", str(E // 2)),
    ("offset_past_end", {}, dict(local_expert_offset=1), ValueError, "local_expert_offset", None),
    ("offset_negative", {}, dict(local_expert_offset=-1), ValueError, "local_expert_offset", None),
    ("offset_plus_local", dict(gemm1_weights=_arr((4, 2 * I, H), FP8), gemm1_weights_scale=_arr((4, 2, 2), jnp.float32),
                               gemm2_weights=_arr((4, H, I), FP8), gemm2_weights_scale=_arr((4, 2, 1), jnp.float32)),
     dict(local_expert_offset=5), ValueError, "local_expert_offset", None),
    # routing constraints
    ("top_k_gt_E", {}, dict(top_k=E + 1), ValueError, "top_k", str(E + 1)),
    ("top_k_zero", {}, dict(top_k=0), ValueError, "top_k", None),
    ("n_group_divides_E", {}, dict(routing_method_type=R.DeepSeekV3, n_group=3, topk_group=1),
     ValueError, "n_group", "3"),
    ("topk_group_gt_n_group", {}, dict(routing_method_type=R.DeepSeekV3, n_group=2, topk_group=4),
     ValueError, "topk_group", "4"),
    ("deepseek_k_vs_groups", {}, dict(routing_method_type=R.DeepSeekV3, n_group=4, topk_group=1, top_k=3),
     ValueError, "top_k", "3"),
    ("llama4_k", {}, dict(routing_method_type=R.Llama4, top_k=2), ValueError, "top_k", "2"),
    ("routing_method_unknown", {}, dict(routing_method_type=42), ValueError, "routing_method_type", "42"),
    ("routing_method_negative", {}, dict(routing_method_type=-1), ValueError, "routing_method_type", None),
    # activations
    ("activation_unknown", {}, dict(activation_type=42), ValueError, "activation_type", "42"),
    ("activation_gelu", {}, dict(activation_type=A.Gelu), NotImplementedError, "activation_type", "Gelu"),
    ("activation_relu", {}, dict(activation_type=A.Relu), NotImplementedError, "activation_type", None),
    ("activation_silu", {}, dict(activation_type=A.Silu), NotImplementedError, "activation_type", None),
    ("activation_swiglubias", {}, dict(activation_type=A.SwigluBias), NotImplementedError, "activation_type", None),
    ("relu2_with_gated_w1", {}, dict(activation_type=A.Relu2), ValueError, "gemm1_weights", None),
    # backend
    ("backend_unknown", {}, dict(backend="tpu"), ValueError, "backend", "tpu"),
    ("backend_none", {}, dict(backend=None), ValueError, "backend", None),
]


@pytest.mark.parametrize("arrays_upd,static_upd,exc,name,text",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fused(arrays_upd, static_upd, exc, name, text):
    arrays, static = base()
    arrays.update(arrays_upd)
    static.update(static_upd)
    with pytest.raises(exc, match=name_re(f"(?:{name})")) as info:
        call_moe(arrays, static)
    if text is not None:
        assert text in str(info.value), f"expected the actual value {text!r} in: {info.value}"


# Routed entry: the same expert/weight rules, plus the top-k input's own.
ROUTED_CASES = [
    ("ids_f32", _arr((T, K), jnp.float32), {}, TypeError, "topk_ids", "float32"),
    ("ids_rank1", _arr((T * K,), jnp.int32), {}, ValueError, "topk_ids", None),
    ("ids_k_mismatch", _arr((T, K + 1), jnp.int32), {}, ValueError, "topk_ids", str(K + 1)),
    ("ids_tokens", _arr((T + 1, K), jnp.int32), {}, ValueError, "topk_ids|hidden_states", None),
    ("tuple_len3", (_arr((T, K), jnp.int32), _arr((T, K), jnp.bfloat16), _arr((T, K), jnp.bfloat16)), {},
     ValueError, "topk_ids", None),
    ("tuple_w_shape", (_arr((T, K), jnp.int32), _arr((T, K + 1), jnp.bfloat16)), {}, ValueError, "topk_ids", None),
    ("tuple_w_f16", (_arr((T, K), jnp.int32), _arr((T, K), jnp.float16)), {}, TypeError, "topk_ids", "float16"),
    ("tuple_ids_f32", (_arr((T, K), jnp.float32), _arr((T, K), jnp.bfloat16)), {}, TypeError, "topk_ids", None),
    ("routed_top_k_gt_E", _arr((T, E + 1), jnp.int32), dict(top_k=E + 1), ValueError, "top_k", None),
    ("routed_offset", _arr((T, K), jnp.int32), dict(local_expert_offset=1, num_experts=E), ValueError,
     "local_expert_offset", None),
    ("routed_local_num_experts", _arr((T, K), jnp.int32), dict(local_num_experts=3), ValueError,
     "local_num_experts", "3"),
    ("routed_activation", _arr((T, K), jnp.int32), dict(activation_type=A.Gelu), NotImplementedError,
     "activation_type", None),
    ("routed_method", _arr((T, K), jnp.int32), dict(routing_method_type=99), ValueError,
     "routing_method_type", None),
    ("routed_backend", _arr((T, K), jnp.int32), dict(backend="gpu!"), ValueError, "backend", None),
    ("routed_bias_len", _arr((T, K), jnp.int32), dict(num_experts=E + 2), ValueError,
     "routing_bias|num_experts", None),
]


@pytest.mark.parametrize("topk_ids,static_upd,exc,name,text",
                         [c[1:] for c in ROUTED_CASES], ids=[c[0] for c in ROUTED_CASES])
def test_bad_input_routed(topk_ids, static_upd, exc, name, text):
    arrays, static = base()
    static.update(static_upd)
    with pytest.raises(exc, match=name_re(f"(?:{name})")) as info:
        call_routed(arrays, static, topk_ids)
    if text is not None:
        assert text in str(info.value), f"expected the actual value {text!r} in: {info.value}"


@pytest.mark.parametrize("bad", ["hidden_bf16", "w2_scale_shape", "I_not_128"])
def test_routed_shares_the_expert_checks(bad):
    arrays, static = base()
    arrays.update(dict((c[0], c) for c in CASES)[bad][1])
    exc, name = dict((c[0], c) for c in CASES)[bad][3:5]
    with pytest.raises(exc, match=name_re(f"(?:{name})")):
        call_routed(arrays, static, jnp.zeros((T, K), jnp.int32))


ROUTE_CASES = [
    ("f16", dict(logits=_arr((T, E), jnp.float16)), TypeError, "routing_logits"),
    ("rank3", dict(logits=_arr((T, E, 1), jnp.float32)), ValueError, "routing_logits"),
    ("bias_len", dict(bias=_arr((E - 1,), jnp.float32)), ValueError, "routing_bias"),
    ("top_k", dict(top_k=E + 1), ValueError, "top_k"),
    ("llama4", dict(routing_method_type=R.Llama4, top_k=2), ValueError, "top_k"),
    ("n_group", dict(routing_method_type=R.DeepSeekV3, n_group=3, topk_group=1), ValueError, "n_group"),
    ("topk_group", dict(routing_method_type=R.DeepSeekV3, n_group=4, topk_group=5), ValueError, "topk_group"),
    ("ds_k", dict(routing_method_type=R.DeepSeekV3, n_group=4, topk_group=2, top_k=5), ValueError, "top_k"),
    ("method", dict(routing_method_type=10), ValueError, "routing_method_type"),
]


@pytest.mark.parametrize("upd,exc,name", [c[1:] for c in ROUTE_CASES], ids=[c[0] for c in ROUTE_CASES])
def test_bad_input_route(upd, exc, name):
    kw = dict(logits=jnp.zeros((T, E), jnp.float32), bias=None, top_k=K,
              routing_method_type=R.Renormalize)
    kw.update(upd)
    logits, bias = kw.pop("logits"), kw.pop("bias")
    with pytest.raises(exc, match=name_re(name)):
        jax.eval_shape(functools.partial(jax_moe.route, **kw), logits, bias)


def test_backend_cuda_without_cuda_is_a_clear_error():
    if jax_moe.cuda_available():
        pytest.skip("CUDA is available here")
    arrays, static = base()
    with pytest.raises((RuntimeError, ValueError, NotImplementedError), match="cuda|CUDA") as info:
        call_moe(arrays, dict(static, backend="cuda"))
    assert "backend" in str(info.value)
    with pytest.raises((RuntimeError, ValueError, NotImplementedError), match="cuda|CUDA"):
        call_routed(arrays, dict(static, backend="cuda"), jnp.zeros((T, K), jnp.int32))


def test_routed_entry_checks_routing_arguments():
    """The pre-routed entry validates the routing arguments it is given like the logits entry."""
    e, h, i, t = 8, 128, 128, 4
    w1 = jax.ShapeDtypeStruct((e, 2 * i, h), jnp.float8_e4m3fn)
    w1s = jax.ShapeDtypeStruct((e, 2 * i // 128, h // 128), jnp.float32)
    w2 = jax.ShapeDtypeStruct((e, h, i), jnp.float8_e4m3fn)
    w2s = jax.ShapeDtypeStruct((e, h // 128, i // 128), jnp.float32)
    x = jax.ShapeDtypeStruct((t, h), jnp.float8_e4m3fn)
    xs = jax.ShapeDtypeStruct((h // 128, t), jnp.float32)
    ids = jax.ShapeDtypeStruct((t, 2), jnp.int32)
    call = functools.partial(jax_moe.fp8_block_scale_routed_moe, backend="xla", top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        jax.eval_shape(functools.partial(call, routing_method_type=3), ids, None, x, xs, w1, w1s, w2, w2s)
    with pytest.raises(ValueError, match="n_group"):
        jax.eval_shape(functools.partial(call, n_group=3, topk_group=1), ids, None, x, xs, w1, w1s, w2, w2s)
    with pytest.raises(ValueError, match="topk_group"):
        jax.eval_shape(functools.partial(call, n_group=2, topk_group=4), ids, None, x, xs, w1, w1s, w2, w2s)

