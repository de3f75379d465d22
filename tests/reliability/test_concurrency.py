"""Concurrency: N processes x M operations on one shm pool, every read verified; the cache
manager's completion path (writer threads) under a busy scheduler loop; several engine
processes sharing one pool through KVDirectCache."""
from __future__ import annotations

import multiprocessing
import random
import threading
import time

import numpy as np

from kvdirect.cache import IN_POOL
from kvdirect.stores import ScatterList, open_store
from kvdirect.stores._testing import FlakyStore
from kvdirect.stores.base import NO_SPACE, NOT_FOUND, OK
from kvdirect.stores.shm import destroy_pool

from _rel import CI, Device, Driver, make_cache, report, tokens_of, uniq

CTX = multiprocessing.get_context("fork")
KEYS = 256
PAGE = 8 << 10  # fixed-size "page" objects read with scatter lists of 2 segments


def content(key_id: int, version: int, size: int) -> bytes:
    """Header (key id, version, size) then bytes derived from all three: any mix-up shows."""
    head = np.array([key_id, version, size], np.uint64).tobytes()
    n = max(size - len(head), 0)
    x = (np.arange(n, dtype=np.uint64) + np.uint64(key_id * 1_000_003 + version)) * np.uint64(0x9E3779B97F4A7C15)
    return (head + (x >> np.uint64(57)).astype(np.uint8).tobytes())[:size]


def verify(key_id: int, data: bytes) -> bool:
    if len(data) < 24:
        return False
    kid, ver, size = np.frombuffer(data[:24], np.uint64)
    return int(kid) == key_id and int(size) == len(data) and data == content(key_id, int(ver), len(data))


def _worker(name, seed, ops, q):
    s = open_store(f"shm://{name}?create=no")
    rng = random.Random(seed)
    counts = dict(put=0, put_ok=0, no_space=0, get=0, hit=0, exists=0, remove=0, bad=0, other=0)
    bufs = [np.zeros(PAGE // 2, np.uint8) for _ in range(8)]
    sl = ScatterList(np.array([[b.ctypes.data for b in bufs[2 * i:2 * i + 2]] for i in range(4)], np.uint64),
                     np.full((4, 2), PAGE // 2, np.uint64))
    t0 = time.perf_counter()
    for _ in range(ops):
        r = rng.random()
        k = rng.randrange(KEYS)
        if r < 0.35:  # put, random size (variable-size objects) or a fixed-size page object
            page = k % 4 == 0
            size = PAGE if page else rng.choice([24, 100, 4096, 5000, 40000, 70000])
            ok = s.put_bytes(f"o{k}", content(k, rng.randrange(1 << 30), size))
            counts["put"] += 1
            counts["put_ok"] += ok
        elif r < 0.6:  # get_bytes, verify
            st, data = s.get_bytes_status(f"o{k}")
            counts["get"] += 1
            if st == OK:
                counts["hit"] += 1
                counts["bad"] += not verify(k, data)
            elif st != NOT_FOUND:
                counts["other"] += 1
        elif r < 0.8:  # batched scatter get of 4 page objects, verify each
            ks = [rng.randrange(0, KEYS, 4) for _ in range(4)]
            st = s.get([f"o{x}" for x in ks], sl)
            counts["get"] += 4
            for i, (x, code) in enumerate(zip(ks, st)):
                if code == OK:
                    counts["hit"] += 1
                    counts["bad"] += not verify(x, bufs[2 * i].tobytes() + bufs[2 * i + 1].tobytes())
        elif r < 0.93:
            s.exists([f"o{x}" for x in range(k, min(k + 8, KEYS))])
            counts["exists"] += 1
        else:
            s.remove([f"o{k}"])
            counts["remove"] += 1
    counts["seconds"] = time.perf_counter() - t0
    q.put(counts)


def test_n_processes_m_operations_every_get_verified():
    n_proc = 4
    ops = 2500 if CI else 6000
    name = uniq("relconc")
    store = open_store(f"shm://{name}?size=4MiB&block=4KiB")  # smaller than the working set: evictions
    try:
        q = CTX.Queue()
        t0 = time.perf_counter()
        procs = [CTX.Process(target=_worker, args=(name, s, ops, q)) for s in range(n_proc)]
        for p in procs:
            p.start()
        res = [q.get(timeout=240) for _ in procs]
        wall = time.perf_counter() - t0
        for p in procs:
            p.join(20)
            assert p.exitcode == 0
        tot = {k: sum(r[k] for r in res) for k in res[0] if k != "seconds"}
        st = store.stats()
        assert tot["bad"] == 0 and tot["other"] == 0, tot
        assert tot["hit"] > 0 and tot["put_ok"] > 0 and st["evictions"] > 0
        assert st["pins"] == 0 and st["writing"] == 0
        # every object left is whole and verifiable
        left = 0
        for k in range(KEYS):
            stt, data = store.get_bytes_status(f"o{k}")
            if stt == OK:
                left += 1
                assert verify(k, data), k
        report("shm_n_procs_m_ops", processes=n_proc, ops_per_process=ops, total_ops=n_proc * ops,
               ops_per_s=round(n_proc * ops / wall), gets_verified=tot["hit"], wrong_reads=tot["bad"],
               puts=tot["put"], evictions=st["evictions"], objects_left_verified=left)
    finally:
        store.close()
        destroy_pool(name, missing_ok=True)


# ---------------------------------------------------------------------------------------------
# the cache manager: writer threads complete while the scheduler matches, loads, evicts

def test_cache_completion_path_under_busy_scheduler():
    P = 4
    name = uniq("relcc")
    inner = open_store(f"shm://{name}?size=16MiB&block=4KiB")
    slow = FlakyStore(inner, delay_s=0.002, delay_ops=("put",), fail_rate=0.0)  # puts overlap the loop
    dev = Device(P, slots=512)
    cache = make_cache(dev, slow, writer_threads=4, max_inflight_pages=64)
    drv = Driver(cache, dev)
    stop = threading.Event()
    errors = []

    def observer():  # metrics scrapes from another thread, as a metrics endpoint would
        while not stop.is_set():
            try:
                cache.stats()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
            time.sleep(0.001)

    obs = threading.Thread(target=observer, daemon=True)
    obs.start()
    n_req = 400 if CI else 1200
    docs = [tokens_of(P * 10 + 1, 500 + s) for s in range(16)]
    rng = random.Random(9)
    t0 = time.perf_counter()
    try:
        for i in range(n_req):
            base = docs[rng.randrange(len(docs))]
            cut = rng.randrange(P, len(base) + 1)
            drv.serve(np.concatenate([base[:cut], tokens_of(rng.randrange(0, 2 * P), 90_000 + i)]))
            if rng.random() < 0.3:
                cache.evict(rng.randrange(P, 40 * P))
            if i % 50 == 0:
                assert cache.index._check() == ""
        wall = time.perf_counter() - t0
        cache.flush()
        stop.set()
        obs.join(5)
        st = cache.stats()
        assert not errors, errors
        assert drv.wrong_bytes == 0 and drv.served == n_req
        assert st["inflight_pages"] == 0 and st["pending_completions"] == 0
        assert st["stored_pages"] > 0 and st["loaded_pages"] > 0 and st["store_failed_pages"] == 0
        assert cache.protected_size == 0  # nothing stays pinned after the writes completed
        assert cache.index._check() == ""
        # every page the index believes is in the pool really is there
        for d in docs:
            r = cache.index.match(d)
            if r.node:
                states, _ = cache.index.path_states(r.node)
                assert (states[: (r.device_len + r.pool_len) // P] != 2).all()  # no WRITING left
        report("cache_completion_path", requests=n_req, writer_threads=4, requests_per_s=round(n_req / wall),
               stored_pages=st["stored_pages"], loaded_pages=st["loaded_pages"], wrong_kv_bytes=drv.wrong_bytes)
    finally:
        stop.set()
        cache.close()
        destroy_pool(name, missing_ok=True)


def _engine(name, seed, n_req, q):
    P = 4
    dev = Device(P, slots=256)
    cache = make_cache(dev, f"shm://{name}?create=no", allow_no_store=False, writer_threads=2)
    drv = Driver(cache, dev)
    rng = random.Random(seed)
    docs = [tokens_of(P * 8 + 3, 700 + s) for s in range(12)]  # the same documents in every engine
    for _ in range(n_req):
        drv.serve(docs[rng.randrange(len(docs))])
        if rng.random() < 0.5:
            cache.evict(rng.randrange(P, 30 * P))
    cache.flush()
    st = cache.stats()
    cache.close()
    q.put((drv.served, drv.wrong_bytes, st["loaded_pages"], st["stored_pages"], st["skipped_existing_pages"]))


def test_engines_in_several_processes_share_one_pool():
    name = uniq("releng")
    store = open_store(f"shm://{name}?size=8MiB&block=4KiB")
    try:
        n_req = 150 if CI else 400
        q = CTX.Queue()
        procs = [CTX.Process(target=_engine, args=(name, s, n_req, q)) for s in range(3)]
        for p in procs:
            p.start()
        res = [q.get(timeout=240) for _ in procs]
        for p in procs:
            p.join(20)
            assert p.exitcode == 0
        assert sum(r[1] for r in res) == 0
        assert sum(r[2] for r in res) > 0  # pages written by one engine were loaded by others
        st = store.stats()
        assert st["pins"] == 0 and st["writing"] == 0
        report("engines_share_pool", engines=3, requests_served=sum(r[0] for r in res), wrong_kv_bytes=0,
               loaded_pages=sum(r[2] for r in res), stored_pages=sum(r[3] for r in res))
    finally:
        store.close()
        destroy_pool(name, missing_ok=True)
