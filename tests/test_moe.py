"""fp8_block_scale_moe / fp8_block_scale_routed_moe (backend="xla") against the float64 oracle.

Every library result is checked twice (SPEC section 3):
  * against the oracle with the same rounding points: rel <= 1e-2 (TOL_ROUNDED);
  * against the oracle that skips the rounding of steps 4-6: rel <= 6e-2 (TOL_EXACT).
Library calls go through jax.jit (cached per static configuration): on CPU one compile is much
cheaper than running the pipeline op by op; `test_jit_matches_eager` checks both agree bitwise.
"""
import functools
from typing import NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import ActivationType as A
from jax_moe import RoutingMethodType as R

import cases  # tests/ is on sys.path (pytest prepend import mode)
import oracle

TOL_ROUNDED = 1e-2
TOL_EXACT = 6e-2


class Case(NamedTuple):
    logits: jax.Array  # [T, E]
    bias: jax.Array  # [E] float32
    hq: jax.Array  # fp8 [T, H]
    hs: jax.Array  # f32 [H/128, T]
    w1: jax.Array
    w1s: jax.Array
    w2: jax.Array
    w2s: jax.Array


def make_case(seed, *, t, h, i, e, e_loc=None, act=A.Swiglu, logits_dtype=jnp.float32):
    """Inputs drawn like real ones (`cases.quantized_layer`), logits in `logits_dtype`."""
    c = cases.quantized_layer(np.random.default_rng(seed), t=t, h=h, i=i, e=e, e_loc=e_loc, act=act)
    return Case(jnp.asarray(c.logits).astype(logits_dtype), c.bias, c.hq, c.hs, c.w1, c.w1s,
                c.w2, c.w2s)


def expert_args(c):
    return (c.hq, c.hs, c.w1, c.w1s, c.w2, c.w2s)


@functools.lru_cache(maxsize=None)
def _jitted(routed, **static):
    fn = jax_moe.fp8_block_scale_routed_moe if routed else jax_moe.fp8_block_scale_moe
    return jax.jit(functools.partial(fn, backend="xla", **static))


def lib_moe(c, **static):
    return _jitted(False, **static)(c.logits, c.bias, *expert_args(c))


def lib_routed(c, topk, **static):
    return _jitted(True, **static)(topk, c.bias, *expert_args(c))


def oracle_route(c, *, top_k, routing_method_type=R.DeepSeekV3, n_group=None, topk_group=None,
                 routed_scaling_factor=None, **_):
    return oracle.route_bf16(np.asarray(c.logits), np.asarray(c.bias), top_k,
                             int(routing_method_type), n_group, topk_group, routed_scaling_factor)


def oracle_moe(c, ids, w, *, act, offset=0, do_finalize=True, rounding=True, w1=None):
    w1, w1s = (np.asarray(c.w1), np.asarray(c.w1s)) if w1 is None else w1
    return oracle.moe(ids, w, np.asarray(c.hq), np.asarray(c.hs), w1, w1s,
                      np.asarray(c.w2), np.asarray(c.w2s), int(act), offset, do_finalize,
                      rounding=rounding)


def check(out, c, ids, w, *, act, offset=0, do_finalize=True, what=""):
    """out vs both oracles; returns (rel_rounded, rel_exact)."""
    out = np.asarray(out).astype(np.float32).astype(np.float64)
    assert np.isfinite(out).all(), f"{what}: NaN/Inf in the output"
    r1 = oracle.rel(out, oracle_moe(c, ids, w, act=act, offset=offset, do_finalize=do_finalize))
    r2 = oracle.rel(out, oracle_moe(c, ids, w, act=act, offset=offset, do_finalize=do_finalize,
                                    rounding=False))
    assert r1 <= TOL_ROUNDED, f"{what}: rel {r1:.3g} vs the rounded oracle > {TOL_ROUNDED}"
    assert r2 <= TOL_EXACT, f"{what}: rel {r2:.3g} vs the exact oracle > {TOL_EXACT}"
    return r1, r2


def _route_kwargs(method, k, e):
    kw = dict(top_k=1 if method == R.Llama4 else k, routing_method_type=method,
              routed_scaling_factor=2.5 if method in (R.DeepSeekV3, R.MiniMax2) else None)
    if method == R.DeepSeekV3:
        kw.update(n_group=4, topk_group=2)
    return kw


# ----------------------------------------------------------------------------- activations
@pytest.mark.parametrize("act", [A.Swiglu, A.Geglu, A.Relu2, A.Identity],
                         ids=lambda a: A(a).name)
def test_every_activation(act):
    t, h, i, e = 13, 256, 128, 16
    c = make_case(100 + int(act), t=t, h=h, i=i, e=e, act=act)
    kw = _route_kwargs(R.DeepSeekV3, 4, e)
    out = lib_moe(c, activation_type=act, **kw)
    assert out.dtype == jnp.bfloat16 and out.shape == (t, h)
    ids, w = oracle_route(c, **kw)
    check(out, c, ids, w, act=act, what=A(act).name)


# ----------------------------------------------------------------------------- routing methods
# Routing itself is checked method by method in test_routing.py; here the methods whose weights
# differ in kind: softmax, renormalized softmax, k=1, signed raw logits, sigmoid, bias + rsf.
@pytest.mark.parametrize("method", [R.Default, R.Renormalize, R.Llama4, R.TopK, R.SigmoidRenorm,
                                    R.MiniMax2], ids=lambda m: R(m).name)
def test_routing_methods(method):
    t, h, i, e = 7, 128, 128, 32
    c = make_case(200 + int(method), t=t, h=h, i=i, e=e,
                  logits_dtype=jnp.bfloat16 if int(method) % 2 else jnp.float32)
    kw = _route_kwargs(method, 3, e)
    out = lib_moe(c, **kw)
    ids, w = oracle_route(c, **kw)
    check(out, c, ids, w, act=A.Swiglu, what=R(method).name)


def test_deepseek_like_layer():
    """DeepSeek-V3 routing at E=64, k=8 (n_group=8, topk_group=4, rsf=2.5) with H=512, I=256."""
    t, h, i, e = 64, 512, 256, 64
    c = make_case(300, t=t, h=h, i=i, e=e)
    kw = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
              routing_method_type=R.DeepSeekV3, intermediate_size=i)
    out = lib_moe(c, **kw)
    ids, w = oracle_route(c, **kw)
    check(out, c, ids, w, act=A.Swiglu, what="deepseek-like")


# ----------------------------------------------------------------------------- routed entry
@pytest.mark.parametrize("form", ["packed", "tuple_bf16", "tuple_f32"])
def test_routed_forms(form):
    t, h, i, e, k = 13, 256, 256, 16, 4
    c = make_case(400 + len(form), t=t, h=h, i=i, e=e)
    rng = np.random.default_rng(401 + len(form))
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    w = rng.uniform(-0.5, 1.5, size=(t, k)).astype(np.float32)  # used as given, even negative
    if form == "packed":
        topk = jax_moe.pack_topk(jnp.asarray(ids), jnp.asarray(w, jnp.bfloat16))
    else:
        topk = (jnp.asarray(ids), jnp.asarray(w, jnp.bfloat16 if form == "tuple_bf16" else jnp.float32))
    # Routing arguments are accepted but must not change the given weights (no rsf, no renorm).
    out = lib_routed(c, topk, top_k=k, routed_scaling_factor=2.5, n_group=4, topk_group=2)
    w_used = oracle.to_bf16(w) if form != "tuple_f32" else w.astype(np.float64)
    check(out, c, ids, w_used, act=A.Swiglu, what=form)


def test_routed_matches_unrouted():
    """route -> pack -> routed entry gives the same result as the fused entry, bitwise."""
    t, h, i, e = 13, 256, 128, 16
    c = make_case(450, t=t, h=h, i=i, e=e)
    kw = _route_kwargs(R.DeepSeekV3, 4, e)
    ids, w = jax_moe.route(c.logits, c.bias, **kw)
    fused = lib_moe(c, **kw)
    packed = lib_routed(c, jax_moe.pack_topk(ids, w), **kw)
    tup = lib_routed(c, (ids, w), **kw)
    np.testing.assert_array_equal(np.asarray(packed).view(np.uint16), np.asarray(fused).view(np.uint16))
    np.testing.assert_array_equal(np.asarray(tup).view(np.uint16), np.asarray(fused).view(np.uint16))


def test_routed_out_of_range_ids_are_skipped():
    t, h, i, e, k = 13, 128, 256, 16, 4
    c = make_case(500, t=t, h=h, i=i, e=e)
    rng = np.random.default_rng(501)
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int64)
    w = rng.uniform(0.1, 1.0, size=(t, k)).astype(np.float32)
    bad_tuple = ids.copy()
    bad_tuple[0, 1] = -1
    bad_tuple[2, 0] = e
    bad_tuple[3, :] = [-5, e + 100, 1 << 20, -(1 << 30)]  # a token with no valid expert at all
    bad_tuple[5, 3] = np.iinfo(np.int32).max
    bad_packed = ids.copy()
    bad_packed[0, 1] = e
    bad_packed[4, :] = [32767, e + 1, 1000, e]
    bad_packed[6, 2] = 20000
    for bad, topk in [
        (bad_tuple, (jnp.asarray(bad_tuple.astype(np.int32)), jnp.asarray(w, jnp.bfloat16))),
        (bad_packed, jax_moe.pack_topk(jnp.asarray(bad_packed.astype(np.int32)),
                                       jnp.asarray(w, jnp.bfloat16))),
    ]:
        out = lib_routed(c, topk, top_k=k)
        check(out, c, bad, oracle.to_bf16(w), act=A.Swiglu, what="out-of-range ids")
        empty = [r for r in range(t) if not ((bad[r] >= 0) & (bad[r] < e)).any()]
        assert empty and (np.asarray(out)[empty].astype(np.float32) == 0).all()


# ----------------------------------------------------------------------------- expert parallelism
@pytest.mark.parametrize("offset,e_loc", [(8, 8), (24, 8), (5, 11)])
def test_local_expert_offset(offset, e_loc):
    """Only experts in [offset, offset + E_loc) contribute; the partial sums over a partition of
    the experts add up to the full layer."""
    t, h, i, e = 13, 128, 128, 32
    c = make_case(600 + offset, t=t, h=h, i=i, e=e, e_loc=e_loc)
    kw = dict(_route_kwargs(R.DeepSeekV3, 4, e), local_expert_offset=offset, local_num_experts=e_loc,
              num_experts=e)
    out = lib_moe(c, **kw)
    ids, w = oracle_route(c, **kw)
    check(out, c, ids, w, act=A.Swiglu, offset=offset, what=f"offset {offset}")
    local = (ids >= offset) & (ids < offset + e_loc)
    none_local = ~local.any(axis=1)
    assert (np.asarray(out)[none_local].astype(np.float32) == 0).all()
    assert local.any()


def test_expert_partition_sums_to_full_layer():
    """Expert-parallel use: the partial outputs of a partition of the experts add up to the full
    layer. The offset is a traced int32 scalar here (as under shard_map) and agrees bitwise with
    a static offset."""
    t, h, i, e, p = 13, 128, 128, 16, 4
    c = make_case(650, t=t, h=h, i=i, e=e)
    kw = _route_kwargs(R.Renormalize, 4, e)
    full = np.asarray(lib_moe(c, **kw)).astype(np.float64)
    traced = jax.jit(lambda off, *a: jax_moe.fp8_block_scale_moe(*a, local_expert_offset=off,
                                                                 backend="xla", **kw))
    parts = 0.0
    el = e // p
    for d in range(p):
        sl = slice(d * el, (d + 1) * el)
        cd = c._replace(w1=c.w1[sl], w1s=c.w1s[sl], w2=c.w2[sl], w2s=c.w2s[sl])
        part = np.asarray(traced(jnp.int32(d * el), cd.logits, cd.bias, *expert_args(cd)))
        if d == 2:
            static = np.asarray(lib_moe(cd, local_expert_offset=d * el, **kw))
            np.testing.assert_array_equal(part.view(np.uint16), static.view(np.uint16))
        parts = parts + part.astype(np.float64)
    assert oracle.rel(parts, full) <= TOL_ROUNDED


# ----------------------------------------------------------------------------- do_finalize=False
@pytest.mark.parametrize("routed", [False, True], ids=["fused", "routed"])
def test_do_finalize_false(routed):
    t, h, i, e, e_loc, offset, k = 13, 128, 128, 16, 8, 4, 4
    c = make_case(700 + routed, t=t, h=h, i=i, e=e, e_loc=e_loc)
    kw = dict(_route_kwargs(R.DeepSeekV3, k, e), local_expert_offset=offset, num_experts=e)
    ids, w = oracle_route(c, **kw)
    if routed:
        lids, lw = jax_moe.route(c.logits, c.bias, **{a: v for a, v in kw.items()
                                                       if a not in ("local_expert_offset",)})
        res = lib_routed(c, (lids, lw), do_finalize=False, **kw)
    else:
        res = lib_moe(c, do_finalize=False, **kw)
    assert isinstance(res, jax_moe.MoEOutputs)
    y, tw, tid = res
    assert y.dtype == jnp.bfloat16 and y.shape == (t, k, h)
    assert tid.dtype == jnp.int32 and tid.shape == (t, k) and tw.shape == (t, k)
    np.testing.assert_array_equal(np.asarray(tid), ids)
    tw64 = np.asarray(tw).astype(np.float32).astype(np.float64)
    assert (np.abs(tw64 - w) <= np.maximum(oracle.bf16_ulp(w), oracle.bf16_ulp(tw64))).all()
    check(y, c, ids, w, act=A.Swiglu, offset=offset, do_finalize=False, what="do_finalize=False")
    nonlocal_ = (ids < offset) | (ids >= offset + e_loc)
    assert nonlocal_.any() and (~nonlocal_).any()
    yf = np.asarray(y).astype(np.float32)
    assert (yf[nonlocal_] == 0).all()
    assert (np.abs(yf[~nonlocal_]).max(axis=-1) > 0).all()
    # Finalizing by hand reproduces the finalized output.
    fin = lib_moe(c, **kw) if not routed else lib_routed(c, (lids, lw), **kw)
    by_hand = np.einsum("tk,tkh->th", tw64, yf.astype(np.float64))
    assert oracle.rel(np.asarray(fin), by_hand) <= 1e-2


# ----------------------------------------------------------------------------- token counts
@pytest.mark.parametrize("t", [1, 7, 64])
def test_token_counts(t):
    h, i, e = 128, 128, 8
    c = make_case(800 + t, t=t, h=h, i=i, e=e)
    kw = _route_kwargs(R.TopKSigmoid, 2, e)
    out = lib_moe(c, **kw)
    assert out.shape == (t, h)
    ids, w = oracle_route(c, **kw)
    check(out, c, ids, w, act=A.Swiglu, what=f"T={t}")


@pytest.mark.parametrize("routed", [False, True], ids=["fused", "routed"])
@pytest.mark.parametrize("do_finalize", [True, False])
def test_zero_tokens(routed, do_finalize):
    h, i, e, k = 256, 128, 8, 2
    c = make_case(900, t=3, h=h, i=i, e=e)
    c = c._replace(logits=c.logits[:0], hq=c.hq[:0], hs=c.hs[:, :0])
    if routed:
        res = jax_moe.fp8_block_scale_routed_moe(jnp.zeros((0, k), jnp.int32), None, *expert_args(c),
                                                 top_k=k, do_finalize=do_finalize, backend="xla")
    else:
        res = jax_moe.fp8_block_scale_moe(c.logits, c.bias, *expert_args(c), top_k=k,
                                          routing_method_type=R.Renormalize,
                                          do_finalize=do_finalize, backend="xla")
    if do_finalize:
        assert res.shape == (0, h) and res.dtype == jnp.bfloat16
    else:
        assert isinstance(res, jax_moe.MoEOutputs)
        assert res.expert_outputs.shape == (0, k, h) and res.expert_outputs.dtype == jnp.bfloat16
        assert res.topk_ids.shape == (0, k) and res.topk_weights.shape == (0, k)


def test_all_tokens_to_one_expert():
    t, h, i, e, k = 64, 128, 128, 16, 2
    c = make_case(1000, t=t, h=h, i=i, e=e)
    # Fused: expert 11 wins for every token by a wide margin; the second slot varies.
    lg = np.asarray(c.logits).copy()
    lg[:, 11] = 20.0
    c1 = c._replace(logits=jnp.asarray(lg))
    kw = _route_kwargs(R.Renormalize, k, e)
    ids, w = oracle_route(c1, **kw)
    assert (ids[:, 0] == 11).all()
    check(lib_moe(c1, **kw), c1, ids, w, act=A.Swiglu, what="one hot expert")
    # Routed, every slot of every token on expert 3 (other experts empty).
    ids = np.full((t, 1), 3, np.int32)
    w = np.full((t, 1), 0.75, np.float32)
    out = lib_routed(c, (jnp.asarray(ids), jnp.asarray(w, jnp.bfloat16)), top_k=1)
    check(out, c, ids, w, act=A.Swiglu, what="all rows on expert 3")


def test_nan_logits_do_not_corrupt_other_tokens():
    t, h, i, e = 13, 128, 128, 16
    c = make_case(1100, t=t, h=h, i=i, e=e)
    kw = _route_kwargs(R.DeepSeekV3, 4, e)
    clean = np.asarray(lib_moe(c, **kw))
    lg = np.asarray(c.logits).copy()
    lg[2, :] = np.nan
    lg[9, 5] = np.nan
    out = np.asarray(lib_moe(c._replace(logits=jnp.asarray(lg)), **kw))
    keep = np.setdiff1d(np.arange(t), [2, 9])
    np.testing.assert_array_equal(out[keep].view(np.uint16), clean[keep].view(np.uint16))


# ----------------------------------------------------------------------------- jit
@pytest.mark.parametrize("routed", [False, True], ids=["fused", "routed"])
def test_jit_matches_eager(routed):
    t, h, i, e = 7, 128, 128, 8
    c = make_case(1200 + routed, t=t, h=h, i=i, e=e)
    kw = _route_kwargs(R.Renormalize, 2, e)
    if routed:
        topk = jax_moe.pack_topk(*jax_moe.route(c.logits, None, **kw))
        eager = jax_moe.fp8_block_scale_routed_moe(topk, None, *expert_args(c), backend="xla", **kw)
        jitted = lib_routed(c._replace(bias=None), topk, **kw)
    else:
        eager = jax_moe.fp8_block_scale_moe(c.logits, c.bias, *expert_args(c), backend="xla", **kw)
        jitted = lib_moe(c, **kw)
    np.testing.assert_array_equal(np.asarray(eager).view(np.uint16), np.asarray(jitted).view(np.uint16))


def test_backend_auto_on_cpu_matches_xla():
    if jax_moe.cuda_available():
        pytest.skip("CUDA path available: compared in the GPU tests")
    t, h, i, e = 7, 128, 128, 8
    c = make_case(1300, t=t, h=h, i=i, e=e)
    kw = _route_kwargs(R.Renormalize, 2, e)
    auto = jax.jit(functools.partial(jax_moe.fp8_block_scale_moe, backend="auto", **kw))(
        c.logits, c.bias, *expert_args(c))
    np.testing.assert_array_equal(np.asarray(auto).view(np.uint16),
                                  np.asarray(lib_moe(c, **kw)).view(np.uint16))


# ----------------------------------------------------------------------------- the tolerance bites
def test_tolerance_catches_mistakes():
    """Plausible implementation mistakes move the result by more than TOL_EXACT, so the
    comparisons above would catch them."""
    t, h, i, e = 32, 256, 256, 16
    c = make_case(1400, t=t, h=h, i=i, e=e)
    kw = _route_kwargs(R.DeepSeekV3, 4, e)
    out = np.asarray(lib_moe(c, **kw))
    ids, w = oracle_route(c, **kw)
    r_ok = oracle.rel(out, oracle_moe(c, ids, w, act=A.Swiglu, rounding=False))
    assert r_ok <= TOL_EXACT

    def rel_exact(ids_, w_, act=A.Swiglu, w1=None, cc=c):
        return oracle.rel(out, oracle_moe(cc, ids_, w_, act=act, rounding=False, w1=w1))

    mistakes = {}
    # routed_scaling_factor forgotten (1.0 instead of 2.5)
    ids1, w1_ = oracle_route(c, **dict(kw, routed_scaling_factor=None))
    mistakes["rsf ignored"] = rel_exact(ids1, w1_)
    # up/gate halves swapped (gate = first half)
    w1 = np.asarray(c.w1)
    w1s = np.asarray(c.w1s)
    sw = (np.concatenate([w1[:, i:], w1[:, :i]], axis=1),
          np.concatenate([w1s[:, i // 128:], w1s[:, :i // 128]], axis=1))
    mistakes["up/gate swapped"] = rel_exact(ids, w, w1=sw)
    # Geglu instead of Swiglu
    mistakes["geglu for swiglu"] = rel_exact(ids, w, act=A.Geglu)
    # no renormalization: weights = sigmoid(l[ids]) * rsf
    s = 1 / (1 + np.exp(-np.asarray(c.logits, np.float64)))
    mistakes["no renormalization"] = rel_exact(ids, np.take_along_axis(s, ids, 1) * 2.5)
    # the bias used in the weights as well as in the selection
    b = s + np.asarray(c.bias, np.float64)
    bw = np.take_along_axis(b, ids, 1)
    mistakes["bias in weights"] = rel_exact(ids, bw / bw.sum(1, keepdims=True) * 2.5)
    # hidden_states_scale read as [T, H/128] (wrong block <-> token mapping)
    hs_wrong = np.asarray(c.hs).reshape(-1).reshape(t, h // 128).T
    mistakes["scale layout"] = rel_exact(ids, w, cc=c._replace(hs=jnp.asarray(hs_wrong)))
    # the last slot dropped
    mistakes["last slot dropped"] = rel_exact(ids[:, :-1], w[:, :-1])
    # the second-best group kept instead of the best (ungrouped selection)
    ids_ug, w_ug = oracle_route(c, **dict(kw, n_group=None, topk_group=None))
    assert (ids_ug != ids).any()
    mistakes["grouping ignored"] = rel_exact(ids_ug, w_ug)
    caught = {m: r for m, r in mistakes.items() if r > TOL_EXACT}
    assert caught == mistakes, f"not caught at {TOL_EXACT}: {set(mistakes) - set(caught)}; {mistakes}"


def _largest_intermediates(jaxpr):
    """(elements, primitive, shape) of every value computed in a jaxpr, sub-jaxprs included."""
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                found.append((int(np.prod(getattr(v.aval, "shape", ()))), str(eqn.primitive),
                              getattr(v.aval, "shape", ())))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return sorted(found, reverse=True)


def test_pure_jax_path_builds_nothing_dense():
    """The pure-JAX path groups rows by expert: no intermediate reaches T*E_loc*H elements
    (no [T, E_loc, H] buffer, no dequantization of all experts at once: that alone would be
    E_loc*2I*H), and there is no ragged_dot (which XLA expands to dense math)."""
    t, h, i, e, k = 16, 256, 128, 64, 2
    c = make_case(31, t=t, h=h, i=i, e=e)
    f = functools.partial(jax_moe.fp8_block_scale_moe, top_k=k, backend="xla",
                          routing_method_type=R.Renormalize)
    found = _largest_intermediates(jax.make_jaxpr(f)(c.logits, c.bias, *expert_args(c)))
    limit = t * e * h
    assert found[0][0] < limit, f"{found[0]} has >= T*E_loc*H = {limit} elements"
    assert e * 2 * i * h > limit  # a dense dequantization would have been caught
    assert not any("ragged_dot" in prim for _, prim, _ in found)
