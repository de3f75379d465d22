// Fused copy + 64-bit checksum for shm pool objects.
//
// Why fused: a put/get must stay near memcpy speed (goal >= 70%), and a
// separate checksum pass over the bytes would read them a second time. The
// kernel loads each 32-byte stripe once, stores it to the destination and
// folds it into the checksum, so the checksum rides on the memory traffic.
//
// Large batches are copied with non-temporal stores: a batch bigger than the
// caches would only evict them, and a plain store first reads the destination
// line (the write costs a read too); memcpy does the same for large copies.
//
// The checksum is a streaming, xxh3-style accumulate written for kvdirect:
// per 32-byte stripe, 4 x 64-bit lanes, acc1 += lo32(x^key) * hi32(x^key),
// acc2 += x, where the lane keys advance every stripe (so moved or swapped
// stripes change the result), then a length-dependent avalanche. Stripe i's
// key is key0 + i * step and the accumulators are sums, so an object can be
// hashed in parts on several threads and the parts merged (part_at, merge). It detects
// torn, stale and bit-flipped data; it is not a cryptographic hash.
// The AVX2 path and the portable path compute identical values.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvd::shm {

class CopyHasher {
 public:
  // stream: store with non-temporal (cache-bypassing) writes where the
  // destination allows it; call copy_fence() before others read the bytes.
  explicit CopyHasher(bool stream = false);
  // A hasher for the part of an object from byte `offset` (a multiple of 32)
  // on: parts hashed apart (on different threads) and merged in object order
  // give exactly the digest of the whole object. part_at(0) == CopyHasher().
  static CopyHasher part_at(uint64_t offset, bool stream = false);
  // Appends the part that follows this one; this part must end where `later`
  // starts, on a 32-byte boundary (else false, and nothing changes).
  bool merge(const CopyHasher& later);
  // Copies n bytes src -> dst and folds them (in object order) into the checksum.
  void copy(void* dst, const void* src, size_t n);
  // Folds n bytes without copying.
  void update(const void* src, size_t n);
  // Checksum of everything fed so far (does not change the state).
  uint64_t digest() const;

 private:
  void stripes(uint8_t* dst, const uint8_t* src, size_t nstripes);  // dst may be null
  alignas(32) uint64_t acc1_[4];
  alignas(32) uint64_t acc2_[4];
  alignas(32) uint64_t key_[4];
  alignas(32) uint8_t buf_[32];
  size_t buffered_ = 0;
  uint64_t start_ = 0;  // object offset this part starts at
  uint64_t total_ = 0;  // bytes fed: the part's end is start_ + total_
  bool stream_ = false;
};

// One-shot checksum of a buffer.
uint64_t checksum64(const void* data, size_t n);
// 64-bit hash of a key (index lookups).
uint64_t key_hash64(const char* p, size_t n);
// Plain copy with the same vector loop (glibc memcpy was measured slower
// for 64-256 KiB pool blocks on AMD EPYC; see bench/bench_shm.py). stream as
// for CopyHasher.
void fast_copy(void* dst, const void* src, size_t n, bool stream = false);
// Orders earlier non-temporal stores before later stores (an sfence).
void copy_fence();
// Which kernel the running CPU uses ("avx2" or "portable").
const char* copy_hash_kernel();

}  // namespace kvd::shm
