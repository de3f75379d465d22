"""Asynchronous write-back: pin new full pages, put them on writer threads, apply
completions on the scheduler thread.

Writer threads only record their results on the job; ``apply`` (called from
``KVDirectCache.poll``) marks pages in the pool or unpins them, so the index
sees a single writer. A page counts as stored only after its whole put
returned OK. A put that timed out may still read its pages: its job completes
only once the store is quiet and the late object is removed (it may be torn);
its pages stay pinned until then.

Tensor parallelism: every rank pins and writes its own pages and unpins them
when its job is applied; SGLang admits requests by the evictable size, so ranks
that applied different jobs would admit and evict differently (and one could
enter a collective another skips). With ``tp_reduce`` every ``write_back`` call
is one job on every rank (possibly empty, in the same order everywhere) and
``apply`` applies only the leading jobs every rank has completed (all-reduce
MIN, as SGLang's HiCache does with its write acknowledgements); a job that
failed on any rank is applied as failed on every rank, so the ranks' indexes
keep the same pages pinned and in the pool. ``apply`` is then a collective
whenever jobs are queued: it must be called in the same sequence on every rank
(the scheduler's calls are).

Ordering: the job carries the compute event recorded when ``write_back`` was
called (see :mod:`kvdirect.cache.transfer`); the store (direct) or the gather
(staged) waits for it before reading the pages.

Tensor parallelism with MLA: every rank holds the same page bytes under the same
keys, so rank 0 alone writes them (``CacheParts.writes``). The other ranks pin the
same pages in a mirror job that needs no put and is applied when the ranks agree
(so every rank unpins them together); it leaves the pages' pool state unknown,
and a later match on that rank asks the store, where rank 0's pages are.

Errors: store failures unpin the pages and back off; any other error in a
writer thread (a bug, a configuration error) unpins the pages and is raised
from ``poll``.
"""
from __future__ import annotations

import collections
import itertools
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

_NO_PAGES = np.empty(0, dtype=np.int64)


@dataclass(eq=False)
class WriteJob:
    tokens: np.ndarray
    namespace: str | None
    pages: np.ndarray        # page indices (from 0) being written
    keys: list
    page_slots: np.ndarray   # first device slot of each page
    event: object = None     # compute event the transfer waits on before reading the pages
    t0: float = field(default_factory=time.perf_counter)
    # set by the writer thread; read by apply() once ``done``
    status: np.ndarray | None = None
    existed: int = 0
    err: BaseException | None = None
    done: bool = False
    mirror: bool = False     # pins what another TP rank writes (see WriteBack._mirror); no put

    @property
    def ok(self) -> bool:
        """Every page stored."""
        return self.err is None and (self.status is None or bool((self.status == OK).all()))


def _empty_job() -> WriteJob:
    """A write_back call that writes nothing on this rank (TP: every call is a job)."""
    return WriteJob(_NO_PAGES, None, _NO_PAGES, [], _NO_PAGES, done=True)


class WriteBack:
    def __init__(self, parts: CacheParts):
        self.p = parts
        self.executor = ThreadPoolExecutor(max_workers=parts.config.writer_threads,
                                           thread_name_prefix="kvdirect-put")
        self.jobs: collections.deque = collections.deque()  # submitted, not applied (in order)
        self.inflight_pages = 0
        self._cv = threading.Condition()
        self.tp = parts.tp_reduce is not None

    # ---- scheduler thread --------------------------------------------------------
    def submit(self, tokens, slots, namespace) -> int:
        job = None
        try:
            already, job = self._submit(tokens, slots, namespace)
        finally:
            if job is not None or self.tp:  # TP: one job per call on every rank, in call order
                self.jobs.append(job or _empty_job())
        if job is not None and not job.mirror:
            self.executor.submit(self._run, job)
        return already

    def _submit(self, tokens, slots, namespace):
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
        if not (p.config.write_back and full and (p.health.available() or not p.writes)):
            return already, None
        states = p.index.path_states(r.node)[0][:full]
        todo = np.flatnonzero(states == UNKNOWN)
        if not todo.size:
            return already, None
        if not p.writes:
            return already, self._mirror(prefix, namespace, todo)
        if not self._reserve(len(todo)):
            p.stats.add(dropped_writeback_pages=len(todo))
            return already, None
        digests = p.keys.digests(prefix, namespace, r.node, full, full)
        pinned = mark(p.index.mark_writing, prefix, namespace, todo)
        if pinned != len(todo):  # cannot happen on the single scheduler thread
            raise KVDirectError(f"internal: pinned {pinned} of {len(todo)} pages")
        page_slots = r.device_slots[todo * P]
        job = WriteJob(prefix.copy(), namespace, todo.astype(np.int64),
                       p.keys.pool_keys(digests[todo]), page_slots, p.transfer.compute_event())
        return already, job

    def _mirror(self, prefix, namespace, todo: np.ndarray) -> WriteJob | None:
        """A rank that does not write (MLA under TP: rank 0 writes the pages every rank holds)
        pins the pages rank 0 writes and unpins them when the ranks agree that job is done, so
        every rank keeps the same pages pinned (see the module docstring). It never learns
        whether rank 0's put landed, so it leaves them unknown (a later match asks the store).
        Without the TP agreement it neither pins nor writes."""
        if not self.tp:
            return None
        p = self.p
        pinned = mark(p.index.mark_writing, prefix, namespace, todo)
        if pinned != len(todo):  # cannot happen on the single scheduler thread
            raise KVDirectError(f"internal: pinned {pinned} of {len(todo)} pages")
        return WriteJob(prefix.copy(), namespace, todo.astype(np.int64), [], _NO_PAGES, done=True, mirror=True)

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
            if not self.tp:  # TP: apply is a collective, called only where every rank calls it
                self.apply()

    def apply(self) -> int:
        """Apply finished writes to the index; returns how many jobs were applied.
        With TP, only the leading jobs every rank has finished (see the module docstring)."""
        if not self.jobs:
            return 0
        if not self.tp:
            done = [j for j in self.jobs if j.done]
            if done:  # a writer may finish another job meanwhile: remove exactly these
                taken = set(map(id, done))
                self.jobs = collections.deque(j for j in self.jobs if id(j) not in taken)
            for job in done:
                self._apply(job, failed_elsewhere=False)
            return len(done)
        p = self.p
        n = 0
        for job in self.jobs:
            if not job.done:
                break
            n += 1
        n = p.reduce(n)  # finished on every rank
        if n == 0:
            return 0
        ok = 0
        for job in itertools.islice(self.jobs, n):
            if not job.ok:
                break
            ok += 1
        ok = p.reduce(ok)  # stored on every rank
        take = ok + 1 if ok < n else ok  # job ``ok`` failed on some rank: failed on every rank
        for i in range(take):
            self._apply(self.jobs.popleft(), failed_elsewhere=i == ok)
        return take

    def _apply(self, job: WriteJob, failed_elsewhere: bool) -> None:
        p = self.p
        pages = job.pages
        if not pages.size:
            return
        if job.mirror:
            mark(p.index.mark_write_failed, job.tokens, job.namespace, pages)  # unpin, pool state unknown
            return
        if job.err is not None:
            mark(p.index.mark_write_failed, job.tokens, job.namespace, pages)
            if not isinstance(job.err, STORE_FAILURES):
                raise job.err  # a bug or a configuration error, never a store failure
            p.health.failed("put", job.err)
            p.stats.add(store_failed_pages=len(pages))
            return
        status = job.status
        ok = status == OK
        if failed_elsewhere:  # another rank's half of these pages is missing: nobody marks them
            mark(p.index.mark_write_failed, job.tokens, job.namespace, pages)
        else:
            mark(p.index.mark_in_pool, job.tokens, job.namespace, pages[ok])
            mark(p.index.mark_write_failed, job.tokens, job.namespace, pages[~ok])
        written = int(ok.sum()) - job.existed
        with p.stats.lock:
            c = p.stats.c
            c["stored_pages"] += written
            c["stored_bytes"] += written * p.layout.page_bytes
            c["skipped_existing_pages"] += job.existed
            c["store_failed_pages"] += int((~ok).sum())
            p.stats.store_ms.append((time.perf_counter() - job.t0) * 1e3)
        if (~ok).all():  # nothing landed: the store is likely down, back off
            p.health.failed("put_status", f"{len(ok)} of {len(ok)} pages not stored")
        elif (~ok).any():  # the store answered: a few pages missing is no reason to skip it
            p.health.partial("put_status", f"{int((~ok).sum())} of {len(ok)} pages not stored")
        else:
            p.health.recovered()

    def _drop_late(self, job: WriteJob, idx: np.ndarray) -> None:
        """A put that completed after its timeout may hold torn bytes: drop it; then the
        job is done (its pages, pinned until now, are unpinned when it is applied)."""
        p = self.p
        try:
            p.store.remove([job.keys[i] for i in idx])
        except STORE_FAILURES as e:
            p.health.failed("remove", e)
        job.done = True

    @property
    def pending(self) -> int:
        """Finished jobs not applied yet."""
        return sum(1 for j in self.jobs if j.done and j.pages.size)

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
        """Skip pages the pool has, put the rest (after the job's compute event)."""
        p = self.p
        late = _NO_PAGES
        try:
            status = np.zeros(len(job.keys), dtype=np.int32)
            have = np.asarray(p.store.exists(job.keys), dtype=bool)
            todo = np.flatnonzero(~have)
            if todo.size:
                keys = job.keys if todo.size == len(job.keys) else [job.keys[i] for i in todo]
                status[todo] = p.transfer.put(keys, job.page_slots[todo], job.event)
            job.status, job.existed = status, int(have.sum())
            late = np.flatnonzero(status == TIMEOUT)
        except BaseException as e:  # noqa: BLE001 - reported on the scheduler thread by apply()
            job.err = e
        if late.size:  # the put may still be reading the pages: done once the store is quiet
            p.quarantine.defer(lambda: self._drop_late(job, late))
        else:
            job.done = True
        with self._cv:
            self.inflight_pages -= len(job.keys)
            self._cv.notify_all()
