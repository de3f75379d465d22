"""The load path: matched pool pages -> the engine's device slots, whole or layer by layer.

A page is loaded only when its whole get succeeded; loading stops at the first
failed page; every slot not holding a loaded page goes back through
``free_slots`` (or waits in quarantine while a timed-out get may still write
it); loaded pages join the index as device-resident and in the pool.

Slots are validated first (one per token of whole pages, page aligned): a bad
slot list is a ConfigError and changes nothing (the caller keeps its slots).
Store failures are misses; any other error propagates, and the caller keeps
its slots then too.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from kvdirect.cache.health import STORE_FAILURES
from kvdirect.cache.inputs import as_slots, check_token_slots
from kvdirect.cache.match import CacheMatch, release_held, take_held
from kvdirect.cache.parts import CacheParts
from kvdirect.cache.transfer import first_failure
from kvdirect.errors import ConfigError
from kvdirect.stores.base import TIMEOUT, UNAVAILABLE


def checked_slots(p: CacheParts, m: CacheMatch, slots, what: str) -> np.ndarray:
    slots = as_slots(slots)
    try:
        check_token_slots(p.layout, slots, what)
    except ConfigError as e:
        raise ConfigError(f"{e} (the match offers {m.pool_len} pool tokens: allocate that many slots)") from None
    return slots


def plan_count(p: CacheParts, m: CacheMatch, slots: np.ndarray) -> int:
    """Pages this load moves: what the slots and the match allow, agreed across TP ranks."""
    n_pages = min(len(slots) // p.page_size, m.pool_len // p.page_size)
    if p.store is None:
        n_pages = 0
    return p.reduce(n_pages)


def load_pages(p: CacheParts, m: CacheMatch, slots: np.ndarray, n_pages: int):
    """Keys and page-first slots of the first n_pages pool pages of m."""
    dev_pages = m.device_len // p.page_size
    page_slots = slots[: n_pages * p.page_size: p.page_size]
    keys = p.keys.pool_keys(m._digests[dev_pages:dev_pages + n_pages])
    return keys, page_slots


def load(p: CacheParts, m: CacheMatch, slots) -> int:
    release_held(m)  # reads whole objects: a session the match held is not needed
    slots = checked_slots(p, m, slots, "load")
    n_pages = plan_count(p, m, slots)
    t0 = time.perf_counter()
    status = None
    if n_pages:
        keys, page_slots = load_pages(p, m, slots, n_pages)
        try:
            status = p.transfer.get(keys, page_slots, p.transfer.compute_event())
            p.health.recovered()
        except STORE_FAILURES as e:
            p.health.failed("get", e)
            status = np.full(n_pages, UNAVAILABLE, dtype=np.int32)
    return finish_load(p, m, slots, n_pages, status, t0)


def finish_load(p: CacheParts, m: CacheMatch, slots: np.ndarray, n_pages: int, status: np.ndarray | None,
                t0: float) -> int:
    """Shared tail of load / layer-wise load: decide, free unused slots, update the index."""
    P = p.page_size
    dev_pages = m.device_len // P
    n_ok = 0
    if n_pages:
        n_ok = first_failure(status)
        if n_ok < n_pages:
            p.stats.add(load_failed_pages=n_pages - n_ok)
            p.stats.failure(f"get_status_{int(status[n_ok])}")
            if n_ok < m._index_pool_pages:  # the index believed these were in the pool
                p.index.mark_not_in_pool(m.tokens, dev_pages + n_ok,
                                         m._index_pool_pages - n_ok, namespace=m.namespace)
        n_ok = p.reduce(n_ok)  # every TP rank uses the same number of pages
    unused = slots[n_ok * P:]
    if unused.size:
        if status is not None and (status == TIMEOUT).any() and not p.quarantine.quiesced():
            # a timed-out get may still be writing these slots: hold them until it is over
            p.quarantine.hold_slots(unused)
        else:
            p.free_slots(unused)
    if n_ok:
        new_len = m.device_len + n_ok * P
        all_slots = np.concatenate([m.device_slots, slots[: n_ok * P]])
        prefix = m.tokens[:new_len]
        # one index call: insert with digests, mark the loaded pages in the pool, the new path
        already, r = p.index.insert_path(prefix, all_slots, m.namespace, m._digests[:new_len // P],
                                         in_pool_first=dev_pages)
        if already > m.device_len:  # another request inserted meanwhile: keep its slots
            p.free_slots(all_slots[m.device_len:already])
        m.node = p.locks.move(m.node, r.node)  # one handle object: the request's locks follow it
        m.device_len, m.device_slots = r.device_len, r.device_slots
        p.stats.add(loaded_pages=n_ok, loaded_bytes=n_ok * p.layout.page_bytes)
    if n_pages:
        with p.stats.lock:
            p.stats.c["load_calls"] += 1
            p.stats.load_ms.append((time.perf_counter() - t0) * 1e3)
    m.pool_len = 0
    m.loaded_len = n_ok * P
    return n_ok * P


class LayerwiseLoad:
    """A layer-by-layer load in progress (see ``KVDirectCache.load_layerwise``).

    Layer completions come from :meth:`Transfer.get_layerwise`: per layer while later
    layers are still being read (stores with piecewise reads; staged: once the layer's
    scatter has completed), or all at once (stores that only get whole objects). The read
    session (piecewise stores) opens on the thread that starts the load, so the pages are
    pinned when the constructor returns.

    The reader runs on one of the transfer's reader threads (``Transfer.run_reader``: handed
    over, not started, so the caller does not wait for it to run), but the compute event it
    orders after is recorded here, on the engine's thread that starts the load (see
    :mod:`kvdirect.cache.transfer`).
    """

    def __init__(self, parts: CacheParts, m: CacheMatch, slots):
        self.parts, self.m = parts, m
        try:
            self.slots = checked_slots(parts, m, slots, "load_layerwise")
        except BaseException:
            release_held(m)
            raise
        self.n_pages = plan_count(parts, m, self.slots)
        L = parts.layout.num_layers
        self._events = [threading.Event() for _ in range(L)]
        self._ok_after_layer = [0] * L
        self._pinned = threading.Event()
        self._pinned_pages = 0
        self.status = np.zeros(self.n_pages, dtype=np.int32)
        self._t0 = time.perf_counter()
        self._result = None
        self._error = None
        self._reader = None  # the Future of _run
        if self.n_pages == 0:
            release_held(m)
            for e in self._events:
                e.set()
            self._pinned.set()
            return
        self._keys, self._page_slots = load_pages(parts, m, self.slots, self.n_pages)
        self._ready = parts.transfer.compute_event()  # the engine's work queued before this load
        # the read session opens here, on the engine's thread, so wait_pinned() needs no hand-off
        self._session = take_held(m, self._keys)  # opened by the match (hold=True), or None
        try:
            if self._session is None:
                self._session = parts.transfer.open_layerwise(self._keys)
        except STORE_FAILURES as e:
            parts.health.failed("get", e)
            self._fail_all()
            return
        except BaseException as e:  # noqa: BLE001 - re-raised by finish(), as from the reader thread
            self._error = e
            self._fail_all()
            return
        if self._session is not None:
            self._on_pinned(first_failure(self._session.status))
        self._reader = parts.transfer.run_reader(self._run)

    def _fail_all(self) -> None:
        """Nothing was read: every layer reports no pages."""
        self.status[:] = UNAVAILABLE
        for layer in range(len(self._events)):
            self._layer_done(layer, 0)

    def _on_pinned(self, pages: int) -> None:
        if not self._pinned.is_set():
            self._pinned_pages = pages
            self._pinned.set()

    def _layer_done(self, layer: int, pages: int) -> None:
        self._on_pinned(pages)  # a page delivered is a page that existed
        self._ok_after_layer[layer] = pages
        self._events[layer].set()

    def _run(self):
        p = self.parts
        try:
            self.status[:] = p.transfer.get_layerwise(self._keys, self._page_slots, self._layer_done, self._ready,
                                                      on_pinned=self._on_pinned, session=self._session)
        except STORE_FAILURES as e:
            p.health.failed("get", e)
            self.status[:] = UNAVAILABLE
        except BaseException as e:  # noqa: BLE001 - re-raised by finish() on the caller's thread
            self._error = e
            self.status[:] = UNAVAILABLE
        finally:
            ok = first_failure(self.status)
            for layer, e in enumerate(self._events):
                if not e.is_set():
                    self._layer_done(layer, ok)

    def wait_pinned(self, timeout: float | None = None) -> int:
        """Block until the store holds the pages for this load (a read session opened; for
        stores that get whole objects: until they are in); returns the tokens of the pages
        it holds. Bytes may still be in flight: a page that fails after this point makes
        ``finish()`` return fewer tokens, and whoever promised them must not use the result."""
        if not self._pinned.wait(timeout):
            raise TimeoutError(f"pages not pinned within {timeout}s")
        return self._pinned_pages * self.parts.page_size

    def wait_layer(self, layer: int, timeout: float | None = None) -> int:
        """Block until layer ``layer`` is loaded; returns the tokens valid for it so far."""
        if not self._events[layer].wait(timeout):
            raise TimeoutError(f"layer {layer} not loaded within {timeout}s")
        return self._ok_after_layer[layer] * self.parts.page_size

    def finish(self) -> int:
        """Wait for every layer and apply the result; returns the tokens loaded."""
        if self._result is None:
            if self._reader is not None:
                self._reader.result()  # _run catches everything: this only waits
            if self._error is not None:  # not a store failure: nothing applied, the caller keeps its slots
                raise self._error
            self._result = finish_load(self.parts, self.m, self.slots, self.n_pages,
                                       self.status if self.n_pages else None, self._t0)
        return self._result
