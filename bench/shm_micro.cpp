// Microbenchmark of the shm pool's put/get (no Python): a batch of page
// objects, each gathered from / scattered to segments laid out like a
// layer-first KV pool (object i, segment j at region j + i * segment), against
// one thread of memcpy over the same bytes, measured interleaved in the same
// run. Configurations: as shipped (copy threads, non-temporal stores, checksum
// on), checksum off (its cost), one thread, one thread without non-temporal
// stores. Checks that every byte read back equals what was written.
//
//   usage: shm_micro [total_mib=56] [object_kib=1024] [segment_kib=32] [reps=9]
#include <unistd.h>

#include <memory>
#include <string>

#include "micro.h"
#include "shm/shm_pool.h"

using kvd::shm::CopyOptions;
using kvd::shm::Pool;

int main(int argc, char** argv) {
  const uint64_t total = (argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 56) << 20;
  const uint64_t obj = (argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1024) << 10;
  const uint64_t seg = (argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 32) << 10;
  const int reps = argc > 4 ? std::atoi(argv[4]) : 9;
  if (obj % seg || total % obj) {
    std::fprintf(stderr, "object size must be a multiple of the segment, total of the object\n");
    return 2;
  }
  const size_t n = total / obj, nseg = obj / seg;

  const std::string name = "micro-" + std::to_string(getpid());
  kvd::shm::CreateOptions co;
  co.size = total + total / 4 + (64ULL << 20);
  std::unique_ptr<Pool> pool;
  std::string err;
  if (Pool::open(name, kvd::shm::OpenMode::kCreate, co, &pool, &err) != kvd::Status::kOk) {
    std::fprintf(stderr, "shm_micro: %s\n", err.c_str());
    return 2;
  }
  micro::Buffer src(total), dst(total);
  for (uint64_t i = 0; i < total; ++i) src.data[i] = uint8_t(i * 131 + (i >> 12));
  std::vector<std::string> keys(n);
  std::vector<uint64_t> put_addrs(n * nseg), get_addrs(n * nseg), sizes(n * nseg, seg);
  for (size_t i = 0; i < n; ++i) {
    keys[i] = "micro/" + std::to_string(i);
    for (size_t j = 0; j < nseg; ++j) {
      const uint64_t off = j * (n * seg) + i * seg;
      put_addrs[i * nseg + j] = reinterpret_cast<uint64_t>(src.data + off);
      get_addrs[i * nseg + j] = reinterpret_cast<uint64_t>(dst.data + off);
    }
  }
  std::vector<int32_t> st(n);
  bool ok = true;
  auto put = [&] {
    pool->put(keys.data(), n, put_addrs.data(), sizes.data(), nseg, st.data());
    for (int32_t s : st) ok &= s == 0;
  };
  auto get = [&] {
    pool->get(keys.data(), n, get_addrs.data(), sizes.data(), nseg, st.data());
    for (int32_t s : st) ok &= s == 0;
  };
  micro::MemcpyBaseline mem(total);
  put(), get(), mem.seconds();  // fault everything in

  struct Config {
    const char* name;
    bool checksum;
    unsigned threads;
    bool stream;
  };
  const Config configs[] = {{"shipped", true, 0, true},
                            {"checksum_off", false, 0, true},
                            {"one_thread", true, 1, true},
                            {"one_thread_no_nt", true, 1, false}};
  std::printf("total_bytes %llu\nobjects %zu\nsegments_per_object %zu\nhardware_threads %u\nkernel %s\n",
              (unsigned long long)total, n, nseg, kvd::hardware_threads(), kvd::shm::copy_hash_kernel());
  struct Row {
    std::string name;
    double put, get;
  };
  std::vector<Row> rows;
  for (const Config& c : configs) {
    CopyOptions o;
    o.threads = c.threads;
    if (!c.stream) o.stream_min_bytes = ~0ULL;
    pool->set_copy_options(o);
    pool->set_write_checksum(c.checksum);
    pool->set_verify_checksum(c.checksum);
    std::vector<double> tp, tg;
    for (int r = 0; r < reps; ++r) {  // memcpy between the runs: the same machine state
      mem.seconds();
      double t0 = micro::now_s();
      put();
      tp.push_back(micro::now_s() - t0);
      mem.seconds();
      t0 = micro::now_s();
      get();
      tg.push_back(micro::now_s() - t0);
    }
    ok &= std::memcmp(src.data, dst.data, total) == 0;
    std::memset(dst.data, 0, total);
    rows.push_back({c.name, micro::median(tp), micro::median(tg)});
  }
  const double m = mem.median_seconds();
  micro::print("memcpy_gbps", total / m / 1e9);
  for (const Row& r : rows) {
    std::printf("put_%s_gbps %.4f\nput_%s_vs_memcpy %.4f\n", r.name.c_str(), total / r.put / 1e9,
                r.name.c_str(), m / r.put);
    std::printf("get_%s_gbps %.4f\nget_%s_vs_memcpy %.4f\n", r.name.c_str(), total / r.get / 1e9,
                r.name.c_str(), m / r.get);
  }
  std::printf("checksum_cost_put %.4f\nchecksum_cost_get %.4f\n", rows[0].put / rows[1].put - 1,
              rows[0].get / rows[1].get - 1);
  std::printf("bytes_equal %d\n", int(ok));
  pool.reset();
  Pool::destroy(name, &err);
  return ok ? 0 : 1;
}
