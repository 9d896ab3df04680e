"""Benchmark of jax_moe on the DeepSeek-V3 MoE workloads of SPEC section 7.

    python benchmarks/bench_moe.py [--workloads decode,ep,prefill] [--reps 30] [--json out.json]

In one run: measures the two ceilings (dense FP8 GEMM rate of cuBLAS with per-tensor scales,
device-to-device copy bandwidth; beside them, for information, cuBLAS's rate with the op's own
blockwise scales, column 'blk'), then for each workload the device time of the jitted op
(`testing.device_time`: calls enqueued back to back over rotating input sets, per call in steady
state -- batches of reps and 2 x reps calls, the difference over reps, so the fixed cost of each
batch's first dispatch and final sync cancels -- median of 5 such pairs; the plain batch figure,
that fixed cost spread over reps calls, is kept in the JSON as batch_ms) and the latency of one synchronized call (`testing.median_time`), GEMM TFLOP/s, weight GB/s, roofline fraction, speed-up over the pure-JAX path
(where it fits), and a per-stage breakdown. Prints a table; writes JSON and, with matplotlib, a PNG.
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_moe
from jax_moe import api, ops, reference
from jax_moe.testing import device_time, median_time, random_moe_inputs

H, I, E, K, N_GROUP, TOPK_GROUP, RSF = 7168, 2048, 256, 8, 8, 4, 2.5
WORKLOADS = {  # name: (T, local experts)
    "decode": [(1, 256), (16, 256), (128, 256)],
    "ep": [(64, 32), (512, 32), (4096, 32), (16384, 32)],
    "prefill": [(2048, 256), (8192, 256)],
}
ROUTE_KW = dict(top_k=K, n_group=N_GROUP, topk_group=TOPK_GROUP, routed_scaling_factor=RSF,
                routing_method_type=jax_moe.RoutingMethodType.DeepSeekV3)


def ceilings(reps):
    """The two ceilings, each timed two ways: "burst", one synchronized call at a time (CUDA
    events; the GPU idles between calls), and "steady", calls enqueued back to back and timed
    like the op (`testing.device_time`), where a compute-bound kernel runs at the clock the
    700 W power cap allows (H100, seventeenth session: cuBLAS FP8 1404 TFLOP/s over 20 calls,
    1229 over a second). -> {"gemm_burst", "copy_burst", "gemm_steady", "copy_steady"} in
    FLOP/s and bytes/s, and how they were measured (torch's cuBLAS when present, else XLA)."""
    def measure(fns, burst, sync):  # fns: name -> (call, FLOPs or bytes of one call)
        out = {}
        for name, (fn, work) in fns.items():
            out[name + "_burst"] = work / burst(fn)
            out[name + "_steady"] = work / device_time(fn, [()], reps, sync=sync)
        return out

    n = 8192
    try:
        import torch
        if not torch.cuda.is_available():
            raise ImportError
        a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        src = torch.randint(0, 255, (1 << 31,), dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)

        def burst(fn):
            for _ in range(3):
                fn()
            ts = []
            for _ in range(reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(); fn(); e.record(); torch.cuda.synchronize()
                ts.append(s.elapsed_time(e) / 1e3)
            return float(np.median(ts))

        fns = {"gemm": (lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one,
                                                 out_dtype=torch.bfloat16), 2.0 * n ** 3),
               "copy": (lambda: dst.copy_(src), 2.0 * src.numel())}
        blockwise = blockwise_gemm(torch, a, b)
        if blockwise is not None:
            fns["gemm_blockwise"] = (blockwise, 2.0 * n ** 3)
        out = measure(fns, burst, lambda _: torch.cuda.synchronize())
        del a, b, src, dst
        torch.cuda.empty_cache()
        return out, "torch (cuBLAS _scaled_mm, copy_)"
    except ImportError:
        a = jax.random.normal(jax.random.PRNGKey(1), (n, n)).astype(jnp.float8_e4m3fn)
        b = jax.random.normal(jax.random.PRNGKey(2), (n, n)).astype(jnp.float8_e4m3fn)
        mm = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                      preferred_element_type=jnp.bfloat16))
        x = jax.random.randint(jax.random.PRNGKey(3), (1 << 29,), 0, 1 << 30, jnp.int32)
        cp = jax.jit(lambda x: x + 1)
        out = measure({"gemm": (lambda: mm(a, b), 2.0 * n ** 3), "copy": (lambda: cp(x), 2.0 * x.nbytes)},
                      lambda fn: median_time(fn, [()], reps)[0], jax.block_until_ready)
        return out, "XLA (fp8 dot, elementwise copy)"


def blockwise_gemm(torch, a, b):
    """cuBLAS's FP8 GEMM with the op's own scaling (1 x 128 activation blocks, 128 x 128 weight
    blocks) on the ceiling's operands, when this torch has it (F.scaled_mm, torch >= 2.10);
    else None. Informational: SPEC's roofline uses the per-tensor rate."""
    F = torch.nn.functional
    if not (hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        return None
    m, k = a.shape
    n = b.shape[1]
    a_scale = (torch.rand(k // 128, m, device="cuda") * 0.01 + 1e-3).t()  # M-major, as cuBLAS wants
    b_scale = (torch.rand(n // 128, k // 128, device="cuda") * 0.01 + 1e-3).t()
    call = lambda: F.scaled_mm(a, b, a_scale, F.ScalingType.BlockWise1x128, b_scale,  # noqa: E731
                               F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
    try:
        call()
    except RuntimeError:  # a cuBLAS without blockwise FP8 on this GPU
        return None
    return call


def stage_times(inp, e_loc, reps, tokens):
    """Per-stage device times, each stage jitted alone on the outputs of the previous one.
    Every array is an argument (a closed-over weight would be baked into the executable)."""
    logits, bias, xq, xs = tokens
    w1, w1s, w2, w2s = inp.gemm1_weights, inp.gemm1_weights_scale, inp.gemm2_weights, inp.gemm2_weights_scale
    route = jax.jit(lambda l, b: api._route(l, b, K, jax_moe.RoutingMethodType.DeepSeekV3, N_GROUP,
                                            TOPK_GROUP, RSF, True, False))
    ids, w = route(logits, bias)
    plan_fn = jax.jit(lambda ids: ops.plan(ids, e_loc, expert_offset=0, num_experts=E))
    p = plan_fn(ids)
    perm = jax.jit(lambda x, s, p: ops.permute(x, s, p, K))
    rows, rs = perm(xq, xs, p)
    rpg = api.expected_rows_per_expert(logits.shape[0], K, E)  # the op's tile, not M/G of the slice
    gemm1 = jax.jit(lambda r, s, w, ws, p: ops.grouped_gemm(  # split, as the op above 64 rows
        r, s, w, ws, p, out_dtype=reference.G_DTYPE, rows_per_group=rpg))
    g = gemm1(rows, rs, w1, w1s, p)
    aq = jax.jit(lambda g, p: ops.act_quant(g, p, jax_moe.ActivationType.Swiglu))
    q, qs = aq(g, p)
    gemm2 = jax.jit(lambda r, s, w, ws, p: ops.grouped_gemm(r, s, w, ws, p, rows_per_group=rpg,
                                                            gemm2=True))
    y = gemm2(q, qs, w2, w2s, p)
    fin = jax.jit(lambda y, p, w: ops.finalize(y, p, w))
    res = {}
    for name, fn, args in (("route", route, (logits, bias)), ("plan", plan_fn, (ids,)),
                           ("permute", perm, (xq, xs, p)), ("gemm1", gemm1, (rows, rs, w1, w1s, p)),
                           ("act_quant", aq, (g, p)), ("gemm2", gemm2, (q, qs, w2, w2s, p)),
                           ("finalize", fin, (y, p, w))):
        res[name] = device_time(fn, [args], reps)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="decode,ep,prefill")
    ap.add_argument("--reps", type=int, default=30, help="calls per timing (>= 20 for the record)")
    ap.add_argument("--sets", type=int, default=4, help="rotating token-input sets")
    ap.add_argument("--xla-max-rows", type=int, default=4096,
                    help="measure the pure-JAX path only up to this many routed rows")
    ap.add_argument("--no-stages", action="store_true")
    ap.add_argument("--ceilings", choices=("burst", "steady"), default="burst",
                    help="the pair the roofline fraction uses: one synchronized call at a time "
                         "(burst: the yardstick of the performance issue and of every recorded "
                         "run) or calls back to back, timed like the op (steady); the table and "
                         "JSON give the fraction on the other pair too")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_moe.json"))
    ap.add_argument("--png", default=os.path.join(os.environ.get("OUT", "."), "bench_moe.png"))
    args = ap.parse_args()

    ok, why = jax_moe.cuda_status()
    print(f"device: {jax.devices()[0].device_kind}; CUDA path: {ok} ({why})", flush=True)
    ceil, how = ceilings(args.reps)
    flops_peak, copy_bw = ceil[f"gemm_{args.ceilings}"], ceil[f"copy_{args.ceilings}"]
    other = "steady" if args.ceilings == "burst" else "burst"
    print(f"ceilings ({how}): FP8 GEMM {ceil['gemm_steady'] / 1e12:.0f} TFLOP/s steady, "
          f"{ceil['gemm_burst'] / 1e12:.0f} burst; copy {ceil['copy_steady'] / 1e12:.2f} TB/s steady, "
          f"{ceil['copy_burst'] / 1e12:.2f} burst; the roofline uses the {args.ceilings} pair", flush=True)
    blockwise_peak = ceil.get(f"gemm_blockwise_{args.ceilings}")
    if blockwise_peak:
        print(f"cuBLAS FP8 GEMM with the op's blockwise scales (1x128, 128x128), same operands: "
              f"{ceil['gemm_blockwise_steady'] / 1e12:.0f} TFLOP/s steady, "
              f"{ceil['gemm_blockwise_burst'] / 1e12:.0f} burst (column 'blk': the fraction "
              f"with it in place of the per-tensor rate)", flush=True)

    weights = {}
    results = []
    for group in args.workloads.split(","):
        for t, e_loc in WORKLOADS[group]:
            if e_loc not in weights:
                weights.clear()
                weights[e_loc] = random_moe_inputs(jax.random.PRNGKey(0), num_tokens=1, hidden_size=H,
                                                   intermediate_size=I, num_experts=E, local_num_experts=e_loc)
            inp = weights[e_loc]
            sets = []
            for s in range(args.sets):
                tok = random_moe_inputs(jax.random.PRNGKey(100 + s), num_tokens=t, hidden_size=128,
                                        intermediate_size=128, num_experts=E, local_num_experts=1)
                x = jax.random.normal(jax.random.PRNGKey(200 + s), (t, H), jnp.float32)
                xq, xs = jax_moe.quantize_activations(x)
                sets.append((tok.routing_logits, inp.routing_bias, xq, xs, inp.gemm1_weights,
                             inp.gemm1_weights_scale, inp.gemm2_weights, inp.gemm2_weights_scale))
            fn = jax.jit(lambda *a: jax_moe.fp8_block_scale_moe(*a, **ROUTE_KW, backend="auto"))
            # device time per call (calls enqueued back to back, as inside a model): the figure
            # the roofline fraction is taken on; and the latency of one synchronized call
            dev, dev_batch = device_time(fn, sets, args.reps, with_batch_time=True)
            lat, p10, p90 = median_time(fn, sets, args.reps)
            ids, _ = jax_moe.route(sets[0][0], inp.routing_bias, **ROUTE_KW)
            ids = np.asarray(ids)
            local = (ids >= 0) & (ids < e_loc)
            rows = int(local.sum())
            hit = len(np.unique(ids[local]))
            flops = rows * 6.0 * H * I
            wbytes = hit * (3 * H * I + 3 * (H // 128) * (I // 128) * 4)
            act_bytes = t * H * (1 + 2)  # tokens in (fp8) and out (bf16): the unavoidable activation bytes
            roof = max(flops / flops_peak, (wbytes + act_bytes) / copy_bw)
            roof_other = max(flops / ceil[f"gemm_{other}"], (wbytes + act_bytes) / ceil[f"copy_{other}"])
            r = dict(workload=group, T=t, local_experts=e_loc, rows=rows, experts_hit=hit,
                     time_ms=dev * 1e3, batch_ms=dev_batch * 1e3, latency_ms=lat * 1e3, latency_p10_ms=p10 * 1e3,
                     latency_p90_ms=p90 * 1e3, tflops=flops / dev / 1e12, weight_gbs=wbytes / dev / 1e9,
                     roofline_ms=roof * 1e3, roofline_fraction=roof / dev,
                     **{f"roofline_fraction_{other}": roof_other / dev})
            if blockwise_peak:
                r["roofline_fraction_blockwise"] = max(
                    flops / blockwise_peak, (wbytes + act_bytes) / copy_bw) / dev
            if rows <= args.xla_max_rows:
                fx = jax.jit(lambda *a: jax_moe.fp8_block_scale_moe(*a, **ROUTE_KW, backend="xla"))
                tx = device_time(fx, sets[:1], max(3, args.reps // 10), batches=1, warmup=1)
                r["xla_ms"] = tx * 1e3
                r["speedup_vs_xla"] = tx / dev
            if ok and not args.no_stages:
                r["stages_ms"] = {k: v * 1e3 for k, v in
                                  stage_times(inp, e_loc, args.reps, sets[0][:4]).items()}
            results.append(r)
            print(json.dumps(r), flush=True)

    summary = dict(device=jax.devices()[0].device_kind, cuda=ok, ceilings_how=how,
                   ceilings_used=args.ceilings, fp8_gemm_tflops=flops_peak / 1e12,
                   copy_tbs=copy_bw / 1e12, ceilings={k: v / 1e12 for k, v in ceil.items()},
                   results=results,
                   date=time.strftime("%Y-%m-%d"))
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=1)
    hdr = f"{'workload':<8} {'T':>6} {'E_loc':>5} {'rows':>7} {'hit':>4} {'ms':>8} {'batch':>7} {'lat ms':>7} {'TFLOP/s':>8} {'wGB/s':>7} {'roof ms':>8} {'frac':>5} {other:>6} {'blk':>5} {'xla x':>7}"
    print(hdr)
    for r in results:
        sp = f"{r['speedup_vs_xla']:.1f}" if "speedup_vs_xla" in r else "-"
        blk = f"{r['roofline_fraction_blockwise']:.2f}" if "roofline_fraction_blockwise" in r else "-"
        print(f"{r['workload']:<8} {r['T']:>6} {r['local_experts']:>5} {r['rows']:>7} {r['experts_hit']:>4} "
              f"{r['time_ms']:>8.3f} {r['batch_ms']:>7.3f} {r['latency_ms']:>7.3f} {r['tflops']:>8.1f} {r['weight_gbs']:>7.0f} {r['roofline_ms']:>8.3f} "
              f"{r['roofline_fraction']:>5.2f} {r['roofline_fraction_' + other]:>6.2f} {blk:>5} {sp:>7}")
    for r in results:
        if "stages_ms" in r:
            print(f"stages T={r['T']} E_loc={r['local_experts']}: " +
                  " ".join(f"{k}={v:.3f}" for k, v in r["stages_ms"].items()))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 3.5))
        labels = [f"{r['workload']}\nT={r['T']}" for r in results]
        ax.bar(labels, [r["roofline_fraction"] for r in results])
        ax.axhline(0.9, color="red", linestyle="--", label="0.90 target")
        ax.set_ylabel("roofline fraction")
        ax.set_title(f"jax_moe fp8_block_scale_moe, DeepSeek-V3 shapes, {summary['device']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
