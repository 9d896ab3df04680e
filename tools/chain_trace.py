"""Where the decode chain's time goes, CTA by CTA (GPU; a diagnostic of the performance issue).

Runs the op with the decode chain on and $JAX_MOE_CHAIN_TRACE=1 in a child process: every CTA
of every chain launch prints, per tile, when its math warpgroups received the tile, when the
tile's first stage of data arrived and when its epilogue was done (%globaltimer, ns). Here the
lines are grouped into calls and summarized per call: the CTAs' start spread, GEMM1's tile ends,
GEMM2 tiles' wait for their data (the GEMM1 -> GEMM2 seam), the CTAs' last ends (the tail), and
how many CTAs compute over time.

    python tools/chain_trace.py [--tokens 1] [--calls 5] [--local-experts 256]
"""
import argparse
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np


def child(args):
    os.environ["JAX_MOE_DECODE_CHAIN"] = "auto"
    os.environ["JAX_MOE_CHAIN_TRACE"] = "1"
    import jax
    import jax_moe
    from probe_moe import KW, deepseek_weights, token_sets
    w = deepseek_weights(args.local_experts)
    sets = token_sets(w, args.tokens, 2)
    f = jax.jit(lambda *a: jax_moe.fp8_block_scale_moe(*a, **KW))
    jax.block_until_ready(f(*sets[0]))
    for i in range(args.calls):  # back to back, as in a model
        out = f(*sets[i % len(sets)])
    jax.block_until_ready(out)


def parse(text):
    recs = []
    for line in text.splitlines():
        if not line.startswith("chain_trace "):
            continue
        f = line.split()
        kv = dict(zip(f[1::2], f[2::2]))
        recs.append({k: int(v) for k, v in kv.items()})
    return recs


def calls_of(recs, gap_ns=40_000):
    """Records grouped by launch: the CTAs of one launch start within a few us of each other."""
    starts = sorted({r["start"] for r in recs})
    groups, cur = [], [starts[0]] if starts else []
    for s in starts[1:]:
        if s - cur[-1] > gap_ns:
            groups.append(cur)
            cur = []
        cur.append(s)
    if cur:
        groups.append(cur)
    out = []
    for g in groups:
        lo, hi = g[0], g[-1]
        out.append([r for r in recs if lo <= r["start"] <= hi])
    return out


def q(v):
    v = np.asarray(v, float)
    return f"min {v.min():6.1f} med {np.median(v):6.1f} max {v.max():6.1f}" if len(v) else "-"


def summarize(call):
    base = min(r["start"] for r in call)
    us = lambda ns: (ns - base) / 1e3
    ctas = defaultdict(list)
    for r in call:
        ctas[r["cta"]].append(r)
    g1 = [r for r in call if not r["gemm2"]]
    g2 = [r for r in call if r["gemm2"]]
    print(f"  CTAs {len(ctas)}, tiles GEMM1 {len(g1)} GEMM2 {len(g2)}")
    print(f"  CTA start (us)              {q([us(r['start']) for r in call])}")
    print(f"  GEMM1 first data            {q([us(r['first']) for r in g1])}")
    print(f"  GEMM1 done                  {q([us(r['done']) for r in g1])}")
    print(f"  GEMM1 tile (first -> done)  {q([(r['done'] - r['first']) / 1e3 for r in g1])}")
    if g2:
        print(f"  GEMM2 received              {q([us(r['received']) for r in g2])}")
        print(f"  GEMM2 wait (received->data) {q([(r['first'] - r['received']) / 1e3 for r in g2])}")
        print(f"  GEMM2 tile (first -> done)  {q([(r['done'] - r['first']) / 1e3 for r in g2])}")
    last = [us(max(r["done"] for r in rs)) for rs in ctas.values()]
    print(f"  CTA last done (the tail)    {q(last)}")
    idle = []  # per CTA: time without a tile's data flowing, from its start to the call's end
    end = max(r["done"] for r in call)
    for rs in ctas.values():
        busy = sum(r["done"] - r["first"] for r in rs)
        idle.append((end - rs[0]["start"] - busy) / 1e3)
    print(f"  CTA idle to the call's end  {q(idle)}")
    edges = np.arange(0.0, us(end) + 5.0, 5.0)
    active = [sum(1 for r in call if us(r["first"]) < e + 5.0 and us(r["done"]) > e) for e in edges]
    print("  CTAs computing a tile at some point of each 5 us, from the first start:")
    print("   " + " ".join(f"{int(e):d}:{a}" for e, a in zip(edges, active)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--local-experts", type=int, default=256)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    p = subprocess.run([sys.executable, __file__, "--child", "--tokens", str(args.tokens), "--calls",
                        str(args.calls), "--local-experts", str(args.local_experts)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr[-3000:])
        sys.exit(p.returncode)
    calls = calls_of(parse(p.stdout))
    print(f"T={args.tokens} E_loc={args.local_experts}: {len(calls)} chain launches traced "
          f"(the first is the warm-up)")
    for i, call in enumerate(calls[-2:]):
        print(f"launch {len(calls) - 2 + i}:")
        summarize(call)


if __name__ == "__main__":
    main()
