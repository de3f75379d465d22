#include "common/status.h"

namespace kvd {

const char* status_name(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kNotFound: return "not_found";
    case Status::kInvalidArgument: return "invalid_argument";
    case Status::kNoSpace: return "no_space";
    case Status::kCorrupt: return "corrupt";
    case Status::kBusy: return "busy";
    case Status::kTimeout: return "timeout";
    case Status::kUnavailable: return "unavailable";
    case Status::kIoError: return "io_error";
    case Status::kTooLarge: return "too_large";
  }
  return "unknown";
}

}  // namespace kvd
