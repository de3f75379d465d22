"""The embedded shm pool: file safety, header checks, LRU/pins, checksums,
atomicity across processes and recovery from processes killed with SIGKILL."""
from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import threading
import time
import uuid

import numpy as np
import pytest

from kvd_testutil import run_bounded, wait_for_file

from kvdirect import _core
from kvdirect.errors import ConfigError, StoreError
from kvdirect.stores import ScatterList, open_store
from kvdirect.stores.base import BUSY, CORRUPT, INVALID_ARGUMENT, NO_SPACE, NOT_FOUND, OK, TOO_LARGE
from kvdirect.stores.shm import ShmStore, destroy_pool, pool_path

CTX = multiprocessing.get_context("fork")


@pytest.fixture
def pool_name():
    name = f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    destroy_pool(name, missing_ok=True)


def sl_of(*arrays) -> ScatterList:
    """One key per array, one segment each. A scatter list holds raw addresses, so
    it keeps the arrays alive here (temporaries would be freed before the call)."""
    sl = ScatterList(np.array([[a.ctypes.data] for a in arrays], dtype=np.uint64),
                     np.array([[a.nbytes] for a in arrays], dtype=np.uint64))
    object.__setattr__(sl, "_keep", arrays)
    return sl


# ---------------------------------------------------------------------------
# URL, file and header


def test_url_keeps_name_case_and_params(pool_name):
    name = pool_name + "-MiXed"
    try:
        with open_store(f"shm://{name}?size=4MiB&checksum=off&block=8KiB") as s:
            assert isinstance(s, ShmStore) and s.name == name and s.created
            assert s.path == f"/dev/shm/kvdirect-{name}" and os.path.exists(s.path)
            st = s.stats()
            assert st["size"] == 4 << 20 and st["block_size"] == 8 << 10 and st["checksum"] is False
    finally:
        destroy_pool(name, missing_ok=True)


@pytest.mark.parametrize("url", ["shm://x?size=1MiB&colour=red", "shm://x?checksum=maybe", "shm://x?create=sometimes",
                                 "shm://bad name?size=1MiB", "shm://?size=1MiB", "shm://.hidden",
                                 "shm://x?size=lots", "shm://x?block=3000&size=1MiB"])
def test_bad_urls_are_config_errors(url):
    with pytest.raises(ConfigError):
        open_store(url)
    assert not os.path.exists("/dev/shm/kvdirect-x")


def test_too_small_size_is_config_error(pool_name):
    with pytest.raises(ConfigError, match="too small"):
        open_store(f"shm://{pool_name}?size=16KiB")
    assert not os.path.exists(pool_path(pool_name))


def test_create_no_and_create_yes(pool_name):
    with pytest.raises(StoreError, match="kvdirect pool create"):
        open_store(f"shm://{pool_name}?create=no")
    with open_store(f"shm://{pool_name}?size=2MiB&create=yes"):
        pass
    with pytest.raises(ConfigError, match="already exists"):
        open_store(f"shm://{pool_name}?size=2MiB&create=yes")
    with open_store(f"shm://{pool_name}?create=no") as s:
        assert not s.created


def test_file_is_0600_even_with_open_umask(pool_name):
    old = os.umask(0)
    try:
        with open_store(f"shm://{pool_name}?size=2MiB") as s:
            st = os.stat(s.path)
    finally:
        os.umask(old)
    assert st.st_mode & 0o777 == 0o600
    assert st.st_uid == os.geteuid()


def test_existing_pool_with_other_size_is_used_and_reported(pool_name):
    with open_store(f"shm://{pool_name}?size=2MiB") as a:
        a.put_bytes("kept", b"v")
        with pytest.warns(UserWarning, match="already exists"):
            b = open_store(f"shm://{pool_name}?size=4MiB")
        with b:
            st = b.stats()
            assert st["size"] == 2 << 20 and st["size_requested"] == 4 << 20
            assert b.get_bytes("kept") == b"v"


def test_group_writable_file_is_refused(pool_name):
    with open_store(f"shm://{pool_name}?size=2MiB") as s:
        path = s.path
    os.chmod(path, 0o620)
    with pytest.raises(StoreError, match="writable"):
        open_store(f"shm://{pool_name}")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_file_of_another_user_is_refused(pool_name):
    with open_store(f"shm://{pool_name}?size=2MiB") as s:
        path = s.path
    os.chown(path, 65534, 65534)
    # root could open it anyway: the pool itself must refuse a file owned by someone else
    with pytest.raises(StoreError, match="owned by uid 65534"):
        open_store(f"shm://{pool_name}")


@pytest.mark.parametrize("damage,match", [
    (lambda p: _poke(p, 0, b"XXXXXXXX"), "bad magic"),
    (lambda p: _poke(p, 8, struct.pack("<I", 99)), "format v99"),
    (lambda p: os.truncate(p, 1 << 20), "truncated"),
    (lambda p: os.truncate(p, 100), "truncated"),
    (lambda p: _poke(p, 24, struct.pack("<Q", 3 << 20)), "bytes but its header says"),
    (lambda p: _poke(p, 32, struct.pack("<Q", 8192)), "inconsistent"),
    (lambda p: _poke(p, 0, bytes(8)), "never finished initialising"),
])
def test_damaged_header_gives_clear_error(pool_name, damage, match):
    with open_store(f"shm://{pool_name}?size=2MiB") as s:
        s.put_bytes("k", b"v")
        path = s.path
    damage(path)
    with pytest.raises(StoreError, match=match) as ei:
        open_store(f"shm://{pool_name}?size=2MiB")
    assert f"kvdirect pool destroy {pool_name}" in str(ei.value)
    destroy_pool(pool_name)
    with open_store(f"shm://{pool_name}?size=2MiB") as s:  # recreated as the message says
        assert s.created and s.get_bytes("k") is None


def _poke(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


# ---------------------------------------------------------------------------
# statuses, checksums, LRU, pins


def test_status_codes(pool_name):
    s = open_store(f"shm://{pool_name}?size=1MiB&block=4KiB")
    try:
        a = np.arange(10000, dtype=np.uint8)
        big = np.zeros(4 << 20, dtype=np.uint8)
        st = s.put(["a", "big"], sl_of(a, big))
        assert st.tolist() == [OK, TOO_LARGE]
        assert s.stats()["put_failures"] == 1 and s.stats()["puts"] == 1
        out = np.zeros(10000, dtype=np.uint8)
        short = np.zeros(9999, dtype=np.uint8)
        st = s.get(["a", "missing", "a"], sl_of(out, np.zeros(5, np.uint8), short))
        assert st.tolist() == [OK, NOT_FOUND, INVALID_ARGUMENT]
        np.testing.assert_array_equal(out, a)
        assert not short.any()  # a size mismatch copies nothing
    finally:
        s.destroy()


def test_segments_of_odd_sizes_roundtrip_through_other_segmentation(pool_name):
    """Put and get cut the object differently; the streamed checksum must agree."""
    with open_store(f"shm://{pool_name}?size=2MiB&block=4KiB") as s:
        rng = np.random.default_rng(1)
        data = rng.integers(0, 256, 1 + 31 + 33 + 4097 + 5 + 8192, dtype=np.uint8)
        cuts_in = np.cumsum([0, 1, 31, 33, 4097, 5, 8192])
        cuts_out = np.cumsum([0, 4096, 7, 25, 4100, 4130, 1])
        assert cuts_in[-1] == cuts_out[-1] == data.size
        def sl(buf, cuts):
            return ScatterList(np.array([[buf.ctypes.data + int(c) for c in cuts[:-1]]], dtype=np.uint64),
                               np.diff(cuts).astype(np.uint64).reshape(1, -1))
        assert s.put(["odd"], sl(data, cuts_in))[0] == OK
        out = np.zeros_like(data)
        assert s.get(["odd"], sl(out, cuts_out))[0] == OK
        np.testing.assert_array_equal(out, data)
        assert s.get_bytes("odd") == data.tobytes()


def test_checksum_function_sensitivity():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, 4096, dtype=np.uint8)
    h = _core.shm_checksum64(a)
    flipped = a.copy(); flipped[1234] ^= 1
    swapped = a.copy(); swapped[0:32], swapped[64:96] = a[64:96], a[0:32]
    assert _core.shm_checksum64(flipped) != h
    assert _core.shm_checksum64(swapped) != h
    assert _core.shm_checksum64(a[:4095]) != h
    assert _core.shm_checksum64(np.zeros(40, np.uint8)) != _core.shm_checksum64(np.zeros(41, np.uint8))
    assert _core.shm_checksum64(a) == h


def _corrupt_object(path, marker: bytes):
    with open(path, "r+b") as f:
        buf = f.read()
        off = buf.find(marker)
        assert off > 0
        f.seek(off + 100)
        f.write(b"\xff")


def test_corrupt_object_is_a_miss_and_dropped(pool_name):
    s = open_store(f"shm://{pool_name}?size=2MiB&block=4KiB")
    try:
        payload = b"CORRUPT-ME-" * 500
        assert s.put_bytes("c", payload)
        _corrupt_object(s.path, b"CORRUPT-ME-")
        out = np.zeros(len(payload), np.uint8)
        assert s.get(["c"], sl_of(out))[0] == CORRUPT
        st = s.stats()
        assert st["corrupt"] == 1 and st["objects"] == 0 and st["used"] == 0
        assert not s.exists(["c"])[0]
        assert s.get_bytes_status("c")[0] == NOT_FOUND
        # get_bytes path too
        assert s.put_bytes("d", b"ALSO-BAD-" * 500)
        _corrupt_object(s.path, b"ALSO-BAD-")
        assert s.get_bytes_status("d") == (CORRUPT, None)
        # get_bytes reports it (the object is not absent, it failed its checksum) ...
        assert s.put_bytes("d2", b"ALSO-BAD2-" * 500)
        _corrupt_object(s.path, b"ALSO-BAD2-")
        with pytest.raises(StoreError, match=r"get_bytes\('d2'\) could not deliver the object: CORRUPT"):
            s.get_bytes("d2")
        assert s.get_bytes("d2") is None  # ... and dropped it: now absent
        # checksum=off: no verification (documented), the damaged bytes come back
        assert s.put_bytes("e", b"UNCHECKED-" * 500)
        _corrupt_object(s.path, b"UNCHECKED-")
        with open_store(f"shm://{pool_name}?checksum=off") as off:
            got = off.get_bytes("e")
            assert got is not None and got != b"UNCHECKED-" * 500
    finally:
        s.destroy()


def _fill_one_block_each(s, prefix, n):
    st = s.put([f"{prefix}{i}" for i in range(n)], sl_of(*[np.full(4000, i % 256, np.uint8) for i in range(n)]))
    assert (st == OK).all(), st


def _pin_in_thread(name, keys, marker, seconds):
    """Second handle: gets `keys` and holds their pins for `seconds` mid-copy."""
    h = open_store(f"shm://{name}?create=no")
    bufs = [np.zeros(4000, np.uint8) for _ in keys]
    box = {}

    def run():
        h._debug_hold("get_copy", seconds, marker)
        box["st"] = h.get(keys, sl_of(*bufs))

    t = threading.Thread(target=run)
    t.start()
    wait_for_file(marker)
    return t, h, bufs, box


def test_lru_eviction_order_and_pins(pool_name, tmp_path):
    s = open_store(f"shm://{pool_name}?size=256KiB&block=4KiB&pins=16")
    try:
        n = s.stats()["blocks"]
        assert 10 < n < 64
        _fill_one_block_each(s, "k", n)
        assert s.get_bytes("k0") is not None  # k0 becomes most recent; k1 is now least
        assert s.put_bytes("new", bytes(4000))
        assert s.exists(["k0", "k1", "k2", "new"]).tolist() == [True, False, True, True]
        assert s.stats()["evictions"] == 1
        # pin k2 (now the least recent) from another handle: eviction must skip it
        t, h, bufs, box = _pin_in_thread(pool_name, ["k2"], str(tmp_path / "m"), 1.0)
        assert s.stats()["pins"] == 1
        assert s.put_bytes("new2", bytes(4000))
        assert s.exists(["k2", "k3"]).tolist() == [True, False]
        t.join()
        h.close()
        assert box["st"].tolist() == [OK] and (bufs[0] == 2).all()
        assert s.stats()["pins"] == 0
    finally:
        s.destroy()


def test_overwrite_while_pinned_keeps_readers_bytes(pool_name, tmp_path):
    s = open_store(f"shm://{pool_name}?size=256KiB&block=4KiB&pins=16")
    try:
        assert s.put_bytes("k", np.full(4000, 1, np.uint8))
        t, h, bufs, box = _pin_in_thread(pool_name, ["k"], str(tmp_path / "m"), 0.5)
        assert s.put_bytes("k", np.full(4000, 9, np.uint8))  # publishes a new object
        assert s.stats()["used"] == 2 * 4096  # the old one waits for its reader
        t.join()
        h.close()
        assert box["st"].tolist() == [OK] and (bufs[0] == 1).all()
        assert s.stats()["used"] == 4096 and s.get_bytes("k") == bytes([9]) * 4000
    finally:
        s.destroy()


def test_full_pool_with_everything_pinned_is_no_space(pool_name, tmp_path):
    s = open_store(f"shm://{pool_name}?size=256KiB&block=4KiB&pins=64")
    try:
        n = s.stats()["blocks"]
        _fill_one_block_each(s, "k", n)
        t, h, bufs, box = _pin_in_thread(pool_name, [f"k{i}" for i in range(n)], str(tmp_path / "m"), 1.0)
        assert s.put(["x"], sl_of(np.zeros(100, np.uint8)))[0] == NO_SPACE
        assert s.stats()["put_failures"] == 1
        assert not s.exists(["x"])[0]
        t.join()
        h.close()
        assert (box["st"] == OK).all()
        assert s.put(["x"], sl_of(np.zeros(100, np.uint8)))[0] == OK
    finally:
        s.destroy()


def test_pin_table_full_is_busy(pool_name, tmp_path):
    s = open_store(f"shm://{pool_name}?size=256KiB&block=4KiB&pins=16")
    try:
        _fill_one_block_each(s, "k", 20)
        t, h, bufs, box = _pin_in_thread(pool_name, [f"k{i}" for i in range(16)], str(tmp_path / "m"), 0.5)
        assert s.get_bytes_status("k17") == (BUSY, None)
        with pytest.raises(StoreError, match="BUSY .pin table full"):  # not None: the object is there
            s.get_bytes("k17")
        t.join()
        h.close()
        assert s.get_bytes("k17") is not None
    finally:
        s.destroy()


# ---------------------------------------------------------------------------
# several processes


OBJ = 20 << 10


def _content(seed: int) -> np.ndarray:
    a = np.arange(OBJ // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    a[0] = seed
    return a.view(np.uint8)


def _writer(name, checksum, seconds, q):
    s = open_store(f"shm://{name}?create=no&checksum={checksum}")
    t_end, i = time.monotonic() + seconds, 0
    while time.monotonic() < t_end:
        keys = [f"k{(i + j) % 48}" for j in range(4)]
        bufs = [_content(i * 4 + j) for j in range(4)]
        s.put(keys, sl_of(*bufs))
        i += 1
    q.put(("w", i))


def _reader(name, checksum, seconds, q):
    s = open_store(f"shm://{name}?create=no&checksum={checksum}")
    rng = np.random.default_rng(os.getpid())
    ok = bad = 0
    bufs = [np.zeros(OBJ, np.uint8) for _ in range(4)]
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        keys = [f"k{j}" for j in rng.integers(0, 48, 4)]
        st = s.get(keys, sl_of(*bufs))
        for b, code in zip(bufs, st):
            if code == OK:
                seed = int(b.view(np.uint64)[0])
                if np.array_equal(b, _content(seed)):
                    ok += 1
                else:
                    bad += 1
    q.put(("r", ok, bad))


@pytest.mark.parametrize("checksum", ["off", "on"])
def test_readers_never_see_partial_objects(pool_name, checksum):
    """A writer overwrites keys (and forces evictions) while two reader processes verify content."""
    with open_store(f"shm://{pool_name}?size=1MiB&block=4KiB") as s:
        assert s.stats()["capacity"] < 48 * OBJ  # the working set does not fit: evictions happen
        q = CTX.Queue()
        procs = [CTX.Process(target=_writer, args=(pool_name, checksum, 1.2, q))]
        procs += [CTX.Process(target=_reader, args=(pool_name, checksum, 1.2, q)) for _ in range(2)]
        for p in procs:
            p.start()
        res = [q.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
        readers = [r for r in res if r[0] == "r"]
        assert sum(r[2] for r in readers) == 0, readers
        assert sum(r[1] for r in readers) > 0, readers
        st = s.stats()
        assert st["evictions"] > 0 and st["pins"] == 0 and st["writing"] == 0


def _share_child(name, q):
    s = open_store(f"shm://{name}?create=no")
    got = s.get_bytes("from-parent")
    s.put(["from-child"], sl_of(np.full(5000, 42, np.uint8)))
    q.put(got)


def test_two_processes_share_one_pool(pool_name):
    with open_store(f"shm://{pool_name}?size=2MiB") as s:
        s.put_bytes("from-parent", b"hello child")
        q = CTX.Queue()
        p = CTX.Process(target=_share_child, args=(pool_name, q))
        p.start()
        assert q.get(timeout=20) == b"hello child"
        p.join(10)
        assert s.get_bytes("from-child") == bytes([42]) * 5000


def _open_concurrently(name, q):
    s = open_store(f"shm://{name}?size=2MiB")
    q.put(s.created)
    s.put_bytes(f"p{os.getpid()}", b"x")


def test_concurrent_first_use_creates_once(pool_name):
    q = CTX.Queue()
    procs = [CTX.Process(target=_open_concurrently, args=(pool_name, q)) for _ in range(4)]
    for p in procs:
        p.start()
    created = [q.get(timeout=20) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert sorted(created) == [False, False, False, True]
    with open_store(f"shm://{pool_name}?create=no") as s:
        assert s.stats()["objects"] == 4


# ---------------------------------------------------------------------------
# SIGKILL at any point


def _hold_child(name, phase, marker, key, nbytes):
    s = open_store(f"shm://{name}?create=no")
    s._debug_hold(phase, 60, marker)
    if phase == "get_copy":
        s.get([key], sl_of(np.zeros(nbytes, np.uint8)))
    else:
        s.put([key], sl_of(np.full(nbytes, 5, np.uint8)))
    os._exit(3)  # never reached: the parent kills us first


def _kill_at(name, phase, tmp_path, key="victim", nbytes=3 * 4096):
    marker = str(tmp_path / f"{phase}.marker")
    p = CTX.Process(target=_hold_child, args=(name, phase, marker, key, nbytes))
    p.start()
    wait_for_file(marker)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("phase", ["lock", "alloc"])
def test_killed_while_holding_the_lock(pool_name, tmp_path, phase):
    with open_store(f"shm://{pool_name}?size=256KiB&block=4KiB&pins=16") as s:
        s.put_bytes("before", b"still here")
        free0 = s.stats()["free_blocks"]
        _kill_at(pool_name, phase, tmp_path)
        st = run_bounded(s.stats)  # must not deadlock
        assert st["recoveries"] == 1
        assert st["free_blocks"] == free0 and st["writing"] == 0  # the half-done allocation was rolled back
        assert s.get_bytes("before") == b"still here"
        assert not s.exists(["victim"])[0]
        n = st["free_blocks"]
        _fill_one_block_each(s, "f", n)  # every block is usable again
        assert s.exists(["before"])[0]  # nothing had to be evicted
        assert s.stats()["recoveries"] == 1


def test_killed_mid_put_copy(pool_name, tmp_path):
    with open_store(f"shm://{pool_name}?size=256KiB&block=4KiB&pins=16") as s:
        n = s.stats()["blocks"]
        _kill_at(pool_name, "put_copy", tmp_path)
        st = s.stats()
        assert st["writing"] == 1 and st["used"] == 3 * 4096 and st["recoveries"] == 0
        assert not s.exists(["victim"])[0]  # the partial object is invisible
        _fill_one_block_each(s, "f", n)  # needs the dead reservation's blocks
        st = s.stats()
        assert st["reaped_writes"] == 1 and st["writing"] == 0 and st["objects"] == n


def test_killed_mid_get_copy(pool_name, tmp_path):
    with open_store(f"shm://{pool_name}?size=256KiB&block=4KiB&pins=16") as s:
        n = s.stats()["blocks"]
        assert s.put(["victim"], sl_of(np.full(3 * 4096, 7, np.uint8)))[0] == OK
        _kill_at(pool_name, "get_copy", tmp_path)
        assert s.stats()["pins"] == 1
        _fill_one_block_each(s, "f", n)  # needs the blocks the dead reader pinned
        st = s.stats()
        assert st["reaped_pins"] == 1 and st["pins"] == 0 and st["objects"] == n
        assert not s.exists(["victim"])[0]


def test_killed_holding_lock_with_concurrent_survivors(pool_name, tmp_path):
    """Another process keeps working through a crash of a lock holder."""
    with open_store(f"shm://{pool_name}?size=1MiB&block=4KiB") as s:
        q = CTX.Queue()
        survivor = CTX.Process(target=_reader, args=(pool_name, "on", 1.5, q))
        s.put([f"k{i}" for i in range(8)], sl_of(*[_content(i) for i in range(8)]))
        survivor.start()
        _kill_at(pool_name, "alloc", tmp_path)
        r = q.get(timeout=30)
        survivor.join(10)
        assert survivor.exitcode == 0 and r[2] == 0 and r[1] > 0
        assert s.stats()["recoveries"] == 1


# ---------------------------------------------------------------------------
# large batches: copy threads and non-temporal stores (csrc/shm/shm_pool.h CopyOptions)


def _force_batch_copy(s: ShmStore, threads: int = 0) -> None:
    """Every batch takes the large-batch path: the threads and non-temporal stores."""
    s._pool.set_copy_options(threads=threads, parallel_min_bytes=0, stream_min_bytes=0)


@pytest.mark.parametrize("threads", [0, 2, 3])
@pytest.mark.parametrize("checksum", ["on", "off"])
def test_large_batch_path_round_trips_odd_segments(pool_name, threads, checksum):
    """Objects split over threads, stores streamed where aligned, plain where not: every
    byte arrives and the checksum written on put verifies on get, whatever the cuts."""
    with open_store(f"shm://{pool_name}?size=8MiB&block=4KiB&checksum={checksum}") as s:
        _force_batch_copy(s, threads)
        rng = np.random.default_rng(7)
        n, seg = 24, 4096 + 96
        src = rng.integers(0, 256, n * 3 * seg + 64, dtype=np.uint8)
        dst = np.zeros_like(src)
        # three segments per object: the first at a 32-byte-aligned address, the others not
        offs = np.array([[i * 3 * seg + 32 * ((j + i) % 2) + 5 * j for j in range(3)] for i in range(n)], np.uint64)
        sizes = np.full((n, 3), seg - 40, np.uint64)
        keys = [f"big-{i}" for i in range(n)]
        assert not s.put(keys, ScatterList(src.ctypes.data + offs, sizes)).any()
        assert not s.get(keys, ScatterList(dst.ctypes.data + offs, sizes)).any()
        for i in range(n):
            for j in range(3):
                o, z = int(offs[i, j]), int(sizes[i, j])
                np.testing.assert_array_equal(dst[o:o + z], src[o:o + z])
        # the same objects read whole, through the single-object path, agree byte for byte
        got = s.get_bytes("big-5")
        want = np.concatenate([src[int(offs[5, j]):int(offs[5, j] + sizes[5, j])] for j in range(3)])
        assert got == want.tobytes()


def test_large_batch_corrupt_object_is_a_miss_alone(pool_name):
    with open_store(f"shm://{pool_name}?size=8MiB&block=4KiB") as s:
        _force_batch_copy(s)
        n, size = 16, 20000
        data = [np.frombuffer((f"OBJ{i:02d}-".encode() * (size // 6 + 1))[:size], np.uint8) for i in range(n)]
        keys = [f"k{i}" for i in range(n)]
        assert not s.put(keys, sl_of(*data)).any()
        _corrupt_object(s.path, b"OBJ09-")
        outs = [np.zeros(size, np.uint8) for _ in range(n)]
        st = s.get(keys, sl_of(*outs))
        assert st[9] == CORRUPT and (np.delete(st, 9) == OK).all()
        for i in range(n):
            if i != 9:
                np.testing.assert_array_equal(outs[i], data[i])
        assert not s.exists(["k9"])[0]


def _batch_child(s, q):
    outs = [np.zeros(5000, np.uint8) for _ in range(8)]
    st = s.get([f"f{i}" for i in range(8)], sl_of(*outs))
    q.put((st.tolist(), [int(o[0]) for o in outs]))


def test_forked_child_uses_its_own_copy_threads(pool_name):
    """A child forked after the parent's handle started copy threads inherits the handle
    but not the threads: its large batches must still complete."""
    with open_store(f"shm://{pool_name}?size=4MiB") as s:
        _force_batch_copy(s)
        assert not s.put([f"f{i}" for i in range(8)], sl_of(*[np.full(5000, i, np.uint8) for i in range(8)])).any()
        q = CTX.Queue()
        p = CTX.Process(target=_batch_child, args=(s, q))  # fork: the very handle, not a new one
        p.start()
        try:
            st, first = q.get(timeout=30)
        finally:
            p.join(10)
            if p.is_alive():  # hung on threads it does not have: do not leave it behind
                p.kill()
                p.join(5)
        assert st == [OK] * 8 and first == list(range(8))


def test_exists_prefix_stops_at_the_first_absent_key(pool_name):
    with open_store(f"shm://{pool_name}?size=2MiB") as s:
        for k in ("a", "b", "d"):
            assert s.put_bytes(k, b"x" * 100)
        assert s.exists_prefix(["a", "b", "c", "d"]) == 2
        assert s.exists_prefix(["c", "a"]) == 0
        assert s.exists_prefix(["a", "b", "d"]) == 3
        assert s.exists_prefix([]) == 0
        with pytest.raises(ConfigError):
            s.exists_prefix(["a", ""])
        with pytest.raises(ConfigError):
            s.exists_prefix(["a", 7])


@pytest.mark.parametrize("put_parallel", [True, False])
def test_checksums_of_objects_copied_in_parts_equal_whole_object_checksums(pool_name, put_parallel):
    """A large batch is copied in units of blocks on several threads, each hashed apart and
    the parts merged: the checksum must be the one a whole-object pass computes, so a put
    in parts verifies on a get in one piece and the other way round, whatever the cuts."""
    with open_store(f"shm://{pool_name}?size=16MiB&block=4KiB") as s:
        rng = np.random.default_rng(9)
        n, cuts = 5, [1, 31, 70001, 4096, 333333, 5, 200000]  # segments cross unit and block edges
        size = sum(cuts)
        src = rng.integers(0, 256, n * size, dtype=np.uint8)
        dst = np.zeros_like(src)
        offs = np.array([[i * size + sum(cuts[:j]) for j in range(len(cuts))] for i in range(n)], np.uint64)
        sizes = np.tile(np.array(cuts, np.uint64), (n, 1))
        keys = [f"parts-{i}" for i in range(n)]
        parallel = dict(threads=0, parallel_min_bytes=0, stream_min_bytes=0)
        whole = dict(threads=1, parallel_min_bytes=1 << 62, stream_min_bytes=1 << 62)
        s._pool.set_copy_options(**(parallel if put_parallel else whole))
        assert not s.put(keys, ScatterList(src.ctypes.data + offs, sizes)).any()
        s._pool.set_copy_options(**(whole if put_parallel else parallel))
        assert not s.get(keys, ScatterList(dst.ctypes.data + offs, sizes)).any()
        np.testing.assert_array_equal(dst, src)
        assert s.get_bytes("parts-3") == src[3 * size:4 * size].tobytes()  # one-object path agrees


def test_faulty_scheme_is_test_only(monkeypatch):
    """``faulty+URL`` (fault injection for tests that start real engines) needs its options in
    KVDIRECT_TEST_STORE_FAULTS: without the variable it is refused, with it every get fails."""
    import numpy as np

    from kvdirect.errors import ConfigError
    from kvdirect.stores import ScatterList
    from kvdirect.stores.base import OK

    name = f"faulty-{uuid.uuid4().hex[:8]}"
    monkeypatch.delenv("KVDIRECT_TEST_STORE_FAULTS", raising=False)
    with pytest.raises(ConfigError, match="tests only"):
        open_store(f"faulty+shm://{name}?size=1MiB&block=4KiB")
    assert not os.path.exists(f"/dev/shm/kvdirect-{name}")  # refused before anything was opened
    monkeypatch.setenv("KVDIRECT_TEST_STORE_FAULTS", '{"fail_rate": 1.0, "fail_ops": ["get"]}')
    s = open_store(f"faulty+shm://{name}?size=1MiB&block=4KiB")
    try:
        buf = np.arange(64, dtype=np.uint8)
        sl = ScatterList(np.array([buf.ctypes.data], np.uint64), np.array([64], np.uint64))
        assert list(s.put(["k"], sl)) == [OK] and s.exists(["k"]).all()
        assert list(s.get(["k"], sl)) != [OK] and s.stats()["injected"]["get"] == 1
    finally:
        s.close()
        destroy_pool(name, missing_ok=True)
    monkeypatch.setenv("KVDIRECT_TEST_STORE_FAULTS", '{"fail_rat": 1.0}')
    with pytest.raises(ConfigError, match="fail_rat"):
        open_store(f"faulty+shm://{name}?size=1MiB&block=4KiB")
    destroy_pool(name, missing_ok=True)


FIRST_GET = r'''
import resource, sys, time, numpy as np
from kvdirect.stores import ScatterList, open_store
st = open_store(sys.argv[1])
deadline = time.monotonic() + 60
while st.prefaulted is None and "prefault=off" not in sys.argv[1] and time.monotonic() < deadline:
    time.sleep(0.01)
dst = np.ones(64 << 20, dtype=np.uint8)  # touched, like an engine's KV cache
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
st_ = st.get(["obj"], ScatterList(np.array([[dst.ctypes.data]], np.uint64), np.array([[dst.nbytes]], np.uint64)))
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
assert st_[0] == 0 and dst[:4].tolist() == [7, 7, 7, 7], st_
assert st.stats()["prefaulted_bytes"] == st.prefaulted
print(faults, st.prefaulted)
'''


def test_prefault_maps_the_pool_before_the_first_get(pool_name, tmp_path):
    """A process's first get of a 64 MiB object takes page faults over the pool bytes it reads
    (one per 64 KiB with the kernel's fault-around: 1024), unless the pool was prefaulted at
    open (the default; ``prefault=off`` not)."""
    import subprocess
    import sys

    url = f"shm://{pool_name}?size=128MiB"
    w = open_store(url + "&prefault=off")
    src = np.full(64 << 20, 7, dtype=np.uint8)
    assert w.put(["obj"], ScatterList(np.array([[src.ctypes.data]], np.uint64),
                                      np.array([[src.nbytes]], np.uint64)))[0] == OK
    script = tmp_path / "first_get.py"
    script.write_text(FIRST_GET)
    runs = {}
    for flag in ("on", "off"):
        r = subprocess.run([sys.executable, str(script), f"{url}&prefault={flag}"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        faults, populated = r.stdout.split()
        runs[flag] = (int(faults), populated)
    # Compared as a difference: under AddressSanitizer the copy also faults in the shadow of both
    # buffers (one fault per 4 KiB of shadow), the same with and without prefault.
    pool_faults = (64 << 20) // (64 << 10)  # one per 64 KiB read
    assert runs["off"][0] >= pool_faults // 2, runs
    assert runs["off"][0] - runs["on"][0] >= pool_faults // 2, runs
    assert runs["off"][1] == "None" and int(runs["on"][1]) > 64 << 20, runs
    w.close()
    with pytest.raises(ConfigError, match="prefault"):
        open_store(f"shm://{pool_name}?prefault=maybe")
