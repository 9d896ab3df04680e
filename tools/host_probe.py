"""Is a small workload bound by the host's dispatch? Per call of the jitted fp8_block_scale_moe:
the host's enqueue time (N calls issued back to back, timed before the final sync) against the
steady time per call (`testing.device_time`). When the enqueue time per call is at or above the
steady time, the GPU waits on the host and the kernels are not what sets the figure.

    python tools/host_probe.py --tokens 1 16 --local-experts 256 [--sets 2] [--calls 400]

Run it once per XLA_FLAGS setting (command buffers on / off are process-wide).
"""
import argparse
import os
import time

import jax
import numpy as np

import jax_moe
from jax_moe.testing import device_time
from probe_moe import KW, deepseek_weights, token_sets


def enqueue_time(fn, sets, calls):
    """(enqueue seconds per call, total seconds per call) for `calls` calls, one sync at the end."""
    jax.block_until_ready(fn(*sets[0]))
    t0 = time.perf_counter()
    out = None
    for i in range(calls):
        out = fn(*sets[i % len(sets)])
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    return (t1 - t0) / calls, (t2 - t0) / calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    ap.add_argument("--local-experts", type=int, default=256)
    ap.add_argument("--sets", type=int, default=2)
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    w = deepseek_weights(args.local_experts)
    fn = jax.jit(lambda *a: jax_moe.fp8_block_scale_moe(*a, **KW))
    flags = os.environ.get("XLA_FLAGS", "")
    for t in args.tokens:
        sets = token_sets(w, t, args.sets)
        dev = device_time(fn, sets, 30)
        enq = [enqueue_time(fn, sets, args.calls) for _ in range(3)]
        e, tot = np.median([x[0] for x in enq]), np.median([x[1] for x in enq])
        print(f"T={t} E_loc={args.local_experts} sets={args.sets} XLA_FLAGS='{flags}': steady "
              f"{dev * 1e6:.1f} us/call, host enqueue {e * 1e6:.1f} us/call, "
              f"{args.calls} calls end to end {tot * 1e6:.1f} us/call", flush=True)


if __name__ == "__main__":
    main()
