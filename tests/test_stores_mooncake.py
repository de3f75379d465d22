"""MooncakeStore against a real mooncake_master on loopback (HTTP metadata server, free ports)."""
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from kvdirect.errors import ConfigError, StoreError
from kvdirect.stores import ScatterList, base, open_store
from kvdirect.stores import mooncake as mc_mod

from kvd_testutil import ROOT, fake_import_failure

# skipped when the package is absent; FAILS when it is installed but its system libraries are not
# (tests/conftest.py, pytest_runtest_setup)
needs_mooncake = pytest.mark.mooncake

SEGMENT = 64 << 20


@pytest.fixture(scope="module")
def master():
    from kvdirect.services import start_mooncake_master

    svc = start_mooncake_master(store_params=dict(segment="64MiB", buffer="16MiB", timeout=10))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def store(master):
    s = open_store(master.store_url)
    yield s
    s.close()


class Pages:
    """A registered host 'KV pool': n pages, each scattered over `layers` segments of `seg` bytes
    placed at stride so that no two segments of a page are adjacent."""

    def __init__(self, store, n, layers, seg, fill=None, register=True):
        self.n, self.layers, self.seg = n, layers, seg
        self.mem = np.zeros(n * layers * seg * 2, np.uint8)
        if fill is not None:
            self.mem[:] = np.random.default_rng(fill).integers(0, 256, self.mem.size, dtype=np.uint8)
        base_addr = self.mem.ctypes.data
        # segment (page i, layer l) at offset (l * n + i) * 2 * seg: layer-major like a real KV pool
        off = (np.arange(layers)[None, :] * n + np.arange(n)[:, None]) * 2 * seg
        self.scatter = ScatterList(base_addr + off.astype(np.uint64), np.full((n, layers), seg, np.uint64))
        self._off = off
        if register:
            store.register(base_addr, self.mem.nbytes)

    def page_bytes(self, i):
        return np.concatenate([self.mem[o:o + self.seg] for o in self._off[i]])


def keys(prefix, n):
    return [f"{prefix}-{os.getpid()}-{i}" for i in range(n)]


# ----------------------------------------------------------------------------- real master


@needs_mooncake
def test_scattered_round_trip(store):
    src = Pages(store, 8, layers=6, seg=4096, fill=1)
    dst = Pages(store, 8, layers=6, seg=4096)
    k = keys("rt", 8)
    st = store.put(k, src.scatter)
    assert st.dtype == np.int32 and (st == base.OK).all(), st
    st = store.get(k, dst.scatter)
    assert (st == base.OK).all(), st
    for i in range(8):
        assert np.array_equal(dst.page_bytes(i), src.page_bytes(i))
    # the object is the concatenation of its segments: a single-segment reader sees the same bytes
    flat = np.zeros(6 * 4096, np.uint8)
    store.register(flat.ctypes.data, flat.nbytes)
    st = store.get(k[3:4], ScatterList(np.array([flat.ctypes.data], np.uint64), np.array([flat.nbytes], np.uint64)))
    assert st.tolist() == [base.OK]
    assert np.array_equal(flat, src.page_bytes(3))


@needs_mooncake
def test_single_segment_round_trip(store):
    src = Pages(store, 5, layers=1, seg=10000, fill=2)
    dst = Pages(store, 5, layers=1, seg=10000)
    k = keys("single", 5)
    assert (store.put(k, src.scatter) == base.OK).all()
    assert (store.get(k, dst.scatter) == base.OK).all()
    assert all(np.array_equal(dst.page_bytes(i), src.page_bytes(i)) for i in range(5))


@needs_mooncake
def test_two_read_sessions_over_one_key_end_separately(store):
    """The client keeps one get session per key, and its first end ends it for every reader;
    the adapter counts sessions per key, so ending one leaves the other readable (two
    layer-wise loads, or a match's held session and a load, over the same pages)."""
    src = Pages(store, 3, layers=2, seg=1024, fill=4)
    k = keys("twosess", 3)
    assert (store.put(k, src.scatter) == base.OK).all()
    sizes = np.full(3, 2 * 1024, np.uint64)
    first, second = store.open_read(k, sizes), store.open_read(k[1:], sizes[1:])
    assert (first.status == base.OK).all() and (second.status == base.OK).all()
    first.narrow(0)  # given up unread (a match's held session no load took)
    first.end()
    dst = Pages(store, 2, layers=2, seg=1024)
    for layer in range(2):  # piece by piece, as a layer-wise load reads
        second.read(ScatterList(np.ascontiguousarray(dst.scatter.addrs[:, layer:layer + 1]),
                                np.ascontiguousarray(dst.scatter.sizes[:, layer:layer + 1])))
    assert (second.end() == base.OK).all()
    assert all(np.array_equal(dst.page_bytes(i), src.page_bytes(i + 1)) for i in range(2))
    assert not store._session_keys  # every session ended: nothing counted
    # and one that is ended again, or ended after the other, ends nothing twice
    third = store.open_read(k[:1], sizes[:1])
    third.end()
    third.end()
    assert not store._session_keys


@needs_mooncake
def test_exists_and_prefix(store):
    src = Pages(store, 4, layers=2, seg=512, fill=3)
    k = keys("ex", 4)
    assert not store.exists(k).any()
    assert store.exists_prefix(k) == 0
    assert (store.put(k[:2], src.scatter.take(slice(0, 2))) == base.OK).all()
    assert store.exists(k).tolist() == [True, True, False, False]
    assert store.exists_prefix(k) == 2
    assert store.exists_prefix([k[0], k[3], k[1]]) == 1
    assert store.exists([]).shape == (0,)


@needs_mooncake
def test_remove(store):
    src = Pages(store, 3, layers=2, seg=256, fill=4)
    k = keys("rm", 3)
    assert (store.put(k, src.scatter) == base.OK).all()
    assert store.remove(k[:2] + ["never-stored-" + k[0]]) == 2
    assert store.exists(k).tolist() == [False, False, True]
    assert store.remove(k[:2]) == 0


@needs_mooncake
def test_put_status_is_not_inverted():
    """The reference design read Mooncake's 0 ("stored") as a failure. A stored key must be OK and
    readable; a key that cannot be stored must be a failure and absent.

    Own master: a put that runs out of space makes mooncake_master evict other objects, which
    would disturb the tests sharing the module's master."""
    from kvdirect.services import start_mooncake_master

    with start_mooncake_master(store_params=dict(segment="64MiB", buffer="16MiB")) as svc:
        with open_store(svc.store_url) as store:
            src = Pages(store, 1, layers=2, seg=1024, fill=5)
            dst = Pages(store, 1, layers=2, seg=1024)
            k = keys("status", 2)
            assert store.put(k[:1], src.scatter).tolist() == [base.OK]
            assert store.exists(k[:1]).tolist() == [True]
            assert store.get(k[:1], dst.scatter).tolist() == [base.OK]
            assert np.array_equal(dst.page_bytes(0), src.page_bytes(0))
            # re-putting a stored key reports it stored (the pool holds it), not a failure
            assert store.put(k[:1], src.scatter).tolist() == [base.OK]
            # an object larger than all pool memory can never be stored (np.empty: no pages touched)
            huge = np.empty(2 * SEGMENT, np.uint8)
            store.register(huge.ctypes.data, huge.nbytes)
            st = store.put(k[1:], ScatterList(np.array([huge.ctypes.data], np.uint64),
                                              np.array([huge.nbytes], np.uint64)))
            assert st.tolist() == [base.NO_SPACE]
            assert store.exists(k[1:]).tolist() == [False]
            assert store.stats()["failed_by_status"] == {base.NO_SPACE: 1}


@needs_mooncake
def test_get_of_missing_key_and_mixed_batch(store):
    src = Pages(store, 3, layers=3, seg=300, fill=6)
    dst = Pages(store, 3, layers=3, seg=300)
    k = keys("mixed", 3)
    assert (store.put([k[0], k[2]], src.scatter.take([0, 2])) == base.OK).all()
    st = store.get(k, dst.scatter)
    assert st.tolist() == [base.OK, base.NOT_FOUND, base.OK]
    assert np.array_equal(dst.page_bytes(0), src.page_bytes(0))
    assert np.array_equal(dst.page_bytes(2), src.page_bytes(2))
    assert not dst.page_bytes(1).any()


@needs_mooncake
def test_get_of_another_size_is_a_failure(store):
    """A get that delivers fewer bytes than the scatter list's total (or needs more room) is never OK."""
    src = Pages(store, 1, layers=2, seg=1000, fill=7)
    k = keys("size", 1)
    assert store.put(k, src.scatter).tolist() == [base.OK]
    buf = np.zeros(8192, np.uint8)
    store.register(buf.ctypes.data, buf.nbytes)
    a = buf.ctypes.data
    cases = {
        "single buffer larger than object": ([[a]], [[3000]]),
        "single buffer smaller than object": ([[a]], [[1500]]),
        "segments summing to more": ([[a, a + 4000]], [[1000, 1500]]),
        "segments summing to less": ([[a, a + 4000]], [[1000, 500]]),
    }
    for name, (addrs, sizes) in cases.items():
        st = store.get(k, ScatterList(np.array(addrs, np.uint64), np.array(sizes, np.uint64)))
        assert st[0] != base.OK, name
    # same total, different split: the object is its concatenated bytes, so this is a full read
    st = store.get(k, ScatterList(np.array([[a, a + 4000]], np.uint64), np.array([[500, 1500]], np.uint64)))
    assert st.tolist() == [base.OK]
    assert np.array_equal(np.concatenate([buf[:500], buf[4000:5500]]), src.page_bytes(0))


@needs_mooncake
def test_unregistered_memory_policy(master, store):
    """tcp: segments outside registered regions work (Mooncake's TCP transport copies any address);
    require_registered=1 (the default with rdma) fails such keys with INVALID_ARGUMENT, no call made."""
    src = Pages(store, 2, layers=2, seg=512, fill=8, register=False)
    dst = Pages(store, 2, layers=2, seg=512, register=False)
    k = keys("unreg", 2)
    assert (store.put(k, src.scatter) == base.OK).all()
    assert (store.get(k, dst.scatter) == base.OK).all()
    assert all(np.array_equal(dst.page_bytes(i), src.page_bytes(i)) for i in range(2))

    strict = open_store(master.store_url + "&require_registered=1&segment=0")
    try:
        k2 = keys("strict", 2)
        assert (strict.put(k2, src.scatter) == base.INVALID_ARGUMENT).all()
        assert not strict.exists(k2).any()
        strict.register(src.mem.ctypes.data, src.mem.nbytes)
        strict.register(src.mem.ctypes.data, src.mem.nbytes)  # once per region: a repeat is a no-op
        assert strict.stats()["registered_regions"] == 1
        assert (strict.put(k2, src.scatter) == base.OK).all()
        dst.mem[:] = 0
        assert (strict.get(k2, dst.scatter) == base.INVALID_ARGUMENT).all()  # dst not registered
        assert not dst.mem.any()
        strict.register(dst.mem.ctypes.data, dst.mem.nbytes)
        assert (strict.get(k2, dst.scatter) == base.OK).all()
        assert all(np.array_equal(dst.page_bytes(i), src.page_bytes(i)) for i in range(2))
    finally:
        strict.close()


@needs_mooncake
def test_reregistering_reused_memory(master):
    """Memory freed and reallocated at an overlapping address: registering it again must work
    (the stale registration is dropped first; Mooncake itself refuses overlapping ones)."""
    with open_store(master.store_url + "&segment=0&require_registered=1") as s:
        mem = np.zeros(1 << 16, np.uint8)
        a = mem.ctypes.data
        s.register(a, 4096)
        s.register(a + 1024, 1024)       # inside a registered region: nothing to do
        assert s.stats()["registered_regions"] == 1
        s.register(a + 2048, 8192)       # overlaps the first: replaces it
        s.register(a, 1 << 16)           # same start, longer: replaces again
        assert s.stats()["registered_regions"] == 1
        src = Pages(s, 2, layers=2, seg=256, fill=11, register=False)
        s.register(src.mem.ctypes.data, src.mem.nbytes)
        k = keys("rereg", 2)
        assert (s.put(k, src.scatter) == base.OK).all()
        out = np.zeros(1 << 16, np.uint8)
        s.register(out.ctypes.data, out.nbytes)
        dst = ScatterList(out.ctypes.data + np.arange(4, dtype=np.uint64).reshape(2, 2) * 256,
                          np.full((2, 2), 256, np.uint64))
        assert (s.get(k, dst) == base.OK).all()
        assert np.array_equal(out[:512], src.page_bytes(0)) and np.array_equal(out[512:1024], src.page_bytes(1))
        s.unregister(out.ctypes.data)
        assert (s.get(k, dst) == base.INVALID_ARGUMENT).all()


@needs_mooncake
def test_bytes_round_trip(store):
    k = keys("bytes", 2)
    assert store.put_bytes(k[0], b"\x00kv\xffdirect")
    assert store.get_bytes(k[0]) == b"\x00kv\xffdirect"
    assert store.get_bytes(k[1]) is None


class _SlowClient:
    """Wraps the real client; batch_get_into* block until released (a hung transfer)."""

    def __init__(self, real):
        self.real, self.release = real, threading.Event()

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if name.startswith("batch_get_into"):
            def slow(*a, **kw):
                self.release.wait(30)
                return fn(*a, **kw)
            return slow
        return fn


class _RecordingClient:
    """Wraps the real client; records the keys of each batch_get_session_end call."""

    def __init__(self, real):
        self.real, self.ended = real, []

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if name == "batch_get_session_end":
            def end(keys):
                out = fn(keys)
                self.ended.append(sorted(keys))
                return out
            return end
        return fn


@needs_mooncake
def test_a_session_ends_at_once_while_the_master_hangs():
    """Ending a read session is local to the client, so it runs on the caller's thread: with
    the master stopped and the only worker stuck in a call to it, the end still reaches the
    client at once (through the deadline runner it was refused: the keys stayed in session)."""
    import signal

    from kvdirect.services import start_mooncake_master

    svc = start_mooncake_master(store_params=dict(segment="16MiB", buffer="4MiB", timeout=0.3))
    real = open_store(svc.store_url)
    rec = _RecordingClient(real._client)
    s = mc_mod.MooncakeStore(real.master, real.metadata, client=rec, timeout_s=0.3, workers=1)
    stopped = False
    try:
        k = keys("endlocal", 2)
        assert all(s.put_bytes(x, b"v" * 64) for x in k)
        held = s.open_read(k, np.full(2, 64, np.uint64))
        assert (held.status == base.OK).all()
        os.kill(svc.pid, signal.SIGSTOP)
        stopped = True
        stuck = s.open_read(keys("endlocal-other", 2), np.full(2, 64, np.uint64))  # times out, stays in the client
        assert (stuck.status == base.TIMEOUT).all() and s.stats()["abandoned_calls"] == 1
        t0 = time.perf_counter()
        held.narrow(0)
        held.end()
        assert time.perf_counter() - t0 < 0.2
        assert sorted(k) in rec.ended
    finally:
        if stopped:
            os.kill(svc.pid, signal.SIGCONT)
        s.quiesce(30)
        s.close()
        real.close()
        svc.stop()


class _GatedStartClient:
    """Wraps the real client: batch_get_session_start waits until released (a slow master);
    records in order each session start that returned and each end, with their keys."""

    def __init__(self, real):
        self.real, self.release, self.events = real, threading.Event(), []

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if name == "batch_get_session_start":
            def start(keys):
                self.release.wait(30)
                out = fn(keys)
                self.events.append(("start", sorted(keys)))
                return out
            return start
        if name == "batch_get_session_end":
            def end(keys):
                self.events.append(("end", sorted(keys)))
                return fn(keys)
            return end
        return fn


@needs_mooncake
def test_a_timed_out_session_start_ends_its_keys_once_it_returns(store):
    """A session start past its deadline reads as TIMEOUT, but the abandoned call may still
    open the keys in the client when the master answers: they are ended after it returns,
    not before (an end before the late start would leave them in session until the lease)."""
    k = keys("latestart", 2)
    assert all(store.put_bytes(x, b"v" * 64) for x in k)
    gated = _GatedStartClient(store._client)
    s = mc_mod.MooncakeStore(store.master, store.metadata, client=gated, timeout_s=0.2, workers=2)
    try:
        late = s.open_read(k, np.full(2, 64, np.uint64))
        assert (late.status == base.TIMEOUT).all()
        late.end()
        assert gated.events == []  # nothing ended while the start may still open the keys
        gated.release.set()
        assert s.quiesce(30)
        deadline = time.monotonic() + 5
        while len(gated.events) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gated.events == [("start", sorted(k)), ("end", sorted(k))]
        assert s._session_keys == {}
    finally:
        gated.release.set()
        s.quiesce(30)
        s.close()


@needs_mooncake
def test_call_deadline_reports_timeout_and_fails_fast_while_stuck(master, store):
    src = Pages(store, 2, layers=2, seg=256, fill=9)
    dst = Pages(store, 2, layers=2, seg=256)
    k = keys("deadline", 2)
    assert (store.put(k, src.scatter) == base.OK).all()
    slow = _SlowClient(store._client)
    s = mc_mod.MooncakeStore(store.master, store.metadata, client=slow, timeout_s=0.2, workers=1)
    try:
        assert (s.get(k, dst.scatter) == base.TIMEOUT).all()
        st = s.stats()
        assert st["timeouts"] == 1 and st["abandoned_calls"] == 1
        # the only worker is stuck in the client: the next call is refused at once, not queued
        assert (s.get(k, dst.scatter) == base.UNAVAILABLE).all()
        with pytest.raises(StoreError):  # cannot answer: an error the cache backs off on
            s.exists(k)
        slow.release.set()
        assert s.quiesce(10)
        assert (s.get(k, dst.scatter) == base.OK).all()
        assert all(np.array_equal(dst.page_bytes(i), src.page_bytes(i)) for i in range(2))
    finally:
        slow.release.set()
        s.close()
    assert store.exists(k).all()  # closing the wrapper did not close the shared client


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from kvdirect.stores import open_store, ScatterList
    url, prefix = sys.argv[1], sys.argv[2]
    s = open_store(url)
    mem = np.random.default_rng(42).integers(0, 256, 16 * 3 * 2048, dtype=np.uint8)
    s.register(mem.ctypes.data, mem.nbytes)
    addrs = mem.ctypes.data + np.arange(16 * 3, dtype=np.uint64).reshape(16, 3) * 2048
    st = s.put([f"{prefix}-{i}" for i in range(16)], ScatterList(addrs, np.full((16, 3), 2048, np.uint64)))
    print("PUT", ",".join(map(str, st.tolist())), flush=True)
    sys.stdin.readline()   # keep this client (and the segment it contributes) alive until told
    s.close()
    print("BYE", flush=True)
""")


@needs_mooncake
def test_data_survives_across_client_processes(master, store):
    """Process A writes pages; this process (another client instance) reads them byte for byte."""
    prefix = f"xproc-{os.getpid()}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    a = subprocess.Popen([sys.executable, "-c", _WRITER, master.store_url, prefix], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = a.stdout.readline()
        assert line.startswith("PUT "), line
        assert set(line.split()[1].split(",")) == {"0"}
        expect = np.random.default_rng(42).integers(0, 256, 16 * 3 * 2048, dtype=np.uint8)
        out = np.zeros(16 * 3 * 2048, np.uint8)
        store.register(out.ctypes.data, out.nbytes)
        # read into a different layout of the same bytes: 2 segments per page, reversed page order
        order = np.arange(16)[::-1]
        addrs = out.ctypes.data + (order[:, None] * 3 * 2048 + np.array([0, 4096])[None, :]).astype(np.uint64)
        sizes = np.tile(np.array([4096, 2048], np.uint64), (16, 1))
        st = store.get([f"{prefix}-{i}" for i in order], ScatterList(addrs, sizes))
        assert (st == base.OK).all(), st
        assert np.array_equal(out, expect)
        a.stdin.write("\n")
        a.stdin.flush()
        assert a.stdout.readline().strip() == "BYE"
        assert a.wait(30) == 0
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()


# ----------------------------------------------------------------------------- no master / no client


@needs_mooncake
def test_master_unreachable_is_a_clear_store_error():
    from kvdirect.services import free_ports, mooncake_store_url

    rpc, http = free_ports(2)
    with pytest.raises(StoreError) as ei:
        open_store(mooncake_store_url("127.0.0.1", rpc, http, segment="16MiB", buffer="16MiB"))
    msg = str(ei.value)
    assert f"127.0.0.1:{rpc}" in msg and "mooncake_master" in msg and f"--rpc_port={rpc}" in msg


@needs_mooncake
def test_metadata_server_unreachable_is_a_clear_store_error(master):
    from kvdirect.services import free_port, mooncake_store_url

    dead = free_port()
    url = mooncake_store_url("127.0.0.1", master.ports["rpc"], dead)
    with pytest.raises(StoreError, match=f"metadata server http://127.0.0.1:{dead}/metadata"):
        open_store(url)


@needs_mooncake
def test_remove_of_a_key_under_read_lease_is_reported(store):
    """Mooncake refuses to remove an object read within its lease (default_kv_lease_ttl): the key is
    still there, so remove raises StoreError naming the code instead of answering "0 removed"."""
    k = keys("lease", 2)
    assert store.put_bytes(k[0], b"leased") and store.put_bytes(k[1], b"free")
    assert store.get_bytes(k[0]) == b"leased"  # a read grants the lease
    with pytest.raises(StoreError, match=r"batch_remove failed for 1 of 2 keys.*-706 \(BUSY\)"):
        store.remove([k[1], k[0]])
    assert store.exists(k).tolist() == [True, False]  # the free key went, the leased one stayed


class _EmptyGet:
    """The real client, except that get() delivers nothing (what Mooncake returns for a failed read)."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return (lambda key: b"") if name == "get" else getattr(self.real, name)


@needs_mooncake
def test_bytes_api_reports_failures(store):
    """get_bytes: Mooncake answers b"" for "absent" and for failures alike; the size query tells them
    apart. put_bytes: larger than the client's transfer buffer is False (TOO_LARGE), not an error."""
    k = keys("bytesapi", 1)
    assert store.get_bytes(k[0]) is None
    assert store.put_bytes(k[0], b"x" * 100)
    s = mc_mod.MooncakeStore(store.master, store.metadata, client=_EmptyGet(store._client), timeout_s=5)
    try:
        with pytest.raises(StoreError, match="delivered nothing .the object has 100 bytes"):
            s.get_bytes(k[0])
    finally:
        s.close()
    assert store.put_bytes(keys("toolarge", 1)[0], bytes(store.buffer + 1)) is False


def test_not_importable_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mooncake.store", None)
    monkeypatch.setitem(sys.modules, "mooncake", None)
    with pytest.raises(StoreError) as ei:
        open_store("mooncake://127.0.0.1:1?metadata=http://127.0.0.1:2/metadata")
    assert 'pip install "kvdirect[mooncake]"' in str(ei.value)
    assert "libibverbs1 librdmacm1 libnuma1" in str(ei.value)


@pytest.mark.parametrize("url, match", [
    ("mooncake://?metadata=http://h:1/metadata", "HOST:PORT"),
    ("mooncake://127.0.0.1:50051", "metadata="),
    ("mooncake://127.0.0.1:50051?metadata=http://h:1/m&protocol=udp", "tcp or rdma"),
    ("mooncake://127.0.0.1:50051?metadata=http://h:1/m&segment=lots", "bad size"),
    ("mooncake://127.0.0.1:50051?metadata=http://h:1/m&timeout=soon", "bad number"),
    ("mooncake://127.0.0.1:50051?metadata=http://h:1/m&colour=blue", "unknown parameter"),
    ("mooncake://127.0.0.1:50051?metadata=http://h:1/m&check=maybe", "use 0 or 1"),
])
def test_bad_urls(url, match):
    with pytest.raises(ConfigError, match=match):
        open_store(url)


def test_status_mapping_tables():
    """Mooncake's integer results -> kvdirect statuses, exactly (no client needed)."""
    put = mc_mod.put_status([0, -705, -200, -900, -800, -600, -12345, 7])
    assert put.tolist() == [base.OK, base.OK, base.NO_SPACE, base.UNAVAILABLE, base.IO_ERROR,
                            base.INVALID_ARGUMENT, base.IO_ERROR, base.IO_ERROR]
    get = mc_mod.get_status([4096, 4095, 0, -704, -703, -600, -800, -900, 8192, -705],
                            [4096, 4096, 4096, 10, 10, 10, 10, 10, 4096, 10])
    assert get.tolist() == [base.OK, base.CORRUPT, base.CORRUPT, base.NOT_FOUND, base.NOT_FOUND,
                            base.INVALID_ARGUMENT, base.IO_ERROR, base.UNAVAILABLE, base.CORRUPT, base.IO_ERROR]
    # a batch of one code (the common case, mapped without a pass per code) maps the same
    for code, want in ((0, base.OK), (-705, base.OK), (-900, base.UNAVAILABLE), (-12345, base.IO_ERROR)):
        assert mc_mod.put_status([code] * 3).tolist() == [want] * 3
    assert mc_mod.get_status([-704] * 4, [10] * 4).tolist() == [base.NOT_FOUND] * 4
    assert mc_mod.put_status([]).tolist() == []


# ----------------------------------------------------------------------------- system libraries missing


def test_missing_system_library_names_it_and_the_apt_command():
    """Installed package, absent libibverbs: ImportError (not ModuleNotFoundError). The error names the
    library and the apt command; "pip install kvdirect[mooncake]" would not help, so it is not offered."""
    undo = fake_import_failure("missing-lib")
    try:
        with pytest.raises(StoreError) as ei:
            open_store("mooncake://127.0.0.1:1?metadata=http://127.0.0.1:2/metadata")
    finally:
        undo()
    msg = str(ei.value)
    assert "cannot load the system library libibverbs.so.1 (Debian package libibverbs1)" in msg
    assert "apt-get install -y libibverbs1 librdmacm1 libnuma1" in msg
    assert "pip install" not in msg


_PYTEST_WITH = """
import sys
sys.path.insert(0, {tests!r})
from kvd_testutil import fake_import_failure
fake_import_failure({kind!r})
import pytest
sys.exit(pytest.main(["-q", "-rs", "-p", "no:cacheprovider", {test!r}]))
"""


@pytest.mark.parametrize("kind", ["missing-lib", "not-installed"])
def test_mooncake_tests_fail_when_libraries_are_missing_and_skip_when_not_installed(kind):
    """The policy of tests/conftest.py: a Mooncake test on a machine whose Mooncake package cannot load
    its system libraries is an error that names the fix (a broken install must not look like a clean
    run); without the package at all, it is skipped with the install command."""
    test = str(ROOT / "tests" / "test_stores_mooncake.py") + "::test_bytes_round_trip"
    code = _PYTEST_WITH.format(tests=str(ROOT / "tests"), kind=kind, test=test)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = r.stdout + r.stderr
    if kind == "missing-lib":
        assert r.returncode == 1, out[-3000:]
        assert "1 error" in out and "libibverbs.so.1" in out, out[-3000:]
        assert "apt-get install -y libibverbs1 librdmacm1 libnuma1" in out and "-m 'not mooncake'" in out
    else:
        assert r.returncode == 0, out[-3000:]
        assert "1 skipped" in out and 'pip install "kvdirect[mooncake]"' in out, out[-3000:]



_CHILD_ENV = textwrap.dedent("""
    import os, sys
    from kvdirect.stores import open_store
    s = open_store(sys.argv[1])
    s.put_bytes("env-probe", b"x")  # the client works
    print(repr(os.environ.get("MC_TCP_BIND_ADDRESS")))
    s.close()
""")


@needs_mooncake
def test_loopback_client_leaves_the_environment_alone(master):
    """A loopback client may ask Mooncake to bind to loopback (MC_TCP_BIND_ADDRESS) for its
    own setup, but must not leave the variable behind: processes started later inherit it,
    and an engine started in another network namespace then registered its segment as
    127.0.0.1, which its peers cannot reach (seen in the two-host SGLang test)."""
    env = {k: v for k, v in os.environ.items() if k != "MC_TCP_BIND_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", _CHILD_ENV, master.store_url], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "None"
