// SHA-256 compression kernels and the incremental hasher. See sha256.h.
#include "keys/sha256.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define KVD_SHA_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "kvdirect page keys assume a little-endian host");

namespace kvd::sha256 {
namespace {

alignas(64) constexpr uint32_t kK[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

constexpr uint32_t kInit[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
inline uint32_t load_be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

void compress_portable(uint32_t state[8], const uint8_t* p, size_t nblocks) {
  uint32_t w[64];
  for (; nblocks > 0; --nblocks, p += kBlockBytes) {
    for (int t = 0; t < 16; ++t) w[t] = load_be32(p + 4 * t);
    for (int t = 16; t < 64; ++t) {
      const uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      const uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (int t = 0; t < 64; ++t) {
      const uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                          kK[t] + w[t];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g; g = f; f = e; e = d + t1;
      d = c; c = b; b = a; a = t1 + t2;
    }
    state[0] += a; state[1] += b; state[2] += c; state[3] += d;
    state[4] += e; state[5] += f; state[6] += g; state[7] += h;
  }
}

#if KVD_SHA_X86
// SHA-NI kernel. The instructions keep the state as two vectors, ABEF and
// CDGH; each sha256rnds2 does two rounds, so four message words take two
// calls. Message words 16..63 come from sha256msg1/msg2 four at a time.
#define KVD_SHANI __attribute__((target("sha,sse4.1"), always_inline)) inline

KVD_SHANI __m128i bswap_mask() {
  return _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
}
KVD_SHANI __m128i load_words(const uint8_t* p) {
  return _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), bswap_mask());
}

// One block given as four vectors of message words (W0..W3 in lanes 0..3).
KVD_SHANI void block(__m128i& abef, __m128i& cdgh, __m128i m0, __m128i m1, __m128i m2,
                     __m128i m3) {
  const __m128i abef0 = abef, cdgh0 = cdgh;
  __m128i m[4] = {m0, m1, m2, m3};
#pragma GCC unroll 16
  for (int g = 0; g < 16; ++g) {
    if (g >= 4) {
      // W[g] = msg2(W[g-4] + sigma0(W[g-3]) + W[t-7], W[g-1])
      const __m128i w4 = m[g & 3], w3 = m[(g + 1) & 3], w2 = m[(g + 2) & 3], w1 = m[(g + 3) & 3];
      __m128i t = _mm_sha256msg1_epu32(w4, w3);
      t = _mm_add_epi32(t, _mm_alignr_epi8(w1, w2, 4));
      m[g & 3] = _mm_sha256msg2_epu32(t, w1);
    }
    __m128i kw = _mm_add_epi32(m[g & 3], _mm_load_si128(reinterpret_cast<const __m128i*>(kK + 4 * g)));
    cdgh = _mm_sha256rnds2_epu32(cdgh, abef, kw);
    kw = _mm_shuffle_epi32(kw, 0x0E);
    abef = _mm_sha256rnds2_epu32(abef, cdgh, kw);
  }
  abef = _mm_add_epi32(abef, abef0);
  cdgh = _mm_add_epi32(cdgh, cdgh0);
}

KVD_SHANI void block_at(__m128i& abef, __m128i& cdgh, const uint8_t* p) {
  block(abef, cdgh, load_words(p), load_words(p + 16), load_words(p + 32), load_words(p + 48));
}

// (h0..h3, h4..h7) <-> (ABEF, CDGH)
KVD_SHANI void to_abef(__m128i dcba, __m128i hgfe, __m128i& abef, __m128i& cdgh) {
  const __m128i cdab = _mm_shuffle_epi32(dcba, 0xB1);
  const __m128i efgh = _mm_shuffle_epi32(hgfe, 0x1B);
  abef = _mm_alignr_epi8(cdab, efgh, 8);
  cdgh = _mm_blend_epi16(efgh, cdab, 0xF0);
}
KVD_SHANI void from_abef(__m128i abef, __m128i cdgh, __m128i& dcba, __m128i& hgfe) {
  const __m128i feba = _mm_shuffle_epi32(abef, 0x1B);
  const __m128i dchg = _mm_shuffle_epi32(cdgh, 0xB1);
  dcba = _mm_blend_epi16(feba, dchg, 0xF0);
  hgfe = _mm_alignr_epi8(dchg, feba, 8);
}

__attribute__((target("sha,sse4.1")))
void compress_shani(uint32_t state[8], const uint8_t* p, size_t nblocks) {
  __m128i abef, cdgh;
  to_abef(_mm_loadu_si128(reinterpret_cast<const __m128i*>(state)),
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(state + 4)), abef, cdgh);
  for (; nblocks > 0; --nblocks, p += kBlockBytes) block_at(abef, cdgh, p);
  __m128i dcba, hgfe;
  from_abef(abef, cdgh, dcba, hgfe);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state), dcba);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state + 4), hgfe);
}

__attribute__((target("sha,sse4.1")))
void chain_shani(const uint8_t* prior32, const uint8_t* data, size_t len, size_t stride, size_t n,
                 uint8_t* out) {
  __m128i iv_abef, iv_cdgh;
  to_abef(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kInit)),
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(kInit + 4)), iv_abef, iv_cdgh);
  // The previous digest as message words: digest bytes are the state words
  // big-endian, and message words are read big-endian, so W0..W7 = h0..h7.
  __m128i prev_lo = _mm_setzero_si128(), prev_hi = _mm_setzero_si128();
  bool have_prev = prior32 != nullptr;
  if (have_prev) {
    prev_lo = load_words(prior32);
    prev_hi = load_words(prior32 + 16);
  }
  alignas(16) uint8_t tail[2 * kBlockBytes];
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = data + i * stride;
    size_t rem = len;
    const uint64_t bits = uint64_t(len + (have_prev ? kDigestBytes : 0)) * 8;
    __m128i abef = iv_abef, cdgh = iv_cdgh;
    if (have_prev) {
      // Block 0 = previous digest || first 32 bytes (or fewer) of the page.
      if (rem >= 32) {
        block(abef, cdgh, prev_lo, prev_hi, load_words(p), load_words(p + 16));
        p += 32;
        rem -= 32;
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(tail), _mm_shuffle_epi8(prev_lo, bswap_mask()));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(tail + 16), _mm_shuffle_epi8(prev_hi, bswap_mask()));
      }
    }
    for (; rem >= kBlockBytes; rem -= kBlockBytes, p += kBlockBytes) block_at(abef, cdgh, p);
    // Tail + padding (0x80, zeros, 64-bit big-endian bit length): 1 or 2 blocks.
    const size_t head = (have_prev && len < 32) ? kDigestBytes : 0;
    const size_t used = head + rem;
    const size_t nb = used + 9 <= kBlockBytes ? 1 : 2;
    std::memcpy(tail + head, p, rem);
    tail[used] = 0x80;
    std::memset(tail + used + 1, 0, nb * kBlockBytes - used - 1);
    for (int b = 0; b < 8; ++b) tail[nb * kBlockBytes - 1 - b] = uint8_t(bits >> (8 * b));
    for (size_t b = 0; b < nb; ++b) block_at(abef, cdgh, tail + b * kBlockBytes);
    from_abef(abef, cdgh, prev_lo, prev_hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * kDigestBytes), _mm_shuffle_epi8(prev_lo, bswap_mask()));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * kDigestBytes + 16), _mm_shuffle_epi8(prev_hi, bswap_mask()));
    have_prev = true;
  }
}

bool detect_shani() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool sse41 = (c & (1u << 19)) != 0, ssse3 = (c & (1u << 9)) != 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool sha = (b & (1u << 29)) != 0;
  return sha && sse41 && ssse3;
}
#else
bool detect_shani() { return false; }
#endif

const bool g_has_shani = detect_shani();

void digest_impl(const uint8_t* prior, const uint8_t* p, size_t len, uint8_t* out);

void chain_portable(const uint8_t* prior32, const uint8_t* data, size_t len, size_t stride,
                    size_t n, uint8_t* out) {
  const uint8_t* prev = prior32;
  for (size_t i = 0; i < n; ++i) {
    digest_impl(prev, data + i * stride, len, out + i * kDigestBytes);
    prev = out + i * kDigestBytes;
  }
}

CompressFn kernel_for(const char* name) {
  if (name == nullptr || std::strcmp(name, "auto") == 0 || name[0] == '\0') {
#if KVD_SHA_X86
    if (g_has_shani) return compress_shani;
#endif
    return compress_portable;
  }
  if (std::strcmp(name, "portable") == 0) return compress_portable;
#if KVD_SHA_X86
  if (std::strcmp(name, "shani") == 0 && g_has_shani) return compress_shani;
#endif
  return nullptr;
}

CompressFn initial_kernel() {
  CompressFn fn = kernel_for(std::getenv("KVDIRECT_SHA256"));
  return fn ? fn : kernel_for("auto");
}

CompressFn g_compress = initial_kernel();

using ChainFn = void (*)(const uint8_t*, const uint8_t*, size_t, size_t, size_t, uint8_t*);
ChainFn chain_for(CompressFn c) {
#if KVD_SHA_X86
  if (c == compress_shani) return chain_shani;
#endif
  return chain_portable;
}
ChainFn g_chain = chain_for(g_compress);

}  // namespace

bool cpu_has_shani() { return g_has_shani; }

bool select_kernel(const char* name) {
  CompressFn fn = kernel_for(name);
  if (!fn) return false;
  g_compress = fn;
  g_chain = chain_for(fn);
  return true;
}

const char* kernel_name() { return g_compress == compress_portable ? "portable" : "shani"; }

void Hasher::reset() {
  std::memcpy(h_, kInit, sizeof(h_));
  total_ = 0;
  buf_len_ = 0;
}

void Hasher::update(const void* data, size_t len) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  total_ += len;
  if (buf_len_ > 0) {
    const size_t take = len < kBlockBytes - buf_len_ ? len : kBlockBytes - buf_len_;
    std::memcpy(buf_ + buf_len_, p, take);
    buf_len_ += take;
    p += take;
    len -= take;
    if (buf_len_ < kBlockBytes) return;
    g_compress(h_, buf_, 1);
    buf_len_ = 0;
  }
  if (len >= kBlockBytes) {
    const size_t n = len / kBlockBytes;
    g_compress(h_, p, n);  // full blocks straight from the caller's memory
    p += n * kBlockBytes;
    len -= n * kBlockBytes;
  }
  if (len > 0) {
    std::memcpy(buf_, p, len);
    buf_len_ = len;
  }
}

void Hasher::finish(uint8_t out[kDigestBytes]) {
  const uint64_t bits = total_ * 8;
  buf_[buf_len_++] = 0x80;
  if (buf_len_ > kBlockBytes - 8) {
    std::memset(buf_ + buf_len_, 0, kBlockBytes - buf_len_);
    g_compress(h_, buf_, 1);
    buf_len_ = 0;
  }
  std::memset(buf_ + buf_len_, 0, kBlockBytes - 8 - buf_len_);
  for (int i = 0; i < 8; ++i) buf_[kBlockBytes - 1 - i] = uint8_t(bits >> (8 * i));
  g_compress(h_, buf_, 1);
  for (int i = 0; i < 8; ++i) {
    out[4 * i] = uint8_t(h_[i] >> 24);
    out[4 * i + 1] = uint8_t(h_[i] >> 16);
    out[4 * i + 2] = uint8_t(h_[i] >> 8);
    out[4 * i + 3] = uint8_t(h_[i]);
  }
}

namespace {
void digest_impl(const uint8_t* prior, const uint8_t* p, size_t len, uint8_t* out) {
  Hasher h;
  if (prior) h.update(prior, kDigestBytes);
  h.update(p, len);
  h.finish(out);
}
}  // namespace

void chain(const uint8_t* prior32, const uint8_t* data, size_t len, size_t stride, size_t n,
           uint8_t* out) {
  g_chain(prior32, data, len, stride, n, out);
}

void digest(const void* data, size_t len, uint8_t out[kDigestBytes]) {
  Hasher h;
  h.update(data, len);
  h.finish(out);
}

}  // namespace kvd::sha256
