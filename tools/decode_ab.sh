#!/usr/bin/env bash
# One device call (~8 min) for the decode path's launch switches: the GPU tests of the decode
# chain, of PDL and of the one-token route + plan kernel (the same bits with each switch, calls
# back to back), then device times per op in-process with each arm, at decode and EP sizes with
# the T=1 timeline, then the decode rows of the benchmark. Default arms: JAX_MOE_ROUTE_PDL off and
# JAX_MOE_ROUTE_PLAN off (the defaults, the thirty-first session's op) / route PDL only / both /
# both and JAX_MOE_CHAIN_L2_PREFETCH=on.
# Logs under $OUT (or ./decode_ab_out); the T= lines are printed last. Build first on the CPU
# machine with tools/build_for_device.sh and carry jax_moe/_ffi.cpython-312-x86_64-linux-gnu.so.
#   bash tools/decode_ab.sh       (QUICK=1: T=1 only, no bench; ~5 min)
#   ARMS="JAX_MOE_STAGE_PDL=off|" bash tools/decode_ab.sh    (other arms, '|'-separated)
set -u
cd "$(dirname "$0")/.."
out=${OUT:-decode_ab_out}
mkdir -p "$out"
export PYTHONPATH=$PWD:$PWD/tools:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
both="JAX_MOE_ROUTE_PDL=on JAX_MOE_ROUTE_PLAN=auto"
IFS='|' read -r -a arms <<<"${ARMS:-JAX_MOE_ROUTE_PDL=off JAX_MOE_ROUTE_PLAN=off|JAX_MOE_ROUTE_PDL=on JAX_MOE_ROUTE_PLAN=off|$both|$both JAX_MOE_CHAIN_L2_PREFETCH=on}"
tokens="1 16" ep="64 512" limits=(240 130 90 60)  # seconds per step
[ -n "${QUICK:-}" ] && tokens=1 limits=(220 100 0 0)
[ -n "${LIMITS:-}" ] && read -r -a limits <<<"$LIMITS"  # e.g. LIMITS="140 60 0 0"
tests="decode_chain_in_the_op or any_residency or decode_chain_errors or stage_pdl or route_pdl or route_plan or route_groups"
[ -n "${QUICK:-}" ] && tests="any_residency or decode_chain_errors or route_pdl or route_plan or route_groups"
timeout -s KILL ${limits[0]} python -m pytest -q -p no:cacheprovider tests/test_gpu_moe.py tests/test_gpu_stages.py \
  -k "$tests" > "$out/pytest.log" 2>&1
el "pytest rc=$?"; grep -E "^(FAILED|ERROR)" "$out/pytest.log" | head -8; tail -1 "$out/pytest.log"
timeout -s KILL ${limits[1]} python tools/kernel_times.py --rounds 4 --tokens $tokens \
  --timeline --arms "${arms[@]}" > "$out/ab_decode.log" 2>&1
el "A/B decode rc=$?"
if [ "${limits[2]}" -gt 0 ]; then
  timeout -s KILL ${limits[2]} python tools/kernel_times.py --rounds 4 --tokens $ep \
    --local-experts 32 --arms "${arms[@]}" > "$out/ab_ep.log" 2>&1
  el "A/B EP rc=$?"
fi
if [ "${limits[3]}" -gt 0 ]; then
  timeout -s KILL ${limits[3]} python benchmarks/bench_moe.py --reps 20 --sets 2 --workloads decode \
    --xla-max-rows 0 > "$out/bench_decode.log" 2>&1
  el "bench decode rc=$?"; grep -A4 "^workload" "$out/bench_decode.log"
fi
grep -h "^T=" "$out"/ab_*.log | sed 's/, CUPTI.*busy/ busy/; s/(sets 2)//; s/JAX_MOE_//g'
