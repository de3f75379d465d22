// Self-registering binding units.
//
// Each component's bindings live in csrc/python/bind_<component>.cpp and
// register themselves with KVD_BINDINGS(<order>, <name>). module.cpp runs them in
// ascending order when `kvdirect._core` is imported, so components can be added
// without touching a central list. Use a lower order for components whose types
// others' bindings take as default arguments.
#pragma once

#include <pybind11/pybind11.h>

namespace kvd::py {

using BindFn = void (*)(pybind11::module_&);

// Returns a dummy int so registration can initialise a static.
int register_bindings(int order, const char* name, BindFn fn);

// Runs every registered binding function; called once from PYBIND11_MODULE.
void run_bindings(pybind11::module_& m);

}  // namespace kvd::py

#define KVD_BINDINGS(order, name)                                                   \
  static void kvd_bind_##name(pybind11::module_& m);                                \
  [[maybe_unused]] static const int kvd_bind_reg_##name =                           \
      ::kvd::py::register_bindings(order, #name, &kvd_bind_##name);                 \
  static void kvd_bind_##name(pybind11::module_& m)
