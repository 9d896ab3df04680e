#!/usr/bin/env bash
# Developer build on a GPU machine (the device tool): compiles the extension with CMake into
# build/dev and copies it next to the sources, so `python -m pytest` from the repo root uses it.
# Needs the nvidia-cutlass wheel in .deps/ (git-ignored; carry it). Logs go to $OUT (or /tmp).
set -euo pipefail
log=${OUT:-/tmp}
python -c "import cutlass_library" 2>/dev/null || python -m pip install -q --no-deps .deps/nvidia_cutlass-*.whl
cmake -S . -B build/dev -G Ninja -DJAX_MOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
  -DJAX_MOE_GEMM_EXPERIMENTS=${GEMM_EXPERIMENTS:-OFF} \
  -DPython_EXECUTABLE="$(command -v python)" >"$log/cmake.log" 2>&1 || { tail -30 "$log/cmake.log"; exit 1; }
start=$(date +%s)
if ! cmake --build build/dev -j "$(nproc)" >"$log/build.log" 2>&1; then
  grep -E -A4 "error|Error" "$log/build.log" | head -60; exit 1
fi
echo "build ok in $(( $(date +%s) - start )) s"
cp build/dev/_ffi*.so jax_moe/
