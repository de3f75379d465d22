"""The store contract (kvdirect.stores.base), checked on every store.

Add a store by adding a factory to STORE_FACTORIES: a context manager yielding
an open, empty store with room for a few MiB that is cleaned up afterwards.
"""
from __future__ import annotations

import contextlib
import os
import uuid

import numpy as np
import pytest

from kvdirect.errors import ConfigError
from kvdirect.stores import ScatterList, Store, open_store
from kvdirect.stores.base import OK


@contextlib.contextmanager
def _shm_store():
    name = f"contract-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    s = open_store(f"shm://{name}?size=8MiB&block=4KiB")
    try:
        yield s
    finally:
        s.close()
        from kvdirect.stores.shm import destroy_pool

        destroy_pool(name, missing_ok=True)


STORE_FACTORIES = {"shm": _shm_store}


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store(request):
    with STORE_FACTORIES[request.param]() as s:
        yield s


def pages(n, seg_sizes, seed=0):
    """n pages, each the concatenation of segments of seg_sizes bytes, in separate arrays."""
    rng = np.random.default_rng(seed)
    segs = [[rng.integers(0, 256, size=sz, dtype=np.uint8) for sz in seg_sizes] for _ in range(n)]
    addrs = np.array([[a.ctypes.data for a in row] for row in segs], dtype=np.uint64)
    sizes = np.array([[a.nbytes for a in row] for row in segs], dtype=np.uint64)
    return segs, ScatterList(addrs, sizes)


def empty_like(segs):
    out = [[np.zeros_like(a) for a in row] for row in segs]
    addrs = np.array([[a.ctypes.data for a in row] for row in out], dtype=np.uint64)
    sizes = np.array([[a.nbytes for a in row] for row in out], dtype=np.uint64)
    return out, ScatterList(addrs, sizes)


def test_is_a_store(store):
    assert isinstance(store, Store)
    assert store.scheme


def test_put_ok_means_stored_and_get_delivers_every_byte(store):
    keys = [f"k{i}" for i in range(5)]
    segs, sl = pages(5, [1000, 3000, 17])
    st = store.put(keys, sl)
    assert st.dtype == np.int32 and st.shape == (5,)
    # a successful put is 0 (OK), not a truthy "success" flag (the reference design inverted this)
    assert (st == OK).all(), st
    assert store.exists(keys).all()
    out, osl = empty_like(segs)
    st = store.get(keys, osl)
    assert (st == OK).all(), st
    for a, b in zip(segs, out):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_failed_put_is_nonzero_and_absent(store):
    huge = np.zeros(64 << 20, dtype=np.uint8)  # larger than any test pool
    small = np.ones(100, dtype=np.uint8)
    sl = ScatterList(np.array([[huge.ctypes.data], [small.ctypes.data]], dtype=np.uint64),
                     np.array([[huge.nbytes], [small.nbytes]], dtype=np.uint64))
    st = store.put(["too-big", "fine"], sl)
    assert st[0] != OK and st[1] == OK, st
    assert store.exists(["too-big", "fine"]).tolist() == [False, True]


def test_missing_key_is_a_miss_and_leaves_destination_alone(store):
    out = np.full(256, 7, dtype=np.uint8)
    st = store.get(["absent"], ScatterList(np.array([[out.ctypes.data]], dtype=np.uint64),
                                           np.array([[256]], dtype=np.uint64)))
    assert st[0] != OK
    assert (out == 7).all()
    assert store.get_bytes("absent") is None


def test_get_into_wrong_total_size_is_never_ok(store):
    assert store.put_bytes("k", bytes(range(200)))
    for n in (199, 201):
        out = np.zeros(n, dtype=np.uint8)
        st = store.get(["k"], ScatterList(np.array([[out.ctypes.data]], dtype=np.uint64),
                                          np.array([[n]], dtype=np.uint64)))
        assert st[0] != OK


def test_exists_prefix_stops_at_first_miss(store):
    for k in ("a", "b", "d"):
        assert store.put_bytes(k, k.encode() * 10)
    assert store.exists_prefix(["a", "b", "c", "d"]) == 2
    assert store.exists_prefix(["a", "b", "d"]) == 3
    assert store.exists_prefix(["x", "a"]) == 0
    assert store.exists_prefix([]) == 0


def test_bytes_roundtrip_overwrite_and_remove(store):
    assert store.put_bytes("key/1", b"first")
    assert store.get_bytes("key/1") == b"first"
    assert store.put_bytes("key/1", b"second, longer value")
    assert store.get_bytes("key/1") == b"second, longer value"
    assert store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    assert store.remove(["key/1", "nope", "empty"]) == 2
    assert store.get_bytes("key/1") is None
    assert not store.exists(["key/1", "empty"]).any()


def test_bad_keys_raise_config_error(store):
    with pytest.raises(ConfigError):
        store.put_bytes("x" * 256, b"v")
    with pytest.raises(ConfigError):
        store.exists([""])
    with pytest.raises(ConfigError):
        store.exists([b"bytes-key"])
    assert store.put_bytes("x" * 255, b"v")  # the limit itself is fine
    assert store.get_bytes("x" * 255) == b"v"


def test_scatter_rows_must_match_keys(store):
    _, sl = pages(2, [10])
    with pytest.raises(ConfigError):
        store.put(["only-one"], sl)


def test_stats_counts_hits_and_misses(store):
    s0 = store.stats()
    store.put_bytes("h", b"1")
    store.get_bytes("h")
    store.get_bytes("m")
    s1 = store.stats()
    if "hits" in s0:
        assert s1["hits"] - s0["hits"] == 1
        assert s1["misses"] - s0["misses"] == 1
