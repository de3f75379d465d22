"""``KVDirectLinker``: kvdirect's pool behind SGLang's own radix tree, no SGLang patch.

SGLang 0.5.23's ``UnifiedRadixCache`` can reach an external KV store straight from
its device pools (``--enable-unified-cache-external-linker``); its ``dynamic``
backend builds an out-of-tree :class:`UnifiedCacheLinker` (the contract and who
calls what: ``sglang/srt/mem_cache/unified_cache/unified_cache_linker.py``)::

    python -m sglang.launch_server ... --enable-unified-cache-external-linker \\
      --unified-cache-external-linker-backend dynamic \\
      --unified-cache-external-linker-config '{"linker": "KVDirectLinker",
        "linker_module_path": "kvdirect.sglang.linker",
        "linker_extra_config": {"store": "shm://kvdirect?size=8GiB"}}'

``linker_extra_config`` holds kvdirect's options (``CacheConfig`` fields; ``store``
is required; ``model`` defaults to the served model's identity as in the radix
backend). SGLang keeps the tree, the locks, eviction and the request life cycle;
kvdirect brings the rest, shared with its other front doors:

* pool keys ``kvd1/<layout fingerprint>/<page hash>``: SGLang hands over its own
  per-page SHA-256 hashes (the same chain as kvdirect's keys), prefixed with the
  fingerprint of the model identity and the KV layout, so instances of another
  model or layout never read these pages (and the radix backend's pages of the
  default namespace are the same keys);
* the stores (embedded shm pool with checksums, Mooncake, MemCache) and their
  per-key statuses, deadlines and back-off after a failure;
* the ordered transfer path (:class:`kvdirect.cache.transfer.Transfer`): loads are
  layer by layer (:meth:`~kvdirect.cache.transfer.Transfer.get_layerwise`), so the
  forward reads layer ``l`` while later layers are still being read from stores
  with piecewise reads (shm, Mooncake); offloads are whole-page puts after the
  events SGLang records for them;
* timed-out store calls: a load whose direct get timed out reports its batch only
  once the store is quiet (SGLang frees the slots next); an offload whose put timed
  out keeps its node locked until then, removes the possibly torn objects and
  reports failure; an object a load finds of another size than this layout's page is
  removed (shm drops objects that fail their checksum itself), so a retry recomputes it.

Calls (all on the scheduler thread, except ``wait_until`` on the forward):

``lookup``    one existence query for the request's uncached pages; every prefix
              length up to the first missing page is restorable.
``load``      queues the pages for the slots SGLang allocated (private to the request).
``start_layer_wise_loading``  hands the queued loads to the loader thread; SGLang's
              KV pool waits for each layer through ``layer_done_counter``.
``finish_layer_wise_loading`` after the forward: True only when every page of the
              batch arrived whole (shm verifies checksums at the end); otherwise
              SGLang aborts the batch's loading requests, drops their output and
              never inserts their KV, so no page computed from a failed load
              reaches the tree or the pool.
``offload``   queues a node's pages for the writer thread (pages the pool already
              holds are skipped); results are reported in order.

Refused at start, in one line naming the part: SWA and Mamba tree components,
speculative decoding with draft KV pools, KV pools whose layout kvdirect cannot
read (see :mod:`kvdirect.sglang.pools`).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import torch

from sglang.srt.mem_cache.hicache_storage import PoolName
from sglang.srt.mem_cache.unified_cache.unified_cache_linker import LayerWiseLoadCounter, UnifiedCacheLinker

from kvdirect import keys as _keys
from kvdirect.cache.health import STORE_FAILURES, StoreHealth
from kvdirect.cache.inputs import check_token_slots
from kvdirect.cache.quarantine import Quarantine
from kvdirect.cache.stats import CacheStats
from kvdirect.cache.transfer import Transfer
from kvdirect.config import CacheConfig
from kvdirect.device import device_ops
from kvdirect.errors import ConfigError, KVDirectError
from kvdirect.stores import open_store
from kvdirect.stores.base import CORRUPT, INVALID_ARGUMENT, OK, TIMEOUT

log = logging.getLogger("kvdirect.sglang")

#: tree components kvdirect's pages can restore
SUPPORTED_COMPONENTS = ("FULL",)
_REFUSED = {"SWA": "sliding-window (SWA) layers of hybrid models",
            "MAMBA": "Mamba/SSM state of hybrid models"}


def check_supported(components, params) -> None:
    """One ConfigError line naming what kvdirect's linker cannot restore."""
    for c in sorted(components, key=int):
        name = getattr(c, "name", str(c))
        if name not in SUPPORTED_COMPONENTS:
            what = _REFUSED.get(name, f"the {name} tree component")
            raise ConfigError(f"kvdirect linker: {what} ({name} component) are not supported; "
                              "run this model without the kvdirect linker")
    if getattr(params, "is_eagle", False) or getattr(params, "mtp_draft_device_pools", ()) \
            or getattr(params, "sidecar_draft_device_pools", ()):
        raise ConfigError("kvdirect linker: speculative decoding with draft KV pools is not supported "
                          "(the draft model's KV would not be restored); run it without the kvdirect linker")


class KVDirectLinker(UnifiedCacheLinker):
    """SGLang's ``UnifiedCacheLinker`` over kvdirect's stores and transfer path (module docstring)."""

    def __init__(self, server_args, params, *, components, extra_config=None, forward_stream=None,
                 store=None):
        from kvdirect.sglang.factory import model_identity
        from kvdirect.sglang.pools import layout_from_pool

        check_supported(components, params)
        self.forward_stream = forward_stream
        self.page_size = int(params.page_size)
        cfg = dict(extra_config or {})
        if store is None and not cfg.get("store"):
            raise ConfigError("kvdirect linker needs a pool: set \"store\" in linker_extra_config "
                              "(e.g. \"shm://kvdirect?size=8GiB\", \"mooncake://...\", \"memcache://?config=...\")")
        config = CacheConfig.from_dict(cfg)
        ctx = SimpleNamespace(server_args=server_args, model_config=None)
        self.config = config = CacheConfig.from_dict({**config.to_dict(), "model": model_identity(ctx, config)})
        kvcache = params.token_to_kv_pool_allocator.get_kvcache()
        self.layout = layout_from_pool(kvcache, self.page_size)
        self.num_layers = self.layout.num_layers
        self.pools = {PoolName.KV: kvcache}

        self.tp_rank, self.tp_size = 0, 1
        group = getattr(params, "attn_tp_cache_group", None) or getattr(params, "tp_cache_group", None)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.tp_rank = torch.distributed.get_rank(group=group)
            self.tp_size = torch.distributed.get_world_size(group=group)
        self.fingerprint = _keys.LayoutFingerprint.from_layout(self.layout, model=config.model,
                                                               tp_rank=self.tp_rank, tp_size=self.tp_size)
        # MLA pages are the same on every rank (keys without the rank): one writer is enough
        self.offload_owner = not self.fingerprint.is_mla or self.tp_rank == 0

        self.stats = CacheStats(config.latency_window)
        self.store = self._open_store(store)
        self.health = StoreHealth(self.store, config, self.stats)
        self.quarantine = Quarantine(self.store, lambda slots: None)  # slots are SGLang's: never freed here
        self.transfer = None
        if self.store is not None:
            try:
                ops = device_ops(self.layout, store=f"the {self.store.scheme}:// pool")
                self.transfer = Transfer(self.store, self.layout, config, ops, self.quarantine,
                                         forward_stream=forward_stream)
            except BaseException:
                self.store.close()
                raise

        self.layer_done_counter = LayerWiseLoadCounter(self.num_layers)
        self._pending: dict[str, tuple[list, np.ndarray]] = {}
        self._verdicts: dict[int, Future] = {}
        self._loads: queue.Queue = queue.Queue()
        self._offloads: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._inflight_pages = 0
        self._lock = threading.Lock()
        self.timers = {"lookup_ms": 0.0, "lookups": 0, "finish_wait_ms": 0.0, "batches": 0}
        self._threads = [threading.Thread(target=self._load_loop, name="kvdirect-linker-load", daemon=True),
                         threading.Thread(target=self._offload_loop, name="kvdirect-linker-put", daemon=True)]
        for t in self._threads:
            t.start()
        self._closed = False
        log.info("kvdirect linker: %r, store=%s, model=%s, tp=%d/%d, key prefix %s", self.layout,
                 self.store.scheme if self.store is not None else None, config.model, self.tp_rank,
                 self.tp_size, self.fingerprint.key_prefix)

    def _open_store(self, store):
        if store is not None:
            return store
        try:
            return open_store(self.config.store)
        except STORE_FAILURES as e:  # unreachable; a malformed URL (ConfigError) always raises
            if not self.config.allow_no_store:
                raise
            log.warning("kvdirect linker: store %s unreachable, running without a KV pool until restart "
                        "(allow_no_store=true): %s", self.config.store, e)
            return None

    def _keys(self, hashes) -> list:
        return _keys.pool_keys(list(hashes), self.fingerprint)

    @staticmethod
    def _kv(transfers):
        kv = [t for t in transfers if t.name == PoolName.KV]
        if len(kv) != 1 or len(kv) != len(transfers):
            raise KVDirectError(f"kvdirect linker: expected one KV transfer, got {[t.name for t in transfers]}")
        return kv[0]

    def _page_slots(self, transfer) -> np.ndarray:
        slots = transfer.device_indices.to("cpu", torch.int64).numpy()
        n = len(transfer.keys) * self.page_size
        if len(slots) != n:
            raise KVDirectError(f"kvdirect linker: {len(transfer.keys)} pages but {len(slots)} device slots")
        check_token_slots(self.layout, slots, "linker transfer")
        return slots[::self.page_size]

    # ---- lookup / load (scheduler thread) --------------------------------------------
    def lookup(self, rid: str, transfers) -> list[int]:
        kv = self._kv(transfers)
        if not kv.keys or not self.health.available():
            return []
        t0 = time.perf_counter()
        keys = self._keys(kv.keys[: self.config.max_query_pages])
        try:
            n = self.store.exists_prefix(keys)
            self.health.recovered()
        except STORE_FAILURES as e:
            self.health.failed("exists", e)
            n = 0
        self.stats.add(query_keys=len(keys), pool_hit_tokens=n * self.page_size)
        self.timers["lookup_ms"] += (time.perf_counter() - t0) * 1e3
        self.timers["lookups"] += 1
        return list(range(1, n + 1))

    def load(self, rid: str, transfers) -> bool:
        kv = self._kv(transfers)
        if self.store is None or not kv.keys:
            return False
        if rid in self._pending:
            raise KVDirectError(f"kvdirect linker: a load for request {rid} is already queued")
        self._pending[rid] = (self._keys(kv.keys), self._page_slots(kv))
        return True

    def cancel_queued_load(self, rid: str) -> bool:
        return self._pending.pop(rid, None) is not None

    def start_layer_wise_loading(self) -> int:
        self.quarantine.release()  # staging buffers a timed-out call retired, once the store is quiet
        if not self._pending:
            return -1
        batch, self._pending = self._pending, {}
        keys = [k for ks, _ in batch.values() for k in ks]
        page_slots = np.concatenate([s for _, s in batch.values()])
        index = self.layer_done_counter.update_producer()
        verdict: Future = Future()
        self._verdicts[index] = verdict
        # the load writes slots the scheduler's queued work may still use: order it after that work
        after = self.transfer.compute_event()
        self._loads.put((index, keys, page_slots, after, verdict))
        return index

    def finish_layer_wise_loading(self, counter_index: int) -> bool:
        if counter_index < 0:
            return True
        t0 = time.perf_counter()
        landed = self.layer_done_counter.finish(counter_index)
        ok = self._verdicts.pop(counter_index).result()
        self.timers["finish_wait_ms"] += (time.perf_counter() - t0) * 1e3
        self.timers["batches"] += 1
        return bool(landed and ok)

    def _load_loop(self) -> None:
        while True:
            task = self._loads.get()
            try:
                if task is None:
                    return
                self._load_batch(*task)
            finally:
                self._loads.task_done()

    def _load_batch(self, index, keys, page_slots, after, verdict: Future) -> None:
        counter = self.layer_done_counter
        reported = []
        ok = False
        t0 = time.perf_counter()
        try:
            def on_layer(layer: int, pages: int) -> None:
                counter.complete(index, layer)
                reported.append(layer)

            status = self.transfer.get_layerwise(keys, page_slots, on_layer, after)
            self.health.recovered()
            n_ok = int((status == OK).sum())
            ok = n_ok == len(keys)
            self.stats.add(load_calls=1, loaded_pages=n_ok, loaded_bytes=n_ok * self.layout.page_bytes,
                           load_failed_pages=len(keys) - n_ok)
            if not ok:
                self.stats.failure(f"get_status_{int(status[status != OK][0])}")
            self._drop_unusable([k for k, st in zip(keys, status) if st in (CORRUPT, INVALID_ARGUMENT)])
            if (status == TIMEOUT).any() and not self.transfer.stage:
                # a timed-out direct get may still write the slots, which SGLang frees once this
                # batch is reported: report it only when the store is quiet
                while not self.quarantine.quiesced(timeout=5.0):
                    log.warning("kvdirect linker: waiting for a timed-out get to return before "
                                "releasing its slots")
        except STORE_FAILURES as e:
            self.health.failed("get", e)
        except BaseException as e:  # noqa: BLE001 - a bug: the batch fails, the server goes on
            log.exception("kvdirect linker: layer-wise load failed")
            counter.fail(index, e)
        finally:
            for layer in range(self.num_layers):  # a waiting forward never hangs
                if layer not in reported:
                    try:
                        counter.complete(index, layer)
                    except Exception:  # noqa: BLE001 - already failed by counter.fail
                        pass
            with self.stats.lock:
                self.stats.load_ms.append((time.perf_counter() - t0) * 1e3)
            verdict.set_result(ok)

    def _drop_unusable(self, suspects: list, most: int = 16) -> None:
        """Remove objects whose size this layout can never use (every reader would fail on
        them, so a retry could never recompute the page). Failure path only: each suspect's
        size is checked first, so a good object is never removed for another failure."""
        for key in suspects[:most]:
            try:
                data = self.store.get_bytes(key)
                if data is not None and len(data) != self.layout.page_bytes:
                    self.store.remove([key])
                    self.stats.failure("removed_unusable_object")
            except STORE_FAILURES as e:
                log.warning("kvdirect linker: could not check or remove an unusable object: %s", e)
                return

    # ---- offload (scheduler thread -> writer thread) ----------------------------------
    def offload(self, transfers, session_id=None) -> bool:
        kv = self._kv(transfers)
        if self.store is None or not self.config.write_back or not kv.keys or not self.health.available():
            return False
        if not self.offload_owner:  # another rank writes these (MLA) pages
            self._results.put(True)
            return True
        n = len(kv.keys)
        with self._lock:
            if self._inflight_pages + n > self.config.max_inflight_pages:
                self.stats.add(dropped_writeback_pages=n)
                return False
            self._inflight_pages += n
        ready = self.record_offload_ready()  # the pages are written by the forward stream
        self._offloads.put((self._keys(kv.keys), self._page_slots(kv), ready, time.perf_counter()))
        return True

    def _offload_loop(self) -> None:
        while True:
            task = self._offloads.get()
            try:
                if task is None:
                    return
                ok = self._offload(*task)
                with self._lock:
                    self._inflight_pages -= len(task[0])
                self._results.put(ok)
            finally:
                self._offloads.task_done()

    def _offload(self, keys, page_slots, ready, t0) -> bool:
        try:
            for ev in ready:
                ev.synchronize()
            todo = np.flatnonzero(~self.store.exists(keys))  # pages the pool holds already stay
            self.stats.add(skipped_existing_pages=len(keys) - len(todo))
            if not todo.size:
                return True
            keys = [keys[i] for i in todo]
            status = self.transfer.put(keys, page_slots[todo], None)
            self.health.recovered()
        except STORE_FAILURES as e:
            self.health.failed("put", e)
            return False
        except Exception:  # noqa: BLE001 - a bug: this offload fails, the server goes on
            log.exception("kvdirect linker: offload failed")
            return False
        ok = status == OK
        self.stats.add(stored_pages=int(ok.sum()), stored_bytes=int(ok.sum()) * self.layout.page_bytes,
                       store_failed_pages=int((~ok).sum()))
        with self.stats.lock:
            self.stats.store_ms.append((time.perf_counter() - t0) * 1e3)
        late = [k for k, st in zip(keys, status) if st == TIMEOUT]
        if late and not self.transfer.stage:
            # the abandoned put may still read the pages: keep the node locked (not reported yet)
            # until the store is quiet, then drop what it may have stored torn
            while not self.quarantine.quiesced(timeout=5.0):
                log.warning("kvdirect linker: waiting for a timed-out put to return")
            try:
                self.store.remove(late)
            except STORE_FAILURES as e:
                log.warning("kvdirect linker: could not remove %d late objects: %s", len(late), e)
        if not ok.all():
            self.stats.failure(f"put_status_{int(status[~ok][0])}")
        return bool(ok.all())

    def num_completed_offloads(self) -> int:
        return self._results.qsize()

    def pop_completed_offload(self) -> bool:
        return self._results.get_nowait()

    # ---- life cycle ----------------------------------------------------------------------
    def reset(self) -> None:
        self._pending.clear()
        self._loads.join()
        self._offloads.join()
        while True:
            try:
                self._results.get_nowait()
            except queue.Empty:
                break
        for v in self._verdicts.values():
            v.result()
        self._verdicts.clear()
        self.layer_done_counter.reset()

    def stats_dict(self) -> dict:
        d = self.stats.snapshot()
        d.update(self.timers, store=None if self.store is None else self.store.scheme)
        if self.transfer is not None:
            d.update(self.transfer.stats())
        return d

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.reset()
        self._loads.put(None)
        self._offloads.put(None)
        for t in self._threads:
            t.join()
        log.info("kvdirect linker stats: %s", self.stats_dict())
        if self.store is not None:
            self.store.close()
        if self.transfer is not None:
            self.transfer.close()
