"""Expert parallelism on the GPUs of one host at DeepSeek-V3 shapes (SPEC section 4).

    python benchmarks/bench_ep.py [--tokens 128,4096] [--reps 20]

Weights (E=256) are sharded on the expert axis over all local GPUs; each mode is timed against
the same layer on one GPU holding all experts, checked against it (rel), and the bytes each
device sends are counted from the routing.
"""
import argparse
import json
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_moe
from jax_moe.testing import device_time, random_moe_inputs

H, I, E, K = 7168, 2048, 256, 8
KW = dict(top_k=K, n_group=8, topk_group=4, routed_scaling_factor=2.5)


def device_ms(fn, args, reps):
    """Device time per call in ms (calls enqueued back to back, see testing.device_time)."""
    return 1e3 * device_time(fn, [args], reps)


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="128,4096")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    devs = jax.devices()
    n = len(devs)
    e_loc = E // n
    mesh = Mesh(np.array(devs), ("expert",))
    shards = []
    for i, d in enumerate(devs):
        with jax.default_device(d):
            shards.append(random_moe_inputs(jax.random.PRNGKey(i), num_tokens=1, hidden_size=H,
                                            intermediate_size=I, num_experts=E, local_num_experts=e_loc))
    wsh = NamedSharding(mesh, P("expert"))
    weights = []
    for idx in range(4, 8):
        parts = [s[idx] for s in shards]
        shape = (E,) + parts[0].shape[1:]
        weights.append(jax.make_array_from_single_device_arrays(shape, wsh, parts))
    bias = jax.device_put(shards[0].routing_bias, NamedSharding(mesh, P()))
    one_gpu = [jax.device_put(w, devs[0]) for w in weights]
    single = jax.jit(lambda *a: jax_moe.fp8_block_scale_moe(*a, **KW))
    results = []
    for t in [int(x) for x in args.tokens.split(",")]:
        tok = random_moe_inputs(jax.random.PRNGKey(100 + t), num_tokens=t, hidden_size=H,
                                intermediate_size=128, num_experts=E, local_num_experts=1)
        tokens = (tok.routing_logits, bias, tok.hidden_states, tok.hidden_states_scale)
        ref_args = [jax.device_put(x, devs[0]) for x in tokens] + one_gpu
        ref = single(*ref_args)
        t1 = device_ms(single, ref_args, args.reps)
        ids = np.asarray(jax_moe.route(tok.routing_logits, bias, **KW)[0])
        owner = ids // e_loc
        src = (np.arange(t) * n // t)[:, None]  # token shard of each token (all_to_all mode)
        remote_rows = int((owner != src).sum())
        row_bytes = H + 4 + 4 * H // 128 + 2 * H  # out: fp8 row, id, scales; back: bf16 row
        for mode, extra in (("psum", {}), ("all_to_all", dict(dispatch="dense")),
                            ("all_to_all", dict(dispatch="ragged"))):
            name = mode + ("/" + extra["dispatch"] if extra else "")
            fn = jax.jit(lambda *a, mode=mode, extra=extra: jax_moe.expert_parallel_moe(
                mesh, "expert", *a, mode=mode, **KW, **extra))
            try:
                out = fn(*tokens, *weights)
                ms = device_ms(fn, list(tokens) + weights, args.reps)
                err = rel(jax.device_get(out).astype(np.float32), jax.device_get(ref).astype(np.float32))
            except Exception as e:  # report and go on with the other modes
                results.append(dict(T=t, mode=name, error=str(e)[:300]))
                print(json.dumps(results[-1]), flush=True)
                continue
            if mode == "psum":
                sent = 2 * (n - 1) / n * t * H * 4  # ring all-reduce of float32 partial sums
            else:
                sent = remote_rows / n * row_bytes  # exact rows; dense pads to its capacity
            results.append(dict(T=t, gpus=n, mode=name, ms=ms, one_gpu_ms=t1, speedup=t1 / ms,
                                rel_vs_one_gpu=err, bytes_sent_per_device=sent))
            print(json.dumps(results[-1]), flush=True)
    out = os.path.join(os.environ.get("OUT", "."), "bench_ep.json")
    with open(out, "w") as f:
        json.dump(dict(device=devs[0].device_kind, gpus=n, results=results), f, indent=1)
    print(f"{'T':>6} {'mode':<18} {'ms':>8} {'1-GPU ms':>9} {'speedup':>7} {'rel':>8} {'MB sent/dev':>11}")
    for r in results:
        if "error" in r:
            print(f"{r['T']:>6} {r['mode']:<18} error: {r['error'][:80]}")
        else:
            print(f"{r['T']:>6} {r['mode']:<18} {r['ms']:>8.3f} {r['one_gpu_ms']:>9.3f} {r['speedup']:>7.2f} "
                  f"{r['rel_vs_one_gpu']:>8.1e} {r['bytes_sent_per_device'] / 1e6:>11.1f}")


if __name__ == "__main__":
    main()
