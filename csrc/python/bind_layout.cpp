// Bindings for the layout planner (csrc/layout/layout.h). kvdirect.layout.KVLayout
// builds a Planner from validated tensor metadata; the planner turns slot arrays
// into [N, S] uint64 address/size arrays in one call.
#include <pybind11/numpy.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "layout/layout.h"
#include "registry.h"

namespace py = pybind11;
using kvd::layout::PlanError;
using kvd::layout::Planner;

namespace {

using U64 = py::array_t<uint64_t, py::array::c_style>;
using I64 = py::array_t<int64_t, py::array::c_style>;

[[noreturn]] void raise_plan_error(const Planner& p, const PlanError& e) {
  std::string at = "index " + std::to_string(e.index) + " (slot " + std::to_string(e.slot) + ")";
  std::string ps = std::to_string(p.page_size());
  switch (e.kind) {
    case PlanError::kUnaligned:
      throw py::value_error("page slot at " + at + " is not page aligned: first slots of pages must be multiples of page_size " + ps);
    case PlanError::kOutOfRange:
      throw py::value_error("page slot at " + at + " is out of range: the pool has " + std::to_string(p.num_pages()) +
                            " pages of " + ps + " slots");
    case PlanError::kNotContiguous:
      throw py::value_error("token slot at " + at + " breaks its page: the slots of one page must be consecutive (slot0, slot0+1, ...)");
    case PlanError::kBadLength:
      throw py::value_error("per-token slot array of length " + std::to_string(e.index) + " is not a multiple of page_size " + ps);
    case PlanError::kBadLayer:
      throw py::value_error("layer " + std::to_string(e.slot) + " out of range: the layout has " + std::to_string(p.num_layers()) + " layers");
    default:
      throw py::value_error("invalid page slots");
  }
}

// Scatter lists of big batches are MiBs (1024 pages x 128 segments x 2 x 8 B =
// 2 MiB); fresh memory costs a page fault per 4 KiB, which dominated planning
// (~0.7 ms of faults vs ~0.05 ms of work). Freed outputs go back to a small
// bounded cache, so a steady stream of plans reuses warm memory.
class OutputCache {
 public:
  static OutputCache& get() {
    static OutputCache* c = new OutputCache();  // leaked: capsules may die at exit
    return *c;
  }
  void* take(size_t bytes, size_t* cap) {
    std::lock_guard<std::mutex> g(mu_);
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i].cap >= bytes && free_[i].cap <= 2 * bytes + 65536) {
        Block b = free_[i];
        free_.erase(free_.begin() + i);
        held_ -= b.cap;
        *cap = b.cap;
        return b.ptr;
      }
    *cap = bytes ? bytes : 1;
    return std::malloc(*cap);
  }
  void give(void* ptr, size_t cap) {
    std::lock_guard<std::mutex> g(mu_);
    if (held_ + cap > kMaxHeld || free_.size() >= 16) {
      std::free(ptr);
      return;
    }
    free_.push_back({ptr, cap});
    held_ += cap;
  }

 private:
  struct Block {
    void* ptr;
    size_t cap;
  };
  static constexpr size_t kMaxHeld = 64u << 20;
  std::mutex mu_;
  std::vector<Block> free_;
  size_t held_ = 0;
};

struct OutBlock {
  void* ptr;
  size_t cap;
};

// addrs and sizes [pages, S] as two views of one cached block.
std::pair<U64, U64> new_outputs(uint64_t pages, uint64_t S) {
  const size_t n = static_cast<size_t>(pages * S);
  auto* blk = new OutBlock{nullptr, 0};
  blk->ptr = OutputCache::get().take(2 * n * sizeof(uint64_t), &blk->cap);
  if (!blk->ptr) {
    delete blk;
    throw std::bad_alloc();
  }
  py::capsule owner(blk, [](void* p) {
    auto* b = static_cast<OutBlock*>(p);
    OutputCache::get().give(b->ptr, b->cap);
    delete b;
  });
  auto* base = static_cast<uint64_t*>(blk->ptr);
  return {U64({pages, S}, base, owner), U64({pages, S}, base + n, owner)};
}

py::tuple plan(const Planner& p, const I64& slots, bool per_token, int32_t layer) {
  if (slots.ndim() != 1) throw py::value_error("page slots must be a 1-D int64 array");
  const uint64_t n = static_cast<uint64_t>(slots.shape(0));
  if (per_token && n % p.page_size() != 0) raise_plan_error(p, {static_cast<int64_t>(n), 0, PlanError::kBadLength});
  const uint64_t pages = per_token ? n / p.page_size() : n;
  const uint64_t S = layer >= 0 ? p.segments_per_page() / p.num_layers() : p.segments_per_page();
  auto [addrs, sizes] = new_outputs(pages, S);
  PlanError err;
  auto st = p.plan(slots.data(), n, per_token, layer, addrs.mutable_data(), sizes.mutable_data(), &err);
  if (!kvd::ok(st)) raise_plan_error(p, err);
  return py::make_tuple(addrs, sizes);
}

}  // namespace

KVD_BINDINGS(20, layout) {
  py::class_<Planner>(m, "Planner", "Slots of N pages -> per-page (address, length) segments (csrc/layout/layout.h)")
      .def(py::init([](uint64_t page_size, uint64_t num_pages, uint32_t planes_per_layer, const U64& bases,
                       const U64& page_strides, const U64& seg_bytes) {
             if (bases.ndim() != 1 || page_strides.ndim() != 1 || seg_bytes.ndim() != 1 ||
                 bases.shape(0) != page_strides.shape(0) || bases.shape(0) != seg_bytes.shape(0))
               throw py::value_error("bases, page_strides and seg_bytes must be 1-D of equal length");
             std::vector<kvd::layout::Plane> planes(bases.shape(0));
             for (size_t j = 0; j < planes.size(); ++j) planes[j] = {bases.at(j), page_strides.at(j), seg_bytes.at(j)};
             return new Planner(page_size, num_pages, planes_per_layer, std::move(planes));
           }),
           py::arg("page_size"), py::arg("num_pages"), py::arg("planes_per_layer"), py::arg("bases"),
           py::arg("page_strides"), py::arg("seg_bytes"))
      .def_property_readonly("page_size", &Planner::page_size)
      .def_property_readonly("num_pages", &Planner::num_pages)
      .def_property_readonly("num_layers", &Planner::num_layers)
      .def_property_readonly("segments_per_page", &Planner::segments_per_page)
      .def_property_readonly("object_bytes", &Planner::object_bytes)
      .def("layer_offsets", [](const Planner& p) {
        const auto& v = p.layer_offsets();
        U64 out(v.size());
        std::copy(v.begin(), v.end(), out.mutable_data());
        return out;
      })
      .def("plan", &plan, py::arg("slots"), py::arg("per_token") = false, py::arg("layer") = -1,
           "(addrs, sizes) uint64 [pages, S]; S = all segments, or one layer's when layer >= 0")
      .def("pages", [](const Planner& p, const I64& slots, bool per_token) {
        if (slots.ndim() != 1) throw py::value_error("page slots must be a 1-D int64 array");
        const uint64_t n = static_cast<uint64_t>(slots.shape(0));
        if (per_token && n % p.page_size() != 0) raise_plan_error(p, {static_cast<int64_t>(n), 0, PlanError::kBadLength});
        U64 out(per_token ? n / p.page_size() : n);
        PlanError err;
        if (!kvd::ok(p.pages(slots.data(), n, per_token, out.mutable_data(), &err))) raise_plan_error(p, err);
        return out;
      }, py::arg("slots"), py::arg("per_token") = false, "validated page index of each page");
}
