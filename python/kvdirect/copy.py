"""Gather/scatter of KV pages between their device segments and packed page objects.

``CopyEngine(device="cpu")`` (default) runs the C++ engine in ``csrc/copy``: a
persistent thread pool splits each batch by bytes, without the GIL.
``CopyEngine(device="cuda[:N]")`` loads ``libkvdirect_cuda.so`` (built when nvcc
was found) and enqueues one kernel on the caller's stream; pass
``stream=torch.cuda.current_stream().cuda_stream`` (an int; 0 = the legacy
default stream). Nothing is synchronised: the caller orders the stream.
``CopyEngine(device="npu[:N]")`` loads ``libkvdirect_ascend.so`` (built when
CANN was found) the same way; pass ``stream=torch.npu.current_stream().npu_stream``.
Its launcher currently synchronises the stream before returning (see
``csrc/ascend/launch.cpp``). The cache orders all of this through
``kvdirect.device`` and ``kvdirect.cache.transfer``.

* ``gather(scatter, dst, dst_size)``: the segments of a ScatterList are packed
  back to back, row by row: page ``i`` lands at ``dst + i * object_size`` when
  every page has the same segment sizes (always true for a KVLayout plan).
* ``scatter(scatter, src, src_size)``: the reverse.
* ``copy_segments(src_addrs, dst_addrs, sizes)``: generic (src, dst, len) triples.

``dst`` / ``src`` are an integer address (then the size is required) or a
buffer: a numpy array or a torch tensor (its data_ptr and byte size). Raw
addresses are trusted: plan them with a KVLayout, which validates slots.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from kvdirect.errors import BackendUnavailableError, ConfigError, KVDirectError
from kvdirect.stores.base import ScatterList

CUDA_LIB = "libkvdirect_cuda.so"
ASCEND_LIB = "libkvdirect_ascend.so"


def _addr_size(buf, size, what: str) -> tuple[int, int]:
    if isinstance(buf, (int, np.integer)):
        if size is None:
            raise ConfigError(f"{what}: a raw address needs its size in bytes")
        return int(buf), int(size)
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ConfigError(f"{what}: the packed buffer must be contiguous")
        addr, n = int(buf.ctypes.data), int(buf.nbytes)
    elif hasattr(buf, "data_ptr") and hasattr(buf, "element_size"):  # torch.Tensor
        if not buf.is_contiguous():
            raise ConfigError(f"{what}: the packed buffer must be contiguous")
        addr, n = int(buf.data_ptr()), int(buf.numel() * buf.element_size())
    else:
        raise ConfigError(f"{what}: expected an int address, numpy array or torch tensor, got {type(buf).__name__}")
    return addr, n if size is None else min(n, int(size))


def _u64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.uint64).reshape(-1)


def _lib_candidates(name: str, env: str) -> list[Path]:
    out = []
    if os.environ.get(env):
        out.append(Path(os.environ[env]))
    try:  # the installed package dir: next to the extension module (editable installs too)
        from kvdirect import _core

        out.append(Path(_core.__file__).parent / name)
    except ImportError:
        pass
    import kvdirect

    out.append(Path(kvdirect.__file__).parent / name)
    return out


def _cuda_lib_candidates() -> list[Path]:
    return _lib_candidates(CUDA_LIB, "KVDIRECT_CUDA_LIB")


def _open_lib(name: str, env: str, what: str, rebuild: str):
    cands = _lib_candidates(name, env)
    path = next((p for p in cands if p.is_file()), None)
    if path is None:
        raise BackendUnavailableError(
            f"{what}: {name} not found (looked in {', '.join(str(p.parent) for p in cands)}); {rebuild}")
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise BackendUnavailableError(f"{what}: cannot load {path}: {e}") from None


def _raise_status(rc: int, what: str, where: str, err: str) -> None:
    """A device kernel library's non-zero status as the error a caller can act on
    (same codes for the CUDA and the Ascend library)."""
    if rc == 9:
        raise ConfigError(f"{what}: the segments hold more bytes than the packed buffer size")
    if rc == 7:
        raise BackendUnavailableError(f"{what} on {where}: {err}")
    raise KVDirectError(f"{what} on {where} failed (status {rc}): {err}")


class _CudaBackend:
    _lib = None

    def __init__(self, device: int):
        lib = self._load()
        n = lib.kvd_cuda_device_count()
        if n < 0:
            from kvdirect.runtime import cuda_devices

            raise BackendUnavailableError(f"CUDA copy engine: no usable CUDA device: {cuda_devices().detail} "
                                          f"({self._err(lib)}); use CopyEngine(device='cpu') on this machine")
        if device >= n:
            raise BackendUnavailableError(f"CUDA copy engine: device cuda:{device} requested, {n} visible")
        self.device = device
        self.lib = lib

    @classmethod
    def _load(cls):
        if cls._lib is not None:
            return cls._lib
        lib = _open_lib(CUDA_LIB, "KVDIRECT_CUDA_LIB", "CUDA copy engine",
                        "kvdirect was built without nvcc -- reinstall with the CUDA toolkit on PATH (KVDIRECT_CUDA=ON)")
        u64p, u64, vp = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p
        lib.kvd_cuda_last_error.restype = ctypes.c_char_p
        lib.kvd_cuda_device_count.restype = ctypes.c_int
        lib.kvd_cuda_copy_segments.argtypes = [u64p, u64p, u64p, u64, ctypes.c_int, vp]
        lib.kvd_cuda_gather.argtypes = [u64p, u64p, u64, u64, u64, ctypes.c_int, ctypes.c_int, vp]
        lib.kvd_cuda_stream_synchronize.argtypes = [vp]
        cls._lib = lib
        return lib

    @staticmethod
    def _err(lib) -> str:
        return (lib.kvd_cuda_last_error() or b"").decode(errors="replace")

    def _check(self, rc: int, what: str) -> None:
        if rc:
            _raise_status(rc, what, f"cuda:{self.device}", self._err(self.lib))

    def gather(self, addrs, sizes, packed, packed_size, to_packed, stream):
        rc = self.lib.kvd_cuda_gather(addrs.ctypes.data, sizes.ctypes.data, addrs.size, packed, packed_size,
                                      int(to_packed), self.device, ctypes.c_void_p(stream))
        self._check(rc, "gather" if to_packed else "scatter")

    def copy(self, src, dst, sizes, stream):
        rc = self.lib.kvd_cuda_copy_segments(src.ctypes.data, dst.ctypes.data, sizes.ctypes.data, sizes.size,
                                             self.device, ctypes.c_void_p(stream))
        self._check(rc, "copy_segments")

    def synchronize(self, stream):
        self._check(self.lib.kvd_cuda_stream_synchronize(ctypes.c_void_p(stream)), "stream synchronize")


class _AscendBackend:
    """libkvdirect_ascend.so (csrc/ascend): Ascend C gather/scatter launched through ACL.
    Built only with CANN; unverified on the machines kvdirect is developed on."""

    _lib = None

    def __init__(self, device: int):
        self.lib = self._load()
        self.device = device

    @classmethod
    def _load(cls):
        if cls._lib is not None:
            return cls._lib
        lib = _open_lib(ASCEND_LIB, "KVDIRECT_ASCEND_LIB", "Ascend copy engine",
                        "kvdirect was built without CANN -- reinstall with ASCEND_HOME_PATH pointing at a CANN "
                        "toolkit (KVDIRECT_ASCEND=ON), or let the cache move NPU pages with torch_npu ops")
        u64p, u64, vp, u32 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint32
        lib.kvd_ascend_abi_version.restype = ctypes.c_int
        lib.kvd_ascend_last_error.restype = ctypes.c_char_p
        lib.kvd_ascend_copy_segments.argtypes = [u64p, u64p, u64p, u64, ctypes.c_int, vp, u32]
        lib.kvd_ascend_gather.argtypes = [u64p, u64p, u64, u64, u64, ctypes.c_int, ctypes.c_int, vp, u32]
        if lib.kvd_ascend_abi_version() != 1:
            raise BackendUnavailableError(f"Ascend copy engine: {ASCEND_LIB} has ABI "
                                          f"{lib.kvd_ascend_abi_version()}, this kvdirect needs 1: reinstall")
        cls._lib = lib
        return lib

    def _check(self, rc: int, what: str) -> None:
        if rc:
            _raise_status(rc, what, f"npu:{self.device}",
                          (self.lib.kvd_ascend_last_error() or b"").decode(errors="replace"))

    def gather(self, addrs, sizes, packed, packed_size, to_packed, stream):
        rc = self.lib.kvd_ascend_gather(addrs.ctypes.data, sizes.ctypes.data, addrs.size, packed, packed_size,
                                        int(to_packed), self.device, ctypes.c_void_p(stream), 0)
        self._check(rc, "gather" if to_packed else "scatter")

    def copy(self, src, dst, sizes, stream):
        rc = self.lib.kvd_ascend_copy_segments(src.ctypes.data, dst.ctypes.data, sizes.ctypes.data, sizes.size,
                                               self.device, ctypes.c_void_p(stream), 0)
        self._check(rc, "copy_segments")

    def synchronize(self, stream):
        pass  # the launcher synchronises the stream before it returns


class CopyEngine:
    """Gather/scatter KV page segments to/from packed page objects (CPU threads, a CUDA or Ascend kernel)."""

    def __init__(self, threads: int | None = None, device: str = "cpu", *, min_bytes_per_thread: int = 1 << 20):
        dev = str(device)
        if dev == "cpu":
            from kvdirect import _core

            self._cpu = _core.CpuCopyEngine(int(threads or 0), int(min_bytes_per_thread))
            self._cuda = None
            self.device = "cpu"
        elif dev.split(":", 1)[0] in ("cuda", "npu"):
            kind, _, idx = dev.partition(":")
            if idx and not idx.isdigit():
                raise ConfigError(f"CopyEngine device must be 'cpu' or 'cuda[:N]' or 'npu[:N]', got {device!r}")
            idx = int(idx or 0)
            self._cpu = None
            self._cuda = (_CudaBackend if kind == "cuda" else _AscendBackend)(idx)
            self.device = f"{kind}:{idx}"
        else:
            raise ConfigError(f"CopyEngine device must be 'cpu' or 'cuda[:N]' or 'npu[:N]', got {device!r}")

    @property
    def threads(self) -> int:
        return self._cpu.threads if self._cpu is not None else 0

    def gather(self, scatter: ScatterList, dst, dst_size: int | None = None, *, stream: int = 0) -> int:
        """Pack every segment of ``scatter`` into ``dst``; returns the bytes written."""
        return self._pack(scatter, dst, dst_size, True, stream, "gather dst")

    def scatter(self, scatter: ScatterList, src, src_size: int | None = None, *, stream: int = 0) -> int:
        """Unpack ``src`` (packed objects) into the segments of ``scatter``; returns the bytes read."""
        return self._pack(scatter, src, src_size, False, stream, "scatter src")

    def _pack(self, scatter: ScatterList, buf, buf_size, to_packed: bool, stream: int, what: str) -> int:
        addrs, sizes = _u64(scatter.addrs), _u64(scatter.sizes)
        b, n = _addr_size(buf, buf_size, what)
        if self._cpu is not None:
            try:
                (self._cpu.gather if to_packed else self._cpu.scatter)(addrs, sizes, b, n)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        else:
            self._cuda.gather(addrs, sizes, b, n, to_packed, stream)
        return int(sizes.sum(dtype=np.uint64))

    def copy_segments(self, src_addrs, dst_addrs, sizes, *, stream: int = 0) -> int:
        """Copy ``sizes[k]`` bytes from ``src_addrs[k]`` to ``dst_addrs[k]`` for every k."""
        src, dst, sz = _u64(src_addrs), _u64(dst_addrs), _u64(sizes)
        if not (src.size == dst.size == sz.size):
            raise ConfigError(f"copy_segments: {src.size} sources, {dst.size} destinations, {sz.size} sizes")
        if self._cpu is not None:
            self._cpu.copy(src, dst, sz)
        else:
            self._cuda.copy(src, dst, sz, stream)
        return int(sz.sum(dtype=np.uint64))

    def synchronize(self, stream: int = 0) -> None:
        """CUDA: wait for the stream; CPU and Ascend: nothing (their copies complete before returning)."""
        if self._cuda is not None:
            self._cuda.synchronize(stream)

    def __repr__(self) -> str:
        return f"CopyEngine(device={self.device!r}, threads={self.threads})"
