#!/usr/bin/env bash
# Builds the extension here (any x86-64 machine with nvcc, no GPU needed) for the GPU machine of
# the device tool: Python 3.12 and jaxlib 0.11.2 there, so a Python 3.12 venv with that jaxlib
# here, whose FFI headers the handlers must be compiled against. Leaves
# jax_moe/_ffi.cpython-312-x86_64-linux-gnu.so (git-ignored): carry it and run with
# SKIP_BUILD=1 (tools/gpu_suite.sh) or PYTHONPATH=$PWD, which saves the ~2 minutes of device time
# tools/gpu_build.sh takes there. 2 cores: ~2-4 minutes.
#   bash tools/build_for_device.sh [python3.12] [jaxlib version]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-$HOME/.pyenv/versions/3.12.1/bin/python}
[ -x "$py" ] || py=python3.12  # a pyenv shim named python3.12 may exist and still fail to run
jaxlib=${2:-0.11.2}
venv=${JAX_MOE_DEVICE_VENV:-/tmp/jax_moe_device_venv}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q "jax==$jaxlib" "jaxlib==$jaxlib" nanobind ninja cmake
"$venv/bin/python" -c "import cutlass_library" 2>/dev/null || \
  "$venv/bin/python" -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
cmake -S . -B build/device -G Ninja -DJAX_MOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$venv/bin/python" >/tmp/jax_moe_device_cmake.log
cmake --build build/device -j "$(nproc)"
cp build/device/_ffi.cpython-312-x86_64-linux-gnu.so jax_moe/
echo "built jax_moe/_ffi.cpython-312-x86_64-linux-gnu.so against jaxlib $jaxlib: carry it"
