"""Several SGLang pool hits admitted in one scheduling round, layer-wise (radix backend).

SGLang's scheduler matches and loads back each waiting request before it matches the
next (``get_new_batch_prefill``), then forwards the batch. This times, on the
scheduler's side of SGLang's real cache classes (tests/sglang/driver.py: real pools,
allocator, Req), how long admitting ``--requests`` hits of different documents takes,
and when layer 0 of every load / every layer is in (when the forward could start /
finish waiting), for two behaviours in one run, the order rotated per round:

* ``sharing``: kvdirect as shipped: a match settles only the in-flight loads whose
  pages it shares; the round's loads run side by side;
* ``all`` (the behaviour before): every match settles every load in flight,
  so each request's whole load runs on the scheduler thread before the next is matched.

A third run per round, ``control``, repeats the behaviour before: its figures must match it.

``--device-full``: the device pool starts full of the reader's own (unlocked) pages, as
in a server that has run for a while, so every load-back evicts first; the two
behaviours are then

* ``keep``: kvdirect as shipped: an eviction leaves the loads in flight in flight;
* ``evict_settles`` (the behaviour before): an eviction first finishes every
  load in flight, so under memory pressure each load ran whole on the scheduler thread.

Run it in the SGLang environment (scripts/sglang-env.sh)::

    ~/.cache/kvdirect/sglang-venv/bin/python bench/bench_sglang_round.py --store shm
    ~/.cache/kvdirect/sglang-venv/bin/python bench/bench_sglang_round.py --store mooncake
    ~/.cache/kvdirect/sglang-venv/bin/python bench/bench_sglang_round.py --store mooncake --device-full
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "sglang"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("shm", "mooncake"), default="shm")
    ap.add_argument("--requests", type=int, default=4, help="hits admitted in one round")
    ap.add_argument("--tokens", type=int, default=3584, help="tokens per document")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--heads", type=int, default=8, help="KV heads (2 layers, head dim 128, fp32)")
    ap.add_argument("--device-full", action="store_true",
                    help="start with the device pool full of other pages: every load-back evicts")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    for name in ("requests", "tokens", "rounds", "heads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if a.tokens < 64:
        ap.error("--tokens must be >= 64 (one page)")

    import driver
    import kvdirect.sglang as plugin
    from kvdirect.sglang.radix_cache import KVDirectRadixCache
    from sglang.srt.mem_cache.registry import create_tree_cache

    driver.HEADS, driver.DIM = a.heads, 128
    P, n = 64, a.tokens // 64 * 64
    per_doc = n * 2 * 2 * a.heads * 128 * 4
    pool_bytes = per_doc * a.requests * a.rounds * 2 + (256 << 20)
    # the pool, the writer's device pool (every document) and a reader's, all in this host's memory
    from kvdirect.runtime import available_memory
    need = pool_bytes + per_doc * (n + P + 64) // n * (a.requests * a.rounds + a.requests + 1)
    if need > 0.8 * available_memory():
        ap.error(f"{a.rounds} rounds of {a.requests} hits need about {need / 2**30:.1f} GiB (pool and device "
                 f"pools), {available_memory() / 2**30:.1f} GiB are available: use fewer --rounds or --requests")

    def engine(size, layerwise):
        cfg = {"store": url, "allow_no_store": False, "layerwise": layerwise}
        os.environ["KVDIRECT_CONFIG"] = json.dumps(cfg)
        e = driver.Engine(P, size=size, max_context=n + 64)
        plugin.register()
        e.cache = create_tree_cache(e.context())
        for buf in e.buffers():
            buf.fill_(1)  # fault the device pages in: only the loads are timed
        return e

    def run():
        docs = [np.random.default_rng(i).integers(0, 30000, n + 1) for i in range(a.requests * a.rounds)]
        writer = engine(len(docs) * (n + P) + 4096, False)
        for d in docs:
            writer.serve(d)
        writer.cache.kv.flush()
        sharing, evict = KVDirectRadixCache._settle_sharing, KVDirectRadixCache.evict

        def evict_settles(self, params):
            self._settle()
            return evict(self, params)

        patches = ({"keep": {}, "evict_settles": {"evict": evict_settles}} if a.device_full else
                   {"sharing": {}, "all": {"_settle_sharing": lambda self, t, ns: self.layer_loads.settle()}})
        new, before = patches
        patches["control"] = patches[before]  # the behaviour before once more: must match it
        times = {m: [] for m in patches}
        fillers = [np.random.default_rng(10_000 + i).integers(0, 30000, n + 1) for i in range(a.requests + 1)]
        try:
            for r in range(a.rounds):
                order, k = list(patches), r % len(patches)
                for mode in order[k:] + order[:k]:  # the order rotated per round
                    for name, fn in (("_settle_sharing", sharing), ("evict", evict)):
                        setattr(KVDirectRadixCache, name, patches[mode].get(name, fn))
                    b = engine(a.requests * (n + P) + 4096, True)
                    if a.device_full:  # the reader's own pages fill the pool, unlocked and written back
                        for f in fillers:
                            if b.allocator.available_size() < n + P:
                                break
                            b.serve(f)
                        b.cache.kv.flush()
                    t0 = time.perf_counter()
                    admitted = [b.admit(d) for d in docs[a.requests * r: a.requests * (r + 1)]]
                    t1 = time.perf_counter()
                    b.cache.layer_loads.wait_until(0)
                    t2 = time.perf_counter()
                    b.attention_reads()
                    t3 = time.perf_counter()
                    if [x["loaded"] for x in admitted] != [n] * a.requests:
                        raise SystemExit(f"a load fell short: {[x['loaded'] for x in admitted]}")
                    b.prefill(admitted)
                    times[mode].append([(t - t0) * 1e3 for t in (t1, t2, t3)])
                    b.cache.shutdown()
        finally:
            KVDirectRadixCache._settle_sharing, KVDirectRadixCache.evict = sharing, evict
            writer.cache.shutdown()
        return times, new, before

    if a.store == "shm":
        from kvdirect.stores.shm import destroy_pool
        name = f"kvd-round-{uuid.uuid4().hex[:8]}"
        url = f"shm://{name}?size={pool_bytes >> 20}MiB"
        try:
            times, new, before = run()
        finally:
            destroy_pool(name, missing_ok=True)
    else:
        from kvdirect.services import start_mooncake_master
        with start_mooncake_master(store_params=dict(segment=f"{pool_bytes >> 20}MiB", buffer="256MiB")) as svc:
            url = svc.store_url
            times, new, before = run()

    p50 = {m: np.median(np.asarray(v[1:]), axis=0).round(2).tolist() for m, v in times.items()}  # round 0: warm-up
    from kvdirect.cache import transfer
    print(f"{describe()}; {a.store}; {a.requests} hits x {n} tokens ({per_doc / 2**20:.0f} MiB each) in one round, "
          f"{transfer.READER_THREADS} reader threads"
          f"{'; device pool full: every load-back evicts' if a.device_full else ''}; "
          f"p50 of {a.rounds - 1} rounds, ms from the first match")
    # ratios within each round (the three runs of a round are neighbours in time), then their median
    ratios = {m: np.median(np.asarray(times[m][1:]) / np.asarray(times[before][1:]), axis=0).round(3).tolist()
              for m in (new, "control")}

    def row(label, vals, fmt):
        print(f"{label:<22}" + "".join(f"{x:>{w}{fmt}}" for x, w in zip(vals, (10, 12, 15))))

    print(f"{'settle':<22}{'admitted':>10}{'layer 0 in':>12}{'all layers in':>15}")
    for m in (before, new, "control"):
        row(m, p50[m], ".1f")
    print("median of the per-round ratios:")
    for m in (new, "control"):
        row(f"{m}/{before}", ratios[m], ".2f")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(machine=describe(), store=a.store, requests=a.requests, tokens=n,
                                                device_full=a.device_full, behaviours=[new, before],
                                                reader_threads=transfer.READER_THREADS, rounds=a.rounds,
                                                p50_ms=p50, per_round_ratio_p50=ratios, samples_ms=times),
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
