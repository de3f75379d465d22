#include "copy/copy.h"

#include <cstring>

#include "copy/segment_math.h"

namespace kvd::copy {

static unsigned default_threads(unsigned t) { return t ? t : kvd::hardware_threads(); }

CopyEngine::CopyEngine(unsigned threads, uint64_t min_bytes_per_thread)
    : pool_(default_threads(threads)), min_per_thread_(min_bytes_per_thread ? min_bytes_per_thread : 1) {}

Status CopyEngine::gather(const uint64_t* addrs, const uint64_t* sizes, uint64_t n, uint64_t dst, uint64_t dst_size) {
  return run(Mode::kGather, addrs, nullptr, sizes, n, dst, dst_size);
}
Status CopyEngine::scatter(const uint64_t* addrs, const uint64_t* sizes, uint64_t n, uint64_t src, uint64_t src_size) {
  return run(Mode::kScatter, addrs, nullptr, sizes, n, src, src_size);
}
Status CopyEngine::copy(const uint64_t* src, const uint64_t* dst, const uint64_t* sizes, uint64_t n) {
  return run(Mode::kCopy, src, dst, sizes, n, 0, ~uint64_t(0));
}

Status CopyEngine::run(Mode mode, const uint64_t* a, const uint64_t* b, const uint64_t* sizes, uint64_t n,
                       uint64_t packed, uint64_t packed_size) {
  std::lock_guard<std::mutex> g(mu_);
  prefix_.resize(n + 1);
  uint64_t total = 0;
  prefix_[0] = 0;
  for (uint64_t k = 0; k < n; ++k) {
    if (sizes[k] > packed_size - total) return Status::kTooLarge;  // also guards overflow
    total += sizes[k];
    prefix_[k + 1] = total;
  }
  if (total == 0) return Status::kOk;
  const uint64_t* prefix = prefix_.data();
  uint64_t want = seg::ceil_div(total, min_per_thread_);
  unsigned workers = static_cast<unsigned>(want < pool_.size() ? want : pool_.size());
  auto body = [&](unsigned w) {
    uint64_t off, end;
    seg::worker_range(total, workers, w, 4096, &off, &end);
    if (off >= end) return;
    uint64_t k = seg::locate_segment(prefix, n, off);
    while (off < end) {
      const uint64_t in_seg = off - prefix[k];
      const uint64_t len = seg::min_u64(end, prefix[k + 1]) - off;
      char* d;
      const char* s;
      switch (mode) {
        case Mode::kGather:
          d = reinterpret_cast<char*>(packed + off);
          s = reinterpret_cast<const char*>(a[k] + in_seg);
          break;
        case Mode::kScatter:
          d = reinterpret_cast<char*>(a[k] + in_seg);
          s = reinterpret_cast<const char*>(packed + off);
          break;
        default:
          d = reinterpret_cast<char*>(b[k] + in_seg);
          s = reinterpret_cast<const char*>(a[k] + in_seg);
      }
      if (len) std::memcpy(d, s, len);
      off += len;
      ++k;
    }
  };
  pool_.run(workers, body);
  return Status::kOk;
}

}  // namespace kvd::copy
