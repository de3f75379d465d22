"""`kvdirect bench load`: the direct path against a staged three-tier path.

Both paths load the same pages from the same store into the same device KV
pool and are timed in the same run, alternating per request:

* direct  — kvdirect: one index match, one batched exists query, one get
  straight into the device slots;
* staged  — the three-tier design (HiCache-like): device index miss -> host
  tier index miss -> exists query -> get into a host buffer -> host tier index
  insert -> copy host pages into the device slots -> device index insert. Two
  matches and two copies.

The "device" is host memory on a CPU machine, so the staged path's second copy
is a memcpy; on an accelerator it would be an H2D copy.

Beside them, in the same run: single-thread memcpy of a request's bytes (the
limit the load and write-back are measured against), the write-back (from
``write_back()`` to the completion applied by ``poll()``), the direct load and
write-back with one copy thread (shm pool), and the cost of a full miss (page
keys + index match + existence query) for prompts nobody has.
"""
from __future__ import annotations

import json
import time
import uuid

import numpy as np


def _machine() -> str:
    from kvdirect.runtime import machine_description
    return machine_description()


class _Device:
    def __init__(self, slots, layers, heads, dim, page_size, dtype=np.float16):
        self.P = page_size
        self.k = [np.zeros((slots, heads, dim), dtype) for _ in range(layers)]
        self.v = [np.zeros((slots, heads, dim), dtype) for _ in range(layers)]
        from kvdirect.layout import KVLayout
        self.layout = KVLayout.from_mha(self.k, self.v, page_size=page_size)
        self.n_pages = slots // page_size
        self.free = np.arange(self.n_pages - 1, -1, -1, dtype=np.int64) * page_size
        self.top = self.n_pages

    def alloc(self, n_tokens):
        n = -(-n_tokens // self.P)
        if n > self.top:
            raise MemoryError("device pool exhausted")
        firsts = self.free[self.top - n:self.top][::-1]
        self.top -= n
        return (firsts[:, None] + np.arange(self.P, dtype=np.int64)).reshape(-1)[:n_tokens]

    def free_slots(self, slots):
        firsts = np.unique(np.asarray(slots, np.int64) // self.P) * self.P
        self.free[self.top:self.top + len(firsts)] = firsts
        self.top += len(firsts)


class StagedPath:
    """The three-tier baseline: device index -> host index -> pool, two copies."""

    def __init__(self, dev: _Device, store, fingerprint, host_pages: int):
        from kvdirect.copy import CopyEngine
        from kvdirect.index import PrefixIndex

        self.dev, self.store, self.fp = dev, store, fingerprint
        self.P = dev.P
        self.device_index = PrefixIndex(self.P)
        self.host_index = PrefixIndex(self.P)
        self.page_bytes = dev.layout.page_bytes
        self.host = np.empty(host_pages * self.page_bytes, np.uint8)
        self.host_free = list(range(host_pages))
        self.copy = CopyEngine()

    def load(self, tokens) -> int:
        from kvdirect import keys as K
        from kvdirect.stores import ScatterList

        P = self.P
        r = self.device_index.match(tokens)                      # match 1: device tier
        h = self.host_index.match(tokens)                        # match 2: host tier
        full = len(tokens) // P
        start = max(r.device_len, h.device_len) // P
        d = K.page_digests(tokens[: full * P], P, namespace_seed=K.namespace_seed())
        keys = K.pool_keys(d[start:full], self.fp)
        n = self.store.exists_prefix(keys)
        if n == 0:
            return 0
        hp = np.asarray(self.host_free[:n], np.uint64)
        del self.host_free[:n]
        base = self.host.ctypes.data
        host_sl = ScatterList(base + hp * self.page_bytes, np.full(n, self.page_bytes, np.uint64))
        st = self.store.get(keys[:n], host_sl)                   # copy 1: pool -> host
        ok = int(np.argmin(st == 0)) if (st != 0).any() else n
        host_slots = (hp[:ok].astype(np.int64)[:, None] * P + np.arange(P)).reshape(-1)
        self.host_index.insert(tokens[: (start + ok) * P],
                               np.concatenate([np.zeros(start * P, np.int64), host_slots]))
        slots = self.dev.alloc(ok * P)
        dev_sl = self.dev.layout.plan(slots[::P])
        # copy 2: host -> device (a request's host pages are consecutive after reset)
        assert ok == 0 or int(hp[ok - 1]) - int(hp[0]) == ok - 1
        if ok:
            self.copy.scatter(dev_sl.take(slice(0, ok)), base + int(hp[0]) * self.page_bytes,
                              ok * self.page_bytes)
        self.device_index.insert(tokens[: ok * P], slots)
        return ok * P

    def reset(self):
        self.dev.free_slots(self.device_index.evict(1 << 62))
        self.host_index.reset()
        self.host_free = list(range(len(self.host) // self.page_bytes))


def check_workload(requests: int, prompt_len: int, page_size: int, layers: int, kv_heads: int,
                   head_dim: int, rounds: int = 1, own_pool: bool = True) -> int:
    """ConfigError unless the workload is well formed and fits this machine's memory; returns the bytes it needs."""
    from kvdirect.errors import ConfigError

    for name, v in (("requests", requests), ("prompt_len", prompt_len), ("page_size", page_size),
                    ("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim), ("rounds", rounds)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if prompt_len < page_size:
        raise ConfigError(f"prompt_len {prompt_len} is shorter than one page ({page_size} tokens): "
                          "nothing would be stored or loaded")
    pages = prompt_len // page_size * requests
    page_bytes = 2 * layers * kv_heads * head_dim * 2 * page_size
    # two device pools, the staged path's host tier, memcpy's two request-sized buffers, and
    # (own pool) the pool itself
    need = ((pages + 8) * page_bytes * 3 + 2 * (prompt_len // page_size) * page_bytes
            + (int(pages * page_bytes * 1.5) + (64 << 20) if own_pool else 0))
    from kvdirect.runtime import available_memory

    avail = available_memory()
    if need > 0.8 * avail:
        raise ConfigError(f"this workload needs {need / 2**30:.1f} GiB of memory and {avail / 2**30:.1f} GiB "
                          "are available: use fewer --requests, a shorter --prompt-len or fewer --layers")
    return need


def _copy_threads(store, threads: int) -> bool:
    """Set the shm pool's copy threads (0: every core, 1: the caller only); False when the
    store has no such knob (then only the shipped configuration is measured)."""
    pool = getattr(store, "_pool", None)
    if getattr(store, "scheme", "") != "shm" or not hasattr(pool, "set_copy_options"):
        return False
    pool.set_copy_options(threads=threads)
    return True


def _pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def run(store_url: str | None = None, requests: int = 8, prompt_len: int = 3584, page_size: int = 64,
        layers: int = 16, kv_heads: int = 2, head_dim: int = 128, rounds: int = 3, progress=None,
        misses: int = 400) -> dict:
    """Load, write-back and miss costs of one configuration, each beside single-thread
    memcpy of the same bytes measured in the same run (interleaved request by request).

    GB/s figures use the median time per request (robust on a shared machine); the
    mean times are reported too."""
    from kvdirect import keys as K
    from kvdirect.cache import KVDirectCache
    from kvdirect.config import CacheConfig
    from kvdirect.errors import StoreError
    from kvdirect.stores import open_store
    from kvdirect.stores.url import parse_url

    own_pool = store_url is None
    check_workload(requests, prompt_len, page_size, layers, kv_heads, head_dim, rounds, own_pool)
    tok_per_req = prompt_len // page_size * page_size
    dev_slots = (tok_per_req * requests // page_size + 8) * page_size
    page_bytes = 2 * layers * kv_heads * head_dim * 2 * page_size
    if own_pool:
        size = int(page_bytes * (tok_per_req // page_size) * requests * 1.5) + (64 << 20)
        store_url = f"shm://kvdirect-bench-{uuid.uuid4().hex[:8]}?size={size}"
    name = parse_url(store_url).path or parse_url(store_url).host
    bpr = page_bytes * (tok_per_req // page_size)
    try:
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, 150000, tok_per_req).astype(np.int32) for _ in range(requests)]
        # the baseline: one thread of memcpy (numpy.copyto) over a request's bytes
        mem_src = np.ones(bpr, np.uint8)
        mem_dst = np.zeros(bpr, np.uint8)
        memcpy_ms: list = []

        def memcpy_sample():
            t0 = time.perf_counter()
            np.copyto(mem_dst, mem_src)
            memcpy_ms.append((time.perf_counter() - t0) * 1e3)

        writer_dev = _Device(dev_slots, layers, kv_heads, head_dim, page_size)
        for x in writer_dev.k + writer_dev.v:
            x[...] = rng.standard_normal(x.shape).astype(x.dtype)
        cfg = CacheConfig(store=store_url, model="bench-load", allow_no_store=False)
        writer = KVDirectCache(writer_dev.layout, store_url, free_slots=writer_dev.free_slots, config=cfg)
        w_slots = [writer_dev.alloc(len(p)) for p in prompts]
        w_keys = [K.pool_keys(K.page_digests(p, page_size, namespace_seed=K.namespace_seed()),
                              writer.fingerprint) for p in prompts]
        # write-back: from write_back() to the completion applied by poll() (flush waits
        # for the writer, then polls). Every measured write-back puts every page: the
        # pool and the writer's index forget the request before it.
        modes = [("", 0)] + ([("_one_thread", 1)] if _copy_threads(writer.store, 1) else [])
        wb_ms: dict = {m: [] for m, _ in modes}
        for rnd in range(rounds):
            for mode, threads in modes:
                _copy_threads(writer.store, threads)
                for p, s, k in zip(prompts, w_slots, w_keys):
                    writer.reset()
                    writer.store.remove(k)
                    t0 = time.perf_counter()
                    writer.write_back(p, s)
                    writer.flush()
                    wb_ms[mode].append((time.perf_counter() - t0) * 1e3)
                    memcpy_sample()
        _copy_threads(writer.store, 0)
        stored = sum(int(writer.store.exists(k).sum()) for k in w_keys)
        wanted = sum(len(k) for k in w_keys)
        if stored < wanted:
            raise StoreError(f"the store took {stored} of the {wanted} pages written (full or failing; "
                             f"{writer.stats()['failures']}): use a larger pool")

        dev = _Device(dev_slots, layers, kv_heads, head_dim, page_size)
        direct = KVDirectCache(dev.layout, store_url, free_slots=dev.free_slots, config=cfg)
        staged = StagedPath(dev, open_store(store_url), direct.fingerprint,
                            host_pages=tok_per_req // page_size * requests + 8)
        lmodes = [("", 0)] + ([("_one_thread", 1)] if _copy_threads(direct.store, 1) else [])
        direct_ms: dict = {m: [] for m, _ in lmodes}
        staged_ms = []
        loaded_direct = loaded_staged = 0
        for rnd in range(rounds):
            for i, p in enumerate(prompts):
                for mode, threads in lmodes:
                    _copy_threads(direct.store, threads)
                    t0 = time.perf_counter()
                    m = direct.match(p)
                    slots = dev.alloc(m.pool_len)
                    loaded_direct = direct.load(m, slots)
                    direct_ms[mode].append((time.perf_counter() - t0) * 1e3)
                    direct.evict(1 << 62)
                    memcpy_sample()
                t0 = time.perf_counter()
                loaded_staged = staged.load(p)
                staged_ms.append((time.perf_counter() - t0) * 1e3)
                staged.reset()
                if progress:
                    progress(rnd * requests + i + 1, rounds * requests)
        _copy_threads(direct.store, 0)
        if loaded_direct != tok_per_req or loaded_staged != tok_per_req:
            raise StoreError(f"the store did not return every page (direct path loaded {loaded_direct}, "
                             f"staged {loaded_staged}, expected {tok_per_req} tokens): pages were evicted "
                             "or the store failed; use a larger pool")
        # a direct load delivers the writer's bytes
        m = direct.match(prompts[-1])
        if direct.load(m, dev.alloc(m.pool_len)) != tok_per_req:
            raise RuntimeError("benchmark check load did not load every page")
        for a, b in ((dev.k, writer_dev.k), (dev.v, writer_dev.v)):
            for x, y in zip(a, b):
                if not np.array_equal(x[m.device_slots], y[w_slots[-1]]):
                    raise RuntimeError("benchmark load delivered bytes that differ from the writer's")
        direct.evict(1 << 62)

        # full miss: page keys + index match + one existence query, for prompts nobody has
        miss_prompts = [rng.integers(0, 150000, tok_per_req).astype(np.int32) for _ in range(64)]
        miss_us = []
        for j in range(misses):
            p = miss_prompts[j % len(miss_prompts)]
            t0 = time.perf_counter()
            m = direct.match(p)
            miss_us.append((time.perf_counter() - t0) * 1e6)
            if m.device_len or m.pool_len:
                raise RuntimeError("a miss prompt matched: the miss benchmark is not measuring misses")
        parts = _miss_parts(direct, miss_prompts, misses)
        direct.close(), writer.close()

        mem_p50 = _pct(memcpy_ms, 50)
        gbps = lambda ms: bpr / ms / 1e6  # noqa: E731
        d_ms, s_ms = float(np.mean(direct_ms[""])), float(np.mean(staged_ms))
        r = {
            "machine": _machine(),
            "store": store_url.split("?")[0],
            "config": {"requests": requests, "prompt_len": tok_per_req, "page_size": page_size,
                       "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": "float16",
                       "rounds": rounds, "stored_pages": stored, "misses": misses,
                       "gbps_from": "median time per request"},
            "bytes_per_request": bpr,
            "direct_ms": d_ms, "staged_ms": s_ms,
            "direct_p50_ms": _pct(direct_ms[""], 50), "staged_p50_ms": _pct(staged_ms, 50),
            "memcpy_ms": float(np.mean(memcpy_ms)), "memcpy_p50_ms": mem_p50,
            "memcpy_gbps": gbps(mem_p50),
            "direct_gbps": gbps(_pct(direct_ms[""], 50)),
            "staged_gbps": gbps(_pct(staged_ms, 50)),
            "writeback_ms": float(np.mean(wb_ms[""])), "writeback_p50_ms": _pct(wb_ms[""], 50),
            "writeback_gbps": gbps(_pct(wb_ms[""], 50)),
            "ratio_direct_over_staged": d_ms / s_ms,
            "ratio_direct_over_staged_p50": _pct(direct_ms[""], 50) / _pct(staged_ms, 50),
            "miss_us_p50": _pct(miss_us, 50), "miss_us_p99": _pct(miss_us, 99),
            "miss_parts_us_p50": parts,
        }
        r["direct_vs_memcpy"] = r["direct_gbps"] / r["memcpy_gbps"]
        r["writeback_vs_memcpy"] = r["writeback_gbps"] / r["memcpy_gbps"]
        if "_one_thread" in direct_ms:
            r["direct_one_thread_gbps"] = gbps(_pct(direct_ms["_one_thread"], 50))
            r["direct_one_thread_vs_memcpy"] = r["direct_one_thread_gbps"] / r["memcpy_gbps"]
        if "_one_thread" in wb_ms:
            r["writeback_one_thread_gbps"] = gbps(_pct(wb_ms["_one_thread"], 50))
            r["writeback_one_thread_vs_memcpy"] = r["writeback_one_thread_gbps"] / r["memcpy_gbps"]
        return r
    finally:
        if own_pool:
            from kvdirect.stores.shm import destroy_pool
            destroy_pool(name)


def _miss_parts(cache, prompts, n) -> dict:
    """Where a miss goes, each part timed alone (p50 us): the index match, the key of the
    first page (what a miss on a local pool hashes), the keys of every page (what a
    remote pool's one batched query needs), and the existence query of one key."""
    from kvdirect import keys as K

    P = cache.page_size
    seed = K.namespace_seed()
    t = {"match": [], "keys_one_page": [], "keys_all_pages": [], "exists_one_key": []}
    for j in range(n):
        p = prompts[j % len(prompts)]
        t0 = time.perf_counter()
        cache.index.match(p)
        t1 = time.perf_counter()
        one = K.pool_keys(K.page_digests(p[:P], P, namespace_seed=seed), cache.fingerprint)
        t2 = time.perf_counter()
        K.pool_keys(K.page_digests(p, P, namespace_seed=seed), cache.fingerprint)
        t3 = time.perf_counter()
        cache.store.exists_prefix(one)
        t4 = time.perf_counter()
        for k, a, b in (("match", t0, t1), ("keys_one_page", t1, t2), ("keys_all_pages", t2, t3),
                        ("exists_one_key", t3, t4)):
            t[k].append((b - a) * 1e6)
    return {k: _pct(v, 50) for k, v in t.items()}


def render(r: dict) -> str:
    c = r["config"]
    lines = [
        f"kvdirect bench load — {r['machine']}",
        f"store {r['store']}; {c['requests']} requests x {c['prompt_len']} tokens, page {c['page_size']}, "
        f"{c['layers']} layers x {c['kv_heads']} KV heads x {c['head_dim']} ({c['dtype']}); "
        f"{r['bytes_per_request'] / 2**20:.1f} MiB per request, {c['rounds']} rounds",
        f"{'path':<22} {'mean ms':>9} {'p50 ms':>9} {'GB/s':>7} {'/memcpy':>8}",
        f"{'memcpy (1 thread)':<22} {r['memcpy_ms']:>9.2f} {r['memcpy_p50_ms']:>9.2f} "
        f"{r['memcpy_gbps']:>7.2f} {1.0:>8.2f}",
        f"{'direct load':<22} {r['direct_ms']:>9.2f} {r['direct_p50_ms']:>9.2f} {r['direct_gbps']:>7.2f} "
        f"{r['direct_vs_memcpy']:>8.2f}",
    ]
    if "direct_one_thread_gbps" in r:
        lines.append(f"{'  one copy thread':<22} {'':>9} {'':>9} {r['direct_one_thread_gbps']:>7.2f} "
                     f"{r['direct_one_thread_vs_memcpy']:>8.2f}")
    lines += [
        f"{'staged load':<22} {r['staged_ms']:>9.2f} {r['staged_p50_ms']:>9.2f} {r['staged_gbps']:>7.2f} "
        f"{r['staged_gbps'] / r['memcpy_gbps']:>8.2f}",
        f"{'write-back':<22} {r['writeback_ms']:>9.2f} {r['writeback_p50_ms']:>9.2f} "
        f"{r['writeback_gbps']:>7.2f} {r['writeback_vs_memcpy']:>8.2f}",
    ]
    if "writeback_one_thread_gbps" in r:
        lines.append(f"{'  one copy thread':<22} {'':>9} {'':>9} {r['writeback_one_thread_gbps']:>7.2f} "
                     f"{r['writeback_one_thread_vs_memcpy']:>8.2f}")
    parts = ", ".join(f"{k} {v:.1f}" for k, v in r["miss_parts_us_p50"].items())
    lines += [
        f"direct / staged = {r['ratio_direct_over_staged']:.2f} mean, "
        f"{r['ratio_direct_over_staged_p50']:.2f} p50  (goal <= 0.60)",
        f"load and write-back vs memcpy: goal >= 0.80 on one copy thread, >= 1.00 with every core",
        f"full miss (keys, match, exists): p50 {r['miss_us_p50']:.1f} us, p99 {r['miss_us_p99']:.1f} us "
        f"(goal p50 <= 30 us); parts alone, p50 us: {parts}",
    ]
    return "\n".join(lines)


def main_json(args) -> int:
    r = run(args.store, args.requests, args.prompt_len, args.page_size, args.layers, args.kv_heads,
            args.head_dim, args.rounds, misses=getattr(args, "misses", 400))
    print(render(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0
