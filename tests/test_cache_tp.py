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


def _rank_writes(rank, world, init, url, q):
    """Both ranks write back the same requests; rank 1's puts are held at a gate, then one
    of its writes fails. What SGLang's admission reads (evictable size, what an eviction
    frees) and the pool states must be the same on both ranks after every poll."""
    import threading

    import torch.distributed as dist

    from kvdirect import KVLayout
    from kvdirect.cache import KVDirectCache, torch_dist_min
    from kvdirect.config import CacheConfig
    from kvdirect.stores import open_store
    from kvdirect.stores._testing import FlakyStore

    class GatedStore(FlakyStore):
        """Rank 1's pool client: puts wait at a gate (a slow write); failing on demand."""

        def __init__(self, inner):
            super().__init__(inner, fail_ops=("put",))
            self.gate = threading.Event()

        def put(self, keys, scatter):
            self.gate.wait(60)
            return super().put(keys, scatter)

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        k = [np.zeros((SLOTS, 2, 8), np.float32) for _ in range(LAYERS)]
        v = [x.copy() for x in k]
        store = GatedStore(open_store(url)) if rank == 1 else open_store(url)
        cache = KVDirectCache(KVLayout.from_mha(k, v, page_size=P), store,
                              config=CacheConfig(store=None, model="tp-writes"), tp_rank=rank, tp_size=world,
                              tp_reduce_min=torch_dist_min(), free_slots=lambda s: None)
        seen = []

        def state(tag, toks):
            r = cache.index.match(toks, None)
            states = cache.index.path_states(r.node)[0][: len(toks) // P].tolist() if r.device_len else []
            seen.append((tag, cache.evictable_size, states))

        doc = np.random.default_rng(7).integers(0, 9999, 8 * P).astype(np.int32)
        cache.write_back(doc, np.arange(8 * P))
        if rank == 0:
            cache._wb.wait_idle(30)  # rank 0's write is done; rank 1's waits at its gate
        dist.barrier()
        cache.poll()
        state("rank 1 still writing", doc)
        seen.append(("evicted while rank 1 writes", cache.evict(8 * P), []))
        dist.barrier()
        if rank == 1:
            store.gate.set()
        cache.flush(30)
        state("both written", doc)
        # a write that fails on rank 1 only: no rank may count those pages as in the pool
        if rank == 1:
            store.fail_rate = 1.0
        doc2 = np.random.default_rng(8).integers(0, 9999, 4 * P).astype(np.int32)
        cache.write_back(doc2, np.arange(100, 100 + 4 * P))
        cache.flush(30)
        state("failed on rank 1", doc2)
        q.put((rank, seen))
        cache.close()
    finally:
        dist.destroy_process_group()


def test_tp_ranks_apply_the_same_write_completions(tmp_path):
    url = f"shm://kvd-tpw-{uuid.uuid4().hex[:8]}?size=32MiB"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_writes, args=(r, 2, f"file://{tmp_path}/pg", url, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    from kvdirect.stores.shm import destroy_pool
    destroy_pool(url.split("//")[1].split("?")[0], missing_ok=True)
    assert [p.exitcode for p in procs] == [0, 0]
    (_, seen0), (_, seen1) = sorted(q.get(timeout=5) for _ in range(2))
    for a, b in zip(seen0, seen1):
        assert a == b, f"TP ranks disagree ({a[0]}): rank 0 {a[1:]}, rank 1 {b[1:]}"
    # and what they agree on is right: nothing unpinned while rank 1 was writing, all of it after
    assert seen0[0][1] == 0 and seen0[1][1] == 0
    assert seen0[2][1] == 8 * P and seen0[2][2] == [1] * 8   # IN_POOL everywhere
    assert seen0[3][2] == [0] * 4                              # UNKNOWN everywhere (failed on rank 1)


# ---- MLA: one copy of each page, written by rank 0 only -------------------------------------
def _mla_rank(rank, world, init, url, q):
    import threading

    import torch.distributed as dist

    from kvdirect import KVLayout
    from kvdirect.cache import KVDirectCache, torch_dist_min
    from kvdirect.config import CacheConfig
    from kvdirect.stores import open_store
    from kvdirect.stores._testing import FlakyStore

    class Counting(FlakyStore):
        """Counts the store calls this rank makes; puts wait at a gate (a slow write)."""

        def __init__(self, inner):
            super().__init__(inner)
            self.calls = {"exists": 0, "put": 0, "put_keys": 0}
            self.gate = threading.Event()

        def exists(self, keys):
            self.calls["exists"] += 1
            return super().exists(keys)

        def put(self, keys, scatter):
            self.calls["put"] += 1
            self.calls["put_keys"] += len(keys)
            self.gate.wait(60)
            return super().put(keys, scatter)

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        # MLA: every rank holds the same latent per token (72 = kv_lora_rank 64 + rope 8)
        kv = [np.random.default_rng(layer).standard_normal((SLOTS, 1, 72)).astype(np.float32)
              for layer in range(LAYERS)]
        cfg = CacheConfig(store=None, model="tp-mla-model")
        store = Counting(open_store(url))
        writer = KVDirectCache(KVLayout.from_mla(kv, page_size=P), store, config=cfg, tp_rank=rank,
                               tp_size=world, tp_reduce_min=torch_dist_min())
        toks = np.random.default_rng(3).integers(0, 9999, 8 * P).astype(np.int32)
        writer.write_back(toks, np.arange(8 * P))
        dist.barrier()
        writer.poll()  # rank 0's put waits at its gate: every rank keeps the pages pinned
        seen = [writer.evictable_size]
        store.gate.set()
        writer.flush(30)
        r = writer.index.match(toks, None)
        seen += [writer.evictable_size, writer.index.path_states(r.node)[0][:8].tolist()]
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
        q.put((rank, write_calls, writer.stats()["stored_pages"], seen, pool_len, loaded, same))
        reader.close()
        writer.close()
    finally:
        dist.destroy_process_group()


def test_tp_mla_pages_are_written_by_rank_0_only(tmp_path):
    """MLA pages are the same on every TP rank and stored once (keys without the rank):
    rank 0 puts them; the other ranks make no store call to write them, but pin the same
    pages until the ranks agree the write is done (the same evictable size everywhere).
    Before, every rank checked and put the same pages (which rank's put landed was a race)."""
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
    (_, calls0, stored0, seen0, pool0, load0, same0), (_, calls1, stored1, seen1, pool1, load1, same1) = \
        sorted(q.get(timeout=5) for _ in range(2))
    assert calls0["put_keys"] == 8 and stored0 == 8, calls0
    assert calls1 == {"exists": 0, "put": 0, "put_keys": 0} and stored1 == 0, \
        f"TP rank 1 wrote MLA pages that rank 0 writes: {calls1}"
    # pinned on both ranks while rank 0 writes, unpinned on both after; rank 1 leaves the
    # pool state unknown (its matches ask the store)
    assert seen0[:2] == seen1[:2] == [0, 8 * P], (seen0, seen1)
    assert seen0[2] == [1] * 8 and seen1[2] == [0] * 8, (seen0, seen1)
    assert pool0 == pool1 == 8 * P and load0 == load1 == 8 * P
    assert same0 and same1
