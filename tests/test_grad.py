"""Differentiation of the public MoE functions (SPEC section 5): custom VJP, bf16 entries, vmap.

Reference gradients come from an independent float64 implementation of the dequantized SPEC
section 3 math written below (dense per-slot gathers, JAX autodiff in float64), with the top-k
ids fixed. It is evaluated two ways:
  * `exact`: no rounding anywhere (the float math itself); the library must be within
    TOL_EXACT (the FP8 re-quantization it passes straight through costs a few percent, like
    the forward tolerance of SPEC section 3);
  * `ste`: the forward's rounding points (bf16 routing weights, bf16 GEMM1 output, FP8
    re-quantization, bf16 GEMM2 output) applied to the values and
    passed straight through in the derivative, which is exactly the rule the library
    implements: rel <= TOL_STE (only float32 vs float64 arithmetic differs, and the occasional
    rounding it flips).
The float64 implementation itself is checked against finite differences (`check_grads`).
Library calls are jitted (one compile per static configuration is much cheaper on CPU than
running the pipeline op by op).
"""
import functools
import types

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.test_util import check_grads

import cases  # tests/ is on sys.path (pytest prepend import mode)
import jax_moe
from jax_moe import ActivationType as A
from jax_moe import RoutingMethodType as R

TOL_STE = 1e-2  # typically ~1e-5; a rounding flipped between float32 and float64 costs ~1e-3
TOL_EXACT = 6e-2
GATED = (A.Swiglu, A.Geglu)
FP8 = ml_dtypes.float8_e4m3fn
# These tests compile many small pipelines on CPU: skip XLA's expensive backend passes there.
FAST = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
        if jax.default_backend() == "cpu" else {})


def fast_jit(fn, **kw):
    return jax.jit(fn, compiler_options=FAST, **kw)


def rel(a, b):
    a = np.asarray(np.asarray(a).astype(np.float32), np.float64)
    b = np.asarray(np.asarray(b).astype(np.float32), np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb else float(np.linalg.norm(a - b))


# ----------------------------------------------------------------------------- inputs
def make_case(seed, *, t=8, h=256, i=128, e=8, e_loc=None, act=A.Swiglu):
    """`cases.quantized_layer` plus a bf16 output cotangent `ct` and the generator `rng`."""
    rng = np.random.default_rng(seed)
    c = cases.quantized_layer(rng, t=t, h=h, i=i, e=e, e_loc=e_loc, act=act)
    c.logits = jnp.asarray(c.logits)
    c.ct = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    c.rng = rng
    return c


# ----------------------------------------------------------------------------- float64 oracle
def _f64(x):
    return jnp.asarray(np.asarray(np.asarray(x).astype(np.float32), np.float64))


def _expand(scale, bn, bk):
    return jnp.repeat(jnp.repeat(scale, bn, axis=-2), bk, axis=-1)


def _round_ste(x, rounded, ste):
    return x + jax.lax.stop_gradient(rounded - x) if ste else x


def _bf16(x):
    return x.astype(jnp.bfloat16).astype(jnp.float64)


def _requant(a):
    """fp8 re-quantization of SPEC section 3 step 4 over 128-blocks of the last axis."""
    blocks = a.reshape(a.shape[:-1] + (a.shape[-1] // 128, 128))
    s = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / 448.0,
                    float(np.finfo(np.float32).tiny))
    q = jnp.clip(blocks / s, -448.0, 448.0).astype(jnp.float8_e4m3fn).astype(jnp.float64)
    return (q * s).reshape(a.shape)


def _weights64(logits, ids, method, rsf):
    l = logits
    take = lambda v: jnp.take_along_axis(v, ids, axis=-1)  # noqa: E731
    sig = lambda v: 1.0 / (1.0 + jnp.exp(-v))  # noqa: E731
    if method == R.Default:
        p = jnp.exp(l - l.max(-1, keepdims=True))
        return take(p / p.sum(-1, keepdims=True))
    if method == R.Renormalize:
        s = jnp.exp(take(l) - take(l).max(-1, keepdims=True))
        return s / s.sum(-1, keepdims=True)
    if method in (R.DeepSeekV3, R.MiniMax2):
        s = sig(take(l))
        return s / (s.sum(-1, keepdims=True) + 1e-20) * (1.0 if rsf is None else rsf)
    if method in (R.Llama4, R.Sigmoid, R.TopKSigmoid):
        return sig(take(l))
    if method == R.RenormalizeNaive:
        p = jnp.exp(l - l.max(-1, keepdims=True))
        s = take(p / p.sum(-1, keepdims=True))
        return s / s.sum(-1, keepdims=True)
    if method == R.TopK:
        return take(l)
    if method == R.SigmoidRenorm:
        s = sig(take(l))
        return s / jnp.maximum(s.sum(-1, keepdims=True), 1e-20)
    raise AssertionError(method)


def _act64(g, act):
    if act in GATED:
        i = g.shape[-1] // 2
        up, gate = g[..., :i], g[..., i:]
        if act == A.Swiglu:
            return gate / (1.0 + jnp.exp(-gate)) * up
        c = np.sqrt(2.0 / np.pi)
        return 0.5 * gate * (1.0 + jnp.tanh(c * (gate + 0.044715 * gate ** 3))) * up
    if act == A.Relu2:
        return jnp.maximum(g, 0.0) ** 2
    return g


def oracle_moe(p, c, ids, *, act, ste, method=None, rsf=None, offset=0, do_finalize=True):
    """float64 SPEC 3 with ids fixed. p: dict of float64 differentiable inputs: `logits` (or
    `weights` for the pre-routed entry), `hs` (or `x` for the float entry), `s1`, `s2`."""
    ids = jnp.asarray(ids)
    if "logits" in p:
        w = _weights64(p["logits"], ids, method, rsf)
        w = _round_ste(w, _bf16(w), ste)
    else:
        w = p["weights"]
    if "x" in p:  # float entry: the value is dequant(quant(x)), the derivative the identity
        xq, xs = jax_moe.quantize_activations(jax.lax.stop_gradient(p["x"]).astype(jnp.float32))
        deq = _f64(xq) * _expand(_f64(xs).T, 1, 128)
        x = p["x"] + jax.lax.stop_gradient(deq - p["x"])
    else:
        x = _f64(c.hq) * _expand(p["hs"].T, 1, 128)
    W1 = _f64(c.w1) * _expand(p["s1"], 128, 128)
    W2 = _f64(c.w2) * _expand(p["s2"], 128, 128)
    e_loc = W1.shape[0]
    loc = ids - offset
    here = (loc >= 0) & (loc < e_loc)
    loc = jnp.where(here, loc, 0)
    g = jnp.einsum("tknh,th->tkn", W1[loc], x)
    g = _round_ste(g, _bf16(g), ste)
    a = _act64(g, act)
    a = _round_ste(a, _requant(a), ste)
    y = jnp.einsum("tkhi,tki->tkh", W2[loc], a)
    y = _round_ste(y, _bf16(y), ste)
    y = jnp.where(here[..., None], y, 0.0)
    if not do_finalize:
        return y, w
    return jnp.einsum("tk,tkh->th", w, y)


def oracle_grads(p, c, ids, ct, *, ste, **kw):
    """float64 cotangents of `oracle_moe` for the inputs in p, output cotangent ct."""
    with jax.enable_x64(True):
        p64 = {k: _f64(v) for k, v in p.items()}
        ct64 = jax.tree_util.tree_map(_f64, ct)
        _, vjp = jax.vjp(lambda q: oracle_moe(q, c, np.asarray(ids), ste=ste, **kw), p64)
        (g,) = vjp(ct64)
        return {k: np.asarray(v) for k, v in g.items()}


def check_against_oracle(lib, p, c, ids, ct, what="", tol_ste=TOL_STE, **kw):
    """Every cotangent in `lib` (a dict like p) against both float64 references."""
    for ste, tol in ((True, tol_ste), (False, TOL_EXACT)):
        ref = oracle_grads(p, c, ids, ct, ste=ste, **kw)
        for name in p:
            assert lib[name].shape == ref[name].shape, (name, lib[name].shape, ref[name].shape)
            assert np.isfinite(np.asarray(lib[name], np.float32)).all(), name
            assert np.linalg.norm(ref[name]) > 0, f"{what} {name}: zero reference gradient"
            err = rel(lib[name], ref[name])
            assert err <= tol, f"{what} d{name}: rel {err:.3g} > {tol} ({'ste' if ste else 'exact'})"


# ----------------------------------------------------------------------------- library calls
@functools.lru_cache(maxsize=None)
def _grad_fn(kind, **static):
    """jit(vjp) of a public entry w.r.t. its float inputs -> (output, cotangent dict)."""
    static = dict(static, backend=static.get("backend", "xla"))

    def fn(p, c, routing, ct):
        def f(p):
            if kind == "moe":
                return jax_moe.fp8_block_scale_moe(p["logits"], p.get("bias", c["bias"]), c["hq"],
                                                   p["hs"], c["w1"], p["s1"], c["w2"], p["s2"],
                                                   **static)
            if kind == "bf16":
                return jax_moe.moe_bf16(p["logits"], c["bias"], p["x"], c["w1"], p["s1"], c["w2"],
                                        p["s2"], **static)
            topk = (routing, p["weights"]) if "weights" in p else routing
            if kind == "routed":
                return jax_moe.fp8_block_scale_routed_moe(topk, None, c["hq"], p["hs"], c["w1"],
                                                          p["s1"], c["w2"], p["s2"], **static)
            return jax_moe.routed_moe_bf16(topk, None, p["x"], c["w1"], p["s1"], c["w2"],
                                           p["s2"], **static)

        out, vjp = jax.vjp(f, p)
        return out, vjp(ct)[0]

    return fast_jit(fn)


def consts(c):
    return {k: getattr(c, k) for k in ("bias", "hq", "w1", "w2")}


def lib_grads(kind, p, c, ct, routing=None, **static):
    out, g = _grad_fn(kind, **static)(p, consts(c), routing, ct)
    return out, {k: np.asarray(v) for k, v in g.items()}


def route_kwargs(method, k):
    kw = dict(top_k=1 if method == R.Llama4 else k, routing_method_type=method)
    if method in (R.DeepSeekV3, R.MiniMax2):
        kw["routed_scaling_factor"] = 2.5
    return kw


def lib_ids(c, **kw):
    ids, w = jax_moe.route(c.logits, c.bias, n_group=kw.get("n_group"),
                           topk_group=kw.get("topk_group"), top_k=kw["top_k"],
                           routing_method_type=kw["routing_method_type"],
                           routed_scaling_factor=kw.get("routed_scaling_factor"), backend="xla")
    return np.asarray(ids), w


def _oracle_kw(kw, act):
    return dict(act=act, method=kw["routing_method_type"], rsf=kw.get("routed_scaling_factor"))


# ----------------------------------------------------------------------------- the oracle itself
@pytest.mark.parametrize("act", [A.Swiglu, A.Relu2], ids=lambda v: v.name)
def test_oracle_matches_finite_differences(act):
    """The float64 reference gradient is the gradient of the float math (rounding off)."""
    c = make_case(1, t=3, h=128, i=128, e=4, act=act)
    ids = np.array([[0, 2], [1, 3], [3, 0]])
    p = {"logits": c.logits, "hs": c.hs, "s1": c.w1s, "s2": c.w2s}
    with jax.enable_x64(True):
        p64 = {k: _f64(v) for k, v in p.items()}
        f = jax.jit(lambda q: oracle_moe(q, c, ids, act=act, ste=False, method=R.DeepSeekV3,
                                         rsf=2.5))
        check_grads(f, (p64,), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- gradients vs oracle
@pytest.mark.parametrize("method,act", [
    (R.DeepSeekV3, A.Swiglu), (R.DeepSeekV3, A.Relu2), (R.Renormalize, A.Swiglu),
    (R.Renormalize, A.Relu2), (R.Default, A.Swiglu), (R.Default, A.Relu2),
], ids=lambda v: v.name)
def test_grad_matches_float64_oracle(method, act):
    c = make_case(100 + 10 * int(method) + int(act), act=act)
    kw = route_kwargs(method, 3)
    ids, _ = lib_ids(c, **kw)
    p = {"logits": c.logits, "hs": c.hs, "s1": c.w1s, "s2": c.w2s}
    _, g = lib_grads("moe", p, c, c.ct, activation_type=act, **kw)
    check_against_oracle(g, p, c, ids, c.ct, what=f"{method.name}/{act.name}",
                         **_oracle_kw(kw, act))


@pytest.mark.parametrize("method", list(R), ids=lambda v: v.name)
def test_routing_weights_vjp_every_method(method):
    """The weight formula the backward differentiates, for every method, against the float64
    one; its value is the forward's (before the bf16 rounding)."""
    c = make_case(30 + int(method), t=16, h=128, e=16)
    kw = route_kwargs(method, 4)
    ids, w = lib_ids(c, **kw)
    rsf = kw.get("routed_scaling_factor")
    val, vjp = jax.vjp(lambda l: jax_moe.routing_weights(l, jnp.asarray(ids), method, rsf), c.logits)
    ct = jnp.asarray(c.rng.standard_normal(ids.shape), jnp.float32)
    (dl,) = vjp(ct)
    np.testing.assert_allclose(np.asarray(val.astype(jnp.bfloat16), np.float32),
                               np.asarray(w, np.float32), rtol=8e-3)
    with jax.enable_x64(True):
        _, vjp64 = jax.vjp(lambda l: _weights64(l, jnp.asarray(ids), method, rsf), _f64(c.logits))
        (ref,) = vjp64(_f64(ct))
    assert rel(dl, ref) <= 1e-5, rel(dl, ref)


def test_grad_deepseek_grouped_with_bias():
    """DeepSeekV3 group-limited selection with a bias: the bias only selects (zero cotangent),
    bf16 logits get bf16 cotangents. Geglu."""
    c = make_case(7, t=16, h=128, e=16, act=A.Geglu)
    c.logits = c.logits.astype(jnp.bfloat16)
    kw = dict(top_k=4, n_group=4, topk_group=2, routing_method_type=R.DeepSeekV3,
              routed_scaling_factor=2.5)
    ids, _ = lib_ids(c, **kw)
    p = {"logits": c.logits, "hs": c.hs, "s1": c.w1s, "s2": c.w2s}
    _, g = lib_grads("moe", dict(p, bias=c.bias), c, c.ct, activation_type=A.Geglu, **kw)
    assert g["logits"].dtype == jnp.bfloat16
    assert g["bias"].shape == c.bias.shape and not g["bias"].any()
    # bf16 cotangent of bf16 logits: compare with a bf16-sized tolerance
    check_against_oracle(g, p, c, ids, c.ct, what="grouped", tol_ste=1e-2,
                         **_oracle_kw(kw, A.Geglu))


def test_grad_local_experts_only():
    """Expert parallelism: the device's experts [4, 8) of 8; other slots contribute nothing.
    RenormalizeNaive routing, Identity activation."""
    c = make_case(8, e=8, e_loc=4, act=A.Identity)
    kw = route_kwargs(R.RenormalizeNaive, 3)
    ids, _ = lib_ids(c, **kw)
    assert ((ids >= 4).any(axis=1) & (ids < 4).any(axis=1)).any()
    p = {"logits": c.logits, "hs": c.hs, "s1": c.w1s, "s2": c.w2s}
    _, g = lib_grads("moe", p, c, c.ct, local_expert_offset=4, activation_type=A.Identity, **kw)
    check_against_oracle(g, p, c, ids, c.ct, what="ep", offset=4, **_oracle_kw(kw, A.Identity))


@pytest.mark.parametrize("routed", [False, True], ids=["fused", "routed"])
def test_grad_do_finalize_false(routed):
    """Cotangents of (expert_outputs, topk_weights) both flow back; ids get none."""
    c = make_case(9)
    kw = route_kwargs(R.DeepSeekV3, 2)
    ids, w = lib_ids(c, **kw)
    t, k = ids.shape
    ct = (jnp.asarray(c.rng.standard_normal((t, k, 256)), jnp.bfloat16),
          jnp.asarray(c.rng.standard_normal((t, k)), jnp.float32))
    if routed:
        p = {"weights": w.astype(jnp.float32), "hs": c.hs, "s1": c.w1s, "s2": c.w2s}
        okw = dict(act=A.Swiglu)
    else:
        p = {"logits": c.logits, "hs": c.hs, "s1": c.w1s, "s2": c.w2s}
        okw = _oracle_kw(kw, A.Swiglu)
        ct = (ct[0], ct[1].astype(jnp.bfloat16))
    ct_lib = jax_moe.MoEOutputs(ct[0], ct[1], np.zeros((t, k), jax.dtypes.float0))
    out, g = lib_grads("routed" if routed else "moe", p, c, ct_lib, routing=jnp.asarray(ids),
                       do_finalize=False, **kw)
    assert isinstance(out, jax_moe.MoEOutputs)
    check_against_oracle(g, p, c, ids, ct, what="no-finalize", do_finalize=False, **okw)


def test_grad_routed_tuple_weights():
    """Pre-routed (ids, f32 weights): the weights get a gradient too, plus out-of-range ids."""
    act = A.Relu2
    c = make_case(10, act=act)
    ids, w = lib_ids(c, **route_kwargs(R.Renormalize, 3))
    ids = ids.copy()
    ids[0, 1] = 99  # skipped by the forward: contributes nothing, gets zero gradient
    weights = jnp.asarray(c.rng.uniform(0.2, 1.0, ids.shape), jnp.float32)
    p = {"weights": weights, "hs": c.hs, "s1": c.w1s, "s2": c.w2s}
    _, g = lib_grads("routed", p, c, c.ct, routing=jnp.asarray(ids, jnp.int32), top_k=3,
                     activation_type=act)
    assert g["weights"].dtype == np.float32 and g["weights"][0, 1] == 0
    check_against_oracle(g, p, c, ids, c.ct, what="routed", act=act)


def test_grad_routed_packed():
    c = make_case(11)
    ids, w = lib_ids(c, **route_kwargs(R.DeepSeekV3, 2))
    packed = jax_moe.pack_topk(ids, w)
    p = {"hs": c.hs, "s1": c.w1s, "s2": c.w2s}
    _, g = lib_grads("routed", p, c, c.ct, routing=packed, top_k=2)
    with jax.enable_x64(True):  # the packed weights are constants (bf16 values)
        okw = dict(act=A.Swiglu)
        for ste, tol in ((True, TOL_STE), (False, TOL_EXACT)):
            p64 = {k: _f64(v) for k, v in p.items()}
            f = lambda q: oracle_moe(dict(q, weights=_f64(w)), c, ids, ste=ste, **okw)  # noqa: E731
            _, vjp = jax.vjp(f, p64)
            (ref,) = vjp(_f64(c.ct))
            for name in p:
                assert rel(g[name], ref[name]) <= tol, name


# ----------------------------------------------------------------------------- fp8 constants
@pytest.mark.parametrize("routed", [False, True], ids=["fused", "routed"])
def test_fp8_inputs_get_zero_cotangents(routed):
    c = make_case(12, t=4, h=128, e=4)
    kw = route_kwargs(R.DeepSeekV3, 2)
    if routed:
        ids, w = lib_ids(c, **kw)
        first = (ids, w.astype(jnp.float32))
        fn = functools.partial(jax_moe.fp8_block_scale_routed_moe, top_k=2, backend="xla")
    else:
        first = c.logits
        fn = functools.partial(jax_moe.fp8_block_scale_moe, backend="xla", **kw)
    args = (first, c.bias, c.hq, c.hs, c.w1, c.w1s, c.w2, c.w2s)

    @fast_jit
    def all_cts(*args):
        _, vjp = jax.vjp(fn, *args)
        return vjp(c.ct)

    cts = all_cts(*args)
    for i in (2, 4, 6):  # hidden_states, gemm1_weights, gemm2_weights
        assert cts[i].dtype == jnp.float8_e4m3fn and cts[i].shape == args[i].shape
        assert not np.asarray(cts[i]).astype(np.float32).any()
    assert not np.asarray(cts[1]).any()  # the bias only selects
    assert np.asarray(cts[3]).any() and np.asarray(cts[5]).any() and np.asarray(cts[7]).any()
    if routed:
        assert cts[0][0].dtype == jax.dtypes.float0 and np.asarray(cts[0][1]).any()


# ----------------------------------------------------------------------------- bf16 entries
def test_moe_bf16_forward_and_grad():
    """bf16 hidden states: forward = fp8 entry on quantize_activations(x); gradient to x."""
    c = make_case(13, t=16, e=16)
    x = c.x.astype(jnp.bfloat16)
    kw = route_kwargs(R.DeepSeekV3, 4)
    p = {"logits": c.logits, "x": x, "s1": c.w1s, "s2": c.w2s}
    out, g = lib_grads("bf16", p, c, c.ct, **kw)
    hq, hs = jax_moe.quantize_activations(x)
    ref = fast_jit(functools.partial(jax_moe.fp8_block_scale_moe, backend="xla", **kw))(
        c.logits, c.bias, hq, hs, c.w1, c.w1s, c.w2, c.w2s)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    ids, _ = lib_ids(c, **kw)
    assert g["x"].dtype == jnp.bfloat16
    # the bf16 cotangent of x costs a bf16 rounding against the float64 reference
    check_against_oracle(g, p, c, ids, c.ct, what="bf16", tol_ste=1e-2, **_oracle_kw(kw, A.Swiglu))


def test_routed_moe_bf16_grad():
    c = make_case(14, act=A.Relu2)
    ids, w = lib_ids(c, **route_kwargs(R.Renormalize, 2))
    p = {"weights": w.astype(jnp.float32), "x": c.x, "s1": c.w1s, "s2": c.w2s}
    _, g = lib_grads("routed_bf16", p, c, c.ct, routing=jnp.asarray(ids), top_k=2,
                     activation_type=A.Relu2)
    check_against_oracle(g, p, c, ids, c.ct, what="routed bf16", act=A.Relu2)


def test_moe_bf16_rejects_bad_hidden():
    c = make_case(15, t=4, h=128, e=4)
    kw = route_kwargs(R.DeepSeekV3, 2)
    with pytest.raises(TypeError, match="hidden_states"):
        jax_moe.moe_bf16(c.logits, c.bias, c.hq, c.w1, c.w1s, c.w2, c.w2s, **kw)
    with pytest.raises(ValueError, match="hidden_states"):
        jax_moe.moe_bf16(c.logits, c.bias, c.x[:, :100], c.w1, c.w1s, c.w2, c.w2s, **kw)
    with pytest.raises(ValueError, match="hidden_states"):
        jax_moe.moe_bf16(c.logits, c.bias, c.x[:3], c.w1, c.w1s, c.w2, c.w2s, **kw)


# ----------------------------------------------------------------------------- transformations
def _loss_fn(c, **kw):
    def loss(logits, hs, s1, s2):
        out = jax_moe.fp8_block_scale_moe(logits, c.bias, c.hq, hs, c.w1, s1, c.w2, s2,
                                          backend="xla", **kw)
        return jnp.sum(out.astype(jnp.float32) * c.ct.astype(jnp.float32))
    return loss


def test_jit_grad_vjp_value_and_grad_agree():
    """jit(grad), eager grad, jit(value_and_grad) and jax.vjp give the same gradient."""
    c = make_case(16, t=8, h=128, e=8)
    loss = _loss_fn(c, **route_kwargs(R.DeepSeekV3, 2))
    args = (c.logits, c.hs, c.w1s, c.w2s)
    argnums = (0, 1, 2, 3)

    @fast_jit
    def jitted(*args):
        val, vjp = jax.vjp(loss, *args)
        return (jax.grad(loss, argnums)(*args), jax.value_and_grad(loss, argnums)(*args),
                (val, vjp(jnp.ones_like(val))))

    g_jit, (v, g_vg), (val, g_vjp) = jitted(*args)
    g_eager = jax.grad(loss, argnums)(*args)  # the library jits its pipeline; no outer jit here
    assert float(v) == pytest.approx(float(val), rel=1e-6)
    for a, b, d, e in zip(g_jit, g_eager, g_vg, g_vjp):
        for other in (b, d, e):
            np.testing.assert_allclose(np.asarray(a), np.asarray(other), rtol=1e-5, atol=1e-7)
        assert np.asarray(a).any()


def test_forward_value_unchanged_by_custom_vjp():
    """The public output is the stage pipeline's: equal to run_experts on the routed ids."""
    c = make_case(17)
    kw = route_kwargs(R.DeepSeekV3, 3)

    @fast_jit
    def both(logits, hs, s1, s2):
        out = jax_moe.fp8_block_scale_moe(logits, c.bias, c.hq, hs, c.w1, s1, c.w2, s2,
                                          backend="xla", **kw)
        ids, w = jax_moe.route(logits, c.bias, backend="xla", **kw)
        ref = jax_moe.api.run_experts(jax_moe.reference, ids, w, c.hq, hs, c.w1, s1, c.w2, s2,
                                      num_experts=8, local_expert_offset=0,
                                      activation_type=A.Swiglu, do_finalize=True)
        return out, ref

    out, ref = both(c.logits, c.hs, c.w1s, c.w2s)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def _batch(b, t, h, e):
    """A leading batch of token-side inputs: logits [B,T,E], hidden [B,T,H], scale [B,H/128,T]."""
    cs = [make_case(200 + j, t=t, h=h, e=e) for j in range(b)]
    return (jnp.stack([x.logits for x in cs]), jnp.stack([x.hq for x in cs]),
            jnp.stack([x.hs for x in cs]))


@jax.custom_batching.custom_vmap
def _no_vmap(x):
    return x


@_no_vmap.def_vmap
def _no_vmap_rule(axis_size, in_batched, x):
    raise AssertionError("a stand-in for a CUDA stage (no batching rule) was vmapped")


def test_vmap_forward_and_grads(monkeypatch, request):
    """vmap over a leading batch of token-side inputs: forward, per-example gradients
    (vmap(grad)) and gradients of a batched loss (grad(vmap)) equal the unbatched ones.

    Run through the CUDA-stage code path on CPU: the CUDA custom calls have no batching rule,
    so they are stood in for by the reference stages made unbatchable. This passes only because
    the batch is folded into the token axis before any stage runs (the pure-JAX path is vmapped
    in `test_vmap_nested_batched_weights_and_bf16_entry`)."""
    def unbatchable(fn):
        def stage(*args, **kwargs):
            return jax.tree_util.tree_map(
                lambda v: _no_vmap(v) if isinstance(v, jax.Array) else v, fn(*args, **kwargs))
        return stage

    names = ("route", "plan", "permute", "grouped_gemm", "gemm1_act_quant", "act_quant", "expert_gemms",
             "finalize")
    fake = types.SimpleNamespace(**{n: unbatchable(getattr(jax_moe.reference, n)) for n in names})
    monkeypatch.setattr(jax_moe.api, "ops", fake)
    monkeypatch.setattr(jax_moe.api, "_use_cuda", lambda backend: True)
    # The library caches one jitted pipeline per static configuration: drop the ones traced
    # with the stand-ins afterwards, so that later calls (on a GPU, the real CUDA ones) retrace.
    jax_moe.grad._core.cache_clear()
    request.addfinalizer(jax_moe.grad._core.cache_clear)
    with pytest.raises(AssertionError, match="stand-in"):  # the stand-in does refuse vmap
        jax.vmap(fake.plan, in_axes=(0, None))(jnp.zeros((2, 4, 2), jnp.int32), 4)
    b, t, h, e = 3, 8, 128, 8
    c = make_case(18, t=t, h=h, e=e)
    kw = route_kwargs(R.DeepSeekV3, 2)
    L, HQ, HS = _batch(b, t, h, e)

    def loss(logits, hq, hs, s1, s2):
        out = jax_moe.fp8_block_scale_moe(logits, c.bias, hq, hs, c.w1, s1, c.w2, s2, **kw)
        return jnp.sum(out.astype(jnp.float32) * c.ct.astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 2, 3, 4))
    axes = (0, 0, 0, None, None)

    @fast_jit
    def batched(L, HQ, HS, s1, s2):
        vals = jax.vmap(loss, in_axes=axes)(L, HQ, HS, s1, s2)
        per_example = jax.vmap(grad, in_axes=axes)(L, HQ, HS, s1, s2)
        summed = jax.grad(lambda l, hs, s1, s2: jnp.sum(jax.vmap(loss, in_axes=axes)(l, HQ, hs, s1, s2)),
                          argnums=(0, 1, 2, 3))(L, HS, s1, s2)
        singles = [(loss(L[j], HQ[j], HS[j], s1, s2), grad(L[j], HQ[j], HS[j], s1, s2))
                   for j in range(b)]
        return vals, per_example, summed, singles

    vals, per_example, summed, singles = batched(L, HQ, HS, c.w1s, c.w2s)
    for j in range(b):
        assert float(vals[j]) == pytest.approx(float(singles[j][0]), rel=1e-6)
    for a, name in enumerate(("logits", "hs", "s1", "s2")):
        assert per_example[a].shape[0] == b, name
        for j in range(b):
            assert rel(per_example[a][j], singles[j][1][a]) <= 1e-5, (name, j)
        ref = np.stack([s[1][a] for s in singles])
        ref = ref if name in ("logits", "hs") else ref.sum(0)
        assert rel(summed[a], ref) <= 1e-5, name


def test_vmap_nested_batched_weights_and_bf16_entry():
    """Nested vmap of the bf16 entry (forward and gradient to x), and vmap with batched weight
    scales (no fold possible: lax.map fallback)."""
    c = make_case(19, t=4, h=128, e=4)
    kw = route_kwargs(R.Renormalize, 2)
    x = jnp.asarray(c.rng.standard_normal((2, 3, 4, 128)), jnp.bfloat16)
    logits = jnp.asarray(c.rng.standard_normal((2, 3, 4, 4)), jnp.float32)
    s1b = jnp.stack([c.w1s, 2.0 * c.w1s])

    def f(l, x, s1):
        return jax_moe.moe_bf16(l, None, x, c.w1, s1, c.w2, c.w2s, backend="xla", **kw)

    def loss(l, x, s1):
        return jnp.sum(f(l, x, s1).astype(jnp.float32))

    def vv(fn):
        return jax.vmap(jax.vmap(fn, in_axes=(0, 0, None)), in_axes=(0, 0, None))

    @fast_jit
    def run(logits, x, s1, s1b):
        nested = vv(f)(logits, x, s1)
        gx = vv(jax.grad(loss, 1))(logits, x, s1)
        fallback = jax.vmap(f)(logits[:, 0], x[:, 0], s1b)
        singles = [[(f(logits[i, j], x[i, j], s1), jax.grad(loss, 1)(logits[i, j], x[i, j], s1))
                    for j in range(3)] for i in range(2)]
        single_b = [f(logits[i, 0], x[i, 0], s1b[i]) for i in range(2)]
        return nested, gx, fallback, singles, single_b

    nested, gx, fallback, singles, single_b = run(logits, x, c.w1s, s1b)
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(np.asarray(nested[i, j], np.float32),
                                          np.asarray(singles[i][j][0], np.float32))
            assert rel(gx[i, j], singles[i][j][1]) <= 1e-2  # bf16 cotangents
        np.testing.assert_array_equal(np.asarray(fallback[i], np.float32),
                                      np.asarray(single_b[i], np.float32))


def test_zero_tokens_grad():
    c = make_case(21, t=4, h=128, e=4)
    kw = route_kwargs(R.DeepSeekV3, 2)
    loss = lambda l, hs, s1: jax_moe.fp8_block_scale_moe(  # noqa: E731
        l, c.bias, c.hq[:0], hs, c.w1, s1, c.w2, c.w2s, backend="xla", **kw).astype(jnp.float32).sum()
    gl, ghs, gs1 = jax.grad(loss, argnums=(0, 1, 2))(c.logits[:0], c.hs[:, :0], c.w1s)
    assert gl.shape == (0, 4) and ghs.shape == (1, 0) and not np.asarray(gs1).any()


def test_backward_materializes_nothing_dense():
    """No intermediate of the jitted gradient has T*E*H elements or more (no [T, E, H] buffer,
    no dense dequantization of all experts), with E large enough that either would show."""
    t, h, i, e, k = 8, 128, 128, 32, 2
    c = make_case(22, t=t, h=h, i=i, e=e, act=A.Relu2)
    loss = _loss_fn(c, activation_type=A.Relu2, **route_kwargs(R.Renormalize, k))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(c.logits, c.hs, c.w1s, c.w2s)
    limit = t * e * h
    biggest = []

    def walk(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                size = int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0
                biggest.append((size, str(eqn.primitive), v.aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    worst = max(biggest)
    assert worst[0] < limit, f"{worst} has >= T*E*H = {limit} elements"


def test_grad_under_shard_map_expert_parallel():
    """Replicated tokens, experts sharded over 2 devices, psum: the gradient equals the
    single-device one."""
    from jax.sharding import Mesh, PartitionSpec as P
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs 2 devices")
    mesh = Mesh(np.array(devices[:2]), ("ep",))
    c = make_case(23, t=8, h=128, e=8)
    kw = route_kwargs(R.DeepSeekV3, 3)

    def local(logits, hs, w1, s1, w2, s2):
        off = jax.lax.axis_index("ep") * w1.shape[0]
        out = jax_moe.fp8_block_scale_moe(logits, c.bias, c.hq, hs, w1, s1, w2, s2, num_experts=8,
                                          local_expert_offset=off, backend="xla", **kw)
        return jax.lax.psum(out.astype(jnp.float32), "ep")

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("ep"), P("ep"), P("ep"), P("ep")),
                            out_specs=P(), check_vma=False)

    def loss_ep(logits, hs, s1, s2):
        return jnp.sum(sharded(logits, hs, c.w1, s1, c.w2, s2) * c.ct.astype(jnp.float32))

    @fast_jit
    def both(*args):
        return (jax.grad(loss_ep, argnums=(0, 1, 2, 3))(*args),
                jax.grad(_loss_fn(c, **kw), argnums=(0, 1, 2, 3))(*args))

    g_ep, g_1 = both(c.logits, c.hs, c.w1s, c.w2s)
    for a, b in zip(g_ep, g_1):
        assert rel(a, b) <= 1e-5


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("method,act", [(R.DeepSeekV3, A.Swiglu), (R.Renormalize, A.Relu2),
                                        (R.Default, A.Swiglu)], ids=lambda v: v.name)
def test_gpu_grad_cuda_forward_matches_pure_jax(method, act):
    """The gradient with the CUDA forward equals the pure-JAX one (rel <= 1e-2)."""
    c = make_case(300 + int(method), t=64, h=512, i=256, e=16, act=act)
    kw = route_kwargs(method, 4)
    p = {"logits": c.logits, "hs": c.hs, "s1": c.w1s, "s2": c.w2s}
    out_c, g_c = lib_grads("moe", p, c, c.ct, activation_type=act, backend="cuda", **kw)
    out_x, g_x = lib_grads("moe", p, c, c.ct, activation_type=act, backend="xla", **kw)
    assert rel(out_c, out_x) <= 1e-2
    for name in p:
        assert np.isfinite(g_c[name]).all(), name
        assert rel(g_c[name], g_x[name]) <= 1e-2, name
    px = {"logits": c.logits, "x": c.x, "s1": c.w1s, "s2": c.w2s}
    _, gb_c = lib_grads("bf16", px, c, c.ct, activation_type=act, backend="cuda", **kw)
    _, gb_x = lib_grads("bf16", px, c, c.ct, activation_type=act, backend="xla", **kw)
    for name in px:
        assert rel(gb_c[name], gb_x[name]) <= 1e-2, name


@pytest.mark.gpu
def test_gpu_vmap_with_cuda_stages():
    """vmap over token batches with the CUDA stages (which have no batching rule of their own):
    forward and per-example gradients equal the unbatched CUDA results."""
    b, t, h, e = 3, 32, 256, 16
    c = make_case(310, t=t, h=h, e=e)
    kw = route_kwargs(R.DeepSeekV3, 4)
    L, HQ, HS = _batch(b, t, h, e)

    def loss(logits, hq, hs, s1):
        out = jax_moe.fp8_block_scale_moe(logits, c.bias, hq, hs, c.w1, s1, c.w2, c.w2s,
                                          backend="cuda", **kw)
        return jnp.sum(out.astype(jnp.float32) * c.ct.astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 2, 3))
    vals, g = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 2, 3)),
                               in_axes=(0, 0, 0, None)))(L, HQ, HS, c.w1s)
    for j in range(b):
        assert float(vals[j]) == pytest.approx(float(jax.jit(loss)(L[j], HQ[j], HS[j], c.w1s)),
                                               rel=1e-2, abs=1e-2)
        single = jax.jit(grad)(L[j], HQ[j], HS[j], c.w1s)
        for a in range(3):
            assert rel(g[a][j], single[a]) <= 1e-2, (a, j)
