"""kvdirect.engine: seeded model, paged KV pool, and the request runner's cache protocol."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the engine needs the [demo] extra (torch)")
pytest.importorskip("transformers", reason="the engine needs the [demo] extra (transformers)")

from kvdirect.engine import (DevicePrefixCache, Engine, ModelSpec, OutOfSlots, PagedKVPool,  # noqa: E402
                             SlotAllocator, build_model, weights_digest)
from kvdirect.errors import ConfigError, KVDirectError  # noqa: E402

SMALL = ModelSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512)
P = 16


@pytest.fixture(scope="module")
def model():
    return build_model(SMALL)


def make_engine(model, num_slots=2048):
    return Engine(model, PagedKVPool.for_model(SMALL, num_slots, page_size=P))


def rand_tokens(seed, n):
    return np.random.default_rng(seed).integers(0, SMALL.vocab_size, n).astype(np.int32)


# -- allocator and pool --------------------------------------------------------
def test_allocator_hands_out_whole_contiguous_pages():
    a = SlotAllocator(8 * P, P)
    s = a.alloc(2 * P + 3)
    assert s.dtype == np.int64 and len(s) == 2 * P + 3
    pages = s[::P] // P
    assert np.array_equal(s, (pages[:, None] * P + np.arange(P)).reshape(-1)[: len(s)])
    assert a.free_pages == 5  # the partial third page is reserved with the allocation
    t = a.alloc(5 * P)
    assert not np.intersect1d(s, t).size
    with pytest.raises(OutOfSlots):
        a.alloc(1)
    a.free(s[P:])  # frees pages 2 and 3 of s (the partial one included)
    assert a.free_pages == 2
    with pytest.raises(KVDirectError, match="double free"):
        a.free(s[P + 1:P + 2])
    a.free(s[:P])
    a.free(t)
    assert a.free_pages == 8
    with pytest.raises(ConfigError):
        SlotAllocator(100, P)


def test_pool_gather_scatter_roundtrip():
    pool = PagedKVPool(3, 4 * P, 2, 8, page_size=P)
    slots = np.array([5, 17, 2, 40], dtype=np.int64)
    k = torch.randn(3, 2, 4, 8)
    v = torch.randn(3, 2, 4, 8)
    pool.scatter(slots, k, v)
    gk, gv = pool.gather(slots)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    assert torch.equal(pool.k_buffers[1][17], k[1, :, 1])  # per-layer views see the same memory
    assert pool.k_buffers[0].data_ptr() != pool.k_buffers[1].data_ptr()
    assert pool.bytes_per_token == 2 * 3 * 2 * 8 * 4


def test_seeded_weights_identical_and_seed_dependent(model):
    assert weights_digest(model) == weights_digest(build_model(SMALL))
    other = ModelSpec(**{**SMALL.to_dict(), "seed": 1})
    assert weights_digest(model) != weights_digest(build_model(other))


def test_llama_arch_with_wide_heads():
    """The SGLang demo's transfer shape is a Llama (its head_dim is not hidden / heads)."""
    wide = ModelSpec(**{**SMALL.to_dict(), "arch": "llama", "explicit_head_dim": 32})
    m = build_model(wide)
    assert type(m).__name__ == "LlamaForCausalLM" and m.config.head_dim == 32
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (2 * 32, 64) and m.model.layers[0].self_attn.k_proj.bias is None
    assert wide.kv_bytes_per_token() == 2 * 2 * 2 * 32 * 4
    assert weights_digest(m) != weights_digest(build_model(ModelSpec(**{**SMALL.to_dict(), "explicit_head_dim": 32})))
    with pytest.raises(ConfigError, match="arch"):
        ModelSpec(arch="gpt2")


# -- the runner ------------------------------------------------------------------
def test_baseline_kv_in_pool_matches_full_forward(model):
    eng = make_engine(model)
    tokens = rand_tokens(0, 5 * P + 3)
    r = eng.serve(tokens, 3, keep=5 * P)
    assert r.cached_tokens == 0 and len(r.output_ids) == 3
    with torch.inference_mode():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long)[None], use_cache=True)
    dyn = getattr(out, "cache", None) or out.past_key_values
    k_ref = torch.stack([l.keys[0] for l in dyn.layers]) if hasattr(dyn, "layers") else torch.stack(
        [k[0] for k in dyn.key_cache])
    k, _ = eng.pool.gather(r.kept_slots)
    torch.testing.assert_close(k, k_ref[:, :, :5 * P], rtol=1e-5, atol=1e-5)
    assert int(out.logits[0, -1].argmax()) == r.output_ids[0]
    torch.testing.assert_close(r.first_logits, out.logits[0, -1], rtol=1e-5, atol=1e-5)
    eng.allocator.free(r.kept_slots)
    assert eng.allocator.free_pages == eng.allocator.num_pages


@pytest.mark.parametrize("shared", [0, 3 * P + 5, 8 * P])
def test_prefix_from_pool_gives_same_tokens_and_logits(model, shared):
    eng = make_engine(model)
    n = 8 * P
    doc = rand_tokens(1, n)
    prompt = rand_tokens(2, n)
    prompt[:shared] = doc[:shared]
    base = eng.serve(prompt, 4)
    cache = DevicePrefixCache(P, eng.allocator.free)
    eng.serve(doc, 4, cache=cache)
    r = eng.serve(prompt, 4, cache=cache)
    expect = min(shared, n - 1) // P * P  # whole pages, and at least one token left to prefill
    assert r.cached_tokens == r.device_hit_tokens == expect
    assert r.prefill_tokens == n - expect
    assert r.output_ids == base.output_ids
    assert float((r.first_logits - base.first_logits).abs().max()) <= 1e-4
    # the same prompt again: everything but the last page comes from the cache
    r2 = eng.serve(prompt, 4, cache=cache)
    assert r2.cached_tokens == n - P and r2.output_ids == base.output_ids
    cache.clear()
    assert len(cache) == 0 and eng.allocator.free_pages == eng.allocator.num_pages  # no slot leaked


def test_engine_evicts_from_cache_when_pool_is_full(model):
    eng = make_engine(model, num_slots=12 * P)
    cache = DevicePrefixCache(P, eng.allocator.free)
    for seed in range(4):  # each request writes back 5 pages; the pool holds 12
        eng.serve(rand_tokens(10 + seed, 5 * P + 1), 2, cache=cache)
    assert 0 < len(cache) <= 12
    assert eng.allocator.free_pages + len(cache) == eng.allocator.num_pages
    with pytest.raises(OutOfSlots, match="pool exhausted"):
        eng.serve(rand_tokens(9, 14 * P), 1)  # more than the pool, even after evicting everything


def test_lock_protects_pages_from_eviction():
    freed = []
    c = DevicePrefixCache(P, lambda s: freed.append(np.asarray(s)))
    toks = rand_tokens(3, 3 * P)
    assert c.write_back(toks, np.arange(3 * P, dtype=np.int64)) == 0
    assert c.write_back(toks, np.arange(100, 100 + 3 * P, dtype=np.int64)) == 3 * P  # all duplicates
    m = c.match(toks)
    assert m.device_len == 3 * P and np.array_equal(m.device_slots, np.arange(3 * P))
    c.lock(m.node)
    assert c.evict(3 * P) == 0 and not freed
    c.unlock(m.node)
    assert c.evict(P) == P and np.array_equal(freed[0], np.arange(2 * P, 3 * P))  # the leaf goes first
    with pytest.raises(KVDirectError):
        c.unlock(c.match(toks).node)


def test_bad_prefix_from_cache_is_rejected(model):
    eng = make_engine(model)

    class Misaligned(DevicePrefixCache):
        def match(self, tokens, namespace=None):
            m = super().match(tokens, namespace)
            m.device_len, m.device_slots = 5, np.arange(5, dtype=np.int64)
            return m

    with pytest.raises(KVDirectError, match="page aligned"):
        eng.serve(rand_tokens(4, 3 * P), 1, cache=Misaligned(P, eng.allocator.free))
    assert eng.allocator.free_pages == eng.allocator.num_pages


# -- the load path, through a test-only store-backed cache ------------------------
class StoreBackedCache(DevicePrefixCache):
    """Test double for KVDirectCache: device pages via DevicePrefixCache, plus a
    dict "store" shared between engines (page hash chain -> K/V page copies)."""

    def __init__(self, pool, store):
        super().__init__(pool.page_size, pool.allocator.free)
        self.pool, self.store = pool, store

    def _page_keys(self, tokens, namespace=None):
        return DevicePrefixCache._keys(self, np.asarray(tokens), namespace)

    def match(self, tokens, namespace=None):
        m = super().match(tokens, namespace)
        keys = self._page_keys(tokens, namespace)
        n = m.device_len // self.page_size
        while n < len(keys) and keys[n] in self.store:
            n += 1
        m.pool_len = n * self.page_size - m.device_len
        m.tokens = np.asarray(tokens)[: n * self.page_size]
        return m

    def load(self, m, slots):
        keys = self._page_keys(m.tokens)[m.device_len // self.page_size:]
        k = torch.cat([self.store[key][0] for key in keys], dim=2)
        v = torch.cat([self.store[key][1] for key in keys], dim=2)
        self.pool.scatter(slots, k, v)
        all_slots = np.concatenate([m.device_slots, slots])
        super().write_back(m.tokens, all_slots)
        new = super().match(m.tokens)
        self.lock(new.node)
        self.unlock(m.node)
        m.node = new.node
        return len(slots)

    def write_back(self, tokens, slots, namespace=None):
        already = super().write_back(tokens, slots, namespace)
        full = len(tokens) // self.page_size * self.page_size
        k, v = self.pool.gather(slots[:full])
        for i, key in enumerate(self._page_keys(tokens, namespace)):
            self.store.setdefault(key, (k[:, :, i * P:(i + 1) * P].clone(), v[:, :, i * P:(i + 1) * P].clone()))
        return already


def test_two_engines_share_a_store_through_the_cache_protocol(model):
    store = {}
    a, b = make_engine(model), make_engine(model)
    ca, cb = StoreBackedCache(a.pool, store), StoreBackedCache(b.pool, store)
    n = 10 * P
    doc = rand_tokens(5, n)
    prompt = rand_tokens(6, n)
    prompt[:6 * P] = doc[:6 * P]
    base = b.serve(prompt, 4)
    a.serve(doc, 4, cache=ca)
    r = b.serve(prompt, 4, cache=cb)
    assert (r.device_hit_tokens, r.loaded_tokens, r.pool_candidate_tokens) == (0, 6 * P, 6 * P)
    assert r.output_ids == base.output_ids
    assert float((r.first_logits - base.first_logits).abs().max()) <= 1e-4
    # loaded pages are now device-resident in B: the next request hits the device
    r2 = b.serve(prompt, 4, cache=cb)
    assert r2.loaded_tokens == 0 and r2.device_hit_tokens == n - P
    for eng, c in ((a, ca), (b, cb)):
        c.clear()
        assert eng.allocator.free_pages == eng.allocator.num_pages


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefix_reuse_on_cuda_matches_full_prefill():
    spec = ModelSpec(**{**SMALL.to_dict()})
    eng = Engine.build(spec, num_slots=2048, page_size=P, device="cuda")
    assert eng.pool.k.is_cuda
    doc, prompt = rand_tokens(7, 8 * P), rand_tokens(8, 8 * P)
    prompt[:4 * P] = doc[:4 * P]
    base = eng.serve(prompt, 4)
    cache = DevicePrefixCache(P, eng.allocator.free)
    eng.serve(doc, 4, cache=cache)
    r = eng.serve(prompt, 4, cache=cache)
    assert r.cached_tokens == 4 * P and r.output_ids == base.output_ids
    assert float((r.first_logits - base.first_logits).abs().max()) <= 1e-3
