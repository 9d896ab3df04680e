#!/usr/bin/env bash
# On a GPU machine (device tool): build in place, run the GPU tests, the main job and, with
# BENCH=1, the benchmark. Full logs under $OUT; a short summary last.
set -uo pipefail
out=${OUT:-/tmp}
bash tools/gpu_build.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
summary=()
for f in ${GPU_TESTS:-tests/test_gpu_gemm.py tests/test_gpu_stages.py tests/test_gpu_moe.py}; do
  name=$(basename "$f" .py)
  start=$(date +%s)
  timeout "${TEST_TIMEOUT:-400}" python -m pytest -q -m gpu -p no:cacheprovider "$f" ${PYTEST_ARGS:-} >"$out/$name.log" 2>&1
  summary+=("$name: $(tail -1 "$out/$name.log") [$(( $(date +%s) - start )) s]")
  grep -E "^(FAILED|ERROR)" "$out/$name.log" | head -15
done
if [ "${MAIN:-1}" = 1 ]; then python -m jax_moe > "$out/main_job.log" 2>&1; tail -8 "$out/main_job.log"; fi
if [ "${BENCH:-0}" = 1 ]; then python benchmarks/bench_moe.py ${BENCH_ARGS:-} > "$out/bench.log" 2>&1; tail -25 "$out/bench.log"; fi
printf '%s\n' "${summary[@]}"
