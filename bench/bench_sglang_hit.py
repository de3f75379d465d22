"""One SGLang pool hit over Mooncake: the radix backend's request path, hold at match vs not.

Admits one request whose prefix is in the pool as SGLang's scheduler does
(``Req.init_next_round_input`` -> ``match_prefix``, then ``init_load_back``, lock and
allocation, as in ``PrefillAdder.add_one_req``; tests/sglang/driver.py, SGLang's real
cache classes), layer-wise, and times the two cache calls that carry the load on the
request path (``match_prefix`` + ``init_load_back``, what the demo's server-side timers
measure), for three modes in one run, the order rotated per round:

* ``hold``: kvdirect as shipped: the match opens the read session (it answers which pages
  exist) and ``init_load_back`` reads through it: one round trip to the master;
* ``exists``: the store says it cannot hold at match (``hold_at_match = False``): an
  existence query at the match, then the session at ``init_load_back``: two round trips;
* ``exists_again``: ``exists`` once more, a control that must equal it.

Each mode has its own reader instance (a fresh device pool: every request is a pool
hit); every round's documents are new to all of them. Run it in the SGLang environment::

    ~/.cache/kvdirect/sglang-venv/bin/python bench/bench_sglang_hit.py --json docs/bench/sglang_hit_mooncake.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "sglang"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe  # noqa: E402

MODES = ("hold", "exists", "exists_again")


def _timed(fn, spent: list):
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append((time.perf_counter() - t0) * 1e3)
    return call


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=3584, help="tokens per request")
    ap.add_argument("--reuse", type=float, default=0.5, help="fraction of each request found in the pool")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    if a.rounds < 2:
        ap.error("--rounds must be >= 2 (round 0 warms up)")
    if a.tokens < 128:
        ap.error("--tokens must be >= 128 (two pages)")
    if not 0 < a.reuse <= 1:
        ap.error("--reuse must be in (0, 1]")

    import driver
    import kvdirect.sglang as plugin
    from kvdirect.services import start_mooncake_master
    from sglang.srt.mem_cache.registry import create_tree_cache

    driver.HEADS, driver.DIM = 2, 64  # the demo model's KV: 2 layers, 2 KV heads of 64, fp32
    P, n = 64, a.tokens // 64 * 64
    shared = max(P, int(n * a.reuse) // P * P)
    per_doc = n * 2 * 2 * driver.HEADS * driver.DIM * 4
    rng = np.random.default_rng(7)
    docs = [rng.integers(0, 30000, n) for _ in range(a.rounds)]
    # every (round, mode) its own tail: a reader writes back the pages it computed, and the next
    # mode must not find them
    asks = [{m: np.concatenate([d[:shared], rng.integers(0, 30000, n - shared + 1)]) for m in MODES} for d in docs]

    def engine(url, size, layerwise):
        os.environ["KVDIRECT_CONFIG"] = json.dumps({"store": url, "allow_no_store": False, "layerwise": layerwise})
        e = driver.Engine(P, size=size, max_context=n + 2 * P)
        plugin.register()
        e.cache = create_tree_cache(e.context())
        for buf in e.buffers():
            buf.fill_(1)  # fault the device pages in: only the request path is timed
        return e

    segment = per_doc * a.rounds + (256 << 20)
    with start_mooncake_master(store_params=dict(segment=f"{segment >> 20}MiB", buffer="256MiB")) as svc:
        writer = engine(svc.store_url, a.rounds * (n + P) + 4096, False)
        for d in docs:
            writer.serve(np.concatenate([d, [1]]))
        writer.cache.kv.flush()
        readers = {m: engine(svc.store_url, a.rounds * (n + 2 * P) + 4096, True) for m in MODES}
        for m in ("exists", "exists_again"):
            readers[m].cache.kv._p.store.hold_at_match = False
        times = {m: [] for m in MODES}
        spent = []  # ms in match_prefix and init_load_back of the request being admitted
        for b in readers.values():
            for name in ("match_prefix", "init_load_back"):
                setattr(b.cache, name, _timed(getattr(b.cache, name), spent))
        try:
            for r in range(a.rounds):
                order = MODES[r % 3:] + MODES[: r % 3]
                for m in order:
                    b = readers[m]
                    spent.clear()
                    x = b.admit(asks[r][m])
                    if x["loaded"] != shared:
                        raise SystemExit(f"{m}: round {r} loaded {x['loaded']} of {shared} tokens")
                    times[m].append(sum(spent))
                    b.prefill([x])  # waits for every layer (untimed)
                    b.cache.kv.flush()  # its write-backs land before the next mode is timed
        finally:
            for b in readers.values():
                b.cache.shutdown()
            writer.cache.shutdown()

    p50 = {m: round(float(np.median(v[1:])), 3) for m, v in times.items()}  # round 0: warm-up
    ratio = {"hold / exists": round(p50["hold"] / p50["exists"], 3),
             "exists_again / exists (control)": round(p50["exists_again"] / p50["exists"], 3)}
    print(f"{describe()}; Mooncake over loopback TCP; {n}-token requests, {shared} tokens in the pool "
          f"({shared * per_doc // n / 2**20:.1f} MiB), layer-wise; p50 of {a.rounds - 1} rounds, ms in "
          f"match_prefix + init_load_back")
    for m in MODES:
        print(f"  {m:<14}{p50[m]:>8.3f}")
    for k, v in ratio.items():
        print(f"  {k:<34}{v:>6.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(machine=describe(), store="mooncake", tokens=n, pool_tokens=shared,
                                                rounds=a.rounds, p50_ms=p50, ratios=ratio, samples_ms=times),
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
