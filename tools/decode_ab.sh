#!/usr/bin/env bash
# One device call (~6 min) for the decode path's launch-overlap switches: the GPU tests of the
# decode chain and of PDL (the same bits with each switch, calls back to back), then device
# times per op in-process with $JAX_MOE_ROUTE_PDL off and on (the route launched as a PDL
# dependent of the kernel before it, the previous op's finalize letting it start early), at
# decode and EP sizes, with the T=1 timeline. Logs under $OUT (or ./decode_ab_out); the T= lines
# are printed last. Build first on the CPU machine with tools/build_for_device.sh and carry
# jax_moe/_ffi.cpython-312-x86_64-linux-gnu.so.
#   bash tools/decode_ab.sh       (QUICK=1: fewer tests, T=1 and EP T=64 only, ~4 min)
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
IFS='|' read -r -a arms <<<"${ARMS:-JAX_MOE_ROUTE_PDL=off|}"
tests="decode_chain or stage_pdl or route_pdl" tokens="1 16 128" ep="64 512" limits=(200 150 100)  # s per step
[ -n "${QUICK:-}" ] && tests="decode_chain_in_the_op or route_pdl" tokens=1 ep=64 limits=(150 60 50)
timeout -s KILL ${limits[0]} python -m pytest -x -q -p no:cacheprovider tests/test_gpu_moe.py \
  -k "$tests" > "$out/pytest_pdl.log" 2>&1
el "pytest rc=$?"; grep -E "^(FAILED|ERROR)" "$out/pytest_pdl.log" | head -5; tail -1 "$out/pytest_pdl.log"
timeout -s KILL ${limits[1]} python tools/kernel_times.py --rounds 4 --tokens $tokens \
  --timeline --arms "${arms[@]}" > "$out/ab_decode.log" 2>&1
el "A/B decode rc=$?"
timeout -s KILL ${limits[2]} python tools/kernel_times.py --rounds 4 --tokens $ep \
  --local-experts 32 --arms "${arms[@]}" > "$out/ab_ep.log" 2>&1
el "A/B EP rc=$?"
grep -h "^T=" "$out"/ab_*.log | sed 's/, CUPTI.*busy/ busy/; s/(sets 2)//; s/JAX_MOE_//g'
