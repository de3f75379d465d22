#include "common/status.h"
#include "registry.h"

namespace py = pybind11;

KVD_BINDINGS(0, common) {
  py::enum_<kvd::Status>(m, "Status", "Status codes returned by the C++ core")
      .value("OK", kvd::Status::kOk)
      .value("NOT_FOUND", kvd::Status::kNotFound)
      .value("INVALID_ARGUMENT", kvd::Status::kInvalidArgument)
      .value("NO_SPACE", kvd::Status::kNoSpace)
      .value("CORRUPT", kvd::Status::kCorrupt)
      .value("BUSY", kvd::Status::kBusy)
      .value("TIMEOUT", kvd::Status::kTimeout)
      .value("UNAVAILABLE", kvd::Status::kUnavailable)
      .value("IO_ERROR", kvd::Status::kIoError)
      .value("TOO_LARGE", kvd::Status::kTooLarge);
  m.def("status_name", [](kvd::Status s) { return kvd::status_name(s); });
}
