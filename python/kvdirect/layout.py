"""KV layouts: where a device KV pool's pages live, described without copying it.

A :class:`KVLayout` is built from the engine's KV buffers (torch tensors on any
device, or numpy arrays) or from raw addresses. It records addresses, strides
and dtype only; torch is never imported here. Its planner (C++, one call)
turns the device slots of N pages into a :class:`~kvdirect.stores.ScatterList`:
for each page, one (address, length) segment per layer and per K/V, in object
order ``layer 0 K, layer 0 V, layer 1 K, ...`` (MLA: one segment per layer;
Ascend split MLA: ``nope, rope`` per layer).

Object format. The pool object of a page is the concatenation of its segments
in that order, so layer ``l`` occupies bytes ``[layer_offsets()[l],
layer_offsets()[l+1])`` of the object and each segment is the page's
``[page_size, heads, dim]`` block, token-major. This byte format does not depend
on the device layout: an MHA pool on a GPU, an Ascend ``[pages+1, P, H, D]``
pool and a page-first pool with the same model write identical objects, which
is why :meth:`KVLayout.fingerprint_fields` reports the *object format*
(``mha``, ``mla``, ``mla_split``) as ``kind`` rather than the device layout
(:attr:`KVLayout.kind`).

Supported device layouts (``KVLayout.kind``):

* ``mha``: per layer K ``[num_slots, kv_heads, head_dim]`` and V ``[num_slots,
  kv_heads, v_head_dim]`` (SGLang ``MHATokenToKVPool``), or paged K ``[pages,
  page_size, kv_heads, head_dim]`` and V likewise (vLLM-style blocks, e.g. the
  two halves of a ``[2, pages, page_size, heads, dim]`` tensor) -- :meth:`from_mha`;
* ``mla``: per layer ``[num_slots, 1, kv_lora_rank + rope_dim]`` (SGLang
  ``MLATokenToKVPool``), or paged ``[pages, page_size, dim]`` / ``[pages,
  page_size, 1, dim]`` -- :meth:`from_mla`;
* ``ascend``: per layer K and V ``[pages + 1, page_size, kv_heads, head_dim]``
  (SGLang's NPU pools; slot // page_size is the page index), and ``ascend_mla``:
  split MLA on NPU, K = ``[pages + 1, page_size, 1, kv_lora_rank]``, V =
  ``[pages + 1, page_size, 1, rope_dim]`` -- :meth:`from_ascend`;
* ``page_first``: one buffer ``[pages, layers, 2 (K/V) or 1 (MLA), page_size,
  kv_heads, head_dim]``, every layer of a page contiguous -- :meth:`page_first`;
* raw addresses -- :meth:`from_addresses`.

Per-layer buffers come as a list (one tensor per layer) or as one stacked
tensor whose leading dimension is the layer. Every constructor checks the
shapes it is given against the one it documents and refuses anything else
with a :class:`~kvdirect.errors.ConfigError` that names the expected shape:
a layout never guesses which dimension is which.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kvdirect.errors import ConfigError, LayoutMismatchError
from kvdirect.stores.base import ScatterList

# Bytes per element of the dtypes KV pools use (fp8 variants move as bytes).
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1,
}

# device layout kind -> object format reported in the fingerprint
_OBJECT_FORMAT = {"mha": "mha", "ascend": "mha", "page_first": "mha", "mla": "mla",
                  "page_first_mla": "mla", "ascend_mla": "mla_split"}


@dataclass(frozen=True)
class _Buf:
    """What the layout needs from one tensor: address, geometry, dtype, device."""

    addr: int
    shape: tuple
    strides: tuple  # bytes
    dtype: str
    itemsize: int
    device: str

    def contiguous_from(self, dim: int) -> bool:
        """True when dims dim.. are C-contiguous (size-1 dims ignored)."""
        expect = self.itemsize
        for n, s in zip(reversed(self.shape[dim:]), reversed(self.strides[dim:])):
            if n != 1 and s != expect:
                return False
            expect *= n
        return True

    def nbytes_from(self, dim: int) -> int:
        return int(np.prod(self.shape[dim:], dtype=np.int64)) * self.itemsize


def _describe(t: Any, what: str) -> _Buf:
    if isinstance(t, np.ndarray):
        return _Buf(int(t.ctypes.data), tuple(t.shape), tuple(t.strides), t.dtype.name, t.dtype.itemsize, "cpu")
    if hasattr(t, "data_ptr") and hasattr(t, "element_size") and hasattr(t, "stride"):  # torch.Tensor
        es = int(t.element_size())
        return _Buf(int(t.data_ptr()), tuple(t.shape), tuple(int(s) * es for s in t.stride()),
                    str(t.dtype).replace("torch.", ""), es, str(t.device))
    raise ConfigError(f"{what}: expected a torch.Tensor or numpy.ndarray, got {type(t).__name__}")


def _page_size(page_size) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)) or page_size < 1:
        raise ConfigError(f"page_size must be a positive int (tokens per page), got {page_size!r}")
    return int(page_size)


def _layers(x: Any, ndims: tuple, what: str, expect: str) -> list[_Buf]:
    """Per-layer buffers from a list, or from one stacked buffer with a leading layer dim.

    ``ndims``: the per-layer ranks the caller accepts; ``expect``: their shapes, for errors."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise ConfigError(f"{what}: need at least one layer")
        items = list(x)
    elif getattr(x, "ndim", None) is not None and x.ndim - 1 in ndims:
        items = [x[i] for i in range(x.shape[0])]
    else:
        raise ConfigError(f"{what}: expected a list of per-layer buffers {expect}, or one stacked buffer "
                          f"with a leading layer dimension; got {_shape_of(x)}")
    bufs = [_describe(t, what) for t in items]
    for i, b in enumerate(bufs):
        if len(b.shape) not in ndims:
            raise ConfigError(f"{what}: layer {i} has shape {b.shape}; expected {expect}")
    return bufs


def _shape_of(x: Any) -> str:
    shape = getattr(x, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else type(x).__name__


def _refuse_one_paged_layer(x: Any, b: _Buf, P: int, what: str, paged: str) -> None:
    """A single tensor is read as stacked layers; one whose layers hold exactly one page is
    more likely one paged layer passed without its list: refuse rather than guess."""
    if not isinstance(x, (list, tuple)) and b.shape[0] == P:
        raise ConfigError(f"{what}: one tensor of shape {_shape_of(x)} reads as {len(x)} stacked layers of "
                          f"one {P}-slot page each; if it is one layer of {paged}, pass a list with one "
                          "such buffer per layer")


def _check_pages(b: _Buf, name: str) -> None:
    """Paged buffer [pages, page_size, ...]: every page contiguous, pages not overlapping."""
    if not b.contiguous_from(1):
        raise ConfigError(f"{name}: non-contiguous pages (shape {b.shape}, byte strides {b.strides}); "
                          f"each [page_size, ...] page must be contiguous")
    if b.shape[0] > 1 and b.strides[0] < b.nbytes_from(1):
        raise ConfigError(f"{name}: pages overlap (page stride {b.strides[0]} < page bytes {b.nbytes_from(1)})")


def _check_same(bufs: list[_Buf], what: str, dims_from: int = 0) -> None:
    b0 = bufs[0]
    for i, b in enumerate(bufs[1:], 1):
        if b.dtype != b0.dtype:
            raise LayoutMismatchError(f"{what}: layer {i} has dtype {b.dtype}, layer 0 has {b0.dtype}; "
                                      "every layer of a KV pool must share one dtype")
        if b.shape[dims_from:] != b0.shape[dims_from:]:
            raise LayoutMismatchError(f"{what}: layer {i} has shape {b.shape}, layer 0 has {b0.shape}")
        if b.device != b0.device:
            raise LayoutMismatchError(f"{what}: layer {i} is on {b.device}, layer 0 on {b0.device}")


def _logical_dtype(bufs: list[_Buf], dtype: str | None) -> str:
    if dtype is None:
        return bufs[0].dtype
    dtype = str(dtype).replace("torch.", "")
    if ITEMSIZE.get(dtype) != bufs[0].itemsize:
        raise ConfigError(f"dtype={dtype!r} does not match the buffers' element size {bufs[0].itemsize} "
                          f"(known: {sorted(ITEMSIZE)})")
    return dtype


class KVLayout:
    """A device KV pool's geometry plus a C++ planner over it. Build with a ``from_*`` constructor."""

    def __init__(self, *, kind: str, page_size: int, num_pages: int, planes_per_layer: int,
                 bases, page_strides, seg_bytes, dtype: str, device: str, kv_heads: int,
                 head_dim: int, v_head_dim: int, regions, refs=()):
        from kvdirect import _core

        if page_size < 1:
            raise ConfigError(f"page_size must be >= 1, got {page_size}")
        if num_pages < 1:
            raise ConfigError(f"the pool holds no full page of {page_size} slots")
        self.kind = kind
        self.object_format = _OBJECT_FORMAT[kind]
        self.is_mla = self.object_format != "mha"
        self.page_size = int(page_size)
        self.num_pages = int(num_pages)
        self.num_slots = self.num_pages * self.page_size
        self.dtype = dtype
        self.device = device
        self.kv_heads, self.head_dim, self.v_head_dim = int(kv_heads), int(head_dim), int(v_head_dim)
        self._regions = list(regions)
        self._refs = tuple(refs)  # keep the buffers alive while their addresses are planned
        self._planner = _core.Planner(self.page_size, self.num_pages, planes_per_layer,
                                      np.asarray(bases, np.uint64), np.asarray(page_strides, np.uint64),
                                      np.asarray(seg_bytes, np.uint64))
        self.num_layers = int(self._planner.num_layers)
        self.segments_per_page = int(self._planner.segments_per_page)
        self.page_bytes = int(self._planner.object_bytes)

    # ---- constructors --------------------------------------------------------
    @classmethod
    def from_mha(cls, k_buffers, v_buffers, page_size: int, *, dtype: str | None = None) -> "KVLayout":
        """Per-layer K ``[num_slots, kv_heads, head_dim]`` and V ``[num_slots, kv_heads, v_head_dim]``,
        or paged K ``[pages, page_size, kv_heads, head_dim]`` and V ``[pages, page_size, kv_heads,
        v_head_dim]`` (slot ``s`` is token ``s % page_size`` of page ``s // page_size``)."""
        P = _page_size(page_size)
        expect = (f"[num_slots, kv_heads, head_dim] or paged [pages, page_size={P}, kv_heads, head_dim]")
        ks = _layers(k_buffers, (3, 4), "k_buffers", expect)
        vs = _layers(v_buffers, (3, 4), "v_buffers", expect)
        if len(ks) != len(vs):
            raise LayoutMismatchError(f"{len(ks)} K buffers but {len(vs)} V buffers: one of each per layer")
        _check_same(ks, "k_buffers")
        _check_same(vs, "v_buffers")
        _check_same([ks[0], vs[0]], "K vs V", dims_from=5)  # dtype and device
        k0, v0 = ks[0], vs[0]
        if len(k0.shape) != len(v0.shape):
            raise LayoutMismatchError(f"K has shape {k0.shape} but V has {v0.shape}: both slot-major "
                                      "[num_slots, heads, dim] or both paged [pages, page_size, heads, dim]")
        paged = len(k0.shape) == 4
        if paged:
            for name, b in (("k_buffers", k0), ("v_buffers", v0)):
                if b.shape[1] != P:
                    raise LayoutMismatchError(
                        f"{name}: a paged buffer is [pages, page_size, kv_heads, head_dim], and shape {b.shape} "
                        f"holds pages of {b.shape[1]} slots but page_size={P}")
                _check_pages(b, name)
            seg = lambda b: (b.addr, b.strides[0], b.nbytes_from(1))  # noqa: E731
            num_pages = k0.shape[0]
        else:
            _refuse_one_paged_layer(k_buffers, k0, P, "k_buffers", "[pages, page_size, kv_heads, head_dim]")
            for name, b in (("k_buffers", k0), ("v_buffers", v0)):
                cls._check_slot_major(b, name)
            seg = lambda b: (b.addr, P * b.strides[0], P * b.nbytes_from(1))  # noqa: E731
            num_pages = k0.shape[0] // P
        if k0.shape[0] != v0.shape[0]:
            what = "pages" if paged else "slots"
            raise LayoutMismatchError(f"K has {k0.shape[0]} {what} but V has {v0.shape[0]}")
        if k0.shape[-2] != v0.shape[-2]:
            raise LayoutMismatchError(f"K has {k0.shape[-2]} KV heads but V has {v0.shape[-2]} "
                                      f"(K {k0.shape}, V {v0.shape})")
        planes = _interleave([seg(b) for b in ks], [seg(b) for b in vs])
        return cls._from_planes("mha", P, num_pages, 2, planes, ks + vs, _logical_dtype(ks, dtype), k0.device,
                                k0.shape[-2], k0.shape[-1], v0.shape[-1], (k_buffers, v_buffers))

    @classmethod
    def from_mla(cls, kv_buffers, page_size: int, *, dtype: str | None = None) -> "KVLayout":
        """Per-layer ``[num_slots, 1, kv_lora_rank + rope_dim]`` (one buffer per layer), or paged
        ``[pages, page_size, dim]`` / ``[pages, page_size, 1, dim]``."""
        P = _page_size(page_size)
        expect = f"[num_slots, 1, dim], or paged [pages, page_size={P}, dim] or [pages, page_size={P}, 1, dim]"
        bs = _layers(kv_buffers, (3, 4), "kv_buffers", expect)
        _check_same(bs, "kv_buffers")
        b = bs[0]
        if len(b.shape) == 3 and b.shape[1] == 1:  # slot-major (also page_size 1 paged: the same bytes)
            _refuse_one_paged_layer(kv_buffers, b, P, "kv_buffers", "[pages, page_size, 1, dim]")
            cls._check_slot_major(b, "kv_buffers")
            planes = [(x.addr, P * x.strides[0], P * x.nbytes_from(1)) for x in bs]
            num_pages = b.shape[0] // P
        elif b.shape[1] == P and (len(b.shape) == 3 or b.shape[2] == 1):
            _check_pages(b, "kv_buffers")
            planes = [(x.addr, x.strides[0], x.nbytes_from(1)) for x in bs]
            num_pages = b.shape[0]
        else:
            raise LayoutMismatchError(f"kv_buffers: shape {b.shape} is not an MLA pool with page_size={P}; "
                                      f"expected {expect}")
        return cls._from_planes("mla", P, num_pages, 1, planes, bs, _logical_dtype(bs, dtype), b.device, 1,
                                b.shape[-1], 0, (kv_buffers,))

    @classmethod
    def from_ascend(cls, k_buffers, v_buffers, page_size: int | None = None, *, is_mla: bool = False,
                    dtype: str | None = None) -> "KVLayout":
        """Per-layer K and V ``[pages + 1, page_size, kv_heads, head_dim]`` (SGLang NPU pools).

        ``is_mla=True``: split MLA on NPU, K = ``[pages + 1, page_size, 1, kv_lora_rank]``
        (nope) and V = ``[pages + 1, page_size, 1, rope_dim]`` (rope).
        """
        if page_size is not None:
            page_size = _page_size(page_size)
        heads = "1" if is_mla else "kv_heads"
        expect = f"[pages + 1, page_size, {heads}, dim]"
        ks = _layers(k_buffers, (4,), "k_buffers", expect)
        vs = _layers(v_buffers, (4,), "v_buffers", expect)
        if len(ks) != len(vs):
            raise LayoutMismatchError(f"{len(ks)} K buffers but {len(vs)} V buffers: one of each per layer")
        _check_same(ks, "k_buffers")
        _check_same(vs, "v_buffers")
        _check_same([ks[0], vs[0]], "K vs V", dims_from=4)
        P = ks[0].shape[1]
        if page_size is not None and page_size != P:
            raise LayoutMismatchError(f"page_size={page_size} but the Ascend buffers hold pages of {P} slots "
                                      f"(shape {ks[0].shape} is [pages+1, page_size, heads, dim])")
        if vs[0].shape[:3] != ks[0].shape[:3]:
            raise LayoutMismatchError(f"K pages {ks[0].shape[:3]} and V pages {vs[0].shape[:3]} differ "
                                      "([pages + 1, page_size, heads] must match)")
        if is_mla and ks[0].shape[2] != 1:
            raise LayoutMismatchError(f"is_mla=True: split MLA buffers are {expect}, got K {ks[0].shape}")
        for name, b in (("k_buffers", ks[0]), ("v_buffers", vs[0])):
            _check_pages(b, name)
        planes = _interleave([(b.addr, b.strides[0], b.nbytes_from(1)) for b in ks],
                             [(b.addr, b.strides[0], b.nbytes_from(1)) for b in vs])
        return cls._from_planes("ascend_mla" if is_mla else "ascend", P, ks[0].shape[0], 2, planes, ks + vs,
                                _logical_dtype(ks, dtype), ks[0].device, ks[0].shape[2], ks[0].shape[3],
                                vs[0].shape[3], (k_buffers, v_buffers))

    @classmethod
    def page_first(cls, buffer, *, dtype: str | None = None) -> "KVLayout":
        """One buffer ``[pages, layers, 2 (K/V) or 1 (MLA), page_size, kv_heads, head_dim]``."""
        b = _describe(buffer, "page_first buffer")
        if len(b.shape) != 6:
            raise ConfigError(f"page_first buffer must be 6-D [pages, layers, kv, page_size, heads, dim], got {b.shape}")
        pages, layers, nkv, P, heads, dim = b.shape
        if nkv not in (1, 2):
            raise ConfigError(f"page_first buffer: dim 2 is K/V (2) or MLA (1), got {nkv}")
        if not b.contiguous_from(1):
            raise ConfigError(f"page_first buffer: non-contiguous pages (shape {b.shape}, byte strides {b.strides})")
        seg = b.nbytes_from(3)
        planes = [(b.addr + i * seg, b.strides[0], seg) for i in range(layers * nkv)]
        return cls._from_planes("page_first" if nkv == 2 else "page_first_mla", P, pages, nkv, planes, [b],
                                _logical_dtype([b], dtype), b.device, heads, dim, dim if nkv == 2 else 0,
                                (buffer,))

    @classmethod
    def from_addresses(cls, k_addrs: Sequence[int], v_addrs: Sequence[int] | None = None, *, page_size: int,
                       num_slots: int, kv_heads: int, head_dim: int, dtype: str, v_head_dim: int | None = None,
                       device: str = "cpu", is_mla: bool = False) -> "KVLayout":
        """Raw per-layer base addresses of slot-major ``[num_slots, heads, dim]`` buffers.

        MLA (``is_mla=True``): ``k_addrs`` only, ``kv_heads`` = 1, ``head_dim`` =
        kv_lora_rank + rope_dim. The caller keeps the memory alive.
        """
        dtype = str(dtype).replace("torch.", "")
        if dtype not in ITEMSIZE:
            raise ConfigError(f"unknown dtype {dtype!r}; known: {sorted(ITEMSIZE)}")
        P = _page_size(page_size)
        for name, v in (("num_slots", num_slots), ("kv_heads", kv_heads), ("head_dim", head_dim),
                        ("v_head_dim", 1 if v_head_dim is None else v_head_dim)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"from_addresses: {name} must be a positive int, got {v!r}")
        if is_mla and kv_heads != 1:
            raise ConfigError(f"from_addresses(is_mla=True): an MLA pool has one latent head, got kv_heads={kv_heads}")
        for name, addrs in (("k_addrs", k_addrs), ("v_addrs", v_addrs or ())):
            bad = [a for a in addrs if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or a <= 0]
            if bad:
                raise ConfigError(f"from_addresses: {name} must be non-null integer addresses, got {bad[0]!r}")
        es = ITEMSIZE[dtype]
        k_row = kv_heads * head_dim * es
        ks = [(int(a), P * k_row, P * k_row) for a in k_addrs]
        if not ks:
            raise ConfigError("from_addresses: need at least one layer address")
        if is_mla:
            if v_addrs:
                raise ConfigError("from_addresses(is_mla=True) takes k_addrs only (one buffer per layer)")
            planes, per, vd = ks, 1, 0
        else:
            vd = head_dim if v_head_dim is None else int(v_head_dim)
            v_row = kv_heads * vd * es
            vs = [(int(a), P * v_row, P * v_row) for a in (v_addrs or [])]
            if len(vs) != len(ks):
                raise LayoutMismatchError(f"{len(ks)} K addresses but {len(vs)} V addresses")
            planes, per = _interleave(ks, vs), 2
        regions = [(a, num_slots * (s // P)) for a, s, _ in planes]
        return cls(kind="mla" if is_mla else "mha", page_size=P, num_pages=int(num_slots) // P,
                   planes_per_layer=per, bases=[p[0] for p in planes], page_strides=[p[1] for p in planes],
                   seg_bytes=[p[2] for p in planes], dtype=dtype, device=device, kv_heads=kv_heads,
                   head_dim=head_dim, v_head_dim=vd, regions=regions)

    # ---- helpers for constructors -------------------------------------------
    @staticmethod
    def _check_slot_major(b: _Buf, name: str) -> None:
        if len(b.shape) < 2:
            raise ConfigError(f"{name}: expected [num_slots, heads, dim], got shape {b.shape}")
        if not b.contiguous_from(1) or (b.shape[0] > 1 and b.strides[0] != b.nbytes_from(1)):
            raise ConfigError(f"{name}: non-contiguous pages (shape {b.shape}, byte strides {b.strides}); a page's "
                              "slots must be adjacent rows -- pass the pool's own buffers, not a strided view")

    @classmethod
    def _from_planes(cls, kind, P, num_pages, per, planes, bufs, dtype, device, kv_heads, head_dim,
                     v_head_dim, refs) -> "KVLayout":
        if P < 1:
            raise ConfigError(f"page_size must be >= 1, got {P}")
        regions = sorted({(b.addr, b.shape[0] * b.strides[0] if b.shape[0] else 0) for b in bufs})
        return cls(kind=kind, page_size=P, num_pages=num_pages, planes_per_layer=per,
                   bases=[p[0] for p in planes], page_strides=[p[1] for p in planes],
                   seg_bytes=[p[2] for p in planes], dtype=dtype, device=device, kv_heads=kv_heads,
                   head_dim=head_dim, v_head_dim=v_head_dim, regions=regions, refs=refs)

    # ---- planning ------------------------------------------------------------
    def _slots(self, slots, per_token):
        if hasattr(slots, "device") and hasattr(slots, "cpu") and str(slots.device) != "cpu":
            slots = slots.cpu()  # torch tensor on a device: one small copy of the slot ids
        a = np.asarray(slots)
        if a.dtype.kind not in "iu":
            raise ConfigError(f"page slots must be integers, got dtype {a.dtype}")
        if a.ndim == 2 and a.shape[1] == self.page_size:
            a, per_token = a.reshape(-1), True  # [N, page_size] per-token slots
        if a.ndim != 1:
            raise ConfigError(f"page slots must be 1-D (first slot of each page, or every token's slot), got shape {a.shape}")
        a = np.ascontiguousarray(a, dtype=np.int64)
        if per_token is None:
            # First slots of pages differ by multiples of page_size, never by 1;
            # consecutive token slots of a page differ by exactly 1.
            per_token = self.page_size > 1 and a.size >= 2 and a[1] - a[0] == 1
        return a, bool(per_token)

    def plan(self, page_slots, *, per_token: bool | None = None) -> ScatterList:
        """Scatter list [N, segments_per_page] for N pages given by their device slots.

        ``page_slots``: int array of each page's first slot (multiples of
        page_size), or every token's slot (``N * page_size``, each page's slots
        consecutive). ``per_token=None`` tells them apart (see docs).
        """
        a, pt = self._slots(page_slots, per_token)
        try:
            addrs, sizes = self._planner.plan(a, pt, -1)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return ScatterList(addrs, sizes)

    def plan_layer(self, page_slots, layer: int, *, per_token: bool | None = None) -> ScatterList:
        """Segments of one layer only, [N, 2] (MLA: [N, 1]): bytes
        ``[layer_offsets()[layer], layer_offsets()[layer+1])`` of each page object."""
        a, pt = self._slots(page_slots, per_token)
        if not 0 <= int(layer) < self.num_layers:
            raise ConfigError(f"layer {layer} out of range: the layout has {self.num_layers} layers")
        try:
            addrs, sizes = self._planner.plan(a, pt, int(layer))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return ScatterList(addrs, sizes)

    def page_indices(self, page_slots, *, per_token: bool | None = None) -> np.ndarray:
        """Validated page index (slot // page_size) of each page, uint64."""
        a, pt = self._slots(page_slots, per_token)
        try:
            return self._planner.pages(a, pt)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def layer_offsets(self) -> np.ndarray:
        """uint64 [num_layers + 1]: layer l's bytes are [off[l], off[l+1]) of a page object."""
        return self._planner.layer_offsets()

    def regions(self) -> list[tuple[int, int]]:
        """(address, length) of each distinct memory region the pool spans, for Store.register."""
        return list(self._regions)

    def fingerprint_fields(self) -> dict:
        """Everything that decides a page object's bytes: the keyword arguments of
        :class:`~kvdirect.keys.LayoutFingerprint` besides the model and TP position
        (``LayoutFingerprint.from_layout`` uses them)."""
        return {"dtype": self.dtype, "num_layers": self.num_layers, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "v_head_dim": self.v_head_dim or None, "page_size": self.page_size,
                "layout_kind": self.object_format, "is_mla": self.is_mla}

    def __repr__(self) -> str:
        return (f"KVLayout(kind={self.kind}, layers={self.num_layers}, page_size={self.page_size}, "
                f"pages={self.num_pages}, dtype={self.dtype}, device={self.device}, page_bytes={self.page_bytes})")


def _interleave(ks: list, vs: list) -> list:
    """Object order: layer 0 K, layer 0 V, layer 1 K, ..."""
    return [p for kv in zip(ks, vs) for p in kv]
