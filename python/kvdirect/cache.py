"""KVDirectCache: one prefix match, one copy, asynchronous write-back.

Ties the C++ ``PrefixIndex``, a ``KVLayout`` (where pages sit in device
memory), a ``Store`` (the L3 pool) and the engine's slot allocator together.

Load path (prefill batch creation)::

    m = cache.match(tokens, ns)          # one index match + at most one batched exists query
    cache.lock(m.node)
    slots = allocator.alloc(m.pool_len)  # device slots for the pool pages
    loaded = cache.load(m, slots)        # pool -> those slots directly; unused slots freed
    ... prefill tokens[m.device_len:] ...

Write-back (request finished, chunk done, decode offload)::

    already = cache.write_back(tokens, slots, ns)  # caller frees slots[cached:already]
    cache.unlock(m.node)
    cache.poll()                         # every scheduler step: applies completions

Threads: one scheduler thread calls everything; put jobs run on writer
threads and only enqueue their results; ``poll`` applies them to the index on
the scheduler thread, so the index sees a single writer.

Never wrong KV: a page is loaded only when its whole get succeeded (per-key
status OK); loading stops at the first failed page; a page counts as stored in
the pool only after its put returned OK; pages being written are pinned in the
index (WRITING) so eviction cannot hand their slots to another request.

A store call is never abandoned while it may still write into device slots:
timeouts are enforced by the store adapters themselves, which return a
per-key TIMEOUT status.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kvdirect import keys as _keys
from kvdirect.config import CacheConfig
from kvdirect.errors import ConfigError, KVDirectError
from kvdirect.index import PrefixIndex
from kvdirect.stores import ScatterList, Store, open_store
from kvdirect.stores.base import OK, TIMEOUT, UNAVAILABLE

log = logging.getLogger("kvdirect")

# index pool states (csrc/index/index.h)
UNKNOWN, IN_POOL, WRITING = 0, 1, 2


def _as_tokens(tokens) -> np.ndarray:
    """Token ids as a 1-D int32/int64 numpy array, zero-copy when possible."""
    if hasattr(tokens, "detach") and hasattr(tokens, "numpy"):  # torch tensor on CPU
        tokens = tokens.detach().cpu().numpy()
    a = np.asarray(tokens)
    if a.dtype not in (np.int32, np.int64):
        if a.size == 0:
            return a.astype(np.int32)
        if not np.issubdtype(a.dtype, np.integer):
            raise ConfigError(f"token ids must be integers, got dtype {a.dtype}")
        a = a.astype(np.int64)
    if a.ndim != 1:
        raise ConfigError(f"token ids must be 1-D, got shape {a.shape}")
    return a


def _as_slots(slots) -> np.ndarray:
    if hasattr(slots, "detach") and hasattr(slots, "numpy"):
        slots = slots.detach().cpu().numpy()
    a = np.asarray(slots)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ConfigError(f"slots must be integers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.int64)
    if a.ndim != 1:
        raise ConfigError(f"slots must be 1-D, got shape {a.shape}")
    return a


def first_failure(status: np.ndarray) -> int:
    """Index of the first non-OK status (len(status) if all OK)."""
    bad = np.flatnonzero(status != OK)
    return int(bad[0]) if bad.size else len(status)


@dataclass
class CacheMatch:
    """Result of ``KVDirectCache.match``; pass it to ``load``."""

    tokens: np.ndarray
    namespace: str | None
    device_len: int          # tokens resident on device, from the start
    device_slots: np.ndarray  # int64 slots of those tokens
    pool_len: int            # further tokens available in the pool
    node: object             # index handle (lock/unlock)
    loaded_len: int = 0      # tokens load() brought in
    _digests: np.ndarray | None = None  # page digests [pages from 0 .. device+pool), uint8 x 32
    _index_pool_pages: int = 0          # pool pages the index knew without asking the store


@dataclass
class _WriteJob:
    tokens: np.ndarray
    namespace: str | None
    pages: np.ndarray        # page indices (from 0) being written
    keys: list
    scatter: ScatterList
    event: object = None     # device event the writer waits on before reading the pages
    t0: float = field(default_factory=time.perf_counter)


class _Stats:
    COUNTERS = ("match_calls", "device_hit_tokens", "pool_hit_tokens", "miss_tokens",
                "query_keys", "load_calls", "loaded_pages", "loaded_bytes", "load_failed_pages",
                "stored_pages", "stored_bytes", "store_failed_pages", "skipped_existing_pages",
                "dropped_writeback_pages", "evicted_tokens")

    def __init__(self, window: int):
        self.c = dict.fromkeys(self.COUNTERS, 0)
        self.failures: collections.Counter = collections.Counter()
        self.load_ms = collections.deque(maxlen=window)
        self.store_ms = collections.deque(maxlen=window)
        self.lock = threading.Lock()


class KVDirectCache:
    """The direct cache manager. See the module docstring for the call sequence."""

    def __init__(self, layout, store: Store | str | None = None, *, page_size: int | None = None,
                 free_slots: Callable[[np.ndarray], None] | None = None,
                 config: CacheConfig | None = None, namespace_seed: Callable | None = None,
                 tp_rank: int = 0, tp_size: int = 1, tp_reduce_min: Callable[[int], int] | None = None):
        self.config = config or CacheConfig()
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
        self._tp_reduce = tp_reduce_min
        self.index = PrefixIndex(self.page_size, max_pool_only_pages=self.config.max_pool_only_pages)
        self.fingerprint = _keys.LayoutFingerprint.from_layout(layout, model=self.config.model,
                                                               tp_rank=tp_rank, tp_size=tp_size)
        self._seed_cache: dict = {}
        self._stats = _Stats(self.config.latency_window)
        self._last_log: dict = {}
        self._down_until = 0.0
        self._backoff = self.config.retry_initial_s
        self._locked: collections.Counter = collections.Counter()

        self.store: Store | None = None
        if store is None and self.config.store:
            store = self.config.store
        if isinstance(store, str):
            try:
                store = open_store(store)
            except KVDirectError as e:
                if not self.config.allow_no_store:
                    raise
                log.warning("kvdirect: running without a KV pool: %s", e)
                store = None
        self.store = store
        self._stage = False
        if self.store is not None:
            self._stage = self.config.stage if self.config.stage is not None else (
                layout.device != "cpu" and not self.store.supports_device_memory)
            self._register_memory()
        self._staging: dict = {}  # (role, thread) -> bounded host buffer
        self._copy = None
        self._writer = ThreadPoolExecutor(max_workers=self.config.writer_threads,
                                          thread_name_prefix="kvdirect-put")
        self._done: collections.deque = collections.deque()  # finished (job, status) pairs
        self._inflight_pages = 0
        self._inflight_cv = threading.Condition()
        self._closed = False
        self._quarantine: list = []  # slots a timed-out get may still write; freed once quiet
        self._late_puts: list = []   # (job, page idx) whose put timed out; pinned until quiet

    # ---- helpers -------------------------------------------------------------
    def _register_memory(self):
        if self._stage:
            return
        kind = "host" if self.layout.device == "cpu" else "device"
        for addr, length in self.layout.regions():
            self.store.register(addr, length, memory=kind)

    def _seed(self, namespace):
        namespace = _keys.request_namespace(namespace)  # "" and None are one, as in the index
        if namespace not in self._seed_cache:
            self._seed_cache[namespace] = _keys.namespace_seed(extra_key=namespace)
        return self._seed_cache[namespace]

    def _store_ok(self) -> bool:
        return self.store is not None and time.monotonic() >= self._down_until

    def _store_failed(self, kind: str, err) -> None:
        """Count, log at most once per interval, back off before the next store use."""
        with self._stats.lock:
            self._stats.failures[kind] += 1
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= self.config.log_interval_s:
            self._last_log[kind] = now
            log.warning("kvdirect: store %s failed (%s); pages are misses, retrying in %.1fs",
                        kind, err, self._backoff)
        self._down_until = now + self._backoff
        self._backoff = min(self._backoff * 2, self.config.retry_max_s)

    def _store_recovered(self) -> None:
        self._backoff = self.config.retry_initial_s

    def _reduce(self, n: int) -> int:
        return int(self._tp_reduce(int(n))) if self._tp_reduce else int(n)

    def _digests(self, tokens, namespace, node, known_pages: int, upto_pages: int) -> np.ndarray:
        """Digests of pages [0, upto_pages). Pages on the index path keep theirs, so
        each page is hashed once in its lifetime; new ones are chained from the last known."""
        P = self.page_size
        if known_pages:
            have, mask = self.index.path_digests(node)
            have, mask = have[:known_pages], mask[:known_pages]
        if known_pages and mask.all():
            if upto_pages <= known_pages:
                return have[:upto_pages]
            tail = _keys.page_digests(tokens[known_pages * P:upto_pages * P], P,
                                      prior=have[-1].tobytes(), namespace_seed=self._seed(namespace))
            return np.concatenate([have, tail])
        d = _keys.page_digests(tokens[:upto_pages * P], P, namespace_seed=self._seed(namespace))
        if known_pages:
            self.index.set_path_digests(node, d[:known_pages])
        return d

    @staticmethod
    def _mark(fn, tokens, namespace, pages: np.ndarray) -> int:
        """Apply an index mark to a sorted set of page indices in one call."""
        if pages.size == 0:
            return 0
        first = int(pages[0])
        mask = np.zeros(int(pages[-1]) - first + 1, dtype=np.uint8)
        mask[pages - first] = 1
        return fn(tokens, first, mask.size, namespace=namespace, mask=mask)

    def _page_first_slots(self, slots: np.ndarray, n_pages: int) -> np.ndarray:
        return slots[: n_pages * self.page_size: self.page_size]

    # ---- load path -------------------------------------------------------------
    def match(self, tokens, namespace: str | None = None) -> CacheMatch:
        t = _as_tokens(tokens)
        P = self.page_size
        r = self.index.match(t, namespace)
        dev_pages, idx_pool_pages = r.device_len // P, r.pool_len // P
        known = dev_pages + idx_pool_pages
        full = len(t) // P
        if not self._store_ok():
            idx_pool_pages = 0  # the pool is unreachable: its pages are misses for now
        query = (self._store_ok() and full - known >= max(self.config.min_query_pages, 1))
        upto = min(full, known + self.config.max_query_pages) if query else known
        digests = None
        found = 0
        if upto > dev_pages:
            digests = self._digests(t, namespace, r.node, known, upto)
            if query:
                qkeys = _keys.pool_keys(digests[known:upto], self.fingerprint)
                try:
                    found = int(self.store.exists_prefix(qkeys))
                    self._store_recovered()
                except Exception as e:  # a store error is a miss, never a crash
                    self._store_failed("exists", e)
                    found = 0
                with self._stats.lock:
                    self._stats.c["query_keys"] += len(qkeys)
        pool_pages = idx_pool_pages + found
        if self._tp_reduce is not None:
            # TP ranks must agree on the prefix they reuse: the shortest one wins
            agreed = self._reduce(dev_pages + pool_pages)
            pool_pages = max(0, min(pool_pages, agreed - dev_pages))
        s = self._stats.c
        with self._stats.lock:
            s["match_calls"] += 1
            s["device_hit_tokens"] += r.device_len
            s["pool_hit_tokens"] += pool_pages * P
            s["miss_tokens"] += len(t) - r.device_len - pool_pages * P
        return CacheMatch(t, namespace, r.device_len, r.device_slots, pool_pages * P, r.node,
                          _digests=digests, _index_pool_pages=idx_pool_pages)

    def lock(self, node) -> None:
        self.index.lock(node)
        self._locked[id(node)] += 1

    def unlock(self, node) -> None:
        self.index.unlock(node)
        self._locked[id(node)] -= 1
        if self._locked[id(node)] <= 0:
            del self._locked[id(node)]

    def _get(self, keys: list, scatter: ScatterList) -> np.ndarray:
        if not self._stage:
            return np.asarray(self.store.get(keys, scatter), dtype=np.int32)
        # pool -> bounded host staging buffer -> device pages (copy engine), chunk by chunk
        status = np.full(len(keys), UNAVAILABLE, dtype=np.int32)
        buf = self._staging_buffer("get")
        for lo, hi, host in self._staged_chunks(buf, scatter):
            st = np.asarray(self.store.get(keys[lo:hi], host), dtype=np.int32)
            status[lo:hi] = st
            n_ok = first_failure(st)
            if n_ok:
                self._copy_engine().scatter(scatter.take(slice(lo, lo + n_ok)), buf.ctypes.data,
                                            int(host.object_sizes[:n_ok].sum()))
            if n_ok < hi - lo:
                break  # loading stops at the first failed page
        return status

    def _staging_buffer(self, role: str) -> np.ndarray:
        """One bounded host buffer per role and thread, registered with the store once."""
        key = (role, threading.get_ident())
        buf = self._staging.get(key)
        if buf is None:
            buf = np.empty(max(self.config.staging_bytes, self.layout.page_bytes), dtype=np.uint8)
            self._staging[key] = buf
            self.store.register(buf.ctypes.data, buf.nbytes, memory="host")
        return buf

    def _staged_chunks(self, buf: np.ndarray, scatter: ScatterList):
        """(lo, hi, host scatter list) chunks of whole page objects that fit the buffer."""
        obj = self.layout.page_bytes
        per = max(1, buf.nbytes // obj)
        base = buf.ctypes.data
        for lo in range(0, len(scatter), per):
            hi = min(len(scatter), lo + per)
            offs = base + np.arange(hi - lo, dtype=np.uint64) * np.uint64(obj)
            yield lo, hi, ScatterList(offs, np.full(hi - lo, obj, dtype=np.uint64))

    def _copy_engine(self):
        if self._copy is None:
            from kvdirect.copy import CopyEngine
            self._copy = CopyEngine(device=self.layout.device)
        return self._copy

    def load(self, m: CacheMatch, slots) -> int:
        """Read the matched pool pages straight into ``slots`` (device slots from the
        engine's allocator, at least ``m.pool_len`` of them for a full load).

        Returns the tokens loaded (page aligned). Stops at the first page that
        failed; every slot not holding a loaded page is given back through
        ``free_slots``. Loaded pages join the index as device-resident; ``m`` is
        updated (device_len, device_slots, node — the lock moves with it)."""
        slots = _as_slots(slots)
        n_pages = self._plan_count(m, slots)
        t0 = time.perf_counter()
        status = None
        if n_pages:
            keys, page_slots = self._load_pages(m, slots, n_pages)
            try:
                status = self._get(keys, self.layout.plan(page_slots))
                self._store_recovered()
            except Exception as e:
                self._store_failed("get", e)
                status = np.full(n_pages, UNAVAILABLE, dtype=np.int32)
        return self._finish_load(m, slots, n_pages, status, t0)

    def _quiesced(self, timeout: float = 0.0) -> bool:
        """True when no store call that timed out can still write device memory."""
        q = getattr(self.store, "quiesce", None)
        return True if q is None else bool(q(timeout))

    def _release_quarantine(self) -> None:
        if not (self._quarantine or self._late_puts) or not self._quiesced():
            return
        if self._quarantine:
            slots, self._quarantine = np.concatenate(self._quarantine), []
            self.free_slots(slots)
        for job, idx in self._late_puts:
            # a put that completed after its timeout may hold torn bytes: drop it, then unpin
            try:
                self.store.remove([job.keys[i] for i in idx])
            except Exception as e:
                self._store_failed("remove", e)
            self._mark(self.index.mark_write_failed, job.tokens, job.namespace, job.pages[idx])
        self._late_puts = []

    def _plan_count(self, m: CacheMatch, slots: np.ndarray) -> int:
        n_pages = min(len(slots) // self.page_size, m.pool_len // self.page_size)
        if self.store is None:
            n_pages = 0
        return self._reduce(n_pages)

    def load_layerwise(self, m: CacheMatch, slots) -> "LayerwiseLoad":
        """Start loading the matched pool pages layer by layer on a background thread.

        The forward pass calls ``wait_layer(l)`` before reading layer ``l``'s KV and
        ``finish()`` at the end, which returns the tokens loaded, exactly as ``load``
        would (same index updates, same slot freeing). When a later layer fails for
        some page, ``finish()`` returns fewer tokens than ``wait_layer`` promised
        earlier: the engine must then recompute from the returned length — a failed
        page is never used. Stores without ranged gets load all layers at once
        (layer completions then arrive together)."""
        return LayerwiseLoad(self, m, slots)

    def _load_pages(self, m: CacheMatch, slots: np.ndarray, n_pages: int):
        """Keys, page slots and scatter list for the first n_pages pool pages of m."""
        dev_pages = m.device_len // self.page_size
        page_slots = self._page_first_slots(slots, n_pages)
        keys = _keys.pool_keys(m._digests[dev_pages:dev_pages + n_pages], self.fingerprint)
        return keys, page_slots

    def _finish_load(self, m: CacheMatch, slots: np.ndarray, n_pages: int, status: np.ndarray | None,
                     t0: float) -> int:
        """Shared tail of load / layer-wise load: decide, free unused slots, update the index."""
        P = self.page_size
        dev_pages = m.device_len // P
        n_ok = 0
        if n_pages:
            n_ok = first_failure(status)
            if n_ok < n_pages:
                with self._stats.lock:
                    self._stats.c["load_failed_pages"] += n_pages - n_ok
                    self._stats.failures[f"get_status_{int(status[n_ok])}"] += 1
                if n_ok < m._index_pool_pages:  # the index believed these were in the pool
                    self.index.mark_not_in_pool(m.tokens, dev_pages + n_ok,
                                                m._index_pool_pages - n_ok, namespace=m.namespace)
            n_ok = self._reduce(n_ok)  # every TP rank uses the same number of pages
        unused = slots[n_ok * P:]
        if unused.size:
            if status is not None and (status == TIMEOUT).any() and not self._quiesced():
                # a timed-out get may still be writing these slots: hold them until it is over
                self._quarantine.append(unused)
            else:
                self.free_slots(unused)
        if n_ok:
            new_len = m.device_len + n_ok * P
            all_slots = np.concatenate([m.device_slots, slots[: n_ok * P]])
            prefix = m.tokens[:new_len]
            already = self.index.insert(prefix, all_slots, m.namespace)
            if already > m.device_len:  # another request inserted meanwhile: keep its slots
                self.free_slots(all_slots[m.device_len:already])
            r = self.index.match(prefix, m.namespace)
            self.index.set_path_digests(r.node, m._digests[:new_len // P])
            self.index.mark_in_pool(prefix, dev_pages, n_ok, namespace=m.namespace)
            self._move_lock(m.node, r.node)
            m.node, m.device_len, m.device_slots = r.node, r.device_len, r.device_slots
            with self._stats.lock:
                self._stats.c["loaded_pages"] += n_ok
                self._stats.c["loaded_bytes"] += n_ok * self.layout.page_bytes
        if n_pages:
            with self._stats.lock:
                self._stats.c["load_calls"] += 1
                self._stats.load_ms.append((time.perf_counter() - t0) * 1e3)
        m.pool_len = 0
        m.loaded_len = n_ok * P
        return n_ok * P

    def _move_lock(self, old, new) -> None:
        n = self._locked.get(id(old), 0)
        for _ in range(n):
            self.lock(new)
            self.unlock(old)

    # ---- write-back path -------------------------------------------------------
    def write_back(self, tokens, slots, namespace: str | None = None) -> int:
        """Insert a request's KV into the index and write its new full pages to the pool
        asynchronously. Returns how many leading tokens were already cached on device:
        the caller frees its duplicate slots for that range (as SGLang's insert does)."""
        t = _as_tokens(tokens)
        s = _as_slots(slots)
        P = self.page_size
        full = len(t) // P
        if len(s) < full * P:
            raise ConfigError(f"write_back needs a slot per token of the full pages: "
                              f"{full * P} tokens, {len(s)} slots")
        prefix = t[: full * P]
        already = self.index.insert(prefix, s[: full * P], namespace)
        if not (self.config.write_back and full and self._store_ok()):
            return already
        r = self.index.match(prefix, namespace)
        states = self.index.path_states(r.node)[0][:full]
        todo = np.flatnonzero(states == UNKNOWN)
        if not todo.size:
            return already
        if not self._reserve(len(todo)):
            with self._stats.lock:
                self._stats.c["dropped_writeback_pages"] += len(todo)
            return already
        digests = self._digests(prefix, namespace, r.node, full, full)
        pinned = self._mark(self.index.mark_writing, prefix, namespace, todo)
        if pinned != len(todo):  # cannot happen on the single scheduler thread
            raise KVDirectError(f"internal: pinned {pinned} of {len(todo)} pages")
        page_slots = r.device_slots[todo * P]
        job = _WriteJob(prefix.copy(), namespace, todo.astype(np.int64),
                        _keys.pool_keys(digests[todo], self.fingerprint),
                        self.layout.plan(page_slots), self._device_event())
        self._writer.submit(self._run_write, job)
        return already

    def _reserve(self, n: int) -> bool:
        """Bound in-flight pages: 'drop' refuses, 'wait' applies completions until room."""
        limit = self.config.max_inflight_pages
        if n > limit:
            return False
        while True:
            with self._inflight_cv:
                if self._inflight_pages + n <= limit:
                    self._inflight_pages += n
                    return True
                if self.config.backpressure == "drop":
                    return False
                self._inflight_cv.wait(timeout=0.05)
            self.poll()

    def _device_event(self):
        """An event on the compute stream that produced the pages (CPU: none)."""
        dev = self.layout.device
        if dev.startswith("cuda"):
            import torch
            ev = torch.cuda.Event()
            ev.record()
            return ev
        if dev.startswith("npu"):
            import torch
            ev = torch.npu.Event()  # torch_npu registers torch.npu
            ev.record()
            return ev
        return None

    def _run_write(self, job: _WriteJob) -> None:
        """Writer thread: wait for the compute stream, skip pages the pool has, put the rest."""
        try:
            if job.event is not None:
                job.event.synchronize()
            status = np.zeros(len(job.keys), dtype=np.int32)
            have = np.asarray(self.store.exists(job.keys), dtype=bool)
            todo = np.flatnonzero(~have)
            if todo.size:
                sub = job.scatter.take(todo)
                keys = job.keys if todo.size == len(job.keys) else [job.keys[i] for i in todo]
                if self._stage:
                    st = self._put_staged(keys, sub)
                else:
                    st = np.asarray(self.store.put(keys, sub), dtype=np.int32)
                status[todo] = st
            self._done.append((job, status, int(have.sum()), None))
        except Exception as e:  # reported on the scheduler thread by poll()
            self._done.append((job, None, 0, e))
        with self._inflight_cv:
            self._inflight_pages -= len(job.keys)
            self._inflight_cv.notify_all()

    def _put_staged(self, keys, scatter: ScatterList) -> np.ndarray:
        status = np.empty(len(keys), dtype=np.int32)
        buf = self._staging_buffer("put")
        for lo, hi, host in self._staged_chunks(buf, scatter):
            self._copy_engine().gather(scatter.take(slice(lo, hi)), buf.ctypes.data,
                                       int(host.object_sizes.sum()))
            status[lo:hi] = np.asarray(self.store.put(keys[lo:hi], host), dtype=np.int32)
        return status

    def poll(self) -> int:
        """Apply finished writes (scheduler thread). Returns how many jobs were applied."""
        self._release_quarantine()
        n = 0
        while self._done:
            job, status, existed, err = self._done.popleft()
            n += 1
            pages = job.pages
            if err is not None:
                self._store_failed("put", err)
                self._mark(self.index.mark_write_failed, job.tokens, job.namespace, pages)
                with self._stats.lock:
                    self._stats.c["store_failed_pages"] += len(pages)
                continue
            ok = status == OK
            late = status == TIMEOUT  # the put may still be reading the pages: keep them pinned
            self._mark(self.index.mark_in_pool, job.tokens, job.namespace, pages[ok])
            self._mark(self.index.mark_write_failed, job.tokens, job.namespace, pages[~ok & ~late])
            if late.any():
                self._late_puts.append((job, np.flatnonzero(late)))
            written = int(ok.sum()) - existed
            with self._stats.lock:
                c = self._stats.c
                c["stored_pages"] += written
                c["stored_bytes"] += written * self.layout.page_bytes
                c["skipped_existing_pages"] += existed
                c["store_failed_pages"] += int((~ok).sum())
                self._stats.store_ms.append((time.perf_counter() - job.t0) * 1e3)
            if (~ok).any():
                self._store_failed("put_status", f"{int((~ok).sum())} of {len(ok)} pages not stored")
            else:
                self._store_recovered()
        return n

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every in-flight write and apply it (shutdown, tests)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._inflight_cv:
                if self._inflight_pages == 0:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{self._inflight_pages} pages still being written")
                self._inflight_cv.wait(timeout=0.05)
        self.poll()

    # ---- eviction and sizes -------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` device tokens (LRU, unlocked, not being written)
        through ``free_slots``; returns how many were freed. Pages stored in the pool stay
        known to the index as pool-only."""
        freed = self.index.evict(int(num_tokens))
        if freed.size:
            self.free_slots(freed)
            with self._stats.lock:
                self._stats.c["evicted_tokens"] += int(freed.size)
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
        return _Stats.COUNTERS

    def stats(self) -> dict:
        with self._stats.lock:
            d = dict(self._stats.c)
            d["failures"] = dict(self._stats.failures)
            for name, q in (("load_ms", self._stats.load_ms), ("store_ms", self._stats.store_ms)):
                a = np.asarray(q, dtype=np.float64)
                d[name] = ({"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                            "p99": float(np.percentile(a, 99)), "count": int(a.size)} if a.size else
                           {"count": 0})
        d["inflight_pages"] = self._inflight_pages
        d["quarantined_slots"] = int(sum(len(q) for q in self._quarantine))
        d["pending_completions"] = len(self._done)
        d["store"] = None if self.store is None else self.store.scheme
        d["store_available"] = self._store_ok()
        d["device_tokens"] = self.index.total_size
        return d

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout=60)
        finally:
            self._writer.shutdown(wait=True)
            if self.store is not None:
                self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LayerwiseLoad:
    """A layer-by-layer load in progress (see ``KVDirectCache.load_layerwise``)."""

    def __init__(self, cache: KVDirectCache, m: CacheMatch, slots):
        self.cache, self.m = cache, m
        self.slots = _as_slots(slots)
        self.n_pages = cache._plan_count(m, self.slots)
        L = cache.layout.num_layers
        self._events = [threading.Event() for _ in range(L)]
        self._ok_after_layer = [0] * L
        self.status = np.zeros(self.n_pages, dtype=np.int32)
        self._t0 = time.perf_counter()
        self._result = None
        self._thread = None
        if self.n_pages == 0:
            for e in self._events:
                e.set()
            return
        self._keys, self._page_slots = cache._load_pages(m, self.slots, self.n_pages)
        self._thread = threading.Thread(target=self._run, name="kvdirect-layerwise", daemon=True)
        self._thread.start()

    def _run(self):
        c = self.cache
        layers = len(self._events)
        piecewise = getattr(c.store, "open_read", None) if not c._stage else None
        try:
            if piecewise is None:  # whole objects: every layer completes at once
                self.status[:] = c._get(self._keys, c.layout.plan(self._page_slots))
                for l in range(layers):
                    self._ok_after_layer[l] = first_failure(self.status)
                    self._events[l].set()
                return
            obj = np.full(self.n_pages, c.layout.page_bytes, dtype=np.uint64)
            with piecewise(self._keys, obj) as rd:
                alive = first_failure(rd.status)
                for l in range(layers):  # layer l is the next bytes of every page object
                    if alive:
                        rd.read(c.layout.plan_layer(self._page_slots[:alive], l))
                    self._ok_after_layer[l] = alive
                    self._events[l].set()
            self.status[:] = rd.end()
        except Exception as e:
            c._store_failed("get", e)
            self.status[:] = UNAVAILABLE
        finally:
            for e in self._events:
                e.set()

    def wait_layer(self, layer: int, timeout: float | None = None) -> int:
        """Block until layer ``layer`` is loaded; returns the tokens valid for it so far."""
        if not self._events[layer].wait(timeout):
            raise TimeoutError(f"layer {layer} not loaded within {timeout}s")
        return self._ok_after_layer[layer] * self.cache.page_size

    def finish(self) -> int:
        """Wait for every layer and apply the result; returns the tokens loaded."""
        if self._result is None:
            if self._thread is not None:
                self._thread.join()
            self._result = self.cache._finish_load(self.m, self.slots, self.n_pages,
                                                   self.status if self.n_pages else None, self._t0)
        return self._result


def torch_dist_min(group=None) -> Callable[[int], int]:
    """TP agreement: all-reduce MIN over torch.distributed (gloo on CPU, NCCL/HCCL on devices)."""
    import torch
    import torch.distributed as dist

    backend = dist.get_backend(group)
    device = "cpu" if backend == "gloo" else ("cuda" if torch.cuda.is_available() else "cpu")

    def reduce_min(n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        return int(t.item())

    return reduce_min
