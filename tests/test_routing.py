"""jax_moe.route / pack_topk / unpack_topk against the float64 oracle (SPEC section 2)."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_moe
from jax_moe import RoutingMethodType as R

import oracle  # tests/ is on sys.path (pytest prepend import mode)

ALL_METHODS = list(R)
BF16 = ml_dtypes.bfloat16


@functools.lru_cache(maxsize=None)
def _jitted_route(**static):
    return jax.jit(functools.partial(jax_moe.route, **static))


def lib_route(logits, bias, *, top_k, method, n_group=None, topk_group=None, rsf=None, jit=True):
    kw = dict(top_k=top_k, routing_method_type=method, n_group=n_group, topk_group=topk_group,
              routed_scaling_factor=rsf)
    ids, w = (_jitted_route(**kw) if jit else functools.partial(jax_moe.route, **kw))(logits, bias)
    assert ids.dtype == jnp.int32, ids.dtype
    assert w.dtype == jnp.bfloat16, w.dtype
    assert ids.shape == w.shape == (logits.shape[0], top_k)
    return np.asarray(ids).astype(np.int64), np.asarray(w).astype(np.float64)


def check_route(logits, bias, *, top_k, method, n_group=None, topk_group=None, rsf=None, jit=True):
    """ids identical to the oracle's and weights within 1 bf16 ulp of the oracle's bf16 weights."""
    ids, w = lib_route(logits, bias, top_k=top_k, method=method, n_group=n_group,
                       topk_group=topk_group, rsf=rsf, jit=jit)
    o_ids, o_w = oracle.route_bf16(np.asarray(logits), None if bias is None else np.asarray(bias),
                                   top_k, int(method), n_group, topk_group, rsf)
    bad = np.nonzero((ids != o_ids).any(axis=1))[0]
    assert bad.size == 0, (f"{R(method).name}: ids differ in rows {bad[:5]}: "
                           f"lib {ids[bad[:2]]} oracle {o_ids[bad[:2]]}")
    ulp = np.maximum(oracle.bf16_ulp(o_w), oracle.bf16_ulp(w))
    err = np.abs(w - o_w)
    assert (err <= ulp).all(), (f"{R(method).name}: weights differ by > 1 bf16 ulp, worst "
                                f"{err.max()} lib {w.flat[err.argmax()]} oracle {o_w.flat[err.argmax()]}")
    return ids, w


def _logits(rng, t, e, dtype):
    return jnp.asarray(rng.standard_normal((t, e)).astype(np.float32)).astype(dtype)


def _top_k(method, k):
    return 1 if method == R.Llama4 else k


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("method", ALL_METHODS, ids=[m.name for m in ALL_METHODS])
def test_route_every_method(method, dtype):
    rng = np.random.default_rng(1000 + 10 * int(method) + (dtype == jnp.bfloat16))
    t, e, k = 37, 64, 4
    logits = _logits(rng, t, e, dtype)
    # The bias is passed to every method: only DeepSeekV3 / MiniMax2 may use it (to select).
    bias = jnp.asarray(0.3 * rng.standard_normal(e), jnp.float32).astype(dtype)
    # rsf is passed everywhere too: only DeepSeekV3 / MiniMax2 multiply by it.
    check_route(logits, bias, top_k=_top_k(method, k), method=method, rsf=2.5)


@pytest.mark.parametrize("method", ALL_METHODS, ids=[m.name for m in ALL_METHODS])
def test_route_without_bias_and_rsf(method):
    rng = np.random.default_rng(2000 + int(method))
    logits = _logits(rng, 16, 32, jnp.float32)
    eager = check_route(logits, None, top_k=_top_k(method, 3), method=method, jit=False)
    jitted = check_route(logits, None, top_k=_top_k(method, 3), method=method)
    np.testing.assert_array_equal(eager[0], jitted[0])
    np.testing.assert_array_equal(eager[1], jitted[1])


def test_route_bias_selects_but_does_not_weight():
    """A huge bias on expert 5 forces it in, but its weight is still from sigmoid(logit)."""
    rng = np.random.default_rng(7)
    t, e, k = 8, 32, 4
    logits = rng.standard_normal((t, e)).astype(np.float32)
    logits[:, 5] = -6.0  # sigmoid tiny: never selected without the bias
    bias = np.zeros(e, np.float32)
    bias[5] = 10.0
    for method in (R.DeepSeekV3, R.MiniMax2):
        ids, w = check_route(jnp.asarray(logits), jnp.asarray(bias), top_k=k, method=method, rsf=1.0)
        assert (ids[:, 0] == 5).all()
        assert (w[:, 0] < 0.02).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n_group,topk_group,k", [(8, 4, 4), (4, 1, 2), (8, 8, 6), (1, 1, 4)])
def test_route_deepseek_grouped(n_group, topk_group, k, dtype):
    rng = np.random.default_rng(3000 + 100 * n_group + 10 * topk_group + k)
    t, e = 48, 64
    logits = _logits(rng, t, e, dtype)
    bias = jnp.asarray(0.5 * rng.standard_normal(e), jnp.float32)
    check_route(logits, bias, top_k=k, method=R.DeepSeekV3, n_group=n_group,
                topk_group=topk_group, rsf=2.5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_route_deepseek_like(dtype):
    """DeepSeek-V3 routing shapes: E=256, n_group=8, topk_group=4, k=8, rsf=2.5."""
    rng = np.random.default_rng(4000 + (dtype == jnp.bfloat16))
    t, e, k = 64, 256, 8
    logits = _logits(rng, t, e, dtype)
    bias = jnp.asarray(0.1 * rng.standard_normal(e), jnp.float32)
    ids, w = check_route(logits, bias, top_k=k, method=R.DeepSeekV3, n_group=8, topk_group=4,
                         rsf=2.5)
    # Each row uses at most topk_group = 4 groups of 32 experts.
    assert max(len(set(row // 32)) for row in ids) <= 4
    # The grouping matters on these inputs (otherwise this test would not test it).
    flat_ids, _ = oracle.route(np.asarray(logits), np.asarray(bias), k, int(R.DeepSeekV3), None,
                               None, 2.5)
    assert (flat_ids != ids).any()
    # Renormalized weights sum to rsf (bf16 rounding of k weights aside).
    np.testing.assert_allclose(w.sum(axis=1), 2.5, rtol=2e-2)


@pytest.mark.parametrize("method", ALL_METHODS, ids=[m.name for m in ALL_METHODS])
def test_route_ties_smaller_index_wins(method):
    k = _top_k(method, 4)
    # All-equal logits: every method picks experts 0..k-1 in order.
    logits = jnp.zeros((3, 16), jnp.float32).at[1].set(1.5).at[2].set(-2.0)
    ids, _ = check_route(logits, None, top_k=k, method=method)
    assert (ids == np.arange(k)).all()
    # Many ties among non-negative quarter-integers, in random positions.
    rng = np.random.default_rng(5000 + int(method))
    lg = rng.integers(0, 5, size=(32, 16)).astype(np.float32) / 4
    for dtype in (jnp.float32, jnp.bfloat16):
        check_route(jnp.asarray(lg, dtype), None, top_k=k, method=method)
    # An exact tie at the top: the later expert with the same value is ranked second.
    lg = np.full((1, 16), -1.0, np.float32)
    lg[0, [11, 3, 7]] = 2.0
    ids, _ = check_route(jnp.asarray(lg), None, top_k=k, method=method)
    assert list(ids[0, :min(k, 3)]) == [3, 7, 11][:min(k, 3)]


def test_route_deepseek_group_ties():
    """Equal group scores: the lower group index is kept; equal experts: the lower index."""
    e, n_group, topk_group, k = 64, 8, 4, 8
    logits = jnp.zeros((2, e), jnp.float32)
    ids, _ = check_route(logits, None, top_k=k, method=R.DeepSeekV3, n_group=n_group,
                         topk_group=topk_group, rsf=1.0)
    assert (ids == np.arange(k)).all()
    # Groups 2 and 5 tie for best (two experts each at logit 2), group 6 has one expert at 3,
    # everything else 0 -> group order by score: 2, 5 (tie: 2 first), 6, then 0.
    lg = np.zeros((1, e), np.float32)
    lg[0, [16, 17, 40, 41]] = 2.0
    lg[0, 48] = 3.0
    rng = np.random.default_rng(6)
    lg2 = rng.integers(0, 4, size=(24, e)).astype(np.float32)
    for x in (lg, lg2):
        check_route(jnp.asarray(x), None, top_k=k, method=R.DeepSeekV3, n_group=n_group,
                    topk_group=topk_group, rsf=2.5)
        check_route(jnp.asarray(x), None, top_k=k, method=R.DeepSeekV3, n_group=n_group,
                    topk_group=2, rsf=2.5)


@pytest.mark.parametrize("method", ALL_METHODS, ids=[m.name for m in ALL_METHODS])
def test_route_nan_row_is_isolated(method):
    rng = np.random.default_rng(7000 + int(method))
    t, e = 12, 32
    k = _top_k(method, 4)
    lg = rng.standard_normal((t, e)).astype(np.float32)
    bias = jnp.asarray(0.2 * rng.standard_normal(e), jnp.float32)
    clean_ids, clean_w = lib_route(jnp.asarray(lg), bias, top_k=k, method=method, n_group=None,
                                   rsf=2.0)
    bad = lg.copy()
    bad[3, :] = np.nan
    bad[5, 7] = np.nan
    ids, w = lib_route(jnp.asarray(bad), bias, top_k=k, method=method, rsf=2.0)
    keep = np.setdiff1d(np.arange(t), [3, 5])
    np.testing.assert_array_equal(ids[keep], clean_ids[keep])
    np.testing.assert_array_equal(w[keep], clean_w[keep])


def test_route_nan_row_grouped_deepseek():
    rng = np.random.default_rng(8)
    t, e = 10, 64
    lg = rng.standard_normal((t, e)).astype(np.float32)
    kw = dict(top_k=8, method=R.DeepSeekV3, n_group=8, topk_group=4, rsf=2.5)
    clean_ids, clean_w = lib_route(jnp.asarray(lg), None, **kw)
    lg[0, :] = np.nan
    lg[4, 20] = np.nan
    ids, w = lib_route(jnp.asarray(lg), None, **kw)
    keep = np.setdiff1d(np.arange(t), [0, 4])
    np.testing.assert_array_equal(ids[keep], clean_ids[keep])
    np.testing.assert_array_equal(w[keep], clean_w[keep])


# ----------------------------------------------------------------------------- packed format
def _expected_packed(ids, w_bf16):
    bits = np.asarray(w_bf16).astype(BF16).view(np.uint16).astype(np.int64)
    return ((ids.astype(np.int64) << 16) | bits).astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("wdtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_pack_unpack_round_trip(wdtype):
    rng = np.random.default_rng(9)
    t, k = 17, 8
    ids = rng.integers(0, 32768, size=(t, k)).astype(np.int32)
    ids[0, :4] = [0, 1, 32767, 256]
    w = rng.standard_normal((t, k)).astype(np.float32)  # about half negative
    w[1, :6] = [-0.0, 0.0, -1.0, -65504.0, np.float32(np.finfo(np.float32).tiny), -3.3e38]
    w_bf16 = w.astype(BF16)
    packed = jax_moe.pack_topk(jnp.asarray(ids), jnp.asarray(w, wdtype))
    assert packed.dtype == jnp.int32 and packed.shape == (t, k)
    np.testing.assert_array_equal(np.asarray(packed), _expected_packed(ids, w_bf16))
    u_ids, u_w = jax_moe.unpack_topk(packed)
    assert u_ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(u_ids), ids)
    np.testing.assert_array_equal(np.asarray(u_w).astype(BF16).view(np.uint16),
                                  w_bf16.view(np.uint16))


def test_unpack_masks_weight_bits():
    """Hand-built packed values with the weight's sign bit set decode to the right id."""
    ids = np.array([[0, 5, 32767, 1234]], np.int64)
    w = np.array([[-1.0, -0.5, -2.0, 3.0]], np.float32).astype(BF16)
    packed = _expected_packed(ids, w)
    u_ids, u_w = jax_moe.unpack_topk(jnp.asarray(packed))
    np.testing.assert_array_equal(np.asarray(u_ids), ids)
    np.testing.assert_array_equal(np.asarray(u_w).astype(np.float32), w.astype(np.float32))


def test_pack_of_route_round_trip():
    rng = np.random.default_rng(10)
    logits = _logits(rng, 9, 64, jnp.float32)
    ids, w = jax_moe.route(logits, None, top_k=4, routing_method_type=R.TopK)  # signed weights
    u_ids, u_w = jax_moe.unpack_topk(jax_moe.pack_topk(ids, w))
    np.testing.assert_array_equal(np.asarray(u_ids), np.asarray(ids))
    np.testing.assert_array_equal(np.asarray(u_w), np.asarray(w))
