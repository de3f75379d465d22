"""Pieces shared by the adapters of distributed stores (Mooncake, MemCache).

* :class:`RemoteStore` is the base both adapters derive from: calls under a
  deadline, control-plane calls that must answer (``exists``, ``remove``,
  ``put_bytes``, ``get_bytes``) in batches of at most ``max_batch_keys`` keys,
  per-key status counting, ``stats``, ``quiesce`` and ``close``. An adapter adds
  its client's set-up, memory registration, the data-plane calls (``_transfer``)
  and its result-code table.
* :class:`DeadlineRunner` bounds every client call by a deadline: the call runs
  on a worker thread (the clients release the GIL in their batch calls) and the
  caller gets :class:`CallTimeout` when the deadline passes. A call that timed
  out keeps running in the background ("abandoned") until the client returns;
  while too many are outstanding, new calls fail fast with
  :class:`CallUnavailable` instead of queueing behind them, so a hung store can
  never block the scheduler. ``quiesce()`` waits for abandoned calls: a *get*
  that timed out may still write its destination memory until its call returns,
  so the caller must not reuse those pages for other data before that.
* :class:`Regions` remembers registered memory regions and checks, vectorised,
  whether every segment of a scatter list lies inside one.
* :func:`map_codes` turns a client's per-key integer results into kvdirect
  status codes with a small table, without a Python loop over keys.
* :func:`tcp_reachable` is the fast pre-flight check that turns "service not
  running" into an immediate, actionable StoreError.
* :func:`http_key_list` reads a pool's key list from its master's admin HTTP
  server (``/get_all_keys``: Mooncake's master and MemCache's MetaService both
  answer it), for operator tools only.
"""
from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from kvdirect.errors import ConfigError, StoreError
from kvdirect.stores import base
from kvdirect.stores.base import ScatterList, Store

log = logging.getLogger("kvdirect.stores")


class CallTimeout(Exception):
    """The client call did not return before its deadline."""


class CallUnavailable(Exception):
    """Too many earlier calls are still stuck in the client; not even tried."""


class DeadlineRunner:
    """Run client calls on worker threads with a deadline (``timeout_s <= 0``: inline, unbounded)."""

    def __init__(self, timeout_s: float, workers: int = 4, name: str = "kvd-store"):
        self.timeout_s = float(timeout_s)
        self.workers = max(1, int(workers))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=name) if self.timeout_s > 0 else None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._abandoned = 0
        self.timeouts = 0
        self.refused = 0

    @property
    def abandoned(self) -> int:
        """Calls that timed out and are still running inside the client."""
        return self._abandoned

    def call(self, fn, *args, timeout_s: float | None = None, on_late=None, **kwargs):
        """``fn(*args, **kwargs)`` within the deadline, else CallTimeout; ``on_late()`` then runs
        once the abandoned call has returned (on its worker thread), e.g. to undo what it did."""
        if self._pool is None:
            return fn(*args, **kwargs)
        with self._lock:
            # keep one worker free for fresh calls; beyond that a stuck client gets no more work
            if self._abandoned >= max(1, self.workers - 1):
                self.refused += 1
                raise CallUnavailable(f"{self._abandoned} earlier store calls are still stuck")
        fut = self._pool.submit(fn, *args, **kwargs)
        try:
            return fut.result(timeout=self.timeout_s if timeout_s is None else timeout_s)
        except FutureTimeout:
            with self._lock:
                self._abandoned += 1
                self.timeouts += 1
            fut.add_done_callback(self._release)  # runs at once if the call finished meanwhile
            if on_late is not None:
                fut.add_done_callback(lambda _fut: on_late())
            raise CallTimeout(f"store call {getattr(fn, '__name__', fn)} exceeded "
                              f"{self.timeout_s if timeout_s is None else timeout_s:g}s") from None

    def _release(self, _fut) -> None:
        with self._lock:
            self._abandoned -= 1
            self._idle.notify_all()

    def quiesce(self, timeout_s: float | None = None) -> bool:
        """Wait until no abandoned call is running; True if none is left."""
        with self._lock:
            return self._idle.wait_for(lambda: self._abandoned == 0, timeout_s)

    def shutdown(self) -> None:
        if self._pool is not None:
            # never wait for a stuck client call at shutdown
            self._pool.shutdown(wait=self._abandoned == 0, cancel_futures=True)


class Regions:
    """Registered memory regions: [start, end) byte ranges sorted by start, plus a per-region tag.

    Overlapping registrations are kept as given; a segment counts as covered when the
    region starting last at or before it holds it entirely (conservative: never a false yes).
    """

    def __init__(self):
        self._starts = np.zeros(0, np.uint64)
        self._ends = np.zeros(0, np.uint64)
        self._tags = np.zeros(0, np.int8)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._starts)

    def add(self, addr: int, length: int, tag: int = 0) -> bool:
        """Remember [addr, addr+length); False if it was already covered by one region (no-op)."""
        addr, end = int(addr), int(addr) + int(length)
        with self._lock:
            i = int(np.searchsorted(self._starts, np.uint64(addr), side="right")) - 1
            if i >= 0 and int(self._ends[i]) >= end and self._starts[i] <= addr:
                return False
            starts = np.append(self._starts, np.uint64(addr))
            order = np.argsort(starts, kind="stable")
            self._starts = starts[order]
            self._ends = np.append(self._ends, np.uint64(end))[order]
            self._tags = np.append(self._tags, np.int8(tag))[order]
            return True

    def remove(self, addr: int) -> bool:
        """Forget the region starting at addr."""
        with self._lock:
            keep = self._starts != np.uint64(int(addr))
            if keep.all():
                return False
            self._starts, self._ends, self._tags = self._starts[keep], self._ends[keep], self._tags[keep]
            return True

    def overlapping(self, addr: int, length: int) -> list[int]:
        """Starts of the regions that share at least one byte with [addr, addr+length)."""
        a, e = np.uint64(int(addr)), np.uint64(int(addr) + int(length))
        with self._lock:
            hit = (self._starts < e) & (self._ends > a)
            return [int(x) for x in self._starts[hit]]

    def containing(self, addrs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Index of the region holding each segment entirely, -1 where none does (same shape as addrs)."""
        a = np.asarray(addrs, np.uint64)
        e = a + np.asarray(sizes, np.uint64)
        if len(self._starts) == 0:
            return np.full(a.shape, -1, np.int64)
        i = np.searchsorted(self._starts, a, side="right").astype(np.int64) - 1
        ic = np.clip(i, 0, None)
        ok = (i >= 0) & (e <= self._ends[ic])
        return np.where(ok, i, -1)

    def covered(self, addrs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """bool per key (row): every segment lies inside a registered region."""
        return (self.containing(addrs, sizes) >= 0).all(axis=1)

    def tags(self, addrs: np.ndarray, sizes: np.ndarray, default: int) -> np.ndarray:
        """Per key: the tag shared by all its segments' regions; ``default`` if unregistered or mixed."""
        idx = self.containing(addrs, sizes)
        if len(self._tags) == 0:
            return np.full(idx.shape[0], default, np.int8)
        t = np.where(idx >= 0, self._tags[np.clip(idx, 0, None)], np.int8(-1))
        same = (t == t[:, :1]).all(axis=1) & (t[:, 0] >= 0)
        return np.where(same, t[:, 0], np.int8(default)).astype(np.int8)


def map_codes(rc: np.ndarray, table: dict[int, int], default: int) -> np.ndarray:
    """Map client result codes to kvdirect statuses: ``table`` for known codes, ``default`` otherwise."""
    rc = np.asarray(rc, np.int64)
    if rc.size and (rc == rc.flat[0]).all():  # the common case (all OK, all absent): one code
        return np.full(rc.shape, table.get(int(rc.flat[0]), default), np.int32)
    out = np.full(rc.shape, default, np.int32)
    for code in np.unique(rc):  # a handful of distinct codes per batch, not one iteration per key
        out[rc == code] = table.get(int(code), default)
    return out


def tcp_reachable(host: str, port: int, timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_batch(keys, scatter):
    """Common argument checks of put/get: same length, at least one segment."""
    keys = base.check_keys(keys)
    if not isinstance(scatter, ScatterList):
        raise ConfigError(f"scatter must be a kvdirect.stores.ScatterList, got {type(scatter).__name__}")
    if len(scatter) != len(keys):
        raise ConfigError(f"{len(keys)} keys but {len(scatter)} scatter rows")
    return keys, scatter


def http_key_list(admin: str, what: str, timeout_s: float = 30.0) -> list[str]:
    """Keys from ``ADMIN/get_all_keys`` (one key per line); StoreError naming ``what`` when there is no answer."""
    import urllib.error
    import urllib.request

    from kvdirect.errors import StoreError

    url = admin.rstrip("/") + "/get_all_keys"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            body = r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise StoreError(f"cannot list the {what}'s keys at {url}: {e}") from None
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise StoreError(f"{url} answered something that is not a key list (non-ASCII bytes)") from None
    return [k for k in text.splitlines() if k]


def import_client_module(module: str, label: str, hint: str):
    """Import a store's client module, or StoreError naming what is missing: the pip extra
    (``hint``) when the package is absent, the import error (a system library) otherwise."""
    import importlib

    from kvdirect import runtime

    ci = runtime.client_import(module)
    if ci.state == "not_installed":
        raise StoreError(f"{label} client not installed. Install it: {hint}")
    if ci.state != "ok":
        raise StoreError(f"{label} client not importable: {ci.message}")
    return importlib.import_module(module)


def url_flag(u, name: str, default):
    """A 0/1 URL parameter (``default`` when absent or empty)."""
    v = u.pop(name, None)
    if v is None or v == "":
        return default
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={v!r} in {u.raw!r}: use 0 or 1")


class RemoteStore(Store):
    """The part of a distributed store's adapter that does not depend on its client.

    A subclass sets ``label`` (its name in messages), ``codes`` (client result code ->
    kvdirect status; ``put_codes`` for put results), ``max_batch_keys`` (0: no limit
    per call), ``remove_call`` (the client's batch remove), calls :meth:`_init_remote`
    first in ``__init__``, and implements ``_transfer(op, keys, scatter)`` (op "put" or
    "get": one status per key, counted with :meth:`_count`), ``register`` and
    ``_empty_get(key)`` (what an empty ``get`` answer means: None for absent, else raise).
    """

    label = ""
    codes: dict = {}
    put_codes: dict = {}
    max_batch_keys = 0
    remove_call = "batch_remove"
    #: exceptions a client call may raise for a failed call (pybind11-translated C++ errors)
    client_errors: tuple = (RuntimeError,)

    def _init_remote(self, timeout_s: float, workers: int, client) -> None:
        self._runner = DeadlineRunner(timeout_s, workers, f"kvd-{self.scheme}")
        self._regions = Regions()
        self._reg_lock = threading.Lock()
        self._closed = False
        self._counts = {"put_keys": 0, "put_ok": 0, "get_keys": 0, "get_ok": 0, "put_bytes": 0, "get_bytes": 0,
                        "exists_calls": 0, "failed_by_status": {}}
        self._owns_client = client is None  # a client handed in (tests, a shared one) is not closed by us
        self._client = client

    # ------------------------------------------------------------------ calls

    def _where(self) -> str:
        """Where the pool is, for messages ("" or "; master HOST:PORT")."""
        return ""

    def _call(self, name: str, *args, on_late=None, **kwargs):
        if self._closed:
            raise CallUnavailable("store is closed")
        return self._runner.call(getattr(self._client, name), *args, on_late=on_late, **kwargs)

    def _call_local(self, name: str, *args):
        """A client call that never waits for a peer (it changes the client's own state only):
        on the calling thread, without the deadline runner's hand-off to a worker thread (two
        thread wake-ups: 0.01 ms while the worker is awake, 0.1-0.3 ms when it must be woken,
        measured on a 2-core VM). Only for calls shown to return at once with the service
        stopped and another call stuck in the client (tests/test_stores_mooncake.py). Calls to
        the service keep the runner: the client's own RPC timeout is no bound (Mooncake with
        MC_RPC_TIMEOUT_MS=1500 and a stopped master: most calls returned after 1.5 s, one in
        eight after 6-9 s)."""
        if self._closed:
            raise CallUnavailable("store is closed")
        return getattr(self._client, name)(*args)

    def _ask(self, name: str, *args):
        """A control-plane call whose answer the caller needs: StoreError when there is none."""
        try:
            return self._call(name, *args)
        except (CallTimeout, CallUnavailable, *self.client_errors) as e:
            raise StoreError(f"{self.label} {name} did not answer{self._where()}: {e}") from None

    def _batches(self, n: int):
        """(lo, hi) ranges of at most ``max_batch_keys`` keys."""
        step = self.max_batch_keys or max(n, 1)
        return ((lo, min(lo + step, n)) for lo in range(0, n, step))

    def _batch_statuses(self, n: int, call, keys_label: str = "") -> np.ndarray:
        """Run ``call()`` (a data-plane call returning per-key statuses for ``n`` keys) and turn a
        call that failed as a whole into one status for all of them."""
        try:
            st = call()
            if st.shape != (n,):  # a client that returns the wrong count: trust none of it
                st = np.full(n, base.IO_ERROR, np.int32)
        except CallTimeout:
            st = np.full(n, base.TIMEOUT, np.int32)
        except CallUnavailable:
            st = np.full(n, base.UNAVAILABLE, np.int32)
        except self.client_errors as e:
            log.warning("%s %s raised %s", self.label, keys_label, e)
            st = np.full(n, base.IO_ERROR, np.int32)
        return st

    def _status(self, rc, table: dict | None = None) -> np.ndarray:
        return map_codes(rc, self.codes if table is None else table, base.IO_ERROR)

    def _failed(self, name: str, keys: list[str], rc: np.ndarray, bad: np.ndarray) -> StoreError:
        codes = ", ".join(f"{int(c)} ({base.status_name(self._status([c])[0])})" for c in np.unique(rc[bad])[:4])
        return StoreError(f"{self.label} {name} failed for {int(bad.sum())} of {len(keys)} keys (first "
                          f"{keys[int(np.flatnonzero(bad)[0])][:40]!r}; {self.label} codes {codes}{self._where()})")

    def _answers(self, name: str, keys: list[str]) -> np.ndarray:
        """One integer per key from a control-plane call, StoreError when it cannot give them."""
        rc = np.asarray(self._ask(name, keys), np.int64)
        if rc.shape != (len(keys),):
            raise StoreError(f"{self.label} {name} answered {rc.size} results for {len(keys)} keys")
        return rc

    def _count(self, op: str, st: np.ndarray, sizes: np.ndarray) -> None:
        ok = st == base.OK
        self._counts[f"{op}_keys"] += len(st)
        self._counts[f"{op}_ok"] += int(ok.sum())
        self._counts[f"{op}_bytes"] += int(np.asarray(sizes)[ok].sum())
        bad = st[~ok]
        if bad.size:
            d = self._counts["failed_by_status"]
            for code, cnt in zip(*np.unique(bad, return_counts=True)):
                d[int(code)] = d.get(int(code), 0) + int(cnt)

    def _register_buffer(self, addr: int, length: int) -> None:
        """The client's register_buffer for a region already added to ``_regions`` (forgotten on failure)."""
        try:
            rc = self._call("register_buffer", int(addr), int(length))
        except (CallTimeout, CallUnavailable) as e:
            rc = f"no answer ({e})"
        if rc != 0:
            self._regions.remove(addr)  # so that a retry registers again
            raise StoreError(f"{self.label} register_buffer(0x{int(addr):x}, {int(length)}) failed: {rc}")

    # ------------------------------------------------------------------ Store interface

    def exists(self, keys) -> np.ndarray:
        keys = base.check_keys(keys)
        out = np.zeros(len(keys), bool)
        for lo, hi in self._batches(len(keys)):
            self._counts["exists_calls"] += 1
            # 1 present, 0 absent; an error answer for any key (Mooncake: -900 when the master is gone)
            # or none within the deadline is StoreError: the cache counts misses and backs off,
            # "absent" would be a guess
            rc = self._answers("batch_is_exist", keys[lo:hi])
            bad = (rc != 0) & (rc != 1)
            if bad.any():
                raise self._failed("batch_is_exist", keys[lo:hi], rc, bad)
            out[lo:hi] = rc == 1
        return out

    def put(self, keys, scatter: ScatterList) -> np.ndarray:
        keys, scatter = check_batch(keys, scatter)
        return self._transfer("put", keys, scatter)

    def get(self, keys, scatter: ScatterList) -> np.ndarray:
        keys, scatter = check_batch(keys, scatter)
        return self._transfer("get", keys, scatter)

    def remove(self, keys) -> int:
        keys = base.check_keys(keys)
        n = 0
        for lo, hi in self._batches(len(keys)):
            rc = self._answers(self.remove_call, keys[lo:hi])
            st = self._status(rc)
            bad = (st != base.OK) & (st != base.NOT_FOUND)  # e.g. a read lease that has not expired: still there
            if bad.any():
                raise self._failed(self.remove_call, keys[lo:hi], rc, bad)
            n += int((st == base.OK).sum())
        return n

    def _too_large(self, size: int) -> bool:
        """An object the client cannot take in one put (put_bytes answers False without a call)."""
        return False

    def put_bytes(self, key: str, data: bytes) -> bool:
        key, size = base.check_object(key, data)
        if self._too_large(size):
            return False
        rc = self._ask("put", key, data if isinstance(data, bytes) else bytes(data))
        st = int(self._status([rc], self.put_codes)[0])
        if st == base.OK or st in base.NO_ROOM:
            return st == base.OK
        raise StoreError(f"{self.label} put({key[:40]!r}) failed: {rc} ({base.status_name(st)}{self._where()})")

    def get_bytes(self, key: str) -> bytes | None:
        (key,) = base.check_keys([key])
        data = self._ask("get", key)
        if data:
            return bytes(data)
        # objects are never empty: b"" is the client's answer both for "absent" and for a failed read
        return self._empty_get(key)

    def _empty_get(self, key: str) -> None:
        raise NotImplementedError

    def stats(self) -> dict:
        d = dict(self._counts, failed_by_status=dict(self._counts["failed_by_status"]))
        d.update(scheme=self.scheme, registered_regions=len(self._regions), timeouts=self._runner.timeouts,
                 refused_calls=self._runner.refused, abandoned_calls=self._runner.abandoned)
        return d

    def quiesce(self, timeout_s: float | None = None) -> bool:
        """Wait until calls that timed out have returned (their destination memory is no longer written)."""
        return self._runner.quiesce(timeout_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        client = getattr(self, "_client", None)
        if client is not None and self._owns_client and self._runner.abandoned == 0:
            try:
                self._runner.call(client.close)
            except (CallTimeout, CallUnavailable, *self.client_errors) as e:
                log.warning("%s close: %s", self.label, e)
        self._runner.shutdown()
