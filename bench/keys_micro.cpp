// Page-key microbenchmark: kvdirect's chained page hash vs the OpenSSL floor.
//
// The floor is a plain C loop of OpenSSL SHA-256 (SHA256_Init/Update/Final,
// which use the CPU's SHA extensions) over the same pages, chained like the
// page keys: 56 calls over prior(32) || page(256 bytes) for a 3584-token
// request at page size 64. libcrypto.so.3 is dlopen'ed at run time so the
// core never links OpenSSL. Prints one "name value" line per result.
//
// usage: keys_micro [n_tokens=3584] [page_size=64] [iterations=20000]
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "keys/page_keys.h"
#include "keys/sha256.h"

namespace {

struct ShaCtx {
  unsigned char opaque[256];  // SHA256_CTX is 112 bytes; generous
};
using InitFn = int (*)(ShaCtx*);
using UpdateFn = int (*)(ShaCtx*, const void*, size_t);
using FinalFn = int (*)(unsigned char*, ShaCtx*);

double now_us() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Median over `reps` rounds of `iters` calls, in microseconds per call.
template <typename F>
double time_us(F&& f, int iters, int reps = 7) {
  std::vector<double> r;
  for (int k = 0; k < reps; ++k) {
    const double t0 = now_us();
    for (int i = 0; i < iters; ++i) f();
    r.push_back((now_us() - t0) / iters);
  }
  std::sort(r.begin(), r.end());
  return r[r.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const size_t n_tokens = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 3584;
  const size_t page = argc > 2 ? std::strtoul(argv[2], nullptr, 10) : 64;
  const int iters = argc > 3 ? std::atoi(argv[3]) : 20000;
  const size_t n_pages = n_tokens / page;

  std::mt19937_64 rng(42);
  std::vector<int32_t> t32(n_tokens);
  std::vector<int64_t> t64(n_tokens);
  for (size_t i = 0; i < n_tokens; ++i) t64[i] = t32[i] = int32_t(rng() % 150000);
  std::vector<uint8_t> ours(n_pages * 32), ref(n_pages * 32);
  volatile uint8_t sink = 0;

  std::printf("n_tokens %zu\npage_size %zu\nn_pages %zu\nsha256_kernel %s\n", n_tokens, page,
              n_pages, kvd::sha256::kernel_name());

  const double ours32 = time_us([&] {
    kvd::keys::page_digests(t32.data(), n_tokens, 4, page, nullptr, ours.data());
    sink = sink ^ ours[0];
  }, iters);
  const double ours64 = time_us([&] {
    kvd::keys::page_digests(t64.data(), n_tokens, 8, page, nullptr, ours.data());
    sink = sink ^ ours[0];
  }, iters);
  std::printf("kvdirect_int32_us %.3f\nkvdirect_int64_us %.3f\n", ours32, ours64);

  void* lib = dlopen("libcrypto.so.3", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    std::printf("openssl_floor_us nan\nopenssl_error %s\n", dlerror());
    return 0;
  }
  auto init = reinterpret_cast<InitFn>(dlsym(lib, "SHA256_Init"));
  auto update = reinterpret_cast<UpdateFn>(dlsym(lib, "SHA256_Update"));
  auto final_ = reinterpret_cast<FinalFn>(dlsym(lib, "SHA256_Final"));
  if (!init || !update || !final_) {
    std::printf("openssl_floor_us nan\nopenssl_error missing SHA256_* symbols\n");
    return 0;
  }
  // The floor: one chained call per page over the same 4-byte tokens.
  auto floor_loop = [&] {
    const uint8_t* prior = nullptr;
    for (size_t p = 0; p < n_pages; ++p) {
      ShaCtx ctx;
      init(&ctx);
      if (prior) update(&ctx, prior, 32);
      update(&ctx, t32.data() + p * page, page * 4);
      final_(ref.data() + p * 32, &ctx);
      prior = ref.data() + p * 32;
    }
    sink = sink ^ ref[0];
  };
  const double floor_us = time_us(floor_loop, iters);
  kvd::keys::page_digests(t32.data(), n_tokens, 4, page, nullptr, ours.data());
  const bool same = ours == ref;
  std::printf("openssl_floor_us %.3f\ndigests_equal %d\nratio_int32_vs_floor %.3f\n", floor_us,
              int(same), ours32 / floor_us);
  return same ? 0 : 1;
}
