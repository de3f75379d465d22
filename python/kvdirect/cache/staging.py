"""Bounded host staging buffers for stores that cannot address device memory.

Buffers are allocated by the device's launch layer (page-locked where the
device needs it: CUDA/NPU pinned memory) and registered with the store once,
when created. A buffer is used by one transfer at a time (``acquire`` /
``release``). A buffer whose store call timed out is *retired*: the abandoned
call may still read or write it, so it is never handed out again until the
store reports that no abandoned call is left (``recycle``, run from the cache's
quarantine once the store is quiet).
"""
from __future__ import annotations

import threading

from kvdirect.device import DeviceOps, HostBuffer


class StagingPool:
    def __init__(self, ops: DeviceOps, store, nbytes: int):
        self.ops, self.store, self.nbytes = ops, store, int(nbytes)
        self._free: list[HostBuffer] = []
        self._retired: list[HostBuffer] = []
        self.buffers: list[HostBuffer] = []  # every buffer ever created (registered once each)
        self._lock = threading.Lock()

    def acquire(self) -> HostBuffer:
        with self._lock:
            if self._free:
                return self._free.pop()
        buf = self.ops.host_buffer(self.nbytes)
        self.store.register(buf.addr, buf.nbytes, memory="host")
        with self._lock:
            self.buffers.append(buf)
        return buf

    def release(self, buf: HostBuffer) -> None:
        with self._lock:
            self._free.append(buf)

    def retire(self, buf: HostBuffer) -> None:
        """A timed-out store call may still use ``buf``: keep it out of use until recycled."""
        with self._lock:
            self._retired.append(buf)

    def recycle(self, buf: HostBuffer) -> None:
        """The store call that retired ``buf`` is over: it can be used again."""
        with self._lock:
            self._retired.remove(buf)
            self._free.append(buf)

    @property
    def retired(self) -> int:
        return len(self._retired)
