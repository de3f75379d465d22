"""KVDirectCache: the coordinator engines call (see ``kvdirect.cache`` for the call sequence).

It builds the shared pieces (:class:`~kvdirect.cache.parts.CacheParts`) and
hands each call to its path: :mod:`~kvdirect.cache.match`,
:mod:`~kvdirect.cache.load`, :mod:`~kvdirect.cache.writeback`; transfers go
through :mod:`~kvdirect.cache.transfer` (ordering) and :mod:`kvdirect.device`
(the device's launch layer).

The pool is chosen explicitly: a store (object or URL, as the ``store``
argument or ``CacheConfig.store``), or ``CacheConfig.store=None`` for a
device-only cache (said once in the log and in ``stats()["mode"]``). With
neither, the cache refuses to start: it never opens a pool on its own. A
malformed URL is always an error; an unreachable store is tolerated only with
``allow_no_store`` (a warning, then no pool until restart). A device whose
pages cannot be moved to that store fails here, naming the device and the fix.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from kvdirect import keys as _keys
from kvdirect.cache import load as _load
from kvdirect.cache.health import STORE_FAILURES, StoreHealth
from kvdirect.cache.indexing import NodeLocks, PageKeys
from kvdirect.cache.match import CacheMatch, match, release_held
from kvdirect.cache.parts import CacheParts
from kvdirect.cache.quarantine import Quarantine
from kvdirect.cache.stats import COUNTERS, CacheStats
from kvdirect.cache.transfer import Transfer
from kvdirect.cache.writeback import WriteBack
from kvdirect.config import CacheConfig
from kvdirect.device import device_ops
from kvdirect.errors import ConfigError
from kvdirect.index import PrefixIndex
from kvdirect.stores import Store, open_store, parse_url

log = logging.getLogger("kvdirect")


class KVDirectCache:
    """The direct cache manager. See the ``kvdirect.cache`` docstring for the call sequence."""

    def __init__(self, layout, store: Store | str | None = None, *, page_size: int | None = None,
                 free_slots: Callable[[np.ndarray], None] | None = None,
                 config: CacheConfig | None = None, namespace_seed: Callable | None = None,
                 tp_rank: int = 0, tp_size: int = 1, tp_reduce_min: Callable[[int], int] | None = None,
                 forward_stream=None):
        self.config = config or CacheConfig()
        # the engine's forward stream when it is not current on the thread that calls the cache
        # (SGLang's overlap scheduler): transfers also follow the work queued there
        self.forward_stream = forward_stream
        if not self.config.model:
            raise ConfigError(
                "KVDirectCache needs the model identity: set CacheConfig(model=...) (\"model\" in "
                "KVDIRECT_CONFIG) to a string naming the weights, their revision and quantization "
                "(kvdirect.config.model_identity builds one); instances share pool pages only when "
                "it is equal, so two different models must never use the same one")
        self.layout = layout
        self.page_size = int(page_size or layout.page_size)
        if self.page_size != layout.page_size:
            raise ConfigError(f"page_size {self.page_size} differs from the layout's {layout.page_size}")
        self.free_slots = free_slots or (lambda slots: None)
        self.index = PrefixIndex(self.page_size, max_pool_only_pages=self.config.max_pool_only_pages)
        self.fingerprint = _keys.LayoutFingerprint.from_layout(layout, model=self.config.model,
                                                               tp_rank=tp_rank, tp_size=tp_size)
        self.mode = "pool"
        self.store: Store | None = self._open_store(store)
        stats = CacheStats(self.config.latency_window)
        quarantine = Quarantine(self.store, self.free_slots)
        try:
            transfer = (Transfer(self.store, layout, self.config, self._ops, quarantine, forward_stream)
                        if self.store is not None else None)
        except BaseException:
            self.store.close()
            raise
        self._p = CacheParts(
            config=self.config, layout=layout, page_size=self.page_size, index=self.index,
            keys=PageKeys(self.index, self.page_size, self.fingerprint), locks=NodeLocks(self.index),
            stats=stats, health=StoreHealth(self.store, self.config, stats), quarantine=quarantine,
            store=self.store, transfer=transfer, free_slots=self.free_slots, tp_reduce=tp_reduce_min,
            writes=self.writes_pages(self.fingerprint, tp_rank))
        self._wb = WriteBack(self._p)
        self._closed = False

    @staticmethod
    def writes_pages(fingerprint, tp_rank: int) -> bool:
        """Whether this TP rank puts pages. MLA pages are identical on every rank (one latent
        per token, keys without the rank): rank 0 alone writes them, the others load them.
        Otherwise each rank writes its own heads under its own keys."""
        return not (fingerprint.is_mla and tp_rank != 0)

    def _open_store(self, store) -> Store | None:
        if store is None:
            store = self.config.store
        if store == "":
            raise ConfigError(
                "KVDirectCache needs a KV pool: pass a store (object or URL, e.g. "
                "\"shm://NAME?size=8GiB\", \"mooncake://...\", \"memcache://?config=...\") or set "
                "CacheConfig(store=URL) (\"store\" in KVDIRECT_CONFIG); store=None in the config means a "
                "device-only cache without a pool")
        if store is None:
            self.mode = "device-only"
            log.warning("kvdirect: device-only cache (CacheConfig.store=None): no KV pool, pages are never "
                        "loaded from or written to a pool")
            return None
        scheme = (parse_url(store).scheme if isinstance(store, str) else getattr(store, "scheme", "?"))
        # the device must be able to move pages to this store: checked before the store opens
        self._ops = device_ops(self.layout, store=f"the {scheme}:// pool")
        if not isinstance(store, str):
            return store
        try:
            return open_store(store)
        except STORE_FAILURES as e:  # unreachable; a malformed URL (ConfigError) always raises
            if not self.config.allow_no_store:
                raise
            self.mode = "no-pool"
            log.warning("kvdirect: store %s unreachable, running without a KV pool until restart "
                        "(allow_no_store=true): %s", store, e)
            return None

    # ---- load path -------------------------------------------------------------
    def match(self, tokens, namespace: str | None = None, *, exclude_last: bool = False,
              pool: bool = True, hold: bool = False) -> CacheMatch:
        """Longest cached prefix of ``tokens``: on device (``device_len``) and further in the
        pool (``pool_len``). One index match plus at most one batched existence query.

        ``exclude_last=True`` keeps the last token out of the match, so at least one
        token is left to compute even at 100% reuse (an engine needs the last prompt
        token's logits): the match then covers whole pages of ``tokens[:-1]``.
        ``pool=False`` matches device pages only (``pool_len`` 0, no store query): for an
        instance that writes pages back but never loads them (a PD decode node).
        ``hold=True`` (stores with ``hold_at_match``, e.g. Mooncake): the query opens the
        read session a ``load_layerwise`` of this match reads through, one round trip for
        both; the caller then owes the match to ``load_layerwise`` or ``release``."""
        return match(self._p, tokens, namespace, exclude_last, pool, hold)

    @staticmethod
    def release(m: CacheMatch) -> None:
        """Give up the pages a ``match(hold=True)`` holds (no load will read them)."""
        release_held(m)

    def lock(self, node) -> None:
        """Pin the matched path; pass ``m.node`` (its locks follow ``m`` through ``load``)."""
        self._p.locks.lock(node)

    def unlock(self, node) -> None:
        """Undo one ``lock``; after a load, of ``m.node`` as the load left it."""
        self._p.locks.unlock(node)

    def load(self, m: CacheMatch, slots) -> int:
        """Read the matched pool pages straight into ``slots`` (device slots from the
        engine's allocator, at least ``m.pool_len`` of them for a full load): one slot per
        token of whole pages, each page's slots consecutive from a multiple of page_size.
        A bad slot list raises ConfigError before anything happens.

        Returns the tokens loaded (page aligned). Stops at the first page that
        failed; every slot not holding a loaded page is given back through
        ``free_slots``. Loaded pages join the index as device-resident; ``m`` is
        updated (device_len, device_slots, node — the locks taken with
        ``lock(m.node)`` move with it, and only those: other requests' locks on the same
        node stay where they are)."""
        return _load.load(self._p, m, slots)

    def load_layerwise(self, m: CacheMatch, slots) -> _load.LayerwiseLoad:
        """Start loading the matched pool pages layer by layer on a background thread.

        The forward pass calls ``wait_layer(l)`` before reading layer ``l``'s KV and
        ``finish()`` at the end, which returns the tokens loaded, exactly as ``load``
        would (same index updates, same slot freeing). When a later layer fails for
        some page, ``finish()`` returns fewer tokens than ``wait_layer`` promised
        earlier: the engine must then recompute from the returned length — a failed
        page is never used. Layer ``l`` is complete when ``wait_layer(l)`` returns: its
        bytes are in device memory (staged: the layer's scatter has completed; direct:
        the store's ranged read of that layer returned). Direct stores without ranged
        gets load all layers at once (layer completions then arrive together)."""
        return _load.LayerwiseLoad(self._p, m, slots)

    # ---- write-back path -------------------------------------------------------
    def write_back(self, tokens, slots, namespace: str | None = None) -> int:
        """Insert a request's KV into the index and write its new full pages to the pool
        asynchronously. Returns how many leading tokens were already cached on device:
        the caller frees its duplicate slots for that range (as SGLang's insert does)."""
        return self._wb.submit(tokens, slots, namespace)

    def poll(self) -> int:
        """Apply finished writes (scheduler thread). Returns how many jobs were applied."""
        self._p.quarantine.release()
        return self._wb.apply()

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every in-flight write and apply it (shutdown, tests). With TP every rank
        must call it: the writes are applied once every rank has finished them."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wb.wait_idle(timeout)
        self.poll()
        while self._wb.tp and self._wb.jobs:
            # another rank's writes (or a timed-out put's clean-up) are still running; the
            # polls are collectives: every rank leaves after the same number of them
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._wb.jobs)} write jobs not finished on every TP rank")
            time.sleep(0.005)
            self.poll()

    # ---- eviction and sizes -------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` device tokens (LRU, unlocked, not being written)
        through ``free_slots``; returns how many were freed. Pages stored in the pool stay
        known to the index as pool-only."""
        freed = self.index.evict(int(num_tokens))
        if freed.size:
            self.free_slots(freed)
            self._p.stats.add(evicted_tokens=int(freed.size))
        return int(freed.size)

    @property
    def evictable_size(self) -> int:
        return self.index.evictable_size

    @property
    def protected_size(self) -> int:
        return self.index.protected_size

    @property
    def total_size(self) -> int:
        return self.index.total_size

    def reset(self) -> None:
        self.flush()
        self.index.reset()

    # ---- metrics --------------------------------------------------------------
    @staticmethod
    def _counter_names() -> tuple:
        return COUNTERS

    def stats(self) -> dict:
        d = self._p.stats.snapshot()
        d["inflight_pages"] = self._wb.inflight_pages
        d["quarantined_slots"] = self._p.quarantine.held_slots
        d["pending_completions"] = self._wb.pending
        d["store"] = None if self.store is None else self.store.scheme
        d["mode"] = self.mode
        d.update(self._p.transfer.stats() if self._p.transfer is not None else
                 {"staging_buffers": 0, "retired_staging_buffers": 0})
        d["store_available"] = self._p.health.available()
        d["device_tokens"] = self.index.total_size
        return d

    @property
    def _writer(self):
        """The writer threads' executor (tests shut it down without closing a shared store)."""
        return self._wb.executor

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._wb.tp:  # no collective at shutdown (another rank may be gone): only let writes end
                self._wb.wait_idle(timeout=60)
            else:
                self.flush(timeout=60)
        finally:
            self._wb.shutdown()
            if self.store is not None:
                self.store.close()
            if self._p.transfer is not None:
                self._p.transfer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
