#!/usr/bin/env bash
# One device call: build, the op's latency and device time at a few sizes (with and without
# XLA command buffers), a GEMM tile sweep (TILES="64 128 swap32"), and the GPU tests. Logs under
# $OUT. (nsys is not on the device image; tools/ncu_probe.sh profiles kernels.)
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
for tile in ${TILES:-64 128 swap32}; do
  JAX_MOE_GEMM_TILE=$tile python tools/probe_moe.py --tokens 16 128 2048 8192 --reps 20 2>&1 | grep probe | sed "s/^/tile$tile /"
  JAX_MOE_GEMM_TILE=$tile python tools/probe_moe.py --local-experts 32 --tokens 512 4096 16384 --reps 20 2>&1 | grep probe | sed "s/^/tile$tile /"
done
timeout 420 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_gemm.py tests/test_gpu_stages.py tests/test_gpu_moe.py > $out/tests.log 2>&1
grep -E "^(FAILED|ERROR)" $out/tests.log | head; tail -1 $out/tests.log
