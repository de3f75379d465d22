"""Shared pieces of the reliability suite: a CPU 'device' KV pool, deterministic KV,
an engine-like request driver that verifies every byte, and the figures report.

KV of a token depends only on its prefix (a rolling hash), so any two requests
sharing a prefix have identical pages: a page loaded from the pool can be compared
byte for byte with what a recompute would produce.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid

import numpy as np
from kvd_testutil import run_bounded, wait_for_file  # noqa: F401  (shared test helpers)

from kvdirect import KVLayout
from kvdirect.cache import KVDirectCache
from kvdirect.config import CacheConfig
from kvdirect.errors import StoreError
from kvdirect.stores.base import OK, Store

CI = bool(os.environ.get("CI"))
LAYERS, HEADS, DIM = 2, 2, 8

_report_lock = threading.Lock()


def report(scenario: str, **figures) -> None:
    """Record figures of a scenario: appended (JSON lines) to $KVDIRECT_RELIABILITY_REPORT, and printed."""
    line = json.dumps({"scenario": scenario, **figures}, sort_keys=True)
    print("FIGURES", line)
    path = os.environ.get("KVDIRECT_RELIABILITY_REPORT")
    if path:
        with _report_lock, open(path, "a") as f:
            f.write(line + "\n")


def uniq(prefix: str = "rel") -> str:
    return f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def expected_kv(tokens) -> np.ndarray:
    """[layers, 2 (K/V), tokens, heads, dim] float32 KV that depends only on each token's prefix."""
    t = np.asarray(tokens, np.int64)
    h = (np.cumsum(t * 2654435761 % 1000003) % 1000003).astype(np.float64)
    base = np.arange(HEADS * DIM, dtype=np.float64).reshape(1, HEADS, DIM)
    out = np.empty((LAYERS, 2, len(t), HEADS, DIM), np.float32)
    for l in range(LAYERS):
        v = h[:, None, None] * (l + 1) + base
        out[l, 0] = v
        out[l, 1] = -v - 1
    return out


class Device:
    """Per-layer K/V arrays on the CPU plus a page allocator (what an engine's KV pool is)."""

    def __init__(self, page_size: int, slots: int = 1024):
        self.P = page_size
        self.slots = slots
        self.k = [np.zeros((slots, HEADS, DIM), np.float32) for _ in range(LAYERS)]
        self.v = [np.zeros((slots, HEADS, DIM), np.float32) for _ in range(LAYERS)]
        self.layout = KVLayout.from_mha(self.k, self.v, page_size=page_size)
        self.free = list(range(0, slots, page_size))[::-1]
        self.lock = threading.Lock()
        self.stalls = 0  # allocations that had to wait for pinned pages to be released

    def alloc(self, n_tokens: int, cache: KVDirectCache | None = None) -> np.ndarray:
        n_pages = -(-n_tokens // self.P)
        deadline = time.monotonic() + 60
        while True:
            with self.lock:
                short = n_pages - len(self.free)
            if short > 0 and cache is not None:
                cache.evict(short * self.P)
            with self.lock:
                if len(self.free) >= n_pages:
                    firsts = [self.free.pop() for _ in range(n_pages)]
                    break
            # pages pinned by writes still in flight: an engine queues the request and retries
            if cache is None or time.monotonic() > deadline:
                raise MemoryError(f"device pool exhausted: need {n_pages} pages, {len(self.free)} free")
            self.stalls += 1
            cache.poll()
            time.sleep(0.01)
        return (np.asarray(firsts, np.int64)[:, None] + np.arange(self.P)).reshape(-1)[:n_tokens]

    def free_slots(self, slots) -> None:
        slots = np.asarray(slots, np.int64)
        with self.lock:
            for s in np.unique(slots - slots % self.P):
                self.free.append(int(s))

    def write(self, slots, kv) -> None:
        for l in range(LAYERS):
            self.k[l][slots] = kv[l, 0]
            self.v[l][slots] = kv[l, 1]

    def wrong_bytes(self, slots, kv) -> int:
        """Bytes of the device KV at `slots` that differ from `kv`."""
        bad = 0
        for l in range(LAYERS):
            bad += int((self.k[l][slots].view(np.uint8) != kv[l, 0].view(np.uint8)).sum())
            bad += int((self.v[l][slots].view(np.uint8) != kv[l, 1].view(np.uint8)).sum())
        return bad


def make_cache(dev: Device, store, **cfg) -> KVDirectCache:
    cfg.setdefault("model", "reliability-model")
    return KVDirectCache(dev.layout, store, free_slots=dev.free_slots, config=CacheConfig(**cfg))


class Driver:
    """Serves requests like an engine: match, lock, load, 'prefill' the rest, verify, write back.

    Every served request checks every KV byte of its whole prompt on the device against
    expected_kv: a loaded (or device-cached) page with a wrong byte is counted in
    ``wrong_bytes``. ``pages`` maps the pool key of every full page served to its
    (tokens, page index), so that :func:`lost_pages` can read every stored page back."""

    def __init__(self, cache: KVDirectCache, dev: Device, namespace=None):
        self.cache, self.dev, self.ns = cache, dev, namespace
        self.served = self.wrong_bytes = 0
        self.loaded_tokens = self.device_hit_tokens = self.computed_tokens = 0
        self.latencies = []
        self.pages: dict = {}

    def serve(self, tokens) -> int:
        c, dev = self.cache, self.dev
        t0 = time.perf_counter()
        c.poll()
        m = c.match(tokens, self.ns)
        c.lock(m.node)
        try:
            slots = dev.alloc(m.pool_len, c)
            loaded = c.load(m, slots)
            cached = m.device_len
            rest = dev.alloc(len(tokens) - cached, c)
            all_slots = np.concatenate([m.device_slots, rest]).astype(np.int64)
            kv = expected_kv(tokens)
            dev.write(rest, kv[:, :, cached:])  # the engine computes only the uncached suffix
            bad = dev.wrong_bytes(all_slots, kv)
            already = c.write_back(tokens, all_slots, self.ns)
            if already > cached:
                dev.free_slots(all_slots[cached:already])
            tail = len(tokens) // dev.P * dev.P
            if tail < len(tokens):  # the partial last page stays with the request: free it now
                dev.free_slots(all_slots[tail:])
        finally:
            c.unlock(m.node)
        c.poll()
        for i, key in enumerate(c.fingerprint.page_keys(tokens, self.ns)):
            self.pages.setdefault(key, (tokens, i))
        self.served += 1
        self.wrong_bytes += bad
        self.loaded_tokens += loaded
        self.device_hit_tokens += cached - loaded
        self.computed_tokens += len(tokens) - cached
        self.latencies.append(time.perf_counter() - t0)
        return bad


def tokens_of(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50000, n).astype(np.int32)




# ---- data lost: every page the cache was told is stored, read back and compared ----------------

class StoredPages(Store):
    """A store wrapper that records every key whose put the store answered OK: exactly the pages the
    cache counts as stored (a page is stored only after its whole put succeeded). ``epoch`` tags each
    record, so a scenario can tell pages a pool is allowed to lose (stored before a Mooncake master
    restart, which starts empty) from the rest. Keys the cache removes leave the record."""

    def __init__(self, inner: Store):
        self.inner = inner
        self.scheme = inner.scheme
        self.supports_device_memory = inner.supports_device_memory
        self.local_lookup = inner.local_lookup
        self.stored: dict[str, int] = {}
        self.epoch = 0
        self._lock = threading.Lock()

    def put(self, keys, scatter):
        st = self.inner.put(keys, scatter)
        with self._lock:
            for i in np.flatnonzero(np.asarray(st) == OK):
                self.stored[keys[i]] = self.epoch
        return st

    def remove(self, keys):
        with self._lock:
            for k in keys:
                self.stored.pop(k, None)
        return self.inner.remove(keys)

    def exists(self, keys):
        return self.inner.exists(keys)

    def get(self, keys, scatter):
        return self.inner.get(keys, scatter)

    def put_bytes(self, key, data):
        return self.inner.put_bytes(key, data)

    def get_bytes(self, key):
        return self.inner.get_bytes(key)

    def register(self, addr, length, memory=None):
        return self.inner.register(addr, length, memory)

    def stats(self):
        return self.inner.stats()

    def close(self):
        self.inner.close()

    def __getattr__(self, name):  # quiesce, open_read, ...: the wrapped store's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def page_object(tokens, page: int, P: int) -> bytes:
    """The pool object of page ``page`` of ``tokens`` (the MHA object format: each layer's K then V
    rows of the page, layer by layer), from expected_kv."""
    kv = expected_kv(np.asarray(tokens)[: (page + 1) * P])[:, :, page * P:]
    return b"".join(kv[l, kv_i].tobytes() for l in range(LAYERS) for kv_i in (0, 1))


def lost_pages(reader: Store, stored: dict, pages: dict, P: int, *, epochs=None) -> dict:
    """Read back every page ``stored`` holds (key -> epoch; only ``epochs`` when given) through
    ``reader`` and compare it with its source. ``data_lost`` = pages reported stored that are missing
    or differ (a failed read counts as missing)."""
    keys = [k for k, e in stored.items() if epochs is None or e in epochs]
    missing = wrong = 0
    for k in keys:
        tokens, i = pages[k]
        try:
            data = reader.get_bytes(k)
        except StoreError:
            data = None
        if data is None:
            missing += 1
        elif data != page_object(tokens, i, P):
            wrong += 1
    return {"pages_checked": len(keys), "missing": missing, "wrong": wrong, "data_lost": missing + wrong}
