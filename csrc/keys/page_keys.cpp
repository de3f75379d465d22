// Chained page hashing; see page_keys.h for the contract.
#include "keys/page_keys.h"

#include <cstring>
#include <memory>

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
  const uint8_t* prior = prior32;
  auto fail = [&](size_t idx) {
    if (bad_index) *bad_index = idx;
    return Status::kInvalidArgument;
  };

  if (type == TokenType::kInt32 || type == TokenType::kUInt32) {
    // 4-byte tokens hash straight from the caller's buffer.
    const size_t covered = n_pages * page_size < n_tokens ? n_pages * page_size : n_tokens;
    if (type == TokenType::kInt32) {
      const size_t bad = first_negative(static_cast<const int32_t*>(tokens), covered);
      if (bad != covered) return fail(bad);
    }
    const uint8_t* p = static_cast<const uint8_t*>(tokens);
    for (size_t i = 0; i < n_pages; ++i) {
      const size_t start = i * page_size;
      const size_t len = (n_tokens - start < page_size ? n_tokens - start : page_size);
      hash_page(prior, false, p + start * 4, len * 4, out + i * kDigestBytes);
      prior = out + i * kDigestBytes;
    }
    return Status::kOk;
  }

  // 64-bit tokens: narrow page by page into a small buffer.
  const uint64_t* in = static_cast<const uint64_t*>(tokens);
  constexpr size_t kStackWords = 4096;
  uint32_t stack_buf[kStackWords];
  std::unique_ptr<uint32_t[]> heap_buf;
  uint32_t* words = stack_buf;
  if (page_size > kStackWords) {
    heap_buf.reset(new uint32_t[page_size]);
    words = heap_buf.get();
  }
  constexpr uint64_t kMaxToken = UINT64_MAX >> 1;  // INT64_MAX; negative int64 lands above
  for (size_t i = 0; i < n_pages; ++i) {
    const size_t start = i * page_size;
    const size_t len = (n_tokens - start < page_size ? n_tokens - start : page_size);
    const uint64_t* page = in + start;
    uint8_t* dst = out + i * kDigestBytes;
    if (narrow(page, len, words) == 0) {
      hash_page(prior, false, words, len * 4, dst);
    } else {
      // Negative int64 (or uint64 > INT64_MAX) is an error in SGLang; other
      // tokens beyond uint32 make the page wide.
      const size_t bad = first_above(page, len, kMaxToken);
      if (bad != len) return fail(start + bad);
      hash_page(prior, true, page, len * 8, dst);
    }
    prior = dst;
  }
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

void to_hex(const uint8_t* digests, size_t n, char* out) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (size_t i = 0; i < n * kDigestBytes; ++i) {
    out[2 * i] = kHex[digests[i] >> 4];
    out[2 * i + 1] = kHex[digests[i] & 15];
  }
}

}  // namespace kvd::keys
