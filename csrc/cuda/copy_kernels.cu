// CUDA gather/scatter for KV pages: libkvdirect_cuda.so, dlopen'ed at run time by
// kvdirect.copy.CopyEngine(device="cuda"). The core never links the CUDA runtime.
//
// C ABI (all return 0 on success, else a kvd::Status code; kvd_cuda_last_error()
// then says why, per calling thread):
//   kvd_cuda_copy_segments(src, dst, sizes, n, device, stream)
//       n (src, dst, len) copies; arrays are host memory.
//   kvd_cuda_gather(addrs, sizes, n, packed, packed_size, to_packed, device, stream)
//       to_packed=1: segments -> packed buffer (segment k at packed + prefix[k]);
//       to_packed=0: the reverse (scatter).
// Everything is enqueued on the caller's stream (a cudaStream_t passed as void*,
// e.g. torch.cuda.current_stream().cuda_stream); nothing synchronises it. The
// segment metadata travels in one device buffer owned by this library:
// cudaMallocAsync + cudaMemcpyAsync on that stream, cudaFreeAsync after the
// kernel, so it is stream-ordered and safe to reuse the host arrays on return.
//
// Work split: each segment is cut into 64 KiB chunks; chunk ids are global and
// a block maps its chunk id back to (segment, offset) with the shared
// kvd::seg::locate_segment over the chunk prefix (csrc/copy/segment_math.h),
// so a few huge segments and many small ones both fill the GPU.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "copy/segment_math.h"

namespace {

constexpr uint64_t kChunk = 64 * 1024;
constexpr int kThreads = 256;
constexpr int kOk = 0, kInvalidArgument = 2, kTooLarge = 9, kUnavailable = 7;

thread_local std::string g_last_error;

int fail(int code, const std::string& msg) {
  g_last_error = msg;
  return code;
}

int cuda_fail(cudaError_t e, const char* what) {
  return fail(kUnavailable, std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

// Copies len bytes with vector type V; every thread of the block takes a stride.
template <typename V>
__device__ __forceinline__ void copy_vec(const char* s, char* d, uint64_t len) {
  const V* sv = reinterpret_cast<const V*>(s);
  V* dv = reinterpret_cast<V*>(d);
  const uint64_t n = len / sizeof(V);
  uint64_t i = threadIdx.x;
  // four loads in flight per thread before the stores
  for (; i + 3 * blockDim.x < n; i += 4 * blockDim.x) {
    V a = sv[i], b = sv[i + blockDim.x], c = sv[i + 2 * blockDim.x], e = sv[i + 3 * blockDim.x];
    dv[i] = a;
    dv[i + blockDim.x] = b;
    dv[i + 2 * blockDim.x] = c;
    dv[i + 3 * blockDim.x] = e;
  }
  for (; i < n; i += blockDim.x) dv[i] = sv[i];
}

__device__ __forceinline__ void copy_bytes(const char* s, char* d, uint64_t len) {
  const uint64_t align = (reinterpret_cast<uint64_t>(s) | reinterpret_cast<uint64_t>(d) | len);
  if ((align & 15) == 0) return copy_vec<uint4>(s, d, len);
  if ((align & 7) == 0) return copy_vec<uint2>(s, d, len);
  if ((align & 3) == 0) return copy_vec<uint32_t>(s, d, len);
  for (uint64_t i = threadIdx.x; i < len; i += blockDim.x) d[i] = s[i];
}

// meta = [src n][dst n][sizes n][chunk_prefix n+1]
__global__ void copy_chunks_kernel(const uint64_t* __restrict__ meta, uint64_t n, uint64_t total_chunks) {
  const uint64_t* src = meta;
  const uint64_t* dst = meta + n;
  const uint64_t* sizes = meta + 2 * n;
  const uint64_t* chunk_prefix = meta + 3 * n;
  for (uint64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const uint64_t k = kvd::seg::locate_segment(chunk_prefix, n, c);
    const uint64_t off = (c - chunk_prefix[k]) * kChunk;
    const uint64_t len = kvd::seg::min_u64(kChunk, sizes[k] - off);
    copy_bytes(reinterpret_cast<const char*>(src[k] + off), reinterpret_cast<char*>(dst[k] + off), len);
  }
}

struct DeviceGuard {
  int prev = -1;
  cudaError_t err = cudaSuccess;
  explicit DeviceGuard(int device) {
    err = cudaGetDevice(&prev);
    if (err == cudaSuccess && prev != device) err = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int cur;
    if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 108;
  if (!cache[device]) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v <= 0) v = 108;
    cache[device] = v;
  }
  return cache[device];
}

// meta already holds src, dst, sizes; computes the chunk prefix and launches.
int launch(std::vector<uint64_t>& meta, uint64_t n, int device, void* stream_ptr) {
  uint64_t chunks = 0;
  meta[3 * n] = 0;
  for (uint64_t k = 0; k < n; ++k) {
    chunks += kvd::seg::chunk_count(meta[2 * n + k], kChunk);
    meta[3 * n + k + 1] = chunks;
  }
  if (chunks == 0) return kOk;
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return cuda_fail(guard.err, "cudaSetDevice");
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const size_t bytes = meta.size() * sizeof(uint64_t);
  void* dmeta = nullptr;
  cudaError_t e = cudaMallocAsync(&dmeta, bytes, stream);
  if (e != cudaSuccess) return cuda_fail(e, "cudaMallocAsync (segment metadata)");
  e = cudaMemcpyAsync(dmeta, meta.data(), bytes, cudaMemcpyHostToDevice, stream);
  if (e != cudaSuccess) {
    cudaFreeAsync(dmeta, stream);
    return cuda_fail(e, "cudaMemcpyAsync (segment metadata)");
  }
  const uint64_t cap = static_cast<uint64_t>(sm_count(device)) * 8;
  const unsigned grid = static_cast<unsigned>(chunks < cap ? chunks : cap);
  copy_chunks_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint64_t*>(dmeta), n, chunks);
  e = cudaGetLastError();
  cudaFreeAsync(dmeta, stream);  // stream-ordered: freed after the kernel ran
  if (e != cudaSuccess) return cuda_fail(e, "copy kernel launch");
  return kOk;
}

}  // namespace

extern "C" {

int kvd_cuda_abi_version(void) { return 1; }

const char* kvd_cuda_last_error(void) { return g_last_error.c_str(); }

int kvd_cuda_device_count(void) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cuda_fail(e, "cudaGetDeviceCount");
    return -1;
  }
  return n;
}

int kvd_cuda_stream_synchronize(void* stream) {
  cudaError_t e = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  return e == cudaSuccess ? kOk : cuda_fail(e, "cudaStreamSynchronize");
}

int kvd_cuda_copy_segments(const uint64_t* src, const uint64_t* dst, const uint64_t* sizes, uint64_t n, int device,
                           void* stream) {
  if (n == 0) return kOk;
  if (!src || !dst || !sizes) return fail(kInvalidArgument, "null segment array");
  std::vector<uint64_t> meta(4 * n + 1);
  for (uint64_t k = 0; k < n; ++k) {
    meta[k] = src[k];
    meta[n + k] = dst[k];
    meta[2 * n + k] = sizes[k];
  }
  return launch(meta, n, device, stream);
}

int kvd_cuda_gather(const uint64_t* addrs, const uint64_t* sizes, uint64_t n, uint64_t packed, uint64_t packed_size,
                    int to_packed, int device, void* stream) {
  if (n == 0) return kOk;
  if (!addrs || !sizes) return fail(kInvalidArgument, "null segment array");
  std::vector<uint64_t> meta(4 * n + 1);
  uint64_t off = 0;
  for (uint64_t k = 0; k < n; ++k) {
    if (sizes[k] > packed_size - off) return fail(kTooLarge, "segments hold more bytes than the packed buffer size");
    meta[to_packed ? k : n + k] = addrs[k];
    meta[to_packed ? n + k : k] = packed + off;
    meta[2 * n + k] = sizes[k];
    off += sizes[k];
  }
  return launch(meta, n, device, stream);
}

}  // extern "C"
