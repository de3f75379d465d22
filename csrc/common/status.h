// Status codes shared by the C++ components. C++ returns codes internally;
// the Python layer turns them into clear exceptions at the boundary.
#pragma once

#include <cstdint>

namespace kvd {

enum class Status : int32_t {
  kOk = 0,
  kNotFound = 1,         // key or page absent: a miss, never an error for callers
  kInvalidArgument = 2,  // caller bug: bad size, alignment, range
  kNoSpace = 3,          // pool full and nothing evictable
  kCorrupt = 4,          // checksum or header mismatch: treat as a miss
  kBusy = 5,             // pinned / in use; retry later
  kTimeout = 6,
  kUnavailable = 7,      // store or service down
  kIoError = 8,
  kTooLarge = 9,         // object or key exceeds a bound
};

const char* status_name(Status s);

inline bool ok(Status s) { return s == Status::kOk; }

}  // namespace kvd
