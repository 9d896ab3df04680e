"""The whole op on the CUDA path against the pure-JAX path (SPEC section 3: rel <= 1e-2).

Every test needs a supported GPU with the compiled kernels (conftest skips them otherwise).
"""
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import ActivationType as A
from jax_moe import RoutingMethodType as R
from jax_moe.testing import random_moe_inputs

pytestmark = pytest.mark.gpu


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@functools.lru_cache(maxsize=None)
def _fn(routed, backend, **static):
    f = jax_moe.fp8_block_scale_routed_moe if routed else jax_moe.fp8_block_scale_moe
    return jax.jit(functools.partial(f, backend=backend, **static))


def both(args, routed=False, **static):
    """(cuda result, xla result) of the same call."""
    static = tuple(sorted(static.items()))
    return (_fn(routed, "cuda", **dict(static))(*args), _fn(routed, "xla", **dict(static))(*args))


def check_close(cu, xl, what=""):
    if isinstance(cu, jax_moe.MoEOutputs):
        assert np.array_equal(np.asarray(cu.topk_ids), np.asarray(xl.topk_ids)), what
        cu, xl = cu.expert_outputs, xl.expert_outputs
    assert cu.shape == xl.shape and cu.dtype == xl.dtype
    assert bool(jnp.all(jnp.isfinite(cu.astype(jnp.float32)))), f"non-finite output {what}"
    if cu.size:
        assert rel(cu, xl) <= 1e-2, f"rel {rel(cu, xl):.2e} {what}"


def inputs(seed, t, h, i, e, e_loc=None, act=A.Swiglu, logits_dtype=jnp.float32):
    return random_moe_inputs(jax.random.PRNGKey(seed), num_tokens=t, hidden_size=h,
                             intermediate_size=i, num_experts=e, local_num_experts=e_loc,
                             activation_type=act, logits_dtype=logits_dtype)


ROUTE = {
    R.Default: dict(top_k=4), R.Renormalize: dict(top_k=4),
    R.DeepSeekV3: dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    R.Llama4: dict(top_k=1), R.RenormalizeNaive: dict(top_k=4), R.TopK: dict(top_k=4),
    R.SigmoidRenorm: dict(top_k=4), R.MiniMax2: dict(top_k=4, routed_scaling_factor=1.5),
    R.Sigmoid: dict(top_k=4), R.TopKSigmoid: dict(top_k=4),
}


@pytest.mark.parametrize("method", list(R), ids=lambda m: m.name)
@pytest.mark.parametrize("logits_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_every_routing_method(method, logits_dtype):
    args = inputs(int(method), 96, 256, 128, 32, logits_dtype=logits_dtype)
    cu, xl = both(args, routing_method_type=method, **ROUTE[method])
    check_close(cu, xl, method.name)


@pytest.mark.parametrize("act", [A.Swiglu, A.Geglu, A.Relu2, A.Identity], ids=lambda a: a.name)
def test_every_activation(act):
    args = inputs(10 + int(act), 77, 384, 256, 16, act=act)
    cu, xl = both(args, top_k=4, activation_type=act, routing_method_type=R.Renormalize)
    check_close(cu, xl, act.name)


@pytest.mark.parametrize("t", [0, 1, 7, 128, 1000, 4096])
@pytest.mark.parametrize("e_loc", [8, 32, 256])
def test_token_counts_and_local_experts(t, e_loc):
    e = max(e_loc, 64)
    offset = e - e_loc  # the last slice: offset != 0 unless all experts are local
    args = inputs(t * 7 + e_loc, t, 256, 128, e, e_loc=e_loc)
    cu, xl = both(args, top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                  local_expert_offset=offset)
    assert cu.shape == (t, 256)
    check_close(cu, xl, f"T={t} E_loc={e_loc} offset={offset}")


@pytest.mark.parametrize("form", ["packed", "tuple"])
def test_routed_forms_and_out_of_range_ids(form):
    t, e, k = 200, 32, 6
    args = inputs(3, t, 256, 128, e)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, e, (t, k)).astype(np.int32)
    ids[::5, 1] = e + 3  # out of range: skipped
    ids[::7, 2] = 40000 if form == "tuple" else e + 100
    if form == "tuple":
        ids[::3, 3] = -2
    w = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    topk = jax_moe.pack_topk(ids, w) if form == "packed" else (jnp.asarray(ids), w)
    rest = (args.routing_bias,) + tuple(args[2:])
    cu, xl = both((topk,) + rest, routed=True, top_k=k)
    check_close(cu, xl, form)


def test_do_finalize_false():
    args = inputs(4, 64, 256, 128, 32, e_loc=16)
    cu, xl = both(args, top_k=8, local_expert_offset=16, do_finalize=False,
                  routing_method_type=R.Renormalize)
    check_close(cu, xl)
    ids = np.asarray(cu.topk_ids)
    nonlocal_slots = ids < 16
    assert nonlocal_slots.any()
    assert not np.any(np.asarray(cu.expert_outputs.astype(jnp.float32))[nonlocal_slots])


def test_all_tokens_to_one_expert_and_most_experts_empty():
    t, e = 512, 64
    args = inputs(5, t, 256, 128, e)
    logits = jnp.asarray(args.routing_logits).at[:, 17].add(100.0)
    args = args._replace(routing_logits=logits)
    cu, xl = both(args, top_k=1, routing_method_type=R.TopK)
    check_close(cu, xl, "one expert")
    ids = np.zeros((t, 2), np.int32) + np.array([3, 60], np.int32)  # two of 64 experts used
    topk = (jnp.asarray(ids), jnp.full((t, 2), 0.5, jnp.bfloat16))
    cu, xl = both((topk, None) + tuple(args[2:]), routed=True, top_k=2)
    check_close(cu, xl, "two experts")


def test_nan_logit_rows():
    args = inputs(6, 64, 256, 128, 32)
    logits = jnp.asarray(args.routing_logits).at[5].set(jnp.nan).at[9, 3].set(jnp.nan)
    args = args._replace(routing_logits=logits)
    cu, xl = both(args, top_k=4, routing_method_type=R.Renormalize)
    keep = np.ones(64, bool)
    keep[[5, 9]] = False
    check_close(cu[keep], xl[keep], "rows without NaN")


def test_deterministic_bits():
    args = inputs(7, 1000, 512, 256, 64)
    f = _fn(False, "cuda", **dict(sorted(dict(top_k=8, n_group=8, topk_group=4).items())))
    a, b = f(*args), f(*args)
    assert np.array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


@pytest.fixture(scope="module")
def deepseek_weights():
    return inputs(8, 1, 7168, 2048, 256)


@pytest.mark.parametrize("t", [1, 128, 1000])
def test_deepseek_v3_shape(deepseek_weights, t):
    tok = inputs(100 + t, t, 7168, 128, 256, e_loc=1)
    args = deepseek_weights._replace(routing_logits=tok.routing_logits, hidden_states=tok.hidden_states,
                                     hidden_states_scale=tok.hidden_states_scale)
    cu, xl = both(args, top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    check_close(cu, xl, f"DeepSeek-V3 T={t}")


def test_deepseek_v3_expert_slice(deepseek_weights):
    """One expert-parallel slice of 8: 32 local experts at offset 64, routing over 256."""
    t = 4096
    tok = inputs(200, t, 7168, 128, 256, e_loc=1)
    w = deepseek_weights
    args = (tok.routing_logits, w.routing_bias, tok.hidden_states, tok.hidden_states_scale,
            w.gemm1_weights[64:96], w.gemm1_weights_scale[64:96], w.gemm2_weights[64:96],
            w.gemm2_weights_scale[64:96])
    cu, xl = both(args, top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                  local_expert_offset=64)
    check_close(cu, xl, "DeepSeek-V3 slice")


@pytest.mark.parametrize("gemm1", ["split", "fused", "pairs", "chain"])
def test_no_dense_expert_math_on_gpu(monkeypatch, gemm1):
    """The CUDA path runs every expert stage as our custom calls: no XLA dot in the HLO. At 8
    rows per expert "auto" runs GEMM1 split, as the decode chain (a gated activation) or the
    stage pairs permute + GEMM1 and act_quant + GEMM2 unless they are turned off."""
    monkeypatch.setenv(jax_moe.ops.GEMM1_ENV, "fused" if gemm1 == "fused" else "split")
    monkeypatch.setenv(jax_moe.ops.PAIRS_ENV, "auto" if gemm1 in ("pairs", "chain") else "off")
    monkeypatch.setenv(jax_moe.ops.CHAIN_ENV, "auto" if gemm1 == "chain" else "off")
    jax.clear_caches()  # the variables are read when the op is traced
    args = inputs(9, 64, 256, 128, 32)
    kw = dict(top_k=4, routing_method_type=R.Renormalize)
    hlo = jax.jit(functools.partial(jax_moe.fp8_block_scale_moe, backend="cuda", **kw)).lower(
        *args).compile().as_text()
    targets = {
        "split": ["permute", "grouped_gemm", "act_quant"],
        "fused": ["permute", "gemm1_act_quant", "grouped_gemm"],
        "pairs": ["permute_gemm", "act_quant_gemm"],
        "chain": ["permute_gemm_chain"],
    }[gemm1]
    called = {t.split('"')[0] for t in hlo.split('custom_call_target="jax_moe_')[1:]}
    assert called == {"route", "plan", "finalize", *targets}, called
    assert " dot(" not in hlo and "cublas" not in hlo.lower() and "ragged" not in hlo


CMD_BUFFER_SCRIPT = textwrap.dedent("""
    import sys, os
    os.environ["JAX_MOE_GEMM1"] = sys.argv[1]
    os.environ["JAX_MOE_STAGE_PAIRS"] = sys.argv[2]
    os.environ["JAX_MOE_DECODE_CHAIN"] = sys.argv[3]
    import jax, jax.numpy as jnp, numpy as np, jax_moe
    from jax_moe.testing import random_moe_inputs
    kw = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    f = jax.jit(lambda *a: jax_moe.fp8_block_scale_moe(*a, **kw, backend="cuda"))
    g = jax.jit(lambda *a: jax_moe.fp8_block_scale_moe(*a, **kw, backend="xla"))
    base = random_moe_inputs(jax.random.PRNGKey(0), num_tokens=256, hidden_size=512,
                             intermediate_size=256, num_experts=64)
    worst = 0.0
    for seed in range(5):  # replays with new inputs must give new, correct results
        tok = random_moe_inputs(jax.random.PRNGKey(seed + 1), num_tokens=256, hidden_size=512,
                                intermediate_size=128, num_experts=64, local_num_experts=1)
        args = base._replace(routing_logits=tok.routing_logits, hidden_states=tok.hidden_states,
                             hidden_states_scale=tok.hidden_states_scale)
        a = np.asarray(f(*args), np.float64); b = np.asarray(g(*args), np.float64)
        worst = max(worst, np.linalg.norm(a - b) / np.linalg.norm(b))
    print("REPLAY_REL", worst)
""")


@pytest.mark.parametrize("gemm1", ["split", "fused", "pairs", "chain"])
def test_cuda_graph_capture_and_replay(gemm1):
    """With command buffers on for custom calls, XLA records the whole pipeline (our seven
    custom calls, six with GEMM1 and act_quant fused, five as stage pairs, whose GEMMs are
    programmatic dependents of the stage kernels, four with the decode chain) into one CUDA
    graph and replays it with correct results for new inputs. XLA's command-buffer conversion
    pass logs which thunks each command buffer holds."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL"
                        " --xla_gpu_graph_min_graph_size=1")
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this process may hold most of the GPU
    env["TF_CPP_VMODULE"] = "command_buffer_conversion_pass=2,command_buffer_thunk=2"
    args = {"split": ["split", "off", "off"], "fused": ["fused", "off", "off"], "pairs": ["split", "auto", "off"],
            "chain": ["split", "auto", "auto"]}[gemm1]
    r = subprocess.run([sys.executable, "-c", CMD_BUFFER_SCRIPT, *args], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    graphs = [l.split("thunks:", 1)[1] for l in r.stderr.splitlines()
              if "Creating command buffer thunk with the following thunks:" in l]
    captured = max((g.count("ffi_call") for g in graphs), default=0)
    calls = {"split": 7, "fused": 6, "pairs": 5, "chain": 4}[gemm1]
    assert captured >= calls, f"no command buffer holds the {calls} jax_moe custom calls:\n" + "\n".join(graphs)
    assert "Executing warm up iteration of command buffer thunk" in r.stderr
    rel_line = [l for l in r.stdout.splitlines() if l.startswith("REPLAY_REL")]
    assert rel_line and float(rel_line[0].split()[1]) <= 1e-2, r.stdout


@pytest.mark.parametrize("tile", sorted(jax_moe.ops.GEMM_TILES))
def test_every_gemm_tile_in_the_pipeline(monkeypatch, tile):
    """The whole op with both GEMMs forced to each tile config (the GEMM1 output in bfloat16
    feeding act_quant, its bf16 GEMM2 output feeding finalize), ~75 rows per expert so
    that groups end inside half tiles, against the pure-JAX path."""
    monkeypatch.setenv(jax_moe.ops.TILE_ENV, tile)
    jax.clear_caches()  # the variable is read when the op is traced
    args = inputs(40, 300, 256, 256, 16)
    kw = dict(top_k=4, routing_method_type=R.Renormalize)
    cu = jax.jit(functools.partial(jax_moe.fp8_block_scale_moe, backend="cuda", **kw))(*args)
    xl = _fn(False, "xla", **kw)(*args)
    check_close(cu, xl, tile)


@pytest.mark.parametrize("gemm1", ["split", "fused128", "fused64"])
@pytest.mark.parametrize("act", [A.Swiglu, A.Geglu, A.Relu2, A.Identity], ids=lambda a: a.name)
def test_gemm1_fused_and_split_in_the_pipeline(monkeypatch, act, gemm1):
    """The whole op with GEMM1 + act_quant fused into the own kernel's epilogue or split, ~75
    rows per expert (groups end inside half tiles), an expert slice at offset 8, against the
    pure-JAX path; fused and split agree with each other to the same bound."""
    monkeypatch.setenv(jax_moe.ops.GEMM1_ENV, gemm1)
    jax.clear_caches()  # the variable is read when the op is traced
    args = inputs(50 + int(act), 300, 256, 256, 24, e_loc=16, act=act)
    kw = dict(top_k=4, routing_method_type=R.Renormalize, activation_type=act, local_expert_offset=8)
    cu = jax.jit(functools.partial(jax_moe.fp8_block_scale_moe, backend="cuda", **kw))(*args)
    xl = _fn(False, "xla", **kw)(*args)
    check_close(cu, xl, f"{act.name} {gemm1}")


@pytest.mark.parametrize("t, e, e_loc, offset, k", [
    (1, 256, 256, 0, 8), (7, 64, 8, 56, 8), (64, 256, 32, 64, 8), (300, 24, 16, 8, 4)])
def test_stage_pairs_equal_separate_stages(monkeypatch, t, e, e_loc, offset, k):
    """The op with the stage pairs (permute + GEMM1, act_quant + GEMM2 in one call each, the
    GEMMs launched with PDL) gives the same bits as with separate stage calls: the same kernels
    run, only their launch overlaps. At 300 x 4 / 24 = 50 rows per expert GEMM1 is forced split.
    The decode chain (tested below) is off."""
    monkeypatch.setenv(jax_moe.ops.GEMM1_ENV, "split")
    monkeypatch.setenv(jax_moe.ops.CHAIN_ENV, "off")
    args = inputs(60 + t, t, 512, 256, e, e_loc=e_loc)
    kw = dict(top_k=k, routing_method_type=R.Renormalize, local_expert_offset=offset)
    out = {}
    for pairs in ("auto", "off"):
        monkeypatch.setenv(jax_moe.ops.PAIRS_ENV, pairs)
        jax.clear_caches()
        out[pairs] = np.asarray(jax.jit(functools.partial(
            jax_moe.fp8_block_scale_moe, backend="cuda", **kw))(*args)).view(np.uint16)
    assert np.array_equal(out["auto"], out["off"])
    xl = _fn(False, "xla", **kw)(*args)
    check_close(jnp.asarray(out["auto"].view(jnp.bfloat16)), xl, f"T={t}")


def _pair_operands(seed, t, k, e_loc, h, n, empty_every=3):
    """A plan of T tokens x k slots over e_loc experts (every `empty_every`-th expert empty,
    some slots not local), fp8 hidden states and GEMM weights [e_loc, n, h]."""
    from jax_moe import ops, quant
    from jax_moe.testing import random_expert_weights
    rng = np.random.default_rng(seed)
    used = [x for x in range(e_loc) if x % empty_every]
    ids = rng.choice(used + [-1, e_loc + 2], (t, k)).astype(np.int32)
    p = ops.plan(jnp.asarray(ids), e_loc)
    hq, hs = quant.quantize_activations(jax.random.normal(jax.random.PRNGKey(seed), (t, h)))
    w, ws = random_expert_weights(jax.random.PRNGKey(seed + 1), e_loc, n, h)
    return p, hq, hs, w, ws


@pytest.mark.parametrize("block_m", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("t, k, e_loc", [(1, 8, 256), (33, 4, 8), (200, 6, 32)])
def test_permute_gemm_equals_permute_then_gemm(block_m, out_dtype, t, k, e_loc):
    """jax_moe_permute_gemm = jax_moe_permute followed by the own grouped GEMM, bit for bit,
    on the rows below offsets[E] (the rest is never written)."""
    from jax_moe import ops
    p, hq, hs, w, ws = _pair_operands(t + k, t, k, e_loc, 384, 256)
    d = jax.jit(ops.permute_gemm, static_argnums=(3, 6, 7))(hq, hs, p, k, w, ws, out_dtype, block_m)
    rows, row_scales = ops.permute(hq, hs, p, k)
    ref = ops.grouped_gemm_raw(rows, row_scales, w, ws, p.expert_offsets, out_dtype, tile=f"own{block_m}")
    m = int(p.expert_offsets[-1])
    assert m > 0
    got, want = np.asarray(d[:m]), np.asarray(ref[:m])
    assert np.all(np.isfinite(want.astype(np.float32))) and np.any(want != 0)
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("block_m", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("act", [A.Swiglu, A.Geglu, A.Relu2, A.Identity], ids=lambda a: a.name)
@pytest.mark.parametrize("t, k, e_loc", [(1, 8, 256), (150, 4, 16)])
def test_act_quant_gemm_equals_act_quant_then_gemm(block_m, act, t, k, e_loc):
    """jax_moe_act_quant_gemm = jax_moe_act_quant followed by the own grouped GEMM (bf16 out),
    bit for bit, on the rows below offsets[E]."""
    from jax_moe import ops
    from jax_moe.enums import is_gated
    i, n = 256, 384
    p, _, _, w, ws = _pair_operands(2 * t + k, t, k, e_loc, i, n)
    g = jax.random.normal(jax.random.PRNGKey(t), (t * k, 2 * i if is_gated(act) else i), jnp.bfloat16)
    d = jax.jit(ops.act_quant_gemm, static_argnums=(2, 5, 6))(g, p, act, w, ws, jnp.bfloat16, block_m)
    q, q_scales = ops.act_quant(g, p, act)
    ref = ops.grouped_gemm_raw(q, q_scales, w, ws, p.expert_offsets, jnp.bfloat16, tile=f"own{block_m}")
    m = int(p.expert_offsets[-1])
    assert m > 0
    got, want = np.asarray(d[:m]), np.asarray(ref[:m])
    assert np.all(np.isfinite(want.astype(np.float32))) and np.any(want != 0)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("block_m", [8, 16, 32, 64])
@pytest.mark.parametrize("act", [A.Swiglu, A.Geglu], ids=lambda a: a.name)
@pytest.mark.parametrize("t, k, e_loc", [(1, 8, 256), (33, 4, 8), (200, 6, 32)])
def test_decode_chain_equals_pairs(block_m, act, t, k, e_loc):
    """jax_moe_permute_gemm_chain (GEMM1 + activation + re-quantization and GEMM2 in one kernel,
    GEMM2's tiles waiting per expert for GEMM1's): its activations are act_quant of the pair
    permute + GEMM1's bfloat16 output -- codes at most one apart, on under 1e-3 of them, scales
    to 1e-6, the fused GEMM1's bound (test_gpu_gemm1_act) -- and its output is the own grouped
    GEMM of those activations bit for bit. Groups with more rows than the tile (t=33, 200),
    empty experts, non-local slots; H = 384, a partial last 256-column block of GEMM2."""
    from jax_moe import ops
    from test_gpu_stages import _scale_index, _ulp_diff
    h, i = 384, 256
    p, hq, hs, w1, w1s = _pair_operands(3 * t + k, t, k, e_loc, h, 2 * i)
    _, _, _, w2, w2s = _pair_operands(3 * t + k + 1, t, k, e_loc, i, h)
    chain = jax.jit(ops.permute_gemm_chain_raw, static_argnums=(3, 8, 9))
    d, q, qs = chain(hq, hs, p, k, w1, w1s, w2, w2s, act, block_m)
    m = int(p.expert_offsets[-1])
    assert m > 0
    offsets = np.asarray(p.expert_offsets)
    g = ops.permute_gemm(hq, hs, p, k, w1, w1s, jnp.bfloat16, block_m)
    q_ref, qs_ref = ops.act_quant(g, p, act)
    diff = _ulp_diff(np.asarray(q)[:m], np.asarray(q_ref)[:m])
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, "chain and pair activations disagree"
    idx = _scale_index(offsets, i // 128)
    np.testing.assert_allclose(np.asarray(qs)[idx], np.asarray(qs_ref)[idx], rtol=1e-6, atol=0)
    ref = ops.grouped_gemm_raw(q, qs, w2, w2s, p.expert_offsets, jnp.bfloat16, tile=f"own{block_m}")
    got, want = np.asarray(d[:m]), np.asarray(ref[:m])
    assert np.all(np.isfinite(want.astype(np.float32))) and np.any(want != 0)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    # and the pairs' whole result, through their own activations
    d_pairs = ops.act_quant_gemm(g, p, act, w2, w2s, jnp.bfloat16, block_m)
    assert rel(d[:m], d_pairs[:m]) <= 1e-3


@pytest.mark.parametrize("block_m", [8, 64])
@pytest.mark.parametrize("t, k, e_loc", [(1, 8, 256), (200, 6, 32)])
def test_decode_chain_any_residency(monkeypatch, block_m, t, k, e_loc):
    """The chain's GEMM2 tiles wait for GEMM1 tiles other CTAs hold, so it must not depend on
    which CTAs are resident: with one CTA, three, and 1024 (far more than fit: the resident ones
    claim the static tiles of those that are not, which later find them taken and pass their
    loaded stages through), the same bits as with one CTA per SM ($JAX_MOE_CHAIN_CTAS, read at
    each launch; a fresh executable per setting). Likewise with the waiting GEMM2 tiles' weight
    blocks sent to the L2 first ($JAX_MOE_CHAIN_L2_PREFETCH=on): only where the bytes come from
    changes."""
    from jax_moe import ops
    h, i = 384, 256
    p, hq, hs, w1, w1s = _pair_operands(5 * t + k, t, k, e_loc, h, 2 * i)
    _, _, _, w2, w2s = _pair_operands(5 * t + k + 1, t, k, e_loc, i, h)
    m = int(p.expert_offsets[-1])
    assert m > 0
    out = {}
    for ctas, prefetch in (("", ""), ("1", ""), ("3", ""), ("1024", ""), ("", "on"), ("3", "on")):
        monkeypatch.setenv("JAX_MOE_CHAIN_CTAS", ctas)
        monkeypatch.setenv("JAX_MOE_CHAIN_L2_PREFETCH", prefetch)
        jax.clear_caches()
        chain = jax.jit(ops.permute_gemm_chain_raw, static_argnums=(3, 8, 9))
        for rep in range(2):  # the counters and claim flags are zeroed again each call
            d, q, qs = jax.block_until_ready(chain(hq, hs, p, k, w1, w1s, w2, w2s, A.Swiglu, block_m))
            out[ctas, prefetch, rep] = (np.asarray(d[:m]).view(np.uint16),
                                        np.asarray(q[:m]).view(np.uint8), np.asarray(qs))
    d0, q0, qs0 = out["", "", 0]
    assert np.any(d0 != 0)
    for key, (d, q, qs) in out.items():
        assert np.array_equal(d, d0) and np.array_equal(q, q0), f"CTAs, L2 prefetch, call {key}"
        assert np.array_equal(qs[:m * i // 128], qs0[:m * i // 128]), f"CTAs, L2 prefetch, call {key}"


@pytest.mark.parametrize("t, e, e_loc, offset", [(1, 256, 256, 0), (16, 256, 256, 0), (64, 256, 32, 64)])
def test_decode_chain_in_the_op(monkeypatch, t, e, e_loc, offset):
    """The op with the decode chain against the pure-JAX path and against the op with the stage
    pairs, DeepSeek-V3 routing (groups of 32 experts), repeated calls (the chain's counters are
    zeroed by its permute each call)."""
    monkeypatch.delenv(jax_moe.ops.GEMM1_ENV, raising=False)
    monkeypatch.delenv(jax_moe.ops.TILE_ENV, raising=False)
    kw = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, local_expert_offset=offset)
    out = {}
    for chain in ("off", "auto"):
        monkeypatch.setenv(jax_moe.ops.CHAIN_ENV, chain)
        jax.clear_caches()
        f = jax.jit(functools.partial(jax_moe.fp8_block_scale_moe, backend="cuda", **kw))
        for seed in range(3):
            args = inputs(80 + t + seed, t, 512, 256, e, e_loc=e_loc)
            out[chain, seed] = f(*args)
    for seed in range(3):
        args = inputs(80 + t + seed, t, 512, 256, e, e_loc=e_loc)
        xl = _fn(False, "xla", **kw)(*args)
        check_close(out["auto", seed], xl, f"T={t} seed {seed}")
        assert rel(out["auto", seed], out["off", seed]) <= 2e-3


def test_decode_chain_errors(monkeypatch):
    """The chain's handler names the bad argument: a plain activation, a row tile it has no
    kernel for (the Python check bypassed), GEMM2 weights of the wrong shape."""
    from jax_moe import ops
    p, hq, hs, w1, w1s = _pair_operands(5, 2, 4, 8, 256, 256)
    _, _, _, w2, w2s = _pair_operands(6, 2, 4, 8, 128, 256)
    call = functools.partial(ops.permute_gemm_chain_raw, hq, hs, p, 4, w1, w1s)
    with pytest.raises(ValueError, match="block_m: expected one of"):
        call(w2, w2s, A.Swiglu, 128)
    with pytest.raises(Exception, match="activation: expected Swiglu"):
        jax.block_until_ready(call(w2, w2s, A.Relu2, 8))
    monkeypatch.setattr(ops, "CHAIN_BLOCK_M", (128, 8))
    with pytest.raises(Exception, match="block_m: expected 64, 32, 16 or 8, got 128"):
        jax.block_until_ready(call(w2, w2s, A.Swiglu, 128))
    with pytest.raises(Exception, match="gemm2_weights: expected shape"):
        jax.block_until_ready(call(w2[:, :128], w2s[:, :1], A.Swiglu, 8))
    d, _, _ = call(w2, w2s, A.Swiglu, 8)  # the same operands, well formed: runs
    m = int(p.expert_offsets[-1])  # rows past the local slots are never written: garbage
    assert m > 0 and np.all(np.isfinite(np.asarray(d[:m], np.float32)))


@pytest.mark.parametrize("t, e, e_loc, offset, chain", [
    (1, 256, 256, 0, "off"), (1, 256, 256, 0, "auto"), (16, 256, 256, 0, "auto"),
    (64, 256, 32, 64, "auto"), (300, 64, 64, 0, "off")])
def test_stage_pdl_same_bits(monkeypatch, t, e, e_loc, offset, chain):
    """Stage PDL (on by default; $JAX_MOE_STAGE_PDL=off turns it off) launches the plan, the
    decode permute and the finalize as PDL dependents of the kernel before (read at each
    launch; a fresh executable per setting, as
    XLA may replay a captured CUDA graph): the same bits as plain launches, over repeated calls
    with fresh inputs (a dependent that read or wrote before its wait would race)."""
    monkeypatch.delenv(jax_moe.ops.GEMM1_ENV, raising=False)
    monkeypatch.delenv(jax_moe.ops.TILE_ENV, raising=False)
    monkeypatch.setenv(jax_moe.ops.CHAIN_ENV, chain)
    kw = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, local_expert_offset=offset)
    out = {}
    for pdl in ("off", "on"):
        monkeypatch.setenv("JAX_MOE_STAGE_PDL", pdl)
        jax.clear_caches()
        f = jax.jit(functools.partial(jax_moe.fp8_block_scale_moe, backend="cuda", **kw))
        for seed in range(3):
            args = inputs(120 + t + seed, t, 512, 256, e, e_loc=e_loc)
            out[pdl, seed] = np.asarray(jax.block_until_ready(f(*args)).astype(jnp.float32))
    for seed in range(3):
        assert np.isfinite(out["on", seed]).all()
        assert np.array_equal(out["on", seed], out["off", seed]), f"T={t} seed {seed}"


@pytest.mark.parametrize("e, e_loc, offset", [(256, 256, 0), (256, 32, 32), (64, 32, 32)])
def test_route_plan_in_the_op_same_bits(monkeypatch, request, e, e_loc, offset):
    """At T=1 the op routes and plans in one kernel (jax_moe_route_plan; $JAX_MOE_ROUTE_PLAN=off
    gives the two calls, read at trace time): the same output bits either way, and the pure-JAX
    path's values."""
    kw = dict(top_k=8, n_group=e // 32, topk_group=min(4, e // 32), routed_scaling_factor=2.5,
              local_expert_offset=offset)
    out = {}
    request.addfinalizer(jax_moe.grad._core.cache_clear)
    for mode in ("auto", "off"):
        monkeypatch.setenv(jax_moe.ops.ROUTE_PLAN_ENV, mode)
        jax_moe.grad._core.cache_clear()  # read at trace time: the cached pipeline would keep it
        f = jax.jit(functools.partial(jax_moe.fp8_block_scale_moe, backend="cuda", **kw))
        text = f.lower(*inputs(0, 1, 512, 256, e, e_loc=e_loc)).as_text()
        assert ("jax_moe_route_plan" in text) == (mode == "auto")
        for seed in range(3):
            out[mode, seed] = np.asarray(f(*inputs(190 + seed, 1, 512, 256, e, e_loc=e_loc)).astype(jnp.float32))
    for seed in range(3):
        assert np.array_equal(out["auto", seed], out["off", seed]), f"seed {seed}"
    args = inputs(190, 1, 512, 256, e, e_loc=e_loc)
    xla = jax_moe.fp8_block_scale_moe(*args, backend="xla", **kw)
    check_close(out["auto", 0], np.asarray(xla.astype(jnp.float32)), "route_plan T=1")


@pytest.mark.parametrize("t, e, e_loc, offset", [(1, 256, 256, 0), (16, 256, 256, 0), (64, 256, 32, 64),
                                                 (300, 64, 64, 0)])
def test_route_pdl_back_to_back_same_bits(monkeypatch, t, e, e_loc, offset):
    """The route, launched as a PDL dependent of whatever kernel precedes it ($JAX_MOE_ROUTE_PDL=on
    with stage PDL; off by default until measured), and the finalize letting the next op's route start
    early: calls enqueued back to back with no sync between them, every other call's logits
    written by an XLA kernel just before it and the others' route right after the op before's
    finalize (a route that read its logits, or wrote its outputs into memory the op before still
    reads, ahead of its wait would race), give the bits of synchronized calls with every PDL off."""
    monkeypatch.delenv(jax_moe.ops.GEMM1_ENV, raising=False)
    monkeypatch.delenv(jax_moe.ops.TILE_ENV, raising=False)
    kw = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, local_expert_offset=offset)
    sets = [inputs(170 + t + seed, t, 512, 256, e, e_loc=e_loc) for seed in range(4)]
    scale = jax.device_put(np.float32(1.5))
    make_logits = jax.jit(lambda logits, s: logits * s)  # a kernel of its own before each call
    out = {}
    for stage, route in (("off", "off"), ("on", "off"), ("on", "on")):
        monkeypatch.setenv("JAX_MOE_STAGE_PDL", stage)
        monkeypatch.setenv("JAX_MOE_ROUTE_PDL", route)
        jax.clear_caches()
        f = jax.jit(functools.partial(jax_moe.fp8_block_scale_moe, backend="cuda", **kw))
        sync_each = stage == "off"
        for rnd in range(2):
            got = []
            for i, args in enumerate(sets):
                logits = make_logits(args[0], scale) if i % 2 == 0 else args[0]
                y = f(logits, *args[1:])
                got.append(jax.block_until_ready(y) if sync_each else y)
            out[stage, route, rnd] = [np.asarray(y.astype(jnp.float32)) for y in got]
    want = out["off", "off", 0]
    assert all(np.isfinite(w).all() and np.any(w != 0) for w in want)
    for key, got in out.items():
        for i, (g, w) in enumerate(zip(got, want)):
            assert np.array_equal(g, w), f"T={t} {key} set {i}"
