"""`jax_moe_gemm1_act_quant`: GEMM1 with the activation and the FP8 re-quantization (SPEC 3
steps 2-4) in the own kernel's epilogue, against the float64 oracle and the unfused CUDA stages.

The oracle (tests/oracle.py, no jax_moe inside) dequantizes the operands in float64, multiplies
per group, applies the activation and quantizes every 1x128 block. The tensor cores sum FP8
products with less than float32 precision within each 128-wide K block (rel ~1e-4 per value,
up to 5e-4 seen on a block's amax), so some fp8 codes come out one code off the oracle's and
the scales agree to ~1e-3 -- or to a bfloat16 step (0.4-0.8 %) where that error flips the
rounding of g to bfloat16 (SPEC 3 step 2; every path rounds there) under a block's amax.
The unfused stages (the own kernel's GEMM1 output in bfloat16, then jax_moe_act_quant) run the
same float32 sums in the same order and round them the same way: their codes and scales must
match.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from jax_moe import ActivationType as A
from jax_moe import ops
from test_gpu_gemm import _grouped_scales_np, _inputs, _split
from test_gpu_stages import _scale_index, _ulp_diff

pytestmark = pytest.mark.gpu

ACTS = pytest.mark.parametrize("act", [A.Swiglu, A.Geglu, A.Relu2, A.Identity], ids=lambda a: a.name)
GATED = (A.Swiglu, A.Geglu)


BLOCK_M = pytest.mark.parametrize("block_m", ops.GEMM1_BLOCK_M)


def _fused(act, block_m):
    return jax.jit(lambda *xs: ops.gemm1_act_quant_raw(*xs, act, block_m))


def _split_stages(act):
    """own128 GEMM with bfloat16 output, then act_quant: the unfused path with the same
    accumulation and rounding."""
    def f(a, sa, b, sb, off):
        g = ops.grouped_gemm_raw(a, sa, b, sb, off, out_dtype=jnp.bfloat16, tile="own128")
        return ops.act_quant(g, ops.Plan(off, None, None), act)
    return jax.jit(f)


def _oracle(a_q, a_s, b_q, b_s, offsets, act):
    """float64 activation a [total, I] of the unrounded g, and the oracle quantization (fp8
    codes, scales) of the activation of g rounded to bfloat16 (the library's rounding points)."""
    a = oracle.dequant(np.asarray(a_q), np.asarray(a_s))
    acts, acts_rounded = [], []
    for e in range(len(offsets) - 1):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi > lo:
            g = a[lo:hi] @ oracle.dequant(np.asarray(b_q[e]), np.asarray(b_s[e])).T
            acts.append(np.stack([oracle._activation(row, int(act)) for row in g]))
            acts_rounded.append(np.stack([oracle._activation(row, int(act)) for row in oracle.to_bf16(g)]))
    inter = b_q.shape[1] // 2 if act in GATED else b_q.shape[1]
    acts = np.concatenate(acts) if acts else np.zeros((0, inter))
    q, s = oracle.quantize_rows(np.concatenate(acts_rounded) if acts_rounded else acts)
    return acts, q, s


def _check(seed, offsets, n, k, act, block_m, extra_rows=0):
    offsets = np.asarray(offsets, np.int32)
    g = len(offsets) - 1
    m = int(offsets[-1]) + extra_rows
    a_q, a_s, b_q, b_s = _inputs(seed, m, g, n, k)
    args = (a_q, jnp.asarray(_grouped_scales_np(np.asarray(a_s), offsets)), b_q, b_s, jnp.asarray(offsets))
    q, s = _fused(act, block_m)(*args)
    inter = n // 2 if act in GATED else n
    assert q.shape == (m, inter) and q.dtype == jnp.float8_e4m3fn
    assert s.shape == (m * inter // 128,) and s.dtype == jnp.float32
    total = int(offsets[-1])
    q = np.asarray(q)[:total]
    s = np.asarray(s)[_scale_index(offsets, inter // 128)] if total else np.zeros((0, inter // 128))

    q2, s2 = _split_stages(act)(*args)
    if total:
        d = _ulp_diff(q, np.asarray(q2)[:total])
        assert d.max() <= 1 and (d > 0).mean() < 1e-3, "fused and unfused stages disagree"
        np.testing.assert_allclose(s, np.asarray(s2)[_scale_index(offsets, inter // 128)], rtol=1e-6, atol=0)


    acts, q_ref, s_ref = _oracle(a_q, a_s, b_q, b_s, offsets, act)
    if total:
        # one bfloat16 step of g is up to 2^-7 of it; two factors (up and gate, or Relu2's g^2)
        # can both flip under a block's amax
        np.testing.assert_allclose(s, s_ref, rtol=2.0 ** -6, atol=0)
        # values, not codes: near zero the GEMM's absolute error spans many subnormal fp8 codes
        deq = q.astype(np.float64) * np.repeat(s.astype(np.float64), 128, axis=1)
        deq_ref = q_ref.astype(np.float64) * np.repeat(s_ref, 128, axis=1)
        assert oracle.rel(deq, deq_ref) <= 1e-2  # same rounding points (SPEC 3)
        row_rel = np.linalg.norm(deq - deq_ref, axis=1) / np.maximum(np.linalg.norm(deq_ref, axis=1), 1e-30)
        # (Relu2 squares the GEMM's error; its worst rows, whose blocks hold few positive values,
        # reach 4.3e-2 for the unfused stages too)
        assert row_rel.max() <= 6e-2, f"worst row rel {row_rel.max():.3e} at {row_rel.argmax()}"
        assert oracle.rel(deq, acts) <= 6e-2  # against the unrounded activation (SPEC 3)

OFFSETS = {
    "uneven_empty": [0, 5, 5, 70, 200],  # an empty group, groups ending inside half tiles
    "all_in_one": [0, 0, 300, 300, 300],  # three tiles of one group, the last partial
    "empty_first_last": [0, 0, 64, 192, 192],  # full halves only
}


@BLOCK_M
@ACTS
@pytest.mark.parametrize("name", sorted(OFFSETS))
def test_small_shapes(name, act, block_m):
    n = 512 if act in GATED else 256  # I = 256: two 128-column quantization blocks
    _check(1, OFFSETS[name], n, 512, act, block_m, extra_rows=9)  # rows past offsets[G] stay unwritten


@BLOCK_M
@pytest.mark.parametrize("act", [A.Swiglu, A.Relu2], ids=lambda a: a.name)
@pytest.mark.parametrize("inter", [128, 384])
def test_group_ends_at_every_offset_within_a_tile(act, inter, block_m):
    """Groups ending before, at and after each 64-row half and 128-row tile: a half the group
    fills is stored by TMA, a partial one row by row (an off-by-one writes another group's rows
    or scales, caught by the per-row comparisons). I = 128 and 384 are no multiples of own64's
    256 columns for Relu2 (its last column block is half outside)."""
    sizes = [1, 63, 64, 65, 0, 127, 128, 129, 191, 192, 193, 255, 256, 257, 7]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    _check(11, offsets, 2 * inter if act in GATED else inter, 384, act, block_m)


@BLOCK_M
def test_deepseek_shape(block_m):
    """DeepSeek-V3 GEMM1: 8 experts of [2*2048, 7168], 1000 rows, one expert empty."""
    offsets = _split(np.random.default_rng(5), 1000, 8, empty=[3])
    _check(2, offsets, 4096, 7168, A.Swiglu, block_m)


@BLOCK_M
def test_deterministic(block_m):
    offsets = np.asarray([0, 100, 100, 333, 400], np.int32)
    a_q, a_s, b_q, b_s = _inputs(3, 400, 4, 512, 1024)
    args = (a_q, jnp.asarray(_grouped_scales_np(np.asarray(a_s), offsets)), b_q, b_s, jnp.asarray(offsets))
    f = _fused(A.Swiglu, block_m)
    (q1, s1), (q2, s2) = f(*args), f(*args)
    np.testing.assert_array_equal(np.asarray(q1).view(np.uint8), np.asarray(q2).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))


def test_zero_rows():
    q, s = ops.gemm1_act_quant_raw(jnp.zeros((0, 256), jnp.float8_e4m3fn), jnp.zeros((0,), jnp.float32),
                                   jnp.zeros((2, 256, 256), jnp.float8_e4m3fn), jnp.ones((2, 2, 2), jnp.float32),
                                   jnp.zeros((3,), jnp.int32), A.Swiglu)
    assert q.shape == (0, 128) and s.shape == (0,)


# ----------------------------------------------------------------------------- errors
def _call(b_rows, g=2, act=A.Swiglu, m=8, k=256, block_m=128):
    a = jnp.zeros((m, k), jnp.float8_e4m3fn)
    b = jnp.zeros((g, b_rows, k), jnp.float8_e4m3fn)
    offsets = jnp.asarray(np.minimum(np.arange(g + 1), m), jnp.int32)
    inter = b_rows // 2 if act in GATED else b_rows
    return jax.block_until_ready(jax.ffi.ffi_call(
        "jax_moe_gemm1_act_quant",
        (jax.ShapeDtypeStruct((m, inter), jnp.float8_e4m3fn),
         jax.ShapeDtypeStruct((m * inter // 128,), jnp.float32),
         jax.ShapeDtypeStruct((ops.OWN_GEMM_WORKSPACE_INTS,), jnp.int32)),
    )(a, jnp.ones((m * k // 128,), jnp.float32), b, jnp.ones((g, b_rows // 128, k // 128), jnp.float32),
      offsets, activation=np.int32(int(act)), block_m=np.int32(block_m)))


def test_errors():
    with pytest.raises(Exception, match="activation"):
        _call(256, act=1)  # not an activation code
    with pytest.raises(Exception, match="2\\*I"):
        _call(384)  # gated: I = 192 is no multiple of 128
    with pytest.raises(Exception, match="at most 512 groups"):
        _call(256, g=513)
    with pytest.raises(Exception, match="block_m: expected 128 or 64, got 96"):
        _call(256, block_m=96)
    _call(384, act=A.Relu2)  # I = 384: fine
    _call(384, act=A.Relu2, block_m=64)
