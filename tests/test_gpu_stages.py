"""CUDA stages (jax_moe.ops) against the pure-JAX stages (reference.py / routing.route_xla).

Every test needs the compiled CUDA kernels and a supported GPU (conftest skips them otherwise).
The CUDA path uses no padding (M = T*k rows, grouped MN-major scales), the reference pads per
expert; the comparisons are therefore of semantics (which token's data lands where), not layouts.
"""
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_moe import ops, reference
from jax_moe._native import cuda_status
from jax_moe.enums import ActivationType as A
from jax_moe.enums import RoutingMethodType as R
from jax_moe.routing import route_xla

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3fn


def setup_module(module):
    ok, why = cuda_status()  # also registers the FFI targets
    if not ok:
        pytest.skip(f"CUDA path unavailable: {why}")


# --------------------------------------------------------------------------- helpers
def _ordered(a):
    """bf16 / fp8 values -> integers whose differences count ulps (+0 and -0 both 0)."""
    a = np.asarray(a)
    nbits = a.dtype.itemsize * 8
    bits = a.view(np.uint16 if nbits == 16 else np.uint8).astype(np.int64)
    sign = 1 << (nbits - 1)
    mag = bits & (sign - 1)
    return np.where(bits & sign, -mag, mag)


def _ulp_diff(a, b):
    return np.abs(_ordered(a) - _ordered(b))


def _seed(*args):
    return zlib.crc32(repr(args).encode())


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint8).tobytes() if x.size else b""


def _route_logits(rng, t, e, dtype):
    """Per-token permutations of distinct values k/64 in [-4, 4): exact in bf16, no near-ties."""
    grid = (np.arange(512) - 256) / 64.0
    rows = np.stack([rng.permutation(grid)[:e] for _ in range(t)]).astype(np.float32)
    return jnp.asarray(rows).astype(dtype)


def _plan_ids(rng, t, k, e_loc, dist):
    n = (t, k)
    if dist == "local":
        ids = rng.integers(0, e_loc, n)
    elif dist == "mixed":  # negative and too-large ids are non-local
        ids = rng.integers(-e_loc // 2 - 3, 2 * e_loc + 1, n)
        if ids.size:
            flat = ids.reshape(-1)
            flat[rng.integers(0, flat.size, min(4, flat.size))] = np.iinfo(np.int32).min
            flat[rng.integers(0, flat.size, min(4, flat.size))] = np.iinfo(np.int32).max
    elif dist == "one_expert":
        ids = np.full(n, e_loc - 1)
    elif dist == "mostly_empty":
        ids = rng.choice(np.array([1, e_loc // 2, -1, e_loc]), n, p=[0.4, 0.3, 0.2, 0.1])
    elif dist == "none_local":
        ids = rng.choice(np.array([-1, e_loc, -e_loc]), n)
    else:
        raise ValueError(dist)
    return ids.astype(np.int32)


def _np_plan(ids, e_loc):
    """The plan SPEC'd for the CUDA stage: stable, unpadded, -1 where not local / unused."""
    flat = ids.reshape(-1).astype(np.int64)
    n = flat.size
    local = (flat >= 0) & (flat < e_loc)
    counts = np.bincount(flat[local], minlength=e_loc)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    total = int(offsets[-1])
    order = np.argsort(np.where(local, flat, e_loc), kind="stable")
    slot_to_row = np.full(n, -1, np.int32)
    row_to_slot = np.full(n, -1, np.int32)
    slot_to_row[order[:total]] = np.arange(total)
    row_to_slot[:total] = order[:total]
    return offsets, slot_to_row, row_to_slot


def _scale_index(offsets, num_kb):
    """[total, num_kb] positions of (row, k-block) in the grouped MN-major scale vector."""
    total = int(offsets[-1])
    r = np.arange(total)
    g = np.searchsorted(offsets, r, side="right") - 1
    g0 = offsets[g].astype(np.int64)
    mg = (offsets[g + 1] - offsets[g]).astype(np.int64)
    return g0[:, None] * num_kb + np.arange(num_kb)[None, :] * mg[:, None] + (r - g0)[:, None]


def _fp8(rng, shape, scale=1.0):
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    return jnp.asarray(np.clip(x, -448, 448).astype(FP8))


# --------------------------------------------------------------------------- route
_ROUTE_CASES = []
for _m in R:
    if _m == R.DeepSeekV3:
        _ROUTE_CASES += [(_m, 256, 8, 8, 4), (_m, 256, 8, None, None), (_m, 16, 4, 4, 2),
                         (_m, 8, 3, 8, 4), (_m, 128, 6, 4, 2), (_m, 64, 8, 2, 1),
                         (_m, 512, 8, None, None)]
    elif _m == R.Llama4:
        _ROUTE_CASES += [(_m, 8, 1, None, None), (_m, 128, 1, None, None), (_m, 512, 1, None, None)]
    else:
        _ROUTE_CASES += [(_m, 8, 2, None, None), (_m, 60, 6, None, None),
                         (_m, 256, 8, None, None), (_m, 512, 32, None, None)]


def _case_id(c):
    m, e, k, ng, tg = c
    return f"{R(m).name}-E{e}-k{k}" + (f"-g{ng}x{tg}" if ng else "")


def _route_both(logits, bias, method, k, ng, tg, rsf):
    kw = dict(top_k=k, routing_method_type=method, n_group=ng, topk_group=tg,
              routed_scaling_factor=rsf)
    ids, w = ops.route(logits, bias, **kw)
    r_ids, r_w = route_xla(logits, bias, **kw)
    return (np.asarray(ids), np.asarray(w)), (np.asarray(r_ids), np.asarray(r_w))


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", _ROUTE_CASES, ids=_case_id)
def test_route_matches_xla(case, dtype, with_bias):
    method, e, k, ng, tg = case
    if with_bias and method not in (R.DeepSeekV3, R.MiniMax2) and dtype == jnp.float32:
        pytest.skip("bias is ignored by this method; covered by the bf16 variant")
    rng = np.random.default_rng(_seed(int(method), e, k, ng, str(dtype), with_bias))
    t = 257
    logits = _route_logits(rng, t, e, dtype)
    bias = jnp.asarray((rng.standard_normal(e) * 0.1).astype(np.float32)) if with_bias else None
    rsf = 2.5 if method in (R.DeepSeekV3, R.MiniMax2) else None
    (ids, w), (r_ids, r_w) = _route_both(logits, bias, method, k, ng, tg, rsf)
    assert ids.dtype == np.int32 and ids.shape == (t, k)
    assert w.dtype == BF16 and w.shape == (t, k)
    bad = np.nonzero((ids != r_ids).any(axis=1))[0]
    assert bad.size == 0, f"ids differ in {bad.size} rows, e.g. row {bad[0]}: {ids[bad[0]]} vs {r_ids[bad[0]]}"
    d = _ulp_diff(w, r_w)
    assert d.max() <= 1, f"weights differ by {d.max()} bf16 ulp (at {np.unravel_index(d.argmax(), d.shape)})"


@pytest.mark.parametrize("method,e,k,ng,tg", [(R.DeepSeekV3, 256, 8, 8, 4), (R.Default, 64, 4, None, None),
                                             (R.Renormalize, 512, 8, None, None),
                                             (R.SigmoidRenorm, 32, 4, None, None),
                                             (R.MiniMax2, 128, 8, None, None)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_route_nan_rows_are_isolated(method, e, k, ng, tg, dtype):
    rng = np.random.default_rng(7)
    t = 64
    clean = _route_logits(rng, t, e, jnp.float32)
    bias = jnp.asarray((rng.standard_normal(e) * 0.1).astype(np.float32))
    dirty = np.asarray(clean).copy()
    dirty[3, :] = np.nan
    dirty[10, 5] = np.nan
    dirty[11, :e // 2] = np.nan
    dirty[20, 7] = np.inf
    dirty[21, :] = -np.inf
    dirty[22, 0] = np.inf
    dirty[22, 1] = -np.inf
    special = [3, 10, 11, 20, 21, 22]
    kw = dict(top_k=k, routing_method_type=method, n_group=ng, topk_group=tg,
              routed_scaling_factor=2.5)
    ids0, w0 = ops.route(clean.astype(dtype), bias, **kw)
    ids1, w1 = ops.route(jnp.asarray(dirty).astype(dtype), bias, **kw)
    ids0, w0, ids1, w1 = map(np.asarray, (ids0, w0, ids1, w1))
    keep = np.setdiff1d(np.arange(t), special)
    np.testing.assert_array_equal(ids1[keep], ids0[keep])
    assert _bits(w1[keep]) == _bits(w0[keep])
    assert ((ids1 >= 0) & (ids1 < e)).all(), "ids out of range in a row with NaN/Inf"
    for row in ids1:
        assert len(set(row.tolist())) == k, f"repeated expert in a row: {row}"


@pytest.mark.parametrize("e,k,ng,tg", [(256, 8, 8, 4), (256, 1, 8, 1), (256, 8, 8, 8), (128, 6, 4, 2),
                                       (64, 8, 2, 1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_route_groups_kernel_equals_one_warp_kernel(e, k, ng, tg, dtype):
    """DeepSeek-V3 routing with 32 experts per group runs one block per token up to 128 tokens
    (RouteGroupsKernel) and one warp per token beyond. Rows are independent, so the first n rows
    of a 300-token call (one warp each) must equal an n-token call (one block each) bit for bit
    -- with coarse values (ties broken by the lower expert, in the group scores too), NaN and
    infinite logits; and the one-block kernel must match the pure-JAX routing."""
    rng = np.random.default_rng(_seed("route_groups", e, k, ng, tg, str(dtype)))
    t = 300
    logits = np.round(rng.standard_normal((t, e)) * 4) / 4  # few distinct values: many ties
    logits[1, :] = np.nan
    logits[2, 3::7] = np.nan
    logits[4, :e // 2] = np.inf
    logits[5, :] = -np.inf
    logits[6, 40 % e] = np.inf
    logits[7, :] = 0.5  # every score equal
    logits = jnp.asarray(logits.astype(np.float32)).astype(dtype)
    bias = np.round(rng.standard_normal(e) * 4) / 32
    bias[::5] = 0.0
    bias = jnp.asarray(bias.astype(np.float32))
    kw = dict(top_k=k, routing_method_type=R.DeepSeekV3, n_group=ng, topk_group=tg,
              routed_scaling_factor=2.5)
    ids_warp, w_warp = map(np.asarray, ops.route(logits, bias, **kw))
    for n in (1, 3, 64, 128):
        ids_block, w_block = map(np.asarray, ops.route(logits[:n], bias, **kw))
        np.testing.assert_array_equal(ids_block, ids_warp[:n], err_msg=f"ids, {n} tokens")
        assert _bits(w_block) == _bits(w_warp[:n]), f"weights differ, {n} tokens"
    # against the pure-JAX routing on test_route_matches_xla's tie-free inputs, one block each
    clean = _route_logits(rng, 5, e, dtype)
    bias = jnp.asarray((rng.standard_normal(e) * 0.1).astype(np.float32))
    (ids, w), (r_ids, r_w) = _route_both(clean, bias, R.DeepSeekV3, k, ng, tg, 2.5)
    np.testing.assert_array_equal(ids, r_ids)
    assert _ulp_diff(w, r_w).max() <= 1


@pytest.mark.parametrize("e,k,ng,tg", [(256, 8, 8, 4), (64, 8, 2, 1), (256, 1, 8, 1)])
@pytest.mark.parametrize("e_loc,offset,num_experts", [(256, 0, 256), (32, 64, 256), (32, 240, 256),
                                                      (8, 0, 0), (512, 0, 0)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_route_plan_equals_route_then_plan(e, k, ng, tg, e_loc, offset, num_experts, dtype):
    """jax_moe_route_plan (one token, DeepSeek-V3 over groups of 32) gives the ids and weights of
    jax_moe_route and the plan of jax_moe_plan on them, bit for bit, and that plan is the NumPy
    oracle's -- over tokens with ties, NaN and infinite logits, every slot local, some, or none
    (a slice past the routed experts)."""
    rng = np.random.default_rng(_seed("route_plan", e, k, ng, tg, e_loc, offset, num_experts, str(dtype)))
    rows = np.round(rng.standard_normal((7, e)) * 4) / 4  # ties
    rows[1] = rng.standard_normal(e)
    rows[2, 3::7] = np.nan
    rows[3, : e // 2] = np.inf
    rows[4] = 0.5
    rows[5, -40:] += 8.0  # the top experts in the last groups (past a slice at offset 0)
    rows[6] = rng.standard_normal(e) * 3
    bias = jnp.asarray((np.round(rng.standard_normal(e) * 4) / 32).astype(np.float32))
    kw = dict(top_k=k, routing_method_type=R.DeepSeekV3, n_group=ng, topk_group=tg,
              routed_scaling_factor=2.5)
    seen_local = set()
    for row in rows:
        logits = jnp.asarray(row[None].astype(np.float32)).astype(dtype)
        ids, w, p = ops.route_plan(logits, bias, **kw, num_local_experts=e_loc, expert_offset=offset,
                                   num_experts=num_experts)
        r_ids, r_w = ops.route(logits, bias, **kw)
        q = ops.plan(r_ids, e_loc, expert_offset=offset, num_experts=num_experts or None)
        assert _bits(ids) == _bits(r_ids) and _bits(w) == _bits(r_w)
        for a, b in zip(p, q):
            assert _bits(a) == _bits(b)
        g = np.asarray(ids)
        local = g - offset
        local = np.where((local >= 0) & (local < e_loc) & ((num_experts == 0) | (g < max(num_experts, 1))),
                         local, -1)
        seen_local.add(int((local >= 0).sum()))
        _check_plan(p, local, e_loc)
    if (e_loc, offset) in ((256, 0), (512, 0)):
        assert seen_local == {k}
    with pytest.raises(Exception, match="expected one token, got T=2"):
        jax.block_until_ready(ops.route_plan(jnp.zeros((2, e), dtype), bias, **kw, num_local_experts=e_loc))
    with pytest.raises(Exception, match="num_local_experts: expected a value in"):
        jax.block_until_ready(ops.route_plan(jnp.zeros((1, e), dtype), bias, **kw, num_local_experts=513))


def test_route_deterministic_and_rejects_bad_params():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((1000, 256)).astype(np.float32))
    bias = jnp.asarray(rng.standard_normal(256).astype(np.float32))
    kw = dict(top_k=8, routing_method_type=R.DeepSeekV3, n_group=8, topk_group=4,
              routed_scaling_factor=2.5)
    a = ops.route(logits, bias, **kw)
    b = ops.route(logits, bias, **kw)
    assert _bits(a[0]) == _bits(b[0]) and _bits(a[1]) == _bits(b[1])
    with pytest.raises(Exception, match="top_k"):  # k > 8 for DeepSeekV3
        jax.block_until_ready(ops.route(logits, bias, top_k=9, routing_method_type=R.DeepSeekV3))
    with pytest.raises(Exception, match="experts"):  # E > 512
        jax.block_until_ready(ops.route(jnp.zeros((4, 1024)), None, top_k=2,
                                        routing_method_type=R.TopK))


# --------------------------------------------------------------------------- plan / permute
DISTS = ["local", "mixed", "one_expert", "mostly_empty", "none_local"]


def _check_plan(p, ids, e_loc):
    offsets, s2r, r2s = _np_plan(ids, e_loc)
    np.testing.assert_array_equal(np.asarray(p.expert_offsets), offsets)
    np.testing.assert_array_equal(np.asarray(p.slot_to_row), s2r)
    np.testing.assert_array_equal(np.asarray(p.row_to_slot), r2s)
    return offsets


def _check_permute(rows, scales, hidden, hs, offsets, row_to_slot, k):
    total = int(offsets[-1])
    num_kb = hidden.shape[1] // 128
    rows = np.asarray(rows).view(np.uint8)
    scales = np.asarray(scales)
    hidden = np.asarray(hidden).view(np.uint8)
    hs = np.asarray(hs)
    assert rows.shape == (row_to_slot.size, hidden.shape[1])
    assert scales.shape == (row_to_slot.size * num_kb,)
    tok = np.asarray(row_to_slot)[:total] // k
    np.testing.assert_array_equal(rows[:total], hidden[tok])
    if total:
        np.testing.assert_array_equal(scales[_scale_index(offsets, num_kb)], hs.T[tok])


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("e_loc", [8, 32, 256])
@pytest.mark.parametrize("t", [0, 1, 7, 128, 300, 512, 1000, 4096])  # k=8: 1024, 2400, 4096 slots: 1, 3, 4 chunks
def test_plan_permute(t, e_loc, dist):
    rng = np.random.default_rng(_seed(t, e_loc, dist))
    k, h = 8, 256
    ids = _plan_ids(rng, t, k, e_loc, dist)
    p = ops.plan(jnp.asarray(ids), e_loc)
    offsets = _check_plan(p, ids, e_loc)
    hidden = _fp8(rng, (t, h))
    hs = jnp.asarray(rng.uniform(0.01, 2.0, (h // 128, t)).astype(np.float32))
    rows, scales = ops.permute(hidden, hs, p, k)
    _check_permute(rows, scales, hidden, hs, offsets, np.asarray(p.row_to_slot), k)
    if t == 0:
        return
    # Same semantics as the padded pure-JAX stages: rank within each expert, and the data each
    # slot's row holds.
    rp = reference.plan(jnp.asarray(ids), e_loc)
    r_rows, r_scales = reference.permute(hidden, hs, rp, k)
    flat = ids.reshape(-1)
    local = (flat >= 0) & (flat < e_loc)
    s2r, r_s2r = np.asarray(p.slot_to_row), np.asarray(rp.slot_to_row)
    np.testing.assert_array_equal(s2r < 0, r_s2r < 0)
    e_of = np.where(local, flat, 0)
    np.testing.assert_array_equal((s2r - offsets[e_of])[local],
                                  (r_s2r - np.asarray(rp.expert_offsets)[e_of])[local])
    np.testing.assert_array_equal(np.asarray(rows).view(np.uint8)[s2r[local]],
                                  np.asarray(r_rows).view(np.uint8)[r_s2r[local]])


@pytest.mark.parametrize("t,k,e_loc,h", [(128, 8, 256, 7168), (1000, 6, 32, 2048),
                                         (333, 1, 8, 384), (32768, 8, 256, 128),
                                         (16384, 8, 512, 128), (512, 8, 512, 128),
                                         # from 16384 slots a block per token: H = 7168, and
                                         # 8320 (520 16-byte vectors: two batches of the block)
                                         (2048, 8, 32, 7168), (2048, 8, 8, 8320),
                                         # T * 4 bytes over the scale kernel's shared memory:
                                         # the token kernel writes the scales itself
                                         (41000, 1, 4, 128)])
def test_plan_permute_shapes(t, k, e_loc, h):
    rng = np.random.default_rng(t + k + e_loc + h)
    ids = _plan_ids(rng, t, k, e_loc, "mixed")
    p = ops.plan(jnp.asarray(ids), e_loc)
    offsets = _check_plan(p, ids, e_loc)
    hidden = _fp8(rng, (t, h))
    hs = jnp.asarray(rng.uniform(0.01, 2.0, (h // 128, t)).astype(np.float32))
    rows, scales = jax.jit(ops.permute, static_argnums=3)(hidden, hs, p, k)
    _check_permute(rows, scales, hidden, hs, offsets, np.asarray(p.row_to_slot), k)


@pytest.mark.parametrize("t", [1, 16, 128, 512, 1000, 1024, 1025, 4096])  # one kernel (<= 8192 slots), three
@pytest.mark.parametrize("offset", [0, 40])
def test_plan_global_ids_with_offset(t, offset):
    """ids relative to all E experts, shifted in the kernel: same plan as local ids computed on
    the host; ids outside [0, E) (negative, >= E) and outside the local slice are not local."""
    rng = np.random.default_rng(t + offset)
    e, e_loc, k = 96, 32, 8
    ids = rng.integers(-3, e + 4, (t, k)).astype(np.int32)
    ids[0, 0] = offset  # at least one local row
    p = ops.plan(jnp.asarray(ids), e_loc, expert_offset=offset, num_experts=e)
    valid = (ids >= 0) & (ids < e)
    local = np.where(valid, ids - offset, -1)
    _check_plan(p, local, e_loc)
    # a traced offset takes the XLA route to the same plan
    q = jax.jit(lambda i, o: ops.plan(i, e_loc, expert_offset=o, num_experts=e))(
        jnp.asarray(ids), jnp.int32(offset))
    _check_plan(q, local, e_loc)
    r = reference.plan(jnp.asarray(ids), e_loc, expert_offset=offset, num_experts=e)
    is_local = ((local >= 0) & (local < e_loc)).reshape(-1)
    np.testing.assert_array_equal(np.asarray(r.slot_to_row) >= 0, is_local)


def test_plan_skewed_large():
    """262144 slots, all on one expert, and then on a few experts of 512."""
    rng = np.random.default_rng(11)
    for ids in (np.full((32768, 8), 5, np.int32),
                rng.choice(np.array([0, 511, 300, -7]), (32768, 8)).astype(np.int32)):
        p = jax.jit(ops.plan, static_argnums=1)(jnp.asarray(ids), 512)
        _check_plan(p, ids, 512)


# --------------------------------------------------------------------------- act_quant
def _act_inputs(rng, t, k, e_loc, inter, act, dtype=jnp.bfloat16):
    ids = _plan_ids(rng, t, k, e_loc, "mixed")
    p = ops.plan(jnp.asarray(ids), e_loc)
    m = t * k
    n = 2 * inter if act in (A.Swiglu, A.Geglu) else inter
    g = rng.standard_normal((m, n)).astype(np.float32) * rng.uniform(0.1, 4.0, (m, 1))
    g[5] = 0.0  # all-zero rows: scale FLT_MIN, q = 0
    g[7, :128] *= 1e4  # a large block
    return p, jnp.asarray(g).astype(dtype)


@pytest.mark.parametrize("inter", [128, 384, 2048])
@pytest.mark.parametrize("act", [A.Swiglu, A.Geglu, A.Relu2, A.Identity], ids=lambda a: a.name)
def test_act_quant(act, inter):
    _check_act_quant(act, inter, jnp.bfloat16)


# float32 GEMM1 output (the pipeline passes bfloat16, reference.G_DTYPE; the stage takes both)
@pytest.mark.parametrize("act,inter", [(A.Swiglu, 128), (A.Swiglu, 2048), (A.Geglu, 384),
                                       (A.Relu2, 384), (A.Identity, 128)],
                         ids=lambda v: v.name if isinstance(v, A) else str(v))
def test_act_quant_f32_input(act, inter):
    _check_act_quant(act, inter, jnp.float32)


def _check_act_quant(act, inter, dtype):
    rng = np.random.default_rng(int(act) * 1000 + inter)
    t, k, e_loc = (300, 8, 32) if inter < 2048 else (512, 8, 256)
    p, g = _act_inputs(rng, t, k, e_loc, inter, act, dtype)
    assert g.dtype == dtype
    q, s = ops.act_quant(g, p, act)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (t * k, inter)
    assert s.dtype == jnp.float32 and s.shape == (t * k * inter // 128,)
    r_q, r_s = reference.act_quant(g, None, act)
    offsets = np.asarray(p.expert_offsets)
    total = int(offsets[-1])
    assert total > 0
    q, r_q = np.asarray(q)[:total], np.asarray(r_q)[:total]
    d = _ulp_diff(q, r_q)
    assert d.max() <= 1, f"fp8 values differ by {d.max()} ulp"
    assert (d > 0).mean() < 1e-3, f"{(d > 0).mean():.2e} of fp8 values differ by 1 ulp"
    s = np.asarray(s)[_scale_index(offsets, inter // 128)]
    r_s = np.asarray(r_s)[:total]
    np.testing.assert_allclose(s, r_s, rtol=1e-6, atol=0)


def test_act_quant_rejects_unsupported_activation():
    p = ops.plan(jnp.zeros((4, 2), jnp.int32), 4)
    with pytest.raises(Exception, match="activation"):
        jax.block_until_ready(jax.ffi.ffi_call(
            "jax_moe_act_quant",
            (jax.ShapeDtypeStruct((8, 128), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((8,), jnp.float32)),
        )(jnp.zeros((8, 128), jnp.bfloat16), p.expert_offsets, activation=np.int32(1)))


def test_act_quant_rejects_float16_input():
    p = ops.plan(jnp.zeros((4, 2), jnp.int32), 4)
    with pytest.raises(Exception, match="float32 or bfloat16"):
        jax.block_until_ready(ops.act_quant(jnp.zeros((8, 256), jnp.float16), p, A.Swiglu))


# --------------------------------------------------------------------------- finalize
@pytest.mark.parametrize("w_dtype", [jnp.bfloat16, jnp.float32], ids=["w_bf16", "w_f32"])
@pytest.mark.parametrize("do_finalize", [True, False], ids=["finalize", "unreduced"])
@pytest.mark.parametrize("t,k,e_loc,h", [(257, 8, 32, 7168), (1, 1, 8, 128), (1000, 4, 8, 256),
                                         (0, 8, 8, 128), (9, 40, 8, 1032)])  # k > 32: two rounds of the slot list
def test_finalize(t, k, e_loc, h, do_finalize, w_dtype):
    rng = np.random.default_rng(t * 7 + k + h)
    ids = _plan_ids(rng, t, k, e_loc, "mixed")
    if t > 10:
        ids[3] = -1  # a token with no local expert -> zeros
        ids[4] = e_loc
    p = ops.plan(jnp.asarray(ids), e_loc)
    y = jnp.asarray(rng.standard_normal((t * k, h)).astype(np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(rng.uniform(-1, 1, (t, k)).astype(np.float32)).astype(w_dtype)
    out = np.asarray(ops.finalize(y, p, w, do_finalize))
    if do_finalize and t:  # float64 oracle with the weights exactly as given
        rows = np.asarray(p.slot_to_row).reshape(t, k)
        y64 = np.asarray(y, np.float64)
        w64 = np.asarray(w, np.float64)
        exp = np.zeros((t, h))
        for j in range(k):
            ok = rows[:, j] >= 0
            exp[ok] += w64[ok, j, None] * y64[rows[ok, j]]
        got = out.astype(np.float64)
        assert np.linalg.norm(got - exp) <= 8e-3 * np.linalg.norm(exp) + 1e-30
    ref = np.asarray(reference.finalize(y, p, w, do_finalize))
    assert out.dtype == BF16 and out.shape == ((t, h) if do_finalize else (t, k, h))
    if t == 0:
        return
    if do_finalize:
        d = _ulp_diff(out, ref)
        assert d.max() <= 1, f"finalize differs by {d.max()} bf16 ulp"
        o64, r64 = out.astype(np.float64), ref.astype(np.float64)
        assert np.linalg.norm(o64 - r64) <= 1e-2 * np.linalg.norm(r64)
    else:
        assert _bits(out) == _bits(ref)
    if t > 10:
        assert not np.asarray(out[3], np.float32).any() and not np.asarray(out[4], np.float32).any()


# --------------------------------------------------------------------------- whole chain
def test_stages_under_jit_are_deterministic():
    """plan -> permute -> act_quant -> finalize inside one jit (command buffers allowed), twice."""
    rng = np.random.default_rng(5)
    t, k, e_loc, h, inter = 600, 8, 64, 512, 256
    ids = jnp.asarray(_plan_ids(rng, t, k, e_loc, "mixed"))
    hidden = _fp8(rng, (t, h))
    hs = jnp.asarray(rng.uniform(0.01, 2.0, (h // 128, t)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((t * k, 2 * inter)).astype(np.float32)).astype(jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal((t * k, h)).astype(np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(rng.uniform(0, 1, (t, k)).astype(np.float32)).astype(jnp.bfloat16)

    @jax.jit
    def chain(ids, hidden, hs, g, y, w):
        p = ops.plan(ids, e_loc)
        rows, rs = ops.permute(hidden, hs, p, k)
        q, qs = ops.act_quant(g, p, A.Swiglu)
        return p, rows, rs, q, qs, ops.finalize(y, p, w, True), ops.finalize(y, p, w, False)

    a = jax.block_until_ready(chain(ids, hidden, hs, g, y, w))
    b = jax.block_until_ready(chain(ids, hidden, hs, g, y, w))
    offsets = _check_plan(a[0], np.asarray(ids), e_loc)
    total = int(offsets[-1])
    _check_permute(a[1], a[2], hidden, hs, offsets, np.asarray(a[0].row_to_slot), k)
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    for i, (x, z) in enumerate(zip(la, lb)):
        x, z = np.asarray(x), np.asarray(z)
        if x.shape and x.shape[0] == t * k and x.ndim == 2:  # rows past the plan are unspecified
            x, z = x[:total], z[:total]
        elif x.ndim == 1 and x.dtype == np.float32:  # grouped scales: only the used prefix
            n = x.size // (t * k) * total
            x, z = x[:n], z[:n]
        assert _bits(x) == _bits(z), f"output {i} differs between two identical runs"
    np.testing.assert_array_equal(np.asarray(a[5]), np.asarray(ops.finalize(y, ops.plan(ids, e_loc), w)))
