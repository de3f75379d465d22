"""KVDirectCache: load path, write-back, the reference design's defects, faults."""
import multiprocessing as mp
import os
import threading
import uuid

import numpy as np
import pytest

from kvdirect import KVLayout
from kvdirect.cache import IN_POOL, UNKNOWN, KVDirectCache
from kvdirect.config import CacheConfig
from kvdirect.errors import ConfigError
from kvdirect.stores import Store, open_store
from kvdirect.stores.base import UNAVAILABLE

LAYERS, SLOTS, HEADS, DIM = 3, 512, 2, 8


class Device:
    """A CPU 'device' KV pool (per-layer K/V arrays) with a free-list allocator."""

    def __init__(self, page_size, slots=SLOTS, head_dim=DIM):
        self.P = page_size
        self.k = [np.zeros((slots, HEADS, head_dim), np.float32) for _ in range(LAYERS)]
        self.v = [np.zeros((slots, HEADS, head_dim), np.float32) for _ in range(LAYERS)]
        self.layout = KVLayout.from_mha(self.k, self.v, page_size=page_size)
        self.free = list(range(0, slots, page_size))[::-1]  # page-aligned first slots
        self.freed = []

    def alloc(self, n_tokens):
        n_pages = -(-n_tokens // self.P)
        assert len(self.free) >= n_pages, "device pool exhausted in test"
        firsts = [self.free.pop() for _ in range(n_pages)]
        return (np.asarray(firsts, np.int64)[:, None] + np.arange(self.P)).reshape(-1)[:n_tokens]

    def free_slots(self, slots):
        slots = np.asarray(slots)
        self.freed.append(slots.copy())
        for s in np.unique(slots - slots % self.P):
            self.free.append(int(s))


def pool_url():
    return f"shm://kvd-test-{uuid.uuid4().hex[:10]}?size=64MiB"


@pytest.fixture
def url():
    u = pool_url()
    yield u
    from kvdirect.stores.shm import destroy_pool
    destroy_pool(u.split("//")[1].split("?")[0], missing_ok=True)


def make(dev, store, **cfg):
    cfg.setdefault("model", "test-model")
    return KVDirectCache(dev.layout, store, free_slots=dev.free_slots, config=CacheConfig(**cfg))


def make_from_config(dev, **cfg):
    """A cache whose store comes from CacheConfig (no store argument)."""
    cfg.setdefault("model", "test-model")
    return KVDirectCache(dev.layout, free_slots=dev.free_slots, config=CacheConfig(**cfg))


def serve(cache, dev, tokens, seed=0, ns=None):
    """What an engine does for one request; returns (match, slots used, loaded)."""
    m = cache.match(tokens, ns)
    cache.lock(m.node)
    slots = dev.alloc(m.pool_len)
    loaded = cache.load(m, slots)
    cached = m.device_len
    rest = dev.alloc(len(tokens) - cached)
    all_slots = np.concatenate([m.device_slots, rest]).astype(np.int64)
    dev_compute_suffix(dev, tokens, all_slots, cached, seed)  # "prefill" the uncached suffix
    already = cache.write_back(tokens, all_slots, ns)
    if already > cached:
        dev.free_slots(all_slots[cached:already])
    cache.unlock(m.node)
    cache.poll()
    return m, all_slots, loaded


def dev_compute_suffix(dev, tokens, slots, start, seed):
    t = np.asarray(tokens, np.int64)
    h = np.cumsum(t * 2654435761 % 1000003) % 1000003 + seed
    for l in range(LAYERS):
        vals = (h[:, None, None] * (l + 1) + np.arange(HEADS * dev.k[0].shape[2]).reshape(1, HEADS, -1)).astype(np.float32)
        dev.k[l][slots[start:]] = vals[start:]
        dev.v[l][slots[start:]] = -vals[start:]


def expected_kv(dev, tokens, seed=0):
    t = np.asarray(tokens, np.int64)
    h = np.cumsum(t * 2654435761 % 1000003) % 1000003 + seed
    out = []
    for l in range(LAYERS):
        out.append((h[:, None, None] * (l + 1) + np.arange(HEADS * dev.k[0].shape[2]).reshape(1, HEADS, -1)).astype(np.float32))
    return out


def tokens_of(n, seed):
    return np.random.default_rng(seed).integers(0, 50000, n).astype(np.int32)


@pytest.mark.parametrize("P", [1, 4, 16])
def test_write_back_then_second_instance_loads_identical_bytes(url, P):
    a, b = Device(P), Device(P)
    ca, cb = make(a, url), make(b, url)
    toks = tokens_of(10 * P + 3, 1)
    n = len(toks) // P * P  # tokens in full pages (a trailing partial page is never stored)
    serve(ca, a, toks)
    ca.flush()
    assert ca.stats()["stored_pages"] == n // P
    m = cb.match(toks)
    assert m.device_len == 0 and m.pool_len == n
    slots = b.alloc(m.pool_len)
    assert cb.load(m, slots) == n
    assert m.device_len == n and np.array_equal(m.device_slots, slots)
    exp = expected_kv(a, toks)
    for l in range(LAYERS):
        np.testing.assert_array_equal(b.k[l][slots], exp[l][:n])
        np.testing.assert_array_equal(b.v[l][slots], -exp[l][:n])
    # loaded pages are device hits now, without the store
    m2 = cb.match(toks)
    assert m2.device_len == n and m2.pool_len == 0
    ca.close(), cb.close()


def test_partial_prefix_reuse(url):
    P = 4
    a, b = Device(P), Device(P)
    ca, cb = make(a, url), make(b, url)
    base = tokens_of(40, 2)
    serve(ca, a, base)
    ca.flush()
    q = np.concatenate([base[:22], tokens_of(20, 3)])  # shares 5 full pages (20 tokens)
    m = cb.match(q)
    assert (m.device_len, m.pool_len) == (0, 20)
    m, _, loaded = serve(cb, b, q)
    assert loaded == 20


def _child_writer(url, P, seed, q):
    dev = Device(P)
    c = make(dev, url)
    toks = tokens_of(12 * P, seed)
    serve(c, dev, toks, seed=0)
    c.flush()
    q.put(c.stats()["stored_pages"])
    c.close()


def test_two_processes_share_one_pool(url):
    P = 8
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_writer, args=(url, P, 7, q))
    p.start()
    p.join(120)
    assert p.exitcode == 0 and q.get(timeout=5) == 12
    b = Device(P)
    cb = make(b, url)
    toks = tokens_of(12 * P, 7)
    m = cb.match(toks)
    assert m.pool_len == 12 * P
    slots = b.alloc(m.pool_len)
    assert cb.load(m, slots) == 12 * P
    exp = expected_kv(b, toks)
    for l in range(LAYERS):
        np.testing.assert_array_equal(b.k[l][slots], exp[l])
    cb.close()


# ---- the reference design's defects ---------------------------------------------------

class ScriptedStore(Store):
    """Wraps a real store; can fail chosen puts/gets, delay puts, or go down."""

    scheme = "scripted"

    def __init__(self, inner):
        self.inner = inner
        self.fail_put_keys = set()
        self.fail_get_after = None   # fail gets from this key position on
        self.down = False
        self.put_gate = None         # threading.Event: puts wait for it
        self.puts = 0

    def exists(self, keys):
        if self.down:
            raise ConnectionError("store down")
        return self.inner.exists(keys)

    def put(self, keys, scatter):
        if self.put_gate is not None:
            assert self.put_gate.wait(30)
        if self.down:
            raise ConnectionError("store down")
        self.puts += len(keys)
        st = np.asarray(self.inner.put(keys, scatter), np.int32).copy()
        for i, k in enumerate(keys):
            if k in self.fail_put_keys:
                st[i] = UNAVAILABLE
                self.inner.remove([k])
        return st

    def get(self, keys, scatter):
        if self.down:
            raise ConnectionError("store down")
        st = np.asarray(self.inner.get(keys, scatter), np.int32).copy()
        if self.fail_get_after is not None:
            st[self.fail_get_after:] = UNAVAILABLE
        return st

    def remove(self, keys):
        return self.inner.remove(keys)

    def put_bytes(self, key, data):
        return self.inner.put_bytes(key, data)

    def get_bytes(self, key):
        return self.inner.get_bytes(key)

    def close(self):  # the cache closes its store: a Mooncake client left to the GC tears down mid-test
        self.inner.close()


def test_put_status_is_not_inverted(url):
    """Defect 1: successes reported as failures (or the reverse)."""
    P = 4
    a = Device(P)
    store = ScriptedStore(open_store(url))
    c = make(a, store)
    toks = tokens_of(8 * P, 4)
    serve(c, a, toks)
    c.flush()
    st = c.stats()
    assert st["stored_pages"] == 8 and st["store_failed_pages"] == 0
    r = c.index.match(toks)
    assert (c.index.path_states(r.node)[0] == IN_POOL).all()
    # now make the put of the 3rd page of a new request fail: exactly that page is not stored
    toks2 = tokens_of(8 * P, 5)
    from kvdirect import keys as K
    d = K.page_digests(toks2, P, namespace_seed=K.namespace_seed())
    bad = K.pool_keys(d, c.fingerprint)[2]
    store.fail_put_keys.add(bad)
    serve(c, a, toks2)
    c.flush()
    st = c.stats()
    assert st["stored_pages"] == 8 + 7 and st["store_failed_pages"] == 1
    r = c.index.match(toks2)
    states = c.index.path_states(r.node)[0]
    assert list(np.flatnonzero(states != IN_POOL)) == [2] and states[2] == UNKNOWN
    assert not store.inner.exists([bad])[0]


def test_a_put_where_some_pages_failed_does_not_back_off_the_store(url):
    """A few pages not stored (a full pool, say) leave the store in use: the next request's
    pages are written and matched from the pool. A put where no page landed backs off."""
    P = 4
    a = Device(P)
    store = ScriptedStore(open_store(url))
    c = make(a, store)
    from kvdirect import keys as K

    toks = tokens_of(8 * P, 6)
    d = K.page_digests(toks, P, namespace_seed=K.namespace_seed())
    store.fail_put_keys.add(K.pool_keys(d, c.fingerprint)[2])
    serve(c, a, toks)
    c.flush()
    assert c.stats()["store_failed_pages"] == 1 and c.stats()["failures"].get("put_status") == 1
    assert c._p.health.available(), "one page not stored put the whole store in back-off"
    toks2 = tokens_of(8 * P, 7)
    serve(c, a, toks2)
    c.flush()
    assert c.stats()["stored_pages"] == 7 + 8
    # every page of a put failed: back off
    toks3 = tokens_of(8 * P, 8)
    d3 = K.page_digests(toks3, P, namespace_seed=K.namespace_seed())
    store.fail_put_keys.update(K.pool_keys(d3, c.fingerprint))
    serve(c, a, toks3)
    c.flush()
    assert c.stats()["failures"]["put_status"] == 2 and not c._p.health.available()


def test_pages_in_pool_are_evicted_from_device_and_stay_known(url):
    """Defect 2: pages backed up in the pool were never evicted from device memory."""
    P = 4
    a = Device(P)
    store = ScriptedStore(open_store(url))
    c = make(a, store)
    toks = tokens_of(10 * P, 6)
    serve(c, a, toks)
    c.flush()
    assert c.total_size == 10 * P and c.evictable_size == 10 * P
    free_before = len(a.free)
    assert c.evict(10 * P) == 10 * P
    assert c.total_size == 0 and len(a.free) == free_before + 10
    queries = c.stats()["query_keys"]
    m = c.match(toks)
    assert (m.device_len, m.pool_len) == (0, 10 * P)
    assert c.stats()["query_keys"] == queries, "pool-only pages must be known without a store query"
    slots = a.alloc(m.pool_len)
    assert c.load(m, slots) == 10 * P
    exp = expected_kv(a, toks)
    np.testing.assert_array_equal(a.k[1][slots], exp[1])


def test_eviction_cannot_free_pages_being_written(url):
    """Defect 3: async writes did not pin their device pages."""
    P = 4
    a = Device(P)
    store = ScriptedStore(open_store(url))
    store.put_gate = threading.Event()
    c = make(a, store)
    toks = tokens_of(6 * P, 8)
    serve(c, a, toks)
    assert c.stats()["inflight_pages"] == 6
    assert c.evict(10**6) == 0, "pages with a put in flight must be pinned"
    assert c.total_size == 6 * P
    store.put_gate.set()
    c.flush()
    assert c.evict(10**6) == 6 * P
    # and what was written is what the device held
    b = Device(P)
    cb = make(b, url)
    m = cb.match(toks)
    slots = b.alloc(m.pool_len)
    assert cb.load(m, slots) == 6 * P
    np.testing.assert_array_equal(b.v[2][slots], -expected_kv(b, toks)[2])


# ---- faults ---------------------------------------------------------------------------

def test_partial_get_stops_at_first_failed_page_and_frees_the_rest(url):
    P = 4
    a, b = Device(P), Device(P)
    ca = make(a, url)
    toks = tokens_of(8 * P, 9)
    serve(ca, a, toks)
    ca.flush()
    store = ScriptedStore(open_store(url))
    store.fail_get_after = 3
    cb = make(b, store)
    m = cb.match(toks)
    assert m.pool_len == 8 * P
    slots = b.alloc(m.pool_len)
    assert cb.load(m, slots) == 3 * P
    freed = np.concatenate(b.freed)
    assert np.array_equal(np.sort(freed), np.sort(slots[3 * P:]))
    assert m.device_len == 3 * P and cb.total_size == 3 * P
    np.testing.assert_array_equal(b.k[0][slots[:3 * P]], expected_kv(b, toks)[0][:3 * P])
    assert cb.stats()["load_failed_pages"] == 5


def test_a_load_moves_only_its_own_requests_lock(url):
    """Two requests lock the same matched node; one loads, its pages failing from page 3 on:
    only its lock follows it to the loaded prefix. Locks used to be counted per id() of the
    handle int, and small ints are shared objects: that load moved both locks, the other
    request's pages were dropped while it held them, and its handle went stale (as did large
    handles, flakily, when an id() was reused: tests/reliability flaky_store)."""
    P = 4
    a = Device(P)
    store = ScriptedStore(open_store(url))
    c = make(a, store)
    toks = tokens_of(8 * P, 21)
    serve(c, a, toks)
    c.flush()
    assert c.evict(10**6) == 8 * P  # the index keeps the 8 pages as pool-only
    ma, mb = c.match(toks), c.match(toks)
    assert ma.node == mb.node and (ma.device_len, ma.pool_len) == (0, 8 * P)
    c.lock(ma.node)
    c.lock(mb.node)
    store.fail_get_after = 3
    assert c.load(ma, a.alloc(ma.pool_len)) == 3 * P
    assert ma.node != mb.node and c.protected_size == 3 * P
    # b still holds its node: the pages a's load found missing stay (dead) until b lets go
    states, dev = c.index.path_states(mb.node)
    assert dev == 3 and list(states) == [IN_POOL] * 3 + [UNKNOWN] * 5
    assert c.index._check() == ""
    assert c.load(mb, a.alloc(mb.pool_len)) == 3 * P  # the same pages fail for b
    assert mb.node == ma.node and mb.device_len == 3 * P
    c.unlock(ma.node)
    assert c.protected_size == 3 * P  # b's lock, moved by its own load
    c.unlock(mb.node)
    assert c.protected_size == 0 and c.index._check() == ""
    r = c.index.match(toks)
    assert (r.device_len, r.pool_len) == (3 * P, 0)  # the failed pages left once unlocked


def test_pool_eviction_between_exists_and_get(url):
    P = 4
    a, b = Device(P), Device(P)
    ca, cb = make(a, url), make(b, url)
    toks = tokens_of(6 * P, 10)
    serve(ca, a, toks)
    ca.flush()
    m = cb.match(toks)
    assert m.pool_len == 6 * P
    from kvdirect import keys as K
    d = K.page_digests(toks, P, namespace_seed=K.namespace_seed())
    open_store(url).remove(K.pool_keys(d, cb.fingerprint)[4:5])  # page 4 vanishes
    slots = b.alloc(m.pool_len)
    assert cb.load(m, slots) == 4 * P
    assert len(np.concatenate(b.freed)) == 2 * P


def test_store_down_is_a_miss_and_backs_off(url):
    P = 4
    a = Device(P)
    store = ScriptedStore(open_store(url))
    c = make(a, store, retry_initial_s=60, retry_max_s=120)
    toks = tokens_of(5 * P, 11)
    store.down = True
    m = c.match(toks)
    assert m.pool_len == 0 and c.stats()["failures"]["exists"] == 1
    assert not c.stats()["store_available"]
    m = c.match(toks)  # backing off: the store is not asked again
    assert c.stats()["failures"]["exists"] == 1
    serve(c, a, toks)  # write-back is skipped while the store is down, request still served
    c.flush()
    assert c.stats()["stored_pages"] == 0


def test_store_down_mid_load(url):
    P = 4
    a, b = Device(P), Device(P)
    ca = make(a, url)
    toks = tokens_of(5 * P, 12)
    serve(ca, a, toks)
    ca.flush()
    store = ScriptedStore(open_store(url))
    cb = make(b, store)
    m = cb.match(toks)
    store.down = True
    slots = b.alloc(m.pool_len)
    assert cb.load(m, slots) == 0
    assert cb.total_size == 0 and len(np.concatenate(b.freed)) == 5 * P


def test_namespaces_never_share_pages(url):
    P = 4
    a, b = Device(P), Device(P)
    ca, cb = make(a, url), make(b, url)
    toks = tokens_of(6 * P, 13)
    serve(ca, a, toks, ns="tenant-a")
    ca.flush()
    assert cb.match(toks, "tenant-b").pool_len == 0
    assert cb.match(toks).pool_len == 0
    assert cb.match(toks, "tenant-a").pool_len == 6 * P
    assert ca.match(toks, "tenant-b").device_len == 0


def test_layout_fingerprint_mismatch_means_no_cross_reads(url):
    P = 4
    a, b = Device(P), Device(P, head_dim=DIM * 2)
    ca, cb = make(a, url), make(b, url)
    cm = make(Device(P), url, model="other-model")
    toks = tokens_of(6 * P, 14)
    serve(ca, a, toks)
    ca.flush()
    assert cb.match(toks).pool_len == 0
    assert cm.match(toks).pool_len == 0


def test_backpressure_drop(url):
    P = 4
    a = Device(P)
    store = ScriptedStore(open_store(url))
    store.put_gate = threading.Event()
    c = make(a, store, max_inflight_pages=4, backpressure="drop")
    serve(c, a, tokens_of(4 * P, 15))
    serve(c, a, tokens_of(4 * P, 16))   # over the bound: dropped, not queued
    assert c.stats()["dropped_writeback_pages"] == 4
    store.put_gate.set()
    c.flush()
    assert c.stats()["stored_pages"] == 4
    # dropped pages are plain device pages: evictable, never marked in the pool
    assert c.evict(10**6) == 8 * P


def test_backpressure_wait(url):
    P = 4
    a = Device(P)
    c = make(a, url, max_inflight_pages=4, backpressure="wait")
    for s in range(5):
        serve(c, a, tokens_of(4 * P, 100 + s))
    c.flush()
    assert c.stats()["stored_pages"] == 20 and c.stats()["dropped_writeback_pages"] == 0


def test_pages_already_in_pool_are_not_written_again(url):
    P = 4
    a, b = Device(P), Device(P)
    ca = make(a, url)
    toks = tokens_of(6 * P, 17)
    serve(ca, a, toks)
    ca.flush()
    store = ScriptedStore(open_store(url))
    cb = make(b, store)
    cb.config.min_query_pages = 10**6   # don't look: compute everything
    serve(cb, b, toks)
    cb.flush()
    assert store.puts == 0 and cb.stats()["skipped_existing_pages"] == 6


# ---- the pool is chosen explicitly -------------------------------------------------------

def test_no_store_configured_is_an_error_not_a_default_pool():
    """No store given and none configured: refuse to start (never a machine-wide default pool)."""
    assert CacheConfig().store == ""
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    with pytest.raises(ConfigError, match=r"needs a KV pool.*store=None.*device-only"):
        KVDirectCache(Device(4).layout, config=CacheConfig(model="m"))
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not {f for f in after - before if f.startswith("kvdirect")}, "a pool was created"


def test_device_only_cache_says_so_once(caplog):
    P = 4
    a = Device(P)
    with caplog.at_level("WARNING", logger="kvdirect"):
        c = make_from_config(a, store=None)
    assert c.store is None and c.stats()["mode"] == "device-only" and c.stats()["store"] is None
    assert caplog.text.count("device-only cache") == 1
    toks = tokens_of(4 * P, 18)
    m, _, loaded = serve(c, a, toks)
    assert loaded == 0 and c.match(toks).device_len == 4 * P
    assert caplog.text.count("device-only cache") == 1  # said once, not per request
    c.close()


@pytest.mark.parametrize("bad", ["memcache://?config=/nonexistent/mmc.conf", "bogus://x", "shm://",
                                 "shm://x?size=lots", "not a url"])
def test_malformed_store_url_is_always_an_error(bad):
    a = Device(4)
    for allow in (True, False):
        with pytest.raises(ConfigError):
            make(a, bad, allow_no_store=allow)
        with pytest.raises(ConfigError):
            make_from_config(a, store=bad, allow_no_store=allow)


def test_unreachable_store_is_tolerated_only_when_allowed(caplog):
    from kvdirect.errors import StoreError

    # a pool that is not there (StoreError, like an unreachable service); no client library
    # is loaded into the test process (fork-based tests run after this one)
    url = f"shm://kvd-absent-{uuid.uuid4().hex[:10]}?create=no"
    a = Device(4)
    with pytest.raises(StoreError):
        make(a, url, allow_no_store=False)
    with caplog.at_level("WARNING", logger="kvdirect"):
        c = make(a, url)  # allow_no_store defaults to true: a warning, then no pool
    assert c.store is None and c.stats()["mode"] == "no-pool"
    assert "unreachable" in caplog.text and "without a KV pool" in caplog.text
    m, _, loaded = serve(c, a, tokens_of(16, 19))
    assert loaded == 0
    c.close()


# ---- slots are validated, never a store failure --------------------------------------------

def _pool_with(url, P, toks):
    a = Device(P)
    ca = make(a, url)
    serve(ca, a, toks)
    ca.flush()
    return ca


@pytest.mark.parametrize("layerwise", [False, True])
def test_load_slots_are_validated_before_anything_happens(url, layerwise):
    P = 4
    toks = tokens_of(6 * P, 50)
    _pool_with(url, P, toks).close()
    b = Device(P)
    cb = make(b, url)
    m = cb.match(toks)
    assert m.pool_len == 6 * P
    slots = b.alloc(m.pool_len)
    load = (lambda m, s: cb.load_layerwise(m, s).finish()) if layerwise else cb.load
    bad = {
        "one slot per page": (slots[::P], r"one per token of whole pages \(4 per page\).*offers 24 pool tokens"),
        "not page aligned": (slots + 1, r"not page aligned"),
        "page broken up": (np.concatenate([slots[:P - 1], slots[P:2 * P + 1]]), r"breaks its page"),
        "out of range": (slots + SLOTS, r"out of range"),
    }
    for name, (s, pattern) in bad.items():
        with pytest.raises(ConfigError, match=pattern):
            load(m, s)
    st = cb.stats()
    assert st["failures"] == {} and st["store_available"], "bad slots must never count as a store failure"
    assert b.freed == [] and m.pool_len == 6 * P and cb.total_size == 0  # nothing changed
    assert load(m, slots) == 6 * P
    np.testing.assert_array_equal(b.k[1][slots], expected_kv(b, toks)[1])


def test_write_back_slots_are_validated(url):
    P = 4
    a = Device(P)
    c = make(a, url)
    toks = tokens_of(3 * P + 1, 51)
    slots = a.alloc(len(toks))
    with pytest.raises(ConfigError, match="write_back: .*not page aligned"):
        c.write_back(toks, slots + 1)
    swapped = slots.copy()
    swapped[[1, P + 1]] = swapped[[P + 1, 1]]
    with pytest.raises(ConfigError, match="write_back: .*breaks its page"):
        c.write_back(toks, swapped)
    assert c.total_size == 0 and c.stats()["failures"] == {}
    assert c.write_back(toks, slots) == 0 and c.total_size == 3 * P


# ---- only store failures are store failures -----------------------------------------------

class BuggyStore(ScriptedStore):
    """A store whose calls hit a programming error (not a pool failure)."""

    scheme = "buggy"

    def __init__(self, inner, op):
        super().__init__(inner)
        self.op = op

    def exists(self, keys):
        if self.op == "exists":
            raise TypeError("bug in exists")
        return super().exists(keys)

    def get(self, keys, scatter):
        if self.op == "get":
            raise ValueError("bug in get")
        return super().get(keys, scatter)

    def put(self, keys, scatter):
        if self.op == "put":
            raise ValueError("bug in put")
        return super().put(keys, scatter)


def test_programming_errors_propagate_instead_of_marking_the_store_down(url):
    P = 4
    toks = tokens_of(5 * P, 52)
    _pool_with(url, P, toks).close()
    b = Device(P)
    cb = make(b, BuggyStore(open_store(url), "exists"))
    with pytest.raises(TypeError, match="bug in exists"):
        cb.match(toks)
    assert cb.stats()["store_available"] and cb.stats()["failures"] == {}
    cb = make(b, BuggyStore(open_store(url), "get"))
    m = cb.match(toks)
    slots = b.alloc(m.pool_len)
    with pytest.raises(ValueError, match="bug in get"):
        cb.load(m, slots)
    assert cb.stats()["store_available"] and cb.stats()["failures"] == {}
    assert b.freed == [] and cb.total_size == 0  # the caller keeps its slots
    with pytest.raises(ValueError, match="bug in get"):
        cb.load_layerwise(m, slots).finish()
    assert cb.stats()["failures"] == {} and b.freed == []
    # a writer-thread bug is raised by poll(); the pages are unpinned, not counted as a store failure
    dev = Device(P)
    c = make(dev, BuggyStore(open_store(url), "put"))
    t2 = tokens_of(3 * P, 53)
    s2 = dev.alloc(len(t2))
    c.write_back(t2, s2)
    with pytest.raises(ValueError, match="bug in put"):
        c.flush()
    assert c.stats()["failures"] == {} and c.evict(10**6) == 3 * P
    # a real store failure (connection lost) is still a miss with back-off
    down = ScriptedStore(open_store(url))
    cd = make(Device(P), down)
    down.down = True
    assert cd.match(toks).pool_len == 0 and cd.stats()["failures"] == {"exists": 1}


# ---- the last token is computed ------------------------------------------------------------

def test_exclude_last_leaves_a_token_to_compute(url):
    P = 4
    a = Device(P)
    c = make(a, url)
    toks = tokens_of(8 * P, 54)          # page aligned: a full match would leave nothing to prefill
    serve(c, a, toks)
    c.flush()
    m = c.match(toks)
    assert m.device_len == 8 * P
    m = c.match(toks, exclude_last=True)
    assert m.device_len == 7 * P and len(m.tokens) == 8 * P - 1
    longer = np.concatenate([toks, tokens_of(1, 55)])  # one more token: every page can be reused
    assert c.match(longer, exclude_last=True).device_len == 8 * P
    c.evict(10**6)
    b = Device(P)
    cb = make(b, url)
    m = cb.match(toks, exclude_last=True)
    assert (m.device_len, m.pool_len) == (0, 7 * P)
    slots = b.alloc(m.pool_len)
    assert cb.load(m, slots) == 7 * P and m.device_len == 7 * P
    assert cb.match(tokens_of(0, 1), exclude_last=True).device_len == 0  # empty prompt: nothing to match


def test_bad_input(url):
    a = Device(4)
    c = make(a, url)
    with pytest.raises(ConfigError):
        c.write_back(tokens_of(8, 1), np.arange(4), None)
    with pytest.raises(ConfigError):
        c.match(np.zeros((2, 4), np.int32))
    with pytest.raises(ConfigError):
        c.match(np.zeros(4, np.float32))
    with pytest.raises(ConfigError):
        CacheConfig(backpressure="sometimes")
    with pytest.raises(ConfigError, match="unknown"):
        CacheConfig.from_dict({"stroe": "shm://x"})


# ---- layer-wise loading -----------------------------------------------------------

@pytest.mark.parametrize("piecewise", [True, False])
def test_layerwise_load_equals_sync_load(url, piecewise):
    P = 4
    a, b, c = Device(P), Device(P), Device(P)
    ca = make(a, url)
    toks = tokens_of(9 * P, 21)
    serve(ca, a, toks)
    ca.flush()
    store_b = open_store(url) if piecewise else ScriptedStore(open_store(url))  # no open_read
    cb, cc = make(b, store_b), make(c, url)
    mb, mc = cb.match(toks), cc.match(toks)
    sb, sc = b.alloc(mb.pool_len), c.alloc(mc.pool_len)
    lw = cb.load_layerwise(mb, sb)
    for layer in range(LAYERS):
        assert lw.wait_layer(layer, timeout=30) == 9 * P
        # the layer is readable as soon as its completion fired
        np.testing.assert_array_equal(b.k[layer][sb], expected_kv(b, toks)[layer])
    assert lw.finish() == 9 * P == cc.load(mc, sc)
    for layer in range(LAYERS):
        np.testing.assert_array_equal(b.k[layer][sb], c.k[layer][sc])
        np.testing.assert_array_equal(b.v[layer][sb], c.v[layer][sc])
    assert mb.device_len == 9 * P and cb.match(toks).device_len == 9 * P


class GatedReads(Store):
    """A store whose piecewise reads after the first piece wait for ``gate``: a load
    that reports layer 0 only once every layer is in would wait forever."""

    def __init__(self, inner, free_pieces: int = 1):
        self.inner, self.gate, self.scheme = inner, threading.Event(), inner.scheme
        self.pieces, self.free_pieces = 0, free_pieces
        if not hasattr(inner, "open_read"):  # whole objects only: the cache must see that too
            self.open_read = None

    def open_read(self, keys, sizes):
        rd, store = self.inner.open_read(keys, sizes), self
        store.opened_on = threading.current_thread()

        class Reader:
            status = property(lambda _: rd.status)

            def read(self, scatter):
                if store.pieces >= store.free_pieces:
                    assert store.gate.wait(30), "the load waited for bytes held back until it reported"
                store.pieces += 1
                rd.read(scatter)

            def end(self):
                return rd.end()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                rd.end()
        return Reader()

    def exists(self, keys):
        return self.inner.exists(keys)

    def put(self, keys, scatter):
        return self.inner.put(keys, scatter)

    def get(self, keys, scatter):
        return self.inner.get(keys, scatter)

    def register(self, addr, length, memory=None):
        return self.inner.register(addr, length, memory)

    def remove(self, keys):
        return self.inner.remove(keys)

    def put_bytes(self, key, data):
        return self.inner.put_bytes(key, data)

    def get_bytes(self, key):
        return self.inner.get_bytes(key)

    def close(self):  # the cache closes its store: a Mooncake client left to the GC tears down mid-test
        self.inner.close()


@pytest.fixture(params=["shm", pytest.param("mooncake", marks=pytest.mark.mooncake)])
def piecewise_url(request, url):
    if request.param == "shm":
        yield url
        return
    from kvdirect.services import start_mooncake_master

    with start_mooncake_master(store_params=dict(segment="32MiB", buffer="16MiB", timeout=10)) as svc:
        yield svc.store_url


def test_layerwise_load_reports_a_layer_while_later_layers_are_still_in_the_pool(piecewise_url):
    """Overlap, shown without timing: the second piece (layer 1) is held back until the
    test has seen layer 0 complete, which a load of whole objects could never report."""
    P = 4
    a, b = Device(P), Device(P)
    ca = make(a, piecewise_url)
    toks = tokens_of(8 * P, 23)
    serve(ca, a, toks)
    ca.flush()
    gated = GatedReads(open_store(piecewise_url))
    cb = make(b, gated)
    m = cb.match(toks)
    slots = b.alloc(m.pool_len)
    lw = cb.load_layerwise(m, slots)
    assert lw.wait_layer(0, timeout=30) == 8 * P
    np.testing.assert_array_equal(b.k[0][slots], expected_kv(b, toks)[0])
    assert gated.pieces == 1 and np.all(b.k[LAYERS - 1][slots] == 0)  # the last layer is not in yet
    gated.gate.set()
    assert lw.finish() == 8 * P
    for layer in range(LAYERS):
        np.testing.assert_array_equal(b.k[layer][slots], expected_kv(b, toks)[layer])
    cb.close()
    ca.close()


def test_layerwise_load_is_pinned_before_any_byte_moves(piecewise_url):
    """``wait_pinned`` (what an engine waits for before promising the tokens) returns once
    the store holds the pages, while every read is still held back (the session opens on
    the caller's thread, so at once); a store that only gets whole objects pins them by
    reading them."""
    P = 4
    a, b = Device(P), Device(P)
    ca = make(a, piecewise_url)
    toks = tokens_of(8 * P, 24)
    serve(ca, a, toks)
    ca.flush()
    gated = GatedReads(open_store(piecewise_url), free_pieces=0)
    cb = make(b, gated)
    m = cb.match(toks)
    slots = b.alloc(m.pool_len)
    lw = cb.load_layerwise(m, slots)
    # the session opened on this (the engine's) thread: pinned already, no hand-off to wait for
    assert gated.opened_on is threading.current_thread()
    assert lw.wait_pinned(timeout=0) == 8 * P
    assert gated.pieces == 0 and np.all(b.k[0][slots] == 0)  # no layer has arrived
    with pytest.raises(TimeoutError):
        lw.wait_layer(0, timeout=0.05)
    gated.gate.set()
    assert lw.wait_layer(0, timeout=30) == 8 * P and lw.finish() == 8 * P
    np.testing.assert_array_equal(b.k[LAYERS - 1][slots], expected_kv(b, toks)[LAYERS - 1])
    # whole objects: pinned means read
    c = Device(P)
    cc = make(c, ScriptedStore(open_store(piecewise_url)))
    mc = cc.match(toks)
    sc = c.alloc(mc.pool_len)
    lc = cc.load_layerwise(mc, sc)
    assert lc.wait_pinned(timeout=30) == 8 * P
    np.testing.assert_array_equal(c.k[LAYERS - 1][sc], expected_kv(c, toks)[LAYERS - 1])
    assert lc.finish() == 8 * P
    for x in (cb, cc, ca):
        x.close()


def test_layerwise_load_whose_session_cannot_open_is_a_miss(piecewise_url):
    """The read session opens on the caller's thread: a store failure there is a miss (no
    page, no layer, the store backed off), not an exception out of the engine's call."""
    from kvdirect.errors import StoreError

    P = 4
    a, b = Device(P), Device(P)
    ca = make(a, piecewise_url)
    toks = tokens_of(4 * P, 25)
    serve(ca, a, toks)
    ca.flush()
    gated = GatedReads(open_store(piecewise_url), free_pieces=99)

    def refuse(keys, sizes):
        raise StoreError("get session: master unreachable")
    gated.open_read = refuse
    cb = make(b, gated)
    m = cb.match(toks)
    slots = b.alloc(m.pool_len)
    lw = cb.load_layerwise(m, slots)
    assert lw.wait_pinned(timeout=0) == 0 and lw.wait_layer(LAYERS - 1, timeout=0) == 0
    assert lw.finish() == 0 and np.all(b.k[0][slots] == 0)
    assert cb.stats()["failures"]["get"] == 1 and not cb._p.health.available()
    cb.close()
    ca.close()


@pytest.fixture
def mooncake_url():
    from kvdirect.services import start_mooncake_master

    with start_mooncake_master(store_params=dict(segment="32MiB", buffer="16MiB", timeout=10)) as svc:
        yield svc.store_url, svc


def _counted(cache):
    from kvdirect.stores._testing import CountingClient
    return CountingClient.install(cache._p.store)


def _pool_holding(url, P, pages, seed):
    """A writer cache that wrote ``pages`` pages of tokens to the pool at url, and a fresh reader."""
    a, b = Device(P), Device(P)
    ca, cb = make(a, url), make(b, url)
    toks = tokens_of(pages * P, seed)
    serve(ca, a, toks)
    ca.flush()
    return b, ca, cb, toks


@pytest.mark.mooncake
def test_a_held_match_loads_through_its_session_one_round_trip(mooncake_url):
    """match(hold=True) opens the read session in place of the existence query (it says
    which pages exist); the layer-wise load reads through it, narrowed to the pages it
    loads: one call to the master for match and load, reads counted for loaded pages only."""
    url, _ = mooncake_url
    P = 4
    b, ca, cb, toks = _pool_holding(url, P, 8, 61)
    calls = _counted(cb)
    half = np.concatenate([toks[: 4 * P], tokens_of(4 * P, 62)])
    m = cb.match(half, hold=True)
    assert m.pool_len == 4 * P and m._held is not None and len(m._held.keys) == 8
    slots = b.alloc(3 * P)  # the engine takes fewer pages than were found
    lw = cb.load_layerwise(m, slots)
    assert m._held is None and lw.wait_pinned(timeout=0) == 3 * P
    assert lw.finish() == 3 * P
    np.testing.assert_array_equal(b.k[LAYERS - 1][slots], expected_kv(b, toks[: 3 * P])[LAYERS - 1])
    assert calls.calls.count("batch_get_session_start") == 1 and "batch_is_exist" not in calls.calls
    st = cb._p.store.stats()
    assert (st["get_keys"], st["get_ok"]) == (3, 3) and not st["failed_by_status"]
    # without hold: the existence query, then the session
    c = Device(P)
    cc = make(c, url)
    calls_c = _counted(cc)
    mc = cc.match(half)
    assert mc._held is None
    assert cc.load_layerwise(mc, c.alloc(mc.pool_len)).finish() == 4 * P
    assert [n for n in calls_c.calls if n in ("batch_is_exist", "batch_get_session_start")] == [
        "batch_is_exist", "batch_get_session_start"]
    for x in (cb, cc, ca):
        x.close()


@pytest.mark.mooncake
def test_a_held_match_given_up_ends_its_session_at_once(mooncake_url):
    """A held match no load takes is released: its session ends before the call returns
    (Mooncake keeps one session per key and client, so an end arriving later would end the
    next load's session over the same pages), and it counts no reads."""
    url, _ = mooncake_url
    P = 4
    b, ca, cb, toks = _pool_holding(url, P, 6, 63)
    calls = _counted(cb)
    m = cb.match(toks, hold=True)
    assert m.pool_len == 6 * P
    cb.release(m)
    assert m._held is None and calls.calls[-1] == "batch_get_session_end"
    cb.release(m)  # twice: nothing left to end
    assert calls.calls.count("batch_get_session_end") == 1
    m2 = cb.match(toks, hold=True)
    slots = b.alloc(m2.pool_len)
    assert cb.load_layerwise(m2, slots).finish() == 6 * P
    np.testing.assert_array_equal(b.k[0][slots], expected_kv(b, toks)[0])
    st = cb._p.store.stats()
    assert (st["get_keys"], st["get_ok"]) == (6, 6) and not st["failed_by_status"]
    # a whole-object load of a held match gives the session up first
    c = Device(P)
    cc = make(c, url)
    calls_c = _counted(cc)
    mc = cc.match(toks, hold=True)
    assert cc.load(mc, c.alloc(mc.pool_len)) == 6 * P and mc._held is None
    first_get = next(i for i, n in enumerate(calls_c.calls) if n.startswith("batch_get_into"))
    assert calls_c.calls.index("batch_get_session_end") < first_get
    for x in (cb, cc, ca):
        x.close()


@pytest.mark.mooncake
def test_a_held_match_without_a_master_is_a_miss(mooncake_url):
    """The session cannot open (master gone): a miss and a store failure, as a failed
    existence query is; nothing held."""
    url, svc = mooncake_url
    P = 4
    b, ca, cb, toks = _pool_holding(url, P, 4, 64)
    svc.stop()
    m = cb.match(toks, hold=True)
    assert m.pool_len == 0 and m._held is None
    assert cb.stats()["failures"]["exists"] == 1 and not cb._p.health.available()
    # a master on the same ports again, so the clients close without waiting for Mooncake's RPC timeouts
    from kvdirect.services import start_mooncake_master
    with start_mooncake_master(rpc_port=svc.ports["rpc"], http_port=svc.ports["http"],
                               metrics_port=svc.ports["metrics"]):
        for x in (cb, ca):
            x.close()


def test_layerwise_load_stops_at_a_bad_page(url):
    P = 4
    a, b = Device(P), Device(P)
    ca, cb = make(a, url), make(b, url)
    toks = tokens_of(6 * P, 22)
    serve(ca, a, toks)
    ca.flush()
    m = cb.match(toks)
    from kvdirect import keys as K
    d = K.page_digests(toks, P, namespace_seed=K.namespace_seed())
    assert open_store(url).put_bytes(K.pool_keys(d, cb.fingerprint)[3], b"wrong size")
    slots = b.alloc(m.pool_len)
    lw = cb.load_layerwise(m, slots)
    assert lw.wait_pinned(timeout=30) == 3 * P  # the bad object is refused when the read opens
    assert lw.wait_layer(0, timeout=30) == 3 * P
    assert lw.finish() == 3 * P
    assert len(np.concatenate(b.freed)) == 3 * P and cb.total_size == 3 * P


def test_stats_and_prometheus(url):
    prom = pytest.importorskip("prometheus_client", reason="in the [metrics] extra")
    from kvdirect.metrics import register_prometheus
    P = 4
    a = Device(P)
    c = make(a, url)
    serve(c, a, tokens_of(5 * P, 30))
    c.flush()
    s = c.stats()
    assert s["stored_pages"] == 5 and s["store_ms"]["count"] == 1 and s["miss_tokens"] == 5 * P
    reg = prom.CollectorRegistry()
    register_prometheus(c, reg)
    text = prom.generate_latest(reg).decode()
    assert "kvdirect_stored_pages_total 5.0" in text
    assert 'kvdirect_store_ms{quantile="p50"}' in text


@pytest.mark.parametrize("staging_pages", [1, 3, 64])
def test_staged_path_through_a_bounded_host_buffer(url, staging_pages):
    """Stores that cannot address device memory go through bounded host staging buffers."""
    P = 4
    a, b = Device(P), Device(P)
    page_bytes = a.layout.page_bytes
    ca = make(a, url, stage=True, staging_bytes=staging_pages * page_bytes)
    toks = tokens_of(7 * P, 40)
    serve(ca, a, toks)
    ca.flush()
    assert ca.stats()["stored_pages"] == 7
    st = ca.stats()
    assert st["staging_buffers"] == 1 and st["retired_staging_buffers"] == 0  # one writer thread, reused
    assert all(buf.nbytes == staging_pages * page_bytes for buf in ca._p.transfer.pool.buffers)
    cb = make(b, url, stage=True, staging_bytes=staging_pages * page_bytes)
    m = cb.match(toks)
    slots = b.alloc(m.pool_len)
    assert cb.load(m, slots) == 7 * P
    exp = expected_kv(b, toks)
    for layer in range(LAYERS):
        np.testing.assert_array_equal(b.k[layer][slots], exp[layer])
        np.testing.assert_array_equal(b.v[layer][slots], -exp[layer])


def test_staged_load_stops_at_the_first_failed_page(url):
    P = 4
    a, b = Device(P), Device(P)
    ca = make(a, url)
    toks = tokens_of(6 * P, 41)
    serve(ca, a, toks)
    ca.flush()
    store = ScriptedStore(open_store(url))
    store.fail_get_after = 1  # within each chunk of 2 pages, the 2nd fails
    cb = make(b, store, stage=True, staging_bytes=2 * b.layout.page_bytes)
    m = cb.match(toks)
    slots = b.alloc(m.pool_len)
    assert cb.load(m, slots) == P
    np.testing.assert_array_equal(b.k[0][slots[:P]], expected_kv(b, toks)[0][:P])


@pytest.mark.parametrize("local", [True, False])
def test_existence_query_on_a_local_pool_probes_the_first_page(url, local):
    """A local pool (shm) is asked for the first unknown page alone: a miss hashes one page
    and sends one key. A remote-style store gets one batched query. Hits load either way."""
    P = 4
    a, b = Device(P), Device(P)
    writer = make(a, url)
    toks = tokens_of(10 * P, 11)
    serve(writer, a, toks[:6 * P])
    writer.flush()
    store = open_store(url)
    if not local:
        store = ScriptedStore(store)  # a Store whose lookups are not declared local
    assert store.local_lookup is local
    c = make(b, store)
    miss = c.match(tokens_of(10 * P, 12))
    assert (miss.device_len, miss.pool_len) == (0, 0)
    assert c.stats()["query_keys"] == (1 if local else 10)
    assert miss._digests.shape[0] == (1 if local else 10)  # pages hashed on the miss
    hit = c.match(toks)  # 6 of its 10 pages are in the pool
    assert (hit.device_len, hit.pool_len) == (0, 6 * P)
    assert c.stats()["query_keys"] == (1 + 1 + 10 if local else 20)
    slots = b.alloc(hit.pool_len)
    assert c.load(hit, slots) == 6 * P
    np.testing.assert_array_equal(b.k[2][slots], expected_kv(b, toks[:6 * P])[2])
    c.close(), writer.close()
