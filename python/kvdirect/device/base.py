"""What the ordered transfer path needs from a device: the launch layer's contract.

A :class:`DeviceOps` launches page copies between a KV layout's device pages
and a host buffer on a stream, and gives the streams, events and page-locked
host buffers that order them. It never decides *when* to wait: that is the
shared ordering logic in :mod:`kvdirect.cache.transfer`, written once for every
device. Synchronous devices (CPU) return ``None`` for streams and events and
complete every copy before the launch returns.

Copies address pages by their device slots (``page_slots``: the first slot of
each page, page aligned) and the host buffer holds whole page objects back to
back (page ``i`` at ``host.addr + i * layout.page_bytes``, the pool's object
format); ``layer=l`` moves only bytes ``[layer_offsets()[l], layer_offsets()[l+1])``
of each object.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(eq=False)
class HostBuffer:
    """A host buffer the device can copy to and from (page-locked where it must be)."""

    addr: int
    nbytes: int
    owner: object  # numpy array or torch tensor that owns the memory (kept alive here)


class DeviceOps:
    """Launch layer of one device kind (see the module docstring)."""

    #: "cpu", "cuda", "npu" or "sim"
    kind = "cpu"
    #: copies complete after their stream reaches them, not when the launch returns
    asynchronous = False
    #: a store can read/write this device's pages as ordinary host memory (cpu, sim)
    host_addressable = False

    def __init__(self, device: str, layout):
        self.device = device
        self.layout = layout

    # ---- memory ----------------------------------------------------------------
    def host_buffer(self, nbytes: int) -> HostBuffer:
        a = np.empty(int(nbytes), dtype=np.uint8)
        return HostBuffer(int(a.ctypes.data), int(nbytes), a)

    # ---- streams and events ----------------------------------------------------
    def stream(self):
        """A new stream for transfers (None: copies are synchronous)."""
        return None

    def compute_event(self):
        """An event recorded now on the calling thread's current stream (device streams are
        current per host thread: call this on the engine's forward thread)."""
        return None

    def record(self, stream):
        """An event recorded on ``stream`` after the work launched so far."""
        return None

    # Streams and events of every asynchronous kind (torch's CUDA/NPU, the simulated
    # device) offer ``stream.wait_event(ev)`` and ``ev.synchronize()``; synchronous
    # kinds record no events (None), so there is nothing to wait for. ``event`` may be
    # a tuple of events (a compute event on two streams): all of them.
    def wait(self, stream, event) -> None:
        """Work launched on ``stream`` from now on starts after ``event`` (device side)."""
        for ev in _events(event):
            stream.wait_event(ev)

    def synchronize(self, event) -> None:
        """Block the calling thread until ``event`` has completed."""
        for ev in _events(event):
            ev.synchronize()

    # ---- copies (launched on ``stream``) -----------------------------------------
    def to_host(self, page_slots: np.ndarray, host: HostBuffer, stream) -> None:
        """Gather the pages' objects into ``host`` (packed, page i at i * page_bytes)."""
        raise NotImplementedError

    def to_device(self, page_slots: np.ndarray, host: HostBuffer, stream, layer: int | None = None) -> None:
        """Scatter the objects in ``host`` into the pages (every layer, or only ``layer``)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device})"


def _events(event) -> tuple:
    if event is None:
        return ()
    return tuple(e for e in event if e is not None) if isinstance(event, tuple) else (event,)


def layer_segments(layout, page_slots: np.ndarray, host_addr: int, layer: int):
    """(host src, device dst, sizes) uint64 triples of one layer of packed page objects."""
    seg = layout.plan_layer(page_slots, layer, per_token=False)
    n, k = seg.sizes.shape
    within = np.cumsum(seg.sizes, axis=1, dtype=np.uint64) - seg.sizes  # offset inside the layer
    base = (np.uint64(host_addr) + np.arange(n, dtype=np.uint64)[:, None] * np.uint64(layout.page_bytes)
            + np.uint64(int(layout.layer_offsets()[layer])))
    return (base + within).reshape(-1), seg.addrs.reshape(-1), seg.sizes.reshape(-1)
