// The Python module `jax_moe._ffi`: hands the XLA FFI handler capsules to Python and says
// how it was built. Kernel files register their handlers themselves (registry.h).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "registry.h"

namespace nb = nanobind;

#ifndef JAX_MOE_WITH_CUDA
#define JAX_MOE_WITH_CUDA 0
#endif
#ifndef JAX_MOE_CUDA_ARCHS
#define JAX_MOE_CUDA_ARCHS ""
#endif

NB_MODULE(_ffi, m) {
  m.attr("built_with_cuda") = bool(JAX_MOE_WITH_CUDA);
  m.attr("cuda_archs") = JAX_MOE_CUDA_ARCHS;
  m.attr("jaxlib_build_version") = JAXLIB_BUILD_VERSION;
  m.def("registrations", []() {
    nb::dict targets;
    for (const auto& [name, fn] : jax_moe::ffi_targets()) {
      targets[nb::str(name.c_str())] = nb::capsule(fn);
    }
    return targets;
  });
}
