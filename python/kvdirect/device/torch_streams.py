"""Streams, events and page-locked host buffers through torch's device modules.

``torch.cuda``, ``torch.npu`` (registered by torch_npu) and ``torch.cpu`` share
one API (``Stream``, ``Event``, ``current_stream``, ``stream(...)``), so CUDA
and Ascend use the same code; only the raw stream handle a kernel library
takes differs (``cuda_stream`` / ``npu_stream``).
"""
from __future__ import annotations

from kvdirect.device.base import HostBuffer


class TorchStreams:
    """Mixin for a DeviceOps whose streams and events are torch's."""

    def _init_streams(self, kind: str, index: int) -> None:
        import torch

        self._torch = torch
        self._mod = getattr(torch, kind)
        self._tdev = torch.device(kind, index) if kind != "cpu" else torch.device("cpu")

    def host_buffer(self, nbytes: int) -> HostBuffer:
        torch = self._torch
        pin = self._tdev.type != "cpu"  # DMA from pageable memory is not ordered by the stream
        t = torch.empty(int(nbytes), dtype=torch.uint8, pin_memory=pin)
        return HostBuffer(int(t.data_ptr()), int(nbytes), t)

    def stream(self):
        return self._mod.Stream(device=self._tdev) if self._tdev.type != "cpu" else self._mod.Stream()

    def compute_event(self):
        ev = self._mod.Event()
        ev.record(self._mod.current_stream(self._tdev) if self._tdev.type != "cpu" else self._mod.current_stream())
        return ev

    def record(self, stream):
        ev = self._mod.Event()
        ev.record(stream)
        return ev

    def _on(self, stream):
        """Context that makes ``stream`` current for torch ops."""
        return self._mod.stream(stream)

    @staticmethod
    def _raw(stream) -> int:
        for name in ("cuda_stream", "npu_stream"):
            h = getattr(stream, name, None)
            if h is not None:
                return int(h)
        return 0
