"""Launch through kvdirect's copy engines: CPU threads, the CUDA kernels, the Ascend C kernels."""
from __future__ import annotations

from kvdirect.device.base import DeviceOps, HostBuffer, layer_segments
from kvdirect.device.torch_streams import TorchStreams


class EngineOps(DeviceOps):
    """Pages <-> packed host objects with one copy-engine call per launch."""

    def __init__(self, device: str, layout, engine):
        super().__init__(device, layout)
        self._engine = engine

    @property
    def engine(self):
        return self._engine

    def _raw(self, stream) -> int:
        return 0

    def to_host(self, page_slots, host: HostBuffer, stream) -> None:
        n = len(page_slots) * self.layout.page_bytes
        self.engine.gather(self.layout.plan(page_slots, per_token=False), host.addr, n, stream=self._raw(stream))

    def to_device(self, page_slots, host: HostBuffer, stream, layer=None) -> None:
        if layer is None:
            n = len(page_slots) * self.layout.page_bytes
            self.engine.scatter(self.layout.plan(page_slots, per_token=False), host.addr, n, stream=self._raw(stream))
        else:
            src, dst, sizes = layer_segments(self.layout, page_slots, host.addr, layer)
            self.engine.copy_segments(src, dst, sizes, stream=self._raw(stream))


class CpuOps(EngineOps):
    """Host memory: the C++ copy engine, synchronous."""

    kind = "cpu"
    host_addressable = True

    def __init__(self, layout):
        super().__init__("cpu", layout, None)

    @property
    def engine(self):
        # created on first use: only staged transfers copy, and its thread pool costs threads
        if self._engine is None:
            from kvdirect.copy import CopyEngine

            self._engine = CopyEngine(device="cpu")
        return self._engine


class CudaOps(TorchStreams, EngineOps):
    """CUDA: the kernels of libkvdirect_cuda.so read and write the pinned host buffer
    directly (mapped into the device's address space), on a torch CUDA stream."""

    kind = "cuda"
    asynchronous = True

    def __init__(self, index: int, layout, engine):
        EngineOps.__init__(self, f"cuda:{index}", layout, engine)
        self._init_streams("cuda", index)


class NpuKernelOps(TorchStreams, EngineOps):
    """Ascend: the Ascend C kernels of libkvdirect_ascend.so gather/scatter between the
    pages and a device scratch buffer; torch_npu moves the scratch to/from the pinned
    host buffer on the same stream. Unverified: no NPU on the development machines."""

    kind = "npu"
    asynchronous = True

    def __init__(self, index: int, layout, engine):
        EngineOps.__init__(self, f"npu:{index}", layout, engine)
        self._init_streams("npu", index)
        self._scratch: dict = {}  # stream -> device scratch (used in stream order only)

    def _scratch_for(self, stream, nbytes: int):
        t = self._scratch.get(id(stream))
        if t is None or t.numel() < nbytes:
            with self._on(stream):
                t = self._torch.empty(nbytes, dtype=self._torch.uint8, device=self._tdev)
            self._scratch[id(stream)] = t
        return t

    def to_host(self, page_slots, host: HostBuffer, stream) -> None:
        n = len(page_slots) * self.layout.page_bytes
        scratch = self._scratch_for(stream, n)
        self.engine.gather(self.layout.plan(page_slots, per_token=False), int(scratch.data_ptr()), n,
                           stream=self._raw(stream))
        with self._on(stream):
            host.owner[:n].copy_(scratch[:n], non_blocking=True)

    def to_device(self, page_slots, host: HostBuffer, stream, layer=None) -> None:
        obj = self.layout.page_bytes
        n = len(page_slots) * obj
        scratch = self._scratch_for(stream, n)
        with self._on(stream):
            if layer is None:
                scratch[:n].copy_(host.owner[:n], non_blocking=True)
            else:  # only this layer's bytes of each object
                lo, hi = (int(x) for x in self.layout.layer_offsets()[layer:layer + 2])
                scratch[:n].view(-1, obj)[:, lo:hi].copy_(host.owner[:n].view(-1, obj)[:, lo:hi], non_blocking=True)
        if layer is None:
            self.engine.scatter(self.layout.plan(page_slots, per_token=False), int(scratch.data_ptr()), n,
                                stream=self._raw(stream))
        else:
            src, dst, sizes = layer_segments(self.layout, page_slots, int(scratch.data_ptr()), layer)
            self.engine.copy_segments(src, dst, sizes, stream=self._raw(stream))

