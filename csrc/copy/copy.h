// CPU gather/scatter copy engine.
//
// Contract. Segments are raw (address, length) runs in host-addressable memory
// (a CPU KV pool, a pinned staging buffer, a shm pool object). Three operations:
//   gather : n scattered source segments -> one packed buffer, segment k at
//            dst + prefix[k] (so page i of a uniform [N, S] scatter list lands
//            at dst + i * object_bytes);
//   scatter: the reverse, packed buffer -> n scattered destination segments;
//   copy   : n (src, dst, len) triples.
// The work is split by bytes (seg::worker_range, 4 KiB aligned) over a
// persistent thread pool: a few huge pages and many small ones balance alike,
// and no thread is created per call. Small batches run on the calling thread,
// where waking workers would cost more than it saves. Callers must not overlap
// source and destination ranges. Calls are serialised per engine.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

#include "common/status.h"
#include "common/thread_pool.h"

namespace kvd::copy {

class CopyEngine {
 public:
  // threads = 0: one per hardware thread.
  explicit CopyEngine(unsigned threads = 0, uint64_t min_bytes_per_thread = 1 << 20);
  unsigned threads() const { return pool_.size(); }

  // addrs/sizes: n segments. dst_size/src_size bound the packed side;
  // kTooLarge if the segments need more bytes than that.
  Status gather(const uint64_t* addrs, const uint64_t* sizes, uint64_t n, uint64_t dst, uint64_t dst_size);
  Status scatter(const uint64_t* addrs, const uint64_t* sizes, uint64_t n, uint64_t src, uint64_t src_size);
  Status copy(const uint64_t* src, const uint64_t* dst, const uint64_t* sizes, uint64_t n);

 private:
  enum class Mode { kGather, kScatter, kCopy };
  Status run(Mode mode, const uint64_t* a, const uint64_t* b, const uint64_t* sizes, uint64_t n, uint64_t packed,
             uint64_t packed_size);
  kvd::ThreadPool pool_;
  uint64_t min_per_thread_;
  std::mutex mu_;                 // one batch at a time; prefix_ is reused
  std::vector<uint64_t> prefix_;  // byte prefix of the current batch
};

}  // namespace kvd::copy
