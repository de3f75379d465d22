#include <stdexcept>

#include "copy/segment_math.h"
#include "layout/layout.h"

namespace kvd::layout {

Planner::Planner(uint64_t page_size, uint64_t num_pages, uint32_t planes_per_layer, std::vector<Plane> planes)
    : page_size_(page_size), num_pages_(num_pages), per_layer_(planes_per_layer), planes_(std::move(planes)) {
  if (page_size_ == 0 || per_layer_ == 0 || planes_.empty() || planes_.size() % per_layer_ != 0)
    throw std::invalid_argument("planner: page_size and planes_per_layer must be > 0 and divide the planes");
  num_layers_ = static_cast<uint32_t>(planes_.size() / per_layer_);
  layer_offset_.assign(num_layers_ + 1, 0);
  for (uint32_t l = 0; l < num_layers_; ++l) {
    uint64_t b = 0;
    for (uint32_t k = 0; k < per_layer_; ++k) b += planes_[l * per_layer_ + k].seg_bytes;
    layer_offset_[l + 1] = layer_offset_[l] + b;
  }
}

Status Planner::pages(const int64_t* slots, uint64_t n, bool per_token, uint64_t* out, PlanError* err) const {
  const uint64_t P = page_size_;
  if (per_token && n % P != 0) {
    *err = {static_cast<int64_t>(n), 0, PlanError::kBadLength};
    return Status::kInvalidArgument;
  }
  const uint64_t npages = per_token ? n / P : n;
  const uint64_t step = per_token ? P : 1;
  for (uint64_t i = 0; i < npages; ++i) {
    const int64_t s = slots[i * step];
    if (s < 0 || static_cast<uint64_t>(s) % P != 0) {
      *err = {static_cast<int64_t>(i * step), s, s < 0 ? PlanError::kOutOfRange : PlanError::kUnaligned};
      return Status::kInvalidArgument;
    }
    const uint64_t page = seg::page_of_slot(static_cast<uint64_t>(s), P);
    if (page >= num_pages_) {
      *err = {static_cast<int64_t>(i * step), s, PlanError::kOutOfRange};
      return Status::kInvalidArgument;
    }
    if (per_token) {
      // a page's tokens must occupy its slots in order: slot0, slot0+1, ...
      const int64_t* t = slots + i * P;
      for (uint64_t j = 1; j < P; ++j)
        if (t[j] != s + static_cast<int64_t>(j)) {
          *err = {static_cast<int64_t>(i * P + j), t[j], PlanError::kNotContiguous};
          return Status::kInvalidArgument;
        }
    }
    out[i] = page;
  }
  return Status::kOk;
}

Status Planner::plan(const int64_t* slots, uint64_t n, bool per_token, int32_t layer, uint64_t* addrs,
                     uint64_t* sizes, PlanError* err) const {
  uint32_t p0 = 0, S = segments_per_page();
  if (layer >= 0) {
    if (static_cast<uint32_t>(layer) >= num_layers_) {
      *err = {-1, layer, PlanError::kBadLayer};
      return Status::kInvalidArgument;
    }
    p0 = static_cast<uint32_t>(layer) * per_layer_;
    S = per_layer_;
  }
  const uint64_t npages = per_token ? n / page_size_ : n;
  // validate everything before writing: a rejected call leaves no partial plan
  std::vector<uint64_t> page(npages);
  Status st = pages(slots, n, per_token, page.data(), err);
  if (!ok(st)) return st;
  const Plane* pl = planes_.data() + p0;
  for (uint64_t i = 0; i < npages; ++i) {
    uint64_t* a = addrs + i * S;
    uint64_t* z = sizes + i * S;
    for (uint32_t j = 0; j < S; ++j) {
      a[j] = seg::plane_page_addr(pl[j].base, pl[j].page_stride, page[i]);
      z[j] = pl[j].seg_bytes;
    }
  }
  return Status::kOk;
}

}  // namespace kvd::layout
