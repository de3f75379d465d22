"""Fault injection: every scenario serves every request, uses no wrong KV byte and loses no data.

Data lost is measured, never assumed: after each scenario every page (object) it was told is
stored is read back from the pool and compared with its source (``_rel.lost_pages``, and
``pool_objects_lost`` for the raw-pool scenarios); docs/reliability.md defines the figure.

* mooncake_master SIGKILLed in the middle of loads and write-backs, restarted on the same ports;
* processes SIGKILLed at random points (and at each critical phase) of puts and gets on the shm pool;
* the shm pool full while readers hold pins (layer-wise reads in other processes);
* a store that errors or times out for a fraction of keys, through KVDirectCache;
* MemCache client init failure (a real MetaService, no Ascend runtime): clear error, no pool.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import numpy as np
import pytest

from kvdirect.errors import StoreError
from kvdirect.stores import ScatterList, open_store
from kvdirect.stores._testing import FlakyStore
from kvdirect.stores.base import NO_SPACE, OK
from kvdirect.stores.shm import destroy_pool

from _rel import (CI, Device, Driver, StoredPages, lost_pages, make_cache, report, run_bounded, tokens_of, uniq,
                  wait_for_file)

CTX = multiprocessing.get_context("fork")


# ---------------------------------------------------------------------------------------------
# content addressed by key: any process can verify any object it reads

MAX_OBJ = 48 << 10


def obj_size(seed: int) -> int:
    return 1 + (seed * 7919) % MAX_OBJ


def obj_content(seed: int) -> np.ndarray:
    n = obj_size(seed)
    x = (np.arange(n, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
    return (x >> np.uint64(56)).astype(np.uint8)


def sl1(buf: np.ndarray) -> ScatterList:
    s = ScatterList(np.array([[buf.ctypes.data]], np.uint64), np.array([[buf.nbytes]], np.uint64))
    object.__setattr__(s, "_keep", buf)
    return s


def pool_objects_lost(store, required=()) -> dict:
    """Read back every object in the pool (``k{seed}`` keys hold obj_content(seed)) and every key in
    ``required`` (told stored, never evictable: pinned). data_lost = objects present whose bytes differ
    from their source or cannot be read whole, plus required keys that are absent."""
    present = [k for k, _ in store.list_objects() if k.startswith("k")]
    wrong = 0
    for k in present:
        st, data = store.get_bytes_status(k)
        if st == OK:
            wrong += int(np.frombuffer(data, np.uint8).tobytes() != obj_content(int(k[1:])).tobytes())
        elif st != 1:  # anything but NOT_FOUND (evicted or removed since listed): not delivered whole
            wrong += 1
    missing = int((~store.exists(list(required))).sum()) if required else 0
    return {"objects_checked": len(present), "required_missing": missing, "data_lost": wrong + missing}


def _check_get(store, seed) -> int:
    """1 if key k{seed} was read and is wrong, 0 otherwise (a miss is fine)."""
    out = np.zeros(obj_size(seed), np.uint8)
    st = store.get([f"k{seed}"], sl1(out))[0]
    return int(st == OK and not np.array_equal(out, obj_content(seed)))


def _random_ops(name, seed, hold_phase, hold_after, marker, seconds):
    """A pool client doing random puts/gets/removes; optionally stops at a phase (debug hold)."""
    s = open_store(f"shm://{name}?create=no")
    rng = random.Random(seed)
    bad = ops = 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        if hold_phase and ops == hold_after:
            s._debug_hold(hold_phase, 60, marker)
        k = rng.randrange(200)
        r = rng.random()
        if r < 0.45:
            s.put([f"k{k}"], sl1(obj_content(k)))
        elif r < 0.9:
            bad += _check_get(s, k)
        elif r < 0.95:
            s.remove([f"k{k}"])
        else:
            s.exists([f"k{k}", f"k{k + 1}"])
        ops += 1
    return bad, ops


def _victim(name, seed, hold_phase, hold_after, marker):
    _random_ops(name, seed, hold_phase, hold_after, marker, 60)
    os._exit(3)  # never reached: killed before


def _survivor(name, seed, seconds, q):
    q.put(_random_ops(name, seed, None, 0, "", seconds))


def test_shm_sigkill_at_random_points_many_times(tmp_path):
    kills = 40 if CI else 120
    name = uniq("relkill")
    store = open_store(f"shm://{name}?size=2MiB&block=4KiB&pins=64")
    try:
        blocks = store.stats()["blocks"]
        q = CTX.Queue()
        survivors = [CTX.Process(target=_survivor, args=(name, 1000 + i, 4 + kills * 0.05, q)) for i in range(2)]
        for p in survivors:
            p.start()
        rng = random.Random(7)
        phases = {}
        parent_bad = 0
        for i in range(kills):
            phase = rng.choice([None, None, "lock", "alloc", "put_copy", "get_copy"])
            marker = str(tmp_path / f"m{i}")
            p = CTX.Process(target=_victim, args=(name, i, phase, rng.randrange(30), marker))
            p.start()
            if phase:
                wait_for_file(marker)
            else:
                time.sleep(rng.uniform(0.001, 0.03))  # somewhere in the middle of random work
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
            assert p.exitcode == -signal.SIGKILL
            phases[phase or "random"] = phases.get(phase or "random", 0) + 1
            # the pool keeps working right after every kill, and what it returns is right
            parent_bad += run_bounded(lambda: sum(_check_get(store, k) for k in range(0, 200, 7)), 20)
            run_bounded(lambda: store.put([f"k{i % 200}"], sl1(obj_content(i % 200))), 20)
        results = [q.get(timeout=60) for _ in survivors]
        for p in survivors:
            p.join(20)
            assert p.exitcode == 0
        surv_bad = sum(r[0] for r in results)
        surv_ops = sum(r[1] for r in results)
        # every object the kills left in the pool, read back: none differs from what was put
        loss = pool_objects_lost(store)
        assert loss["objects_checked"] > 0 and loss["data_lost"] == 0, loss
        # recovery: the whole pool is usable again (dead reservations and pins reclaimed)
        keys = [f"fill{j}" for j in range(blocks)]
        zero = np.zeros(4096, np.uint8)  # one page, the source of every fill object (kept alive)
        st = run_bounded(lambda: store.put(keys, ScatterList(np.full((blocks, 1), zero.ctypes.data, np.uint64),
                                                             np.full((blocks, 1), 4096, np.uint64))), 30)
        assert (st == OK).all(), np.unique(st, return_counts=True)
        s = store.stats()
        assert s["writing"] == 0 and s["pins"] == 0 and s["objects"] == blocks
        store.remove(keys)
        s = store.stats()
        assert s["free_blocks"] == blocks and s["used"] == 0, s  # no leaked space
        assert parent_bad == 0 and surv_bad == 0
        assert s["recoveries"] >= phases.get("lock", 0) + phases.get("alloc", 0)
        assert s["reaped_writes"] >= phases.get("put_copy", 0)
        assert s["reaped_pins"] >= phases.get("get_copy", 0)
        report("shm_sigkill", kills=kills, kills_by_point=phases, survivor_ops=surv_ops,
               wrong_objects_read=parent_bad + surv_bad, recoveries=s["recoveries"],
               reaped_writes=s["reaped_writes"], reaped_pins=s["reaped_pins"],
               leaked_blocks_after_recovery=blocks - s["free_blocks"], deadlocks=0,
               data_lost=loss["data_lost"], objects_checked=loss["objects_checked"])
    finally:
        store.close()
        destroy_pool(name, missing_ok=True)


# ---------------------------------------------------------------------------------------------
# pool full while readers hold pins

def _pin_reader(name, keys, seeds, pieces, q, pinned_ev, done_ev):
    """Pin objects, read them piece by piece (as a layer-wise load does) while the writer
    fills the pool; the last piece comes only after the writer is done; verify."""
    s = open_store(f"shm://{name}?create=no")
    sizes = np.array([obj_size(k) for k in seeds], np.uint64)
    outs = [np.zeros(int(n), np.uint8) for n in sizes]
    rd = s.open_read(keys, sizes)
    pinned = rd.status.copy()
    pinned_ev.set()
    for j in range(pieces):
        if j == pieces - 1:
            done_ev.wait(120)
        lo = [len(o) * j // pieces for o in outs]
        hi = [len(o) * (j + 1) // pieces for o in outs]
        sl = ScatterList(np.array([[o.ctypes.data + a] for o, a in zip(outs, lo)], np.uint64),
                         np.array([[b - a] for a, b in zip(lo, hi)], np.uint64))
        rd.read(sl)
        time.sleep(0.01)
    final = rd.end()
    bad = sum(int(f == OK and not np.array_equal(o, obj_content(k))) for f, o, k in zip(final, outs, seeds))
    q.put((pinned.tolist(), final.tolist(), bad))


def pool_full_scenario() -> dict:
    """The shm pool filled 3x over while 2 reader processes hold pins; returns the figures
    (tests/reliability/test_reliability_doc.py recomputes the doc's claims with it)."""
    name = uniq("relfull")
    store = open_store(f"shm://{name}?size=1MiB&block=4KiB&pins=64")
    try:
        cap = store.stats()["capacity"]
        pinned_seeds = list(range(8))
        store.put([f"k{k}" for k in pinned_seeds], _multi(pinned_seeds))
        q = CTX.Queue()
        pinned_evs = [CTX.Event() for _ in range(2)]
        done = CTX.Event()
        readers = [CTX.Process(target=_pin_reader, args=(name, [f"k{k}" for k in pinned_seeds[r::2]],
                                                        pinned_seeds[r::2], 12, q, pinned_evs[r], done))
                   for r in range(2)]
        for p in readers:
            p.start()
        for e in pinned_evs:
            assert e.wait(60)
        # writer: several times the capacity of new objects, forcing eviction under pressure
        written = no_space = other = 0
        seed = 1000
        t_end = time.monotonic() + 0.5
        while written * (MAX_OBJ // 2) < 3 * cap or time.monotonic() < t_end:
            st = store.put([f"k{seed}"], sl1(obj_content(seed)))[0]
            written += st == OK
            no_space += st == NO_SPACE
            other += st not in (OK, NO_SPACE)
            seed += 1
        still = store.exists([f"k{k}" for k in pinned_seeds])  # readers are still mid-read here
        done.set()
        res = [q.get(timeout=60) for _ in readers]
        for p in readers:
            p.join(10)
            assert p.exitcode == 0
        for pinned, final, bad in res:
            assert all(x == OK for x in pinned) and all(x == OK for x in final) and bad == 0
        s = store.stats()
        assert other == 0 and s["evictions"] > 0 and s["pins"] == 0 and s["writing"] == 0
        # pinned objects survived the pressure (readers were mid-read); afterwards they are ordinary
        assert still.all()
        # read back: the pinned objects (told stored, never evictable) and everything else still there
        loss = pool_objects_lost(store, required=[f"k{k}" for k in pinned_seeds])
        return dict(pinned_objects=len(pinned_seeds), puts_ok=int(written), puts_no_space=int(no_space),
                    evictions=s["evictions"], wrong_objects_read=sum(r[2] for r in res), pins_left=s["pins"],
                    data_lost=loss["data_lost"], objects_checked=loss["objects_checked"])
    finally:
        store.close()
        destroy_pool(name, missing_ok=True)


def test_pool_full_while_readers_hold_pins():
    f = pool_full_scenario()
    assert f["data_lost"] == 0 and f["wrong_objects_read"] == 0 and f["objects_checked"] > 0, f
    report("shm_full_with_pins", **f)


def _multi(seeds) -> ScatterList:
    bufs = [obj_content(k) for k in seeds]
    s = ScatterList(np.array([[b.ctypes.data] for b in bufs], np.uint64),
                    np.array([[b.nbytes] for b in bufs], np.uint64))
    object.__setattr__(s, "_keep", bufs)
    return s


# ---------------------------------------------------------------------------------------------
# a store failing for a fraction of keys, through the cache manager

def flaky_store_scenario(mode: str, n_req: int) -> dict:
    """Requests through KVDirectCache over a store failing 25% of keys; returns the scenario's figures
    (tests/reliability/test_reliability_doc.py recomputes the doc's claims with it)."""
    P = 4
    name = uniq("relflaky")
    inner = open_store(f"shm://{name}?size=16MiB&block=4KiB")
    flaky = FlakyStore(inner, fail_rate=0.25, seed=3, mode=mode, garbage=True, put_lands=(mode == "timeout"))
    stored = StoredPages(flaky)  # what the cache is told was stored
    dev = Device(P, slots=2048)
    # a back-off of 1 us: the store is retried on the next request, so how many loads the run
    # makes does not depend on how fast this machine serves requests
    cache = make_cache(dev, stored, retry_initial_s=1e-6, retry_max_s=1e-6)
    drv = Driver(cache, dev)
    try:
        docs = [tokens_of(P * 12 + 3, s) for s in range(10)]
        rng = random.Random(5)
        for i in range(n_req):
            base = docs[rng.randrange(len(docs))]
            cut = rng.randrange(P, len(base))
            toks = np.concatenate([base[:cut], tokens_of(rng.randrange(0, 3 * P), 10_000 + i)])
            drv.serve(toks)
            if rng.random() < 0.4:  # push device pages out so later requests load from the pool
                cache.evict(rng.randrange(P, 30 * P))
        cache.flush()
        st = cache.stats()
        assert flaky.injected["get"] > 0 and flaky.injected["put"] > 0
        assert st["loaded_pages"] > 0 and st["load_failed_pages"] > 0, st
        assert cache.index._check() == ""
        # every page the cache counts as stored, read back from the pool itself (not through the
        # failing wrapper): the pool evicted nothing, so a missing page would be a lost one
        assert inner.stats()["evictions"] == 0
        loss = lost_pages(inner, stored.stored, drv.pages, P)
        assert 0 < loss["pages_checked"] <= st["stored_pages"], loss
        return dict(requests_served=drv.served, wrong_kv_bytes=drv.wrong_bytes, data_lost=loss["data_lost"],
                    pages_checked=loss["pages_checked"], injected_failures=dict(flaky.injected),
                    loaded_pages=st["loaded_pages"], load_failed_pages=st["load_failed_pages"],
                    stored_pages=st["stored_pages"], store_failed_pages=st["store_failed_pages"])
    finally:
        cache.close()
        destroy_pool(name, missing_ok=True)


@pytest.mark.parametrize("mode", ["error", "timeout"])
def test_flaky_store_pages_are_misses_never_used(mode):
    n_req = 120 if CI else 300
    f = flaky_store_scenario(mode, n_req)
    assert f["wrong_kv_bytes"] == 0 and f["data_lost"] == 0 and f["requests_served"] == n_req, f
    report(f"flaky_store_{mode}", **f)


def test_data_lost_counts_missing_and_wrong_pages():
    """The measure itself: a page removed behind the cache's back and a page overwritten with other
    bytes are both counted; a page read back as written is not."""
    P = 4
    name = uniq("rellost")
    inner = open_store(f"shm://{name}?size=4MiB&block=4KiB")
    stored = StoredPages(inner)
    dev = Device(P)
    cache = make_cache(dev, stored)
    try:
        drv = Driver(cache, dev)
        drv.serve(tokens_of(P * 6 + 1, 1))
        cache.flush()
        assert lost_pages(inner, stored.stored, drv.pages, P) == {"pages_checked": 6, "missing": 0, "wrong": 0,
                                                                  "data_lost": 0}
        keys = sorted(stored.stored)
        inner._pool.remove([keys[0]])  # not through the wrapper: the cache still counts it stored
        assert inner.put_bytes(keys[1], inner.get_bytes(keys[2]))  # a page of other tokens, right size
        assert lost_pages(inner, stored.stored, drv.pages, P) == {"pages_checked": 6, "missing": 1, "wrong": 1,
                                                                  "data_lost": 2}
    finally:
        cache.close()
        destroy_pool(name, missing_ok=True)


# ---------------------------------------------------------------------------------------------
# mooncake_master SIGKILLed mid-run, restarted on the same ports

@pytest.mark.mooncake  # skipped without the package, fails without its system libraries (tests/conftest.py)
def test_mooncake_master_killed_and_restarted():
    from kvdirect.services import start_mooncake_master

    P = 4
    svc = start_mooncake_master(store_params=dict(segment="32MiB", buffer="16MiB", timeout=0.5))
    ports = dict(rpc_port=svc.ports["rpc"], http_port=svc.ports["http"], metrics_port=svc.ports["metrics"])
    dev = Device(P, slots=256)  # 64 pages for 12 documents of 10: most requests load or recompute
    stored = StoredPages(open_store(svc.store_url))  # what the cache is told was stored (closed by the cache)
    cache = make_cache(dev, stored, allow_no_store=False, retry_initial_s=0.2, retry_max_s=1.0)
    drv = Driver(cache, dev)
    docs = [tokens_of(P * 10 + 2, 100 + s) for s in range(12)]
    rng = random.Random(11)
    svc2 = None

    def run(n, evict_p=0.5):
        for _ in range(n):
            drv.serve(docs[rng.randrange(len(docs))])
            if rng.random() < evict_p:
                cache.evict(rng.randrange(P, 40 * P))

    try:
        run(30)
        cache.flush()
        before = cache.stats()
        assert before["stored_pages"] > 0 and before["loaded_pages"] > 0
        # ---- kill the master in the middle of a run: write-backs in flight, loads pending
        run(3)
        svc.kill()
        t_kill = time.monotonic()
        served0 = drv.served
        loaded0, computed0 = drv.loaded_tokens, drv.computed_tokens
        while drv.served - served0 < 15 or time.monotonic() - t_kill < 4:  # several back-off rounds
            run(1)
            time.sleep(0.02)  # requests keep arriving at a modest rate
        outage = dict(requests=drv.served - served0, seconds=time.monotonic() - t_kill,
                      computed_tokens=drv.computed_tokens - computed0, loaded_tokens=drv.loaded_tokens - loaded0)
        mid = cache.stats()
        # the outage was seen: store calls failed and requests were recomputed instead
        assert sum(mid["failures"].values()) > sum(before["failures"].values()), mid["failures"]
        assert outage["computed_tokens"] > 0
        # ---- restart on the same ports: a fresh master with an empty pool
        svc2 = start_mooncake_master(**ports, store_params=dict(segment="32MiB", buffer="16MiB", timeout=0.5))
        # pages stored from here on are in the new master's pool; the ones before went with the old master
        stored.epoch = 1
        t_up = time.monotonic()
        deadline = t_up + 60
        while time.monotonic() < deadline:
            run(5)
            cache.flush()
            st = cache.stats()
            if st["stored_pages"] > mid["stored_pages"] and st["loaded_pages"] > mid["loaded_pages"]:
                break
            time.sleep(0.1)
        st = cache.stats()
        assert st["stored_pages"] > mid["stored_pages"], "write-backs did not resume after the master returned"
        assert st["loaded_pages"] > mid["loaded_pages"], "loads did not resume after the master returned"
        cache.flush()
        # every page stored since the restart, read back from the new master's pool
        loss = lost_pages(stored.inner, stored.stored, drv.pages, P, epochs={1})
        gone = sum(1 for e in stored.stored.values() if e == 0)
        assert drv.wrong_bytes == 0 and loss["pages_checked"] > 0 and loss["data_lost"] == 0, loss
        assert cache.index._check() == ""
        report("mooncake_master_sigkill", requests_served=drv.served, wrong_kv_bytes=drv.wrong_bytes,
               data_lost=loss["data_lost"], pages_checked=loss["pages_checked"], pages_gone_with_master=gone,
               kills=1, outage_requests=outage["requests"],
               outage_seconds=round(outage["seconds"], 2), outage_recomputed_tokens=outage["computed_tokens"],
               outage_loaded_tokens=outage["loaded_tokens"],
               seconds_to_resume=round(time.monotonic() - t_up, 2),
               stored_pages_before_kill=before["stored_pages"], stored_pages_after_restart=st["stored_pages"] - mid["stored_pages"],
               loaded_pages_after_restart=st["loaded_pages"] - mid["loaded_pages"],
               load_failed_pages=st["load_failed_pages"], store_failures=st["failures"],
               allocation_stalls=dev.stalls)
    finally:
        cache.close()
        for s in (svc, svc2):
            if s is not None:
                s.stop()


# ---------------------------------------------------------------------------------------------
# MemCache client cannot start (no Ascend runtime here): clear error, the engine runs without a pool

def test_memcache_init_failure_runs_without_pool(tmp_path, caplog):
    pytest.importorskip("memcache_hybrid", reason="memcache-hybrid not installed (pip install kvdirect[memcache])")
    from kvdirect.services import start_memcache_meta, write_local_conf

    if os.path.exists("/usr/local/Ascend/driver/version.info") or os.environ.get("ASCEND_HOME_PATH"):
        pytest.skip("an Ascend runtime is present here: MemCache init would succeed")
    with start_memcache_meta(workdir=tmp_path / "meta") as meta:
        conf = tmp_path / "local.conf"
        from kvdirect.services import read_conf
        mc = read_conf(meta.config_path)
        write_local_conf(conf, meta_url=mc["ock.mmc.meta_service_url"],
                         config_store_url=mc["ock.mmc.meta_service.config_store_url"])
        url = f"memcache://?config={conf}&init_timeout=60"
        P = 4
        dev = Device(P)
        with pytest.raises(StoreError) as ei:
            make_cache(dev, url, allow_no_store=False)
        msg = str(ei.value)
        assert "init" in msg.lower() and ("CANN" in msg or "Ascend" in msg), msg
        with caplog.at_level("WARNING", logger="kvdirect"):
            cache = make_cache(dev, url)  # allow_no_store (the default): runs without the pool
        assert cache.store is None and "without a KV pool" in caplog.text
        drv = Driver(cache, dev)
        for i in range(20):
            drv.serve(tokens_of(P * 6 + 1, i % 5))
        assert drv.wrong_bytes == 0 and drv.served == 20 and drv.device_hit_tokens > 0
        st = cache.stats()
        cache.close()
        # no pool: no page was ever reported stored, so none can be lost (0 of 0 pages)
        assert st["stored_pages"] == 0
        report("memcache_init_failure", requests_served=drv.served, wrong_kv_bytes=drv.wrong_bytes,
               data_lost=0, pages_checked=0, error=msg.splitlines()[0][:160])
