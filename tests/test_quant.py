"""quantize_/dequantize_ activations and weights against the float64 oracle."""
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe

import oracle  # tests/ is on sys.path (pytest prepend import mode)

FLT_MIN = float(np.finfo(np.float32).tiny)


def _f64(x):
    return np.asarray(np.asarray(x).astype(np.float32), np.float64)


def _check_fp8_codes(q, x, scale_full):
    """q must be fp8(x / s) up to one fp8 step where x/s sits at a rounding boundary (the
    library divides in float32, the oracle in float64)."""
    q = _f64(q)
    assert np.isfinite(q).all()
    assert np.abs(q).max() <= 448.0
    exact = oracle.to_fp8(x / scale_full).astype(np.float64)
    diff = q != exact
    if diff.any():
        # Only boundary cases: x/s within float32 rounding of the midpoint between the two codes.
        mid = (q[diff] + exact[diff]) / 2
        assert np.allclose(x[diff] / scale_full[diff], mid, rtol=1e-6, atol=0), "fp8 codes differ"
        assert diff.mean() < 1e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("t,h", [(13, 256), (1, 128), (64, 512)])
def test_quantize_activations_layout_and_values(t, h, dtype):
    rng = np.random.default_rng(100 + t + h)
    x = jnp.asarray(rng.standard_normal((t, h)) * np.exp(rng.standard_normal((t, 1)))).astype(dtype)
    q, s = jax_moe.quantize_activations(x)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (t, h)
    assert s.dtype == jnp.float32 and s.shape == (h // 128, t)
    xf = _f64(x)
    amax = np.abs(xf.reshape(t, h // 128, 128)).max(-1)  # [T, H/128]
    np.testing.assert_allclose(_f64(s), np.maximum(amax / 448, FLT_MIN).T, rtol=1e-6)
    s_full = np.repeat(_f64(s).T, 128, axis=1)  # [T, H]
    _check_fp8_codes(q, xf, s_full)
    # The oracle's quantize_rows gives the same codes and scales.
    oq, os_ = oracle.quantize_rows(xf)
    np.testing.assert_allclose(_f64(s).T, os_, rtol=1e-6)
    # Round trip: e4m3 keeps 3 mantissa bits -> elementwise error <= 1/16 relative (normals),
    # <= 2^-10 * s absolute (subnormals); about 2-3 % relative in Frobenius norm.
    deq = _f64(jax_moe.dequantize_activations(q, s))
    assert deq.shape == (t, h)
    np.testing.assert_allclose(deq, oracle.dequant(q, _f64(s).T), rtol=1e-6)
    err = np.abs(deq - xf)
    assert (err <= np.maximum(xf.__abs__() / 16, s_full * 2.0 ** -10) * (1 + 1e-6)).all()
    assert oracle.rel(deq, xf) < 0.04


def test_quantize_activations_amax_exact_and_saturation():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 384)).astype(np.float32)
    x[0, 5] = 1e30  # huge
    x[1, 130] = -3.0e38  # near float32 max
    x[2, 300] = 448.0 * 7.0  # amax block whose scale is exact
    x[3, 128:256] = 0.0  # all-zero block: scale FLT_MIN, codes 0
    q, s = jax_moe.quantize_activations(jnp.asarray(x))
    qf, sf = _f64(q), _f64(s)
    assert np.isfinite(qf).all() and np.isfinite(sf).all()
    # The amax element of every block maps to +-448 exactly.
    blocks = x.reshape(4, 3, 128)
    arg = np.abs(blocks).argmax(-1)
    qb = qf.reshape(4, 3, 128)
    for r in range(4):
        for b in range(3):
            if r == 3 and b == 1:
                continue
            assert abs(qb[r, b, arg[r, b]]) == 448.0, (r, b, qb[r, b, arg[r, b]])
    # 3136 / 448 = 7 exactly; XLA on CPU turns the division by 448 into a multiplication by
    # float32(1/448), which is 1 float32 ulp off: accept that, nothing coarser.
    np.testing.assert_allclose(sf[2, 2], 7.0, rtol=2 ** -22)
    deq = _f64(jax_moe.dequantize_activations(q, s))
    assert np.isfinite(deq).all()
    np.testing.assert_allclose(deq[2, 300], 448.0 * 7.0, rtol=2 ** -21)
    np.testing.assert_allclose(deq[0, 5], 1e30, rtol=1e-6)
    np.testing.assert_allclose(deq[1, 130], -3.0e38, rtol=1e-6)
    assert sf[1, 3] == FLT_MIN and (qf[3, 128:256] == 0).all() and (deq[3, 128:256] == 0).all()


def test_quantize_activations_scale_rounding_saturates():
    """amax/448 rounded down in float32 makes amax/s slightly > 448: must give 448, not NaN."""
    rng = np.random.default_rng(4)
    amaxes = np.float32(1.0) + rng.random(2000).astype(np.float32)
    below = (amaxes.astype(np.float32) / np.float32(448)).astype(np.float64) * 448 < amaxes
    assert below.any()  # there are such cases among the candidates
    x = np.zeros((len(amaxes), 128), np.float32)
    x[:, 17] = amaxes
    x[:, 3] = -amaxes
    q, s = jax_moe.quantize_activations(jnp.asarray(x))
    qf = _f64(q)
    assert not np.isnan(qf).any()
    assert (qf[:, 17] == 448).all() and (qf[:, 3] == -448).all()


@pytest.mark.parametrize("shape", [(256, 384), (3, 256, 128), (2, 2, 128, 256)])
def test_quantize_weights_layout_and_values(shape):
    rng = np.random.default_rng(sum(shape))
    w = rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-1])
    w[..., :128, :128] *= 50.0  # one block with a very different scale
    q, s = jax_moe.quantize_weights(jnp.asarray(w))
    *lead, n, k = shape
    assert q.dtype == jnp.float8_e4m3fn and q.shape == shape
    assert s.dtype == jnp.float32 and s.shape == (*lead, n // 128, k // 128)
    blocks = w.astype(np.float64).reshape(*lead, n // 128, 128, k // 128, 128)
    amax = np.abs(blocks).max(axis=(-3, -1))
    np.testing.assert_allclose(_f64(s), amax / 448, rtol=1e-6)
    s_full = np.repeat(np.repeat(_f64(s), 128, axis=-2), 128, axis=-1)
    _check_fp8_codes(q, w.astype(np.float64), s_full)
    deq = _f64(jax_moe.dequantize_weights(q, s))
    assert deq.shape == shape
    np.testing.assert_allclose(deq, oracle.dequant(q, _f64(s)), rtol=1e-6)
    err = np.abs(deq - w)
    assert (err <= np.maximum(np.abs(w) / 16, s_full * 2.0 ** -10) * (1 + 1e-6)).all()
    assert oracle.rel(deq, w) < 0.04
    # amax element of each block is exactly +-448 in fp8.
    qb = _f64(q).reshape(blocks.shape)
    assert (np.abs(qb).max(axis=(-3, -1)) == 448).all()


def test_quantize_weights_saturation_and_zero_block():
    w = np.zeros((256, 256), np.float32)
    w[0, 0] = 3.0e38
    w[200, 200] = -1e-30
    w[140, 10] = 5.0
    q, s = jax_moe.quantize_weights(jnp.asarray(w))
    qf, sf = _f64(q), _f64(s)
    assert np.isfinite(qf).all() and np.isfinite(sf).all()
    assert qf[0, 0] == 448 and qf[200, 200] == -448 and qf[140, 10] == 448
    assert sf[0, 1] == FLT_MIN and (qf[:128, 128:] == 0).all()
    deq = _f64(jax_moe.dequantize_weights(q, s))
    assert np.isfinite(deq).all()
    np.testing.assert_allclose(deq[0, 0], 3.0e38, rtol=1e-6)


def test_quantize_rejects_non_multiple_of_128():
    with pytest.raises(ValueError, match="128"):
        jax_moe.quantize_activations(jnp.ones((4, 200), jnp.float32))
    with pytest.raises(ValueError, match="128"):
        jax_moe.quantize_weights(jnp.ones((2, 200, 128), jnp.float32))
    with pytest.raises(ValueError, match="128"):
        jax_moe.quantize_weights(jnp.ones((128, 100), jnp.float32))
