"""The main job: one DeepSeek-V3-shaped FP8 MoE layer on random realistic weights.

    python -m jax_moe                 # full DeepSeek-V3 shape on a GPU, a reduced one on a CPU
    python -m jax_moe --tokens 512 --experts 64 --hidden 2048 --intermediate 512
    python -m jax_moe --bench         # the benchmark suite (benchmarks/bench_moe.py)

Runs `fp8_block_scale_moe` with backend="auto", checks it against the pure-JAX path (on a GPU) or
a float64 NumPy oracle on a sample of tokens (on a CPU), and prints a short table.
"""
import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import api, quant, routing
from ._native import cuda_status
from .enums import RoutingMethodType
from .testing import median_time, random_moe_inputs

DEEPSEEK_V3 = dict(hidden=7168, intermediate=2048, experts=256, top_k=8, n_group=8, topk_group=4,
                   rsf=2.5)
CPU_SHAPE = dict(hidden=1024, intermediate=256, experts=32, tokens=64)


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _oracle(inputs, ids, weights, token_sample, inter):
    """float64 dequantized SPEC section 3 math (no re-quantization) for a few tokens."""
    x = np.asarray(quant.dequantize_activations(inputs.hidden_states, inputs.hidden_states_scale), np.float64)
    ids = np.asarray(ids)
    w = np.asarray(weights.astype(jnp.float32), np.float64)
    out = np.zeros((len(token_sample), x.shape[1]))
    for n, t in enumerate(token_sample):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            w1 = np.asarray(quant.dequantize_weights(inputs.gemm1_weights[e], inputs.gemm1_weights_scale[e]), np.float64)
            w2 = np.asarray(quant.dequantize_weights(inputs.gemm2_weights[e], inputs.gemm2_weights_scale[e]), np.float64)
            g = w1 @ x[t]
            up, gate = g[:inter], g[inter:]
            out[n] += w[t, j] * (w2 @ (gate / (1 + np.exp(-gate)) * up))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jax_moe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, help="T (default 128 on a GPU, 64 on a CPU)")
    ap.add_argument("--hidden", type=int, help="H (default 7168 on a GPU, 1024 on a CPU)")
    ap.add_argument("--intermediate", type=int, help="I (default 2048 on a GPU, 256 on a CPU)")
    ap.add_argument("--experts", type=int, help="E (default 256 on a GPU, 32 on a CPU)")
    ap.add_argument("--top-k", type=int, default=DEEPSEEK_V3["top_k"])
    ap.add_argument("--reps", type=int, default=10, help="timed runs (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench", action="store_true", help="run benchmarks/bench_moe.py instead")
    args, rest = ap.parse_known_args(argv)
    if args.bench:
        from pathlib import Path
        bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_moe.py"
        if not bench.exists():
            sys.exit("--bench needs a source checkout (benchmarks/bench_moe.py)")
        import runpy
        sys.argv = [str(bench)] + rest
        runpy.run_path(str(bench), run_name="__main__")
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")

    on_gpu, why = cuda_status()
    full = on_gpu
    h = args.hidden or (DEEPSEEK_V3["hidden"] if full else CPU_SHAPE["hidden"])
    inter = args.intermediate or (DEEPSEEK_V3["intermediate"] if full else CPU_SHAPE["intermediate"])
    e = args.experts or (DEEPSEEK_V3["experts"] if full else CPU_SHAPE["experts"])
    t = args.tokens if args.tokens is not None else (128 if full else CPU_SHAPE["tokens"])
    n_group = DEEPSEEK_V3["n_group"] if e % DEEPSEEK_V3["n_group"] == 0 else None
    topk_group = DEEPSEEK_V3["topk_group"] if n_group else None
    k = args.top_k
    print(f"jax_moe main job: backend auto -> {'cuda' if on_gpu else 'xla'} ({why})", flush=True)

    t0 = time.perf_counter()
    inputs = random_moe_inputs(jax.random.PRNGKey(args.seed), num_tokens=t, hidden_size=h,
                               intermediate_size=inter, num_experts=e)
    jax.block_until_ready(inputs)
    t_make = time.perf_counter() - t0
    kw = dict(top_k=k, n_group=n_group, topk_group=topk_group,
              routed_scaling_factor=DEEPSEEK_V3["rsf"], routing_method_type=RoutingMethodType.DeepSeekV3)
    run = jax.jit(lambda *a: api.fp8_block_scale_moe(*a, **kw, backend="auto"))
    out = run(*inputs)
    sec = median_time(run, [inputs], args.reps, warmup=1)[0]

    if on_gpu:
        ref = jax.jit(lambda *a: api.fp8_block_scale_moe(*a, **kw, backend="xla"))(*inputs)
        check, err = "pure-JAX path (same rounding)", _rel(out, ref)
        tol = 1e-2
    else:
        ids, weights = routing.route_xla(inputs.routing_logits, inputs.routing_bias, top_k=k,
                                         routing_method_type=RoutingMethodType.DeepSeekV3, n_group=n_group,
                                         topk_group=topk_group, routed_scaling_factor=DEEPSEEK_V3["rsf"])
        sample = list(range(min(t, 8)))
        check, err = f"float64 oracle ({len(sample)} tokens)", _rel(np.asarray(out)[sample], _oracle(inputs, ids, weights, sample, inter))
        tol = 6e-2
    finite = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    flops = 6.0 * h * inter * t * k
    rows = [("shape", f"T={t} H={h} I={inter} E={e} k={k} n_group={n_group} topk_group={topk_group}"),
            ("output", f"{out.shape} {out.dtype}, finite={finite}"),
            ("backend", "cuda" if on_gpu else "xla"),
            ("device", jax.devices()[0].device_kind),
            ("time (median)", f"{sec * 1e3:.3f} ms over {args.reps} runs ({flops / sec / 1e12:.2f} TFLOP/s)"),
            ("inputs made in", f"{t_make:.1f} s"),
            ("error vs " + check, f"{err:.2e} (tolerance {tol:g}) {'OK' if err <= tol and finite else 'FAIL'}")]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{a:<{width}}  {b}" for a, b in rows))
    if not (err <= tol and finite):
        sys.exit(1)


if __name__ == "__main__":
    main()
