// Microbenchmark of the layout planner (csrc/layout) alone: per-page scatter
// lists of a layer-first MHA pool, pages x layers x K/V segments, validated and
// written in one pass. Baseline in the same run: writing the same two uint64
// arrays with a plain loop (the floor any planner pays), interleaved.
//
//   usage: planner_micro [pages=1024] [layers=64] [page_size=64] [reps=21]
#include "layout/layout.h"
#include "micro.h"

int main(int argc, char** argv) {
  const uint64_t pages = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1024;
  const uint32_t layers = argc > 2 ? uint32_t(std::strtoul(argv[2], nullptr, 10)) : 64;
  const uint64_t P = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 64;
  const int reps = argc > 4 ? std::atoi(argv[4]) : 21;
  const uint64_t pool_pages = 4 * pages, row = 8 * 128 * 2;  // 8 KV heads x 128 x bf16
  std::vector<kvd::layout::Plane> planes;
  for (uint32_t l = 0; l < 2 * layers; ++l)
    planes.push_back({0x100000000ULL + l * pool_pages * P * row, P * row, P * row});
  kvd::layout::Planner planner(P, pool_pages, 2, planes);
  std::vector<int64_t> slots(pages);
  for (uint64_t i = 0; i < pages; ++i) slots[i] = int64_t((i * 3 + 1) % pool_pages * P);
  const uint64_t S = planner.segments_per_page();
  std::vector<uint64_t> addrs(pages * S), sizes(pages * S);
  kvd::layout::PlanError err;
  std::vector<double> tp, tf;
  volatile uint64_t sink = 0;
  for (int r = 0; r < reps; ++r) {
    double t0 = micro::now_s();
    if (planner.plan(slots.data(), pages, false, -1, addrs.data(), sizes.data(), &err) != kvd::Status::kOk) return 1;
    tp.push_back(micro::now_s() - t0);
    sink = sink + addrs[pages * S - 1];
    t0 = micro::now_s();
    for (uint64_t i = 0; i < pages * S; ++i) {  // the floor: the same bytes written
      addrs[i] = i;
      sizes[i] = row;
    }
    tf.push_back(micro::now_s() - t0);
    sink = sink + addrs[pages * S - 1];
  }
  planner.plan(slots.data(), pages, false, -1, addrs.data(), sizes.data(), &err);
  const bool ok = addrs[S + 3] == planes[3].base + uint64_t(slots[1]) / P * planes[3].page_stride &&
                  sizes[5] == P * row;
  const double p = micro::median(tp), f = micro::median(tf);
  std::printf("pages %llu\nlayers %u\nsegments %llu\n", (unsigned long long)pages, layers,
              (unsigned long long)(pages * S));
  micro::print("plan_us", p * 1e6);
  micro::print("plan_ns_per_segment", p * 1e9 / double(pages * S));
  micro::print("floor_us", f * 1e6);
  micro::print("plan_vs_floor", p / f);
  std::printf("plan_correct %d\n", int(ok));
  return ok ? 0 : 1;
}
