"""Times the jitted fp8_block_scale_moe on one DeepSeek-V3 workload, two ways: per call with a
sync after each (latency, host dispatch included) and pipelined (N calls back to back, one sync:
the device time per call). For profiling under nsys/ncu and for tile sweeps.

    python tools/probe_moe.py --tokens 128 --local-experts 256 [--reps 30]
"""
import argparse
import jax
import jax.numpy as jnp

import jax_moe
from jax_moe.testing import device_time, median_time, random_moe_inputs

H, I, E = 7168, 2048, 256
KW = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
          routing_method_type=jax_moe.RoutingMethodType.DeepSeekV3)


def deepseek_weights(local_experts):
    """Random DeepSeek-V3 expert weights (and routing bias) for `local_experts` of 256."""
    return random_moe_inputs(jax.random.PRNGKey(0), num_tokens=1, hidden_size=H, intermediate_size=I,
                             num_experts=E, local_num_experts=local_experts)


def token_sets(w, t, n_sets=2):
    """`n_sets` argument tuples of fp8_block_scale_moe: fresh logits and hidden states of T
    tokens each, with the weights of `w`."""
    sets = []
    for s in range(n_sets):
        logits = jax.random.normal(jax.random.PRNGKey(100 + s), (t, E), jnp.float32)
        xq, xs = jax_moe.quantize_activations(jax.random.normal(jax.random.PRNGKey(200 + s), (t, H)))
        sets.append((logits, w.routing_bias, xq, xs) + tuple(w[4:]))
    return sets


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[128])
    ap.add_argument("--local-experts", type=int, default=256)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--profile", action="store_true",
                    help="after warm-up, run one call between cudaProfilerStart/Stop (ncu --profile-from-start off)")
    args = ap.parse_args()
    w = deepseek_weights(args.local_experts)
    fn = jax.jit(lambda *a: jax_moe.fp8_block_scale_moe(*a, **KW))
    for t in args.tokens:
        sets = token_sets(w, t)
        if args.profile:
            import torch  # only for cudaProfilerStart/Stop on the primary context JAX shares
            for i in range(3):
                jax.block_until_ready(fn(*sets[i % 2]))
            torch.cuda.init()
            torch.cuda.cudart().cudaProfilerStart()
            jax.block_until_ready(fn(*sets[0]))
            torch.cuda.cudart().cudaProfilerStop()
            continue
        lat = median_time(fn, sets, args.reps)[0]
        dev = device_time(fn, sets, args.reps)
        print(f"probe T={t} E_loc={args.local_experts}: latency {lat * 1e3:.3f} ms, "
              f"device {dev * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
