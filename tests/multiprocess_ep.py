"""One process of the multi-process expert-parallel check (launched by tests/test_parallel.py).

    python tests/multiprocess_ep.py PROCESS_ID NUM_PROCESSES PORT

Every process joins `jax.distributed` on localhost (CPU collectives over gloo), builds the same
inputs from a fixed seed, runs `jax_moe.parallel.expert_parallel_moe` over a mesh of all global
devices (modes psum and all_to_all), gathers the token-sharded result and compares
it with the single-process `fp8_block_scale_moe(..., backend="xla")` computed locally. Prints OK.
"""
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def main():
    pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid, initialization_timeout=60)
    import jax_moe
    from jax_moe import parallel

    h, i, e, k, t = 256, 128, 16, 4, 30
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((t, e)).astype(np.float32)
    logits[: t // 2, -4:] += 8.0  # half the tokens pile onto the last device's experts
    bias = (0.1 * rng.standard_normal(e)).astype(np.float32)
    x = rng.standard_normal((t, h)) / np.sqrt(h)
    w1 = rng.standard_normal((e, 2 * i, h)) / np.sqrt(h)
    w2 = rng.standard_normal((e, h, i)) / np.sqrt(i)
    local = jax.local_devices()[0]
    with jax.default_device(local):
        quantized = jax.jit(lambda x, w1, w2: (*jax_moe.quantize_activations(x),
                                               *jax_moe.quantize_weights(w1),
                                               *jax_moe.quantize_weights(w2)))(
            *[jnp.asarray(a, jnp.float32) for a in (x, w1, w2)])
        host = [np.asarray(a) for a in (logits, bias, *quantized)]
        ref = jax.jit(lambda *a: jax_moe.fp8_block_scale_moe(*a, top_k=k, backend="xla"))(
            *[jnp.asarray(a) for a in host])
        ref = np.asarray(ref, np.float32)

    mesh = Mesh(np.array(jax.devices()), ("expert",))
    assert mesh.size == 2 * nproc, mesh
    wspec = P("expert", None, None)
    specs = [P(), P(), P(), P()] + [wspec] * 4
    # global arrays from host data: each process supplies its addressable shards
    glob = [jax.make_array_from_callback(a.shape, NamedSharding(mesh, s), lambda idx, a=a: a[idx])
            for a, s in zip(host, specs)]
    worst = 0.0
    for mode in ("psum", "all_to_all"):
        fn = jax.jit(lambda *a, mode=mode: parallel.expert_parallel_moe(
            mesh, "expert", *a, top_k=k, mode=mode, backend="xla"))
        out = multihost_utils.process_allgather(fn(*glob), tiled=True)
        out = np.asarray(out, np.float32)
        r = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        print(f"process {pid}: mode={mode} shape={out.shape} rel={r:.3e}", flush=True)
        assert out.shape == ref.shape and r <= 1e-2, (mode, r)
        worst = max(worst, r)
    jax.distributed.shutdown()
    print(f"OK process {pid} worst rel {worst:.3e}", flush=True)


if __name__ == "__main__":
    main()
