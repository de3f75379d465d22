// ACL launch of the Ascend copy kernel: libkvdirect_ascend.so, dlopen'ed at run
// time like the CUDA library. Built only with CANN; unverified here.
//
// C ABI (0 = OK, else a kvd::Status code; kvd_ascend_last_error() says why):
//   kvd_ascend_copy_segments(src, dst, sizes, n, device, stream, block_dim)
//   kvd_ascend_gather(addrs, sizes, n, packed, packed_size, to_packed, device, stream, block_dim)
// stream is an aclrtStream (torch_npu: torch.npu.current_stream().npu_stream).
// The metadata buffer is device memory owned here: aclrtMalloc, copied with
// aclrtMemcpyAsync on the caller's stream, and freed after the stream reaches
// it (this version synchronises the stream before freeing: correct, not yet
// asynchronous; a callback-based free is the next step).
#include <acl/acl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "aclrtlaunch_kvd_copy_segments.h"
#include "copy/segment_math.h"

namespace {
constexpr int kOk = 0, kInvalidArgument = 2, kTooLarge = 9, kUnavailable = 7;
thread_local std::string g_err;

int fail(int code, const std::string& m) {
  g_err = m;
  return code;
}

int acl_fail(aclError e, const char* what) {
  const char* msg = aclGetRecentErrMsg();
  return fail(kUnavailable, std::string(what) + " failed: ACL error " + std::to_string(e) + (msg ? std::string(": ") + msg : ""));
}

// meta = [src n][dst n][prefix n+1]; src/dst already filled.
int launch(std::vector<uint64_t>& meta, uint64_t n, const uint64_t* sizes, int device, void* stream, uint32_t block_dim) {
  uint64_t total = 0;
  meta[2 * n] = 0;
  for (uint64_t k = 0; k < n; ++k) {
    total += sizes[k];
    meta[2 * n + k + 1] = total;
  }
  if (total == 0) return kOk;
  aclError e = aclrtSetDevice(device);
  if (e != ACL_SUCCESS) return acl_fail(e, "aclrtSetDevice");
  const size_t bytes = meta.size() * sizeof(uint64_t);
  void* dmeta = nullptr;
  e = aclrtMalloc(&dmeta, bytes, ACL_MEM_MALLOC_HUGE_FIRST);
  if (e != ACL_SUCCESS) return acl_fail(e, "aclrtMalloc (segment metadata)");
  auto s = static_cast<aclrtStream>(stream);
  e = aclrtMemcpyAsync(dmeta, bytes, meta.data(), bytes, ACL_MEMCPY_HOST_TO_DEVICE, s);
  if (e == ACL_SUCCESS) {
    uint32_t blocks = block_dim ? block_dim : 24;
    uint64_t units = kvd::seg::ceil_div(total, 32);
    if (units < blocks) blocks = static_cast<uint32_t>(units);
    e = static_cast<aclError>(ACLRT_LAUNCH_KERNEL(kvd_copy_segments)(blocks, s, dmeta, n));
    // the host metadata and dmeta must outlive the copy and the kernel
    aclError se = aclrtSynchronizeStream(s);
    if (e == ACL_SUCCESS) e = se;
  }
  aclrtFree(dmeta);
  return e == ACL_SUCCESS ? kOk : acl_fail(e, "kvd_copy_segments launch");
}
}  // namespace

extern "C" {

int kvd_ascend_abi_version(void) { return 1; }
const char* kvd_ascend_last_error(void) { return g_err.c_str(); }

int kvd_ascend_copy_segments(const uint64_t* src, const uint64_t* dst, const uint64_t* sizes, uint64_t n, int device,
                             void* stream, uint32_t block_dim) {
  if (n == 0) return kOk;
  if (!src || !dst || !sizes) return fail(kInvalidArgument, "null segment array");
  std::vector<uint64_t> meta(3 * n + 1);
  for (uint64_t k = 0; k < n; ++k) {
    meta[k] = src[k];
    meta[n + k] = dst[k];
  }
  return launch(meta, n, sizes, device, stream, block_dim);
}

int kvd_ascend_gather(const uint64_t* addrs, const uint64_t* sizes, uint64_t n, uint64_t packed, uint64_t packed_size,
                      int to_packed, int device, void* stream, uint32_t block_dim) {
  if (n == 0) return kOk;
  if (!addrs || !sizes) return fail(kInvalidArgument, "null segment array");
  std::vector<uint64_t> meta(3 * n + 1);
  uint64_t off = 0;
  for (uint64_t k = 0; k < n; ++k) {
    if (sizes[k] > packed_size - off) return fail(kTooLarge, "segments hold more bytes than the packed buffer size");
    meta[to_packed ? k : n + k] = addrs[k];
    meta[to_packed ? n + k : k] = packed + off;
    off += sizes[k];
  }
  return launch(meta, n, sizes, device, stream, block_dim);
}

}  // extern "C"
