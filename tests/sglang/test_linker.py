"""KVDirectLinker against SGLang 0.5.23's own pools, allocators and layer counter, its calls
made as SGLang's ``UnifiedCacheLinkerWrapper`` makes them (the real-server tests are
tests/e2e_sglang/test_linker.py)."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer
from sglang.srt.mem_cache.unified_cache.components import ComponentType

from driver import Engine, server_args
from kvdirect import keys as K
from kvdirect.errors import ConfigError
from kvdirect.sglang.linker import KVDirectLinker
from kvdirect.stores import open_store
from kvdirect.stores._testing import FlakyStore

FULL = {ComponentType.FULL}


@pytest.fixture
def url():
    name = f"kvd-linker-{uuid.uuid4().hex[:10]}"
    yield f"shm://{name}?size=32MiB"
    from kvdirect.stores.shm import destroy_pool
    destroy_pool(name, missing_ok=True)


def make(engine: Engine, url_or_store, components=FULL, **extra):
    store = None if isinstance(url_or_store, str) else url_or_store
    cfg = {"store": url_or_store if store is None else "shm://unused", **extra}
    lk = KVDirectLinker(server_args(), engine.params, components=components, extra_config=cfg, store=store)
    engine.kvpool.register_layer_transfer_counter(lk.layer_done_counter)
    return lk


def tokens(n, seed):
    return np.random.default_rng(seed).integers(1, 5000, n).astype(np.int64)


def hashes(engine, toks):
    return K.page_hashes(toks, engine.page_size)


def computed(engine, toks):
    """Engine computes ``toks`` into fresh slots (the forward) and returns the slots."""
    slots = engine.allocator.alloc(len(toks))
    engine.compute(toks, slots, 0)
    return slots


def offload(lk, engine, toks, slots) -> bool:
    assert lk.offload([PoolTransfer(name=PoolName.KV, device_indices=slots, keys=hashes(engine, toks))])
    while lk.num_completed_offloads() == 0:
        lk._offloads.join()
    return lk.pop_completed_offload()


def load(lk, engine, toks, forward=True):
    """lookup -> load -> start -> (the forward's layer reads) -> finish, as SGLang calls them."""
    hs = hashes(engine, toks)
    pages = lk.lookup("r", [PoolTransfer(name=PoolName.KV, keys=hs)])
    n = pages[-1] if pages else 0
    assert pages == list(range(1, n + 1))
    if not n:
        return n, None, True
    slots = engine.allocator.alloc(n * engine.page_size)
    assert lk.load("r", [PoolTransfer(name=PoolName.KV, device_indices=slots, keys=hs[:n])])
    index = lk.start_layer_wise_loading()
    lk.layer_done_counter.set_consumer(index)
    if forward:
        engine.attention_reads()  # waits for each layer through the counter
    return n, slots, lk.finish_layer_wise_loading(index)


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_pages_offloaded_by_one_engine_load_into_another_byte_for_byte(url, kind):
    a, b = Engine(16, kind), Engine(16, kind)
    la, lb = make(a, url), make(b, url)
    toks = tokens(8 * 16, 1)
    sa = computed(a, toks)
    assert offload(la, a, toks, sa) is True
    assert offload(la, a, toks, sa) is True  # again: every page is in the pool already, nothing is put
    assert la.stats.c["skipped_existing_pages"] == 8 and la.stats.c["stored_pages"] == 8
    n, sb, ok = load(lb, b, toks)
    assert (n, ok) == (8, True)
    for x, y in zip(a.kv_at(sa), b.kv_at(sb)):
        assert torch.equal(x, y)
    # another engine of another model identity names the same tokens differently: no hit
    c = Engine(16, kind)
    assert load(make(c, url, model="another-model"), c, toks)[0] == 0
    for lk in (la, lb):
        lk.close()


def test_a_load_failing_after_layer_0_completes_every_layer_and_reports_failure(url):
    a, b = Engine(16), Engine(16)
    la = make(a, url)
    toks = tokens(4 * 16, 2)
    assert offload(la, a, toks, computed(a, toks))
    flaky = FlakyStore(open_store(url), fail_rate=1.0, fail_ops=("get",), piecewise=True, fail_from_piece=1)
    lb = make(b, flaky)
    n, _, ok = load(lb, b, toks)  # the forward read every layer (no hang), the batch failed
    assert n == 4 and ok is False and flaky.injected["get"] == 4
    flaky.fail_rate = 0.0
    assert load(lb, b, toks)[2] is True  # the pool was not touched: the retry loads it
    la.close()
    lb.close()


def test_an_unusable_object_is_removed_so_a_retry_recomputes(url):
    a, b = Engine(16), Engine(16)
    la, lb = make(a, url), make(b, url)
    toks = tokens(4 * 16, 3)
    assert offload(la, a, toks, computed(a, toks))
    key = lb._keys(hashes(b, toks))[2]
    store = open_store(url)
    assert store.remove([key]) == 1 and store.put_bytes(key, b"not a page of this layout")
    n, _, ok = load(lb, b, toks)
    assert (n, ok) == (4, False)
    assert not store.exists([key])[0], "the CORRUPT object stayed: every later reader would fail on it"
    assert load(lb, b, toks)[0] == 2
    store.close()
    la.close()
    lb.close()


class Sticky(FlakyStore):
    """Gets time out (TIMEOUT statuses, a write may still land) and the store stays busy for a few
    quiesce() questions."""

    def __init__(self, inner, busy: int):
        super().__init__(inner, fail_rate=1.0, fail_ops=("get", "put"), mode="timeout", garbage=False)
        self.busy, self.asked = busy, 0

    def quiesce(self, timeout_s=None) -> bool:
        self.asked += 1
        return self.asked > self.busy


def test_a_timed_out_get_is_reported_only_when_the_store_is_quiet(url):
    a, b = Engine(16), Engine(16)
    la = make(a, url)
    toks = tokens(3 * 16, 4)
    assert offload(la, a, toks, computed(a, toks))
    sticky = Sticky(open_store(url), busy=2)
    lb = make(b, sticky)
    assert load(lb, b, toks)[2] is False
    assert sticky.asked == 3  # SGLang frees the slots once this returns: not before the store was quiet
    la.close()
    lb.close()


def test_a_timed_out_put_fails_and_leaves_no_object_behind(url):
    a = Engine(16)
    sticky = Sticky(open_store(url), busy=1)
    sticky.put_lands = True  # the abandoned put did store something (maybe torn)
    la = make(a, sticky)
    toks = tokens(2 * 16, 5)
    assert offload(la, a, toks, computed(a, toks)) is False
    assert sticky.asked == 2
    assert not open_store(url).exists(la._keys(hashes(a, toks))).any()
    la.close()


def test_offloads_complete_in_order_and_nothing_without_write_back(url):
    a = Engine(16)
    la = make(a, url)
    seqs = [tokens(2 * 16, 10 + i) for i in range(3)]
    for t in seqs:
        assert la.offload([PoolTransfer(name=PoolName.KV, device_indices=computed(a, t), keys=hashes(a, t))])
    la._offloads.join()
    assert la.num_completed_offloads() == 3 and [la.pop_completed_offload() for _ in range(3)] == [True] * 3
    la.close()
    quiet = make(a, url, write_back=False)
    t = tokens(16, 20)
    assert quiet.offload([PoolTransfer(name=PoolName.KV, device_indices=computed(a, t), keys=hashes(a, t))]) \
        is False
    quiet.close()


@pytest.mark.parametrize("component,word", [(ComponentType.SWA, "SWA"), (ComponentType.MAMBA, "MAMBA")])
def test_hybrid_components_are_refused_in_one_line_naming_them(url, component, word):
    with pytest.raises(ConfigError) as e:
        make(Engine(16), url, components={ComponentType.FULL, component})
    assert word in str(e.value) and "\n" not in str(e.value)


def test_a_linker_without_a_store_is_refused():
    with pytest.raises(ConfigError, match="needs a pool"):
        KVDirectLinker(server_args(), Engine(16).params, components=FULL, extra_config={})

