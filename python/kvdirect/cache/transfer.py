"""The transfer path between device pages and the pool.

Direct: the store reads/writes the device pages itself (``Store.get`` / ``put``
on the layout's scatter list). Staged: for stores that cannot address device
memory, pages travel through bounded host staging buffers (one per role and
thread, registered with the store once) and the copy engine gathers/scatters
them chunk by chunk.
"""
from __future__ import annotations

import threading

import numpy as np

from kvdirect.stores import ScatterList
from kvdirect.stores.base import OK, UNAVAILABLE


def first_failure(status: np.ndarray) -> int:
    """Index of the first non-OK status (len(status) if all OK)."""
    bad = np.flatnonzero(status != OK)
    return int(bad[0]) if bad.size else len(status)


class Transfer:
    def __init__(self, store, layout, config):
        self.store = store
        self.layout = layout
        self.config = config
        self.stage = config.stage if config.stage is not None else (
            layout.device != "cpu" and not store.supports_device_memory)
        if not self.stage:
            kind = "host" if layout.device == "cpu" else "device"
            for addr, length in layout.regions():
                store.register(addr, length, memory=kind)
        self.staging: dict = {}  # (role, thread) -> bounded host buffer
        self._copy = None

    # ---- pool -> device -------------------------------------------------------
    def get(self, keys: list, scatter: ScatterList) -> np.ndarray:
        if not self.stage:
            return np.asarray(self.store.get(keys, scatter), dtype=np.int32)
        # pool -> bounded host staging buffer -> device pages (copy engine), chunk by chunk
        status = np.full(len(keys), UNAVAILABLE, dtype=np.int32)
        buf = self._staging_buffer("get")
        for lo, hi, host in self._staged_chunks(buf, scatter):
            st = np.asarray(self.store.get(keys[lo:hi], host), dtype=np.int32)
            status[lo:hi] = st
            n_ok = first_failure(st)
            if n_ok:
                self._copy_engine().scatter(scatter.take(slice(lo, lo + n_ok)), buf.ctypes.data,
                                            int(host.object_sizes[:n_ok].sum()))
            if n_ok < hi - lo:
                break  # loading stops at the first failed page
        return status

    # ---- device -> pool -------------------------------------------------------
    def put(self, keys: list, scatter: ScatterList) -> np.ndarray:
        if not self.stage:
            return np.asarray(self.store.put(keys, scatter), dtype=np.int32)
        status = np.empty(len(keys), dtype=np.int32)
        buf = self._staging_buffer("put")
        for lo, hi, host in self._staged_chunks(buf, scatter):
            self._copy_engine().gather(scatter.take(slice(lo, hi)), buf.ctypes.data,
                                       int(host.object_sizes.sum()))
            status[lo:hi] = np.asarray(self.store.put(keys[lo:hi], host), dtype=np.int32)
        return status

    def device_event(self):
        """An event on the compute stream that produced the pages (CPU: none)."""
        dev = self.layout.device
        if dev.startswith("cuda"):
            import torch
            ev = torch.cuda.Event()
            ev.record()
            return ev
        if dev.startswith("npu"):
            import torch
            ev = torch.npu.Event()  # torch_npu registers torch.npu
            ev.record()
            return ev
        return None

    # ---- staging ---------------------------------------------------------------
    def _staging_buffer(self, role: str) -> np.ndarray:
        """One bounded host buffer per role and thread, registered with the store once."""
        key = (role, threading.get_ident())
        buf = self.staging.get(key)
        if buf is None:
            buf = np.empty(max(self.config.staging_bytes, self.layout.page_bytes), dtype=np.uint8)
            self.staging[key] = buf
            self.store.register(buf.ctypes.data, buf.nbytes, memory="host")
        return buf

    def _staged_chunks(self, buf: np.ndarray, scatter: ScatterList):
        """(lo, hi, host scatter list) chunks of whole page objects that fit the buffer."""
        obj = self.layout.page_bytes
        per = max(1, buf.nbytes // obj)
        base = buf.ctypes.data
        for lo in range(0, len(scatter), per):
            hi = min(len(scatter), lo + per)
            offs = base + np.arange(hi - lo, dtype=np.uint64) * np.uint64(obj)
            yield lo, hi, ScatterList(offs, np.full(hi - lo, obj, dtype=np.uint64))

    def _copy_engine(self):
        if self._copy is None:
            from kvdirect.copy import CopyEngine
            self._copy = CopyEngine(device=self.layout.device)
        return self._copy
