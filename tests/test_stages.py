"""The pure-JAX stages (jax_moe.reference) one by one against the float64 oracle, each at its own
rounding point (SPEC section 3), on CPU.

The whole-layer comparisons (test_moe.py) use SPEC's 1e-2, which a wrong rounding point can
pass: a finalize that accumulated in bfloat16 moves the layer by ~3e-3. Here each stage's output
must equal the oracle's rounded value element by element, up to one step of the output format
where float32 and float64 arithmetic round differently (rare); `test_stage_checks_catch_...`
shows that each check rejects the mistake it is there for.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_moe import ActivationType as A
from jax_moe import quant, reference

import oracle

H, N, T, K, E = 256, 384, 23, 4, 6
ONE_STEP_FRACTION = 1e-2  # at most this share of elements one step off; none more


def _f64(x):
    return np.asarray(np.asarray(x).astype(np.float32), np.float64)


def _routed_plan(rng, t=T, k=K, e=E, tile_m=8):
    ids = np.stack([rng.permutation(e + 2)[:k] for _ in range(t)]).astype(np.int32)  # some not local
    return ids, reference.plan(jnp.asarray(ids), e, tile_m)


def _steps_off(lib, want, step):
    """(share of elements more than 1e-9 of a step off, largest distance in steps)."""
    d = np.abs(lib - want) / step
    return float(np.mean(d > 1e-9)), float(d.max(initial=0.0))


def check_one_step(lib, want, step, what):
    share, worst = _steps_off(lib, want, step)
    assert worst <= 1.0 + 1e-9, f"{what}: {worst:.2f} steps off the oracle"
    assert share <= ONE_STEP_FRACTION, f"{what}: {share:.2%} of elements one step off"


def gemm_oracle(rows_q, rows_s, w_q, w_s, p):
    """float64 out[r] = dequant(rows[r]) @ dequant(W[expert of r]).T, zero for padding rows."""
    a = oracle.dequant(np.asarray(rows_q), np.asarray(rows_s))
    w = oracle.dequant(np.asarray(w_q), np.asarray(w_s))
    expert = np.repeat(np.asarray(p.tile_expert), p.tile_m)
    out = np.zeros((a.shape[0], w.shape[1]))
    for r in np.nonzero(np.asarray(p.row_to_slot) >= 0)[0]:
        out[r] = w[expert[r]] @ a[r]
    return out


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_grouped_gemm_stage(out_dtype):
    rng = np.random.default_rng(11)
    ids, p = _routed_plan(rng)
    x_q, x_s = quant.quantize_activations(jnp.asarray(rng.standard_normal((T, H)), jnp.float32))
    w_q, w_s = quant.quantize_weights(jnp.asarray(rng.standard_normal((E, N, H)) / np.sqrt(H), jnp.float32))
    rows_q, rows_s = reference.permute(x_q, x_s, p, K)
    lib = _f64(jax.jit(lambda *a: reference.grouped_gemm(*a, p, out_dtype=out_dtype))(
        rows_q, rows_s, w_q, w_s))
    want = gemm_oracle(rows_q, rows_s, w_q, w_s, p)
    assert (np.asarray(p.row_to_slot) >= 0).sum() == ((ids >= 0) & (ids < E)).sum()
    if out_dtype == jnp.float32:
        assert oracle.rel(lib, want) <= 1e-6
    else:  # rounded once, from the float32 sum
        check_one_step(lib, oracle.to_bf16(want), oracle.bf16_ulp(want), "GEMM, bf16 output")


def fp8_code(q):
    """|fp8| as its code 0..126 (consecutive codes are neighbouring magnitudes), float64."""
    return (np.asarray(q).view(np.uint8) & 0x7F).astype(np.float64)


def _activate(g, act):
    """The oracle's activation of each row of g (float64)."""
    return np.stack([oracle._activation(row, int(act)) for row in g])


def act_quant_oracle(g, act):
    return oracle.quantize_rows(_activate(g, act))


@pytest.mark.parametrize("act", [A.Swiglu, A.Geglu, A.Relu2, A.Identity], ids=lambda a: A(a).name)
def test_act_quant_stage(act):
    rng = np.random.default_rng(20 + int(act))
    width = 2 * N if act in (A.Swiglu, A.Geglu) else N
    g = jnp.asarray(rng.standard_normal((40, width)), jnp.float32).astype(reference.G_DTYPE)
    q, s = jax.jit(reference.act_quant, static_argnums=2)(g, None, act)
    want_q, want_s = act_quant_oracle(_f64(g), act)
    np.testing.assert_allclose(_f64(s), want_s, rtol=5e-7)  # float32 amax / 448, a float32 step or two
    # fp8 codes: the same, or the neighbouring code where float32 and float64 disagree
    lib_v, want_v = _f64(q), _f64(want_q)
    assert (np.sign(lib_v) == np.sign(want_v))[(lib_v != 0) & (want_v != 0)].all()
    check_one_step(fp8_code(q), fp8_code(want_q), 1.0, f"act_quant {A(act).name}")


def finalize_oracle(y, p, w, k):
    t = w.shape[0]
    rows = np.asarray(p.slot_to_row).reshape(t, k)
    out = np.zeros((t, y.shape[1]))
    for tok in range(t):
        for j in range(k):
            if rows[tok, j] >= 0:
                out[tok] += w[tok, j] * y[rows[tok, j]]
    return out


def _finalize_case():
    """(plan, GEMM2 rows bf16, routing weights bf16, slot rows [T, K]) for the finalize checks."""
    rng = np.random.default_rng(31)
    _, p = _routed_plan(rng)
    y = jnp.asarray(rng.standard_normal((p.row_to_slot.shape[0], H)), jnp.bfloat16)
    w = jnp.asarray(rng.uniform(0.05, 0.6, (T, K)), jnp.bfloat16)
    return p, y, w, np.asarray(p.slot_to_row).reshape(T, K)


def test_finalize_stage():
    p, y, w, rows = _finalize_case()
    lib = _f64(jax.jit(reference.finalize)(y, p, w))
    want = finalize_oracle(_f64(y), p, _f64(w), K)
    check_one_step(lib, oracle.to_bf16(want), oracle.bf16_ulp(want), "finalize")
    per_slot = _f64(jax.jit(reference.finalize, static_argnums=3)(y, p, w, False))
    np.testing.assert_array_equal(per_slot, np.where(rows[..., None] >= 0, _f64(y)[np.maximum(rows, 0)], 0.0))


def test_stage_checks_catch_rounding_mistakes():
    """Each check above rejects the rounding mistake it is there for, computed on the oracle
    side against the library's (correct) output."""
    p, y, w, rows = _finalize_case()
    lib = _f64(reference.finalize(y, p, w))
    want = finalize_oracle(_f64(y), p, _f64(w), K)
    acc = np.zeros_like(want)  # the weighted sum accumulated in bfloat16
    for j in range(K):
        term = np.where(rows[:, j, None] >= 0, _f64(w)[:, j, None] * _f64(y)[np.maximum(rows[:, j], 0)], 0)
        acc = oracle.to_bf16(acc + term)
    g = jnp.asarray(np.random.default_rng(32).standard_normal((40, N)), jnp.float32)
    q, _ = reference.act_quant(g.astype(reference.G_DTYPE), None, A.Relu2)
    q_unrounded_g, _ = act_quant_oracle(_f64(g), A.Relu2)  # g not rounded to bf16 first
    blocks = _activate(_f64(g.astype(reference.G_DTYPE)), A.Relu2).reshape(40, -1, 128)
    s240 = np.maximum(np.abs(blocks).max(-1) / 240.0, 1e-38)  # e4m3fnuz's 240 for e4m3fn's 448
    q240 = oracle.to_fp8(blocks / s240[..., None]).reshape(40, -1)
    mistakes = {  # what: (the library's output, the oracle with the mistake, the format's step)
        "finalize summed in bf16": (lib, acc, oracle.bf16_ulp(acc)),
        "finalize output left in float32": (want, oracle.to_bf16(want), oracle.bf16_ulp(want)),
        "g not rounded before the activation": (fp8_code(q), fp8_code(q_unrounded_g), 1.0),
        "scale amax/240": (fp8_code(q), fp8_code(q240), 1.0),
    }
    for what, (got, wrong, step) in mistakes.items():
        with pytest.raises(AssertionError):
            check_one_step(got, wrong, step, what)
