"""MemcacheStore: conformance with the real memcache_hybrid signatures, behaviour through the test
double, the real MetaService + client init failure (no CANN here), the CLI, and FlakyStore."""
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from kvdirect.errors import ConfigError, StoreError
from kvdirect.stores import ScatterList, base, open_store
from kvdirect.stores import memcache as mm
from kvdirect.stores._testing import FakeMemcacheModule, FlakyStore

from pathlib import Path

try:
    import memcache_hybrid as REAL
except ImportError as e:  # pragma: no cover - depends on the machine
    REAL, _IMPORT_ERROR = None, e
else:
    _IMPORT_ERROR = None

needs_real = pytest.mark.skipif(REAL is None, reason=f"memcache_hybrid not importable ({_IMPORT_ERROR}); "
                                                      'pip install "kvdirect[memcache]"')
# snapshot of memcache_hybrid 1.3.0 / mooncake 0.3.13.post1 signatures (each method's docstring signature, as
# the installed modules report it):
# the fallback when the real module is not installed
SNAPSHOT = Path(__file__).parent / "data" / "store_api_signatures.json"


# ----------------------------------------------------------------------------- signatures


def _split_top(s):
    """Split a parameter list on commas outside [] () <>."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_pybind_signature(doc):
    """'name(self: T, a: list[str], b: int = 3) -> R' -> [(name, type, has_default)] without self."""
    first = doc.strip().splitlines()[0]
    m = re.match(r"\w+\((.*)\)\s*->", first)
    assert m, first
    params = []
    for p in _split_top(m.group(1)):
        name, _, rest = p.partition(":")
        typ, eq, _default = rest.partition("=")
        params.append((name.strip(), typ.strip(), bool(eq)))
    return params[1:] if params and params[0][0] == "self" else params


def real_signatures():
    """Method -> parsed signature: from the installed module, else from the JSON snapshot."""
    out = {}
    if REAL is not None:
        for name, fn in vars(REAL.DistributedObjectStore).items():
            if not name.startswith("_") and getattr(fn, "__doc__", None):
                out[name] = parse_pybind_signature(fn.__doc__)
    if not out:
        snap = json.loads(SNAPSHOT.read_text())["memcache_hybrid"]["DistributedObjectStore"]
        out = {k: parse_pybind_signature(v) for k, v in snap.items()}
    return out


def _type_ok(value, typ):
    if "Sequence[collections.abc.Sequence[typing.SupportsInt]]" in typ or "List[List[int]]" in typ:
        return isinstance(value, list) and all(isinstance(r, list) and all(type(x) is int for x in r) for r in value)
    if "Sequence[typing.SupportsInt]" in typ or "List[int]" in typ:
        return isinstance(value, list) and all(type(x) is int for x in value)
    if "Sequence[str]" in typ or "List[str]" in typ:
        return isinstance(value, list) and all(type(x) is str for x in value)
    if "SupportsInt" in typ or typ == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if typ == "str":
        return type(value) is str
    if "Buffer" in typ:
        return isinstance(value, (bytes, bytearray, memoryview))
    if typ == "bool":
        return isinstance(value, bool)
    return True  # LocalConfig / ReplicateConfig objects: checked by the double


def check_call(sigs, name, args, kwargs):
    assert name in sigs, f"adapter calls {name}, which memcache_hybrid.DistributedObjectStore does not have"
    params = sigs[name]
    assert len(args) <= len(params), f"{name}: {len(args)} positional args, signature has {len(params)}"
    bound = dict(zip([p[0] for p in params], args))
    for k, v in kwargs.items():
        assert k in [p[0] for p in params], f"{name}: no parameter {k!r}"
        assert k not in bound, f"{name}: {k!r} given twice"
        bound[k] = v
    for pname, typ, has_default in params:
        assert pname in bound or has_default, f"{name}: required parameter {pname!r} missing"
        if pname in bound:
            assert _type_ok(bound[pname], typ), f"{name}: {pname}={bound[pname]!r:.60} is not {typ}"


@pytest.fixture
def fake():
    return FakeMemcacheModule()


def host_pages(n, layers, seg, fill=None):
    mem = np.zeros(n * layers * seg, np.uint8)
    if fill is not None:
        mem[:] = np.random.default_rng(fill).integers(0, 256, mem.size, dtype=np.uint8)
    # layer-major: segment (page i, layer l) at (l * n + i) * seg
    off = (np.arange(layers)[None, :] * n + np.arange(n)[:, None]) * seg
    sc = ScatterList(mem.ctypes.data + off.astype(np.uint64), np.full((n, layers), seg, np.uint64))
    return mem, sc


def page(mem, sc, i):
    a0 = mem.ctypes.data
    return np.concatenate([mem[int(a) - a0:int(a) - a0 + int(s)] for a, s in zip(sc.addrs[i], sc.sizes[i])])


def make_store(fake, **kw):
    kw.setdefault("memory", "host")
    return mm.MemcacheStore({"meta_service_url": "tcp://127.0.0.1:1", "protocol": "host_shm"},
                            module=fake, check=False, **kw)


def exercise(store, mem_src, sc_src, mem_dst, sc_dst, keys):
    """Every data-plane call the adapter makes."""
    store.register(mem_src.ctypes.data, mem_src.nbytes)
    store.register(mem_dst.ctypes.data, mem_dst.nbytes)
    store.put(keys, sc_src)
    store.exists(keys)
    store.get(keys, sc_dst)
    store.put_bytes("bytes-key", b"abc")
    store.get_bytes("bytes-key")
    store.get_bytes("missing-key")
    store.remove(keys[:1])
    store.close()


# ----------------------------------------------------------------------------- (1) conformance


def test_every_adapter_call_matches_the_real_signatures(fake):
    sigs = real_signatures()
    mem_s, sc_s = host_pages(4, 3, 64, fill=1)
    mem_d, sc_d = host_pages(4, 3, 64)
    store = make_store(fake)
    exercise(store, mem_s, sc_s, mem_d, sc_d, [f"conf-{i}" for i in range(4)])
    (client,) = fake.clients
    made = {name for name, _, _ in client.calls}
    assert {"setup", "init", "register_buffer", "batch_put_from_layers", "batch_get_into_layers",
            "batch_is_exist", "batch_get_key_info", "remove_batch", "put", "get", "is_exist", "close"} <= made
    for name, args, kwargs in client.calls:
        check_call(sigs, name, args, kwargs)


def test_the_double_has_the_real_parameter_names():
    """The double cannot drift from the real module: same parameter names, same defaults present."""
    from kvdirect.stores._testing import FakeDistributedObjectStore

    sigs = real_signatures()
    for name, fn in vars(FakeDistributedObjectStore).items():
        if name.startswith("_") or not callable(fn):
            continue
        assert name in sigs, name
        mine = [(p.name, p.default is not inspect.Parameter.empty)
                for p in list(inspect.signature(fn).parameters.values())[1:]]
        assert mine == [(n, d) for n, _, d in sigs[name]], name


def test_direction_codes_match_module_and_snapshot():
    snap = json.loads(SNAPSHOT.read_text())["memcache_hybrid"]["copy_directions"]
    assert mm.DIRECTIONS_FALLBACK == snap
    if REAL is not None:
        assert mm.directions(REAL) == snap
    assert mm.directions(object()) == snap  # fallback when the module exports none


def test_local_config_fields_exist():
    fields = set(json.loads(SNAPSHOT.read_text())["memcache_hybrid"]["LocalConfig_fields"])
    if REAL is not None:
        fields &= {n for n in dir(REAL.LocalConfig) if not n.startswith("_")}
    conf_fields = mm.read_conf(_write_local_conf())
    assert set(conf_fields) <= fields, set(conf_fields) - fields


def _write_local_conf(tmp=None):
    import tempfile

    from kvdirect.services import write_local_conf

    p = os.path.join(tmp or tempfile.mkdtemp(), "mmc-local.conf")
    write_local_conf(p, meta_url="tcp://127.0.0.1:15000", config_store_url="tcp://127.0.0.1:16000",
                     protocol="device_sdma", world_size=8, dram_size="1GB")
    return p


@needs_real
def test_real_local_config_accepts_the_fields():
    lc = mm.build_local_config(REAL, mm.read_conf(_write_local_conf()))
    assert lc.protocol == "device_sdma" and lc.world_size == 8 and lc.meta_service_url == "tcp://127.0.0.1:15000"
    with pytest.raises(ConfigError, match="unknown MemCache LocalConfig field"):
        mm.build_local_config(REAL, {"colour": "blue"})
    with pytest.raises(ConfigError, match="expected int"):
        mm.build_local_config(REAL, {"world_size": "many"})


# ----------------------------------------------------------------------------- (2) behaviour via the double


def test_host_memory_round_trip_uses_h2g_g2h(fake):
    store = make_store(fake)
    src, sc_s = host_pages(6, 4, 128, fill=2)
    dst, sc_d = host_pages(6, 4, 128)
    store.register(src.ctypes.data, src.nbytes)
    store.register(dst.ctypes.data, dst.nbytes)
    k = [f"rt-{i}" for i in range(6)]
    assert store.put(k, sc_s).tolist() == [base.OK] * 6
    assert store.exists(k + ["nope"]).tolist() == [True] * 6 + [False]
    assert store.exists_prefix(["rt-0", "nope", "rt-1"]) == 1
    assert store.get(k, sc_d).tolist() == [base.OK] * 6
    assert np.array_equal(dst, src)
    dirs = [args[3] for name, args, _ in fake.clients[0].calls if name.endswith("_layers")]
    assert dirs == [fake.H2G, fake.G2H]
    assert store.stats()["get_bytes"] == src.nbytes


def test_device_memory_uses_l2g_g2l_and_host_staging_uses_h2g(fake):
    store = make_store(fake, memory="device")
    assert store.supports_device_memory
    kv, sc_kv = host_pages(4, 2, 256, fill=3)      # stands in for an NPU KV pool
    stage, sc_st = host_pages(4, 2, 256)           # a host staging buffer next to it
    fake.mark_device(kv.ctypes.data)
    store.register(kv.ctypes.data, kv.nbytes)                    # default kind: device
    store.register(stage.ctypes.data, stage.nbytes, memory="host")
    k = [f"dev-{i}" for i in range(4)]
    assert store.put(k, sc_kv).tolist() == [base.OK] * 4
    assert store.get(k, sc_st).tolist() == [base.OK] * 4
    assert np.array_equal(stage, kv)
    kv2 = kv.copy()
    kv[:] = 0
    assert store.get(k, sc_kv).tolist() == [base.OK] * 4
    assert np.array_equal(kv, kv2)
    dirs = [args[3] for name, args, _ in fake.clients[0].calls if name.endswith("_layers")]
    assert dirs == [fake.L2G, fake.G2H, fake.G2L]


def test_wrong_memory_kind_is_a_per_key_failure(fake):
    """Device memory registered as host: the double refuses H2G on it, the adapter reports failure."""
    store = make_store(fake, memory="host")
    kv, sc = host_pages(2, 2, 64, fill=4)
    fake.mark_device(kv.ctypes.data)
    store.register(kv.ctypes.data, kv.nbytes)
    assert store.put(["w-0", "w-1"], sc).tolist() == [base.INVALID_ARGUMENT] * 2
    assert not store.exists(["w-0", "w-1"]).any()


def test_per_key_return_codes(fake):
    store = make_store(fake)
    src, sc = host_pages(5, 2, 64, fill=5)
    dst, sc_d = host_pages(5, 2, 64)
    store.register(src.ctypes.data, src.nbytes)
    store.register(dst.ctypes.data, dst.nbytes)
    k = [f"codes-{i}" for i in range(5)]
    fake.fail_keys = {k[1]: -3016, k[2]: -3017, k[3]: -3004}
    assert store.put(k, sc).tolist() == [base.OK, base.NO_SPACE, base.UNAVAILABLE, base.TIMEOUT, base.OK]
    assert store.exists(k).tolist() == [True, False, False, False, True]
    fake.fail_keys = {}
    assert store.put(k[:1], sc.take([0])).tolist() == [base.OK]  # duplicate put: pool holds it
    fake.fail_keys = {k[4]: -1}
    st = store.get(k, sc_d)
    assert st.tolist() == [base.OK, base.NOT_FOUND, base.NOT_FOUND, base.NOT_FOUND, base.IO_ERROR]
    assert np.array_equal(page(dst, sc_d, 0), page(src, sc, 0))
    assert not page(dst, sc_d, 1).any()
    assert store.stats()["failed_by_status"][base.NOT_FOUND] == 3


def test_status_mapping_table():
    assert mm.status([0, -3006, -3000, -3007, -3102, -3019, -3013, -3004, -3104, -99]).tolist() == [
        base.OK, base.OK, base.INVALID_ARGUMENT, base.NOT_FOUND, base.NOT_FOUND, base.UNAVAILABLE,
        base.NO_SPACE, base.TIMEOUT, base.BUSY, base.IO_ERROR]
    assert mm.status([-3006], get=True).tolist() == [base.IO_ERROR]


def test_object_of_another_size_is_never_read(fake):
    """A client that copies what fits and reports 0 (lenient) would hand back a wrong page:
    verify_size (default) checks the stored size first."""
    fake.lenient_size = True
    store = make_store(fake)
    src, sc = host_pages(2, 2, 100, fill=6)
    store.register(src.ctypes.data, src.nbytes)
    assert store.put(["sz-0", "sz-1"], sc).tolist() == [base.OK] * 2
    big, sc_big = host_pages(2, 3, 100)  # another layout: 3 segments per page
    store.register(big.ctypes.data, big.nbytes)
    assert store.get(["sz-0", "sz-1", "sz-none"], ScatterList(
        np.vstack([sc_big.addrs, sc_big.addrs[:1]]), np.vstack([sc_big.sizes, sc_big.sizes[:1]]))).tolist() == [
        base.CORRUPT, base.CORRUPT, base.NOT_FOUND]
    assert not big.any()
    unsafe = make_store(fake, verify_size=False)
    unsafe.register(big.ctypes.data, big.nbytes)
    assert unsafe.get(["sz-0"], sc_big.take([0])).tolist() == [base.OK]  # what verify_size prevents


def test_limits_split_batches_and_refuse_too_many_segments(fake):
    store = make_store(fake)
    src, sc = host_pages(1100, 1, 8, fill=7)
    dst, sc_d = host_pages(1100, 1, 8)
    store.register(src.ctypes.data, src.nbytes)
    store.register(dst.ctypes.data, dst.nbytes)
    k = [f"lim-{i}" for i in range(1100)]
    assert (store.put(k, sc) == base.OK).all()
    assert (store.get(k, sc_d) == base.OK).all() and np.array_equal(dst, src)
    sizes = [len(args[0]) for name, args, _ in fake.clients[0].calls if name == "batch_put_from_layers"]
    assert sizes == [512, 512, 76]
    many, sc_many = host_pages(1, 256, 4, fill=8)
    store.register(many.ctypes.data, many.nbytes)
    assert store.put(["lim-many"], sc_many).tolist() == [base.TOO_LARGE]


def test_calls_are_bounded_by_a_deadline(fake):
    store = make_store(fake, timeout_s=0.2, workers=1)
    src, sc = host_pages(2, 1, 64, fill=9)
    store.register(src.ctypes.data, src.nbytes)
    client = fake.clients[0]
    gate = threading.Event()
    real_put = client.batch_put_from_layers
    client.batch_put_from_layers = lambda *a, **kw: (gate.wait(30), real_put(*a, **kw))[1]
    assert store.put(["slow-0", "slow-1"], sc).tolist() == [base.TIMEOUT] * 2
    assert store.put(["slow-0", "slow-1"], sc).tolist() == [base.UNAVAILABLE] * 2  # stuck: fail fast
    gate.set()
    assert store.quiesce(10)
    assert store.stats()["timeouts"] == 1


def test_init_failure_is_a_store_error_naming_cann():
    fake = FakeMemcacheModule(init_rc=-1)
    with pytest.raises(StoreError) as ei:
        make_store(fake)
    msg = str(ei.value)
    assert "init(device 0) failed (rc=-1)" in msg and "CANN" in msg and "ASCEND_HOME_PATH" in msg
    assert "libascendcl.so" in msg and "without the pool" in msg


def test_url_parsing(tmp_path):
    conf = _write_local_conf(str(tmp_path))
    fields, kw = mm.parse(open_store.__globals__["parse_url"](
        f"memcache://?config={conf}&device=3&protocol=host_rdma&memory=host&timeout=7&verify=0"))
    assert fields["protocol"] == "host_rdma" and fields["meta_service_url"] == "tcp://127.0.0.1:15000"
    assert fields["config_store_url"] == "tcp://127.0.0.1:16000" and fields["dram_size"] == "1GB"
    assert kw["device_id"] == 3 and kw["memory"] == "host" and kw["timeout_s"] == 7.0 and not kw["verify_size"]
    with pytest.raises(ConfigError, match="names no MetaService"):
        open_store("memcache://?device=0")
    with pytest.raises(ConfigError, match="use device or host"):
        open_store(f"memcache://?config={conf}&memory=gpu")
    with pytest.raises(ConfigError, match="does not exist"):
        open_store("memcache://?config=/nonexistent/mmc.conf")


def test_not_importable_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "memcache_hybrid", None)
    with pytest.raises(StoreError, match=r'pip install "kvdirect\[memcache\]"'):
        open_store("memcache://?meta_service_url=tcp://127.0.0.1:1")


# ----------------------------------------------------------------------------- (3) real MetaService


@needs_real
def test_meta_service_unreachable_is_immediate_store_error():
    from kvdirect.services import free_port

    port = free_port()
    with pytest.raises(StoreError, match=f"kvdirect memcache meta --url tcp://127.0.0.1:{port}"):
        open_store(f"memcache://?meta_service_url=tcp://127.0.0.1:{port}")


_CLIENT = textwrap.dedent("""
    import sys
    from kvdirect.errors import StoreError
    from kvdirect.stores import open_store
    try:
        open_store(sys.argv[1])
    except StoreError as e:
        print("STOREERROR", e, flush=True)
        sys.exit(0)
    print("OPENED", flush=True)
    sys.exit(3)
""")


@needs_real
def test_real_client_init_without_cann_fails_cleanly(tmp_path):
    """A real MetaService on loopback; a real client in its own process: init fails (no Ascend
    driver / CANN here) and surfaces as kvdirect's StoreError: no hang, no crash."""
    from kvdirect.services import read_conf, start_memcache_meta

    if os.path.exists("/usr/local/Ascend/driver/version.info") and os.environ.get("ASCEND_HOME_PATH"):
        pytest.skip("an Ascend driver and CANN are present: init would succeed here")
    with start_memcache_meta(workdir=tmp_path) as svc:
        conf = read_conf(svc.config_path)
        url = (f"memcache://?meta_service_url={conf['ock.mmc.meta_service_url']}"
               f"&config_store_url={conf['ock.mmc.meta_service.config_store_url']}"
               "&protocol=host_shm&world_size=1&dram_size=64MB&device=0&init_timeout=60")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        r = subprocess.run([sys.executable, "-c", _CLIENT, url], capture_output=True, text=True, timeout=120,
                           env=env)
        assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        assert "STOREERROR" in r.stdout
        msg = r.stdout
        assert "init(device 0) failed" in msg and "CANN" in msg and "ASCEND_HOME_PATH=" in msg
        assert conf["ock.mmc.meta_service_url"] in msg
        assert svc.alive()  # the service survived the client's failure


@needs_real
def test_cli_meta_serves_until_stopped(tmp_path):
    from kvdirect.services import Service, _spawn, free_ports, read_conf, wait_port

    meta_port, cs_port = free_ports(2)
    conf = tmp_path / "meta.conf"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = _spawn([sys.executable, "-m", "kvdirect", "memcache", "meta", "--url", f"tcp://127.0.0.1:{meta_port}",
                   "--config", str(conf), "--config-store-port", str(cs_port)], tmp_path / "log", env, tmp_path)
    svc = Service("cli-meta", proc, "127.0.0.1", {"meta": meta_port}, tmp_path / "log")
    try:
        assert wait_port("127.0.0.1", meta_port, 30, proc), svc.log_tail()
        c = read_conf(conf)
        assert c["ock.mmc.meta_service_url"] == f"tcp://127.0.0.1:{meta_port}"
        assert c["ock.mmc.meta_service.config_store_url"] == f"tcp://127.0.0.1:{cs_port}"
    finally:
        svc.stop()
    assert not svc.alive()


# ----------------------------------------------------------------------------- FlakyStore


def _flaky_setup(fake, **kw):
    inner = make_store(fake)
    src, sc = host_pages(200, 2, 32, fill=10)
    dst, sc_d = host_pages(200, 2, 32)
    inner.register(src.ctypes.data, src.nbytes)
    inner.register(dst.ctypes.data, dst.nbytes)
    return FlakyStore(inner, **kw), src, sc, dst, sc_d, [f"fl-{i}" for i in range(200)]


def test_flaky_store_failed_gets_are_reported_and_scribbled(fake):
    flaky, src, sc, dst, sc_d, k = _flaky_setup(fake, fail_rate=0.3, seed=1, fail_ops=("get",))
    assert (flaky.put(k, sc) == base.OK).all()
    st = flaky.get(k, sc_d)
    failed = st != base.OK
    assert 30 < failed.sum() < 90 and (st[failed] == base.IO_ERROR).all()
    assert flaky.injected["get"] == failed.sum()
    for i in range(200):
        same = np.array_equal(page(dst, sc_d, i), page(src, sc, i))
        assert same != failed[i]  # OK pages are exact; failed pages hold garbage
    # reproducible with the same seed
    # keep every returned array alive: the scatter lists point into them
    again, src2, sc2, dst2, sc2_d, _ = _flaky_setup(FakeMemcacheModule(), fail_rate=0.3, seed=1, fail_ops=("get",))
    assert (again.put(k, sc2) == base.OK).all()
    assert np.array_equal(again.get(k, sc2_d) != base.OK, failed)


def test_flaky_store_put_failures_and_put_lands(fake):
    flaky, src, sc, dst, sc_d, k = _flaky_setup(fake, fail_rate=0.5, seed=2, fail_ops=("put",), mode="timeout")
    st = flaky.put(k, sc)
    assert set(np.unique(st).tolist()) == {base.OK, base.TIMEOUT}
    assert np.array_equal(flaky.exists(k), st == base.OK)  # failed puts were not stored
    lands, src2, sc2, *rest = _flaky_setup(FakeMemcacheModule(), fail_rate=0.5, seed=2, fail_ops=("put",),
                                     put_lands=True)
    st = lands.put(k, sc2)
    assert (st != base.OK).any() and lands.exists(k).all()  # reported failed, yet stored


def test_flaky_store_down_and_delay(fake):
    flaky, src, sc, dst, sc_d, k = _flaky_setup(fake, delay_s=0.01, fail_ops=())
    assert (flaky.put(k, sc) == base.OK).all()
    flaky.down = True
    assert (flaky.get(k, sc_d) == base.UNAVAILABLE).all()
    with pytest.raises(StoreError, match="down"):  # the store contract: no answer is not "absent"
        flaky.exists(k)
    assert not dst.any()
    flaky.down = False
    assert (flaky.get(k, sc_d) == base.OK).all() and np.array_equal(dst, src)
    with pytest.raises(ValueError):
        FlakyStore(flaky.inner, mode="explode")


def test_flaky_store_exists_failures_are_whole_calls(fake):
    """An injected exists failure is a pool that did not answer (StoreError), one draw per call."""
    flaky, src, sc, dst, sc_d, k = _flaky_setup(fake, fail_rate=0.5, seed=4, fail_ops=("exists",))
    assert (flaky.put(k, sc) == base.OK).all()
    answered = raised = 0
    for _ in range(40):
        try:
            assert flaky.exists(k).all()  # an answer is the whole, true answer
            answered += 1
        except StoreError:
            raised += 1
    assert answered > 5 and raised > 5 and flaky.injected["exists"] == raised


def test_error_answers_are_reported_not_guessed(fake):
    """batch_is_exist answering -1 for one key, remove_batch failing a present key, put / get of the
    byte API failing: each is a StoreError naming the MemCache code, never "absent" / "0 removed"."""
    store = make_store(fake)
    assert store.put_bytes("e-0", b"zero") and store.put_bytes("e-1", b"one")
    client = fake.clients[0]
    real_exist, real_remove, real_put, real_get = (client.batch_is_exist, client.remove_batch, client.put,
                                                   client.get)
    client.batch_is_exist = lambda keys: [1, -1][:len(keys)]
    with pytest.raises(StoreError, match=r"batch_is_exist failed for 1 of 2 keys.*'e-1'.*-1 \(IO_ERROR\)"):
        store.exists(["e-0", "e-1"])
    client.batch_is_exist = real_exist
    client.remove_batch = lambda keys: [0, -3104][:len(keys)]  # LEASE_NOT_EXPIRED
    with pytest.raises(StoreError, match=r"remove_batch failed for 1 of 2 keys.*-3104 \(BUSY\)"):
        store.remove(["e-0", "e-1"])
    client.remove_batch = real_remove
    assert store.remove(["e-1", "e-absent"]) == 1
    client.put = lambda key, buf, replicateConfig=None: -3013  # EXCEED_CAPACITY: no room -> False
    assert store.put_bytes("e-2", b"two") is False
    client.put = lambda key, buf, replicateConfig=None: -3004  # TIMEOUT inside the client
    with pytest.raises(StoreError, match=r"put\('e-2'\) failed: -3004 \(TIMEOUT\)"):
        store.put_bytes("e-2", b"two")
    client.put = real_put
    client.get = lambda key: b""  # a read that delivered nothing for a key that exists
    with pytest.raises(StoreError, match="delivered nothing .the key exists"):
        store.get_bytes("e-0")
    assert store.get_bytes("e-absent") is None  # b"" and is_exist 0: really absent
    client.get = real_get
    assert store.get_bytes("e-0") == b"zero"
