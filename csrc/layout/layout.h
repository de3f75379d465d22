// KV layout planner: device slots of N pages -> per-page scatter lists.
//
// Contract. A device KV pool is described as an ordered list of *planes*, one
// per (layer, K/V) in object order: layer 0 K, layer 0 V, layer 1 K, ... (MLA:
// one plane per layer; Ascend split MLA: nope then rope). Plane j holds, for
// page p, `seg_bytes[j]` contiguous bytes at base[j] + p * page_stride[j].
// Every supported layout reduces to this:
//   MHA / MLA  [num_slots, heads, dim]        page_stride = page_size * row bytes
//   Ascend     [pages + 1, page_size, h, d]   page_stride = stride of dim 0
//   page-first [pages, layers, K/V, P, h, d]  base offset per (layer, K/V)
// The pool object of a page is the concatenation of its planes' segments in
// plane order, so its bytes do not depend on which device layout produced them.
//
// Slots are SGLang token slots; page = slot / page_size. The planner accepts
// either the first slot of each page or every token's slot, validates
// alignment, contiguity and range, and fills [N, S] uint64 arrays in one pass.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"

namespace kvd::layout {

struct Plane {
  uint64_t base;         // address of page 0 of this plane
  uint64_t page_stride;  // bytes between consecutive pages
  uint64_t seg_bytes;    // bytes of one page in this plane (contiguous)
};

// Where planning failed: the offending input index and what was wrong.
struct PlanError {
  int64_t index = -1;  // index into the slot array
  int64_t slot = 0;
  enum Kind { kNone, kUnaligned, kOutOfRange, kNotContiguous, kBadLength, kBadLayer } kind = kNone;
};

class Planner {
 public:
  // planes_per_layer: 2 for K/V (or split MLA), 1 for MLA. num_pages bounds the
  // page index (pages addressable in the pool).
  Planner(uint64_t page_size, uint64_t num_pages, uint32_t planes_per_layer, std::vector<Plane> planes);

  uint64_t page_size() const { return page_size_; }
  uint64_t num_pages() const { return num_pages_; }
  uint32_t num_layers() const { return num_layers_; }
  uint32_t segments_per_page() const { return static_cast<uint32_t>(planes_.size()); }
  uint64_t object_bytes() const { return layer_offset_.back(); }
  // Byte offset of layer l's segments inside a page object; [l] .. [l+1].
  const std::vector<uint64_t>& layer_offsets() const { return layer_offset_; }

  // Number of pages in `slots` (n entries): n, or n / page_size when per_token.
  // Fills addrs/sizes [pages, S] (S = segments_per_page, or planes_per_layer
  // when layer >= 0). kInvalidArgument with *err set on bad input.
  Status plan(const int64_t* slots, uint64_t n, bool per_token, int32_t layer, uint64_t* addrs,
              uint64_t* sizes, PlanError* err) const;

  // Validates slots and writes page indices (n or n / page_size entries).
  Status pages(const int64_t* slots, uint64_t n, bool per_token, uint64_t* out, PlanError* err) const;

 private:
  uint64_t page_size_, num_pages_;
  uint32_t per_layer_, num_layers_;
  std::vector<Plane> planes_;
  std::vector<uint64_t> layer_offset_;
};

}  // namespace kvd::layout
