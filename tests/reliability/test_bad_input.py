"""Bad input across the public API and the CLI: each case gets a clear error (type and message
pattern), and afterwards nothing is corrupted: the shared pool's sentinel objects read back
byte for byte, no pin or reservation is left behind, the index passes its invariant check and
a request served through the cache still gets exactly the right KV.

A case is (id, action, expected exception or None, message pattern). Actions returning normally
assert their own outcome (per-key statuses, misses)."""
from __future__ import annotations

import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from kvdirect import KVLayout
from kvdirect import keys as K
from kvdirect.cache import KVDirectCache
from kvdirect.config import CacheConfig
from kvdirect.copy import CopyEngine
from kvdirect.errors import ConfigError, LayoutMismatchError, StoreError
from kvdirect.index import PrefixIndex
from kvdirect.stores import ScatterList, open_store
from kvdirect.stores.base import INVALID_ARGUMENT, OK
from kvdirect.stores.shm import destroy_pool

from _rel import Device, Driver, make_cache, tokens_of, uniq

P = 4
SENTINELS = {f"sentinel-{i}": bytes([i]) * (1000 * (i + 1)) for i in range(6)}


class World:
    """A pool with known content and an engine using it; `intact()` proves nothing was damaged."""

    def __init__(self):
        self.name = uniq("relbad")
        self.url = f"shm://{self.name}?size=8MiB&block=4KiB"
        self.store = open_store(self.url)
        for k, v in SENTINELS.items():
            assert self.store.put_bytes(k, v)
        self.dev = Device(P, slots=512)
        self.cache = make_cache(self.dev, self.url, allow_no_store=False)
        self.doc = tokens_of(P * 8 + 1, 1)
        Driver(self.cache, self.dev).serve(self.doc)
        self.cache.flush()
        self.page_bytes = self.dev.layout.page_bytes

    def intact(self):
        for k, v in SENTINELS.items():
            st, data = self.store.get_bytes_status(k)
            assert st == OK and data == v, f"sentinel {k} damaged"
        s = self.store.stats()
        assert s["pins"] == 0 and s["writing"] == 0, s
        assert self.cache.index._check() == ""
        self.cache.evict(10**6)  # next request must come from the pool
        drv = Driver(self.cache, self.dev)
        drv.serve(self.doc)
        assert drv.wrong_bytes == 0 and drv.loaded_tokens == 8 * P
        self.cache.flush()

    def close(self):
        self.cache.close()
        self.store.close()
        destroy_pool(self.name, missing_ok=True)


@pytest.fixture(scope="module")
def world():
    w = World()
    yield w
    w.close()


@pytest.fixture
def side_pool():
    """A separate pool for cases that damage a file (the shared one must stay intact)."""
    name = uniq("relside")
    with open_store(f"shm://{name}?size=2MiB&block=4KiB") as s:
        s.put_bytes("k", b"v")
        path = s.path
    yield name, path
    destroy_pool(name, missing_ok=True)


def sl(*bufs) -> ScatterList:
    s = ScatterList(np.array([[b.ctypes.data] for b in bufs], np.uint64),
                    np.array([[b.nbytes] for b in bufs], np.uint64))
    object.__setattr__(s, "_keep", bufs)
    return s


def kv(n=64, heads=2, dim=8, dtype=np.float32, layers=2):
    return [np.zeros((n, heads, dim), dtype) for _ in range(layers)]


def _get_size_mismatch(w):
    out = np.full(999, 7, np.uint8)
    st = w.store.get(["sentinel-0"], sl(out))
    assert st.tolist() == [INVALID_ARGUMENT] and (out == 7).all()  # nothing copied


def _other_layout_instance(w):
    dev = Device(P)
    dev.k = [np.zeros((512, 2, 16), np.float32) for _ in range(2)]  # another head_dim
    dev.v = [np.zeros((512, 2, 16), np.float32) for _ in range(2)]
    dev.layout = KVLayout.from_mha(dev.k, dev.v, page_size=P)
    c = make_cache(dev, w.store)
    try:
        m = c.match(w.doc)
        assert m.pool_len == 0 and m.device_len == 0  # a fingerprint mismatch is a miss, never a read
    finally:
        c._writer.shutdown()


def _other_page_size_instance(w):
    dev = Device(8)
    c = make_cache(dev, w.store)
    try:
        assert c.match(w.doc).pool_len == 0
    finally:
        c._writer.shutdown()


def _other_model_instance(w):
    dev = Device(P)
    c = make_cache(dev, w.store, model="another-model")
    try:
        assert c.match(w.doc).pool_len == 0
    finally:
        c._writer.shutdown()


def _poke(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def _damaged(side, damage):
    name, path = side
    damage(path)
    open_store(f"shm://{name}")


def _env_config(text):
    old = os.environ.get("KVDIRECT_CONFIG")
    os.environ["KVDIRECT_CONFIG"] = text
    try:
        CacheConfig.from_env()
    finally:
        if old is None:
            del os.environ["KVDIRECT_CONFIG"]
        else:
            os.environ["KVDIRECT_CONFIG"] = old


CASES = [
    # ---- store URLs
    ("unknown-scheme", lambda w: open_store("ftp://host/x"), ConfigError, r"unknown store scheme 'ftp'.*known"),
    ("not-a-url", lambda w: open_store("kvdirect"), ConfigError, r"must look like scheme://"),
    ("bad-pool-name", lambda w: open_store("shm://bad$name"), ConfigError, r"bad shm pool name"),
    ("bad-size", lambda w: open_store("shm://x?size=banana"), ConfigError, r"bad size 'banana'"),
    ("negative-size", lambda w: open_store("shm://x?size=-5"), ConfigError, r"bad size"),
    ("pool-too-small", lambda w: open_store(f"shm://{uniq()}?size=10KiB"), ConfigError, r"too small"),
    ("block-not-pow2", lambda w: open_store(f"shm://{uniq()}?size=4MiB&block=5000"), ConfigError, r"power of two"),
    ("pin-slots-range", lambda w: open_store(f"shm://{uniq()}?size=4MiB&pins=3"), ConfigError, r"pin slots"),
    ("unknown-url-param", lambda w: open_store("shm://x?sise=1GiB"), ConfigError, r"unknown parameter.*sise"),
    ("bad-checksum-flag", lambda w: open_store("shm://x?checksum=maybe"), ConfigError, r"checksum='maybe'"),
    ("create-no-missing", lambda w: open_store(f"shm://{uniq()}?create=no"), StoreError,
     r"does not exist; create it with `kvdirect pool create"),
    ("create-yes-existing", lambda w: open_store(f"shm://{w.name}?create=yes"), ConfigError, r"already exists"),
    ("mooncake-no-port", lambda w: open_store("mooncake://127.0.0.1?metadata=http://h:1/m"), ConfigError,
     r"HOST:PORT"),
    ("mooncake-no-metadata", lambda w: open_store("mooncake://127.0.0.1:5000"), ConfigError, r"metadata="),
    ("mooncake-protocol", lambda w: open_store("mooncake://127.0.0.1:5000?metadata=http://h:1/m&protocol=udp"),
     ConfigError, r"tcp or rdma"),
    ("memcache-missing-config", lambda w: open_store("memcache://?config=/nonexistent/mmc.conf"), ConfigError,
     r"does not exist"),
    # ---- keys and scatter lists
    ("key-too-long", lambda w: w.store.put_bytes("k" * 300, b"x"), ConfigError, r"1\.\.255 bytes, got 300"),
    ("key-empty", lambda w: w.store.exists([""]), ConfigError, r"1\.\.255 bytes, got 0"),
    ("key-not-str", lambda w: w.store.get_bytes(b"sentinel-0"), ConfigError, r"must be str, got bytes"),
    ("scatter-rows-vs-keys", lambda w: w.store.put(["a", "b"], sl(np.zeros(8, np.uint8))), ConfigError,
     r"1 rows for 2 keys"),
    ("scatter-shape-mismatch", lambda w: ScatterList(np.zeros((2, 2)), np.zeros((2, 3))), ConfigError,
     r"same shape"),
    ("get-size-mismatch", _get_size_mismatch, None, None),
    # ---- layouts (dtype, shape, strides, page alignment, slots)
    ("kv-count-mismatch", lambda w: KVLayout.from_mha(kv(layers=2), kv(layers=3), page_size=P),
     LayoutMismatchError, r"2 K buffers but 3 V buffers"),
    ("kv-dtype-mismatch", lambda w: KVLayout.from_mha(kv()[:1] + kv(dtype=np.float16)[:1], kv(), page_size=P),
     LayoutMismatchError, r"layer 1 has dtype float16"),
    ("kv-non-contiguous", lambda w: KVLayout.from_mha([np.zeros((64, 2, 16), np.float32)[:, :, ::2]] * 2, kv(),
                                                     page_size=P), ConfigError, r"non-contiguous pages"),
    ("kv-not-an-array", lambda w: KVLayout.from_mha([[1, 2]], [[1, 2]], page_size=P), ConfigError,
     r"expected a torch.Tensor or numpy.ndarray, got list"),
    ("page-size-zero", lambda w: KVLayout.from_mha(kv(), kv(), page_size=0), ConfigError, r"page_size must be >= 1"),
    ("slot-negative", lambda w: w.dev.layout.plan([-4]), ConfigError, r"slot -4\) is out of range"),
    ("slot-out-of-range", lambda w: w.dev.layout.plan([512]), ConfigError, r"out of range"),
    ("slot-not-page-aligned", lambda w: w.dev.layout.plan([2]), ConfigError, r"not page aligned"),
    ("slot-float", lambda w: w.dev.layout.plan(np.array([4.0])), ConfigError, r"must be integers"),
    ("layer-out-of-range", lambda w: w.dev.layout.plan_layer([0], 7), ConfigError, r"layer 7 out of range"),
    ("other-head-dim-instance", _other_layout_instance, None, None),
    ("other-page-size-instance", _other_page_size_instance, None, None),
    ("other-model-instance", _other_model_instance, None, None),
    # ---- cache manager, index, keys, config
    ("tokens-2d", lambda w: w.cache.match(np.zeros((2, 4), np.int32)), ConfigError, r"1-D"),
    ("tokens-float", lambda w: w.cache.match(np.zeros(8, np.float32)), ConfigError, r"must be integers"),
    ("write-back-short-slots", lambda w: w.cache.write_back(tokens_of(8, 3), np.arange(4), None), ConfigError,
     r"slot per token"),
    ("cache-page-size-mismatch", lambda w: KVDirectCache(w.dev.layout, None, page_size=8,
                                                        config=CacheConfig(store=None, model="m")), ConfigError,
     r"differs from the layout"),
    ("cache-without-model", lambda w: KVDirectCache(w.dev.layout, None, config=CacheConfig(store=None)),
     ConfigError, r"model identity.*CacheConfig\(model=\.\.\.\)"),
    ("index-page-size-zero", lambda w: PrefixIndex(0), ConfigError, r"page_size must be >= 1"),
    ("digests-float-tokens", lambda w: K.page_digests(np.arange(8, dtype=np.float32), P), ConfigError,
     r"tokens must be int32"),
    ("fingerprint-tp-rank", lambda w: K.LayoutFingerprint(model="m", tp_size=2, tp_rank=2, layout_kind="mha",
                                                          dtype="float16", page_size=4, num_layers=1, kv_heads=1,
                                                          head_dim=8), ConfigError, r"tp_rank must be in \[0"),
    ("config-unknown-key", lambda w: CacheConfig.from_dict({"stroe": "shm://x"}), ConfigError,
     r"unknown kvdirect config key.*stroe"),
    ("config-zero-bound", lambda w: CacheConfig(max_inflight_pages=0), ConfigError, r"positive integer"),
    ("config-env-bad-json", lambda w: _env_config("{not json"), ConfigError, r"not valid JSON"),
    ("copy-engine-device", lambda w: CopyEngine(device="tpu"), ConfigError, r"must be 'cpu' or 'cuda"),
]

FILE_CASES = [
    ("corrupted-header-magic", lambda p: _poke(p, 0, b"XXXXXXXX"), StoreError, r"bad magic.*kvdirect pool destroy"),
    ("corrupted-header-version", lambda p: _poke(p, 8, struct.pack("<I", 7)), StoreError, r"format v7"),
    ("corrupted-header-geometry", lambda p: _poke(p, 40, struct.pack("<Q", 10**9)), StoreError,
     r"inconsistent"),
    ("truncated-pool-file", lambda p: os.truncate(p, 8192), StoreError, r"truncated"),
    ("world-writable-file", lambda p: os.chmod(p, 0o666), StoreError, r"mode 666 .*writable.*chmod 600"),
]

CLI_CASES = [
    ("cli-info-missing-pool", ["pool", "info", "nonexistent-relpool"], r"does not exist"),
    ("cli-create-bad-name", ["pool", "create", "bad/name"], r"bad shm pool name"),
    ("cli-create-bad-size", ["pool", "create", "relcli", "--size", "banana"], r"bad size"),
    ("cli-create-bad-block", ["pool", "create", "relcli", "--size", "4MiB", "--block-size", "5000"],
     r"power of two"),
    ("cli-unknown-command", ["frobnicate"], r"invalid choice"),
]


def test_the_table_is_big_enough():
    assert len(CASES) + len(FILE_CASES) + len(CLI_CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, case):
    _, action, exc, pattern = case
    if exc is None:
        action(world)
    else:
        with pytest.raises(exc) as ei:
            action(world)
        assert re.search(pattern, str(ei.value)), f"unclear message: {ei.value}"
    world.intact()


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_damaged_pool_file(world, side_pool, case):
    _, damage, exc, pattern = case
    with pytest.raises(exc) as ei:
        _damaged(side_pool, damage)
    assert re.search(pattern, str(ei.value)), f"unclear message: {ei.value}"
    world.intact()


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input(world, case):
    _, args, pattern = case
    r = subprocess.run([sys.executable, "-m", "kvdirect", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    assert re.search(pattern, out), out
    destroy_pool("relcli", missing_ok=True)
    world.intact()


def test_null_address_in_scatter_list_is_refused(world):
    with pytest.raises(ConfigError, match="null"):
        w = world
        w.store.get(["sentinel-0"], ScatterList(np.zeros((1, 1), np.uint64), np.full((1, 1), 1000, np.uint64)))
    world.intact()


def test_long_non_ascii_key_gives_config_error(world):
    key = "0" * 39 + "\u00e9" + "0" * 300  # found by test_fuzz.py
    with pytest.raises(ConfigError, match=r"1\.\.255 bytes"):
        world.store.exists([key])
    world.intact()
