"""Small numpy KV pools of every layout kind, with a slow reference for page objects.

Shared by tests/test_layout.py and tests/test_copy.py. Buffers are filled with
random bytes; logical dtypes use numpy stand-ins (uint16 for bf16, uint8 for fp8).
"""
from __future__ import annotations

import numpy as np

from kvdirect import KVLayout

KINDS = ["mha", "mha_vdim", "mha_paged", "mha_paged_kv", "mla", "mla_paged", "mla_paged4", "ascend",
         "ascend_padded", "ascend_mla", "page_first", "page_first_mla", "addresses"]
DTYPES = [(np.uint16, "bfloat16"), (np.float16, "float16"), (np.uint8, "float8_e4m3fn")]


def _rand(rng, shape, np_dtype):
    n = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
    return rng.integers(0, 256, n, dtype=np.uint8).view(np_dtype).reshape(shape)


class Pool:
    """A layout plus its buffers; ref_object(slot) is the page object built slowly in numpy."""

    def __init__(self, kind, rng, *, layers=3, P=4, pages=9, heads=2, dim=8, np_dtype=np.uint16, dtype="bfloat16"):
        self.kind, self.P, self.layers = kind, P, layers
        slots = pages * P
        vdim = 4 if kind == "mha_vdim" else dim
        if kind in ("mha", "mha_vdim", "addresses"):
            self.k = [_rand(rng, (slots, heads, dim), np_dtype) for _ in range(layers)]
            self.v = [_rand(rng, (slots, heads, vdim), np_dtype) for _ in range(layers)]
            if kind == "addresses":
                self.layout = KVLayout.from_addresses([a.ctypes.data for a in self.k], [a.ctypes.data for a in self.v],
                                                      page_size=P, num_slots=slots, kv_heads=heads, head_dim=dim,
                                                      dtype=dtype)
            else:
                self.layout = KVLayout.from_mha(self.k, self.v, P, dtype=dtype)
            self.bufs = self.k + self.v
            self._pieces = lambda s: [x[s:s + P] for kv in zip(self.k, self.v) for x in kv]
        elif kind == "mha_paged":  # per layer [pages, page_size, heads, dim]
            self.k = [_rand(rng, (pages, P, heads, dim), np_dtype) for _ in range(layers)]
            self.v = [_rand(rng, (pages, P, heads, dim), np_dtype) for _ in range(layers)]
            self.layout = KVLayout.from_mha(self.k, self.v, P, dtype=dtype)
            self.bufs = self.k + self.v
            self._pieces = lambda s: [x[s // P] for kv in zip(self.k, self.v) for x in kv]
        elif kind == "mha_paged_kv":  # vLLM-style: per layer one [2, pages, page_size, heads, dim] tensor
            self.kv = [_rand(rng, (2, pages, P, heads, dim), np_dtype) for _ in range(layers)]
            self.k, self.v = [x[0] for x in self.kv], [x[1] for x in self.kv]
            self.layout = KVLayout.from_mha(self.k, self.v, P, dtype=dtype)
            self.bufs = self.kv
            self._pieces = lambda s: [x[s // P] for kv in zip(self.k, self.v) for x in kv]
        elif kind in ("mla_paged", "mla_paged4"):  # per layer [pages, page_size, dim] / [.., 1, dim]
            shape = (pages, P, dim + 4) if kind == "mla_paged" else (pages, P, 1, dim + 4)
            self.kv = [_rand(rng, shape, np_dtype) for _ in range(layers)]
            self.layout = KVLayout.from_mla(self.kv, P, dtype=dtype)
            self.bufs = self.kv
            self._pieces = lambda s: [x[s // P] for x in self.kv]
        elif kind == "mla":
            self.kv = [_rand(rng, (slots, 1, dim + 4), np_dtype) for _ in range(layers)]
            self.layout = KVLayout.from_mla(self.kv, P, dtype=dtype)
            self.bufs = self.kv
            self._pieces = lambda s: [x[s:s + P] for x in self.kv]
        elif kind in ("ascend", "ascend_padded", "ascend_mla"):
            h = 1 if kind == "ascend_mla" else heads
            vd = 4 if kind == "ascend_mla" else dim
            if kind == "ascend_padded":  # page stride larger than a page: pages still contiguous
                self.k = [_rand(rng, (pages, P + 1, h, dim), np_dtype)[:, :P] for _ in range(layers)]
                self.v = [_rand(rng, (pages, P + 1, h, vd), np_dtype)[:, :P] for _ in range(layers)]
            else:
                self.k = [_rand(rng, (pages, P, h, dim), np_dtype) for _ in range(layers)]
                self.v = [_rand(rng, (pages, P, h, vd), np_dtype) for _ in range(layers)]
            self.layout = KVLayout.from_ascend(self.k, self.v, P, is_mla=kind == "ascend_mla", dtype=dtype)
            self.bufs = self.k + self.v
            self._pieces = lambda s: [x[s // P] for kv in zip(self.k, self.v) for x in kv]
        elif kind in ("page_first", "page_first_mla"):
            nkv = 2 if kind == "page_first" else 1
            self.buf = _rand(rng, (pages, layers, nkv, P, heads, dim), np_dtype)
            self.layout = KVLayout.page_first(self.buf, dtype=dtype)
            self.bufs = [self.buf]
            self._pieces = lambda s: [self.buf[s // P]]
        else:
            raise ValueError(kind)

    def ref_segments(self, slot):
        """(address, nbytes) of each segment of the page at `slot`, from numpy views."""
        if self.kind.startswith("page_first"):
            page = self.buf[slot // self.P]
            seg = page[0, 0].nbytes
            return [(page.ctypes.data + i * seg, seg) for i in range(page.nbytes // seg)]
        return [(x.ctypes.data, x.nbytes) for x in self._pieces(slot)]

    def ref_object(self, slot) -> np.ndarray:
        return np.concatenate([np.ascontiguousarray(x).view(np.uint8).ravel() for x in self._pieces(slot)])


    def zero(self) -> None:
        for b in self.bufs:
            b[...] = 0
