"""Pieces shared by the adapters of distributed stores (Mooncake, MemCache).

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

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np


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

    def call(self, fn, *args, timeout_s: float | None = None, **kwargs):
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
    from kvdirect.errors import ConfigError
    from kvdirect.stores.base import ScatterList, check_keys

    keys = check_keys(keys)
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
