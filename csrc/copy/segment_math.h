// Index math shared by every copy backend: the CPU engine (csrc/copy), the CUDA
// kernels (csrc/cuda) and the Ascend C kernels (csrc/ascend).
//
// Why one header: the device kernels cannot be run on these machines, so the
// arithmetic they depend on (where a page's segment sits, how a batch of
// segments is split into equal byte ranges per worker, which segment a byte
// offset falls in) lives here and is exercised by the CPU engine and its
// tests. Everything is plain integer arithmetic on uint64, no std library, no
// allocation, so it compiles as host C++, CUDA __host__ __device__ and Ascend C
// __aicore__ code.
//
// Vocabulary: a *segment* is one (address, length) run of bytes; a batch of n
// segments has a byte prefix `prefix[0..n]` (prefix[0] = 0, prefix[k+1] =
// prefix[k] + size[k]) so that its bytes, packed back to back, form one
// contiguous stream of prefix[n] bytes (a gathered page object is exactly that).
#pragma once

#if defined(__CUDACC__)
#define KVD_SEG_FN __host__ __device__ inline
#elif defined(__CCE_AICORE__) || defined(ASCENDC_CPU_DEBUG)
#define KVD_SEG_FN __aicore__ inline
#else
#define KVD_SEG_FN inline
#endif

#if !defined(__CCE_AICORE__)
#include <stdint.h>
#endif

namespace kvd::seg {

// Page index of a slot: the planner's only mapping from SGLang slot ids to
// pages (Ascend pools index pages by slot / page_size too).
KVD_SEG_FN uint64_t page_of_slot(uint64_t slot, uint64_t page_size) { return slot / page_size; }

// Address of one plane's (layer x K/V) bytes for a page: planes are strided by
// page, so an MHA buffer [slots, heads, dim] has page_stride = page_size * row.
KVD_SEG_FN uint64_t plane_page_addr(uint64_t base, uint64_t page_stride, uint64_t page) {
  return base + page * page_stride;
}

// Byte offset of page `page` inside a packed batch of page objects.
KVD_SEG_FN uint64_t object_offset(uint64_t page, uint64_t object_bytes) { return page * object_bytes; }

KVD_SEG_FN uint64_t ceil_div(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

KVD_SEG_FN uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }

// Byte range [*begin, *end) of `total` that worker w of `workers` copies.
// Ranges are contiguous, cover [0, total) exactly once, and their boundaries
// are multiples of `align` (except `total` itself) so workers never share a
// cache line / DMA burst. Workers past the end get an empty range.
KVD_SEG_FN void worker_range(uint64_t total, uint64_t workers, uint64_t w, uint64_t align,
                             uint64_t* begin, uint64_t* end) {
  uint64_t units = ceil_div(total, align);
  uint64_t per = units / workers, extra = units % workers;
  // the first `extra` workers take one more unit
  uint64_t ub = w * per + min_u64(w, extra);
  uint64_t ue = ub + per + (w < extra ? 1 : 0);
  *begin = min_u64(ub * align, total);
  *end = min_u64(ue * align, total);
}

// Index k of the segment holding byte `off` of the packed stream:
// prefix[k] <= off < prefix[k+1]. Zero-length segments are skipped (the
// largest such k is returned). Requires off < prefix[n]. O(log n).
// Ptr is any indexable pointer (host, CUDA global, Ascend __gm__).
template <typename Ptr>
KVD_SEG_FN uint64_t locate_segment(Ptr prefix, uint64_t n, uint64_t off) {
  uint64_t lo = 0, hi = n;  // invariant: prefix[lo] <= off < prefix[hi]
  while (hi - lo > 1) {
    uint64_t mid = lo + (hi - lo) / 2;
    if (prefix[mid] <= off) lo = mid; else hi = mid;
  }
  return lo;
}

// Segment k split into fixed chunks (one GPU block / AI core tile each):
// chunk_prefix[k] = sum over j < k of ceil(size[j] / chunk). locate_segment on
// chunk_prefix maps a global chunk id back to (segment, chunk within it).
KVD_SEG_FN uint64_t chunk_count(uint64_t size, uint64_t chunk) { return ceil_div(size, chunk); }

}  // namespace kvd::seg
