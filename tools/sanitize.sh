#!/usr/bin/env bash
# compute-sanitizer (memcheck) over GPU tests, one device call. Every XLA buffer is its own
# cudaMalloc (XLA_PYTHON_CLIENT_ALLOCATOR=platform) so an access past a buffer's end is caught
# instead of landing inside XLA's pooled arena. Usage (after tools/gpu_build.sh):
#   SAN_TESTS=tests/test_gpu_gemm.py SAN_K="small_shapes and bf16" bash tools/sanitize.sh
#   SAN_SCRIPT=tools/sanitize_moe.py bash tools/sanitize.sh   (whole op, reference on the CPU)
set -uo pipefail
out=${OUT:-/tmp}
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
[ -n "$san" ] || { echo "sanitize: compute-sanitizer not found"; exit 1; }
export XLA_PYTHON_CLIENT_ALLOCATOR=${SAN_ALLOCATOR:-platform} XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD
if [ -n "${SAN_SCRIPT:-}" ]; then cmd=(python "$SAN_SCRIPT")
else cmd=(python -m pytest -q -m gpu -p no:cacheprovider ${SAN_TESTS:-tests/test_gpu_gemm.py} -k "${SAN_K:-}"); fi
timeout "${SAN_TIMEOUT:-300}" "$san" --tool memcheck --error-exitcode 99 --print-limit 20 "${cmd[@]}" \
  >"$out/${SAN_LOG:-sanitize}.log" 2>&1
rc=$?
grep -E "ERROR SUMMARY|Invalid|out of bounds|passed|failed|sanitize-moe" "$out/${SAN_LOG:-sanitize}.log" | tail -20
echo "sanitize: exit $rc (99 = memcheck found errors, 124 = timeout)"
