#include "registry.h"

namespace jax_moe {

std::vector<std::pair<std::string, HandlerFn>>& ffi_targets() {
  static std::vector<std::pair<std::string, HandlerFn>> targets;
  return targets;
}

}  // namespace jax_moe
