// The `kvdirect._core` extension module: build description plus every
// component's self-registered bindings (see registry.h).
#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "common/build_info.h"
#include "registry.h"

namespace py = pybind11;

namespace kvd::py {
namespace {
struct Entry {
  int order;
  std::string name;
  BindFn fn;
};
std::vector<Entry>& entries() {
  static std::vector<Entry> e;  // function-local: safe against static-init order
  return e;
}
}  // namespace

int register_bindings(int order, const char* name, BindFn fn) {
  entries().push_back({order, name, fn});
  return 0;
}

void run_bindings(pybind11::module_& m) {
  auto& e = entries();
  std::sort(e.begin(), e.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.order, a.name) < std::tie(b.order, b.name);
  });
  for (auto& x : e) x.fn(m);
}
}  // namespace kvd::py

PYBIND11_MODULE(_core, m) {
  m.doc() = "kvdirect C++ core: prefix index, page keys, planner, copy engine, shm pool";
  m.attr("__version__") = KVD_VERSION;
  py::dict info;
  info["version"] = KVD_VERSION;
  info["compiler"] = KVD_CXX_COMPILER;
  info["cxx_flags"] = KVD_CXX_FLAGS;
  info["build_type"] = KVD_BUILD_TYPE;
  info["sanitize"] = KVD_SANITIZE;
  info["cpu"] = true;
  info["cuda"] = bool(KVD_HAVE_CUDA);
  info["cuda_compiler"] = KVD_HAVE_CUDA ? KVD_CUDA_COMPILER : "";
  info["cuda_reason"] = KVD_HAVE_CUDA ? "" : KVD_CUDA_REASON;
  info["cuda_archs"] = KVD_HAVE_CUDA ? KVD_CUDA_ARCHS : "";
  info["ascend"] = bool(KVD_HAVE_ASCEND);
  info["cann_version"] = KVD_CANN_VERSION;
  m.attr("build_info") = info;
  kvd::py::run_bindings(m);
}
