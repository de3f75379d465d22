"""The store contract (kvdirect.stores.base), checked on every store.

Stores: ``shm`` (the embedded pool), ``mooncake`` (a real mooncake_master on loopback and one
client per module, emptied after each test) and ``memcache``
(MemcacheStore over the signature-enforcing double of memcache_hybrid, with a capacity).

Failure reporting is checked on each store by making its pool unable to answer: Mooncake's master
is killed; MemCache's double loses its MetaService; the embedded shm pool has no service to lose,
so there the fault-injection store (FlakyStore, which the reliability suite relies on) stands in.
Calls past their deadline are checked on the stores that have one (Mooncake, MemCache) with a
client whose calls hang until released.

Add a store by adding a factory to STORE_FACTORIES (and FAULTS): a context manager yielding an
open, empty store with room for a few MiB that is cleaned up afterwards.
"""
from __future__ import annotations

import contextlib
import os
import threading
import uuid

import numpy as np
import pytest

from kvdirect.errors import ConfigError, StoreError
from kvdirect.stores import ScatterList, Store, open_store
from kvdirect.stores.base import NOT_FOUND, OK

POOL = 8 << 20        # room in every test pool (the Mooncake segment is the smallest it accepts: 16 MiB)
TOO_BIG = 64 << 20    # larger than any test pool and any client buffer


# ----------------------------------------------------------------------------- stores


@contextlib.contextmanager
def _shm_store(request):
    name = f"contract-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    s = open_store(f"shm://{name}?size={POOL}&block=4KiB")
    try:
        yield s
    finally:
        s.close()
        from kvdirect.stores.shm import destroy_pool

        destroy_pool(name, missing_ok=True)


@pytest.fixture(scope="module")
def mooncake_client():
    """One master and one client for the module (closing a Mooncake client takes ~2 s)."""
    from kvdirect.services import start_mooncake_master

    with start_mooncake_master(store_params=dict(segment="16MiB", buffer="16MiB", timeout=5)) as svc:
        with open_store(svc.store_url) as s:
            yield s


@contextlib.contextmanager
def _mooncake_store(request):
    s = request.getfixturevalue("mooncake_client")
    try:
        yield s
    finally:  # an empty pool for the next test; force: objects read recently are under a lease
        assert s._client.remove_all(True) >= 0


def _memcache(fake, **kw):
    from kvdirect.stores.memcache import MemcacheStore

    return MemcacheStore({"meta_service_url": "tcp://127.0.0.1:1", "protocol": "host_shm"}, module=fake,
                         check=False, memory="host", **kw)


@contextlib.contextmanager
def _memcache_store(request):
    from kvdirect.stores._testing import FakeMemcacheModule

    with _memcache(FakeMemcacheModule(capacity=POOL)) as s:
        yield s


STORE_FACTORIES = {"shm": _shm_store, "mooncake": _mooncake_store, "memcache": _memcache_store}
STORES = ["shm", pytest.param("mooncake", marks=pytest.mark.mooncake), "memcache"]


@pytest.fixture(params=STORES)
def store(request):
    with STORE_FACTORIES[request.param](request) as s:
        yield s


# ----------------------------------------------------------------------------- memory


class Arena:
    """Host memory registered with the store once (the contract: register per region, never per call);
    pages and destinations are carved out of it."""

    def __init__(self, store: Store, nbytes: int = 4 << 20):
        self.mem = np.zeros(nbytes, np.uint8)
        self.off = 0
        store.register(self.mem.ctypes.data, self.mem.nbytes, memory="host")

    def take(self, n: int) -> np.ndarray:
        assert self.off + n <= self.mem.size, "test arena too small"
        a = self.mem[self.off:self.off + n]
        self.off += (n + 63) // 64 * 64
        return a


@pytest.fixture
def arena(store):
    return Arena(store)


def _scatter(rows) -> ScatterList:
    return ScatterList(np.array([[a.ctypes.data for a in row] for row in rows], dtype=np.uint64),
                       np.array([[a.nbytes for a in row] for row in rows], dtype=np.uint64))


def pages(arena, n, seg_sizes, seed=0):
    """n pages, each the concatenation of segments of seg_sizes bytes, scattered over the arena."""
    rng = np.random.default_rng(seed)
    segs = []
    for _ in range(n):
        row = []
        for sz in seg_sizes:
            a = arena.take(sz)
            a[:] = rng.integers(0, 256, size=sz, dtype=np.uint8)
            row.append(a)
        segs.append(row)
    return segs, _scatter(segs)


def empty_like(arena, segs, fill=0):
    out = []
    for row in segs:
        dst = [arena.take(a.nbytes) for a in row]
        for d in dst:
            d[:] = fill
        out.append(dst)
    return out, _scatter(out)


def assert_same(segs, out):
    for a, b in zip(segs, out):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- answers


def test_lists_and_reads_back_what_it_holds(store, request):
    """The operator interface (list_objects / check_objects, what `kvdirect pool audit` uses): a store that
    can list lists exactly its objects and reads each whole; only a store that keeps checksums vouches for
    the content. One that cannot list says so (MemCache without its MetaService's HTTP address)."""
    assert isinstance(store, Store) and store.scheme == request.node.callspec.params["store"]
    objs = {f"obj{i}": bytes([i]) * (100 + 1000 * i) for i in range(3)}
    for k, v in objs.items():
        assert store.put_bytes(k, v)
    if store.scheme == "memcache":
        with pytest.raises(StoreError, match="cannot list keys: give admin="):
            list(store.list_objects())
    else:
        listed = dict(store.list_objects())
        assert set(listed) == set(objs)
        assert all(listed[k] in (None, len(v)) for k, v in objs.items())  # sizes where the listing has them
    chk = store.check_objects([*objs, "absent"])
    assert chk.status.tolist() == [OK, OK, OK, NOT_FOUND]
    assert chk.sizes.tolist()[:3] == [len(v) for v in objs.values()]
    assert chk.checked.tolist() == [store.scheme == "shm"] * 3 + [False]


def test_put_ok_means_stored_and_get_delivers_every_byte(store, arena):
    keys = [f"k{i}" for i in range(5)]
    segs, sl = pages(arena, 5, [1000, 3000, 17])
    st = store.put(keys, sl)
    assert st.dtype == np.int32 and st.shape == (5,)
    # a successful put is 0 (OK), not a truthy "success" flag (the reference design inverted this)
    assert (st == OK).all(), st
    assert store.exists(keys).all()
    out, osl = empty_like(arena, segs)
    st = store.get(keys, osl)
    assert st.dtype == np.int32 and (st == OK).all(), st
    assert_same(segs, out)


def test_statuses_are_per_key(store, arena):
    """One missing key fails that key only; the others are delivered whole."""
    segs, sl = pages(arena, 3, [700, 300], seed=1)
    assert (store.put(["p0", "p2"], sl.take([0, 2])) == OK).all()
    out, osl = empty_like(arena, segs, fill=7)
    st = store.get(["p0", "p1", "p2"], osl)
    assert st[0] == OK and st[1] != OK and st[2] == OK, st
    assert_same([segs[0], segs[2]], [out[0], out[2]])


def test_failed_put_is_nonzero_and_absent(store, arena):
    huge = np.empty(TOO_BIG, dtype=np.uint8)  # larger than any test pool (np.empty: no pages touched)
    store.register(huge.ctypes.data, huge.nbytes, memory="host")
    small = arena.take(100)
    small[:] = 1
    sl = ScatterList(np.array([[huge.ctypes.data], [small.ctypes.data]], dtype=np.uint64),
                     np.array([[huge.nbytes], [small.nbytes]], dtype=np.uint64))
    st = store.put(["too-big", "fine"], sl)
    assert st[0] != OK and st[1] == OK, st
    assert store.exists(["too-big", "fine"]).tolist() == [False, True]


def test_missing_key_is_a_miss_and_leaves_destination_alone(store, arena):
    out = arena.take(256)
    out[:] = 7
    st = store.get(["absent"], _scatter([[out]]))
    assert st[0] != OK
    assert (out == 7).all()
    assert store.get_bytes("absent") is None


def test_get_into_wrong_total_size_is_never_ok(store, arena):
    assert store.put_bytes("k", bytes(range(200)))
    for n in (199, 201):
        st = store.get(["k"], _scatter([[arena.take(n)]]))
        assert st[0] != OK


def test_exists_prefix_stops_at_first_miss(store):
    for k in ("a", "b", "d"):
        assert store.put_bytes(k, k.encode() * 10)
    assert store.exists_prefix(["a", "b", "c", "d"]) == 2
    assert store.exists_prefix(["a", "b", "d"]) == 3
    assert store.exists_prefix(["x", "a"]) == 0
    assert store.exists_prefix([]) == 0


def test_bytes_round_trip(store):
    assert store.put_bytes("key/1", b"first")
    assert store.get_bytes("key/1") == b"first"
    assert store.put_bytes("key/2", np.arange(50, dtype=np.uint8))  # any contiguous buffer
    assert store.get_bytes("key/2") == bytes(range(50))


def test_putting_a_held_key_succeeds_and_readers_see_one_object_whole(store):
    assert store.put_bytes("same", b"first")
    assert store.put_bytes("same", b"second, longer value")  # the pool holds the key: success
    assert store.get_bytes("same") in (b"first", b"second, longer value")


def test_remove_counts_present_keys(store):
    assert store.put_bytes("r1", b"one") and store.put_bytes("r2", b"two")
    assert store.remove(["r1", "nope", "r2"]) == 2
    assert not store.exists(["r1", "r2"]).any()
    assert store.get_bytes("r1") is None
    assert store.remove(["r1", "r2"]) == 0  # absent keys are no failure
    assert store.remove([]) == 0


def test_put_bytes_without_room_is_false_and_absent(store):
    assert store.put_bytes("too-big", bytes(TOO_BIG)) is False
    assert not store.exists(["too-big"])[0]
    assert store.get_bytes("too-big") is None


def test_bad_input_raises_config_error(store):
    with pytest.raises(ConfigError):
        store.put_bytes("x" * 256, b"v")
    with pytest.raises(ConfigError):
        store.exists([""])
    with pytest.raises(ConfigError):
        store.exists([b"bytes-key"])
    with pytest.raises(ConfigError, match="at least 1 byte"):
        store.put_bytes("empty", b"")
    with pytest.raises(ConfigError):
        store.remove([""])
    with pytest.raises(ConfigError):
        store.get_bytes("")
    with pytest.raises(ConfigError, match="1..255 bytes, got 256"):  # the limit is bytes, not characters
        store.exists(["fine", "\u00e9" * 128])
    with pytest.raises(ConfigError, match="must be str"):  # one bad key among good ones is named
        store.exists(["fine", 7, "also-fine"])
    assert not store.exists(["\u00e9" * 127]).any()  # 254 bytes: a valid key, absent
    assert store.put_bytes("x" * 255, b"v")  # the limit itself is fine
    assert store.get_bytes("x" * 255) == b"v"


def test_scatter_rows_must_match_keys(store, arena):
    _, sl = pages(arena, 2, [10])
    with pytest.raises(ConfigError):
        store.put(["only-one"], sl)


def test_piecewise_reads_deliver_objects_piece_by_piece(store, arena):
    """``open_read`` (stores with ranged reads: layer-by-layer loads): each ``read`` delivers
    the next bytes of the first keys; ``end`` is OK only for objects read whole; an absent
    key, a smaller object under a key and a key left half read are never OK."""
    if not hasattr(store, "open_read"):
        pytest.skip(f"{store.scheme}:// reads whole objects only (no open_read)")
    keys = [f"pw{i}" for i in range(3)]
    segs, sl = pages(arena, 3, [1000, 3000])
    assert (store.put(keys, sl) == OK).all()
    assert store.put_bytes("pw-small", b"x" * 1000)
    out, _ = empty_like(arena, segs, fill=7)
    with store.open_read(keys + ["pw-small", "pw-absent"], np.full(5, 4000, np.uint64)) as rd:
        assert list(rd.status[:3]) == [OK] * 3 and rd.status[4] != OK
        rd.read(_scatter([[row[0]] for row in out]))        # the first 1000 bytes of keys 0..2
        rd.read(_scatter([[row[1]] for row in out[:2]]))    # the next 3000 bytes of keys 0, 1
        assert (rd.status[:3] == OK).all()
        final = rd.end()
    assert list(final[:2]) == [OK] * 2
    assert (final[2:] != OK).all()  # half read, smaller object, absent
    assert_same(segs[:2], out[:2])
    np.testing.assert_array_equal(out[2][0], segs[2][0])  # key 2's first piece did arrive
    assert (out[2][1] == 7).all()
    # the smaller object: its first piece fits, its second runs past its end (or it fails at once)
    a, b = arena.take(1000), arena.take(3000)
    with store.open_read(["pw-small"], np.array([4000], np.uint64)) as rd:
        if rd.status[0] == OK:
            rd.read(_scatter([[a]]))
            rd.read(_scatter([[b]]))
            assert rd.status[0] != OK
    assert rd.end()[0] != OK


def test_stats_counts_hits_and_misses(store):
    s0 = store.stats()
    store.put_bytes("h", b"1")
    store.get_bytes("h")
    store.get_bytes("m")
    s1 = store.stats()
    if "hits" in s0:
        assert s1["hits"] - s0["hits"] == 1
        assert s1["misses"] - s0["misses"] == 1


# ----------------------------------------------------------------------------- failure reporting


@contextlib.contextmanager
def _shm_unreachable(request):
    """The embedded pool cannot become unreachable: FlakyStore(down) over it stands in."""
    from kvdirect.stores._testing import FlakyStore

    with _shm_store(request) as inner:
        flaky = FlakyStore(inner)
        yield flaky, lambda: setattr(flaky, "down", True), lambda: setattr(flaky, "down", False)


@contextlib.contextmanager
def _mooncake_unreachable(request):
    """Its own master, SIGKILLed, later restarted on the same ports (its objects are then gone)."""
    from kvdirect.services import start_mooncake_master

    svc = start_mooncake_master(store_params=dict(segment="16MiB", buffer="16MiB", timeout=1))
    ports = dict(rpc_port=svc.ports["rpc"], http_port=svc.ports["http"], metrics_port=svc.ports["metrics"])
    again = []

    def restart():
        svc.stop()
        again.append(start_mooncake_master(**ports))
        return s.quiesce(30)

    try:
        with open_store(svc.store_url) as s:
            yield s, svc.kill, restart
    finally:
        for m in (svc, *again):
            m.stop()


@contextlib.contextmanager
def _memcache_unreachable(request):
    from kvdirect.stores._testing import FakeMemcacheModule

    fake = FakeMemcacheModule(capacity=POOL)
    with _memcache(fake) as s:
        yield s, lambda: setattr(fake, "meta_down", True), lambda: setattr(fake, "meta_down", False)


FAULTS = {"shm": _shm_unreachable, "mooncake": _mooncake_unreachable, "memcache": _memcache_unreachable}


def _assert_every_call_reports_failure(s: Store, arena: Arena, stored_key: str, stored_obj: str) -> None:
    """The pool cannot answer: no call may pass a guess off as an answer."""
    segs, sl = pages(arena, 1, [512, 512], seed=5)
    with pytest.raises(StoreError):
        s.exists([stored_key, "never-stored"])  # not "absent": unknown
    with pytest.raises(StoreError):
        s.exists_prefix([stored_key])
    st = s.put(["new-page"], sl)
    assert st.dtype == np.int32 and st.shape == (1,) and st[0] != OK, st
    _, osl = empty_like(arena, segs)
    st = s.get([stored_key, "never-stored"], osl.take([0, 0]))
    assert st.shape == (2,) and (st != OK).all(), st
    with pytest.raises(StoreError):
        s.remove([stored_key])  # not "0 removed"
    with pytest.raises(StoreError):
        s.put_bytes("new-object", b"payload")
    with pytest.raises(StoreError):
        s.get_bytes(stored_obj)  # not None: the object may well be there
    with pytest.raises(StoreError):
        s.get_bytes("never-stored")


@pytest.mark.parametrize("kind", STORES)
def test_unreachable_pool_reports_every_failure(kind, request):
    with FAULTS[kind](request) as (s, cut, restore):
        arena = Arena(s)
        segs, sl = pages(arena, 1, [512, 512], seed=4)
        assert s.put(["kept-page"], sl).tolist() == [OK]
        assert s.put_bytes("kept-object", b"still here?")
        cut()
        _assert_every_call_reports_failure(s, arena, "kept-page", "kept-object")
        restore()  # the pool is back: the same store answers again (a restarted master has lost its objects)
        assert s.exists(["never-stored"]).tolist() == [False]
        assert s.get_bytes("never-stored") is None


class _Hanging:
    """Wraps a real client: every call blocks until released (a hung transport or service)."""

    def __init__(self, real):
        self.real, self.release = real, threading.Event()

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if not callable(fn):
            return fn

        def hung(*a, **kw):
            self.release.wait(60)
            return fn(*a, **kw)
        return hung


@contextlib.contextmanager
def _mooncake_hanging(request):
    from kvdirect.stores.mooncake import MooncakeStore

    with _mooncake_store(request) as real:
        hanging = _Hanging(real._client)
        s = MooncakeStore(real.master, real.metadata, client=hanging, timeout_s=0.3)
        try:
            yield real, s, hanging
        finally:
            hanging.release.set()
            s.quiesce(30)
            s.close()


@contextlib.contextmanager
def _memcache_hanging(request):
    from kvdirect.stores._testing import FakeMemcacheModule

    fake = FakeMemcacheModule(capacity=POOL)
    with _memcache(fake) as real:
        hanging = _Hanging(fake.clients[0])
        s = _memcache(fake, client=hanging, timeout_s=0.3)
        try:
            yield real, s, hanging
        finally:
            hanging.release.set()
            s.quiesce(30)
            s.close()


HANGS = {"mooncake": _mooncake_hanging, "memcache": _memcache_hanging}


@pytest.mark.parametrize("kind", [pytest.param("mooncake", marks=pytest.mark.mooncake), "memcache"])
def test_calls_past_their_deadline_report_failure(kind, request):
    """Every call is bounded: past the deadline (and while stuck calls hold the workers) each call
    reports failure; once the client returns, the same store answers again."""
    with HANGS[kind](request) as (real, s, hanging):
        arena = Arena(real)  # registered with the client both stores share
        segs, sl = pages(arena, 1, [256, 256], seed=6)
        assert real.put(["kept-page"], sl).tolist() == [OK]
        assert real.put_bytes("kept-object", b"v")
        _assert_every_call_reports_failure(s, arena, "kept-page", "kept-object")
        assert s.stats()["timeouts"] >= 1
        hanging.release.set()
        assert s.quiesce(30)
        assert s.exists(["kept-page", "never-stored"]).tolist() == [True, False]
        assert s.get_bytes("kept-object") == b"v"
