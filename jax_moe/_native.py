"""Loads the compiled module, registers its XLA FFI targets, and answers "can CUDA run here"."""
import functools
import os

import jax

import importlib.util

_ffi = None
if importlib.util.find_spec(__package__ + "._ffi") is None:
    _IMPORT_ERROR = "not built"
else:  # the compiled extension is optional: without it every call takes the pure-JAX path
    try:
        from . import _ffi
        _IMPORT_ERROR = None
    except ImportError as e:  # pragma: no cover - depends on the build
        _IMPORT_ERROR = e

SUPPORTED_COMPUTE_CAPABILITIES = {"9.0": "90a", "10.0": "100a"}


@functools.lru_cache(maxsize=None)
def _register():
    for name, capsule in _ffi.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    return tuple(_ffi.registrations())


@functools.lru_cache(maxsize=None)
def cuda_status():
    """(available: bool, reason: str) for the CUDA path on this process's default devices."""
    if os.environ.get("JAX_MOE_DISABLE_CUDA"):
        return False, "disabled by JAX_MOE_DISABLE_CUDA"
    if _ffi is None:
        return False, f"compiled module jax_moe._ffi unavailable ({_IMPORT_ERROR})"
    if not _ffi.built_with_cuda:
        return False, "jax_moe was built without CUDA kernels (no nvcc at build time)"
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        return False, "no GPU visible to JAX"
    import jaxlib
    if jaxlib.__version__ != _ffi.jaxlib_build_version:
        return False, (f"built against jaxlib {_ffi.jaxlib_build_version} but running jaxlib "
                       f"{jaxlib.__version__}: rebuild with `pip install --no-build-isolation .`")
    cc = getattr(gpus[0], "compute_capability", None)
    arch = SUPPORTED_COMPUTE_CAPABILITIES.get(cc)
    if arch is None or arch not in _ffi.cuda_archs.split(";"):
        return False, (f"GPU compute capability {cc} has no kernels in this build "
                       f"(built for {_ffi.cuda_archs})")
    _register()
    return True, f"CUDA kernels for sm_{arch} on {gpus[0].device_kind}"


def cuda_available() -> bool:
    """True when `backend="auto"` runs the CUDA kernels; `cuda_status()` says why not."""
    return cuda_status()[0]


def register_targets():
    """Registers the FFI targets (idempotent); an error explains why the CUDA path is unusable."""
    ok, why = cuda_status()
    if not ok:
        raise RuntimeError(f"jax_moe CUDA custom calls unavailable: {why}")
    return _register()
