"""The ordered transfer path between device pages and the pool, one for every device.

*Compute events.* Every transfer is ordered after a *compute event*
(:meth:`Transfer.compute_event`): recorded on the engine's thread at the moment
the engine hands the work over (``load``, ``load_layerwise``, ``write_back``;
the vLLM worker's ``wait_for_save``; the SGLang linker's ``load`` and
``offload``), on that thread's current stream (CUDA and the simulated device
keep one current stream per host thread) and on the engine's forward stream
when it gave one (SGLang's overlap scheduler forwards on a stream that is not
current where the cache is called). A background thread (layer-wise reader,
writer threads) never records one itself: its current stream is not the
engine's, and an event there orders nothing.

*Direct*: the store reads and writes the device pages itself (``Store.get`` /
``put`` on the layout's scatter list). Before a put reads the pages, the host
waits for the compute event of the work that produced them; before a get writes
slots, the host waits for the compute event of the work queued so far (it may
still use those slots: an earlier owner's kernels), which costs a host wait on
asynchronous devices and nothing on CPU.

*Staged* (stores that cannot address device memory): pages travel through
bounded host staging buffers (:mod:`kvdirect.cache.staging`); the device's
launch layer (:mod:`kvdirect.device`) gathers and scatters them on a transfer
stream. The order is the same for every device (CPU, CUDA, Ascend, the
simulated device):

* write-back: the transfer stream waits for the compute event, then gathers;
  the host waits for the gather before the store reads the buffer;
* load: the transfer stream waits for the compute event (earlier work may still
  read the slots being refilled); the store fills the buffer; the scatter runs;
  the host waits for the scatter before the buffer is reused and before any page
  counts as loaded. Layer-wise: one scatter and one event per layer, and layer
  ``l`` is reported loaded once its event has completed;
* a buffer whose store call timed out is retired (the abandoned call may still
  read or write it) until the store is quiet.

Layer by layer (:meth:`Transfer.get_layerwise`, the one layer-wise load of every
front door): with a store that reads objects piecewise (``open_read``: shm,
Mooncake's ranged reads in a get session) layer 0 of every page is read alone,
then groups of later layers (``layer_groups``: one store call per group), each
layer scattered (staged) and reported while later layers are still in the pool,
so the time a hit adds before the first layer can be used is that layer's, not
the whole prompt's, and the whole load costs a few store calls, not one per
layer. Stores without piecewise reads deliver whole objects and every layer
completes when they are in.

*Loads first.* A load is on a request's path, a write-back is not, and on one
store client they share the wire and the host's cores (on a 2-core host a
512 MiB Mooncake load took 1.3 s behind the previous request's write-back and
0.5 s without one). So a write-back goes to the store in chunks of at most
``WRITEBACK_CHUNK_BYTES`` (at least one page) and, before each chunk, waits
while a load of this transfer path is running, at most
``LOADS_FIRST_MAX_WAIT_S`` per chunk so a steady stream of loads cannot starve
write-backs. A load waits at most for the chunk already in flight.

Test-only switch: ``KVDIRECT_SIM_SKIP_SYNC=1`` makes this code skip its waits on
the simulated device (``kvdirect.device.sim``), which must make the simdevice
tests fail: proof that they see a missing synchronisation.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from kvdirect.cache.quarantine import Quarantine
from kvdirect.cache.staging import StagingPool
from kvdirect.device import DeviceOps, HostBuffer
from kvdirect.errors import ConfigError
from kvdirect.stores import ScatterList
from kvdirect.stores.base import OK, TIMEOUT, UNAVAILABLE

SKIP_SYNC_ENV = "KVDIRECT_SIM_SKIP_SYNC"


def first_failure(status: np.ndarray) -> int:
    """Index of the first non-OK status (len(status) if all OK)."""
    bad = np.flatnonzero(status != OK)
    return int(bad[0]) if bad.size else len(status)


def _status(st) -> np.ndarray:
    return np.asarray(st, dtype=np.int32)


#: layers per piecewise read after the first: one store call per group, so the first layer
#: arrives after one layer's read and the whole load costs a few calls, not one per layer
MAX_LAYER_GROUP = 8


def layer_groups(num_layers: int) -> list[tuple[int, int]]:
    """[lo, hi) layer ranges read one call each: layer 0 alone, then groups doubling in size
    up to MAX_LAYER_GROUP (32 layers: 1, 1, 2, 4, 8, 8, 8)."""
    out, lo, size = [], 0, 1
    while lo < num_layers:
        hi = min(num_layers, lo + size)
        out.append((lo, hi))
        if lo:
            size = min(2 * size, MAX_LAYER_GROUP)
        lo = hi
    return out


#: a write-back goes to the store in chunks of at most this many bytes (at least one page), so a
#: load that arrives meanwhile waits for one chunk, not for the whole write-back
WRITEBACK_CHUNK_BYTES = 64 << 20
#: the longest a write-back chunk waits for running loads before it goes anyway
LOADS_FIRST_MAX_WAIT_S = 2.0
#: layer-wise loads in flight at once (each on its own reader thread); more wait their turn
READER_THREADS = 4


class LoadsFirst:
    """Loads before write-backs on one transfer path: ``loading()`` around every load,
    ``before_write()`` before every write-back chunk (waits while a load runs, at most
    ``max_wait_s``). Counts the waits for the stats."""

    def __init__(self, max_wait_s: float = LOADS_FIRST_MAX_WAIT_S):
        self.max_wait_s = max_wait_s
        self._cv = threading.Condition()
        self._loads = 0
        self.waits, self.waited_s = 0, 0.0

    @contextmanager
    def loading(self):
        with self._cv:
            self._loads += 1
        try:
            yield
        finally:
            with self._cv:
                self._loads -= 1
                if not self._loads:
                    self._cv.notify_all()

    def before_write(self) -> None:
        with self._cv:
            if not self._loads:
                return
            t0 = time.monotonic()
            self._cv.wait_for(lambda: not self._loads, timeout=self.max_wait_s)
            self.waits += 1
            self.waited_s += time.monotonic() - t0


class Transfer:
    def __init__(self, store, layout, config, ops: DeviceOps, quarantine: Quarantine, forward_stream=None):
        self.store, self.layout, self.config, self.ops = store, layout, config, ops
        self.quarantine = quarantine
        self.forward_stream = forward_stream if ops.asynchronous else None
        self.stage = config.stage if config.stage is not None else (
            layout.device != "cpu" and not store.supports_device_memory)
        if not self.stage and not (store.supports_device_memory or ops.host_addressable):
            raise ConfigError(f"stage=False but the {store.scheme}:// store cannot address {layout.device} memory; "
                              "leave stage unset (or true) so pages go through host staging buffers")
        if not self.stage:
            kind = "host" if layout.device == "cpu" else "device"
            for addr, length in layout.regions():
                store.register(addr, length, memory=kind)
        self.pool = (StagingPool(ops, store, max(config.staging_bytes, layout.page_bytes))
                     if self.stage else None)
        self._load_stream = ops.stream() if self.stage else None
        self._store_stream = ops.stream() if self.stage else None
        self._skip = ops.kind == "sim" and os.environ.get(SKIP_SYNC_ENV) == "1"
        self._readers = None  # threads for layer-wise loads, made at the first one
        self._readers_lock = threading.Lock()
        self.loads_first = LoadsFirst()

    # ---- ordering (the only waits of the transfer path) -----------------------------------
    def _wait(self, stream, event) -> None:
        if not self._skip:
            self.ops.wait(stream, event)

    def _sync(self, event) -> None:
        if not self._skip:
            self.ops.synchronize(event)

    def _drain(self, stream) -> None:
        """After an error: nothing launched may still use a buffer that is given back."""
        try:
            self.ops.synchronize(self.ops.record(stream))
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass

    def compute_event(self):
        """The compute event of the work the engine has queued so far (CPU: none). Call it on
        the engine's thread when it hands work over, never on a background thread: the
        calling thread's current stream, plus the forward stream when one was given."""
        ev = self.ops.compute_event()
        if ev is None or self.forward_stream is None:
            return ev
        return (ev, self.ops.record(self.forward_stream))

    # ---- pool -> device ----------------------------------------------------------------
    def get(self, keys: list, page_slots: np.ndarray, ready) -> np.ndarray:
        """Load whole page objects after ``ready`` (a compute event); per-key status.
        Stops at the first failed page."""
        with self.loads_first.loading():
            if not self.stage:
                self.before_direct_write(ready)
                return _status(self.store.get(keys, self.layout.plan(page_slots, per_token=False)))
            return self._get_staged(keys, page_slots, None, ready)

    def before_direct_write(self, ready) -> None:
        """The store is about to write device slots itself: wait for ``ready``, the compute
        event of the work queued before the load (it may still read or write those slots)."""
        if self.ops.asynchronous:
            self._sync(ready)

    def get_layers(self, keys: list, page_slots: np.ndarray, on_layer, ready, on_pinned=None) -> np.ndarray:
        """Staged load with per-layer completion: ``on_layer(l, pages)`` once layer ``l``
        of the first ``pages`` pages is on the device (for the final chunk of pages);
        ``on_pinned(pages)`` once every chunk is in host memory, before the layer reports."""
        with self.loads_first.loading():
            return self._get_staged(keys, page_slots, on_layer, ready, on_pinned)

    def open_layerwise(self, keys: list):
        """Open the read session a layer-wise load of ``keys`` reads through, on the calling
        thread; None where that load reads whole objects (or there are no keys). Its ``status``
        says which pages are pinned. Pass it to :meth:`get_layerwise` (``session=``), which
        ends it. An engine opens it on its own thread and promises from its status at once:
        on a busy host every hand-off to another thread may wait for a CPU time slice."""
        if not keys or not self._piecewise(len(keys)):
            return None
        return self.store.open_read(keys, np.full(len(keys), self.layout.page_bytes, dtype=np.uint64))

    def _piecewise(self, n: int) -> bool:
        """A layer-wise load of n pages reads them piece by piece through a read session."""
        if getattr(self.store, "open_read", None) is None:
            return False
        return not self.stage or self.pool.nbytes >= n * self.layout.page_bytes

    def get_layerwise(self, keys: list, page_slots: np.ndarray, on_layer, ready, on_pinned=None,
                      session=None) -> np.ndarray:
        """Load whole page objects layer by layer: ``on_layer(l, pages)`` once layer ``l`` of
        the first ``pages`` pages is in device memory (``pages`` never grows from one layer
        to the next); per-key status, OK only for a page delivered whole (and verified, where
        the store checks objects at the end). Every layer is reported, also after a failure
        (with the pages still good), so a waiting forward pass never hangs; the caller
        decides from the status, not from the layer reports, whether a page may be used.
        ``ready``: the compute event recorded on the engine's thread when the load was
        handed over (this may run on another thread).

        ``on_pinned(pages)``, called once before any layer: the first ``pages`` pages exist
        and are held by the store until read (a read session opened on stores with
        piecewise reads, before any byte moves and before waiting for ``ready``; for
        stores that only get whole objects, when they are in, together with layer 0).
        ``session``: what :meth:`open_layerwise` returned for these keys; ended here."""
        try:
            with self.loads_first.loading():
                return self._get_layerwise(keys, page_slots, on_layer, ready, on_pinned, session)
        finally:
            if session is not None:
                session.end()  # idempotent: the normal path ended it already

    def _get_layerwise(self, keys, page_slots, on_layer, ready, on_pinned, session) -> np.ndarray:
        n, layers = len(keys), self.layout.num_layers
        if session is not None and not self._piecewise(n):
            raise ConfigError("get_layerwise: a read session was passed for a load that reads whole objects")
        reader = getattr(self.store, "open_read", None)
        if session is not None:
            reader = lambda _keys, _sizes: session  # noqa: E731 - opened by the caller
        pinned = on_pinned or (lambda pages: None)
        if n == 0:
            pinned(0)
            for layer in range(layers):
                on_layer(layer, 0)
            return np.zeros(0, dtype=np.int32)
        if reader is None:  # whole objects: every layer completes once they are in
            if self.stage:
                return self.get_layers(keys, page_slots, on_layer, ready, on_pinned=pinned)
            self.before_direct_write(ready)
            st = _status(self.store.get(keys, self.layout.plan(page_slots, per_token=False)))
            pinned(first_failure(st))
            for layer in range(layers):
                on_layer(layer, first_failure(st))
            return st
        if self.stage:
            if not self._piecewise(n):  # the pages do not fit one buffer
                return self.get_layers(keys, page_slots, on_layer, ready, on_pinned=pinned)
            return self._get_staged_piecewise(keys, page_slots, on_layer, reader, ready, pinned)
        sizes = np.full(n, self.layout.page_bytes, dtype=np.uint64)
        plan = self.layout.plan(page_slots, per_token=False)
        per_layer = plan.addrs.shape[1] // layers if plan.addrs.shape[1] % layers == 0 else 0
        with reader(keys, sizes) as rd:
            pinned(first_failure(rd.status))
            self.before_direct_write(ready)  # opening the session wrote nothing to the device
            for lo, hi in layer_groups(layers):  # layers lo..hi-1 are the next bytes of every page object
                alive = first_failure(rd.status)
                if alive:
                    if per_layer:  # the object-order plan, its segments of these layers
                        rd.read(ScatterList(plan.addrs[:alive, lo * per_layer:hi * per_layer],
                                            plan.sizes[:alive, lo * per_layer:hi * per_layer]))
                    else:
                        for layer in range(lo, hi):
                            rd.read(self.layout.plan_layer(page_slots[:alive], layer, per_token=False))
                ok = first_failure(rd.status)
                for layer in range(lo, hi):
                    on_layer(layer, ok)
        return _status(rd.end())

    def _get_staged_piecewise(self, keys, page_slots, on_layer, reader, ready, pinned) -> np.ndarray:
        """Staged and piecewise: layer ``l`` of every page is read into its place in the
        staging buffer, then scattered on the load stream; while that scatter runs the
        next layer is read, and layer ``l`` is reported once its scatter has completed."""
        n, lay = len(keys), self.layout
        offs = lay.layer_offsets()
        s = self._load_stream
        # earlier work may still use the slots being refilled
        self._wait(s, ready)
        status = np.full(n, UNAVAILABLE, dtype=np.int32)
        pending = None  # (layer, event, pages) scattered but not yet reported
        with _Lease(self, s) as lease:
            base = np.uint64(lease.buf.addr) + np.arange(n, dtype=np.uint64) * np.uint64(lay.page_bytes)
            with reader(keys, np.full(n, lay.page_bytes, dtype=np.uint64)) as rd:
                pinned(first_failure(rd.status))
                for lo, hi in layer_groups(lay.num_layers):
                    alive = first_failure(rd.status)
                    if alive:  # layers lo..hi-1 of each page: one range, into its place in the buffer
                        size = np.uint64(int(offs[hi] - offs[lo]))
                        rd.read(ScatterList(base[:alive] + np.uint64(int(offs[lo])), np.full(alive, size)))
                        alive = first_failure(rd.status)
                    for layer in range(lo, hi):
                        if alive:
                            self.ops.to_device(page_slots[:alive], lease.buf, s, layer=layer)
                        ev = self.ops.record(s)
                        if pending is not None:
                            self._sync(pending[1])
                            on_layer(pending[0], pending[2])
                        pending = (layer, ev, alive)
                status[:] = _status(rd.end())
            if (status == TIMEOUT).any():  # an abandoned read may still write the buffer
                self._sync(pending[1])
                lease.retire()
        self._sync(pending[1])
        on_layer(pending[0], min(pending[2], first_failure(status)))
        return status

    def _get_staged(self, keys, page_slots, on_layer, ready, on_pinned=None) -> np.ndarray:
        n, layers = len(keys), self.layout.num_layers
        status = np.full(n, UNAVAILABLE, dtype=np.int32)
        s = self._load_stream
        self._wait(s, ready)
        done = 0
        with _Lease(self, s) as lease:
            for lo, hi, host in self._chunks(lease.buf, n):
                st = _status(self.store.get(keys[lo:hi], host))
                status[lo:hi] = st
                n_ok = first_failure(st)
                last = hi == n or n_ok < hi - lo
                if last and on_pinned is not None:
                    on_pinned(done + n_ok)
                if n_ok:
                    slots = page_slots[lo:lo + n_ok]
                    if on_layer is None:
                        self.ops.to_device(slots, lease.buf, s)
                        self._sync(self.ops.record(s))
                    else:
                        events = []
                        for layer in range(layers):  # one launch + event per layer
                            self.ops.to_device(slots, lease.buf, s, layer=layer)
                            events.append(self.ops.record(s))
                        for layer, ev in enumerate(events if last else events[-1:]):
                            self._sync(ev)
                            if last:
                                on_layer(layer, done + n_ok)
                done += n_ok
                if (st == TIMEOUT).any():  # the abandoned call may still write the buffer
                    lease.retire()
                if last or lease.buf is None:
                    break
        return status

    # ---- device -> pool ----------------------------------------------------------------
    def put(self, keys: list, page_slots: np.ndarray, event) -> np.ndarray:
        """Store whole page objects after ``event`` (the compute event recorded when the
        engine handed them over); per-key status."""
        n = len(keys)
        status = np.full(n, UNAVAILABLE, dtype=np.int32)
        if not self.stage:
            self._sync(event)  # the store reads the pages: the compute stream must have written them
            plan = self.layout.plan(page_slots, per_token=False)
            per = max(1, WRITEBACK_CHUNK_BYTES // self.layout.page_bytes)
            for lo in range(0, n, per):  # loads first: one chunk at a time
                hi = min(n, lo + per)
                self.loads_first.before_write()
                st = _status(self.store.put(keys[lo:hi], plan if hi - lo == n else plan.take(np.arange(lo, hi))))
                status[lo:hi] = st
                if (st == TIMEOUT).any():  # the store is in trouble: the rest stays unwritten
                    break
            return status
        s = self._store_stream
        self._wait(s, event)  # gathers read the pages only after the compute stream wrote them
        with _Lease(self, s) as lease:
            for lo, hi, host in self._chunks(lease.buf, n):
                self.loads_first.before_write()
                self.ops.to_host(page_slots[lo:hi], lease.buf, s)
                self._sync(self.ops.record(s))  # the gather has completed before the store reads the buffer
                st = _status(self.store.put(keys[lo:hi], host))
                status[lo:hi] = st
                if (st == TIMEOUT).any():  # the abandoned put may still read the buffer
                    lease.retire()
                    break
        return status

    # ---- staging -------------------------------------------------------------------------
    def _retire(self, buf: HostBuffer) -> None:
        self.pool.retire(buf)
        self.quarantine.defer(lambda: self.pool.recycle(buf))

    def _chunks(self, buf: HostBuffer, n: int):
        """(lo, hi, host scatter list) chunks of whole page objects that fit the buffer."""
        obj = self.layout.page_bytes
        per = max(1, buf.nbytes // obj)
        for lo in range(0, n, per):
            hi = min(n, lo + per)
            offs = np.uint64(buf.addr) + np.arange(hi - lo, dtype=np.uint64) * np.uint64(obj)
            yield lo, hi, ScatterList(offs, np.full(hi - lo, obj, dtype=np.uint64))

    def stats(self) -> dict:
        d = {"writeback_waits_for_loads": self.loads_first.waits,
             "writeback_wait_for_loads_ms": round(self.loads_first.waited_s * 1e3, 1)}
        if self.pool is None:
            return dict(d, staging_buffers=0, retired_staging_buffers=0)
        return dict(d, staging_buffers=len(self.pool.buffers), retired_staging_buffers=self.pool.retired)

    def run_reader(self, fn) -> Future:
        """Run ``fn`` (a layer-wise load) on one of this transfer's reader threads. Handing work
        to a waiting thread returns at once; starting a thread would block the caller (the
        engine's scheduler) until the new thread runs, a CPU time slice on a busy host."""
        with self._readers_lock:
            if self._readers is None:
                self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="kvdirect-layerwise")
            return self._readers.submit(fn)

    def close(self) -> None:
        with self._readers_lock:
            readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=True)  # a load in flight still writes device slots
        self.ops.close()


class _Lease:
    """One staging buffer for one staged call: given back at the end, after draining the
    stream if the call failed (nothing launched may still use it); a buffer that a
    timed-out store call may still touch is retired instead (``retire``)."""

    def __init__(self, transfer: Transfer, stream):
        self.t, self.stream = transfer, stream
        self.buf: HostBuffer | None = transfer.pool.acquire()

    def retire(self) -> None:
        self.t._retire(self.buf)
        self.buf = None

    def __enter__(self) -> "_Lease":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.buf is not None:
            try:
                if exc_type is not None:
                    self.t._drain(self.stream)
            finally:
                self.t.pool.release(self.buf)
        return False
