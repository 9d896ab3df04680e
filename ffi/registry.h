// A load-time list of the XLA FFI handlers this module exports. Each kernel file registers
// its own targets with JAX_MOE_REGISTER_TARGET, so module.cc needs to know none of them.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace jax_moe {

using HandlerFn = void*;  // an XLA_FFI_Handler*, kept opaque here

std::vector<std::pair<std::string, HandlerFn>>& ffi_targets();

struct RegisterTarget {
  RegisterTarget(const char* name, HandlerFn fn) { ffi_targets().emplace_back(name, fn); }
};

}  // namespace jax_moe

#define JAX_MOE_CONCAT_INNER(a, b) a##b
#define JAX_MOE_CONCAT(a, b) JAX_MOE_CONCAT_INNER(a, b)
// JAX_MOE_REGISTER_TARGET("jax_moe_route", RouteHandler);  (at namespace scope, once per target)
#define JAX_MOE_REGISTER_TARGET(name, handler)                                \
  static ::jax_moe::RegisterTarget JAX_MOE_CONCAT(jax_moe_register_, __LINE__)( \
      name, reinterpret_cast<void*>(handler))
