// Helpers shared by the C++ microbenchmarks in bench/ (header only: not a
// benchmark of its own). Every microbenchmark prints "name value" lines and
// measures its baseline in the same run, interleaved with what it measures,
// so a busy machine skews both alike.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace micro {

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Seconds per call of f: the median of `reps` timed calls.
template <class F>
double time_median(F&& f, int reps) {
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_s();
    f();
    t.push_back(now_s() - t0);
  }
  return median(t);
}

// Page-aligned buffer, every page touched (no page faults inside a timing).
struct Buffer {
  explicit Buffer(size_t n, uint8_t fill = 0) : size(n) {
    void* p = nullptr;
    if (posix_memalign(&p, 4096, n ? n : 1) != 0) std::abort();
    data = static_cast<uint8_t*>(p);
    std::memset(data, fill, n);
  }
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  uint8_t* data;
  size_t size;
};

// The baseline: one thread of glibc memcpy over n contiguous bytes.
struct MemcpyBaseline {
  MemcpyBaseline(size_t n) : src(n, 1), dst(n, 0) {}
  double seconds() {
    const double t0 = now_s();
    std::memcpy(dst.data, src.data, src.size);
    const double t = now_s() - t0;
    samples.push_back(t);
    return t;
  }
  double median_seconds() const { return median(samples); }
  Buffer src, dst;
  std::vector<double> samples;
};

inline void print(const char* name, double v) { std::printf("%s %.4f\n", name, v); }

}  // namespace micro
