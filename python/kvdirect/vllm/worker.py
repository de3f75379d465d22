"""The connector's worker side: pages straight between vLLM's KV blocks and the store.

Runs in each vLLM worker (one per TP rank); no vLLM import. A page is one
(block, layer set): the bytes of block ``b`` in every layer, concatenated in
layer order, planned by :class:`kvdirect.layout.KVLayout` (``from_blocks``) and
moved by the store's own gather/scatter in one call per batch.

* Loads run before the forward reads any layer: ``start_load`` reads every
  request's pages in one ``Store.get`` (or, with ``layerwise`` and a store that
  reads objects piecewise, layer by layer on a thread, ``wait_layer`` blocking
  per layer). A page whose get did not deliver every byte is a failure; it and
  the request's later pages are reported (``take_load_errors``) so vLLM
  recomputes them, and the scheduler hears of it (``take_report``).
* Saves are asynchronous: ``submit_saves`` (after the forward wrote the KV) hands
  each run to a writer thread (exists check, then ``Store.put``); a request whose
  saves are in flight is reported finished (``get_finished``) only once they are
  all acknowledged, so vLLM keeps its blocks until then. Preempted requests'
  saves are awaited before the next forward can overwrite their blocks.
* :class:`PageTransfer` is the one place bytes cross between engine memory and
  the store. On vLLM CPU no device ordering is needed; a device engine needs the
  compute stream's event before a put and before the forward after a get.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvdirect import keys as _keys
from kvdirect.cache.quarantine import Quarantine
from kvdirect.cache.transfer import Transfer, first_failure
from kvdirect.config import CacheConfig
from kvdirect.device import device_ops
from kvdirect.errors import ConfigError, LayoutMismatchError
from kvdirect.stores.base import OK, TIMEOUT, UNAVAILABLE
from kvdirect.vllm.plan import PageRun, SaveAck, StepPlan, WorkerReport

log = logging.getLogger("kvdirect.vllm")


class PageTransfer:
    """Pages between engine memory and the store, one call per batch, through the cache
    manager's ordered transfer path (direct, or staged with ``stage=true``). Pages are
    given by their first slot (``block_id * page_size``). Host memory only for now."""

    def __init__(self, store, layout, config: CacheConfig | None = None):
        if layout.device != "cpu" and not layout.device.startswith("sim:"):  # sim: the CPU suite's ordering tests
            raise ConfigError(f"kvdirect vLLM connector: KV cache on {layout.device}; only vLLM CPU is supported "
                              "(device engines need ordered device transfers, not wired for vLLM yet)")
        self.store, self.layout = store, layout
        ops = device_ops(layout, store=f"the {store.scheme}:// pool")
        # vLLM owns its blocks (nothing to free here); the quarantine holds retired staging
        # buffers until the store is quiet, released by the worker's step (release())
        self.quarantine = Quarantine(store, lambda slots: None)
        self._t = Transfer(store, layout, config or CacheConfig(model="-", store=None), ops, self.quarantine)

    def compute_event(self):
        """The forward's compute event: recorded on the forward thread (start_load,
        wait_for_save), never on a writer thread, whose current stream is not the forward's."""
        return self._t.compute_event()

    def get(self, keys: list, page_slots: np.ndarray) -> np.ndarray:
        return self._t.get(keys, page_slots, self._t.compute_event())  # on the forward thread

    def put(self, keys: list, page_slots: np.ndarray, event) -> np.ndarray:
        return self._t.put(keys, page_slots, event)

    def release(self) -> None:
        self.quarantine.release()

    def piecewise(self):
        """The store's ranged reader (layer-by-layer loads) or None."""
        return None if self._t.stage else getattr(self.store, "open_read", None)


class _LayerwiseLoad:
    """Every layer of a batch of pages, read one layer at a time on a thread."""

    def __init__(self, side: "WorkerSide", runs, keys, page_slots, reader):
        self.side, self.runs = side, runs
        L = side.layout.num_layers
        self.events = [threading.Event() for _ in range(L)]
        self.status = np.full(len(keys), UNAVAILABLE, dtype=np.int32)
        self._args = (keys, page_slots, reader)
        self.thread = threading.Thread(target=self._run, name="kvdirect-vllm-load", daemon=True)
        self.thread.start()

    def _run(self):
        keys, slots, reader = self._args
        lay = self.side.layout
        try:
            sizes = np.full(len(keys), lay.page_bytes, dtype=np.uint64)
            with reader(keys, sizes) as rd:
                alive = first_failure(rd.status)
                for layer, ev in enumerate(self.events):
                    if alive:
                        rd.read(lay.plan_layer(slots[:alive], layer))
                    ev.set()
            self.status[:] = rd.end()
        except Exception as e:  # noqa: BLE001 - a store error is a miss
            self.side._store_error("get", e)
        finally:
            for ev in self.events:
                ev.set()


class WorkerSide:
    def __init__(self, config: CacheConfig, store, layout, layer_names: list[str],
                 fingerprint: _keys.LayoutFingerprint, rank: int = 0):
        self.config = config
        self.layout = layout
        self.layer_of = {n: i for i, n in enumerate(layer_names)}
        self.fingerprint = fingerprint
        self.rank = int(rank)
        self.transfer = PageTransfer(store, layout, config)
        self.store = store
        self._checked_plan = False
        self._writer = ThreadPoolExecutor(max_workers=config.writer_threads, thread_name_prefix="kvdirect-vllm-put")
        self._cv = threading.Condition()
        self._inflight_pages = 0
        self._inflight: collections.Counter = collections.Counter()  # req_id -> save runs in flight
        self._done: collections.deque = collections.deque()
        self._saving: set[str] = set()     # requests with saves planned (held at finish by the scheduler)
        self._finishing: set[str] = set()  # finished requests waiting for their saves
        self._load_errors: set[int] = set()
        self._report = WorkerReport()
        self._layerwise: _LayerwiseLoad | None = None
        self._last_log = -1e9
        self.stats = collections.Counter()
        self.recent_loads: collections.deque = collections.deque(maxlen=256)  # (req_id, first_page, keys, blocks, ok)
        self.recent_saves: collections.deque = collections.deque(maxlen=256)
        self._closed = False

    # ---- helpers -----------------------------------------------------------------
    def _keys(self, digests) -> list:
        return _keys.pool_keys(np.ascontiguousarray(digests, dtype=np.uint8), self.fingerprint)

    def _slots(self, block_ids: np.ndarray) -> np.ndarray:
        return np.asarray(block_ids, dtype=np.int64) * self.layout.page_size

    def _store_error(self, what: str, err) -> None:
        self.stats[f"{what}_errors"] += 1
        now = time.monotonic()
        if now - self._last_log >= self.config.log_interval_s:
            self._last_log = now
            log.warning("kvdirect: store %s failed (%s); those pages are misses", what, err)

    def check_plan(self, plan: StepPlan) -> None:
        if self._checked_plan or not plan.fingerprint_digests:
            return
        want = plan.fingerprint_digests[self.rank] if self.rank < len(plan.fingerprint_digests) else None
        if want != self.fingerprint.digest:
            raise LayoutMismatchError(f"kvdirect vLLM connector: the scheduler keys pages with layout {want}, "
                                      f"this worker (rank {self.rank}) has {self.fingerprint.digest}")
        self._checked_plan = True

    # ---- loads --------------------------------------------------------------------------
    def start_load(self, plan: StepPlan) -> None:
        self.check_plan(plan)
        self.transfer.release()  # staging buffers retired by a timed-out call, once the store is quiet
        runs = [r for r in plan.loads if len(r)]
        if not runs:
            return
        keys: list = []
        for r in runs:
            keys += self._keys(r.digests)
        slots = self._slots(np.concatenate([r.block_ids for r in runs]))
        reader = self.transfer.piecewise() if self.config.layerwise else None
        if reader is not None:
            self._layerwise = _LayerwiseLoad(self, runs, keys, slots, reader)
            return
        t0 = time.perf_counter()
        try:
            status = self.transfer.get(keys, slots)
        except Exception as e:  # noqa: BLE001 - a store error is a miss, never a crash
            self._store_error("get", e)
            status = np.full(len(keys), UNAVAILABLE, dtype=np.int32)
        self.stats["load_ms_total"] += (time.perf_counter() - t0) * 1e3
        self._finish_loads(runs, keys, status)

    def wait_layer(self, layer_name: str) -> None:
        lw = self._layerwise
        if lw is not None:
            lw.events[self.layer_of.get(layer_name, len(lw.events) - 1)].wait()

    def finish_loads(self) -> None:
        """Join a layer-wise load (end of the forward) and account its result."""
        lw, self._layerwise = self._layerwise, None
        if lw is not None:
            lw.thread.join()
            keys = lw._args[0]
            self._finish_loads(lw.runs, keys, lw.status)

    def _finish_loads(self, runs, keys, status) -> None:
        off = 0
        for r in runs:
            n = len(r)
            st = status[off:off + n]
            k = first_failure(st)
            self.recent_loads.append((r.req_id, r.first_page, keys[off:off + n], r.block_ids.copy(), k))
            self.stats["loaded_pages"] += k
            self.stats["loaded_bytes"] += k * self.layout.page_bytes
            if k < n:
                # this page and the request's later loaded pages are recomputed by vLLM
                self._load_errors.update(int(b) for b in r.block_ids[k:])
                self._report.load_failures.append((r.req_id, r.first_page + k))
                self.stats["load_failed_pages"] += n - k
                self.stats[f"load_status_{int(st[k])}"] += 1
            off += n

    def take_load_errors(self) -> set[int]:
        self.finish_loads()
        out, self._load_errors = self._load_errors, set()
        return out

    # ---- saves ----------------------------------------------------------------------------
    def submit_saves(self, plan: StepPlan) -> None:
        event = self.transfer.compute_event() if plan.saves else None  # forward thread: the KV is queued
        for r in plan.saves:
            if not len(r):
                continue
            self._saving.add(r.req_id)
            if not self._reserve(len(r)):
                self.stats["dropped_save_pages"] += len(r)
                continue
            with self._cv:
                self._inflight[r.req_id] += 1
            keys = self._keys(r.digests)
            self._writer.submit(self._run_save, r, keys, self._slots(r.block_ids), event)

    def _reserve(self, n: int) -> bool:
        limit = self.config.max_inflight_pages
        with self._cv:
            while self._inflight_pages + n > limit:
                if self.config.backpressure == "drop" or n > limit:
                    return False
                self._cv.wait(timeout=0.05)
            self._inflight_pages += n
            return True

    def _run_save(self, run: PageRun, keys: list, page_slots: np.ndarray, event) -> None:
        t0 = time.perf_counter()
        status = np.full(len(keys), UNAVAILABLE, dtype=np.int32)
        existed = 0
        try:
            have = np.asarray(self.store.exists(keys), dtype=bool)
            existed = int(have.sum())
            status[have] = OK
            todo = np.flatnonzero(~have)
            if todo.size:
                sub = [keys[i] for i in todo] if todo.size != len(keys) else keys
                status[todo] = self.transfer.put(sub, page_slots[todo], event)
            late = np.flatnonzero(status == TIMEOUT)
            if late.size:
                self._settle_late_puts([keys[i] for i in late])
        except Exception as e:  # noqa: BLE001 - reported as failed pages
            self._store_error("put", e)
            status[:] = UNAVAILABLE
        self._done.append((run, status, existed, (time.perf_counter() - t0) * 1e3))
        with self._cv:
            self._inflight_pages -= len(keys)
            self._inflight[run.req_id] -= 1
            if self._inflight[run.req_id] <= 0:
                del self._inflight[run.req_id]
            self._cv.notify_all()

    def _settle_late_puts(self, keys: list) -> None:
        """A put that timed out may still read the blocks: wait until the store is quiet,
        then remove what it may have written torn. Only then are the blocks released."""
        q = getattr(self.store, "quiesce", None)
        if q is not None:
            q(None)
        try:
            self.store.remove(keys)
        except Exception as e:  # noqa: BLE001
            self._store_error("remove", e)

    def handle_preemptions(self, preempted) -> None:
        """vLLM freed these requests' blocks: their saves must finish reading them first."""
        ids = set(preempted or ()) & set(self._inflight)
        if not ids:
            return
        with self._cv:
            while any(self._inflight.get(r) for r in ids):
                self._cv.wait(timeout=0.05)
        self.stats["preemption_waits"] += 1

    def get_finished(self, finished_req_ids) -> set[str]:
        self._finishing.update(r for r in (finished_req_ids or ()) if r in self._saving)
        with self._cv:
            ready = {r for r in self._finishing if not self._inflight.get(r)}
        self._drain()  # after the snapshot: every result of a ready request is already queued
        self._finishing -= ready
        self._saving -= ready
        return ready

    def _drain(self) -> None:
        while self._done:
            run, status, existed, ms = self._done.popleft()
            ok = status == OK
            self._report.acks.append(SaveAck(self.rank, run.req_id, run.first_page, ok))
            self.recent_saves.append((run.req_id, run.first_page, self._keys(run.digests), run.block_ids.copy(), ok))
            written = int(ok.sum()) - existed
            self.stats["stored_pages"] += written
            self.stats["stored_bytes"] += written * self.layout.page_bytes
            self.stats["skipped_existing_pages"] += existed
            self.stats["store_failed_pages"] += int((~ok).sum())
            self.stats["store_ms_total"] += ms

    def take_report(self) -> WorkerReport | None:
        self._drain()
        out, self._report = self._report, WorkerReport()
        return out if out else None

    def flush(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._inflight_pages:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self._inflight_pages} pages still being saved")
                self._cv.wait(timeout=0.05)
        self._drain()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.finish_loads()
            self.flush()
        finally:
            self._writer.shutdown(wait=True)
