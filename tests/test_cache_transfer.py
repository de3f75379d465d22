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


class AbandonedGetStore(Store):
    """Client calls run on deadline-bounded worker threads, as the Mooncake and MemCache
    adapters do. The get that includes ``stuck_key`` hangs past its deadline (the adapter
    reports TIMEOUT) and, once the next get has filled its own buffer, writes 0xA5 over
    the destination it was given, as a late transfer would."""

    scheme = "abandoned"

    def __init__(self, inner: Store, workers: int, timeout_s: float = 1.0):
        self.inner = inner
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

    def exists(self, keys):
        return self.inner.exists(keys)

    def put(self, keys, scatter):
        return self.inner.put(keys, scatter)

    def register(self, addr, length, memory=None):
        self.inner.register(addr, length, memory=memory)

    def remove(self, keys):
        return self.inner.remove(keys)

    def put_bytes(self, key, data):
        return self.inner.put_bytes(key, data)

    def get_bytes(self, key):
        return self.inner.get_bytes(key)

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
