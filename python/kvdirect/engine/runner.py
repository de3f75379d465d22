"""A one-request-at-a-time serving engine over a paged KV pool.

``Engine.serve`` drives a prefix cache exactly as a serving engine's scheduler
does (the SGLang radix-cache protocol):

    match(tokens[:-1]) -> lock -> allocate slots for pool pages -> load
    -> prefill the uncached suffix with the cached prefix as past KV
       (gathered from the paged pool by slot index) -> first token (TTFT)
    -> greedy decode -> store the new KV in newly allocated slots
    -> write_back -> free duplicate / partial-page slots -> unlock -> poll

The cache is any object with that protocol: ``kvdirect.KVDirectCache`` (device
pages plus the shared pool), ``DevicePrefixCache`` below (device-resident
prefixes only, no transfer: the "ideal" of the demo), or ``None`` (no reuse:
the baseline).

Matching ``tokens[:-1]`` (as SGLang does) leaves at least one token to
prefill, so the first token's logits are always computed, and keeps the cached
prefix page aligned.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np

from kvdirect.engine.kv_pool import OutOfSlots, PagedKVPool
from kvdirect.engine.model import ForwardAdapter, ModelSpec, build_model
from kvdirect.errors import ConfigError, KVDirectError

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class RequestResult:
    output_ids: list[int]
    first_logits: object  # torch.Tensor [vocab] on CPU, float32
    ttft_s: float  # request arrival -> first token known (match, load, prefill)
    total_s: float  # including decode, write-back and poll
    prompt_len: int
    cached_tokens: int  # prefix whose KV was not recomputed
    device_hit_tokens: int  # of which already resident in the device pool
    loaded_tokens: int  # of which loaded from the store for this request
    pool_candidate_tokens: int  # pool hit reported by match (before load)
    kept_slots: np.ndarray = field(default_factory=lambda: _EMPTY)  # see Engine.serve(keep=)

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_len - self.cached_tokens


@dataclass
class _PrefixMatch:
    """Same fields as kvdirect's MatchResult that the engine reads."""

    device_len: int
    device_slots: np.ndarray
    pool_len: int = 0
    node: object = None


@dataclass
class _Page:
    slots: np.ndarray
    parent: bytes | None
    children: int = 0
    lock: int = 0
    last_use: float = 0.0


class DevicePrefixCache:
    """Prefix cache of pages resident in the device pool only (no store).

    The demo's "ideal": a hit costs no transfer at all. It speaks the same
    protocol as ``KVDirectCache`` so the engine runs one code path. Pages are
    keyed by a hash chain over (namespace, page tokens); nodes are page keys;
    locking a node pins it and its ancestors; eviction removes unlocked leaf
    pages, least recently used first, and returns their slots through
    ``free_slots``.
    """

    def __init__(self, page_size: int, free_slots):
        self.page_size = int(page_size)
        self.free_slots = free_slots
        self._pages: dict[bytes, _Page] = {}

    def __len__(self) -> int:
        return len(self._pages)

    @property
    def cached_tokens(self) -> int:
        return len(self._pages) * self.page_size

    def _keys(self, tokens: np.ndarray, namespace) -> list[bytes]:
        P = self.page_size
        n_pages = len(tokens) // P
        pages = np.ascontiguousarray(tokens[: n_pages * P], dtype=np.int32).reshape(n_pages, P)
        key = hashlib.sha256(repr(namespace).encode()).digest()
        keys = []
        for row in pages:  # one hash per page; only the ideal oracle runs this
            key = hashlib.sha256(key + row.tobytes()).digest()
            keys.append(key)
        return keys

    def match(self, tokens, namespace=None) -> _PrefixMatch:
        keys = self._keys(np.asarray(tokens), namespace)
        hit, now = [], time.monotonic()
        for k in keys:
            page = self._pages.get(k)
            if page is None:
                break
            page.last_use = now
            hit.append(page.slots)
        slots = np.concatenate(hit) if hit else _EMPTY
        return _PrefixMatch(len(slots), slots, 0, keys[len(hit) - 1] if hit else None)

    def _chain(self, node):
        while node is not None:
            page = self._pages[node]
            yield page
            node = page.parent

    def lock(self, node) -> None:
        for page in self._chain(node):
            page.lock += 1

    def unlock(self, node) -> None:
        for page in self._chain(node):
            if page.lock <= 0:
                raise KVDirectError("unlock of a page that is not locked")
            page.lock -= 1

    def load(self, match, slots) -> int:
        self.free_slots(np.asarray(slots, dtype=np.int64))  # nothing comes from a store here
        return 0

    def write_back(self, tokens, slots, namespace=None) -> int:
        """Insert the full pages of ``tokens``; returns the leading tokens already cached.

        The cache takes ownership of ``slots[already:full]``; the caller frees
        ``slots[cached:already]`` (duplicates) and the trailing partial page.
        """
        tokens = np.asarray(tokens)
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) < len(tokens) // self.page_size * self.page_size:
            raise ConfigError("write_back: fewer slots than full-page tokens")
        keys = self._keys(tokens, namespace)
        P, now, already, parent = self.page_size, time.monotonic(), None, None
        for i, k in enumerate(keys):
            page = self._pages.get(k)
            if page is None:
                if already is None:
                    already = i * P
                page = _Page(slots[i * P:(i + 1) * P].copy(), parent, last_use=now)
                self._pages[k] = page
                if parent is not None:
                    self._pages[parent].children += 1
            parent = k
        return len(keys) * P if already is None else already

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots of unlocked pages (LRU leaves first)."""
        freed = []
        while len(freed) * self.page_size < num_tokens:
            leaves = [(p.last_use, k) for k, p in self._pages.items() if p.children == 0 and p.lock == 0]
            if not leaves:
                break
            leaves.sort()
            for _, k in leaves:
                page = self._pages.pop(k)
                if page.parent is not None:
                    self._pages[page.parent].children -= 1
                freed.append(page.slots)
                if len(freed) * self.page_size >= num_tokens:
                    break
        if freed:
            self.free_slots(np.concatenate(freed))
        return len(freed) * self.page_size

    def clear(self) -> None:
        """Drop every unlocked page (all of them when nothing is in flight)."""
        self.evict(len(self._pages) * self.page_size)

    def poll(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.clear()


class Engine:
    """A model, a paged device KV pool, and ``serve()`` for one request at a time."""

    def __init__(self, model, pool: PagedKVPool):
        self.model = model
        self.pool = pool
        self.allocator = pool.allocator
        self.page_size = pool.page_size
        self._fwd = ForwardAdapter(model)
        self._cuda = pool.device.type == "cuda"

    @classmethod
    def build(cls, spec: ModelSpec | None = None, *, num_slots: int = 32768, page_size: int = 64,
              device: str = "cpu") -> "Engine":
        spec = spec or ModelSpec()
        model = build_model(spec, device)
        return cls(model, PagedKVPool.for_model(spec, num_slots, page_size=page_size, device=device))

    # -- slots -------------------------------------------------------------
    def alloc(self, num_tokens: int, cache=None) -> np.ndarray:
        """Allocate slots, evicting from ``cache`` when the pool is short."""
        if not self.allocator.can_alloc(num_tokens) and cache is not None:
            short = self.allocator.pages_for(num_tokens) - self.allocator.free_pages
            cache.evict(short * self.page_size)
        try:
            return self.allocator.alloc(num_tokens)
        except OutOfSlots as e:
            raise OutOfSlots(f"device KV pool exhausted for a {num_tokens}-token allocation ({e}); "
                             "use a larger pool (num_slots) or shorter prompts") from None

    # -- the request -------------------------------------------------------
    def serve(self, tokens, output_len: int = 4, *, cache=None, namespace=None, keep: int = 0) -> RequestResult:
        """Serve one request: ``output_len`` greedy tokens after the prompt ``tokens``.

        ``cache``: None (no reuse), ``DevicePrefixCache`` or ``KVDirectCache``.
        ``keep`` (only without a cache): hand the slots of the first ``keep``
        tokens (a whole number of pages) to the caller in ``kept_slots``
        instead of freeing them -- e.g. to make that prefix resident in a
        ``DevicePrefixCache``.
        """
        import torch

        t0 = time.perf_counter()
        tokens = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        n = len(tokens)
        if n < 1 or output_len < 1:
            raise ConfigError("serve() needs at least one prompt token and output_len >= 1")
        if keep and (cache is not None or keep % self.page_size or keep > n):
            raise ConfigError("keep= must be a multiple of page_size <= prompt length, and only without a cache")
        P = self.page_size

        node, prefix_slots, device_hit, loaded, pool_len = None, _EMPTY, 0, 0, 0
        new_slots = None
        try:
            if cache is not None:
                m = cache.match(tokens[: n - 1], namespace=namespace)
                node = m.node
                cache.lock(node)
                device_hit, pool_len = int(m.device_len), int(m.pool_len)
                prefix_slots = np.asarray(m.device_slots, dtype=np.int64)[:device_hit]
                if pool_len > 0:
                    slots = self.alloc(pool_len, cache)
                    loaded = int(cache.load(m, slots))  # frees the slots it did not fill
                    node = m.node  # the loaded pages are now in the index, locked
                    if loaded:
                        prefix_slots = np.concatenate([prefix_slots, slots[:loaded]])
            cached = device_hit + loaded
            if cached % P or cached >= n:
                raise KVDirectError(f"cache returned a prefix of {cached} tokens for a {n}-token prompt "
                                    f"(must be page aligned and shorter than the prompt)")
            n_new = n - cached + output_len - 1  # tokens whose KV this request computes
            new_slots = self.alloc(n_new, cache)
            out_ids, first_logits, ttft, dyn = self._run(tokens, cached, prefix_slots, output_len, t0)
            # store the new KV (prompt suffix + decoded tokens) in the device pool
            k_new = torch.stack([lk[0, :, cached:] for lk in dyn[0]])
            v_new = torch.stack([lv[0, :, cached:] for lv in dyn[1]])
            self.pool.scatter(new_slots, k_new, v_new)
        except BaseException:
            if new_slots is not None:
                self.allocator.free(new_slots)
            if cache is not None and node is not None:
                cache.unlock(node)
            raise

        done = cached + n_new
        all_slots = np.concatenate([prefix_slots, new_slots])
        kept = _EMPTY
        if cache is not None:
            full_ids = np.concatenate([tokens, np.asarray(out_ids[:-1], dtype=np.int32)])
            already = int(cache.write_back(full_ids, all_slots, namespace=namespace))
            if already < cached:
                raise KVDirectError(f"write_back reported {already} cached tokens, below the locked prefix {cached}")
            full = done // P * P
            self.allocator.free(all_slots[cached:already])  # pages the cache already had
            self.allocator.free(all_slots[full:])  # trailing partial page stays ours
            cache.unlock(node)
            cache.poll()
        else:
            kept = all_slots[:keep].copy()
            self.allocator.free(all_slots[keep:])
        return RequestResult(out_ids, first_logits, ttft, time.perf_counter() - t0, n, cached,
                             device_hit, loaded, pool_len, kept)

    def _run(self, tokens, cached, prefix_slots, output_len, t0):
        import torch

        dev = self.pool.device
        with torch.inference_mode():
            dyn = self._fwd.new_cache()
            if cached:
                k, v = self.pool.gather(prefix_slots)
                for layer in range(self.pool.num_layers):  # hand each layer its past KV
                    dyn.update(k[layer].unsqueeze(0), v[layer].unsqueeze(0), layer)
            ids = torch.as_tensor(tokens[cached:], dtype=torch.long, device=dev).unsqueeze(0)
            pos = torch.arange(cached, len(tokens), device=dev).unsqueeze(0)
            logits = self._fwd(ids, pos, dyn)
            first_logits = logits[0].float().cpu()
            tok = int(torch.argmax(logits[0]))  # .item() syncs the device
            ttft = time.perf_counter() - t0
            out = [tok]
            pos_next = len(tokens)
            for _ in range(output_len - 1):
                ids = torch.tensor([[tok]], dtype=torch.long, device=dev)
                pos = torch.tensor([[pos_next]], device=dev)
                logits = self._fwd(ids, pos, dyn)
                tok = int(torch.argmax(logits[0]))
                out.append(tok)
                pos_next += 1
            layers = _cache_layers(dyn)
        return out, first_logits, ttft, layers


def _cache_layers(dyn):
    """(keys per layer, values per layer) of a transformers DynamicCache."""
    if hasattr(dyn, "layers"):
        return [l.keys for l in dyn.layers], [l.values for l in dyn.layers]
    return list(dyn.key_cache), list(dyn.value_cache)  # transformers < 4.54
