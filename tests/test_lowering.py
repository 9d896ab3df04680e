"""What the CUDA pipeline lowers to: the grouped GEMM's tile config (names checked at trace
time, each lowered to the kernel's `tile` attribute, the pipeline's choice from the expected rows
per local expert) and the plan's expert-offset attribute. Lowering only (the FFI targets are not
registered), so these run without CUDA."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import _native, api, ops
from jax_moe.testing import random_moe_inputs

FP8 = jnp.float8_e4m3fn

def test_grouped_gemm_tile_is_checked_at_trace_time(monkeypatch):
    """The GEMM tile config (argument, else $JAX_MOE_GEMM_TILE) must be a known name; checked
    before anything reaches the FFI target."""
    a = jnp.zeros((8, 256), FP8)
    b = jnp.zeros((2, 256, 256), FP8)
    args = (a, jnp.ones((16,), jnp.float32), b, jnp.ones((2, 2, 2), jnp.float32),
            jnp.array([0, 4, 8], jnp.int32))
    with pytest.raises(ValueError, match="tile: expected one of .*got '96'"):
        jax.eval_shape(functools.partial(ops.grouped_gemm_raw, tile="96"), *args)
    monkeypatch.setenv(ops.TILE_ENV, "swap16")
    with pytest.raises(ValueError, match="JAX_MOE_GEMM_TILE.*got 'swap16'"):
        jax.eval_shape(ops.grouped_gemm_raw, *args)
    assert {ops._gemm_tile(t, 1) for t in ops.GEMM_TILES} == {1, 2, 3, 6, 8, 9, 10, 11}
    # "auto" by rows per group; the own kernel only up to 512 groups
    assert [ops.gemm_tile_for(r) for r in (1, 16, 17, 32, 33, 64, 65)] == \
        ["own64"] * 6 + ["128"]
    assert [ops.gemm_tile_for(r, ops.OWN_GEMM_MAX_GROUPS + 1) for r in (16, 17, 32, 33, 64, 65)] == \
        ["swap32", "64", "64", "128", "128", "128"]
    # an MoE's GEMM2: the own 128 x 128 tile at 33-64 rows
    assert [ops.gemm_tile_for(r, 256, gemm2=True) for r in (16, 32, 33, 64, 65)] == \
        ["own64", "own64", "own128", "own128", "128"]
    assert ops.gemm_tile_for(64, ops.OWN_GEMM_MAX_GROUPS + 1, gemm2=True) == "128"


def test_grouped_gemm_tile_reaches_the_custom_call(monkeypatch):
    """Each config name lowers to its `tile` attribute (the kernel's Tile enum); the env var is
    the default when no argument is given."""
    monkeypatch.setattr(_native, "register_targets", lambda: None)  # lowering only, no CUDA
    a = jnp.zeros((8, 256), FP8)
    b = jnp.zeros((2, 256, 256), FP8)
    args = (a, jnp.ones((16,), jnp.float32), b, jnp.ones((2, 2, 2), jnp.float32),
            jnp.array([0, 4, 8], jnp.int32))

    def attr(**kw):
        text = jax.jit(lambda *x: ops.grouped_gemm_raw(*x, **kw)).lower(*args).as_text()
        return [line.split("tile = ")[1].split(" ")[0] for line in text.splitlines() if "tile = " in line]

    assert [attr(tile=t) for t in ("128", "64", "swap32", "own128", "own64", "own32", "own16", "own8")] == \
        [["1"], ["2"], ["3"], ["6"], ["8"], ["9"], ["10"], ["11"]]
    # "auto" is resolved here from the static shapes: M/G = 8/2 rows per group -> swap32, and
    # from rows_per_group when given
    assert attr(tile="auto") == ["8"]
    assert attr(tile="auto", rows_per_group=64) == ["8"]
    assert attr(tile="auto", rows_per_group=65) == ["1"]
    monkeypatch.setenv(ops.TILE_ENV, "swap32")
    assert attr() == ["3"]


def _gemm_tiles_of_the_op(monkeypatch, t, e, e_loc, act=jax_moe.ActivationType.Swiglu):
    """GEMM1's and GEMM2's configs in the lowered CUDA pipeline: a tile name, "fused<block_m>"
    for GEMM1 with act_quant in its epilogue (jax_moe_gemm1_act_quant), "pair<block_m>" for an
    own-kernel GEMM in one call with the stage before it (jax_moe_permute_gemm,
    jax_moe_act_quant_gemm), or a single "chain<block_m>" for both GEMMs in the decode chain
    (jax_moe_permute_gemm_chain)."""
    monkeypatch.setattr(_native, "register_targets", lambda: None)
    h, i, k = 256, 128, 8
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, e, (t, k)), jnp.int32)
    w = jnp.full((t, k), 0.125, jnp.bfloat16)
    x = jnp.zeros((t, h), FP8)
    xs = jnp.ones((h // 128, t), jnp.float32)
    w1, w1s = jnp.zeros((e_loc, 2 * i, h), FP8), jnp.ones((e_loc, 2 * i // 128, h // 128), jnp.float32)
    w2, w2s = jnp.zeros((e_loc, h, i), FP8), jnp.ones((e_loc, h // 128, i // 128), jnp.float32)
    fn = functools.partial(api.run_experts, ops, num_experts=e, local_expert_offset=0,
                           activation_type=act, do_finalize=True)
    if act not in (jax_moe.ActivationType.Swiglu, jax_moe.ActivationType.Geglu):
        w1, w1s = w1[:, :i], w1s[:, :i // 128]
    text = jax.jit(fn).lower(ids, w, x, xs, w1, w1s, w2, w2s).as_text()
    names = {v: name for name, v in ops.GEMM_TILES.items()}
    gemms = []
    for line in text.splitlines():
        if "@jax_moe_permute_gemm_chain" in line:
            gemms.append("chain" + line.split("block_m = ")[1].split(" ")[0])
        elif "@jax_moe_gemm1_act_quant" in line:
            gemms.append("fused" + line.split("block_m = ")[1].split(" ")[0])
        elif "@jax_moe_permute_gemm" in line or "@jax_moe_act_quant_gemm" in line:
            gemms.append("pair" + line.split("block_m = ")[1].split(" ")[0])
        elif "@jax_moe_grouped_gemm" in line and "tile = " in line:
            gemms.append(names[int(line.split("tile = ")[1].split(" ")[0])])
    return gemms


@pytest.mark.parametrize("t, e, e_loc, gemm1, gemm2", [
    (1, 256, 256, "pair8", "pair8"), (8, 256, 256, "pair8", "pair8"),      # trimmed tiles:
    (9, 256, 256, "pair16", "pair16"), (16, 256, 256, "pair16", "pair16"),  # a group has at
    (32, 256, 32, "pair32", "pair32"), (33, 256, 32, "pair64", "pair64"),   # most T rows
    (512, 256, 32, "pair64", "pair64"),
    (544, 256, 32, "fused64", "own64"), (1024, 256, 32, "fused64", "own64"),  # 17, 32 rows
    (1536, 256, 256, "fused64", "own128"),                                  # 48 rows
    (1568, 256, 256, "fused128", "own128"),                                 # 49 rows: 128 x 256 tiles
    (2048, 256, 256, "fused128", "own128"), (2080, 256, 32, "128", "128"),  # 64, 65 rows
    (4096, 256, 32, "128", "128"),                                           # 128 rows
])
def test_pipeline_tile_follows_expected_rows_per_expert(monkeypatch, t, e, e_loc, gemm1, gemm2):
    """rows per local expert = T*k/E (not T*k/E_loc: a local slice receives ~E_loc/E of the
    rows) sets GEMM2's tile (jax_moe.ops.gemm_tile_for) and whether GEMM1 runs fused with
    act_quant (jax_moe.ops.gemm1_fused_for; its row tile by gemm1_fused_block_m_for) or split
    with the same tile as GEMM2 -- with the own
    kernel as the stage pairs permute + GEMM1, act_quant + GEMM2 -- or, with
    $JAX_MOE_DECODE_CHAIN=auto, as the decode chain (both GEMMs in one kernel)."""
    monkeypatch.delenv(ops.TILE_ENV, raising=False)
    monkeypatch.delenv(ops.GEMM1_ENV, raising=False)
    monkeypatch.delenv(ops.PAIRS_ENV, raising=False)
    monkeypatch.delenv(ops.TRIM_ENV, raising=False)
    monkeypatch.setenv(ops.CHAIN_ENV, "off")
    assert _gemm_tiles_of_the_op(monkeypatch, t, e, e_loc) == [gemm1, gemm2]
    monkeypatch.setenv(ops.CHAIN_ENV, "auto")
    chain = [gemm1.replace("pair", "chain")] if gemm1.startswith("pair") else [gemm1, gemm2]
    assert _gemm_tiles_of_the_op(monkeypatch, t, e, e_loc) == chain


def test_decode_chain_env_and_activation(monkeypatch):
    """With $JAX_MOE_DECODE_CHAIN=auto the decode chain replaces the two stage pairs for gated
    activations; a plain activation (Relu2) or "off" keeps the pairs; a forced own128 tile (no
    chain tile) too; the default is ops.CHAIN_DEFAULT; anything else in the variable is an error
    naming it."""
    for var in (ops.TILE_ENV, ops.GEMM1_ENV, ops.PAIRS_ENV, ops.TRIM_ENV, ops.CHAIN_ENV):
        monkeypatch.delenv(var, raising=False)
    default = ["chain8"] if ops.CHAIN_DEFAULT == "auto" else ["pair8", "pair8"]
    assert _gemm_tiles_of_the_op(monkeypatch, 1, 256, 256) == default
    monkeypatch.setenv(ops.CHAIN_ENV, "auto")
    assert _gemm_tiles_of_the_op(monkeypatch, 1, 256, 256, jax_moe.ActivationType.Geglu) == ["chain8"]
    assert _gemm_tiles_of_the_op(monkeypatch, 1, 256, 256, jax_moe.ActivationType.Relu2) == ["pair8", "pair8"]
    monkeypatch.setenv(ops.CHAIN_ENV, "off")
    assert _gemm_tiles_of_the_op(monkeypatch, 16, 256, 256) == ["pair16", "pair16"]
    monkeypatch.setenv(ops.CHAIN_ENV, "auto")
    monkeypatch.setenv(ops.GEMM1_ENV, "split")
    monkeypatch.setenv(ops.TILE_ENV, "own128")
    assert _gemm_tiles_of_the_op(monkeypatch, 16, 256, 256) == ["pair128", "pair128"]
    monkeypatch.delenv(ops.TILE_ENV)
    monkeypatch.delenv(ops.GEMM1_ENV)
    monkeypatch.setenv(ops.CHAIN_ENV, "on")
    with pytest.raises(ValueError, match="JAX_MOE_DECODE_CHAIN.*got 'on'"):
        _gemm_tiles_of_the_op(monkeypatch, 1, 256, 256)


def test_trim_env_keeps_own64(monkeypatch):
    """$JAX_MOE_TRIM=off keeps the decode pairs on own64's 64-row tiles; a forced tile is used as
    it is; anything else is an error naming the variable."""
    monkeypatch.delenv(ops.TILE_ENV, raising=False)
    monkeypatch.delenv(ops.GEMM1_ENV, raising=False)
    monkeypatch.delenv(ops.PAIRS_ENV, raising=False)
    monkeypatch.setenv(ops.CHAIN_ENV, "auto")
    monkeypatch.setenv(ops.TRIM_ENV, "off")
    assert _gemm_tiles_of_the_op(monkeypatch, 1, 256, 256) == ["chain64"]
    monkeypatch.setenv(ops.TRIM_ENV, "auto")
    monkeypatch.setenv(ops.TILE_ENV, "own64")
    assert _gemm_tiles_of_the_op(monkeypatch, 1, 256, 256) == ["chain64"]
    monkeypatch.setenv(ops.TILE_ENV, "own16")
    assert _gemm_tiles_of_the_op(monkeypatch, 1, 256, 256) == ["chain16"]
    monkeypatch.delenv(ops.TILE_ENV)
    monkeypatch.setenv(ops.TRIM_ENV, "8")
    with pytest.raises(ValueError, match="JAX_MOE_TRIM.*got '8'"):
        _gemm_tiles_of_the_op(monkeypatch, 1, 256, 256)


def test_split_gemm1_output_dtype(monkeypatch):
    """Above 64 rows per expert GEMM1 runs split (CUTLASS, then act_quant) and writes g in
    bfloat16, the rounding point every path shares (reference.G_DTYPE, SPEC 3 step 2): half the
    bytes of float32 between GEMM1 and act_quant. GEMM2 writes bfloat16."""
    monkeypatch.delenv(ops.TILE_ENV, raising=False)
    monkeypatch.delenv(ops.GEMM1_ENV, raising=False)
    monkeypatch.setattr(_native, "register_targets", lambda: None)
    t, e, h, i, k = 4096, 256, 256, 128, 8
    ids = jnp.asarray(np.random.default_rng(1).integers(0, e, (t, k)), jnp.int32)
    args = (ids, jnp.full((t, k), 0.125, jnp.bfloat16), jnp.zeros((t, h), FP8), jnp.ones((h // 128, t), jnp.float32),
            jnp.zeros((32, 2 * i, h), FP8), jnp.ones((32, 2 * i // 128, h // 128), jnp.float32),
            jnp.zeros((32, h, i), FP8), jnp.ones((32, h // 128, i // 128), jnp.float32))
    fn = functools.partial(api.run_experts, ops, num_experts=e, local_expert_offset=0,
                           activation_type=jax_moe.ActivationType.Swiglu, do_finalize=True)
    text = jax.jit(fn).lower(*args).as_text()
    outs = [line.split("->")[-1] for line in text.splitlines() if "@jax_moe_grouped_gemm" in line]
    assert len(outs) == 2, outs
    assert f"tensor<{t * k}x{2 * i}xbf16>" in outs[0], outs[0]  # GEMM1: [T*k, 2I]
    assert f"tensor<{t * k}x{h}xbf16>" in outs[1], outs[1]      # GEMM2: [T*k, H]
    act_ins = [line for line in text.splitlines() if "@jax_moe_act_quant" in line]
    assert len(act_ins) == 1 and f"tensor<{t * k}x{2 * i}xbf16>" in act_ins[0], act_ins
    # decode (<= 16 rows per expert): the pair permute + GEMM1 writes g in bfloat16 too (the
    # decode chain, which keeps g in registers, off)
    monkeypatch.setenv(ops.CHAIN_ENV, "off")
    t = 16
    small = (ids[:t], args[1][:t], args[2][:t], args[3][:, :t]) + args[4:]
    text = jax.jit(fn).lower(*small).as_text()
    pair = [line.split("->")[-1] for line in text.splitlines() if "@jax_moe_permute_gemm" in line]
    assert len(pair) == 1 and f"tensor<{t * k}x{2 * i}xbf16>" in pair[0], pair


def test_pipeline_env_overrides(monkeypatch):
    """$JAX_MOE_GEMM_TILE forces both GEMMs' tile (GEMM1 then runs split); $JAX_MOE_GEMM1
    forces GEMM1 fused or split; $JAX_MOE_STAGE_PAIRS=off keeps split own-kernel GEMMs in
    separate calls."""
    monkeypatch.delenv(ops.GEMM1_ENV, raising=False)
    monkeypatch.delenv(ops.PAIRS_ENV, raising=False)
    monkeypatch.setenv(ops.CHAIN_ENV, "auto")
    monkeypatch.setenv(ops.TILE_ENV, "64")
    assert _gemm_tiles_of_the_op(monkeypatch, 2048, 256, 256) == ["64", "64"]
    monkeypatch.setenv(ops.GEMM1_ENV, "fused")  # the row tile as "auto" would take it
    assert _gemm_tiles_of_the_op(monkeypatch, 2048, 256, 256) == ["fused128", "64"]
    assert _gemm_tiles_of_the_op(monkeypatch, 1024, 256, 256) == ["fused64", "64"]
    monkeypatch.delenv(ops.TILE_ENV)
    assert _gemm_tiles_of_the_op(monkeypatch, 16, 256, 256) == ["fused64", "own64"]
    monkeypatch.setenv(ops.GEMM1_ENV, "fused128")
    assert _gemm_tiles_of_the_op(monkeypatch, 2048, 256, 256) == ["fused128", "own128"]
    monkeypatch.setenv(ops.GEMM1_ENV, "fused64")
    assert _gemm_tiles_of_the_op(monkeypatch, 4096, 256, 256) == ["fused64", "128"]
    monkeypatch.setenv(ops.GEMM1_ENV, "split")
    assert _gemm_tiles_of_the_op(monkeypatch, 2048, 256, 256) == ["chain64"]
    monkeypatch.setenv(ops.TILE_ENV, "own128")
    assert _gemm_tiles_of_the_op(monkeypatch, 2048, 256, 256) == ["pair128", "pair128"]
    monkeypatch.setenv(ops.PAIRS_ENV, "off")
    assert _gemm_tiles_of_the_op(monkeypatch, 2048, 256, 256) == ["own128", "own128"]
    monkeypatch.delenv(ops.TILE_ENV)
    assert _gemm_tiles_of_the_op(monkeypatch, 16, 256, 256) == ["own64", "own64"]
    monkeypatch.setenv(ops.PAIRS_ENV, "on")
    with pytest.raises(ValueError, match="JAX_MOE_STAGE_PAIRS.*got 'on'"):
        _gemm_tiles_of_the_op(monkeypatch, 16, 256, 256)
    monkeypatch.setenv(ops.PAIRS_ENV, "auto")
    monkeypatch.setenv(ops.GEMM1_ENV, "both")
    with pytest.raises(ValueError, match="JAX_MOE_GEMM1.*got 'both'"):
        _gemm_tiles_of_the_op(monkeypatch, 2048, 256, 256)


@pytest.mark.parametrize("offset", [0, 24])
def test_static_offset_reaches_the_plan_kernel(monkeypatch, offset):
    """A Python-int local_expert_offset goes to jax_moe_plan as attributes (expert_offset,
    num_experts), with no XLA ops shifting the ids between route and plan; this holds through
    the custom_vjp wrapper, which passes the offset on as an array."""
    monkeypatch.setattr(_native, "register_targets", lambda: None)
    monkeypatch.setattr(api, "_use_cuda", lambda backend: True)
    e, e_loc, t = 64, 8, 4
    w = random_moe_inputs(jax.random.PRNGKey(0), num_tokens=t, hidden_size=256,
                          intermediate_size=128, num_experts=e,
                          local_num_experts=e_loc)
    f = functools.partial(jax_moe.fp8_block_scale_moe, top_k=8, n_group=8, topk_group=4,
                          routed_scaling_factor=2.5, local_expert_offset=offset)
    lines = jax.jit(f).lower(*w).as_text().splitlines()
    plan = [line for line in lines if "@jax_moe_plan" in line]
    assert len(plan) == 1
    assert f"expert_offset = {offset} : i32" in plan[0] and f"num_experts = {e} : i32" in plan[0]
    ops_before_plan = lines[[i for i, line in enumerate(lines) if "@jax_moe_route" in line][0] + 1:
                            lines.index(plan[0])]
    assert not [line for line in ops_before_plan if "stablehlo." in line], ops_before_plan


def test_one_token_routes_and_plans_in_one_call(monkeypatch, request):
    """At T=1 with DeepSeek-V3 routing over groups of 32 and a static offset, the op lowers to
    jax_moe_route_plan in place of jax_moe_route + jax_moe_plan (with $JAX_MOE_ROUTE_PLAN=auto;
    ops.ROUTE_PLAN_DEFAULT when unset), with the plan's attributes; not at T=2, not with
    $JAX_MOE_ROUTE_PLAN=off, not with a traced offset, not with groups of another size."""
    monkeypatch.setattr(_native, "register_targets", lambda: None)
    monkeypatch.setattr(api, "_use_cuda", lambda backend: True)
    request.addfinalizer(jax_moe.grad._core.cache_clear)  # no pipeline traced under a switch stays

    def targets(t, e=64, n_group=2, offset=8, traced=False):
        jax_moe.grad._core.cache_clear()  # the pipeline is cached per configuration, not per env
        w = random_moe_inputs(jax.random.PRNGKey(t), num_tokens=t, hidden_size=256,
                              intermediate_size=128, num_experts=e, local_num_experts=16)
        kw = dict(top_k=4, n_group=n_group, topk_group=n_group, routed_scaling_factor=2.5)
        if traced:
            f = lambda o, *a: jax_moe.fp8_block_scale_moe(*a, local_expert_offset=o, **kw)
            text = jax.jit(f).lower(jnp.int32(offset), *w).as_text()
        else:
            text = jax.jit(functools.partial(jax_moe.fp8_block_scale_moe, local_expert_offset=offset,
                                             **kw)).lower(*w).as_text()
        calls = [line for line in text.splitlines() if "stablehlo.custom_call @jax_moe_" in line]
        return [line.split("@")[1].split("(")[0] for line in calls], calls

    monkeypatch.delenv(ops.ROUTE_PLAN_ENV, raising=False)
    assert targets(1)[0][0] == ("jax_moe_route_plan" if ops.ROUTE_PLAN_DEFAULT == "auto" else "jax_moe_route")
    monkeypatch.setenv(ops.ROUTE_PLAN_ENV, "auto")
    names, calls = targets(1)
    assert names[0] == "jax_moe_route_plan"
    assert "jax_moe_route" not in names and "jax_moe_plan" not in names
    assert ("num_local_experts = 16 : i32" in calls[0] and "expert_offset = 8 : i32" in calls[0]
            and "num_experts = 64 : i32" in calls[0])
    assert targets(2)[0][:2] == ["jax_moe_route", "jax_moe_plan"]
    assert targets(1, traced=True)[0][0] == "jax_moe_route"
    assert targets(1, e=48, n_group=3)[0][0] == "jax_moe_route"  # groups of 16
    monkeypatch.setenv(ops.ROUTE_PLAN_ENV, "off")
    assert targets(1)[0][:2] == ["jax_moe_route", "jax_moe_plan"]
    monkeypatch.setenv(ops.ROUTE_PLAN_ENV, "on")
    with pytest.raises(ValueError, match="JAX_MOE_ROUTE_PLAN.*got 'on'"):
        targets(1)
