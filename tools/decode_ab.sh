#!/usr/bin/env bash
# One device call (~7 min) for the decode experiments: the decode chain
# ($JAX_MOE_DECODE_CHAIN) and stage PDL ($JAX_MOE_STAGE_PDL): their GPU tests, then device times
# per op with the chain off / auto (in-process arms) under stage PDL on, and again with it off.
# Logs under $OUT (or ./decode_ab_out); the T= lines are printed last. Build first on the CPU
# machine with tools/build_for_device.sh and carry jax_moe/_ffi.cpython-312-x86_64-linux-gnu.so.
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
arms=("JAX_MOE_DECODE_CHAIN=off" "JAX_MOE_DECODE_CHAIN=auto")
tests="decode_chain or stage_pdl" tokens="1 16" limits=(150 110 90)  # seconds per step
[ -n "${QUICK:-}" ] && tests="decode_chain_in_the_op or any_residency or stage_pdl" tokens=1 limits=(150 70 60)
JAX_MOE_STAGE_PDL=on timeout -s KILL ${limits[0]} python -m pytest -x -q tests/test_gpu_moe.py \
  -k "$tests" > "$out/pytest_chain.log" 2>&1
el "pytest chain + stage PDL rc=$?"; tail -3 "$out/pytest_chain.log"
JAX_MOE_STAGE_PDL=on timeout -s KILL ${limits[1]} python tools/kernel_times.py --rounds 3 --tokens $tokens \
  --timeline --arms "${arms[@]}" > "$out/ab_decode.log" 2>&1
el "A/B chain, stage PDL on rc=$?"
JAX_MOE_STAGE_PDL=off timeout -s KILL ${limits[2]} python tools/kernel_times.py --rounds 3 --tokens $tokens \
  --timeline --arms "${arms[@]}" > "$out/ab_decode_pdl_off.log" 2>&1
el "A/B chain, stage PDL off rc=$?"
for f in ab_decode ab_decode_pdl_off; do echo "== $f"; grep -h "^T=" "$out/$f.log"; done
[ -n "${QUICK:-}" ] && exit 0
JAX_MOE_STAGE_PDL=on timeout -s KILL 70 python -m pytest -x -q tests/test_gpu_stages.py tests/test_gpu_moe.py \
  -k "finalize or plan_permute or cuda_graph or no_dense" > "$out/pytest_pdl.log" 2>&1
el "pytest stages under stage PDL rc=$?"; tail -3 "$out/pytest_pdl.log"
JAX_MOE_STAGE_PDL=on timeout -s KILL 50 python tools/kernel_times.py --rounds 3 --tokens 64 \
  --local-experts 32 --arms "${arms[@]}" > "$out/ab_ep64.log" 2>&1
el "A/B chain EP T=64 rc=$?"
echo "== ab_ep64"; grep -h "^T=" "$out/ab_ep64.log"
