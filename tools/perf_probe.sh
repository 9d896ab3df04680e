#!/usr/bin/env bash
# One device call: build, kernel-time profiles (nsys) of the op at a few sizes, a tile sweep,
# and the GPU tests. Logs under $OUT.
set -uo pipefail
out=${OUT:-/tmp}
bash tools/gpu_build.sh || exit 1
which ncu; nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv,noheader
export PYTHONPATH=$PWD
G="--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
for t in 1 16 128 8192; do
  python tools/probe_moe.py --tokens $t --reps 30 2>&1 | grep probe
  XLA_FLAGS="$G" python tools/probe_moe.py --tokens $t --reps 30 2>&1 | grep probe | sed 's/^/graphs /'
done
for tile in 64 128; do
  JAX_MOE_GEMM_TILE=$tile python tools/probe_moe.py --tokens 16 128 2048 8192 --reps 20 2>&1 | grep probe | sed "s/^/tile$tile /"
  JAX_MOE_GEMM_TILE=$tile python tools/probe_moe.py --local-experts 32 --tokens 512 4096 16384 --reps 20 2>&1 | grep probe | sed "s/^/tile$tile /"
done
if command -v nsys >/dev/null; then
  for t in 1 128 8192; do
    nsys profile -q -o $out/nsys_t$t -t cuda --force-overwrite true python tools/probe_moe.py --tokens $t --reps 10 >/dev/null 2>&1
    nsys stats -q -r cuda_gpu_kern_sum --format csv $out/nsys_t$t.nsys-rep > $out/kern_t$t.csv 2>/dev/null
    echo "== kernels T=$t"; python - $out/kern_t$t.csv <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for r in rows[:14]:
    print(f"{float(r['Time (%)']):5.1f}% n={r['Instances']:>4} med={float(r['Med (ns)'])/1e3:8.1f}us {r['Name'][:90]}")
PY
  done
fi
timeout 420 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_stages.py tests/test_gpu_moe.py > $out/tests.log 2>&1
grep -E "^(FAILED|ERROR)" $out/tests.log | head; tail -1 $out/tests.log
