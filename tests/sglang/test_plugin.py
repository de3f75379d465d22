"""The kvdirect SGLang plugin against the real sglang==0.5.23 package, on CPU."""
import json
import os
from array import array
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch

sglang = pytest.importorskip("sglang")

from driver import Engine  # noqa: E402
from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import (  # noqa: E402
    BasePrefixCache, EvictParams, InitLoadBackParams, MatchPrefixParams)
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey  # noqa: E402
from sglang.srt.mem_cache.registry import create_tree_cache  # noqa: E402

import kvdirect.sglang as plugin  # noqa: E402
from kvdirect.errors import ConfigError  # noqa: E402

EP_VALUE = "kvdirect.sglang:register"


def build(engine, **ctx_kw):
    plugin.register()
    # SGLang's own start-up path: --radix-cache-backend kvdirect -> registered factory
    engine.cache = create_tree_cache(engine.context(**ctx_kw))
    return engine.cache


def toks(n, seed):
    return np.random.default_rng(seed).integers(0, 30000, n)


# ---- plugin discovery and factory ------------------------------------------------------
def test_entry_point_discovered_and_registers(monkeypatch):
    # declared by the installed kvdirect (pyproject.toml), found the way SGLang looks
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "kvdirect"]
    assert [ep.value for ep in eps] == [EP_VALUE]
    import sglang.srt.mem_cache.registry as registry
    import sglang.srt.plugins as plugins
    monkeypatch.setattr(plugins, "_plugins_loaded", False)
    monkeypatch.delitem(registry._RADIX_CACHE_REGISTRY, "kvdirect", raising=False)
    monkeypatch.setenv("SGLANG_PLUGINS", "kvdirect")
    plugins.load_plugins()                       # SGLang's own start-up path
    assert "kvdirect" in registry.registered_radix_cache_backends()
    assert plugin.register() is False            # idempotent: a second load does not fail


@pytest.mark.parametrize("P", [1, 4])
def test_factory_builds_cache_from_build_context(pool_url, P):
    e = Engine(P)
    cache = build(e)
    assert isinstance(cache, BasePrefixCache)
    assert cache.page_size == P and cache.kv.layout.num_layers == 2
    assert cache.kv.store is not None and cache.kv.store.scheme == "shm"
    assert cache.kv.config.model == "test/tiny-model"   # from server_args, in the fingerprint
    assert (cache.total_size(), cache.evictable_size(), cache.protected_size()) == (0, 0, 0)
    cache.shutdown()


def test_factory_orders_transfers_after_the_forward_stream(pool_url):
    """SGLang's overlap scheduler forwards on ``model_runner.forward_stream`` while the cache
    is called on the scheduler's stream: the factory hands that stream to kvdirect, whose
    compute events then cover it too (on CPU the copies are synchronous: nothing recorded)."""
    from types import SimpleNamespace

    stream = torch.cpu.Stream()
    cache = build(Engine(4), tp_worker=SimpleNamespace(model_runner=SimpleNamespace(forward_stream=stream)))
    assert cache.kv.forward_stream is stream
    cache.shutdown()


@pytest.mark.parametrize("flag,word", [("is_hybrid_swa", "SWA"), ("is_hybrid_ssm", "Mamba"),
                                       ("enable_hierarchical_cache", "hierarchical")])
def test_unsupported_models_refused_at_start_up(pool_url, flag, word):
    with pytest.raises(ConfigError, match=word):
        build(Engine(1), **{flag: True})


def test_bad_config_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KVDIRECT_CONFIG", '{"stroe": "shm://x"}')
    with pytest.raises(ConfigError, match="stroe"):
        build(Engine(1))


# ---- two instances, one pool -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("P", [1, 4])
def test_second_instance_loads_byte_identical_kv(pool_url, P, kind):
    a, b = Engine(P, kind), Engine(P, kind)
    build(a), build(b)
    shared = toks(12 * P + (P > 1), 1)
    ra = a.serve(np.concatenate([shared, toks(5, 2)]))
    a.cache.kv.flush()
    assert a.cache.stats()["stored_pages"] >= 12
    q = np.concatenate([shared, toks(7, 3)])
    rb = b.serve(q)
    n = len(shared) // P * P
    assert (rb["device_hit"], rb["host_hit"], rb["loaded"]) == (0, n, n)
    for x, y in zip(ra["kv"], rb["kv"]):          # every loaded byte equals A's
        assert torch.equal(x[:n].view(torch.uint8), y[:n].view(torch.uint8))
    # now a device hit on B, no pool traffic
    loads = b.cache.stats()["loaded_pages"]
    rb2 = b.serve(np.concatenate([shared, toks(3, 4)]))
    assert (rb2["device_hit"], rb2["host_hit"]) == (n, 0)
    assert b.cache.stats()["loaded_pages"] == loads
    for c in (a, b):
        c.cache.kv.flush()                            # writes in flight are pinned (protected)
        assert c.cache.protected_size() == 0
        # SGLang's idle leak invariant: available + evictable == capacity
        assert c.allocator.available_size() + c.cache.evictable_size() == c.size
        c.cache.shutdown()


@pytest.mark.parametrize("P", [1, 4])
def test_unfinished_request_is_written_back_per_chunk(pool_url, P):
    """Chunked prefill: each checkpoint of the unfinished request inserts its full pages and
    writes them to the pool, so another instance reuses them before the request finishes."""
    a, b = Engine(P), Engine(P)
    build(a), build(b)
    t = toks(24 * P + 3, 21)
    seen = []

    def on_chunk(req, end):
        full = end // P * P
        assert a.cache.total_size() == full           # inserted while still running
        assert a.cache.evictable_size() == 0           # and locked by the request
        a.cache.kv.flush()
        assert a.cache.kv.stats()["stored_pages"] == full // P
        r = b.serve(np.concatenate([t[:full], toks(2, 22 + len(seen))]))
        had = seen[-1][0] if seen else 0              # B keeps the earlier chunk on device
        assert (r["device_hit"], r["host_hit"], r["loaded"]) == (had, full - had, full - had)
        seen.append((full, r["kv"]))

    ra = a.serve(t, chunk=10 * P + 1, on_chunk=on_chunk)
    C, n = 10 * P + 1, len(t) // P * P
    assert [f for f, _ in seen] == [C // P * P, 2 * C // P * P]
    for full, kv in seen:                              # B's loaded KV equals what A computed
        for x, y in zip(ra["kv"], kv):
            assert torch.equal(x[:full].view(torch.uint8), y[:full].view(torch.uint8))
    for c in (a, b):
        c.cache.kv.flush()
        assert c.cache.protected_size() == 0
        assert c.allocator.available_size() + c.cache.evictable_size() == c.size
    assert a.cache.total_size() == n
    c = a.cache.kv.stats()
    assert c["stored_pages"] == n // P and c["store_failed_pages"] == 0   # each page written once
    a.cache.shutdown(), b.cache.shutdown()


def test_load_back_under_memory_pressure_keeps_the_matched_prefix(pool_url):
    """init_load_back must evict to find slots, but never the device prefix it extends."""
    a, b = Engine(4), Engine(4, size=64)
    build(a), build(b)
    t = toks(40, 31)
    ra = a.serve(np.concatenate([t, [7]]))
    a.cache.kv.flush()
    b.serve(t[:17])                                     # B holds t's first 16 tokens on device
    for seed in (32, 33, 34):
        b.serve(toks(13, seed))                         # 3 x 12 cached tokens, more recent
    b.cache.kv.flush()
    assert b.allocator.available_size() == 64 - 16 - 36
    r = b.serve(np.concatenate([t, [9]]))               # 24 pool tokens need 24 slots: evict 12
    assert (r["device_hit"], r["host_hit"], r["loaded"]) == (16, 24, 24)
    for x, y in zip(ra["kv"], r["kv"]):
        assert torch.equal(x[:40].view(torch.uint8), y[:40].view(torch.uint8))
    b.cache.kv.flush()
    assert b.allocator.available_size() + b.cache.evictable_size() == 64
    a.cache.shutdown(), b.cache.shutdown()


def test_load_back_does_not_evict_prefixes_matched_in_the_same_round(pool_url):
    """X is matched (waiting queue) but not locked; Y's init_load_back must not evict X's
    device prefix to make room, or X would be handed freed slots."""
    a, b = Engine(4), Engine(4, size=64)
    build(a), build(b)
    u, x = toks(40, 41), toks(17, 42)
    a.serve(np.concatenate([u, [7]]))
    a.cache.kv.flush()
    rx = b.serve(x)                                     # 16 tokens of x cached on B
    b.cache.kv.flush()
    b.serve(toks(29, 43), finish=False)                 # a running request holds 32 slots
    assert (b.allocator.available_size(), b.cache.evictable_size()) == (16, 16)
    X = b.waiting(np.concatenate([x[:16], [1, 2]]))
    Y = b.waiting(np.concatenate([u, [9]]))
    assert (X.prefix_len, Y.host_hit_length) == (16, 40)
    loaded, _ = b.cache.init_load_back(InitLoadBackParams(
        best_match_node=Y.best_match_node, host_hit_length=Y.host_hit_length, req=Y))
    assert loaded == 0                                  # no room without evicting X's prefix
    assert b.allocator.available_size() == 16 and b.cache.evictable_size() == 16
    lock = b.cache.lock(X.last_node)
    slots = b.cache.path_device_indices(X.last_node)
    for want, got in zip(rx["kv"], b.kv_at(slots)):
        assert torch.equal(want[:16], got)
    b.cache.unlock(lock)
    a.cache.shutdown(), b.cache.shutdown()


def test_namespaces_isolated_on_device_and_in_pool(pool_url):
    a, b = Engine(4), Engine(4)
    build(a), build(b)
    t = toks(40, 5)
    a.serve(t, extra_key="lora-a")
    a.cache.kv.flush()
    for kw in ({}, {"extra_key": "lora-b"}, {"cache_salt": "tenant-1"},
               {"extra_key": "lora-a", "cache_salt": "tenant-1"}):
        # unfinished requests: nothing is written back under kw's namespace meanwhile
        r = a.serve(np.concatenate([t, [1]]), finish=False, **kw)
        assert r["device_hit"] == 0 and r["host_hit"] == 0, kw
        r = b.serve(np.concatenate([t, [1]]), finish=False, **kw)
        assert r["device_hit"] == 0 and r["host_hit"] == 0, kw
    r = b.serve(np.concatenate([t, [1]]), extra_key="lora-a")
    assert r["host_hit"] == 40 and r["loaded"] == 40
    a.cache.shutdown(), b.cache.shutdown()


# ---- identity: what changes the KV bytes must change the keys -----------------------------
def _shares(a, b, tokens) -> int:
    """Tokens server b loads from the pool after server a served `tokens` and wrote them back."""
    a.serve(tokens)
    a.cache.kv.flush()
    return b.serve(np.concatenate([tokens, [7]]))["host_hit"]


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_fp8_formats_never_share_pages(pool_url, kind):
    """SGLang stores e4m3fn, e5m2 and e4m3fnuz KV alike as uint8: the logical dtype keys the pages."""
    dtypes = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz]
    engines = [Engine(4, kind, dtype=d) for d in dtypes]
    assert {e.kvpool.store_dtype for e in engines} == {torch.uint8}
    caches = [build(e) for e in engines]
    prefixes = {c.kv.fingerprint.key_prefix for c in caches}
    assert len(prefixes) == 3, prefixes
    assert [c.kv.fingerprint.dtype for c in caches] == ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz"]
    t = toks(40, 11)
    assert _shares(engines[0], engines[1], t) == 0
    assert _shares(engines[1], engines[2], toks(40, 12)) == 0
    same = Engine(4, kind, dtype=torch.float8_e4m3fn)     # control: the same format shares
    build(same)
    assert same.serve(np.concatenate([t, [7]]))["host_hit"] == 40
    for c in [*caches, same.cache]:
        c.shutdown()


def test_fp4_kv_with_separate_scales_is_refused(pool_url):
    """SGLang's FP4 KV keeps per-block scales in separate buffers: refused at start-up, in one line."""
    from sglang.srt.layers.quantization.fp4_kv_cache_quant_method import FP4MXBlock16KVCacheMethod

    e = Engine(4, dtype=torch.float4_e2m1fn_x2, quant_method=FP4MXBlock16KVCacheMethod())
    assert e.kvpool.k_scale_buffer is not None
    with pytest.raises(ConfigError) as ei:
        build(e)
    msg = str(ei.value)
    assert "scale buffers" in msg and "fp4_mx_block16" in msg and "k_scale_buffer" in msg and "\n" not in msg


def test_model_override_args_enter_the_identity(pool_url):
    """--json-model-override-args changes the model: servers differing only in it share no page."""
    import copy

    from driver import server_args

    def ctx_args(overrides):
        sa = copy.copy(server_args())
        sa.json_model_override_args = overrides
        return sa

    a, b, c = Engine(4), Engine(4), Engine(4)
    build(a, server_args=ctx_args('{"rope_theta": 20000}'))
    build(b, server_args=ctx_args("{}"))
    build(c, server_args=ctx_args('{"rope_theta":  20000}'))   # the same override, spelled otherwise
    assert a.cache.kv.config.model != b.cache.kv.config.model
    assert b.cache.kv.config.model == "test/tiny-model"          # no override: the identity is unchanged
    assert a.cache.kv.config.model == c.cache.kv.config.model
    t = toks(40, 13)
    assert _shares(a, b, t) == 0
    assert c.serve(np.concatenate([t, [7]]))["host_hit"] == 40
    for e in (a, b, c):
        e.cache.shutdown()


# ---- what SGLang's own radix cache tests check --------------------------------------------
def _match(cache, tokens, extra_key=None):
    return cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", list(map(int, tokens))), extra_key)))


@pytest.mark.parametrize("P", [1, 4])
def test_sizes_and_matches_agree_with_sglang_radix_cache(pool_url, P):
    """Same scheduler-driven sequence through SGLang's RadixCache and kvdirect's cache."""
    ref, kvd = Engine(P), Engine(P)
    ref.cache = RadixCache(ref.params)
    build(kvd)
    base = toks(9 * P + 1, 7)
    seqs = [base, np.concatenate([base[:5 * P + 1], toks(6, 8)]), toks(3 * P + 2, 9),
            np.concatenate([base, toks(2 * P, 10)]), base[: 2 * P + 1]]
    for s in seqs:
        r1, r2 = ref.serve(s), kvd.serve(s)
        kvd.cache.kv.flush()                           # pages being written count as protected
        assert r1["device_hit"] == r2["device_hit"], len(s)
        assert (ref.cache.total_size(), ref.cache.evictable_size(), ref.cache.protected_size()) == \
               (kvd.cache.total_size(), kvd.cache.evictable_size(), kvd.cache.protected_size())
        assert ref.allocator.available_size() == kvd.allocator.available_size()
    for q in (base[:P - 1] if P > 1 else base[:0], base[: 3 * P + 1], seqs[3]):
        assert _match(ref.cache, q).device_prefix_len == _match(kvd.cache, q).device_prefix_len
    kvd.cache.shutdown()


def test_page_alignment(pool_url):
    e = Engine(4)
    cache = build(e)
    e.serve(toks(10, 11))
    assert cache.total_size() == 8                     # trailing partial page not cached
    t = e.served[0].origin_input_ids
    assert _match(cache, t[:7]).device_prefix_len == 4
    assert _match(cache, t[:3]).device_prefix_len == 0
    cache.shutdown()


def test_locking_protects_from_eviction(pool_url):
    e = Engine(4)
    cache = build(e)
    t = toks(17, 12)
    e.serve(t)
    assert cache.total_size() == 16
    cache.kv.flush()                                   # pages being written are pinned until stored
    assert (cache.evictable_size(), cache.protected_size()) == (16, 0)
    m = _match(cache, t)
    lock = cache.lock(m.last_device_node)
    assert (cache.evictable_size(), cache.protected_size()) == (0, 16)
    assert cache.evict(EvictParams(num_tokens=100)).num_tokens_evicted == 0
    cache.unlock(lock)
    assert (cache.evictable_size(), cache.protected_size()) == (16, 0)
    before = e.allocator.available_size()
    assert cache.evict(EvictParams(num_tokens=4)).num_tokens_evicted >= 4
    assert e.allocator.available_size() > before      # slots went back to SGLang's allocator
    cache.shutdown()


def test_eviction_order_is_lru(pool_url, monkeypatch):
    monkeypatch.setenv("KVDIRECT_CONFIG", json.dumps({"store": None}))  # device only
    e = Engine(4)
    cache = build(e)
    s1, s2, s3 = toks(9, 13), toks(9, 14), toks(9, 15)
    for s in (s1, s2, s3):
        e.serve(s)
    _match(cache, s1)                                    # s1 becomes most recent
    assert cache.evict(EvictParams(num_tokens=8)).num_tokens_evicted == 8
    assert _match(cache, s2).device_prefix_len == 0      # least recently used went first
    assert _match(cache, s1).device_prefix_len == 8
    assert _match(cache, s3).device_prefix_len == 8
    cache.shutdown()


def test_evicted_pages_come_back_from_the_pool(pool_url):
    e = Engine(4)
    cache = build(e)
    t = toks(33, 16)
    first = e.serve(t)
    cache.kv.flush()
    assert cache.evict(EvictParams(num_tokens=10 ** 6)).num_tokens_evicted == 32
    assert cache.total_size() == 0
    assert e.allocator.available_size() == e.size       # every slot back in SGLang's allocator
    r = e.serve(np.concatenate([t, [5]]))
    assert (r["device_hit"], r["host_hit"], r["loaded"]) == (0, 32, 32)
    for x, y in zip(first["kv"], r["kv"]):
        assert torch.equal(x[:32], y[:32])
    cache.shutdown()


# ---- layouts of the real pools ------------------------------------------------------------
def test_layouts_of_sglang_pools():
    from kvdirect.sglang.pools import layout_from_pool
    mha = Engine(4, "mha").kvpool
    lay = layout_from_pool(mha, 4)
    assert lay.page_bytes == 2 * 2 * 4 * 2 * 8 * 4      # layers x K/V x P x heads x dim x fp32
    mla = Engine(4, "mla").kvpool
    assert layout_from_pool(mla, 4).page_bytes == 2 * 4 * (16 + 8) * 2

    class NPUMHATokenToKVPool:                         # the NPU pool's buffers, on CPU
        def __init__(self):
            self.k = torch.zeros(2, 9, 4, 2, 8, dtype=torch.float16)
            self.v = torch.zeros(2, 9, 4, 2, 8, dtype=torch.float16)

        def get_hicache_transfer_buffers(self):
            return self.k, self.v

    npu = layout_from_pool(NPUMHATokenToKVPool(), 4)
    assert npu.kind == "ascend" and npu.page_bytes == 2 * 2 * 4 * 2 * 8 * 2

    class NPUMLATokenToKVPool:
        k_buffer = torch.zeros(2, 9, 4, 1, 16, dtype=torch.bfloat16)
        v_buffer = torch.zeros(2, 9, 4, 1, 8, dtype=torch.bfloat16)

    assert layout_from_pool(NPUMLATokenToKVPool(), 4).kind == "ascend_mla"

    class MHATokenToKVPoolFP4:
        pass

    with pytest.raises(ConfigError, match="MHATokenToKVPoolFP4"):
        layout_from_pool(MHATokenToKVPoolFP4(), 4)


# ---- layer-wise loading through SGLang's per-layer KV-pool hook -----------------------
def _layerwise_env(monkeypatch, url):
    monkeypatch.setenv("KVDIRECT_CONFIG", json.dumps({"store": url, "allow_no_store": False, "layerwise": True}))


@pytest.mark.parametrize("P", [1, 4])
def test_layerwise_load_is_byte_identical(pool_url, monkeypatch, P):
    a = Engine(P)
    build(a)
    shared = toks(10 * P + 1, 11)
    ra = a.serve(np.concatenate([shared, toks(3, 12)]))
    a.cache.kv.flush()
    _layerwise_env(monkeypatch, pool_url)
    b = Engine(P)
    build(b)
    counter = b.kvpool.layer_transfer_counter
    assert counter is b.cache.layer_loads, "kvdirect's counter is registered with SGLang's KV pool"
    rb = b.serve(np.concatenate([shared, toks(4, 13)]))
    n = len(shared) // P * P
    assert (rb["host_hit"], rb["loaded"]) == (n, n)
    assert counter.started == 1 and not counter.pending   # finished inside the forward pass
    for x, y in zip(ra["kv"], rb["kv"]):
        assert torch.equal(x[:n].view(torch.uint8), y[:n].view(torch.uint8))
    # the loaded pages are in B's index now: a device hit
    rb2 = b.serve(np.concatenate([shared, toks(2, 14)]))
    assert (rb2["device_hit"], rb2["host_hit"]) == (n, 0)
    b.cache.kv.flush()
    assert b.cache.protected_size() == 0
    assert b.allocator.available_size() + b.cache.evictable_size() == b.size
    for c in (a, b):
        c.cache.shutdown()


@pytest.mark.parametrize("fault", ["checksum", "layer0_read"])
def test_layerwise_failure_after_promise_aborts_and_caches_nothing(pool_url, monkeypatch, fault):
    """A page that fails after its tokens were promised (pinned, then its checksum does not
    match at the end, or already the read of layer 0 fails): the request is aborted before
    output, the page never enters the cache, nothing leaks."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    from kvdirect.stores.base import CORRUPT, IO_ERROR
    from kvdirect.stores.shm import PiecewiseRead

    P = 4
    a = Engine(P)
    build(a)
    shared = toks(8 * P + 1, 21)
    a.serve(np.concatenate([shared, toks(3, 22)]))
    a.cache.kv.flush()
    _layerwise_env(monkeypatch, pool_url)
    b = Engine(P)
    build(b)
    end, read = PiecewiseRead.end, PiecewiseRead.read

    def corrupt_end(self):   # the 6th page's checksum does not match (or its read failed)
        st = end(self).copy()
        st[5] = CORRUPT if fault == "checksum" else IO_ERROR
        return st

    def failing_read(self, scatter):  # the 6th page's first piece (layer 0) does not arrive
        read(self, scatter)
        self.status[5] = IO_ERROR

    monkeypatch.setattr(PiecewiseRead, "end", corrupt_end)
    if fault == "layer0_read":
        monkeypatch.setattr(PiecewiseRead, "read", failing_read)
    rb = b.serve(np.concatenate([shared, toks(4, 23)]), finish=False)
    req = rb["req"]
    assert rb["loaded"] == 8 * P                        # promised once the pages were pinned
    assert isinstance(req.to_finish, FINISH_ABORT) and "KVLoadFailed" == req.to_finish.err_type
    assert req.skip_radix_cache_insert
    assert b.cache.layerwise_aborts == 1
    monkeypatch.setattr(PiecewiseRead, "end", end)
    monkeypatch.setattr(PiecewiseRead, "read", read)
    # the scheduler finishes the aborted request: nothing of it is cached past the good pages
    from sglang.srt.mem_cache.common import release_kv_cache

    req.finished_reason = req.to_finish
    release_kv_cache(req, b.cache, checkpoint=True)
    r = b.cache.kv.index.match(np.asarray(shared[: 8 * P]), None)
    assert r.device_len == 5 * P                        # pages 0..4 arrived whole and verified
    b.cache.kv.flush()
    assert b.cache.protected_size() == 0
    assert b.allocator.available_size() + b.cache.evictable_size() == b.size
    for c in (a, b):
        c.cache.shutdown()


def _pool_with(monkeypatch, pool_url, P, docs):
    """Server a computed and wrote back ``docs``; server b loads layer by layer."""
    a = Engine(P, size=1024)
    build(a)
    served = {}
    for i, d in enumerate(docs):
        served[i] = a.serve(np.concatenate([d, toks(3, 900 + i)]))
    a.cache.kv.flush()
    _layerwise_env(monkeypatch, pool_url)
    b = Engine(P, size=1024)
    build(b)
    return a, b, served


def _same_kv(x, y, n):
    return all(torch.equal(u[:n].view(torch.uint8), v[:n].view(torch.uint8)) for u, v in zip(x, y))


def test_layerwise_loads_of_one_round_stay_in_flight_together(pool_url, monkeypatch):
    """Two requests of other documents admitted in one round: the second's match and
    load-back do not finish the first's load on the scheduler thread; the forward pass
    waits for both, layer by layer, and both read the bytes server a computed."""
    P = 4
    x, y = toks(12 * P + 1, 31), toks(9 * P + 2, 32)
    a, b, ref = _pool_with(monkeypatch, pool_url, P, [x, y])
    counter = b.cache.layer_loads
    rx = b.admit(np.concatenate([x, toks(2, 41)]))
    ry = b.admit(np.concatenate([y, toks(2, 42)]))
    assert (rx["loaded"], ry["loaded"]) == (12 * P, 9 * P)
    assert len(counter.pending) == 2 and not any(p.done for p in counter.pending)
    out = b.prefill([rx, ry])
    assert not counter.pending and counter.started == 2
    assert _same_kv(ref[0]["kv"], out[0]["kv"], 12 * P) and _same_kv(ref[1]["kv"], out[1]["kv"], 9 * P)
    b.cache.kv.flush()
    assert b.cache.protected_size() == 0
    assert b.allocator.available_size() + b.cache.evictable_size() == b.size
    for c in (a, b):
        c.cache.shutdown()


@pytest.mark.parametrize("device_pages", [0, 3])
def test_an_eviction_does_not_wait_for_a_layerwise_load_in_flight(pool_url, monkeypatch, device_pages):
    """With the device pool full, SGLang evicts while it builds the batch (and a later
    request's load-back evicts for its own slots): that eviction frees other pages at once
    and leaves a layer-wise load in flight (before, it finished every load on the scheduler
    thread first, so under memory pressure no load overlapped the forward). The pages in
    flight are not in the index, so no eviction can take them, and the device prefix the
    load extends is locked by its request; the forward still reads the bytes server a
    computed."""
    import threading
    import time

    from kvdirect.stores.shm import PiecewiseRead

    P = 4
    x, w = toks(12 * P + 1, 37), toks(10 * P + 1, 38)
    a, b, ref = _pool_with(monkeypatch, pool_url, P, [x])
    b.serve(np.concatenate([w, toks(2, 45)]))           # b's own pages, unlocked: evictable
    if device_pages:                                     # the load extends a prefix on b's device
        b.serve(x[: device_pages * P + 1])
    b.cache.kv.flush()                                   # (once written back)
    evictable = b.cache.evictable_size()
    assert evictable >= (10 + device_pages) * P
    gate, read = threading.Event(), PiecewiseRead.read

    def gated_read(self, scatter):                       # the reader thread stops in layer 0
        gate.wait(10)
        read(self, scatter)

    monkeypatch.setattr(PiecewiseRead, "read", gated_read)
    try:
        rx = b.admit(np.concatenate([x, toks(2, 46)]))
        counter = b.cache.layer_loads
        assert rx["device_hit"] == device_pages * P
        assert rx["loaded"] == (12 - device_pages) * P and len(counter.pending) == 1
        t0 = time.perf_counter()
        freed = b.cache.evict(EvictParams(num_tokens=b.size)).num_tokens_evicted
        assert time.perf_counter() - t0 < 2.0, "the eviction waited for the load in flight"
        assert freed == evictable - device_pages * P     # all but the locked prefix and the pages in flight
        assert len(counter.pending) == 1 and not counter.pending[0].done
    finally:
        gate.set()
    out = b.prefill([rx])
    assert not counter.pending
    assert _same_kv(ref[0]["kv"], out[0]["kv"], 12 * P)
    b.cache.kv.flush()
    assert b.cache.protected_size() == 0
    assert b.allocator.available_size() + b.cache.evictable_size() == b.size
    for c in (a, b):
        c.cache.shutdown()


@pytest.mark.parametrize("shared_pages", [12, 2])
def test_a_request_sharing_pages_in_flight_finds_them_on_device(pool_url, monkeypatch, shared_pages):
    """The second request of a round shares pages the first is still loading (the same
    document, or its first two pages): that load finishes first and the second request
    finds them on device, never loading a page twice."""
    P = 4
    x = toks(12 * P + 1, 33)
    x2 = np.concatenate([x[: shared_pages * P], toks(12 * P + 1 - shared_pages * P, 34)])
    docs = [x] if shared_pages == 12 else [x, x2]
    a, b, ref = _pool_with(monkeypatch, pool_url, P, docs)
    counter = b.cache.layer_loads
    r1 = b.admit(np.concatenate([x, toks(2, 43)]))
    assert len(counter.pending) == 1
    r2 = b.admit(np.concatenate([x2, toks(2, 44)]))
    assert r2["device_hit"] == shared_pages * P           # the first load finished: on device
    assert r2["loaded"] == 12 * P - shared_pages * P      # only the pages it does not share
    assert counter.started == (1 if shared_pages == 12 else 2)
    out = b.prefill([r1, r2])
    assert _same_kv(ref[0]["kv"], out[0]["kv"], 12 * P)
    assert _same_kv(ref[len(docs) - 1]["kv"], out[1]["kv"], 12 * P)
    b.cache.kv.flush()
    assert b.cache.protected_size() == 0
    assert b.allocator.available_size() + b.cache.evictable_size() == b.size
    for c in (a, b):
        c.cache.shutdown()


def _count_store_calls(engine):
    from kvdirect.stores._testing import CountingClient
    return CountingClient.install(engine.cache.kv._p.store)


@pytest.mark.parametrize("hold", [True, False])
def test_a_match_holds_the_pages_its_load_reads_mooncake(mooncake_url, monkeypatch, hold):
    """Over Mooncake a match opens the read session the load reads through (it answers which
    pages exist, as an existence query does): a hit costs one round trip to the master,
    not two (hold=False: the store said it cannot, the old path). A request matched but not
    admitted gives its session up before the next match opens one (Mooncake keeps one
    session per key and client: a late end would end the next request's session)."""
    P = 4
    x, y = toks(12 * P + 1, 51), toks(9 * P + 2, 52)
    a, b, ref = _pool_with(monkeypatch, mooncake_url, P, [x, y])
    if not hold:
        monkeypatch.setattr(b.cache.kv._p.store, "hold_at_match", False)
    calls = _count_store_calls(b)
    # y matched (a 50% hit of its tokens: its document's pages, then ones nobody wrote) but not admitted
    half = np.concatenate([y[: 5 * P], toks(5 * P, 53)])
    waiting = Req("w", "", array("q", half.tolist()), SamplingParams(max_new_tokens=1))
    waiting.init_next_round_input(b.cache)
    assert waiting.host_hit_length == 5 * P
    assert len(b.cache._holding) == (1 if hold else 0)
    # the next request is matched, admitted and loaded
    rx = b.admit(np.concatenate([x, toks(2, 54)]))
    assert rx["loaded"] == 12 * P and not b.cache._holding
    starts, exists = calls.count("batch_get_session_start"), calls.count("batch_is_exist")
    assert (starts, exists) == ((2, 0) if hold else (1, 2))
    if hold:  # the waiting request's session ended before the admitted one's opened
        names = [n for n in calls.calls if n.startswith("batch_get_session")]
        assert names[:3] == ["batch_get_session_start", "batch_get_session_end", "batch_get_session_start"]
    out = b.prefill([rx])
    assert _same_kv(ref[0]["kv"], out[0]["kv"], 12 * P)
    # the waiting request is admitted in a later round: its pages load whole too
    ry = b.admit(np.concatenate([y, toks(2, 55)]))
    assert ry["loaded"] == 9 * P
    out = b.prefill([ry])
    assert _same_kv(ref[1]["kv"], out[0]["kv"], 9 * P)
    b.cache.kv.flush()
    st = b.cache.kv._p.store.stats()
    assert st["get_ok"] == st["get_keys"] == 21 and not st["failed_by_status"]  # nothing counted twice or failed
    assert b.cache.protected_size() == 0
    assert b.allocator.available_size() + b.cache.evictable_size() == b.size
    for c in (b, a):  # the writer last: its segment holds the pages
        c.cache.shutdown()
