// SHA-256 (FIPS 180-4), self-contained so the wheel needs no OpenSSL.
//
// Two compression kernels: x86 SHA extensions (SHA-NI), compiled with a
// function-level target attribute so the rest of the build stays generic and
// chosen at run time via cpuid, and a portable C++ fallback. Both produce the
// same bytes; tests check each against hashlib.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvd::sha256 {

constexpr size_t kDigestBytes = 32;
constexpr size_t kBlockBytes = 64;

// Compresses `nblocks` consecutive 64-byte blocks into `state` (8 words).
using CompressFn = void (*)(uint32_t state[8], const uint8_t* blocks, size_t nblocks);

// Kernel selection. "auto" (default: SHA-NI when the CPU has it, else
// portable), "shani" or "portable". The environment variable KVDIRECT_SHA256
// sets the initial choice. Returns false (and changes nothing) when the
// requested kernel is unknown or unsupported on this CPU. Not thread-safe
// against concurrent hashing: call at start-up or in tests only.
bool select_kernel(const char* name);
const char* kernel_name();   // "shani" or "portable": the kernel in use
bool cpu_has_shani();

// Incremental hasher. Small and copyable; no heap.
class Hasher {
 public:
  Hasher() { reset(); }
  void reset();
  void update(const void* data, size_t len);
  void finish(uint8_t out[kDigestBytes]);  // the hasher must be reset() before reuse

 private:
  uint32_t h_[8];
  uint64_t total_ = 0;      // bytes fed so far
  uint8_t buf_[kBlockBytes];
  size_t buf_len_ = 0;
};

// Chained digests, the page-key hot path:
//   out[i] = SHA256(prev_i || data[i*stride : i*stride + len])
// with prev_0 = prior32 (nothing when null) and prev_i = out[i-1]. The SHA-NI
// kernel keeps the previous digest in registers as the next message's first
// eight words, so no bytes round-trip through memory between pages.
void chain(const uint8_t* prior32, const uint8_t* data, size_t len, size_t stride, size_t n,
           uint8_t* out);

// One-shot digest of a single buffer.
void digest(const void* data, size_t len, uint8_t out[kDigestBytes]);

}  // namespace kvd::sha256
