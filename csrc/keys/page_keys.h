// Page keys: the chained SHA-256 that names a page of tokens in the KV pool.
//
// Bit-identical to SGLang 0.5.23's get_storage_hash_str:
//   digest[0] = SHA256([prior] || page0),  digest[i] = SHA256(digest[i-1] || page_i)
// where a page is its tokens as 4-byte little-endian words. Two SGLang details
// are reproduced exactly:
//   * a page holding a token > UINT32_MAX (only possible with 64-bit input) is
//     hashed "wide": SHA256(prior || 0xff || tokens as 8-byte LE words);
//   * negative tokens (and uint64 tokens > INT64_MAX) are rejected.
// The namespace (SGLang extra_key / cache_salt) seeds the chain as the prior of
// page 0 when the caller gives no prior (see namespace_seed()).
//
// Digests stay binary (32 bytes per page) inside the index; hex is produced
// only where a caller needs strings (pool object keys, SGLang parity).
// Everything here is reentrant; no allocation except a per-page narrowing
// buffer on the stack (heap for pages > 4096 tokens of 64-bit input).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "common/status.h"

namespace kvd::keys {

constexpr size_t kDigestBytes = 32;
constexpr size_t kHexChars = 64;

enum class TokenType : uint8_t { kInt32, kUInt32, kInt64, kUInt64 };

// Number of digests page_digests() writes.
inline size_t num_pages(size_t n_tokens, size_t page_size, bool include_partial = false) {
  if (page_size == 0) return 0;
  return include_partial ? (n_tokens + page_size - 1) / page_size : n_tokens / page_size;
}

// Hashes the pages of `tokens` into `out` (num_pages(...) * 32 bytes).
// prior32: digest of the page before tokens[0] (continue a chain) or nullptr
// (start a chain; pass a namespace seed here for namespaced requests).
// include_partial: also hash a trailing partial page (SGLang does; the index
// does not). Returns kInvalidArgument for page_size 0 or an out-of-range
// token, whose index is stored in *bad_index when given; nothing is promised
// about `out` then.
Status page_digests(const void* tokens, size_t n_tokens, TokenType type, size_t page_size,
                    const uint8_t* prior32, uint8_t* out, bool include_partial = false,
                    size_t* bad_index = nullptr);

// Convenience for signed token buffers (int32 or int64, as the index holds).
inline Status page_digests(const void* tokens, size_t n_tokens, int token_bytes,
                           size_t page_size, const uint8_t* prior32, uint8_t* out) {
  if (token_bytes != 4 && token_bytes != 8) return Status::kInvalidArgument;
  return page_digests(tokens, n_tokens, token_bytes == 4 ? TokenType::kInt32 : TokenType::kInt64,
                      page_size, prior32, out, false, nullptr);
}

// SGLang's storage namespace seed: SHA256("sglang-cache-namespace-v1" ||
// part(extra_key) || part(cache_salt)), part = 0x00 when absent, else
// 0x01 || u64 LE byte length || UTF-8 bytes. Returns false (no seed) when both
// are absent: un-namespaced chains start with no prior.
bool namespace_seed(const std::string_view* extra_key, const std::string_view* cache_salt,
                    uint8_t out[kDigestBytes]);

// Lower-case hex of n digests, 64 chars each, no separators or terminator.
void to_hex(const uint8_t* digests, size_t n, char* out);

}  // namespace kvd::keys
