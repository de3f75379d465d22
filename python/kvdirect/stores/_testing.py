"""Fault injection for stores: wrap any Store so that a fraction of keys fail, time out or arrive slowly.

Used by reliability tests (never by production code)::

    flaky = FlakyStore(open_store(url), fail_rate=0.2, delay_s=0.05, seed=1, fail_ops=("get",))

* ``fail_rate``: probability that a key of an affected put / get fails, or that an affected
  exists call cannot answer (seeded, reproducible).
* ``mode``: ``"error"`` (status IO_ERROR), ``"timeout"`` (status TIMEOUT) or, for gets,
  ``"evict"``: the failing keys are removed from the pool just before the get (an eviction
  between the caller's existence query and its get), which then misses them (NOT_FOUND)
  and leaves their destination untouched.
* ``fail_ops``: which of ``put``, ``get``, ``exists`` are affected.
* ``delay_s`` / ``delay_ops`` / ``delay_rate``: sleep before each affected call, or before
  that fraction of them (slow store; e.g. puts still in flight while the cache manager wants
  to evict their pages).
* ``deadline_s``: put and get run under the remote stores' deadline
  (:class:`kvdirect.stores._remote.DeadlineRunner`): a call slower than this returns
  TIMEOUT for every key while it keeps running, as a Mooncake or MemCache client call
  does; a get that timed out still writes its destination when it returns. ``quiesce()``
  waits for such calls, as on those stores.
* ``garbage``: a failed get also scribbles 0xA5 over the failed keys' destination
  segments, as a real transport may leave partial bytes behind: a caller that uses a
  failed page serves visibly wrong KV.
* ``put_lands``: a failed put still stores the object (the ambiguous case "the
  reply was lost but the write happened"); without it failed keys are not stored.
* ``piecewise``: expose the inner store's ``open_read`` (layer-by-layer loads); a failed key
  of a read piece is scribbled over (``garbage``) and fails from that piece on. Pieces
  before ``fail_from_piece`` are never affected (a failure after layer 0 was used).
* ``down = True`` makes every call fail until reset: put / get statuses UNAVAILABLE; exists,
  remove, put_bytes and get_bytes raise StoreError.

Failures follow the store contract (kvdirect.stores.base): an exists that fails raises
StoreError for the whole call (a pool that cannot answer), never "absent".
``injected`` counts injected failures per operation (keys for put / get, calls for exists;
with ``deadline_s``, ``timeout``: calls that passed the deadline).
"""
from __future__ import annotations

import ctypes
import threading
import time

import numpy as np

from kvdirect.errors import StoreError
from kvdirect.stores import base
from kvdirect.stores.base import ScatterList, Store

_MODES = {"error": base.IO_ERROR, "timeout": base.TIMEOUT, "evict": base.NOT_FOUND}


class FlakyStore(Store):
    def __init__(self, inner: Store, fail_rate: float = 0.0, delay_s: float = 0.0, seed: int = 0,
                 fail_ops=("put", "get", "exists"), mode: str = "error", delay_ops=None, garbage: bool = True,
                 put_lands: bool = False, deadline_s: float = 0.0, delay_rate: float = 1.0,
                 piecewise: bool = False, fail_from_piece: int = 0):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be in [0, 1], got {fail_rate}")
        self.inner = inner
        self.fail_rate, self.delay_s, self.mode = float(fail_rate), float(delay_s), mode
        self.delay_rate = float(delay_rate)
        self.fail_ops = frozenset(fail_ops)
        self.delay_ops = self.fail_ops if delay_ops is None else frozenset(delay_ops)
        self.garbage, self.put_lands = garbage, put_lands
        self.down = False
        self.injected = {"put": 0, "get": 0, "exists": 0}
        self._runner = None
        if deadline_s > 0:
            from kvdirect.stores._remote import DeadlineRunner

            self._runner = DeadlineRunner(deadline_s, name="kvd-flaky")
            self.injected["timeout"] = 0  # calls that passed the deadline
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.scheme = inner.scheme
        self.supports_device_memory = inner.supports_device_memory
        self.fail_from_piece = int(fail_from_piece)
        if piecewise and hasattr(inner, "open_read"):
            self.open_read = self._open_read
        self.hold_at_match = bool(piecewise and getattr(inner, "hold_at_match", False))

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
            if self.delay_rate < 1.0:
                with self._lock:
                    if self._rng.random() >= self.delay_rate:
                        return
            time.sleep(self.delay_s)

    @staticmethod
    def _scribble(scatter: ScatterList, rows: np.ndarray) -> None:
        for r in rows:  # test helper: a loop over a few failed keys is fine here
            for a, s in zip(scatter.addrs[r], scatter.sizes[r]):
                if s:
                    ctypes.memset(int(a), 0xA5, int(s))

    # -------------------------------------------------------------- Store interface

    def register(self, addr: int, length: int, memory: str | None = None) -> None:
        self.inner.register(addr, length, memory=memory)

    def _down(self, op: str) -> None:
        if self.down:
            raise StoreError(f"{op}: store {self.scheme!r} is down (FlakyStore.down)")

    def exists(self, keys) -> np.ndarray:
        keys = base.check_keys(keys)
        self._down("exists")
        self._delay("exists")
        if keys and self._failing("exists", 1)[0]:  # one draw per call: the pool did not answer
            raise StoreError(f"exists: injected {'timeout' if self.mode == 'timeout' else 'error'}")
        return np.asarray(self.inner.exists(keys), bool)

    def _deadline(self, fn, keys, scatter) -> np.ndarray:
        """``fn(keys, scatter)`` under the deadline (TIMEOUT for every key when it passes)."""
        if self._runner is None:
            return fn(keys, scatter)
        from kvdirect.stores._remote import CallTimeout, CallUnavailable

        try:
            return self._runner.call(fn, keys, scatter)
        except CallTimeout:
            with self._lock:
                self.injected["timeout"] += 1
            return np.full(len(keys), base.TIMEOUT, np.int32)
        except CallUnavailable:
            return np.full(len(keys), base.UNAVAILABLE, np.int32)

    def quiesce(self, timeout_s: float | None = None) -> bool:
        """No call that timed out is still running (always, without ``deadline_s``)."""
        return True if self._runner is None else self._runner.quiesce(timeout_s)

    def put(self, keys, scatter: ScatterList) -> np.ndarray:
        keys = base.check_keys(keys)
        if self.down:
            return np.full(len(keys), base.UNAVAILABLE, np.int32)
        return self._deadline(self._put, keys, scatter)

    def _put(self, keys, scatter: ScatterList) -> np.ndarray:
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
        return self._deadline(self._get, keys, scatter)

    def _get(self, keys, scatter: ScatterList) -> np.ndarray:
        self._delay("get")
        fail = self._failing("get", len(keys))
        if self.mode == "evict":
            if fail.any():  # evicted after the caller's exists: the get misses them
                self.inner.remove([keys[i] for i in np.flatnonzero(fail)])
            return np.asarray(self.inner.get(keys, scatter), np.int32)
        st = np.asarray(self.inner.get(keys, scatter), np.int32).copy()
        if fail.any():
            st[fail] = _MODES[self.mode]
            if self.garbage:
                self._scribble(scatter, np.flatnonzero(fail))
        return st

    def _open_read(self, keys, object_sizes) -> "_FlakyRead":
        keys = base.check_keys(keys)
        self._down("get")
        self._delay("get")
        return _FlakyRead(self, self.inner.open_read(keys, object_sizes), len(keys))

    def remove(self, keys) -> int:
        keys = base.check_keys(keys)
        self._down("remove")
        return self.inner.remove(keys)

    def put_bytes(self, key: str, data: bytes) -> bool:
        base.check_object(key, data)
        self._down("put_bytes")
        return self.inner.put_bytes(key, data)

    def get_bytes(self, key: str):
        base.check_keys([key])
        self._down("get_bytes")
        return self.inner.get_bytes(key)

    def stats(self) -> dict:
        return dict(self.inner.stats(), injected=dict(self.injected), down=self.down)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.quiesce(None)  # a late call must not outlive the inner store
            self._runner.shutdown()
        self.inner.close()


class _FlakyRead:
    """The inner store's piecewise read with keys failing (and scribbled) per piece."""

    def __init__(self, owner: FlakyStore, rd, n: int):
        self._o, self._rd, self._pieces = owner, rd, 0
        self._bad = np.zeros(n, bool)

    def _mark(self, st) -> np.ndarray:
        st = np.asarray(st, np.int32).copy()
        st[self._bad & (st == base.OK)] = _MODES[self._o.mode]
        return st

    @property
    def status(self) -> np.ndarray:
        return self._mark(self._rd.status)

    def read(self, scatter: ScatterList) -> None:
        m = len(scatter)
        fail = self._o._failing("get", m) if self._pieces >= self._o.fail_from_piece else np.zeros(m, bool)
        self._pieces += 1
        self._rd.read(scatter)
        if fail.any():
            self._bad[:m] |= fail
            if self._o.garbage:
                FlakyStore._scribble(scatter, np.flatnonzero(fail))

    def narrow(self, n: int) -> None:
        self._rd.narrow(n)
        self._bad = self._bad[:n]

    def end(self) -> np.ndarray:
        return self._mark(self._rd.end())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.end()


# ============================================================================ MemCache test double
#
# A stand-in for the ``memcache_hybrid`` module (1.3.0) for machines without CANN. Its methods
# carry the real parameter names and defaults (tests/test_stores_memcache.py checks them against
# the installed module's pybind11 signatures, or the JSON snapshot), and it enforces the real
# rules: directions (put: L2G/H2G, get: G2L/G2H; anything else fails every key with -3000),
# at most 512 keys and 255 segments per key, keys of 1..256 bytes, calls before init() fail with
# -3019, a duplicate put returns 0 (the first object stays), 0 means done per key. Test switches on
# the module (never on the client, whose public methods must match the real ones): ``capacity``
# (bytes: a put that would exceed it fails with -3013), ``meta_down`` (the MetaService is gone:
# batch calls fail every key with -3017, batch_is_exist / is_exist answer -1, get b"",
# batch_get_key_info []). Device memory is simulated: memory
# registered with ``device=True`` (FakeMemcacheModule.mark_device) may only be used with
# L2G/G2L, host memory only with H2G/G2H; a mismatch fails that key (-3000) without copying.

MMC_INVALID_PARAM = -3000
MMC_EXCEED_CAPACITY = -3013
MMC_NOT_CONNET_META = -3017
MMC_CLIENT_NOT_INIT = -3019
MMC_UNMATCHED_KEY = -3102


class _FakeEnum(int):
    """pybind11 enums convert with int(); so does this."""


class FakeKeyInfo:
    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size


class FakeLocalConfig:
    def __init__(self):
        self.meta_service_url = "tcp://127.0.0.1:5000"
        self.config_store_url = "tcp://127.0.0.1:6000"
        self.protocol = "host_rdma"
        self.dram_size = "1GB"
        self.hbm_size = "0"
        self.world_size = 256
        self.log_level = "info"
        self.client_timeout_seconds = 60


class FakeReplicateConfig:
    pass


class FakeDistributedObjectStore:
    """Behavioural double of memcache_hybrid.DistributedObjectStore (data plane in host memory)."""

    def __init__(self, module: "FakeMemcacheModule"):
        self._m = module
        self._inited = False
        self.calls: list[tuple[str, tuple, dict]] = []

    # -- control plane
    def setup(self, config):
        self.calls.append(("setup", (config,), {}))
        if not isinstance(config, FakeLocalConfig):
            raise TypeError("setup(): incompatible function arguments (expected LocalConfig)")
        return 0

    def init(self, device_id, init_bm=True):
        self.calls.append(("init", (device_id,), {"init_bm": init_bm}))
        _int(device_id)
        self._inited = self._m.init_rc == 0
        return self._m.init_rc

    def register_buffer(self, buffer_ptr, size):
        self.calls.append(("register_buffer", (buffer_ptr, size), {}))
        if not self._inited:
            return MMC_CLIENT_NOT_INIT
        if not _int(buffer_ptr) or not _int(size):
            return MMC_INVALID_PARAM
        self._m.registered.append((buffer_ptr, buffer_ptr + size))
        return 0

    def close(self):
        self.calls.append(("close", (), {}))
        self._inited = False
        return 0

    # -- helpers
    def _check_keys(self, keys):
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise TypeError("keys must be a list of str")
        return all(1 <= len(k.encode()) <= 256 for k in keys) and 1 <= len(keys) <= 512

    def _kind_ok(self, ptrs, sizes, device: bool) -> bool:
        for p, s in zip(ptrs, sizes):
            reg = [r for r in self._m.registered if r[0] <= p and p + s <= r[1]]
            if self._m.require_registered and not reg:
                return False
            if reg and any(self._m.is_device(r) != device for r in reg[:1]):
                return False
        return True

    def _layers_args(self, keys, buffer_ptrs, sizes, direct):
        ok = self._check_keys(keys)
        if not (isinstance(buffer_ptrs, list) and isinstance(sizes, list)
                and len(buffer_ptrs) == len(keys) == len(sizes)):
            return False
        for p, s in zip(buffer_ptrs, sizes):
            if not isinstance(p, list) or not isinstance(s, list):
                raise TypeError("buffer_ptrs / sizes must be lists of lists of int")
            for x in (*p, *s):
                _int(x)
            if not (1 <= len(p) <= 255) or len(p) != len(s):
                ok = False
        _int(direct)
        return ok

    # -- data plane
    def batch_put_from_layers(self, keys, buffer_ptrs, sizes, direct=3, replicateConfig=None):
        self.calls.append(("batch_put_from_layers", (keys, buffer_ptrs, sizes, direct), {}))
        n = len(keys)
        if not self._inited:
            return [MMC_CLIENT_NOT_INIT] * n
        if self._m.meta_down:
            return [MMC_NOT_CONNET_META] * n
        if int(direct) not in (self._m.L2G, self._m.H2G) or not self._layers_args(keys, buffer_ptrs, sizes, direct):
            return [MMC_INVALID_PARAM] * n
        out = []
        for k, p, s in zip(keys, buffer_ptrs, sizes):
            if k in self._m.fail_keys:
                out.append(self._m.fail_keys[k])
            elif not self._kind_ok(p, s, int(direct) == self._m.L2G):
                out.append(MMC_INVALID_PARAM)
            elif k in self._m.objects:
                out.append(0)  # duplicate: MemCache reports it as done
            elif not self._m.fits(sum(s)):
                out.append(MMC_EXCEED_CAPACITY)
            else:
                self._m.objects[k] = b"".join(ctypes.string_at(a, n_) for a, n_ in zip(p, s))
                out.append(0)
        return out

    def batch_get_into_layers(self, keys, buffer_ptrs, sizes, direct=2):
        self.calls.append(("batch_get_into_layers", (keys, buffer_ptrs, sizes, direct), {}))
        n = len(keys)
        if not self._inited:
            return [MMC_CLIENT_NOT_INIT] * n
        if self._m.meta_down:
            return [MMC_NOT_CONNET_META] * n
        if int(direct) not in (self._m.G2L, self._m.G2H) or not self._layers_args(keys, buffer_ptrs, sizes, direct):
            return [MMC_INVALID_PARAM] * n
        out = []
        for k, p, s in zip(keys, buffer_ptrs, sizes):
            obj = self._m.objects.get(k)
            if k in self._m.fail_keys:
                out.append(self._m.fail_keys[k])
            elif obj is None:
                out.append(MMC_UNMATCHED_KEY)
            elif not self._kind_ok(p, s, int(direct) == self._m.G2L):
                out.append(MMC_INVALID_PARAM)
            elif sum(s) != len(obj) and not self._m.lenient_size:
                out.append(MMC_INVALID_PARAM)
            else:  # lenient_size: copies what fits and says 0, the case verify_size guards against
                off = 0
                for a, n_ in zip(p, s):
                    chunk = obj[off:off + n_]
                    ctypes.memmove(a, chunk, len(chunk))
                    off += n_
                out.append(0)
        return out

    def batch_is_exist(self, keys):
        self.calls.append(("batch_is_exist", (keys,), {}))
        if not self._inited:
            return [MMC_CLIENT_NOT_INIT] * len(keys)
        self._check_keys(keys)
        if self._m.meta_down:
            return [-1] * len(keys)
        return [1 if k in self._m.objects else 0 for k in keys]

    def batch_get_key_info(self, keys, flag=1):
        self.calls.append(("batch_get_key_info", (keys,), {}))
        if not self._inited or self._m.meta_down:
            return []
        self._check_keys(keys)
        return [FakeKeyInfo(len(self._m.objects.get(k, b""))) for k in keys]

    def remove_batch(self, arg0):
        self.calls.append(("remove_batch", (arg0,), {}))
        if not self._inited:
            return [MMC_CLIENT_NOT_INIT] * len(arg0)
        if self._m.meta_down:
            return [MMC_NOT_CONNET_META] * len(arg0)
        return [0 if self._m.objects.pop(k, None) is not None else MMC_UNMATCHED_KEY for k in arg0]

    def put(self, key, buf, replicateConfig=None):
        self.calls.append(("put", (key, buf), {}))
        if not self._inited:
            return MMC_CLIENT_NOT_INIT
        if self._m.meta_down:
            return MMC_NOT_CONNET_META
        if key not in self._m.objects:
            if not self._m.fits(len(bytes(buf))):
                return MMC_EXCEED_CAPACITY
            self._m.objects[key] = bytes(buf)
        return 0

    def get(self, arg0):
        self.calls.append(("get", (arg0,), {}))
        return self._m.objects.get(arg0, b"") if self._inited and not self._m.meta_down else b""

    def is_exist(self, arg0):
        self.calls.append(("is_exist", (arg0,), {}))
        if not self._inited:
            return MMC_CLIENT_NOT_INIT
        if self._m.meta_down:
            return -1
        return 1 if arg0 in self._m.objects else 0


def _int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"expected an int, got {type(x).__name__}")
    return x


class FakeMemcacheModule:
    """Looks like ``import memcache_hybrid`` for MemcacheStore(module=...). Shared state = one pool."""

    def __init__(self, init_rc: int = 0, lenient_size: bool = False, require_registered: bool = True,
                 capacity: int | None = None):
        from kvdirect.stores.memcache import DIRECTIONS_FALLBACK

        for name, v in DIRECTIONS_FALLBACK.items():
            setattr(self, name, _FakeEnum(v))
        self.init_rc, self.lenient_size, self.require_registered = init_rc, lenient_size, require_registered
        self.capacity = capacity
        self.meta_down = False
        self.objects: dict[str, bytes] = {}
        self.fail_keys: dict[str, int] = {}
        self.registered: list[tuple[int, int]] = []
        self._device_starts: set[int] = set()
        self.LocalConfig = FakeLocalConfig
        self.ReplicateConfig = FakeReplicateConfig
        self.clients: list[FakeDistributedObjectStore] = []

    def DistributedObjectStore(self):  # noqa: N802 - mirrors the class name
        c = FakeDistributedObjectStore(self)
        self.clients.append(c)
        return c

    def fits(self, size: int) -> bool:
        """Room for one more object of `size` bytes (no eviction in the double)?"""
        return self.capacity is None or sum(map(len, self.objects.values())) + size <= self.capacity

    def mark_device(self, addr: int) -> None:
        """Memory registered at addr is 'device' memory (only L2G / G2L may touch it)."""
        self._device_starts.add(int(addr))

    def is_device(self, region) -> bool:
        return region[0] in self._device_starts


class CountingClient:
    """Wraps a remote store's client (``store._client``) and records the name of every call
    made through it, in order: how many round trips a cache operation costs (tests only)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def counted(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return counted

    def count(self, name: str) -> int:
        return self.calls.count(name)

    @classmethod
    def install(cls, store) -> "CountingClient":
        """Count the calls of ``store`` (a MooncakeStore or MemcacheStore) from now on."""
        store._client = cls(store._client)
        return store._client
