#include "shm/copy_hash.h"

#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kvd::shm {
namespace {

constexpr uint64_t kP1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t kP2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kP3 = 0x165667B19E3779F9ULL;
constexpr uint64_t kStep = 0x27D4EB2F165667C5ULL;
constexpr uint64_t kKey0[4] = {0xBE4BA423396CFEB8ULL, 0x1CAD21F72C81017CULL,
                               0xDB979083E96DD4DEULL, 0x1F67B3B7A4A44072ULL};

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t fmix(uint64_t h) {
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return h;
}

void stripes_portable(uint8_t* dst, const uint8_t* src, size_t ns, uint64_t* a1, uint64_t* a2,
                      uint64_t* key) {
  for (size_t i = 0; i < ns; ++i) {
    uint64_t x[4];
    std::memcpy(x, src + 32 * i, 32);
    if (dst) std::memcpy(dst + 32 * i, x, 32);
    for (int l = 0; l < 4; ++l) {
      uint64_t k = x[l] ^ key[l];
      a1[l] += (k & 0xffffffffULL) * (k >> 32);
      a2[l] += x[l];
      key[l] += kStep;
    }
  }
}

#if defined(__x86_64__)
// kStream: non-temporal stores (dst 32-byte aligned), see copy_hash.h.
template <bool kStream>
__attribute__((target("avx2"))) inline void store32(__m256i* d, __m256i x) {
  if (kStream)
    _mm256_stream_si256(d, x);
  else
    _mm256_storeu_si256(d, x);
}

template <bool kStream>
__attribute__((target("avx2"))) void stripes_avx2(uint8_t* dst, const uint8_t* src, size_t ns,
                                                  uint64_t* a1p, uint64_t* a2p, uint64_t* keyp) {
  __m256i a1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(a1p));
  __m256i a2 = _mm256_load_si256(reinterpret_cast<const __m256i*>(a2p));
  __m256i key = _mm256_load_si256(reinterpret_cast<const __m256i*>(keyp));
  const __m256i step = _mm256_set1_epi64x(static_cast<long long>(kStep));
  size_t i = 0;
  // 4 stripes per iteration: the loads and stores dominate; the arithmetic hides behind them.
  for (; i + 4 <= ns; i += 4) {
    const __m256i* s = reinterpret_cast<const __m256i*>(src + 32 * i);
    __m256i x0 = _mm256_loadu_si256(s), x1 = _mm256_loadu_si256(s + 1);
    __m256i x2 = _mm256_loadu_si256(s + 2), x3 = _mm256_loadu_si256(s + 3);
    if (dst) {
      __m256i* d = reinterpret_cast<__m256i*>(dst + 32 * i);
      store32<kStream>(d, x0);
      store32<kStream>(d + 1, x1);
      store32<kStream>(d + 2, x2);
      store32<kStream>(d + 3, x3);
    }
    __m256i k1 = _mm256_add_epi64(key, step), k2 = _mm256_add_epi64(k1, step);
    __m256i k3 = _mm256_add_epi64(k2, step);
    __m256i y0 = _mm256_xor_si256(x0, key), y1 = _mm256_xor_si256(x1, k1);
    __m256i y2 = _mm256_xor_si256(x2, k2), y3 = _mm256_xor_si256(x3, k3);
    __m256i p0 = _mm256_mul_epu32(y0, _mm256_srli_epi64(y0, 32));
    __m256i p1 = _mm256_mul_epu32(y1, _mm256_srli_epi64(y1, 32));
    __m256i p2 = _mm256_mul_epu32(y2, _mm256_srli_epi64(y2, 32));
    __m256i p3 = _mm256_mul_epu32(y3, _mm256_srli_epi64(y3, 32));
    a1 = _mm256_add_epi64(a1, _mm256_add_epi64(_mm256_add_epi64(p0, p1), _mm256_add_epi64(p2, p3)));
    a2 = _mm256_add_epi64(a2, _mm256_add_epi64(_mm256_add_epi64(x0, x1), _mm256_add_epi64(x2, x3)));
    key = _mm256_add_epi64(k3, step);
  }
  for (; i < ns; ++i) {
    __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * i));
    if (dst) store32<kStream>(reinterpret_cast<__m256i*>(dst + 32 * i), x);
    __m256i y = _mm256_xor_si256(x, key);
    a1 = _mm256_add_epi64(a1, _mm256_mul_epu32(y, _mm256_srli_epi64(y, 32)));
    a2 = _mm256_add_epi64(a2, x);
    key = _mm256_add_epi64(key, step);
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(a1p), a1);
  _mm256_store_si256(reinterpret_cast<__m256i*>(a2p), a2);
  _mm256_store_si256(reinterpret_cast<__m256i*>(keyp), key);
}

template <bool kStream>
__attribute__((target("avx2"))) void copy_avx2(uint8_t* dst, const uint8_t* src, size_t n) {
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {
    const __m256i* s = reinterpret_cast<const __m256i*>(src + i);
    __m256i x0 = _mm256_loadu_si256(s), x1 = _mm256_loadu_si256(s + 1);
    __m256i x2 = _mm256_loadu_si256(s + 2), x3 = _mm256_loadu_si256(s + 3);
    __m256i* d = reinterpret_cast<__m256i*>(dst + i);
    store32<kStream>(d, x0);
    store32<kStream>(d + 1, x1);
    store32<kStream>(d + 2, x2);
    store32<kStream>(d + 3, x3);
  }
  if (i < n) std::memcpy(dst + i, src + i, n - i);
}

bool have_avx2() {
  static const bool v = __builtin_cpu_supports("avx2");
  return v;
}
#else
bool have_avx2() { return false; }
#endif

}  // namespace

CopyHasher::CopyHasher(bool stream) : stream_(stream) {
  for (int l = 0; l < 4; ++l) {
    acc1_[l] = 0;
    acc2_[l] = kP1 * (l + 1);
    key_[l] = kKey0[l];
  }
}

CopyHasher CopyHasher::part_at(uint64_t offset, bool stream) {
  CopyHasher h(stream);
  if (offset == 0) return h;
  const uint64_t stripe = offset / 32;
  for (int l = 0; l < 4; ++l) {
    h.acc1_[l] = 0;
    h.acc2_[l] = 0;  // the initial value is the first part's
    h.key_[l] = kKey0[l] + stripe * kStep;
  }
  h.start_ = offset - offset % 32;
  return h;
}

bool CopyHasher::merge(const CopyHasher& later) {
  if (buffered_ != 0 || start_ + total_ != later.start_) return false;
  for (int l = 0; l < 4; ++l) {
    acc1_[l] += later.acc1_[l];
    acc2_[l] += later.acc2_[l];
    key_[l] = later.key_[l];
  }
  std::memcpy(buf_, later.buf_, sizeof buf_);
  buffered_ = later.buffered_;
  total_ += later.total_;
  return true;
}

void CopyHasher::stripes(uint8_t* dst, const uint8_t* src, size_t ns) {
  if (ns == 0) return;
#if defined(__x86_64__)
  if (have_avx2()) {
    if (stream_ && dst && (reinterpret_cast<uintptr_t>(dst) & 31) == 0)
      stripes_avx2<true>(dst, src, ns, acc1_, acc2_, key_);
    else
      stripes_avx2<false>(dst, src, ns, acc1_, acc2_, key_);
    return;
  }
#endif
  stripes_portable(dst, src, ns, acc1_, acc2_, key_);
}

void CopyHasher::copy(void* dstv, const void* srcv, size_t n) {
  auto* dst = static_cast<uint8_t*>(dstv);
  auto* src = static_cast<const uint8_t*>(srcv);
  total_ += n;
  if (buffered_) {  // finish a stripe split across pieces
    size_t take = n < 32 - buffered_ ? n : 32 - buffered_;
    std::memcpy(buf_ + buffered_, src, take);
    if (dst) std::memcpy(dst, src, take);
    buffered_ += take;
    src += take;
    if (dst) dst += take;
    n -= take;
    if (buffered_ < 32) return;
    stripes(nullptr, buf_, 1);
    buffered_ = 0;
  }
  size_t ns = n / 32;
  stripes(dst, src, ns);
  size_t done = ns * 32;
  if (done < n) {
    buffered_ = n - done;
    std::memcpy(buf_, src + done, buffered_);
    if (dst) std::memcpy(dst + done, src + done, buffered_);
  }
}

void CopyHasher::update(const void* src, size_t n) { copy(nullptr, src, n); }

uint64_t CopyHasher::digest() const {
  uint64_t a1[4], a2[4], key[4];
  std::memcpy(a1, acc1_, sizeof a1);
  std::memcpy(a2, acc2_, sizeof a2);
  std::memcpy(key, key_, sizeof key);
  if (buffered_) {  // zero-padded last stripe; the length below disambiguates padding
    alignas(32) uint8_t tail[32] = {0};
    std::memcpy(tail, buf_, buffered_);
    stripes_portable(nullptr, tail, 1, a1, a2, key);
  }
  uint64_t h = (start_ + total_) * kP1 ^ 0x5851F42D4C957F2DULL;
  for (int l = 0; l < 4; ++l) {
    h = rotl(h ^ fmix(a1[l] + l), 27) * kP1 + kP3;
    h = rotl(h ^ fmix(a2[l] ^ kKey0[l]), 31) * kP2;
  }
  return fmix(h);
}

uint64_t checksum64(const void* data, size_t n) {
  CopyHasher h;
  h.update(data, n);
  return h.digest();
}

uint64_t key_hash64(const char* p, size_t n) {
  uint64_t h = kP3 ^ (n * kP1);
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    h = rotl(h ^ (v * kP2), 31) * kP1;
    p += 8;
    n -= 8;
  }
  uint64_t v = 0;
  std::memcpy(&v, p, n);
  h = rotl(h ^ (v * kP2), 31) * kP1;
  return fmix(h);
}

void fast_copy(void* dstv, const void* srcv, size_t n, bool stream) {
  auto* dst = static_cast<uint8_t*>(dstv);
  auto* src = static_cast<const uint8_t*>(srcv);
#if defined(__x86_64__)
  if (have_avx2() && n >= 4096) {
    if (stream) {
      size_t head = (32 - (reinterpret_cast<uintptr_t>(dst) & 31)) & 31;  // align the stores
      std::memcpy(dst, src, head);
      copy_avx2<true>(dst + head, src + head, n - head);
    } else {
      copy_avx2<false>(dst, src, n);
    }
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

void copy_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

const char* copy_hash_kernel() { return have_avx2() ? "avx2" : "portable"; }

}  // namespace kvd::shm
