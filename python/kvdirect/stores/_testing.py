"""Fault injection for stores: wrap any Store so that a fraction of keys fail, time out or arrive slowly.

Used by reliability tests (never by production code)::

    flaky = FlakyStore(open_store(url), fail_rate=0.2, delay_s=0.05, seed=1, fail_ops=("get",))

* ``fail_rate``: probability that a key of an affected operation fails (seeded, reproducible).
* ``mode``: ``"error"`` (status IO_ERROR) or ``"timeout"`` (status TIMEOUT).
* ``fail_ops``: which of ``put``, ``get``, ``exists`` are affected.
* ``delay_s`` / ``delay_ops``: sleep before each affected call (slow store; e.g. puts still
  in flight while the cache manager wants to evict their pages).
* ``garbage``: a failed get also scribbles 0xA5 over the failed keys' destination
  segments, as a real transport may leave partial bytes behind: a caller that uses a
  failed page serves visibly wrong KV.
* ``put_lands``: a failed put still stores the object (the ambiguous case "the
  reply was lost but the write happened"); without it failed keys are not stored.
* ``down = True`` makes every call fail (UNAVAILABLE, exists -> False) until reset.

``injected`` counts injected failures per operation.
"""
from __future__ import annotations

import ctypes
import threading
import time

import numpy as np

from kvdirect.stores import base
from kvdirect.stores.base import ScatterList, Store

_MODES = {"error": base.IO_ERROR, "timeout": base.TIMEOUT}


class FlakyStore(Store):
    def __init__(self, inner: Store, fail_rate: float = 0.0, delay_s: float = 0.0, seed: int = 0,
                 fail_ops=("put", "get", "exists"), mode: str = "error", delay_ops=None, garbage: bool = True,
                 put_lands: bool = False):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be in [0, 1], got {fail_rate}")
        self.inner = inner
        self.fail_rate, self.delay_s, self.mode = float(fail_rate), float(delay_s), mode
        self.fail_ops = frozenset(fail_ops)
        self.delay_ops = self.fail_ops if delay_ops is None else frozenset(delay_ops)
        self.garbage, self.put_lands = garbage, put_lands
        self.down = False
        self.injected = {"put": 0, "get": 0, "exists": 0}
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.scheme = inner.scheme
        self.supports_device_memory = inner.supports_device_memory

    # -------------------------------------------------------------- injection

    def _failing(self, op: str, n: int) -> np.ndarray:
        if op not in self.fail_ops or self.fail_rate == 0.0 or n == 0:
            return np.zeros(n, bool)
        with self._lock:
            f = self._rng.random(n) < self.fail_rate
            self.injected[op] += int(f.sum())
        return f

    def _delay(self, op: str) -> None:
        if self.delay_s > 0 and op in self.delay_ops:
            time.sleep(self.delay_s)

    @staticmethod
    def _scribble(scatter: ScatterList, rows: np.ndarray) -> None:
        for r in rows:  # test helper: a loop over a few failed keys is fine here
            for a, s in zip(scatter.addrs[r], scatter.sizes[r]):
                if s:
                    ctypes.memset(int(a), 0xA5, int(s))

    # -------------------------------------------------------------- Store interface

    def register(self, addr: int, length: int) -> None:
        self.inner.register(addr, length)

    def exists(self, keys) -> np.ndarray:
        keys = base.check_keys(keys)
        if self.down:
            return np.zeros(len(keys), bool)
        self._delay("exists")
        present = np.asarray(self.inner.exists(keys), bool).copy()
        present[self._failing("exists", len(keys))] = False
        return present

    def put(self, keys, scatter: ScatterList) -> np.ndarray:
        keys = base.check_keys(keys)
        if self.down:
            return np.full(len(keys), base.UNAVAILABLE, np.int32)
        self._delay("put")
        fail = self._failing("put", len(keys))
        st = np.full(len(keys), _MODES[self.mode], np.int32)
        send = np.ones(len(keys), bool) if self.put_lands else ~fail
        idx = np.flatnonzero(send)
        if idx.size:
            inner_st = np.asarray(self.inner.put([keys[i] for i in idx], scatter.take(idx)), np.int32)
            st[idx] = np.where(fail[idx], _MODES[self.mode], inner_st)
        return st

    def get(self, keys, scatter: ScatterList) -> np.ndarray:
        keys = base.check_keys(keys)
        if self.down:
            return np.full(len(keys), base.UNAVAILABLE, np.int32)
        self._delay("get")
        fail = self._failing("get", len(keys))
        st = np.asarray(self.inner.get(keys, scatter), np.int32).copy()
        if fail.any():
            st[fail] = _MODES[self.mode]
            if self.garbage:
                self._scribble(scatter, np.flatnonzero(fail))
        return st

    def remove(self, keys) -> int:
        return 0 if self.down else self.inner.remove(keys)

    def put_bytes(self, key: str, data: bytes) -> bool:
        return False if self.down else self.inner.put_bytes(key, data)

    def get_bytes(self, key: str):
        return None if self.down else self.inner.get_bytes(key)

    def stats(self) -> dict:
        return dict(self.inner.stats(), injected=dict(self.injected), down=self.down)

    def close(self) -> None:
        self.inner.close()
