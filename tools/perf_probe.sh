#!/usr/bin/env bash
# One device call: build, the op's latency and device time at a few sizes (with and without
# XLA command buffers), the GEMM tile sweep (tools/tile_sweep.py; TILES="64 128 swap32"), and
# the GPU tests (tools/gpu_suite.sh). Logs under $OUT. (nsys is not on the device image;
# tools/ncu_probe.sh profiles kernels.)
set -uo pipefail
bash tools/gpu_build.sh || exit 1
which ncu; nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv,noheader
export PYTHONPATH=$PWD
G="--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
for t in 1 16 128 8192; do
  python tools/probe_moe.py --tokens $t --reps 30 2>&1 | grep probe
  XLA_FLAGS="$G" python tools/probe_moe.py --tokens $t --reps 30 2>&1 | grep probe | sed 's/^/graphs /'
done
python tools/tile_sweep.py --tiles auto ${TILES:-64 128 swap32} 2>&1 | grep tile-sweep
MAIN=0 bash tools/gpu_suite.sh
