// Microbenchmark of the CPU copy engine (csrc/copy) alone: gather and scatter
// of a batch of pages, each made of 2 x layers segments (K/V per layer) of a
// layer-first KV pool, the pages scattered over a pool twice the batch, against
// one thread of memcpy over the same bytes, interleaved in the same run; with
// one thread and with every hardware thread. Checks the bytes moved.
//
//   usage: copy_micro [total_mib=56] [page_kib=1024] [layers=16] [reps=9]
#include <numeric>
#include <random>

#include "copy/copy.h"
#include "micro.h"

int main(int argc, char** argv) {
  const uint64_t total = (argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 56) << 20;
  const uint64_t page = (argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1024) << 10;
  const uint64_t layers = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 16;
  const int reps = argc > 4 ? std::atoi(argv[4]) : 9;
  const uint64_t nseg = 2 * layers, seg = page / nseg, n = total / page, pool_pages = 2 * n;
  if (seg * nseg != page || n == 0) {
    std::fprintf(stderr, "page must split into 2 x layers segments and fit the total\n");
    return 2;
  }
  micro::Buffer pool(pool_pages * page, 3), packed(total, 0);
  for (uint64_t i = 0; i < pool.size; ++i) pool.data[i] = uint8_t(i * 7 + (i >> 13));
  std::vector<uint64_t> pages(pool_pages);
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), std::mt19937_64(1));
  std::vector<uint64_t> addrs(n * nseg), sizes(n * nseg, seg);
  for (uint64_t i = 0; i < n; ++i)  // plane j = region j of the pool, strided by page
    for (uint64_t j = 0; j < nseg; ++j)
      addrs[i * nseg + j] = reinterpret_cast<uint64_t>(pool.data + j * (pool_pages * seg) + pages[i] * seg);

  micro::MemcpyBaseline mem(total);
  kvd::copy::CopyEngine one(1), all(0);
  const uint64_t dst = reinterpret_cast<uint64_t>(packed.data);
  bool ok = true;
  auto check = [&] {  // packed page i segment j == its pool segment
    for (uint64_t k = 0; k < n * nseg; k += 7)
      ok &= std::memcmp(packed.data + k * seg, reinterpret_cast<void*>(addrs[k]), seg) == 0;
  };
  mem.seconds();
  one.gather(addrs.data(), sizes.data(), n * nseg, dst, total);
  check();
  std::printf("total_bytes %llu\npages %llu\nsegments_per_page %llu\nsegment_bytes %llu\nthreads_all %u\n",
              (unsigned long long)total, (unsigned long long)n, (unsigned long long)nseg,
              (unsigned long long)seg, all.threads());
  struct Row {
    const char* name;
    kvd::copy::CopyEngine* e;
    std::vector<double> g, s;
  } rows[] = {{"one_thread", &one, {}, {}}, {"all_threads", &all, {}, {}}};
  for (int r = 0; r < reps; ++r)
    for (Row& row : rows) {
      mem.seconds();
      double t0 = micro::now_s();
      row.e->gather(addrs.data(), sizes.data(), n * nseg, dst, total);
      row.g.push_back(micro::now_s() - t0);
      mem.seconds();
      t0 = micro::now_s();
      row.e->scatter(addrs.data(), sizes.data(), n * nseg, dst, total);
      row.s.push_back(micro::now_s() - t0);
    }
  check();
  const double m = mem.median_seconds();
  micro::print("memcpy_gbps", total / m / 1e9);
  for (Row& row : rows) {
    const double g = micro::median(row.g), s = micro::median(row.s);
    std::printf("gather_%s_gbps %.4f\ngather_%s_vs_memcpy %.4f\n", row.name, total / g / 1e9, row.name, m / g);
    std::printf("scatter_%s_gbps %.4f\nscatter_%s_vs_memcpy %.4f\n", row.name, total / s / 1e9, row.name, m / s);
  }
  std::printf("bytes_equal %d\n", int(ok));
  return ok ? 0 : 1;
}
