"""Asynchronous write-back: pin new full pages, put them on writer threads, apply
completions on the scheduler thread.

Writer threads only enqueue their results; ``apply`` (called from
``KVDirectCache.poll``) marks pages in the pool or unpins them, so the index
sees a single writer. A page counts as stored only after its whole put
returned OK. A put that timed out may still read its pages: they stay pinned
until the store is quiet, then the late object is removed (it may be torn).

Ordering: the job carries an event recorded on the compute stream when
``write_back`` was called; the transfer path makes the store (direct) or the
gather (staged) wait for it before reading the pages.

Tensor parallelism with MLA: every rank holds the same page bytes under the same
keys, so rank 0 alone writes them (``CacheParts.writes``); the other ranks insert
the pages into their index and leave their pool state unknown (their matches ask
the store, where rank 0's pages are).

Errors: store failures unpin the pages and back off; any other error in a
writer thread (a bug, a configuration error) unpins the pages and is raised
from ``poll``.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from kvdirect.cache.health import STORE_FAILURES
from kvdirect.cache.indexing import UNKNOWN, mark
from kvdirect.cache.inputs import as_slots, as_tokens, check_token_slots
from kvdirect.cache.parts import CacheParts
from kvdirect.errors import ConfigError, KVDirectError
from kvdirect.stores.base import OK, TIMEOUT


@dataclass
class WriteJob:
    tokens: np.ndarray
    namespace: str | None
    pages: np.ndarray        # page indices (from 0) being written
    keys: list
    page_slots: np.ndarray   # first device slot of each page
    event: object = None     # compute-stream event the transfer waits on before reading the pages
    t0: float = field(default_factory=time.perf_counter)


class WriteBack:
    def __init__(self, parts: CacheParts):
        self.p = parts
        self.executor = ThreadPoolExecutor(max_workers=parts.config.writer_threads,
                                           thread_name_prefix="kvdirect-put")
        self.done: collections.deque = collections.deque()  # finished (job, status, existed, err)
        self.inflight_pages = 0
        self._cv = threading.Condition()

    # ---- scheduler thread --------------------------------------------------------
    def submit(self, tokens, slots, namespace) -> int:
        p = self.p
        t = as_tokens(tokens)
        s = as_slots(slots)
        P = p.page_size
        full = len(t) // P
        if len(s) < full * P:
            raise ConfigError(f"write_back needs a slot per token of the full pages: "
                              f"{full * P} tokens, {len(s)} slots")
        check_token_slots(p.layout, s[: full * P], "write_back")
        prefix = t[: full * P]
        already, r = p.index.insert_path(prefix, s[: full * P], namespace)  # r: the path, as match sees it
        if not (p.config.write_back and p.writes and full and p.health.available()):
            return already
        states = p.index.path_states(r.node)[0][:full]
        todo = np.flatnonzero(states == UNKNOWN)
        if not todo.size:
            return already
        if not self._reserve(len(todo)):
            p.stats.add(dropped_writeback_pages=len(todo))
            return already
        digests = p.keys.digests(prefix, namespace, r.node, full, full)
        pinned = mark(p.index.mark_writing, prefix, namespace, todo)
        if pinned != len(todo):  # cannot happen on the single scheduler thread
            raise KVDirectError(f"internal: pinned {pinned} of {len(todo)} pages")
        page_slots = r.device_slots[todo * P]
        job = WriteJob(prefix.copy(), namespace, todo.astype(np.int64),
                       p.keys.pool_keys(digests[todo]), page_slots, p.transfer.compute_event())
        self.executor.submit(self._run, job)
        return already

    def _reserve(self, n: int) -> bool:
        """Bound in-flight pages: 'drop' refuses, 'wait' applies completions until room."""
        limit = self.p.config.max_inflight_pages
        if n > limit:
            return False
        while True:
            with self._cv:
                if self.inflight_pages + n <= limit:
                    self.inflight_pages += n
                    return True
                if self.p.config.backpressure == "drop":
                    return False
                self._cv.wait(timeout=0.05)
            self.p.quarantine.release()
            self.apply()

    def apply(self) -> int:
        """Apply finished writes to the index; returns how many jobs were applied."""
        p = self.p
        n = 0
        while self.done:
            job, status, existed, err = self.done.popleft()
            n += 1
            pages = job.pages
            if err is not None:
                mark(p.index.mark_write_failed, job.tokens, job.namespace, pages)
                if not isinstance(err, STORE_FAILURES):
                    raise err  # a bug or a configuration error, never a store failure
                p.health.failed("put", err)
                p.stats.add(store_failed_pages=len(pages))
                continue
            ok = status == OK
            late = status == TIMEOUT  # the put may still be reading the pages: keep them pinned
            mark(p.index.mark_in_pool, job.tokens, job.namespace, pages[ok])
            mark(p.index.mark_write_failed, job.tokens, job.namespace, pages[~ok & ~late])
            if late.any():
                p.quarantine.defer(lambda job=job, idx=np.flatnonzero(late): self._drop_late(job, idx))
            written = int(ok.sum()) - existed
            with p.stats.lock:
                c = p.stats.c
                c["stored_pages"] += written
                c["stored_bytes"] += written * p.layout.page_bytes
                c["skipped_existing_pages"] += existed
                c["store_failed_pages"] += int((~ok).sum())
                p.stats.store_ms.append((time.perf_counter() - job.t0) * 1e3)
            if (~ok).any():
                p.health.failed("put_status", f"{int((~ok).sum())} of {len(ok)} pages not stored")
            else:
                p.health.recovered()
        return n

    def _drop_late(self, job: WriteJob, idx: np.ndarray) -> None:
        """A put that completed after its timeout may hold torn bytes: drop it, then unpin."""
        p = self.p
        try:
            p.store.remove([job.keys[i] for i in idx])
        except STORE_FAILURES as e:
            p.health.failed("remove", e)
        mark(p.index.mark_write_failed, job.tokens, job.namespace, job.pages[idx])

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until no write is in flight (TimeoutError after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cv:
                if self.inflight_pages == 0:
                    return
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{self.inflight_pages} pages still being written")
                self._cv.wait(timeout=0.05)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)

    # ---- writer threads ------------------------------------------------------------
    def _run(self, job: WriteJob) -> None:
        """Skip pages the pool has, put the rest (after the compute stream's event)."""
        p = self.p
        try:
            status = np.zeros(len(job.keys), dtype=np.int32)
            have = np.asarray(p.store.exists(job.keys), dtype=bool)
            todo = np.flatnonzero(~have)
            if todo.size:
                keys = job.keys if todo.size == len(job.keys) else [job.keys[i] for i in todo]
                status[todo] = p.transfer.put(keys, job.page_slots[todo], job.event)
            self.done.append((job, status, int(have.sum()), None))
        except BaseException as e:  # noqa: BLE001 - reported on the scheduler thread by apply()
            self.done.append((job, None, 0, e))
        with self._cv:
            self.inflight_pages -= len(job.keys)
            self._cv.notify_all()
