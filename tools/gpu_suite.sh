#!/usr/bin/env bash
# On a GPU machine (device tool): build in place, run the GPU tests, the main job and, with
# BENCH=1, the benchmark. Full logs under $OUT; a short summary last.
# SHARDS=N runs the test files as N pytest processes at once on the one GPU (each test file's
# collected cases dealt round-robin; no preallocation, so they share its memory), spreading the
# cases' XLA compiles over the host's cores. SHARDS=1 (default): one file after another.
set -uo pipefail
out=${OUT:-/tmp}
# SKIP_BUILD=1: use the jax_moe/_ffi*.so already there (built elsewhere against this jaxlib and carried)
[ "${SKIP_BUILD:-0}" = 1 ] || bash tools/gpu_build.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
files=${GPU_TESTS:-tests/test_gpu_gemm.py tests/test_gpu_stages.py tests/test_gpu_moe.py}
shards=${SHARDS:-1}
summary=()
run_pytest() {  # log name, then pytest arguments
  local name=$1; shift
  local start; start=$(date +%s)
  timeout "${TEST_TIMEOUT:-540}" python -m pytest -q -m gpu -p no:cacheprovider "$@" ${PYTEST_ARGS:-} \
    >"$out/$name.log" 2>&1
  echo "$name: $(tail -1 "$out/$name.log") [$(( $(date +%s) - start )) s]" >"$out/$name.summary"
}
if [ "$shards" = 1 ]; then
  for f in $files; do run_pytest "$(basename "$f" .py)" "$f"; done
else
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  python -m pytest -q -m gpu -p no:cacheprovider --co $files 2>/dev/null | grep "::" >"$out/ids.txt"
  for s in $(seq 0 $(( shards - 1 ))); do
    awk -v n="$shards" -v s="$s" 'NR % n == s' "$out/ids.txt" >"$out/ids_$s.txt"
    run_pytest "shard$s" $(cat "$out/ids_$s.txt") &
  done
  wait
  echo "collected: $(wc -l <"$out/ids.txt") GPU test cases in $shards shards"
fi
for f in "$out"/*.summary; do
  summary+=("$(cat "$f")")
  grep -E "^(FAILED|ERROR)" "${f%.summary}.log" | head -15
done
if [ "${MAIN:-1}" = 1 ]; then python -m jax_moe > "$out/main_job.log" 2>&1; tail -8 "$out/main_job.log"; fi
if [ "${BENCH:-0}" = 1 ]; then python benchmarks/bench_moe.py ${BENCH_ARGS:-} > "$out/bench.log" 2>&1; tail -25 "$out/bench.log"; fi
printf '%s\n' "${summary[@]}"
