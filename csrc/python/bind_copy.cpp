// Bindings for the CPU copy engine (csrc/copy/copy.h). Segment arrays are taken
// without copying (uint64, C-contiguous); the copy itself runs without the GIL.
#include <pybind11/numpy.h>

#include "copy/copy.h"
#include "copy/segment_math.h"
#include "registry.h"

namespace py = pybind11;
using kvd::copy::CopyEngine;

namespace {
using U64 = py::array_t<uint64_t, py::array::c_style>;

uint64_t count(const U64& a) { return static_cast<uint64_t>(a.size()); }

void check(kvd::Status st, const char* what) {
  if (st == kvd::Status::kTooLarge)
    throw py::value_error(std::string(what) + ": the segments hold more bytes than the packed buffer size");
  if (!kvd::ok(st)) throw py::value_error(std::string(what) + ": " + kvd::status_name(st));
}
}  // namespace

KVD_BINDINGS(21, copy) {
  py::class_<CopyEngine>(m, "CpuCopyEngine", "Multi-threaded CPU gather/scatter (csrc/copy/copy.h)")
      .def(py::init<unsigned, uint64_t>(), py::arg("threads") = 0, py::arg("min_bytes_per_thread") = 1 << 20)
      .def_property_readonly("threads", &CopyEngine::threads)
      .def("gather", [](CopyEngine& e, const U64& addrs, const U64& sizes, uint64_t dst, uint64_t dst_size) {
        if (addrs.size() != sizes.size()) throw py::value_error("addrs and sizes differ in length");
        kvd::Status st;
        {
          py::gil_scoped_release nogil;
          st = e.gather(addrs.data(), sizes.data(), count(addrs), dst, dst_size);
        }
        check(st, "gather");
      }, py::arg("addrs"), py::arg("sizes"), py::arg("dst"), py::arg("dst_size"))
      .def("scatter", [](CopyEngine& e, const U64& addrs, const U64& sizes, uint64_t src, uint64_t src_size) {
        if (addrs.size() != sizes.size()) throw py::value_error("addrs and sizes differ in length");
        kvd::Status st;
        {
          py::gil_scoped_release nogil;
          st = e.scatter(addrs.data(), sizes.data(), count(addrs), src, src_size);
        }
        check(st, "scatter");
      }, py::arg("addrs"), py::arg("sizes"), py::arg("src"), py::arg("src_size"))
      .def("copy", [](CopyEngine& e, const U64& src, const U64& dst, const U64& sizes) {
        if (src.size() != sizes.size() || dst.size() != sizes.size())
          throw py::value_error("src, dst and sizes differ in length");
        kvd::Status st;
        {
          py::gil_scoped_release nogil;
          st = e.copy(src.data(), dst.data(), sizes.data(), count(sizes));
        }
        check(st, "copy_segments");
      }, py::arg("src"), py::arg("dst"), py::arg("sizes"));

  // The shared index math, exposed so tests check what the device kernels use.
  auto s = m.def_submodule("segmath", "csrc/copy/segment_math.h, for tests");
  s.def("worker_range", [](uint64_t total, uint64_t workers, uint64_t w, uint64_t align) {
    uint64_t b, e;
    kvd::seg::worker_range(total, workers, w, align, &b, &e);
    return py::make_tuple(b, e);
  });
  s.def("locate_segment", [](const U64& prefix, uint64_t off) {
    if (prefix.size() < 2 || off >= prefix.at(prefix.size() - 1)) throw py::value_error("offset past the end");
    return kvd::seg::locate_segment(prefix.data(), count(prefix) - 1, off);
  });
  s.def("chunk_count", &kvd::seg::chunk_count);
}
