"""Launch with torch tensor ops: the copy path where kvdirect's kernels are not built.

Each plane of the layout (one per layer and K/V, in object order) is viewed as
a ``[num_pages, seg_bytes]`` uint8 tensor over the engine's own KV tensors; a
gather is one ``index_select`` per plane, a ``cat`` into packed objects and one
copy to the pinned host buffer; a scatter is the reverse with ``index_copy_``.
Everything runs on the transfer stream, so the shared ordering logic orders it
like a kernel. This serves Ascend NPUs through torch_npu when the Ascend C
library was not built (and CUDA without the CUDA kernels); it issues one op per
plane (2 x layers), vectorised over pages, where the kernels issue one launch.
"""
from __future__ import annotations

import numpy as np

from kvdirect.device.base import DeviceOps, HostBuffer
from kvdirect.device.torch_streams import TorchStreams
from kvdirect.errors import BackendUnavailableError


def _tensors(x, out: list) -> list:
    if isinstance(x, (list, tuple)):
        for y in x:
            _tensors(y, out)
    elif hasattr(x, "untyped_storage") and hasattr(x, "data_ptr"):
        out.append(x)
    return out


def plane_views(layout, torch) -> tuple[list, np.ndarray]:
    """[num_pages, seg_bytes] uint8 views of every plane over the layout's tensors, and
    each plane's byte offset inside a page object."""
    P, n = layout.page_size, layout.num_pages
    sc = layout.plan(np.array([0, P] if n > 1 else [0], np.int64), per_token=False)
    bases, segs = sc.addrs[0].astype(np.int64), sc.sizes[0].astype(np.int64)
    strides = (sc.addrs[1] - sc.addrs[0]).astype(np.int64) if n > 1 else segs
    storages = []
    for t in _tensors(getattr(layout, "_refs", ()), []):
        st = t.untyped_storage()
        u8 = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
        storages.append((int(st.data_ptr()), int(st.data_ptr()) + int(st.nbytes()), u8))
    if not storages:
        raise BackendUnavailableError(
            f"no copy path for KV pages on {layout.device}: the layout was built from raw addresses, so torch "
            "cannot move its pages; build it from the engine's KV tensors (KVLayout.from_mha/from_mla/"
            "from_ascend/page_first) or install kvdirect with its device kernels")
    views = []
    for base, seg, stride in zip(bases.tolist(), segs.tolist(), strides.tolist()):
        end = base + (n - 1) * stride + seg
        owner = next((s for s in storages if s[0] <= base and end <= s[1]), None)
        if owner is None:
            raise BackendUnavailableError(f"a plane of the {layout.device} layout at 0x{base:x} lies outside the "
                                          "tensors it was built from; rebuild the layout from the live KV tensors")
        views.append(owner[2].as_strided((n, seg), (stride, 1), base - owner[0]))
    offsets = np.concatenate([[0], np.cumsum(segs)]).astype(np.int64)
    return views, offsets


class TensorOps(TorchStreams, DeviceOps):
    """Pages moved with torch ops on a torch stream of ``kind`` (npu, cuda; cpu in tests)."""

    asynchronous = True

    def __init__(self, kind: str, index: int, layout):
        DeviceOps.__init__(self, "cpu" if kind == "cpu" else f"{kind}:{index}", layout)
        self.kind = kind
        self.host_addressable = kind == "cpu"
        self._init_streams(kind, index)
        self.planes, self.offsets = plane_views(layout, self._torch)
        self._per_layer = len(self.planes) // layout.num_layers

    def _index(self, page_slots):
        pages = self.layout.page_indices(page_slots, per_token=False).astype(np.int64)
        return self._torch.as_tensor(pages, device=self._tdev)

    def to_host(self, page_slots, host: HostBuffer, stream) -> None:
        n, obj = len(page_slots), self.layout.page_bytes
        with self._on(stream):
            idx = self._index(page_slots)
            packed = self._torch.cat([pl.index_select(0, idx) for pl in self.planes], dim=1)
            host.owner[:n * obj].view(n, obj).copy_(packed, non_blocking=True)

    def to_device(self, page_slots, host: HostBuffer, stream, layer=None) -> None:
        n, obj = len(page_slots), self.layout.page_bytes
        js = range(len(self.planes)) if layer is None else range(layer * self._per_layer,
                                                                  (layer + 1) * self._per_layer)
        lo, hi = int(self.offsets[js[0]]), int(self.offsets[js[-1] + 1])
        with self._on(stream):
            idx = self._index(page_slots)
            src = host.owner[:n * obj].view(n, obj)[:, lo:hi].to(self._tdev, non_blocking=True)
            for j in js:  # one op per plane, vectorised over pages
                a = int(self.offsets[j]) - lo
                self.planes[j].index_copy_(0, idx, src[:, a:a + int(self.offsets[j + 1] - self.offsets[j])])
