"""Expert parallelism (SPEC section 4) on 8 fake CPU devices: every mode must equal the
single-device `fp8_block_scale_moe(..., backend="xla")` result (rel <= 1e-2)."""
import os
import socket
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_moe
from jax_moe import parallel

H, I, E, K = 256, 128, 16, 4
T = 37  # divisible by none of the token shard counts: the wrappers pad and strip
REL = 1e-2


def cpus():
    """The 8 fake CPU devices of conftest (also on a GPU machine, so these tests stay on CPU)."""
    return jax.devices("cpu")


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@jax.jit
def _quantized(x, w1, w2):
    return (*jax_moe.quantize_activations(x), *jax_moe.quantize_weights(w1),
            *jax_moe.quantize_weights(w2))


def make_inputs(t=T, e=E, seed=0):
    """N(0,1)/sqrt(fan_in) hidden states and weights, quantized with the library helpers."""
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
    bias = jnp.asarray(0.1 * rng.standard_normal(e), jnp.float32)
    x = rng.standard_normal((t, H)) / np.sqrt(H)
    w1 = rng.standard_normal((e, 2 * I, H)) / np.sqrt(H)
    w2 = rng.standard_normal((e, H, I)) / np.sqrt(I)
    return [logits, bias, *_quantized(jnp.asarray(x, jnp.float32),
                                      jnp.asarray(w1, jnp.float32), jnp.asarray(w2, jnp.float32))]


def skewed(args, first_expert, count):
    """Every token routed to experts [first_expert, first_expert + count) first (a huge bias)."""
    bias = args[1].at[first_expert:first_expert + count].add(100.0)
    return [args[0], bias] + list(args[2:])


@partial(jax.jit, static_argnames=("do_finalize",))
def _single_device(args, do_finalize=True):
    return jax_moe.fp8_block_scale_moe(*args, top_k=K, backend="xla", do_finalize=do_finalize)


def single_device(args, do_finalize=True):
    """The single-device result (jitted: one compilation per shape, shared by the tests)."""
    return _single_device(list(args), do_finalize=do_finalize)


def place(mesh, args, expert_axis="expert"):
    """NamedSharding inputs: weights sharded on E over the expert axis, tokens replicated."""
    specs = [P(None, None), P(), P(None, None), P(None, None)] + [P(expert_axis, None, None)] * 4
    return [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


@pytest.mark.parametrize("size", [2, 4, 8])
@pytest.mark.parametrize("mode", ["psum", "all_to_all"])
def test_ep_equals_single_device(inputs, size, mode):
    mesh = Mesh(np.array(cpus()[:size]), ("expert",))
    fn = jax.jit(partial(parallel.expert_parallel_moe, mesh, "expert", top_k=K, mode=mode,
                         backend="xla"))
    e_loc = E // size
    last = E - e_loc
    for case in (inputs, skewed(inputs, last, e_loc)):  # same shapes: one compilation
        ref = single_device(case)
        out = fn(*place(mesh, case))
        assert out.shape == (T, H) and out.dtype == jnp.bfloat16
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert rel(out, ref) <= REL, (size, mode, rel(out, ref))
    # the skewed case really sends every token's first min(k, E_loc) slots to the last shard
    ids, _ = jax_moe.route(case[0], case[1], top_k=K, backend="xla")
    assert (np.asarray(ids[:, :min(K, e_loc)]) >= last).all()


def test_unreduced_outputs(inputs):
    """do_finalize=False: complete per-slot outputs, weights and ids, token-sharded like [T, H]."""
    mesh = Mesh(np.array(cpus()[:4]), ("expert",))
    ref = single_device(inputs, do_finalize=False)
    for mode in ("psum", "all_to_all"):
        out = jax.jit(partial(parallel.expert_parallel_moe, mesh, "expert", top_k=K, mode=mode,
                              backend="xla", do_finalize=False))(*place(mesh, inputs))
        assert isinstance(out, jax_moe.MoEOutputs)
        np.testing.assert_array_equal(np.asarray(out.topk_ids), np.asarray(ref.topk_ids))
        np.testing.assert_array_equal(np.asarray(out.topk_weights, np.float32),
                                      np.asarray(ref.topk_weights, np.float32))
        assert out.expert_outputs.shape == (T, K, H)
        assert rel(out.expert_outputs, ref.expert_outputs) <= REL, mode


@pytest.mark.parametrize("mode", ["psum_scatter", "all_to_all"])
def test_data_by_expert_mesh(inputs, mode):
    """2 x 4 mesh ('data', 'expert'), tokens sharded over 'data' (and over 'expert' in the
    all_to_all mode; the psum_scatter output too). T = 37 is padded to 40 and stripped. The
    all_to_all case uses an Explicit-axes mesh (jax.make_mesh's default), psum_scatter an Auto
    one."""
    if mode == "all_to_all":
        mesh = jax.make_mesh((2, 4), ("data", "expert"), devices=cpus())
    else:
        mesh = Mesh(np.array(cpus()).reshape(2, 4), ("data", "expert"))
    fn = jax.jit(partial(parallel.expert_parallel_moe, mesh, "expert", top_k=K, mode=mode,
                         token_axis="data", backend="xla"))
    # tokens of data shard 0 all go to expert shard 0, data shard 1's to expert shard 3
    logits = inputs[0].at[:T // 2, :E // 4].add(100.0).at[T // 2:, -E // 4:].add(100.0)
    for case in (inputs, [logits] + inputs[1:]):
        out = fn(*case)
        assert out.shape == (T, H)
        assert rel(out, single_device(case)) <= REL


def test_routed_entry(inputs):
    """Pre-routed (ids, weights) with repeated experts, out-of-range ids (skipped) and a block of
    tokens all on shard 0's experts; all_to_all mode (T = 37 padded with ids -1)."""
    mesh = Mesh(np.array(cpus()[:4]), ("expert",))
    ids, w = jax_moe.route(inputs[0], inputs[1], top_k=K, backend="xla")
    ids = ids.at[0, 1].set(ids[0, 0])  # the same expert twice
    ids = ids.at[1, 2].set(E + 3).at[2, 0].set(-1)  # skipped
    ids = ids.at[3:20, :].set(jnp.arange(K, dtype=jnp.int32) % 2)  # all on shard 0's experts
    ref = jax.jit(partial(jax_moe.fp8_block_scale_routed_moe, top_k=K, num_experts=E,
                          backend="xla"))((ids, w), None, *inputs[2:])
    out = jax.jit(partial(parallel.expert_parallel_routed_moe, mesh, "expert", top_k=K,
                          num_experts=E, mode="all_to_all", backend="xla"))(
        (ids, w), None, *place(mesh, inputs)[2:])
    assert rel(out, ref) <= REL


@pytest.mark.parametrize("check_vma", [False, True])
def test_inside_user_shard_map(inputs, check_vma):
    """ep_moe inside a user's own jit(shard_map): tokens arrive sharded over the axis, the user
    all-gathers them and asks for the psum_scatter mode (output sharded like the input)."""
    mesh = Mesh(np.array(cpus()[:4]), ("ep",))
    t = 32
    args = [inputs[0][:t], inputs[1], inputs[2][:t], inputs[3][:, :t]] + inputs[4:]
    w = P("ep", None, None)

    def body(logits, bias, hq, hs, w1, s1, w2, s2):
        full = [jax.lax.all_gather(x, "ep", axis=ax, tiled=True)
                for x, ax in ((logits, 0), (hq, 0), (hs, 1))]
        return parallel.ep_moe(full[0], bias, full[1], full[2], w1, s1, w2, s2, axis_name="ep",
                               top_k=K, mode="psum_scatter", backend="xla")

    specs = (P("ep", None), P(), P("ep", None), P(None, "ep"), w, w, w, w)
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P("ep", None),
                               check_vma=check_vma))
    out = fn(*[jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)])
    assert out.shape == (t, H)
    assert rel(out, single_device(inputs)[:t]) <= REL  # tokens are independent


def test_ragged_dispatch_emulated(inputs, monkeypatch):
    """dispatch='ragged' offset bookkeeping, with ragged_all_to_all emulated (XLA:CPU lacks it)."""
    mesh = Mesh(np.array(cpus()[:4]), ("expert",))
    fn = partial(parallel.expert_parallel_moe, mesh, "expert", top_k=K, mode="all_to_all",
                 backend="xla", dispatch="ragged")
    if jax.default_backend() == "cpu":
        with pytest.raises(NotImplementedError, match="ragged"):
            jax.jit(fn).lower(*inputs)
    monkeypatch.setattr(parallel, "_RAGGED_ALL_TO_ALL", parallel._emulated_ragged_all_to_all)
    jfn = jax.jit(fn)
    for case in (inputs, skewed(inputs, 4, 4)):
        assert rel(jfn(*place(mesh, case)), single_device(case)) <= REL


def test_bad_arguments(inputs):
    mesh = Mesh(np.array(cpus()[:4]), ("expert",))
    with pytest.raises(ValueError, match="mode"):
        parallel.expert_parallel_moe(mesh, "expert", *inputs, top_k=K, mode="allreduce")
    with pytest.raises(ValueError, match="dispatch"):
        parallel.expert_parallel_moe(mesh, "expert", *inputs, top_k=K, mode="all_to_all",
                                     dispatch="nccl")
    with pytest.raises(ValueError, match="not an axis"):
        parallel.expert_parallel_moe(mesh, "experts", *inputs, top_k=K)

    def body(logits, hq, hs, w1, s1, w2, s2):  # weights not sharded on the expert axis
        return parallel.ep_moe(logits, None, hq, hs, w1, s1, w2, s2, axis_name="expert",
                               top_k=K, backend="xla")

    rep = P()
    with pytest.raises(ValueError, match="experts per shard"):
        jax.shard_map(body, mesh=mesh, in_specs=(rep,) * 7, out_specs=rep)(
            inputs[0], *inputs[2:])


def test_zero_tokens(inputs):
    """T = 0 gives an empty [0, H] result in every mode (no collective on empty arrays)."""
    mesh = Mesh(np.array(cpus()[:4]), ("expert",))
    empty = [inputs[0][:0], inputs[1], inputs[2][:0], inputs[3][:, :0]] + inputs[4:]
    for mode in ("psum", "psum_scatter", "all_to_all"):
        out = jax.jit(partial(parallel.expert_parallel_moe, mesh, "expert", top_k=K, mode=mode,
                              backend="xla"))(*empty)
        assert out.shape == (0, H) and out.dtype == jnp.bfloat16


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes():
    """Two processes x 2 CPU devices, jax.distributed over localhost (gloo), same EP code path."""
    script = os.path.join(os.path.dirname(__file__), "multiprocess_ep.py")
    port = str(_free_port())
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                   [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                   + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    procs = [subprocess.Popen([sys.executable, script, str(i), "2", port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out}"
        assert "OK" in out, out


def test_gradients(inputs):
    """jax.grad through the EP wrappers equals the single-device gradient (logits,
    hidden_states_scale, both weight scales)."""
    mesh = Mesh(np.array(cpus()[:4]), ("expert",))
    ct = jnp.asarray(np.random.default_rng(1).standard_normal((T, H)), jnp.float32)

    def loss(f, logits, hs, s1, s2):
        a = list(inputs)
        a[0], a[3], a[5], a[7] = logits, hs, s1, s2
        return jnp.sum(f(*a).astype(jnp.float32) * ct)

    diff = (inputs[0], inputs[3], inputs[5], inputs[7])
    ref = jax.jit(jax.grad(partial(loss, lambda *a: single_device(a)), argnums=(0, 1, 2, 3)))(*diff)
    for mode in ("psum", "all_to_all"):
        f = partial(parallel.expert_parallel_moe, mesh, "expert", top_k=K, mode=mode,
                    backend="xla")
        got = jax.jit(jax.grad(partial(loss, f), argnums=(0, 1, 2, 3)))(*diff)
        for name, g, r in zip(("logits", "hidden_states_scale", "w1 scale", "w2 scale"), got, ref):
            assert rel(g, r) <= REL, (mode, name, rel(g, r))


@pytest.mark.gpu
@pytest.mark.parametrize("mode,dispatch", [("psum", "dense"), ("psum_scatter", "dense"),
                                           ("all_to_all", "dense"), ("all_to_all", "ragged")])
def test_gpu_expert_parallel(mode, dispatch):
    """The CUDA stages per shard on >= 2 GPUs (ragged_all_to_all for real) vs one GPU."""
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if len(gpus) < 2:
        pytest.skip("needs >= 2 GPUs")
    size = 2 ** int(np.log2(min(len(gpus), 8)))
    mesh = Mesh(np.array(gpus[:size]), ("expert",))
    e = 32
    with jax.default_device(gpus[0]):
        args = make_inputs(t=61, e=e)
    fn = jax.jit(partial(parallel.expert_parallel_moe, mesh, "expert", top_k=K, mode=mode,
                         backend="cuda", dispatch=dispatch))
    for case in (args, skewed(args, e - e // size, e // size)):
        with jax.default_device(gpus[0]):
            ref = jax.jit(partial(jax_moe.fp8_block_scale_moe, top_k=K, backend="cuda"))(*case)
        out = fn(*place(mesh, case))
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert rel(out, ref) <= REL, (mode, dispatch, rel(out, ref))
