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
    ("page-size-zero", lambda w: KVLayout.from_mha(kv(), kv(), page_size=0), ConfigError,
     r"page_size must be a positive int"),
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

# Every subcommand (`kvdirect --help`) with every argument that can be wrong. In the arguments,
# {missing} is a pool name nobody uses (checked not to be created), {tmp} a fresh folder (checked
# to stay empty: nothing written), {file} an existing file outside it, {world} the suite's pool.
MC = "mooncake://127.0.0.1:1?metadata=http://127.0.0.1:2/metadata"  # nothing listens on port 1
LOCAL = ["memcache", "local-conf", "--meta", "tcp://127.0.0.1:15000", "--config-store", "tcp://127.0.0.1:16000"]
CLI_CASES = [
    # ---- kvdirect
    ("cli-unknown-command", ["frobnicate"], r"invalid choice: 'frobnicate'"),
    ("cli-unknown-option", ["--frobnicate"], r"unrecognized arguments: --frobnicate"),
    # ---- doctor
    ("cli-doctor-extra-arg", ["doctor", "now"], r"unrecognized arguments: now"),
    ("cli-doctor-unknown-option", ["doctor", "--yaml"], r"unrecognized arguments: --yaml"),
    # ---- demo
    ("cli-demo-prompts-zero", ["demo", "--prompts", "0"], r"--prompts: must be a positive integer, got 0"),
    ("cli-demo-prompts-text", ["demo", "--prompts", "many"], r"--prompts: expected an integer, got 'many'"),
    ("cli-demo-prompt-len-negative", ["demo", "--prompt-len", "-5"], r"--prompt-len: must be a positive integer"),
    ("cli-demo-prompt-len-one-page", ["demo", "--prompt-len", "100"], r"at least two pages \(128 tokens\)"),
    ("cli-demo-reuse-range", ["demo", "--reuse", "0,150%"], r"reuse level '150%' is outside 0..100%"),
    ("cli-demo-reuse-text", ["demo", "--reuse", "half"], r"'half' is not a number"),
    ("cli-demo-reuse-empty", ["demo", "--reuse", ","], r"at least one reuse level"),
    ("cli-demo-output-len-zero", ["demo", "--output-len", "0"], r"--output-len: must be a positive integer"),
    ("cli-demo-page-size-zero", ["demo", "--page-size", "0"], r"--page-size: must be a positive integer, got 0"),
    ("cli-demo-store-scheme", ["demo", "--store", "bogus://x"], r"unknown store scheme 'bogus'"),
    ("cli-demo-store-not-url", ["demo", "--store", "kvdirect"], r"must look like scheme://"),
    ("cli-demo-store-missing-pool", ["demo", "--store", "shm://{missing}"],
     r"shm pool '.*' does not exist; create it with `kvdirect pool create"),
    ("cli-demo-store-bad-pool-name", ["demo", "--store", "shm://bad$name"], r"bad shm pool name"),
    ("cli-demo-store-bad-param", ["demo", "--store", "shm://{world}?sise=1GiB"], r"unknown parameter.*sise"),
    ("cli-demo-store-unreachable", ["demo", "--store", MC], r"cannot reach the Mooncake master"),
    ("cli-demo-too-big", ["demo", "--prompts", "100000", "--prompt-len", "100000"], r"GiB and .* available"),
    ("cli-demo-device", ["demo", "--device", "tpu"], r"--device: invalid choice: 'tpu'"),
    ("cli-demo-modes-no-baseline", ["demo", "--modes", "kvdirect"], r"includes baseline"),
    ("cli-demo-modes-unknown", ["demo", "--modes", "baseline,turbo"], r"comma list of baseline, ideal, kvdirect"),
    ("cli-demo-modes-sglang-only", ["demo", "--modes", "baseline,hicache"], r"exist only with --engine sglang"),
    ("cli-demo-engine", ["demo", "--engine", "vllm"], r"--engine: invalid choice: 'vllm'"),
    ("cli-demo-model-size", ["demo", "--model-size", "huge"], r"--model-size: invalid choice"),
    ("cli-demo-seed-negative", ["demo", "--seed", "-1"], r"--seed: must be >= 0"),
    ("cli-demo-json-no-folder", ["demo", "--json", "{tmp}/no/demo.json"], r"--json: folder .* does not exist"),
    ("cli-demo-json-is-folder", ["demo", "--json", "{tmp}"], r"--json: .* is a folder"),
    ("cli-demo-plot-no-folder", ["demo", "--plot", "{tmp}/no/demo.png"], r"--plot: folder .* does not exist"),
    # ---- bench
    ("cli-bench-no-benchmark", ["bench"], r"required: BENCH"),
    ("cli-bench-unknown", ["bench", "store"], r"invalid choice: 'store'"),
    ("cli-bench-requests-zero", ["bench", "load", "--requests", "0"], r"--requests: must be a positive integer"),
    ("cli-bench-page-size-zero", ["bench", "load", "--page-size", "0"], r"--page-size: must be a positive integer"),
    ("cli-bench-prompt-len-negative", ["bench", "load", "--prompt-len", "-5"], r"--prompt-len: must be a positive"),
    ("cli-bench-prompt-len-below-page", ["bench", "load", "--prompt-len", "10"], r"shorter than one page"),
    ("cli-bench-layers-zero", ["bench", "load", "--layers", "0"], r"--layers: must be a positive integer"),
    ("cli-bench-kv-heads-text", ["bench", "load", "--kv-heads", "two"], r"--kv-heads: expected an integer"),
    ("cli-bench-head-dim-zero", ["bench", "load", "--head-dim", "0"], r"--head-dim: must be a positive integer"),
    ("cli-bench-rounds-zero", ["bench", "load", "--rounds", "0"], r"--rounds: must be a positive integer"),
    ("cli-bench-too-big", ["bench", "load", "--requests", "100000"], r"GiB of memory and .* available"),
    ("cli-bench-store-scheme", ["bench", "load", "--store", "bogus://x"], r"unknown store scheme 'bogus'"),
    ("cli-bench-store-missing-pool", ["bench", "load", "--store", "shm://{missing}"],
     r"shm pool '.*' does not exist"),
    ("cli-bench-store-unreachable", ["bench", "load", "--store", MC], r"cannot reach the Mooncake master"),
    ("cli-bench-json-no-folder", ["bench", "load", "--json", "{tmp}/no/b.json"], r"--json: folder .* does not exist"),
    # ---- pool
    ("cli-pool-no-action", ["pool"], r"required: ACTION"),
    ("cli-create-bad-name", ["pool", "create", "bad/name"], r"bad shm pool name"),
    ("cli-create-bad-size", ["pool", "create", "{missing}", "--size", "banana"], r"bad size 'banana'"),
    ("cli-create-zero-size", ["pool", "create", "{missing}", "--size", "0"], r"--size: must be a size above 0"),
    ("cli-create-too-small", ["pool", "create", "{missing}", "--size", "10KiB"], r"too small"),
    ("cli-create-bad-block", ["pool", "create", "{missing}", "--size", "4MiB", "--block-size", "5000"],
     r"power of two"),
    ("cli-create-existing", ["pool", "create", "{world}"], r"already exists"),
    ("cli-info-missing-pool", ["pool", "info", "{missing}"], r"does not exist"),
    ("cli-info-bad-name", ["pool", "info", ".hidden"], r"bad shm pool name"),
    ("cli-destroy-missing-pool", ["pool", "destroy", "{missing}"], r"does not exist"),
    ("cli-destroy-bad-name", ["pool", "destroy", "a b"], r"bad shm pool name"),
    ("cli-audit-no-target", ["pool", "audit"], r"required: URL\|NAME"),
    ("cli-audit-bad-name", ["pool", "audit", "bad$name"], r"bad shm pool name"),
    ("cli-audit-scheme", ["pool", "audit", "bogus://x"], r"unknown store scheme 'bogus'"),
    ("cli-audit-missing-pool", ["pool", "audit", "{missing}"], r"shm pool '.*' does not exist"),
    ("cli-audit-bad-param", ["pool", "audit", "shm://{world}?sise=1GiB"], r"unknown parameter.*sise"),
    ("cli-audit-progress-negative", ["pool", "audit", "{world}", "--progress-every", "-1"],
     r"--progress-every: must be >= 0"),
    ("cli-audit-max-keys-text", ["pool", "audit", "{world}", "--max-keys", "all"], r"--max-keys: expected an integer"),
    ("cli-audit-unreachable", ["pool", "audit", MC], r"cannot reach the Mooncake master"),
    ("cli-audit-admin-url", ["pool", "audit", MC + "&admin=ftp://h"], r"admin='ftp://h'.*http://HOST:PORT"),
    ("cli-audit-memcache-unreachable", ["pool", "audit", "memcache://?meta_service_url=tcp://127.0.0.1:1"],
     r"cannot reach the MemCache MetaService"),
    # ---- memcache
    ("cli-memcache-no-action", ["memcache"], r"required: ACTION"),
    ("cli-meta-url-scheme", ["memcache", "meta", "--url", "http://127.0.0.1:15000"], r"tcp://127.0.0.1:15000"),
    ("cli-meta-url-no-port", ["memcache", "meta", "--url", "tcp://127.0.0.1"], r"expected a MetaService URL"),
    ("cli-meta-config-store-port", ["memcache", "meta", "--config-store-port", "0"], r"TCP port in 1..65535"),
    ("cli-meta-metrics-port", ["memcache", "meta", "--metrics-port", "70000"], r"TCP port in 1..65535"),
    ("cli-meta-same-ports", ["memcache", "meta", "--workdir", "{tmp}/w", "--url", "tcp://127.0.0.1:15000",
                             "--config-store-port", "15000"], r"must differ from the meta port"),
    ("cli-meta-log-level", ["memcache", "meta", "--log-level", "loud"], r"--log-level: invalid choice"),
    ("cli-meta-config-is-folder", ["memcache", "meta", "--config", "{tmp}"], r"is not a file"),
    ("cli-meta-config-and-url", ["memcache", "meta", "--config", "{file}", "--url", "tcp://127.0.0.1:15000"],
     r"exists: --url.* apply only when"),
    ("cli-local-conf-meta-url", [*LOCAL[:2], "--meta", "bogus://x", *LOCAL[4:]], r"expected a MetaService URL"),
    ("cli-local-conf-store-url", [*LOCAL[:4], "--config-store", "127.0.0.1:16000"], r"expected a MetaService URL"),
    ("cli-local-conf-missing-meta", ["memcache", "local-conf", *LOCAL[4:]], r"required: --meta"),
    ("cli-local-conf-protocol", [*LOCAL, "--protocol", "udp"], r"--protocol: invalid choice: 'udp'"),
    ("cli-local-conf-world-size", [*LOCAL, "--world-size", "0"], r"--world-size: must be a positive integer"),
    ("cli-local-conf-dram-size", [*LOCAL, "--dram-size", "lots"], r"bad size 'lots'"),
    ("cli-local-conf-output", [*LOCAL, "-o", "{tmp}/no/mmc.conf"], r"--output: folder .* does not exist"),
]


def cli_commands() -> set:
    """Every (sub)command `kvdirect --help` offers, e.g. ('pool', 'create')."""
    import argparse

    from kvdirect.cli import build_parser

    out = set()

    def walk(p, path):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out.add(path)
        for a in subs:
            for name, sp in a.choices.items():
                walk(sp, path + (name,))

    walk(build_parser(), ())
    return out


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


def _run_cli_case(case, root):
    """Run one CLI case in its own folder; returns (argv, result, missing pool name, output folder)."""
    name, args, _ = case
    missing = uniq("relcli")
    out_dir = root / name / "out"
    out_dir.mkdir(parents=True)
    existing = root / name / "meta.conf"
    existing.write_text("ock.mmc.meta_service_url = tcp://127.0.0.1:15000\n")
    argv = [a.format(missing=missing, tmp=out_dir, file=existing, world=_WORLD_NAME[0]) for a in args]
    r = subprocess.run([sys.executable, "-m", "kvdirect", *argv], capture_output=True, text=True, timeout=60,
                       cwd=out_dir)
    return argv, r, missing, out_dir


_WORLD_NAME = [None]


@pytest.fixture(scope="module")
def cli_results(world, tmp_path_factory):
    """Every CLI case, run as a real `python -m kvdirect` process, a few at a time."""
    from concurrent.futures import ThreadPoolExecutor

    _WORLD_NAME[0] = world.name
    root = tmp_path_factory.mktemp("cli")
    with ThreadPoolExecutor(max_workers=4) as ex:
        res = dict(zip([c[0] for c in CLI_CASES], ex.map(lambda c: _run_cli_case(c, root), CLI_CASES)))
    yield res
    for _, _, missing, _ in res.values():
        destroy_pool(missing, missing_ok=True)


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input(world, cli_results, case):
    """One line on stderr, nothing on stdout, exit 2 (1 where a named pool or service is missing),
    no traceback, and no work done: no pool created, nothing written."""
    argv, r, missing, out_dir = cli_results[case[0]]
    pattern = case[2]
    # exit 2: bad arguments or configuration; 1: the work failed (the named pool or service is not there)
    absent = re.search(r"pool '[^']*' does not exist|cannot reach", r.stderr)
    assert r.returncode == (1 if absent else 2), (argv, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.stdout == "", r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvdirect"), r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert not os.path.exists(f"/dev/shm/kvdirect-{missing}")  # no pool made by a failed command
    assert list(out_dir.iterdir()) == []                      # and nothing written
    world.intact()


def test_cli_table_covers_every_command():
    commands = cli_commands()
    assert {("doctor",), ("demo",), ("bench", "load"), ("pool", "create"), ("pool", "info"), ("pool", "destroy"),
            ("pool", "audit"), ("memcache", "meta"), ("memcache", "local-conf")} <= commands
    covered = set()
    for _, args, _ in CLI_CASES:
        covered |= {tuple(args[:n]) for n in (1, 2)}
    assert commands <= covered, f"commands without a bad-input case: {sorted(commands - covered)}"


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
