"""Device-side times of the jitted fp8_block_scale_moe on DeepSeek-V3 workloads, independent of
how fast the host dispatches: CUPTI kernel records (through torch.profiler, which sees every
kernel of the process, JAX's included) give per kernel the median duration, and per op the
busy time (sum of kernel durations) and the span (first kernel start to last kernel end over
N back-to-back calls, divided by N: busy + launch gaps). Also `device_time` (what
benchmarks/bench_moe.py reports), measured *before* any profiling: CUPTI's hooks stay in the
process and slow the host's dispatch afterwards (T=1 168 -> 268 us on an H100 host).

Arms (in-process A/B): each `--arms` entry is a space-separated list of settings applied before
its trace, `ops.NAME=value` or `reference.NAME=value` (an attribute of jax_moe.ops or
jax_moe.reference, value parsed as a Python literal: `reference.G_DTYPE='float32'`) or
`ENV=value` (an empty arm runs the process's own settings: a variable an earlier arm set goes
back first); the arms' device_time rounds alternate so that drift hits them alike.

    python tools/kernel_times.py --tokens 1 --local-experts 256
    python tools/kernel_times.py --tokens 512 --local-experts 32 \\
        --arms "JAX_MOE_GEMM_TILE=own64" "JAX_MOE_GEMM_TILE=swap32"
"""
import argparse
import ast
import os
from collections import defaultdict

import jax
import numpy as np

import jax_moe
from jax_moe import grad, ops, reference
from jax_moe.testing import device_time
from probe_moe import KW, deepseek_weights, token_sets


_MODULES = {"ops": ops, "reference": reference}
_ORIGINAL = {}  # the values before any arm of everything an arm sets: env name or (module, attr)


def apply(arm):
    """Arm settings on top of the process's own: whatever an earlier arm set goes back to its
    original value (an environment variable that was unset, away) unless this arm sets it too."""
    for key, value in _ORIGINAL.items():
        if isinstance(key, tuple):
            setattr(_MODULES[key[0]], key[1], value)
        elif value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    for setting in arm.split():
        name, value = setting.split("=", 1)
        module, _, attr = name.partition(".")
        if attr and module in _MODULES:
            _ORIGINAL.setdefault((module, attr), getattr(_MODULES[module], attr))
            setattr(_MODULES[module], attr, ast.literal_eval(value))
        else:
            _ORIGINAL.setdefault(name, os.environ.get(name))
            os.environ[name] = value


def short_name(name):
    name = name.replace("(anonymous namespace)::", "").replace("void ", "")
    if "GemmUniversal" in name:
        return "cutlass_gemm"
    return name.split("(")[0].split("<")[0].split("::")[-1][:28]


def cupti(fn, sets, calls):
    import torch  # noqa: F401  (torch.profiler needs torch's CUDA side)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = None
        for i in range(calls):
            out = fn(*sets[i % len(sets)])
        jax.block_until_ready(out)
    ks = sorted((e.time_range.start, e.time_range.end, short_name(e.name)) for e in prof.events()
                if e.device_type.name == "CUDA")
    per_kernel = defaultdict(list)
    for a, b, n in ks:
        per_kernel[n].append(b - a)
    return (ks[-1][1] - ks[0][0]) / calls, sum(b - a for a, b, _ in ks) / calls, per_kernel, ks


def op_gaps(ks, calls):
    """Median idle time between consecutive ops: op i+1's first kernel start minus the latest
    kernel end of op i (what steady-state back-to-back calls lose between XLA executions)."""
    per_op = len(ks) // calls
    if per_op * calls != len(ks) or calls < 2:
        return float("nan")
    ops_ = [ks[i * per_op:(i + 1) * per_op] for i in range(calls)]
    return float(np.median([b[0][0] - max(e for _, e, _ in a) for a, b in zip(ops_, ops_[1:])]))


def timeline(ks, calls):
    """Median start / end of each kernel of an op relative to the op's first kernel start, and
    the idle gap before it (the previous kernel's end to its start; negative: overlap)."""
    per_op = len(ks) // calls
    if per_op * calls != len(ks):
        return [f"    (timeline: {len(ks)} kernels are not {calls} ops of equal length)"]
    lines = []
    for j in range(per_op):
        rows = [ks[i * per_op + j] for i in range(1, calls)]  # the first op may carry a ramp
        t0 = [ks[i * per_op][0] for i in range(1, calls)]
        prev_end = [ks[i * per_op + j - 1][1] for i in range(1, calls)] if j else t0
        start = np.median([r[0] - z for r, z in zip(rows, t0)])
        end = np.median([r[1] - z for r, z in zip(rows, t0)])
        gap = np.median([r[0] - e for r, e in zip(rows, prev_end)])
        lines.append(f"    {rows[0][2]:28s} start {start:8.1f}  end {end:8.1f}  gap before {gap:6.1f} us")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    ap.add_argument("--local-experts", type=int, default=256)
    ap.add_argument("--arms", nargs="+", default=[""])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--sets", type=int, default=2, help="rotating token-input sets")
    ap.add_argument("--timeline", action="store_true",
                    help="also each kernel's median start / end within an op and the gap before it")
    args = ap.parse_args()
    w = deepseek_weights(args.local_experts)
    for t in args.tokens:
        sets = token_sets(w, t, args.sets)
        fns = {}
        for arm in args.arms:
            # compiled ahead of time: a plain jitted function would be traced again (under the
            # last arm's settings) once jax.clear_caches() has run for a later arm
            apply(arm)
            jax.clear_caches()
            grad._core.cache_clear()  # its jitted pipeline would keep the first arm's trace
            fns[arm] = jax.jit(lambda *a: jax_moe.fp8_block_scale_moe(*a, **KW)).lower(*sets[0]).compile()
            jax.block_until_ready(fns[arm](*sets[0]))
        dev = {arm: [] for arm in fns}
        for _ in range(args.rounds):
            for arm, f in fns.items():
                apply(arm)  # again: a setting read at each launch ($JAX_MOE_STAGE_PDL) must hold now
                dev[arm].append(device_time(f, sets, 30))
        for arm, f in fns.items():
            apply(arm)
            span, busy, per_kernel, ks = cupti(f, sets, args.calls)
            print(f"T={t} E_loc={args.local_experts} [{arm or 'default'}]: device_time "
                  f"{np.median(dev[arm]) * 1e6:.1f} us, CUPTI span/op {span:.1f} us, busy/op {busy:.1f} us, "
                  f"gap between ops {op_gaps(ks, args.calls):.1f} us (sets {args.sets})",
                  flush=True)
            for name, d in sorted(per_kernel.items(), key=lambda kv: -sum(kv[1])):
                print(f"    {name:28s} {len(d) / args.calls:4.1f}/op  median {np.median(d):7.1f} us")
            if args.timeline:
                print("\n".join(timeline(ks, args.calls)))


if __name__ == "__main__":
    main()
