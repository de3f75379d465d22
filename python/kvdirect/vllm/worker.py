"""The connector's worker side: pages straight between vLLM's KV blocks and the store.

Runs in each vLLM worker (one per TP rank); no vLLM import. A page is one
(block, layer set): the bytes of block ``b`` in every layer, concatenated in
layer order, planned by :class:`kvdirect.layout.KVLayout` (``from_blocks``) and
moved by the store's own gather/scatter in one call per batch.

* Loads run before the forward reads any layer: ``start_load`` reads every
  request's pages in one ``Store.get`` (or, with ``layerwise`` and a store that
  reads objects piecewise, layer by layer on a thread, ``wait_layer`` blocking
  per layer; a page the forward writes into, ``PageRun.recompute_tail``, is read
  whole first). A page whose get did not deliver every byte is a failure; it and
  the request's later pages are reported (``take_load_errors``) so vLLM
  recomputes them, and the scheduler hears of it (``take_report``). Under TP the
  ranks agree on each request's first failed page (``agree``: the minimum over
  ranks) before anything is saved: a page computed on one rank reads every
  rank's KV through the all-reduce, so a failed load on any rank spoils the
  pages computed on top of it on all ranks.
* Saves are asynchronous: ``submit_saves`` (after the forward wrote the KV) hands
  each run to a writer thread (exists check, then ``Store.put``). MLA under TP: the
  page (the latent) is the same on every rank and its key has no rank, so rank 0
  alone puts it (``writes``); the other ranks load, take part in the agreement on
  failed loads, and report held requests finished at once (vLLM releases a request's
  blocks once every rank has reported it, so rank 0's saves still hold them). A page is saved
  only from blocks known good: a run is cut at the first page whose block, or
  whose request's earlier block (``prior_blocks``), failed to load in this step
  or may still be written by a timed-out get; the rest is reported withheld and
  planned again once vLLM has recomputed it. A request the scheduler holds at
  finish (``StepPlan.held``) is reported finished (``get_finished``) only once its
  saves are acknowledged and no timed-out get may still write its blocks, so vLLM
  keeps its blocks until then. Preempted requests' saves and late gets are
  awaited before the next forward can overwrite their blocks.
* A get that timed out inside the store client (Mooncake, MemCache deadlines) may
  keep writing its blocks after it was reported failed, while vLLM recomputes into
  the same blocks from the next step on. So the step that saw the timeout ends
  only once ``Store.quiesce`` says no abandoned call is left (at most
  ``late_get_wait_s``, then a warning): the late write lands before the recompute.
  Past that bound the blocks stay quarantined until the store is quiet: saves from
  them are withheld and the request is held at finish and awaited at preemption
  (a late get then writes only that page's bytes from the pool into blocks that
  hold the same page, never into blocks given to other tokens).
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
from kvdirect.stores.base import OK, TIMEOUT, UNAVAILABLE, status_name
from kvdirect.vllm.plan import PageRun, SaveAck, StepPlan, WorkerReport

log = logging.getLogger("kvdirect.vllm")

LATE_GET_WAIT_S = 60.0  # how long a step waits for timed-out gets to return before vLLM recomputes


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

    def writeback_waits(self) -> int:
        """Write-back chunks that so far waited for a running load (loads go first)."""
        return self._t.loads_first.waits

    def release(self) -> None:
        self.quarantine.release()

    def piecewise(self):
        """The store's ranged reader (layer-by-layer loads) or None."""
        return None if self._t.stage else getattr(self.store, "open_read", None)


class _LayerwiseLoad:
    """Every layer of a batch of pages, read one layer at a time on a thread."""

    def __init__(self, side: "WorkerSide", keys, page_slots, reader):
        self.side = side
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


class _StepLoads:
    """This step's loads: runs, keys, per-page status (settled once, in ``finish_loads``)."""

    def __init__(self, runs: list[PageRun], keys: list, status: np.ndarray):
        self.runs, self.keys, self.status = runs, keys, status
        self.layerwise: _LayerwiseLoad | None = None
        self.layerwise_pages = np.zeros(0, dtype=np.int64)  # positions the layer-wise read fills


class WorkerSide:
    def __init__(self, config: CacheConfig, store, layout, layer_names: list[str],
                 fingerprint: _keys.LayoutFingerprint, rank: int = 0, agree=None, writes: bool = True):
        """``agree``: under TP, ``agree(first_failed_page_per_run) -> the minimum over every
        rank`` (a collective every rank enters in the same step); None with one rank.
        ``writes=False``: this rank loads but never puts (MLA under TP: the pages are the same on
        every rank and rank 0 puts them); it still settles loads with the other ranks."""
        self.config = config
        self.writes = bool(writes)
        self.agree = agree
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
        self._finishing: set[str] = set()  # finished requests the scheduler holds (StepPlan.held)
        self._load_errors: set[int] = set()
        self._report = WorkerReport()
        self._step: _StepLoads | None = None          # this step's loads until finish_loads settles them
        self._unsafe = np.zeros(0, dtype=np.int64)     # blocks no save may read this step
        self._late: dict[str, np.ndarray] = {}         # req -> blocks a timed-out get may still write
        self.late_get_wait_s = LATE_GET_WAIT_S
        self._last_log: dict[str, float] = {}
        self._suppressed: collections.Counter = collections.Counter()
        self.stats = collections.Counter()
        self.recent_loads: collections.deque = collections.deque(maxlen=256)  # (req_id, first_page, keys, blocks, ok)
        self.recent_saves: collections.deque = collections.deque(maxlen=256)
        self._closed = False

    # ---- helpers -----------------------------------------------------------------
    def _keys(self, digests) -> list:
        return _keys.pool_keys(np.ascontiguousarray(digests, dtype=np.uint8), self.fingerprint)

    def _slots(self, block_ids: np.ndarray) -> np.ndarray:
        return np.asarray(block_ids, dtype=np.int64) * self.layout.page_size

    def _log_once(self, kind: str, msg: str, *args) -> None:
        """One warning line per failure kind per ``log_interval_s`` (with how many were not logged)."""
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e18) < self.config.log_interval_s:
            self._suppressed[kind] += 1
            return
        self._last_log[kind] = now
        more, self._suppressed[kind] = self._suppressed[kind], 0
        log.warning("kvdirect: " + msg + (f" (+{more} more since the last such line)" if more else ""), *args)

    def _store_error(self, what: str, err) -> None:
        self.stats[f"{what}_errors"] += 1
        self._log_once(f"store_{what}", "store %s failed (%s); those pages are misses", what, err)

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
        self._release_late()
        self._step, self._unsafe = None, self._late_blocks()  # steps without loads too
        runs = [r for r in plan.loads if len(r)]
        if not runs:
            return
        keys: list = []
        for r in runs:
            keys += self._keys(r.digests)
        slots = self._slots(np.concatenate([r.block_ids for r in runs]))
        step = self._step = _StepLoads(runs, keys, np.full(len(keys), UNAVAILABLE, dtype=np.int32))
        reader = self.transfer.piecewise() if self.config.layerwise else None
        whole = np.arange(len(keys))
        if reader is not None:
            # a page the forward writes into (its last token recomputed) is read whole before the
            # forward: vLLM's CPU attention writes a layer's new KV before it waits for that layer
            ends = np.cumsum([len(r) for r in runs]) - 1
            whole = ends[[r.recompute_tail for r in runs]]
            step.layerwise_pages = np.setdiff1d(np.arange(len(keys)), whole)
        t0 = time.perf_counter()
        if whole.size:
            step.status[whole] = self._get([keys[i] for i in whole] if whole.size != len(keys) else keys,
                                           slots[whole])
        if step.layerwise_pages.size:
            lp = step.layerwise_pages
            step.layerwise = _LayerwiseLoad(self, [keys[i] for i in lp], slots[lp], reader)
        self.stats["load_ms_total"] += (time.perf_counter() - t0) * 1e3

    def _get(self, keys: list, slots: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(self.transfer.get(keys, slots), dtype=np.int32)
        except Exception as e:  # noqa: BLE001 - a store error is a miss, never a crash
            self._store_error("get", e)
            return np.full(len(keys), UNAVAILABLE, dtype=np.int32)

    def wait_layer(self, layer_name: str) -> None:
        lw = self._step.layerwise if self._step is not None else None
        if lw is not None:
            lw.events[self.layer_of.get(layer_name, len(lw.events) - 1)].wait()

    def finish_loads(self) -> None:
        """Settle this step's loads (end of the forward, before any save): join a layer-wise
        load, agree with the other TP ranks on each request's first failed page, report the
        failures, and mark the blocks no save may read."""
        step, self._step = self._step, None
        if step is None:
            return
        if step.layerwise is not None:
            step.layerwise.thread.join()
            step.status[step.layerwise_pages] = step.layerwise.status
        ends = np.cumsum([len(r) for r in step.runs])
        first = np.array([first_failure(step.status[e - len(r):e]) for r, e in zip(step.runs, ends)],
                         dtype=np.int64)
        local = first.copy()
        if self.agree is not None:  # every rank runs this with the same runs: a collective is safe
            first = np.minimum(np.asarray(self.agree(first), dtype=np.int64), first)
        unsafe, late_runs = [], []
        late = self._late_possible(step.status)
        for r, e, k, k_own in zip(step.runs, ends, first, local):
            n, k = len(r), int(k)
            st = step.status[e - n:e]
            self.recent_loads.append((r.req_id, r.first_page, step.keys[e - n:e], r.block_ids.copy(), k))
            self.stats["loaded_pages"] += k
            self.stats["loaded_bytes"] += k * self.layout.page_bytes
            if k < n:
                # this page and the request's later loaded pages are recomputed by vLLM
                self._load_errors.update(r.block_ids[k:].tolist())
                unsafe.append(r.block_ids[k:])
                self._report.load_failures.append((r.req_id, r.first_page + k))
                self.stats["load_failed_pages"] += n - k
                self.stats["load_failures"] += 1
                if k < k_own:
                    self._log_once("load_other_rank", "a load failed on another TP rank at page %d of %s: "
                                   "recomputed here too", r.first_page + k, r.req_id)
                else:
                    kind = status_name(int(st[k]))
                    self.stats[f"load_status_{int(st[k])}"] += 1
                    self._log_once(f"load_{kind}", "get of %d pages failed from page %d (%s): recomputed",
                                   n, r.first_page + k, kind)
            if late and k_own < n:
                late_runs.append((r.req_id, r.block_ids[k_own:]))
        if late_runs:
            # a timed-out get may still write these blocks, and vLLM recomputes into them next step
            self.stats["late_load_requests"] += len(late_runs)
            if not self.wait_quiet(self.late_get_wait_s):
                for rid, blocks in late_runs:  # quarantined: held at finish / preemption until quiet
                    self._late[rid] = np.union1d(self._late.get(rid, blocks[:0]), blocks)
                    self._report.late_loads.append(rid)
        if self._late:
            unsafe += list(self._late.values())
        self._unsafe = np.unique(np.concatenate(unsafe)) if unsafe else np.zeros(0, dtype=np.int64)

    def _late_possible(self, status: np.ndarray) -> bool:
        """Whether a failed get of this step may still be writing: the store has calls that timed
        out and did not return yet (stores without deadlines never do)."""
        if (status == OK).all():
            return False
        q = getattr(self.store, "quiesce", None)
        return q is not None and not q(0)

    def _late_blocks(self) -> np.ndarray:
        if not self._late:
            return np.zeros(0, dtype=np.int64)
        return np.unique(np.concatenate(list(self._late.values())))

    def _release_late(self) -> None:
        if self._late and self.transfer.quarantine.quiesced():
            self.stats["late_load_releases"] += len(self._late)
            self._late.clear()

    def take_load_errors(self) -> set[int]:
        self.finish_loads()
        out, self._load_errors = self._load_errors, set()
        return out

    def unsafe_blocks(self) -> np.ndarray:
        """Blocks no save may read this step (failed loads, late gets)."""
        return self._unsafe

    # ---- saves ----------------------------------------------------------------------------
    def submit_saves(self, plan: StepPlan) -> None:
        """After ``finish_loads``: hand the step's saves to the writer, each cut at its first
        page that reads a block no save may read."""
        self.finish_loads()
        if not self.writes:  # another rank puts these pages (MLA: rank 0); no save, no ack from here
            return
        event = self.transfer.compute_event() if plan.saves else None  # forward thread: the KV is queued
        for r in plan.saves:
            r = self._known_good(r)
            if not len(r):
                continue
            if not self._reserve(len(r)):
                self.stats["dropped_save_pages"] += len(r)
                self._log_once("save_dropped", "%d pages not saved: %d pages already being written "
                               "(max_inflight_pages, backpressure=drop)", len(r), self._inflight_pages)
                continue
            with self._cv:
                self._inflight[r.req_id] += 1
            keys = self._keys(r.digests)
            self._writer.submit(self._run_save, r, keys, self._slots(r.block_ids), event)

    def _known_good(self, r: PageRun) -> PageRun:
        """The leading pages of a save run computed from blocks known good; the rest is reported
        withheld (the scheduler plans it again after vLLM recomputed it)."""
        u = self._unsafe
        if not u.size or not len(r):
            return r
        if np.isin(r.prior_blocks, u).any():
            cut = 0
        else:
            bad = np.flatnonzero(np.isin(r.block_ids, u))
            cut = int(bad[0]) if bad.size else len(r)
        if cut == len(r):
            return r
        self._report.withheld.append((r.req_id, r.first_page + cut))
        self.stats["save_withheld_pages"] += len(r) - cut
        self._log_once("save_withheld", "%d pages of %s not saved: computed on blocks whose load failed "
                       "(saved after vLLM recomputes them)", len(r) - cut, r.req_id)
        return r.head(cut)

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
                self.stats["writeback_waits_for_loads"] = self.transfer.writeback_waits()
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
        """vLLM freed these requests' blocks: their saves must finish reading them, and their
        timed-out gets must have returned, before the next forward may overwrite them."""
        pre = set(preempted or ())
        if pre & set(self._late):
            self.wait_quiet(None)
        ids = pre & set(self._inflight)
        if not ids:
            return
        with self._cv:
            while any(self._inflight.get(r) for r in ids):
                self._cv.wait(timeout=0.05)
        self.stats["preemption_waits"] += 1

    def wait_quiet(self, bound_s: float | None) -> bool:
        """Block until no timed-out get may still write a block (a warning per interval), at most
        ``bound_s`` seconds (None: no bound); whether the store is quiet."""
        t0 = time.monotonic()
        while True:
            left = None if bound_s is None else bound_s - (time.monotonic() - t0)
            if self.transfer.quarantine.quiesced(1.0 if left is None else max(0.0, min(1.0, left))):
                self._release_late()
                return True
            if left is not None and left <= 1.0:
                self._log_once("late_get_bound", "a timed-out get still runs after %.0f s: its blocks stay "
                               "held (saves withheld) until the store is quiet", bound_s)
                return False
            self._log_once("wait_quiet", "waiting for a timed-out get to return before vLLM reuses its blocks")

    def hold(self, held) -> None:
        """Finished requests the scheduler holds (``StepPlan.held``): reported by ``get_finished``
        once their saves are acknowledged and no late get may write their blocks."""
        self._finishing.update(held or ())

    def get_finished(self, finished_req_ids=None) -> set[str]:
        self._release_late()
        with self._cv:
            ready = {r for r in self._finishing if not self._inflight.get(r) and r not in self._late}
        self._drain()  # after the snapshot: every result of a ready request is already queued
        self._finishing -= ready
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

    def pending_save_pages(self) -> int:
        return self._inflight_pages

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.finish_loads()
            self.flush()
        finally:
            self._writer.shutdown(wait=True)
