// Ascend C gather/scatter kernel (AI core). Built only with CANN (see
// CMakeLists.txt here); unverified on the CPU machines kvdirect is developed on.
//
// Same contract as the CUDA kernel: n segments (src[k], dst[k], len[k]) in one
// metadata buffer in global memory, laid out [src n][dst n][prefix n+1] where
// prefix is the byte prefix of the lengths. Each AI core copies an equal,
// 32-byte-aligned byte range of the packed stream (kvd::seg::worker_range) and
// finds its first segment with kvd::seg::locate_segment: the same index math
// the CPU engine runs and tests (csrc/copy/segment_math.h).
//
// Data path: GM -> UB -> GM through a double-buffered TQueBind (VECIN to VECOUT,
// no compute stage), DataCopyPad so that lengths and addresses need no 32-byte
// alignment (Atlas A2/A3: 910B/910C).
#include "kernel_operator.h"

#include "copy/segment_math.h"

using namespace AscendC;

namespace {

constexpr uint32_t kTile = 32 * 1024;  // bytes per UB tile; 2 tiles in flight
constexpr int32_t kBuffers = 2;

class SegmentCopy {
 public:
  __aicore__ inline SegmentCopy() {}

  __aicore__ inline void Init(GM_ADDR meta, uint64_t n) {
    meta_ = reinterpret_cast<__gm__ uint64_t*>(meta);
    n_ = n;
    pipe_.InitBuffer(queue_, kBuffers, kTile);
  }

  __aicore__ inline void Process() {
    __gm__ uint64_t* src = meta_;
    __gm__ uint64_t* dst = meta_ + n_;
    __gm__ uint64_t* prefix = meta_ + 2 * n_;
    const uint64_t total = prefix[n_];
    uint64_t off, end;
    kvd::seg::worker_range(total, GetBlockNum(), GetBlockIdx(), 32, &off, &end);
    if (off >= end) return;
    uint64_t k = kvd::seg::locate_segment(prefix, n_, off);
    while (off < end) {
      const uint64_t in_seg = off - prefix[k];
      const uint64_t len = kvd::seg::min_u64(end, prefix[k + 1]) - off;
      CopyRun(src[k] + in_seg, dst[k] + in_seg, len);
      off += len;
      ++k;
    }
  }

 private:
  // One contiguous run, tile by tile.
  __aicore__ inline void CopyRun(uint64_t s, uint64_t d, uint64_t len) {
    for (uint64_t done = 0; done < len; done += kTile) {
      const uint32_t bytes = static_cast<uint32_t>(kvd::seg::min_u64(kTile, len - done));
      GlobalTensor<uint8_t> gs, gd;
      gs.SetGlobalBuffer(reinterpret_cast<__gm__ uint8_t*>(s + done), bytes);
      gd.SetGlobalBuffer(reinterpret_cast<__gm__ uint8_t*>(d + done), bytes);
      DataCopyExtParams params{1, bytes, 0, 0, 0};
      DataCopyPadExtParams<uint8_t> pad{false, 0, 0, 0};
      LocalTensor<uint8_t> t = queue_.AllocTensor<uint8_t>();
      DataCopyPad(t, gs, params, pad);
      queue_.EnQue(t);
      t = queue_.DeQue<uint8_t>();
      DataCopyPad(gd, t, params);
      queue_.FreeTensor(t);
    }
  }

  TPipe pipe_;
  TQueBind<TPosition::VECIN, TPosition::VECOUT, kBuffers> queue_;
  __gm__ uint64_t* meta_ = nullptr;
  uint64_t n_ = 0;
};

}  // namespace

extern "C" __global__ __aicore__ void kvd_copy_segments(GM_ADDR meta, uint64_t n) {
  SegmentCopy op;
  op.Init(meta, n);
  op.Process();
}
