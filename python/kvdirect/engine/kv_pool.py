"""Paged device KV pool and its slot allocator, shaped like SGLang's.

``PagedKVPool`` holds, per layer, a K and a V tensor ``[num_slots, kv_heads,
head_dim]`` (SGLang's ``MHATokenToKVPool.k_buffer[layer]`` /
``v_buffer[layer]``). A token's KV lives at one slot index in every layer.
The per-layer tensors are views of one ``[layers, slots, kv_heads, head_dim]``
tensor so gathering a prefix for all layers is one indexing op.

``SlotAllocator`` hands out slots by whole pages (SGLang's paged allocator):
the slots of page ``p`` are ``p*P .. p*P+P-1``, so a page is one contiguous
run in every layer buffer -- what a page-wise transfer needs. Slots travel as
int64 numpy arrays.
"""
from __future__ import annotations

import numpy as np

from kvdirect.errors import ConfigError, KVDirectError


class OutOfSlots(KVDirectError):
    """The device pool has fewer free pages than a request needs."""


class SlotAllocator:
    """Free list of device pages; alloc/free of int64 slot arrays.

    ``alloc(n)`` returns ``n`` slots made of ``ceil(n / page_size)`` whole
    pages (the tail of the last page stays reserved with it). ``free(slots)``
    returns every page that the slots touch; freeing a page that is already
    free raises (a double free would hand one slot to two owners).
    """

    def __init__(self, num_slots: int, page_size: int):
        if page_size <= 0 or num_slots <= 0 or num_slots % page_size:
            raise ConfigError(f"num_slots ({num_slots}) must be a positive multiple of page_size ({page_size})")
        self.page_size = int(page_size)
        self.num_pages = num_slots // page_size
        self.num_slots = int(num_slots)
        # stack of free page ids; lowest ids come out first
        self._free = np.arange(self.num_pages - 1, -1, -1, dtype=np.int64)
        self._top = self.num_pages
        self._in_use = np.zeros(self.num_pages, dtype=bool)

    @property
    def free_pages(self) -> int:
        return self._top

    @property
    def free_slots_count(self) -> int:
        return self._top * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        return -(-int(num_tokens) // self.page_size)

    def can_alloc(self, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) <= self._top

    def alloc(self, num_tokens: int) -> np.ndarray:
        num_tokens = int(num_tokens)
        if num_tokens < 0:
            raise ConfigError(f"cannot allocate {num_tokens} slots")
        n_pages = self.pages_for(num_tokens)
        if n_pages > self._top:
            raise OutOfSlots(f"need {n_pages} pages, {self._top} free of {self.num_pages}")
        pages = self._free[self._top - n_pages:self._top][::-1].copy()
        self._top -= n_pages
        self._in_use[pages] = True
        slots = (pages[:, None] * self.page_size + np.arange(self.page_size, dtype=np.int64)).reshape(-1)
        return slots[:num_tokens]

    def free(self, slots) -> None:
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if slots.size == 0:
            return
        if slots.min() < 0 or slots.max() >= self.num_slots:
            raise KVDirectError(f"slot out of range [0, {self.num_slots}) in free()")
        pages = np.unique(slots // self.page_size)
        if not self._in_use[pages].all():
            bad = pages[~self._in_use[pages]]
            raise KVDirectError(f"double free of device page(s) {bad[:8].tolist()}")
        self._in_use[pages] = False
        self._free[self._top:self._top + pages.size] = pages[::-1]
        self._top += pages.size


class PagedKVPool:
    """Per-layer K and V device buffers ``[num_slots, kv_heads, head_dim]``."""

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, head_dim: int, *,
                 page_size: int = 64, dtype=None, device="cpu"):
        import torch

        if num_slots % page_size:
            raise ConfigError(f"num_slots ({num_slots}) must be a multiple of page_size ({page_size})")
        dtype = dtype or torch.float32
        self.num_layers, self.num_slots = num_layers, num_slots
        self.kv_heads, self.head_dim, self.page_size = kv_heads, head_dim, page_size
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (num_layers, num_slots, kv_heads, head_dim)
        # empty + fill touches every page now (torch.zeros may map lazily-zeroed memory),
        # as a serving engine's KV pool is resident before it serves: no page faults
        # land inside a request's timing, whichever mode wrote its slots first
        self.k = torch.empty(shape, dtype=dtype, device=self.device).fill_(0)
        self.v = torch.empty(shape, dtype=dtype, device=self.device).fill_(0)
        # SGLang-style per-layer views (distinct base addresses per layer)
        self.k_buffers = list(self.k.unbind(0))
        self.v_buffers = list(self.v.unbind(0))
        self.allocator = SlotAllocator(num_slots, page_size)

    @classmethod
    def for_model(cls, spec, num_slots: int, *, page_size: int = 64, device="cpu"):
        from kvdirect.engine.model import torch_dtype

        return cls(spec.num_hidden_layers, num_slots, spec.num_key_value_heads, spec.head_dim,
                   page_size=page_size, dtype=torch_dtype(spec.dtype), device=device)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.k.element_size()

    def _index(self, slots):
        import torch

        return torch.as_tensor(np.asarray(slots, dtype=np.int64), device=self.device)

    def gather(self, slots):
        """KV of ``slots`` for all layers: two tensors ``[layers, kv_heads, n, head_dim]``."""
        idx = self._index(slots)
        k = self.k.index_select(1, idx).permute(0, 2, 1, 3)
        v = self.v.index_select(1, idx).permute(0, 2, 1, 3)
        return k, v

    def scatter(self, slots, k, v) -> None:
        """Store ``k``/``v`` ``[layers, kv_heads, n, head_dim]`` at ``slots``."""
        idx = self._index(slots)
        self.k.index_copy_(1, idx, k.permute(0, 2, 1, 3).to(self.dtype))
        self.v.index_copy_(1, idx, v.permute(0, 2, 1, 3).to(self.dtype))
