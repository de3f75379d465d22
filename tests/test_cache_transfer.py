"""kvdirect.cache.transfer on the CPU: staging buffers a timed-out store call may still
write are retired until the store is quiet (the device ordering itself is tested on the
simulated device, tests/test_simdevice.py)."""
import ctypes
import threading
import uuid

import numpy as np
import pytest

from kvdirect import KVLayout
from kvdirect.cache import KVDirectCache
from kvdirect.config import CacheConfig
from kvdirect.stores import Store, open_store
from kvdirect.stores._remote import CallTimeout, CallUnavailable, DeadlineRunner
from kvdirect.stores.base import IO_ERROR, TIMEOUT, UNAVAILABLE

P, LAYERS, HEADS, DIM, SLOTS = 4, 2, 2, 8, 256


class Device:
    def __init__(self):
        self.k = [np.zeros((SLOTS, HEADS, DIM), np.float32) for _ in range(LAYERS)]
        self.v = [np.zeros((SLOTS, HEADS, DIM), np.float32) for _ in range(LAYERS)]
        self.layout = KVLayout.from_mha(self.k, self.v, page_size=P)
        self.free = list(range(0, SLOTS, P))[::-1]

    def alloc(self, n):
        firsts = [self.free.pop() for _ in range(n // P)]
        return (np.asarray(firsts, np.int64)[:, None] + np.arange(P)).reshape(-1)

    def free_slots(self, slots):
        self.free.extend(int(s) for s in np.unique(np.asarray(slots) // P * P))

    def fill(self, tokens, slots):
        for i, a in enumerate(self.k + self.v):
            a[slots] = (np.asarray(tokens, np.float32)[:, None, None] + i)


class Wrapped(Store):
    """Delegates every call to ``inner``; subclasses intercept what a test needs."""

    def __init__(self, inner: Store):
        self.inner = inner

    def get(self, keys, scatter):
        return self.inner.get(keys, scatter)

    def put(self, keys, scatter):
        return self.inner.put(keys, scatter)

    def exists(self, keys):
        return self.inner.exists(keys)

    def register(self, addr, length, memory=None):
        self.inner.register(addr, length, memory=memory)

    def remove(self, keys):
        return self.inner.remove(keys)

    def put_bytes(self, key, data):
        return self.inner.put_bytes(key, data)

    def get_bytes(self, key):
        return self.inner.get_bytes(key)

    def close(self):
        self.inner.close()


class AbandonedGetStore(Wrapped):
    """Client calls run on deadline-bounded worker threads, as the Mooncake and MemCache
    adapters do. The get that includes ``stuck_key`` hangs past its deadline (the adapter
    reports TIMEOUT) and, once the next get has filled its own buffer, writes 0xA5 over
    the destination it was given, as a late transfer would."""

    scheme = "abandoned"

    def __init__(self, inner: Store, workers: int, timeout_s: float = 1.0):
        super().__init__(inner)
        self.runner = DeadlineRunner(timeout_s, workers, "test-store")
        self.stuck_key = None
        self._armed = False
        self.next_get_filled = threading.Event()
        self.stale_written = threading.Event()

    def _client_get(self, keys, scatter):
        if self.stuck_key in keys:
            self.stuck_key, self._armed = None, True
            self.next_get_filled.wait(30)
            for a, s in zip(scatter.addrs.reshape(-1), scatter.sizes.reshape(-1)):
                ctypes.memset(int(a), 0xA5, int(s))
            self.stale_written.set()
            return np.full(len(keys), IO_ERROR, np.int32)
        st = self.inner.get(keys, scatter)
        if self._armed:  # the stale call writes while this call's bytes sit in the buffer
            self._armed = False
            self.next_get_filled.set()
            self.stale_written.wait(30)
        return st

    def get(self, keys, scatter):
        try:
            return self.runner.call(self._client_get, keys, scatter)
        except CallTimeout:
            return np.full(len(keys), TIMEOUT, np.int32)
        except CallUnavailable:
            return np.full(len(keys), UNAVAILABLE, np.int32)

    def quiesce(self, timeout_s=None):
        return self.runner.quiesce(timeout_s)

    def close(self):
        self.runner.shutdown()


@pytest.fixture
def url():
    name = f"kvd-xfer-{uuid.uuid4().hex[:10]}"
    yield f"shm://{name}?size=32MiB"
    from kvdirect.stores.shm import destroy_pool

    destroy_pool(name, missing_ok=True)


def _cache(dev, store, **cfg):
    return KVDirectCache(dev.layout, store, free_slots=dev.free_slots,
                         config=CacheConfig(model="xfer-test", **cfg))


@pytest.mark.parametrize("workers", [3, 8])  # the runner keeps one worker free: 2 would refuse the call
def test_a_buffer_a_timed_out_get_may_still_write_is_not_reused(url, workers):
    """With more than one client worker the next load runs while the abandoned get still
    writes: reusing its staging buffer would load 0xA5 bytes."""
    docs = [np.arange(8 * P, dtype=np.int32) + 1000 * i for i in range(2)]
    a = Device()
    writer = _cache(a, url)
    for d in docs:
        s = a.alloc(len(d))
        a.fill(d, s)
        writer.write_back(d, s)
    writer.flush()
    writer.close()

    b = Device()
    store = AbandonedGetStore(open_store(url), workers)
    c = _cache(b, store, stage=True)
    m0 = c.match(docs[0])
    from kvdirect import keys as K
    digests = K.page_digests(docs[0], P, namespace_seed=K.namespace_seed())
    store.stuck_key = K.pool_keys(digests, c.fingerprint)[0]
    assert c.load(m0, b.alloc(m0.pool_len)) == 0          # timed out: a miss
    retired = c.stats()["retired_staging_buffers"]
    m1 = c.match(docs[1])
    slots = b.alloc(m1.pool_len)
    assert c.load(m1, slots) == len(docs[1])              # runs beside the abandoned call
    assert store.stale_written.is_set(), "the abandoned call must have written during the second load"
    for i, arr in enumerate(b.k + b.v):
        want = np.broadcast_to(np.asarray(docs[1], np.float32)[:, None, None] + i, arr[slots].shape)
        np.testing.assert_array_equal(arr[slots], want)
    assert retired == 1
    # once the store is quiet the buffer is recycled (and the quarantined slots freed)
    assert store.quiesce(10)
    c.poll()
    st = c.stats()
    assert st["retired_staging_buffers"] == 0 and st["staging_buffers"] == 2 and st["quarantined_slots"] == 0
    c.close()


class GatedStore(Wrapped):
    """Logs each put and get ("put"/"get", keys) as it starts; a call whose first key is in
    ``hold`` blocks until that key's event is set."""

    scheme = "gated"

    def __init__(self, inner: Store):
        super().__init__(inner)
        self.log, self.hold, self.entered = [], {}, {}

    def _gate(self, op, keys):
        self.log.append((op, list(keys)))
        if keys and keys[0] in self.hold:
            self.entered[keys[0]].set()
            assert self.hold[keys[0]].wait(30)

    def get(self, keys, scatter):
        self._gate("get", keys)
        return self.inner.get(keys, scatter)

    def put(self, keys, scatter):
        self._gate("put", keys)
        return self.inner.put(keys, scatter)

    def held(self, key):
        self.hold[key], self.entered[key] = threading.Event(), threading.Event()
        return self.hold[key], self.entered[key]


def _transfer(dev, store, **cfg):
    from kvdirect.cache.quarantine import Quarantine
    from kvdirect.cache.transfer import Transfer
    from kvdirect.device import device_ops

    return Transfer(store, dev.layout, CacheConfig(model="loads-first", store=None, **cfg),
                    device_ops(dev.layout, store="test"), Quarantine(store, lambda slots: None))


@pytest.mark.parametrize("stage", [False, True])
def test_a_load_goes_before_the_rest_of_a_write_back(url, monkeypatch, stage):
    """A write-back goes in chunks; a load that arrives while one chunk is in flight runs
    before the next chunk (one store client: the load is on a request's path)."""
    from kvdirect.cache import transfer as T

    monkeypatch.setattr(T, "WRITEBACK_CHUNK_BYTES", 1)  # one page per chunk (direct path)
    dev = Device()
    store = GatedStore(open_store(url))
    # the staged path goes in chunks of its staging buffer: one page here
    t = _transfer(dev, store, **(dict(stage=True, staging_bytes=dev.layout.page_bytes) if stage else {}))
    slots = np.arange(4) * P
    dev.fill(np.arange(4 * P), np.arange(4 * P))
    assert (t.put(["L"], slots[3:], None) == 0).all()  # the page to load, already in the pool
    put_gate, put_in = store.held("w0")
    get_gate, get_in = store.held("L")
    res = {}
    w = threading.Thread(target=lambda: res.update(put=t.put(["w0", "w1", "w2"], slots[:3], None)))
    w.start()
    assert put_in.wait(10)
    g = threading.Thread(target=lambda: res.update(get=t.get(["L"], np.array([5 * P]), None)))
    g.start()
    assert get_in.wait(10)
    put_gate.set()  # the chunk in flight completes; the next one must wait for the load
    w.join(0.5)
    assert w.is_alive() and store.log[1:] == [("put", ["w0"]), ("get", ["L"])]
    get_gate.set()
    g.join(10)
    w.join(10)
    assert store.log[1:] == [("put", ["w0"]), ("get", ["L"]), ("put", ["w1"]), ("put", ["w2"])]
    assert (res["put"] == 0).all() and (res["get"] == 0).all()
    for i, a in enumerate(dev.k + dev.v):  # the loaded page is the one written from slots 3P..4P
        np.testing.assert_array_equal(a[5 * P:6 * P], a[3 * P:4 * P])
    st = t.stats()
    assert st["writeback_waits_for_loads"] == 1 and st["writeback_wait_for_loads_ms"] > 0
    t.close()


def test_a_write_back_waits_for_loads_only_so_long(url, monkeypatch):
    from kvdirect.cache import transfer as T

    monkeypatch.setattr(T, "WRITEBACK_CHUNK_BYTES", 1)
    dev = Device()
    store = GatedStore(open_store(url))
    t = _transfer(dev, store)
    t.loads_first.max_wait_s = 0.2
    with t.loads_first.loading():  # a load that does not end while the write-back runs
        st = t.put(["a", "b"], np.arange(2) * P, None)
    assert (st == 0).all() and [k for _, k in store.log] == [["a"], ["b"]]
    assert t.loads_first.waits == 2 and t.loads_first.waited_s >= 0.4
    t.close()
