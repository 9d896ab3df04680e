#!/usr/bin/env bash
# One device call (~7 min) for the decode chain's open experiment, $JAX_MOE_CHAIN_WAIT=kblock
# (GEMM2's K blocks each waiting for the one GEMM1 tile they read, instead of for the whole
# expert): the chain's GPU tests (the same bits with each wait and grid), the chain's per-CTA
# trace at T=1 with each wait, then device times per op in-process with the pairs, the chain
# waiting per expert (the default) and per K block, at decode and EP sizes. Logs under $OUT
# (or ./decode_ab_out); the T= lines are printed last. Build first on the CPU machine with
# tools/build_for_device.sh and carry jax_moe/_ffi.cpython-312-x86_64-linux-gnu.so.
#   bash tools/decode_ab.sh       (QUICK=1: fewer tests and T=1 only, ~4 min)
set -u
cd "$(dirname "$0")/.."
out=${OUT:-decode_ab_out}
mkdir -p "$out"
export PYTHONPATH=$PWD:$PWD/tools:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
arms=("JAX_MOE_DECODE_CHAIN=off" "JAX_MOE_CHAIN_WAIT=expert" "JAX_MOE_CHAIN_WAIT=kblock")
tests="decode_chain" tokens="1 16" limits=(150 110 90)  # seconds per step
[ -n "${QUICK:-}" ] && tests="decode_chain_in_the_op or any_residency" tokens=1 limits=(120 60 0)
timeout -s KILL ${limits[0]} python -m pytest -x -q -p no:cacheprovider tests/test_gpu_moe.py \
  -k "$tests" > "$out/pytest_chain.log" 2>&1
el "pytest chain rc=$?"; grep -E "^(FAILED|ERROR)" "$out/pytest_chain.log" | head -5; tail -1 "$out/pytest_chain.log"
for wait in expert kblock; do
  JAX_MOE_CHAIN_WAIT=$wait timeout -s KILL 40 python tools/chain_trace.py --tokens 1 > "$out/trace_$wait.log" 2>&1
  el "chain trace T=1, wait per $wait rc=$?"; tail -12 "$out/trace_$wait.log" | head -9
done
timeout -s KILL ${limits[1]} python tools/kernel_times.py --rounds 4 --tokens $tokens \
  --timeline --arms "${arms[@]}" > "$out/ab_decode.log" 2>&1
el "A/B decode rc=$?"
if [ "${limits[2]}" -gt 0 ]; then
  timeout -s KILL ${limits[2]} python tools/kernel_times.py --rounds 4 --tokens 64 512 \
    --local-experts 32 --arms "${arms[@]}" > "$out/ab_ep.log" 2>&1
  el "A/B EP rc=$?"
fi
grep -h "^T=" "$out"/ab_*.log | sed 's/, CUPTI.*busy/ busy/; s/(sets 2)//; s/JAX_MOE_//g'
