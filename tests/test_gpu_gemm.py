"""`jax_moe_grouped_gemm` (blockwise-FP8 grouped GEMM, CUTLASS sm90) against float64 NumPy.

The reference dequantizes the same FP8 codes with the same scales in float64 and multiplies per
group; the kernel accumulates in float32 with per-128-K promotion and rounds to bfloat16, so
rel ~ 3e-3 is expected and 1e-2 is the bound. With float32 output (what the pipeline uses for
GEMM1) only the tensor cores' accumulation differs from float64: bound 1e-3.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_moe import ops, quant

pytestmark = pytest.mark.gpu

BLOCK = 128
TOL = 1e-2
TOL_F32 = 1e-3  # float32 output: no bf16 rounding
# fp8 e4m3fn code -> float64 value (NaN codes never occur in quantized data)
_FP8_LUT = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)


def _fp8_to_f64(x):
    """fp8 device array -> float64 NumPy (moved as bytes, decoded with a table)."""
    return _FP8_LUT[np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint8))]


def _grouped_scales_np(row_scales, offsets):
    """[M, K/128] row scales -> grouped MN-major vector (independent of ops.py)."""
    m, kb = row_scales.shape
    out = np.asarray(row_scales, np.float32).reshape(-1).copy()
    for g in range(len(offsets) - 1):
        lo, hi = int(offsets[g]), int(offsets[g + 1])
        out[lo * kb:hi * kb] = row_scales[lo:hi].T.reshape(-1)
    return out


def _inputs(seed, m, g, n, k):
    """Random N(0,1)/sqrt(K) activations [M, K] and weights [G, N, K], quantized on device."""
    ka, kb = jax.random.split(jax.random.PRNGKey(seed))
    a_q, a_s = jax.jit(lambda key: quant.quantize_rows(
        jax.random.normal(key, (m, k), jnp.float32) / np.sqrt(k)))(ka)
    b_q, b_s = jax.jit(lambda key: quant.quantize_weights(
        jax.random.normal(key, (g, n, k), jnp.float32) / np.sqrt(k)))(kb)
    return a_q, a_s, b_q, b_s


def _reference(a_q, a_s, b_q, b_s, offsets):
    """float64 d for the rows of every group (rows past offsets[G] stay NaN)."""
    m, k = a_q.shape
    g, n, _ = b_q.shape
    a = _fp8_to_f64(a_q) * np.repeat(np.asarray(a_s, np.float64), BLOCK, axis=1)
    b_s = np.asarray(b_s, np.float64)
    d = np.full((m, n), np.nan)
    for e in range(g):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi == lo:
            continue
        w = _fp8_to_f64(b_q[e]) * np.repeat(np.repeat(b_s[e], BLOCK, 0), BLOCK, 1)
        d[lo:hi] = a[lo:hi] @ w.T
    return d


def _bf16_ordered(x):
    """bf16 values -> integers whose differences count ulps (+0 and -0 both 0)."""
    bits = np.asarray(x).view(np.int16).astype(np.int32)
    return np.where(bits < 0, -(bits & 0x7FFF), bits)


def _rel(x, ref):
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _gemm_fn(out_dtype=jnp.bfloat16, tile="auto"):
    """The jitted kernel with one tile config (ops.GEMM_TILES)."""
    return jax.jit(lambda *xs: ops.grouped_gemm_raw(*xs, out_dtype=out_dtype, tile=tile))


def _run_and_check(a_q, a_s, b_q, b_s, offsets, fn=None, out_dtype=jnp.bfloat16, tile="auto"):
    offsets = np.asarray(offsets, np.int32)
    sfa = _grouped_scales_np(np.asarray(a_s), offsets)
    d = (fn or _gemm_fn(out_dtype, tile))(a_q, jnp.asarray(sfa), b_q, b_s, jnp.asarray(offsets))
    assert d.shape == (a_q.shape[0], b_q.shape[1]) and d.dtype == out_dtype
    tol = TOL_F32 if out_dtype == jnp.float32 else TOL
    valid = slice(int(offsets[0]), int(offsets[-1]))
    # rows past offsets[G] are never written: garbage (maybe NaN) there, so compare valid rows
    got = np.asarray(d[valid].astype(jnp.float32), np.float64)
    want = _reference(a_q, a_s, b_q, b_s, offsets)[valid]
    assert np.isfinite(got).all(), "rows of non-empty groups must all be written"
    if got.size:
        rel = _rel(got, want)
        assert rel <= tol, f"rel error {rel:.3e}"
        # every row individually (catches a wrong group / missed tile hidden by the norm)
        row_rel = np.linalg.norm(got - want, axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-30)
        assert row_rel.max() <= 3 * tol, f"worst row rel {row_rel.max():.3e} at {row_rel.argmax()}"
    return got


def _split(rng, m, g, empty=()):
    """Random contiguous group sizes summing to m; groups in `empty` get no rows."""
    p = rng.random(g) + 0.05
    p[list(empty)] = 0
    sizes = rng.multinomial(m, p / p.sum())
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)


# ----------------------------------------------------------------------------- small shapes
SMALL_OFFSETS = {
    "uneven_empty": [0, 5, 5, 37, 40],  # empty group in the middle
    "all_in_one": [0, 0, 40, 40, 40],  # one group has every row, three are empty
    "empty_first_last": [0, 0, 17, 40, 40],
    "tail_unused": [0, 3, 10, 10, 25],  # rows 25..39 belong to no group
    "all_empty": [0, 0, 0, 0, 0],
    "big_group": [0, 1, 2, 300, 301],  # >128 rows: several M tiles incl. a partial one
}


OUT_DTYPES = pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])


@OUT_DTYPES
@pytest.mark.parametrize("tile", sorted(ops.GEMM_TILES) + ["auto"])
@pytest.mark.parametrize("name", sorted(SMALL_OFFSETS))
def test_small_shapes(name, tile, out_dtype):
    offsets = SMALL_OFFSETS[name]
    m = max(40, offsets[-1])
    a_q, a_s, b_q, b_s = _inputs(1, m, 4, 256, 512)
    _run_and_check(a_q, a_s, b_q, b_s, offsets, out_dtype=out_dtype, tile=tile)


def test_scale_helper_matches_numpy():
    rng = np.random.default_rng(0)
    s = rng.random((50, 6)).astype(np.float32)
    for off in ([0, 5, 5, 37, 40], [0, 0, 0, 0, 50], [0, 0, 0, 0, 0], [0, 10, 20, 30, 50]):
        got = np.asarray(ops.rows_scales_to_grouped(jnp.asarray(s), jnp.asarray(off, jnp.int32)))
        np.testing.assert_array_equal(got, _grouped_scales_np(s, np.asarray(off)))


# ----------------------------------------------------------------------------- DeepSeek shapes
@pytest.mark.parametrize("m", [1, 7, 1000])
@pytest.mark.parametrize("n,k", [(4096, 7168), (7168, 2048)], ids=["gemm1_like", "gemm2_like"])
def test_deepseek_shapes(n, k, m):
    g = 8
    rng = np.random.default_rng(m + n)
    a_q, a_s, b_q, b_s = _inputs(2, m, g, n, k)
    offsets = _split(rng, m, g, empty=[3] if m > 8 else [])
    _run_and_check(a_q, a_s, b_q, b_s, offsets)


@pytest.mark.parametrize("m", [1, 7, 1000])
def test_deepseek_gemm1_f32_output(m):
    """GEMM1 as the pipeline runs it: float32 output."""
    g, n, k = 8, 4096, 7168
    rng = np.random.default_rng(m + n)
    a_q, a_s, b_q, b_s = _inputs(2, m, g, n, k)
    offsets = _split(rng, m, g, empty=[3] if m > 8 else [])
    _run_and_check(a_q, a_s, b_q, b_s, offsets, out_dtype=jnp.float32)


@OUT_DTYPES
@pytest.mark.parametrize("tile", sorted(ops.GEMM_TILES))
def test_deepseek_32_groups_every_config(tile, out_dtype):
    g, n, k, m = 32, 4096, 7168, 1000
    rng = np.random.default_rng(7)
    a_q, a_s, b_q, b_s = _inputs(3, m, g, n, k)
    offsets = _split(rng, m, g, empty=[0, 5, 31])
    _run_and_check(a_q, a_s, b_q, b_s, offsets, out_dtype=out_dtype, tile=tile)


@OUT_DTYPES
@pytest.mark.parametrize("tile", sorted(ops.GEMM_TILES))
def test_group_ends_at_every_offset_within_a_tile(tile, out_dtype):
    """Groups ending just before, at and just after the 64-row halves and 128-row tiles, with a
    full group right behind each: the own kernel stores a half tile by TMA only when the group
    fills it and copies the rows of a partial half one by one, so a boundary off by one writes
    the next group's rows with this group's weights (caught by the per-row check). N = 640 is
    not a multiple of 256 (own64's last column block is half outside)."""
    sizes = [1, 63, 64, 65, 0, 127, 128, 129, 191, 192, 193, 255, 256, 257, 7]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    a_q, a_s, b_q, b_s = _inputs(11, int(offsets[-1]) + 5, len(sizes), 640, 384)
    _run_and_check(a_q, a_s, b_q, b_s, offsets, out_dtype=out_dtype, tile=tile)


@pytest.mark.parametrize("tile", sorted(ops.GEMM_TILES))
def test_f32_output_rounds_to_the_bf16_output(tile):
    """Same accumulation in both output types: the float32 result rounded to bf16 is the bf16
    result (allowing 1 ulp in case the epilogue's conversion rounds differently)."""
    g, n, k, m = 8, 512, 1024, 700
    rng = np.random.default_rng(13)
    a_q, a_s, b_q, b_s = _inputs(8, m, g, n, k)
    offsets = _split(rng, m, g, empty=[2])
    args = (a_q, jnp.asarray(_grouped_scales_np(np.asarray(a_s), offsets)), b_q, b_s,
            jnp.asarray(offsets))
    valid = slice(0, int(offsets[-1]))
    d16 = np.asarray(_gemm_fn(jnp.bfloat16, tile)(*args))[valid]
    d32 = np.asarray(_gemm_fn(jnp.float32, tile)(*args))[valid]
    assert np.isfinite(d32).all()
    ulps = np.abs(_bf16_ordered(d16) - _bf16_ordered(d32.astype(ml_dtypes.bfloat16)))
    assert ulps.max() <= 1, f"bf16 vs rounded f32 output: {ulps.max()} ulp"
    assert (ulps > 0).mean() < 1e-3, f"{(ulps > 0).mean():.2e} of values differ by 1 ulp"


# ----------------------------------------------------------------------------- properties
@OUT_DTYPES
@pytest.mark.parametrize("tile", ["own32", "own16", "own8"])
def test_trimmed_tiles_equal_own64_bit_for_bit(tile, out_dtype):
    """The trimmed tiles run own64's MMAs over the same a and b rows in the same order, so they
    give its bits on every row of every group -- also where a group has more rows than the
    trimmed tile (several row tiles per weight tile) and where the wgmma's rows past the loaded
    ones read other stages' bytes. Decode-like groups of 0-40 rows, DeepSeek-V3's GEMM2 shape."""
    rng = np.random.default_rng(17)
    sizes = rng.integers(0, 6, 40)
    sizes[[3, 11, 29]] = [9, 17, 40]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    a_q, a_s, b_q, b_s = _inputs(21, int(offsets[-1]) + 3, len(sizes), 7168, 2048)
    args = (a_q, jnp.asarray(_grouped_scales_np(np.asarray(a_s), offsets)), b_q, b_s, jnp.asarray(offsets))
    valid = slice(0, int(offsets[-1]))
    got = np.asarray(_gemm_fn(out_dtype, tile)(*args))[valid]
    want = np.asarray(_gemm_fn(out_dtype, "own64")(*args))[valid]
    assert np.isfinite(want.astype(np.float32)).all() and np.any(want != 0)
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


def test_deterministic_and_jit():
    g, n, k, m = 8, 512, 1024, 700
    rng = np.random.default_rng(3)
    a_q, a_s, b_q, b_s = _inputs(4, m, g, n, k)
    offsets = _split(rng, m, g, empty=[2])
    sfa = jnp.asarray(_grouped_scales_np(np.asarray(a_s), offsets))
    off = jnp.asarray(offsets)
    valid = slice(0, int(offsets[-1]))
    eager = np.asarray(ops.grouped_gemm_raw(a_q, sfa, b_q, b_s, off))[valid]
    eager2 = np.asarray(ops.grouped_gemm_raw(a_q, sfa, b_q, b_s, off))[valid]
    np.testing.assert_array_equal(eager.view(np.uint16), eager2.view(np.uint16))

    # under jit, with the grouped scales built by the pure-jnp helper from traced offsets
    @jax.jit
    def f(a_q, a_s, b_q, b_s, off):
        return ops.grouped_gemm_raw(a_q, ops.rows_scales_to_grouped(a_s, off), b_q, b_s, off)

    jitted = np.asarray(f(a_q, a_s, b_q, b_s, off))[valid]
    np.testing.assert_array_equal(jitted.view(np.uint16), eager.view(np.uint16))
    again = np.asarray(f(a_q, a_s, b_q, b_s, off))[valid]
    np.testing.assert_array_equal(again.view(np.uint16), eager.view(np.uint16))
    # and the values are right (f takes row scales; _run_and_check passes grouped ones)
    _run_and_check(a_q, a_s, b_q, b_s, offsets,
                   fn=lambda a_q, _sfa, b_q, b_s, off: f(a_q, a_s, b_q, b_s, off))


def test_offsets_change_without_recompile():
    """Same shapes, different routing: one executable, results follow the new offsets."""
    g, n, k, m = 4, 256, 512, 64
    a_q, a_s, b_q, b_s = _inputs(5, m, g, n, k)
    fn = _gemm_fn()
    for offsets in ([0, 64, 64, 64, 64], [0, 0, 10, 20, 64], [0, 16, 32, 48, 64], [0, 1, 2, 3, 4]):
        _run_and_check(a_q, a_s, b_q, b_s, offsets, fn=fn)


@OUT_DTYPES
def test_zero_rows(out_dtype):
    a_q, a_s, b_q, b_s = _inputs(6, 0, 4, 256, 512)
    d = ops.grouped_gemm_raw(a_q, jnp.zeros((0,), jnp.float32), b_q, b_s, jnp.zeros((5,), jnp.int32),
                             out_dtype=out_dtype)
    assert d.shape == (0, 256) and d.dtype == out_dtype


# ----------------------------------------------------------------------------- errors
def _error_operands(k=256):
    """(m, g, n, a, b): 8 rows, 2 groups, N = 256, fp8 zeros (the call must fail before use)."""
    m, g, n = 8, 2, 256
    return m, g, n, jnp.zeros((m, k), jnp.float8_e4m3fn), jnp.zeros((g, n, k), jnp.float8_e4m3fn)


def test_k_not_multiple_of_128_is_an_error():
    m, g, n, a, b = _error_operands(k=192)
    with pytest.raises(Exception, match="multiple of 128"):
        jax.block_until_ready(ops.grouped_gemm_raw(
            a, jnp.ones((m,), jnp.float32), b, jnp.ones((g, 2, 1), jnp.float32),
            jnp.array([0, 4, 8], jnp.int32)))


def test_float16_output_is_an_error():
    m, g, n, a, b = _error_operands()
    with pytest.raises(Exception, match="bfloat16 or float32"):
        jax.block_until_ready(ops.grouped_gemm_raw(
            a, jnp.ones((m * 2,), jnp.float32), b, jnp.ones((g, 2, 2), jnp.float32),
            jnp.array([0, 4, 8], jnp.int32), out_dtype=jnp.float16))


def test_workspace_too_small_is_an_error():
    m, g, n, a, b = _error_operands()
    call = jax.ffi.ffi_call(
        "jax_moe_grouped_gemm",
        (jax.ShapeDtypeStruct((m, n), jnp.bfloat16), jax.ShapeDtypeStruct((64,), jnp.uint8)))
    with pytest.raises(Exception, match="workspace"):
        jax.block_until_ready(call(a, jnp.ones((m * 2,), jnp.float32), b,
                                   jnp.ones((g, 2, 2), jnp.float32), jnp.array([0, 4, 8], jnp.int32),
                                   tile=np.int32(1)))


def test_unknown_tile_is_an_error():
    m, g, n, a, b = _error_operands()
    with pytest.raises(ValueError, match="tile"):
        ops.grouped_gemm_raw(a, jnp.ones((m * 2,), jnp.float32), b, jnp.ones((g, 2, 2), jnp.float32),
                             jnp.array([0, 4, 8], jnp.int32), tile="256")
    call = jax.ffi.ffi_call(
        "jax_moe_grouped_gemm",
        (jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
         jax.ShapeDtypeStruct((ops.grouped_gemm_workspace_bytes(g),), jnp.uint8)))
    # 0 was the kernel's own "auto" once, 7 the retired own192, 12 one past own8 (9-11 are the
    # trimmed tiles since the twenty-sixth session: 9 is no longer an error), -1 below every tile
    for bad in (0, 7, 12, -1):
        with pytest.raises(Exception, match="tile: expected 1"):
            jax.block_until_ready(call(a, jnp.ones((m * 2,), jnp.float32), b,
                                       jnp.ones((g, 2, 2), jnp.float32), jnp.array([0, 4, 8], jnp.int32),
                                       tile=np.int32(bad)))


def test_own_kernel_more_than_512_groups_is_an_error():
    """The own kernel keeps the group offsets in shared memory: 513 groups must be refused by
    name, not overrun it (the CUTLASS configs take them)."""
    g, m, n, k = 513, 8, 128, 128
    a = jnp.zeros((m, k), jnp.float8_e4m3fn)
    b = jnp.zeros((g, n, k), jnp.float8_e4m3fn)
    offsets = jnp.asarray(np.minimum(np.arange(g + 1), m), jnp.int32)
    args = (a, jnp.ones((m,), jnp.float32), b, jnp.ones((g, 1, 1), jnp.float32), offsets)
    for tile in ("own128", "own64"):
        with pytest.raises(Exception, match="at most 512 groups"):
            jax.block_until_ready(ops.grouped_gemm_raw(*args, tile=tile))
    assert np.isfinite(np.asarray(ops.grouped_gemm_raw(*args, tile="128"), np.float32)).all()
