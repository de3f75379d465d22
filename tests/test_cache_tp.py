"""Tensor parallelism: every rank agrees on pages hit and loaded (all-reduce MIN, gloo)."""
import multiprocessing as mp
import uuid

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="TP agreement uses torch.distributed (in the [test] extra)")

P, LAYERS, SLOTS = 4, 2, 256


def _rank(rank, world, init, url, q):
    import torch.distributed as dist

    from kvdirect import KVLayout, keys
    from kvdirect.cache import KVDirectCache, torch_dist_min
    from kvdirect.config import CacheConfig
    from kvdirect.stores import open_store

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        k = [np.full((SLOTS, 2, 8), rank + 1, np.float32) for _ in range(LAYERS)]
        v = [x.copy() for x in k]
        layout = KVLayout.from_mha(k, v, page_size=P)
        cfg = CacheConfig(store=None, model="tp-model")
        writer = KVDirectCache(layout, url, config=cfg, tp_rank=rank, tp_size=world)
        toks = np.random.default_rng(3).integers(0, 9999, 8 * P).astype(np.int32)
        writer.write_back(toks, np.arange(8 * P))
        writer.flush()
        if rank == 1:  # this rank's copy of page 5 vanished from the pool
            d = keys.page_digests(toks, P, namespace_seed=keys.namespace_seed())
            open_store(url).remove(keys.pool_keys(d, writer.fingerprint)[5:6])
        dist.barrier()
        k2 = [np.zeros((SLOTS, 2, 8), np.float32) for _ in range(LAYERS)]
        v2 = [x.copy() for x in k2]
        freed = []
        reader = KVDirectCache(KVLayout.from_mha(k2, v2, page_size=P), url, config=cfg,
                               tp_rank=rank, tp_size=world, tp_reduce_min=torch_dist_min(),
                               free_slots=freed.append)
        m = reader.match(toks)
        pool_len = m.pool_len
        slots = np.arange(100, 100 + m.pool_len)
        loaded = reader.load(m, slots)
        # a second request where only rank 0's get fails mid-way: both use the same count
        toks2 = np.random.default_rng(4).integers(0, 9999, 6 * P).astype(np.int32)
        writer.write_back(toks2, np.arange(6 * P))
        writer.flush()
        dist.barrier()
        m2 = reader.match(toks2)
        pool2 = m2.pool_len
        if rank == 0:
            d = keys.page_digests(toks2, P, namespace_seed=keys.namespace_seed())
            open_store(url).remove(keys.pool_keys(d, reader.fingerprint)[2:3])
        dist.barrier()
        loaded2 = reader.load(m2, np.arange(200, 200 + m2.pool_len))
        ok_bytes = bool((k2[1][100:100 + loaded] == rank + 1).all())
        q.put((rank, pool_len, loaded, pool2, loaded2, ok_bytes))
        reader.close(), writer.close()
    finally:
        dist.destroy_process_group()


def test_tp_ranks_agree_on_hits_and_loads(tmp_path):
    url = f"shm://kvd-tp-{uuid.uuid4().hex[:8]}?size=32MiB"
    init = f"file://{tmp_path}/pg"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, init, url, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    from kvdirect.stores.shm import destroy_pool
    destroy_pool(url.split("//")[1].split("?")[0], missing_ok=True)
    assert [p.exitcode for p in procs] == [0, 0]
    res = sorted(q.get(timeout=5) for _ in range(2))
    (_, pool0, load0, pool2_0, load2_0, ok0), (_, pool1, load1, pool2_1, load2_1, ok1) = res
    # rank 1 misses page 5, so both ranks reuse only pages 0..4
    assert pool0 == pool1 == 5 * P and load0 == load1 == 5 * P
    # both saw 6 pages at match time; rank 0 then failed page 2: both load 2 pages
    assert pool2_0 == pool2_1 == 6 * P and load2_0 == load2_1 == 2 * P
    assert ok0 and ok1  # each rank got its own rank's bytes (fingerprint carries tp_rank)


# ---- MLA: one copy of each page, written by rank 0 only -------------------------------------
def _mla_rank(rank, world, init, url, q):
    import torch.distributed as dist

    from kvdirect import KVLayout
    from kvdirect.cache import KVDirectCache, torch_dist_min
    from kvdirect.config import CacheConfig
    from kvdirect.stores import open_store
    from kvdirect.stores._testing import FlakyStore

    class Counting(FlakyStore):
        """Counts the store calls this rank makes."""

        def __init__(self, inner):
            super().__init__(inner)
            self.calls = {"exists": 0, "put": 0, "put_keys": 0}

        def exists(self, keys):
            self.calls["exists"] += 1
            return super().exists(keys)

        def put(self, keys, scatter):
            self.calls["put"] += 1
            self.calls["put_keys"] += len(keys)
            return super().put(keys, scatter)

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        # MLA: every rank holds the same latent per token (72 = kv_lora_rank 64 + rope 8)
        kv = [np.random.default_rng(layer).standard_normal((SLOTS, 1, 72)).astype(np.float32) for layer in range(LAYERS)]
        cfg = CacheConfig(store=None, model="tp-mla-model")
        store = Counting(open_store(url))
        writer = KVDirectCache(KVLayout.from_mla(kv, page_size=P), store, config=cfg, tp_rank=rank,
                               tp_size=world, tp_reduce_min=torch_dist_min())
        toks = np.random.default_rng(3).integers(0, 9999, 8 * P).astype(np.int32)
        writer.write_back(toks, np.arange(8 * P))
        writer.flush()
        dist.barrier()
        write_calls = dict(store.calls)
        # a fresh cache on each rank (another server) finds the pages and loads rank 0's bytes
        kv2 = [np.zeros((SLOTS, 1, 72), np.float32) for _ in range(LAYERS)]
        reader = KVDirectCache(KVLayout.from_mla(kv2, page_size=P), url, config=cfg, tp_rank=rank,
                               tp_size=world, tp_reduce_min=torch_dist_min())
        m = reader.match(toks)
        pool_len = m.pool_len
        loaded = reader.load(m, np.arange(100, 100 + pool_len))
        same = all(np.array_equal(kv2[i][100:100 + loaded], kv[i][:loaded]) for i in range(LAYERS))
        q.put((rank, write_calls, writer.stats()["stored_pages"], pool_len, loaded, same))
        reader.close()
        writer._writer.shutdown()  # the store is closed once, by the reader side's open_store
        store.close()
    finally:
        dist.destroy_process_group()


def test_tp_mla_pages_are_written_by_rank_0_only(tmp_path):
    """MLA pages are the same on every TP rank and stored once (keys without the rank):
    rank 0 puts them, the other ranks make no store call to write them. Before, every
    rank checked and put the same pages (which rank's put landed was a race)."""
    url = f"shm://kvd-tp-mla-{uuid.uuid4().hex[:8]}?size=32MiB"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_mla_rank, args=(r, 2, f"file://{tmp_path}/pg", url, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    from kvdirect.stores.shm import destroy_pool
    destroy_pool(url.split("//")[1].split("?")[0], missing_ok=True)
    assert [p.exitcode for p in procs] == [0, 0]
    (_, calls0, stored0, pool0, load0, same0), (_, calls1, stored1, pool1, load1, same1) = \
        sorted(q.get(timeout=5) for _ in range(2))
    assert calls0["put_keys"] == 8 and stored0 == 8, calls0
    assert calls1 == {"exists": 0, "put": 0, "put_keys": 0} and stored1 == 0, \
        f"TP rank 1 wrote MLA pages that rank 0 writes: {calls1}"
    assert pool0 == pool1 == 8 * P and load0 == load1 == 8 * P
    assert same0 and same1
