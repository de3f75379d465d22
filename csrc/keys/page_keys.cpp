// Chained page hashing; see page_keys.h for the contract.
#include "keys/page_keys.h"

#include <cstring>
#include <memory>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "keys/sha256.h"

namespace kvd::keys {
namespace {

using sha256::Hasher;

inline void hash_page(const uint8_t* prior, bool wide, const void* data, size_t len,
                      uint8_t out[kDigestBytes]) {
  Hasher h;
  if (prior) h.update(prior, kDigestBytes);
  if (wide) {
    // SGLang marks wide pages with an odd byte count so they never collide
    // with 4-byte pages.
    const uint8_t tag = 0xff;
    h.update(&tag, 1);
  }
  h.update(data, len);
  h.finish(out);
}

// First index in [0, n) with a negative value, or n.
template <typename T>
size_t first_negative(const T* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (p[i] < 0) return i;
  return n;
}

template <typename T>
size_t first_above(const T* p, size_t n, uint64_t limit) {
  for (size_t i = 0; i < n; ++i)
    if (static_cast<uint64_t>(p[i]) > limit) return i;
  return n;
}

// Narrows one page of 64-bit tokens into 32-bit words; returns the OR of the
// high halves (zero when every token fits in uint32). Vectorises at -O3.
inline uint64_t narrow(const uint64_t* in, size_t n, uint32_t* out) {
  uint64_t high = 0;
  for (size_t i = 0; i < n; ++i) {
    out[i] = static_cast<uint32_t>(in[i]);
    high |= in[i] >> 32;
  }
  return high;
}

}  // namespace

Status page_digests(const void* tokens, size_t n_tokens, TokenType type, size_t page_size,
                    const uint8_t* prior32, uint8_t* out, bool include_partial,
                    size_t* bad_index) {
  if (page_size == 0) return Status::kInvalidArgument;
  const size_t n_pages = num_pages(n_tokens, page_size, include_partial);
  if (n_pages == 0) return Status::kOk;
  const size_t n_full = n_tokens / page_size;
  auto fail = [&](size_t idx) {
    if (bad_index) *bad_index = idx;
    return Status::kInvalidArgument;
  };
  auto page_len = [&](size_t i) { return i < n_full ? page_size : n_tokens - i * page_size; };

  if (type == TokenType::kInt32 || type == TokenType::kUInt32) {
    // 4-byte tokens hash straight from the caller's buffer.
    const size_t covered = n_pages * page_size < n_tokens ? n_pages * page_size : n_tokens;
    if (type == TokenType::kInt32) {
      // Branch-free OR over the run (vectorises); locate the culprit only on failure.
      const int32_t* t = static_cast<const int32_t*>(tokens);
      int32_t acc = 0;
      for (size_t i = 0; i < covered; ++i) acc |= t[i];
      if (acc < 0) return fail(first_negative(t, covered));
    }
    const uint8_t* p = static_cast<const uint8_t*>(tokens);
    const size_t page_bytes = page_size * 4;
    const size_t chained = n_full < n_pages ? n_full : n_pages;
    sha256::chain(prior32, p, page_bytes, page_bytes, chained, out);
    if (n_pages > n_full)  // the trailing partial page
      sha256::chain(n_full ? out + (n_full - 1) * kDigestBytes : prior32, p + n_full * page_bytes,
                    (n_tokens - n_full * page_size) * 4, 0, 1, out + n_full * kDigestBytes);
    return Status::kOk;
  }

  // 64-bit tokens: narrow a run of pages into a stack buffer, then chain-hash
  // the run; a wide page (SGLang's 8-byte encoding) breaks the run.
  const uint64_t* in = static_cast<const uint64_t*>(tokens);
  constexpr size_t kStackWords = 4096;
  uint32_t stack_buf[kStackWords];
  std::unique_ptr<uint32_t[]> heap_buf;
  uint32_t* words = stack_buf;
  size_t run_cap = kStackWords / page_size;  // pages per run
  if (run_cap == 0) {
    heap_buf.reset(new uint32_t[page_size]);
    words = heap_buf.get();
    run_cap = 1;
  }
  constexpr uint64_t kMaxToken = UINT64_MAX >> 1;  // INT64_MAX; negative int64 lands above
  const uint8_t* prior = prior32;
  size_t run_start = 0, run_len = 0;  // pending narrowed full pages
  auto flush = [&] {
    if (run_len == 0) return;
    sha256::chain(prior, reinterpret_cast<const uint8_t*>(words), page_size * 4, page_size * 4,
                  run_len, out + run_start * kDigestBytes);
    prior = out + (run_start + run_len - 1) * kDigestBytes;
    run_len = 0;
  };
  for (size_t i = 0; i < n_pages; ++i) {
    const size_t start = i * page_size, len = page_len(i);
    const uint64_t* page = in + start;
    if (run_len == 0) run_start = i;
    uint32_t* dst = words + run_len * page_size;
    if (narrow(page, len, dst) == 0) {
      if (len == page_size) {
        if (++run_len == run_cap) flush();
        continue;
      }
      flush();  // partial page: hash it on its own (it is the last one)
      run_start = i;
      sha256::chain(prior, reinterpret_cast<const uint8_t*>(dst), len * 4, 0, 1,
                    out + i * kDigestBytes);
      prior = out + i * kDigestBytes;
      continue;
    }
    // Negative int64 (or uint64 > INT64_MAX) is an error in SGLang; other
    // tokens beyond uint32 make the page wide.
    const size_t bad = first_above(page, len, kMaxToken);
    if (bad != len) return fail(start + bad);
    flush();
    hash_page(prior, true, page, len * 8, out + i * kDigestBytes);
    prior = out + i * kDigestBytes;
  }
  flush();
  return Status::kOk;
}

bool namespace_seed(const std::string_view* extra_key, const std::string_view* cache_salt,
                    uint8_t out[kDigestBytes]) {
  if (!extra_key && !cache_salt) return false;
  static constexpr char kTag[] = "sglang-cache-namespace-v1";
  Hasher h;
  h.update(kTag, sizeof(kTag) - 1);
  for (const std::string_view* part : {extra_key, cache_salt}) {
    if (!part) {
      const uint8_t absent = 0;
      h.update(&absent, 1);
      continue;
    }
    uint8_t head[9];
    head[0] = 1;
    const uint64_t n = part->size();
    for (int b = 0; b < 8; ++b) head[1 + b] = uint8_t(n >> (8 * b));
    h.update(head, sizeof(head));
    h.update(part->data(), part->size());
  }
  h.finish(out);
  return true;
}

namespace {
// Two hex characters per byte value, in output order.
struct HexPairs {
  char pair[256][2];
  constexpr HexPairs() : pair() {
    constexpr char kHex[] = "0123456789abcdef";
    for (int b = 0; b < 256; ++b) {
      pair[b][0] = kHex[b >> 4];
      pair[b][1] = kHex[b & 15];
    }
  }
};
constexpr HexPairs kHexPairs;

#if defined(__x86_64__) && defined(__GNUC__)
// 16 bytes -> 32 hex characters with two table shuffles (every pool key of a
// request is formatted on a miss: 56 x 32 bytes for 3584 tokens).
__attribute__((target("ssse3"))) void to_hex_ssse3(const uint8_t* in, size_t n, char* out) {
  const __m128i table = _mm_setr_epi8('0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'a', 'b', 'c', 'd', 'e', 'f');
  const __m128i low = _mm_set1_epi8(0x0f);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    const __m128i hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(x, 4), low));
    const __m128i lo = _mm_shuffle_epi8(table, _mm_and_si128(x, low));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), _mm_unpacklo_epi8(hi, lo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i + 16), _mm_unpackhi_epi8(hi, lo));
  }
  for (; i < n; ++i) std::memcpy(out + 2 * i, kHexPairs.pair[in[i]], 2);
}
bool have_ssse3() {
  static const bool v = __builtin_cpu_supports("ssse3");
  return v;
}
#endif
}  // namespace

void to_hex(const uint8_t* digests, size_t n, char* out) {
  const size_t bytes = n * kDigestBytes;
#if defined(__x86_64__) && defined(__GNUC__)
  if (have_ssse3()) return to_hex_ssse3(digests, bytes, out);
#endif
  for (size_t i = 0; i < bytes; ++i) std::memcpy(out + 2 * i, kHexPairs.pair[digests[i]], 2);
}

}  // namespace kvd::keys
