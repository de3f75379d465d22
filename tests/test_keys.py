"""Page keys: SGLang parity, chain property, input kinds, pool keys."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from array import array

import numpy as np
import pytest

import kvdirect
from kvdirect import _core, keys
from kvd_testutil import DATA
from kvdirect.errors import ConfigError
from kvdirect.keys import LayoutFingerprint


def _ref_chain(tokens, page_size, prior=None, include_partial=False):
    """Reference model with hashlib: 4-byte LE tokens, chained SHA-256."""
    out = []
    n = len(tokens)
    end = n if include_partial else n - n % page_size
    for start in range(0, end, page_size):
        page = np.asarray(tokens[start:start + page_size], dtype="<u4").tobytes()
        prior = hashlib.sha256((prior or b"") + page).digest()
        out.append(prior)
    return out


@pytest.fixture(scope="module")
def vectors():
    # SGLang 0.5.23's own answers (tests/data/make_sglang_hash_vectors.py made and checks them)
    data = json.loads((DATA / "sglang_hash_vectors.json").read_text())
    assert data["sglang_version"] == "0.5.23"
    return data["cases"]


# ---- SGLang parity -----------------------------------------------------------

def test_every_sglang_vector_matches(vectors):
    assert len(vectors) >= 40
    assert any(len(c["tokens"]) % c["page_size"] for c in vectors)  # partial pages are covered
    for i, c in enumerate(vectors):
        got = kvdirect.page_hashes(c["tokens"], c["page_size"], c["prior_hash"],
                                   c["extra_key"], c["cache_salt"], include_partial=True)
        assert got == c["expected"], f"case {i}: {c['extra_key']!r} {c['cache_salt']!r}"
        # the default names full pages only, as the cache stores them
        full = len(c["tokens"]) // c["page_size"]
        assert kvdirect.page_hashes(c["tokens"], c["page_size"], c["prior_hash"],
                                    c["extra_key"], c["cache_salt"]) == c["expected"][:full], f"case {i}"


def test_vectors_through_binary_api_and_int32(vectors):
    for i, c in enumerate(vectors):
        seed = keys.namespace_seed(c["extra_key"], c["cache_salt"])
        if c["prior_hash"] is None:
            assert (seed.hex() if seed else None) == c["namespace_seed"], f"case {i}"
        prior = bytes.fromhex(c["prior_hash"]) if c["prior_hash"] else None
        toks = np.asarray(c["tokens"], dtype=np.int32)
        d = keys.page_digests(toks, c["page_size"], prior, seed, include_partial=True)
        assert d.dtype == np.uint8 and d.shape == (len(c["expected"]), 32)
        assert keys.hex_digests(d) == c["expected"], f"case {i}"


def test_wide_tokens_and_negative_match_sglang():
    # Expected values produced with SGLang 0.5.23's get_hash_str(array('q', ...),
    # prior, 4): a page with a token > 2**32-1 uses SGLang's wide encoding.
    assert kvdirect.page_hashes(array("q", [1, 2, 3, 2**32, 5, 6, 7, 8, 9]), 4, include_partial=True) == [
        "78d75f49fa8980773b1f1c416945b61a856cb7105842533c233f43408273f936",
        "b741449e1ccfc7736637f59a40404223649c3573ca6b07476703afdd122c1c98",
        "d1898345aba0db61bcebb5f507e79cc9ae8c38a2871f066182ab087ddb15008a"]
    assert kvdirect.page_hashes(array("q", [1, 2, 3, 2**40 + 7, 5, 6, 7, 8, 9]), 4, "ab" * 32,
                                include_partial=True) == [
        "1cdee4f3644a49c04b9d00a67c4983032c37e0b74c98bc4e30aa2f7dfe8409bd",
        "1e6e54ecffeddcf8bcc44f7dff02217f2a56a95ecb66e2d1fc10fea38d1f2dc3",
        "1c2df8a706d2bd97a4017ce49dba1e8558d91f5bfe2ac2e96fda2927578e050e"]
    assert kvdirect.page_hashes(array("q", [2**63 - 1, 1, 1, 1]), 4) == [
        "8d60f74d5b6b383017ff1fca95f58ca234acc893ddb6c45dbbcccd91f86971e7"]
    # SGLang raises on negative ids; so do we, for every input kind.
    for toks in ([1, -2, 3, 4], array("q", [1, -2, 3, 4]), array("i", [1, -2, 3, 4]),
                 np.array([1, -2, 3, 4], dtype=np.int32)):
        with pytest.raises(ConfigError, match="-2 at position 1"):
            keys.page_digests(toks, 4)
    with pytest.raises(ConfigError):
        keys.page_digests(np.array([2**63 + 1, 1], dtype=np.uint64), 1)
    with pytest.raises(ConfigError, match="int64"):
        keys.page_digests([2**64, 1], 1)
    # uint32 input is hashed as is (no sign).
    big = np.array([2**32 - 1, 2**31], dtype=np.uint32)
    assert keys.page_digests(big, 2)[0].tobytes() == _ref_chain(big.tolist(), 2)[0]


def test_empty_prior_is_no_prior_and_no_seed():
    # SGLang: prior_hash "" is "given" (no namespace seed) and then falsy (no prior).
    toks = list(range(8))
    plain = kvdirect.page_hashes(toks, 4)
    assert kvdirect.page_hashes(toks, 4, "", extra_key="lora") == plain
    assert kvdirect.page_hashes(toks, 4, b"", cache_salt="s") == plain
    assert kvdirect.page_hashes(toks, 4, extra_key="lora") != plain


# ---- the chain and the hash itself -------------------------------------------

@pytest.mark.parametrize("kernel", ["portable", "shani"])
def test_sha256_kernels_match_hashlib(kernel):
    if kernel == "shani" and not _core.keys_cpu_has_shani():
        pytest.skip("this CPU has no SHA extensions")
    before = keys.sha256_kernel()
    assert _core.keys_select_sha256_kernel(kernel)
    try:
        rng = np.random.default_rng(1)
        data = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
        for n in list(range(0, 130)) + [255, 256, 288, 319, 320, 999, 1000]:
            assert keys.sha256(data[:n]) == hashlib.sha256(data[:n]).digest(), n
        toks = rng.integers(0, 2**31, 1000)
        for ps in (1, 3, 7, 14, 16, 30, 64, 100):  # 1- and 2-block tails, with and without prior
            d = keys.page_digests(toks, ps, include_partial=True)
            assert [bytes(r) for r in d] == _ref_chain(toks.tolist(), ps, include_partial=True)
    finally:
        _core.keys_select_sha256_kernel(before)
    assert not _core.keys_select_sha256_kernel("nonsense")


def test_chain_property():
    P = 16
    toks = np.arange(1000, 1000 + 5 * P, dtype=np.int64)
    whole = keys.page_digests(toks, P)
    assert whole.shape == (5, 32)
    for k in range(1, 5):
        cont = keys.page_digests(toks[k * P:], P, prior=whole[k - 1].tobytes())
        assert np.array_equal(cont, whole[k:])
    # hex prior is accepted too and page_hashes agrees
    assert kvdirect.page_hashes(toks[2 * P:3 * P], P, prior_hash=whole[1].tobytes().hex()) == \
        [whole[2].tobytes().hex()]
    # a namespace seed only starts a chain; an explicit prior wins
    seed = keys.namespace_seed("lora-a", None)
    assert np.array_equal(keys.page_digests(toks, P, prior=whole[0].tobytes(), namespace_seed=seed)[0],
                          keys.page_digests(toks, P, prior=whole[0].tobytes())[0])
    assert not np.array_equal(keys.page_digests(toks, P, namespace_seed=seed), whole)


def test_input_kinds_agree():
    rng = np.random.default_rng(7)
    base = rng.integers(0, 150_000, 3 * 64 + 10).tolist()
    expected = keys.page_digests(np.asarray(base, dtype=np.int64), 64)
    kinds = [base, tuple(base), array("i", base), array("q", base), array("l", base),
             array("I", base), np.asarray(base, dtype=np.int32), np.asarray(base, dtype=np.uint64),
             np.asarray(base, dtype=np.int64)[::1]]
    for t in kinds:
        assert np.array_equal(keys.page_digests(t, 64), expected), type(t)
    # strided views are copied contiguous, not misread
    wide = np.zeros(2 * len(base), dtype=np.int64)
    wide[::2] = base
    assert np.array_equal(keys.page_digests(wide[::2], 64), expected)
    torch = pytest.importorskip("torch")
    for dt in (torch.int32, torch.int64):
        t = torch.tensor(base, dtype=dt)
        assert np.array_equal(keys.page_digests(t, 64), expected)
        assert np.array_equal(keys.page_digests(t.repeat_interleave(2)[::2], 64), expected)


def test_partial_trailing_page_and_empty():
    toks = list(range(10))
    assert keys.page_digests(toks, 4).shape == (2, 32)
    assert keys.page_digests(toks, 4, include_partial=True).shape == (3, 32)
    assert len(kvdirect.page_hashes(toks, 4)) == 2  # full pages only, as the cache stores them
    assert len(kvdirect.page_hashes(toks, 4, include_partial=True)) == 3  # as SGLang hashes them
    assert np.array_equal(keys.page_digests(toks, 4), keys.page_digests(toks[:8], 4))
    assert keys.page_digests(toks, 11).shape == (0, 32)
    for empty in ([], array("q"), np.zeros(0, dtype=np.int32)):
        assert keys.page_digests(empty, 4).shape == (0, 32)
        assert kvdirect.page_hashes(empty, 4) == []
    assert keys.hex_digests(np.zeros((0, 32), dtype=np.uint8)) == []


def test_bad_inputs_raise_config_error():
    for bad_ps in (0, -1, 1.5, True, "64"):
        with pytest.raises(ConfigError, match="page_size"):
            keys.page_digests([1, 2], bad_ps)
    for bad in (np.zeros(4, dtype=np.float32), np.zeros(4, dtype=np.int16), b"\x00" * 8,
                np.zeros((2, 2), dtype=np.int64), "tokens", [1, "a"], {1, 2}):
        with pytest.raises(ConfigError):
            keys.page_digests(bad, 2)
    with pytest.raises(ConfigError, match="prior"):
        keys.page_digests([1, 2], 2, prior=b"short")
    with pytest.raises(ConfigError, match="prior_hash"):
        kvdirect.page_hashes([1, 2], 2, prior_hash="zz" * 32)
    with pytest.raises(ConfigError, match="extra_key"):
        kvdirect.page_hashes([1, 2], 2, extra_key=5)
    with pytest.raises(ConfigError):
        keys.hex_digests(np.zeros((2, 31), dtype=np.uint8))
    with pytest.raises(ConfigError):
        keys.hex_digests(np.zeros((2, 8), dtype=np.int32))


def test_namespace_seed():
    assert keys.namespace_seed() is None
    assert keys.namespace_seed(None, "") is None  # RadixKey: empty salt is no salt
    seeds = {keys.namespace_seed(*ns) for ns in
             [("", None), ("a", None), (None, "a"), ("a", "b"), ("ab", None), ("a", "bc"), ("ab", "c")]}
    assert len(seeds) == 7 and all(len(s) == 32 for s in seeds)


# ---- pool keys and layout fingerprints ---------------------------------------

FP = dict(model="Qwen/Qwen3-8B@main", dtype="bfloat16", num_layers=36, kv_heads=8, head_dim=128,
          v_head_dim=128, page_size=64, layout_kind="mha", tp_size=2, tp_rank=0,
          is_mla=False)
CHANGED = dict(model=dict(model="Qwen/Qwen3-8B@v2"), dtype=dict(dtype="float16"), num_layers=dict(num_layers=35),
               kv_heads=dict(kv_heads=4), head_dim=dict(head_dim=64), v_head_dim=dict(v_head_dim=96),
               page_size=dict(page_size=32), layout_kind=dict(layout_kind="mla_split", is_mla=True),
               tp_size=dict(tp_size=4), tp_rank=dict(tp_rank=1), is_mla=dict(is_mla=True, layout_kind="mla"))


def test_fingerprint_every_field_matters():
    base = LayoutFingerprint(**FP)
    assert len(base.digest) == 16 and int(base.digest, 16) >= 0
    assert LayoutFingerprint(**FP).digest == base.digest
    assert [f.name for f in __import__("dataclasses").fields(LayoutFingerprint)] == list(FP) == list(CHANGED)
    digests = {base.digest}
    for name, change in CHANGED.items():
        other = LayoutFingerprint(**{**FP, **change})
        assert other.digest not in digests, name
        digests.add(other.digest)


def test_fingerprint_layout_kind_defaults_to_what_the_cache_writes():
    mha = dict(FP, layout_kind=None)
    assert LayoutFingerprint(**mha).layout_kind == "mha"
    assert LayoutFingerprint(**mha).digest == LayoutFingerprint(**FP).digest
    assert LayoutFingerprint(**dict(mha, is_mla=True)).layout_kind == "mla"
    for kind, is_mla, match in (("layer_first", False, "one of mha, mla, mla_split"),
                                ("page_first", False, "object format"),
                                ("mla", False, "is_mla=False"), ("mha", True, "is_mla=True")):
        with pytest.raises(ConfigError, match=match):
            LayoutFingerprint(**dict(FP, layout_kind=kind, is_mla=is_mla))


def test_fingerprint_mla_is_tp_rank_independent_mha_is_not():
    mla = dict(FP, is_mla=True, layout_kind="mla", kv_heads=1, head_dim=576, v_head_dim=512)
    digests = {LayoutFingerprint(**dict(mla, tp_size=s, tp_rank=r)).digest
               for s in (1, 2, 8) for r in range(s)}
    assert len(digests) == 1
    mha = {LayoutFingerprint(**dict(FP, tp_size=4, tp_rank=r)).digest for r in range(4)}
    assert len(mha) == 4


def test_fingerprint_validation_and_dtype_normalisation():
    assert LayoutFingerprint(**dict(FP, dtype=np.float16)).dtype == "float16"
    assert LayoutFingerprint(**dict(FP, v_head_dim=None)).v_head_dim == 128
    torch = pytest.importorskip("torch", reason="torch dtype normalisation")
    assert LayoutFingerprint(**dict(FP, dtype=torch.bfloat16)).digest == LayoutFingerprint(**FP).digest
    for bad in (dict(model=""), dict(num_layers=0), dict(tp_rank=2), dict(page_size=-64),
                dict(kv_heads=True), dict(layout_kind="")):
        with pytest.raises(ConfigError):
            LayoutFingerprint(**{**FP, **bad})


def test_pool_keys_format_and_length():
    fp = LayoutFingerprint(**FP)
    toks = np.arange(64 * 7, dtype=np.int64)
    d = keys.page_digests(toks, 64)
    hexes = keys.hex_digests(d)
    ks = keys.pool_keys(d, fp)
    assert ks == [f"kvd1/{fp.digest}/{h}" for h in hexes]
    assert keys.pool_keys(hexes, fp) == ks
    assert keys.pool_keys(kvdirect.page_hashes(toks, 64), fp) == ks
    assert all(len(k.encode()) < 256 for k in ks)
    # the longest possible key stays under MemCache's 256-byte limit
    assert len(fp.key_prefix) + 64 < 256
    other = LayoutFingerprint(**dict(FP, tp_rank=1))
    assert set(keys.pool_keys(d, other)).isdisjoint(ks)
    with pytest.raises(ConfigError):
        keys.pool_keys(["XYZ"], fp)
    with pytest.raises(ConfigError):
        keys.pool_keys(d, "not a fingerprint")
    with pytest.raises(ConfigError, match="256"):
        _core.keys_pool_keys(d, "x" * 200)


def test_fingerprint_and_keys_deterministic_across_processes():
    code = ("import numpy as np; from kvdirect import keys; "
            f"fp = keys.LayoutFingerprint(**{FP!r}); "
            "print(keys.pool_keys(keys.page_digests(np.arange(128), 64), fp)[-1])")
    outs = set()
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=120, check=True)
        outs.add(r.stdout.strip())
    fp = LayoutFingerprint(**FP)
    assert outs == {keys.pool_keys(keys.page_digests(np.arange(128), 64), fp)[-1]}


def test_large_input_releases_gil_and_matches():
    toks = np.random.default_rng(3).integers(0, 2**31, 64 * 400, dtype=np.int64)
    d = keys.page_digests(toks, 64)  # >= 16384 tokens: hashed without the GIL
    assert d.shape == (400, 32)
    assert np.array_equal(keys.page_digests(toks[-64:], 64, prior=d[-2].tobytes()), d[-1:])


# ---- one public way to name a page as the cache does -------------------------

@pytest.mark.parametrize("kind", ["mha", "mla", "ascend_mla"])
@pytest.mark.parametrize("tp", [(0, 1), (1, 2)])
def test_page_keys_equal_what_the_cache_writes(kind, tp, tmp_path):
    """Keys built by hand from public API find exactly the pages KVDirectCache wrote."""
    import uuid

    from _layout_pools import Pool
    from kvdirect import CacheConfig, KVDirectCache, open_store
    from kvdirect.stores.shm import destroy_pool

    pool = Pool(kind, np.random.default_rng(5), pages=16)
    L, P = pool.layout, pool.P
    name = f"kvd-keys-{uuid.uuid4().hex[:10]}"
    store = open_store(f"shm://{name}?size=8MiB")
    rank, size = tp
    if L.is_mla:
        # MLA pages are the same on every TP rank, under keys without the rank: rank 0 alone
        # puts them; every other rank's keys name the same objects
        assert not KVDirectCache.writes_pages(LayoutFingerprint.from_layout(L, model="m@rev1", tp_rank=1, tp_size=2), 1)
        reader = LayoutFingerprint.from_layout(L, model="m@rev1", tp_rank=rank, tp_size=size)
        rank = 0
    try:
        cache = KVDirectCache(L, store, config=CacheConfig(store=None, model="m@rev1", allow_no_store=False),
                              tp_rank=rank, tp_size=size)
        toks = np.arange(100, 100 + 5 * P + 2, dtype=np.int64)  # 5 full pages and a partial one
        for ns in (None, "tenant-a"):
            cache.write_back(toks, np.arange(len(toks)), ns)
        cache.flush()
        assert cache.stats()["stored_pages"] == 10

        fp = LayoutFingerprint.from_layout(L, model="m@rev1", tp_rank=rank, tp_size=size)
        assert fp == cache.fingerprint
        assert LayoutFingerprint(model="m@rev1", tp_rank=rank, tp_size=size, **L.fingerprint_fields()) == fp
        # the layout kind defaults to what the cache writes for the plain formats
        by_hand = LayoutFingerprint(model="m@rev1", dtype=L.dtype, num_layers=L.num_layers, kv_heads=L.kv_heads,
                                    head_dim=L.head_dim, v_head_dim=L.v_head_dim or None, page_size=P,
                                    tp_rank=rank, tp_size=size, is_mla=L.is_mla,
                                    layout_kind="mla_split" if kind == "ascend_mla" else None)
        assert by_hand == fp
        for ns in (None, "tenant-a"):
            ks = fp.page_keys(toks, ns)
            assert len(ks) == 5 and store.exists(ks).all()
            assert ks == kvdirect.pool_keys(kvdirect.page_hashes(toks, P, extra_key=ns), fp)
        if L.is_mla:
            assert reader.page_keys(toks) == fp.page_keys(toks)
        assert fp.page_keys(toks, "") == fp.page_keys(toks, None)  # one default namespace, as in the index
        assert not store.exists(fp.page_keys(toks, "tenant-b")).any()
        other = LayoutFingerprint.from_layout(L, model="m@rev2", tp_rank=rank, tp_size=size)
        assert not store.exists(other.page_keys(toks)).any()
        with pytest.raises(ConfigError, match="namespace must be a str"):
            fp.page_keys(toks, 5)
        with pytest.raises(ConfigError, match="needs a KVLayout"):
            LayoutFingerprint.from_layout(object(), model="m")
        cache.close()
    finally:
        store.close()
        destroy_pool(name, missing_ok=True)


def test_public_names_are_exported():
    for name in ("CacheConfig", "model_identity", "pool_keys", "page_digests", "page_hashes",
                 "LayoutFingerprint", "KVDirectCache", "CacheMatch", "ConfigError", "StoreError"):
        assert name in kvdirect.__all__ and getattr(kvdirect, name) is not None, name
    from kvdirect.config import CacheConfig
    assert kvdirect.CacheConfig is CacheConfig and kvdirect.pool_keys is keys.pool_keys
