"""The time a pool hit adds before the forward pass can start, layer by layer vs whole objects.

A layer-wise load (``KVDirectCache.load_layerwise``) is what the radix backend's
``init_load_back`` starts for a hit with ``"layerwise": true`` and what the linker
starts for every hit; the request waits only until layer 0 is in device memory
(``wait_layer(0)``). Measured here, in one run, for one request of ``--tokens``
tokens whose pages are all in the pool:

* ``layerwise``: the store reads pieces (shm: pinned objects; Mooncake: a get session
  and one batched ranged read per layer): the wait is about the first layer's;
* ``whole``: the same store with its piecewise reads hidden (what the radix backend did
  for Mooncake before ranged reads): every layer completes when the whole objects are in;
* ``control``: ``whole`` again, as a second arm of the baseline: it must equal ``whole``
  (within the run's noise), or the machine is too busy for the figures to mean anything.

The three run interleaved, the order rotated per repetition; ratios are of medians
(``layerwise / whole``, goal: about 1 / layers). Also reported: the whole load
(``finish``), which layer-wise reading must not make slower.

Usage: python bench/bench_layerwise_load.py [--store shm|mooncake] [--tokens 3584] [--layers 32]
       [--heads 8] [--head-dim 128] [--reps 15] [--json PATH]
"""
import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from kvdirect import KVLayout  # noqa: E402
from kvdirect.cache import KVDirectCache  # noqa: E402
from kvdirect.config import CacheConfig  # noqa: E402
from kvdirect.stores import open_store  # noqa: E402

ARMS = ("layerwise", "whole", "control")


class WholeObjects:
    """The same store without ``open_read``: loads read whole objects (every layer at once)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        if name == "open_read":
            raise AttributeError(name)
        return getattr(self._inner, name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="shm", choices=["shm", "mooncake"])
    ap.add_argument("--tokens", type=int, default=3584)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    P = a.page_size
    n_tok = a.tokens // P * P
    slots = 2 * n_tok + P
    rng = np.random.default_rng(0)
    k = [rng.standard_normal((slots, a.heads, a.head_dim), dtype=np.float32).astype(np.float16)
         for _ in range(a.layers)]
    v = [x.copy() for x in k]
    layout = KVLayout.from_mha(k, v, P)
    nbytes = n_tok // P * layout.page_bytes
    master = None
    name = None
    if a.store == "mooncake":
        from kvdirect.services import start_mooncake_master

        seg = f"{max(256, 2 * nbytes // 2**20 + 64)}MiB"
        master = start_mooncake_master(store_params=dict(segment=seg, buffer=f"{nbytes // 2**20 + 64}MiB",
                                                         timeout=60))
        url = master.store_url
    else:
        name = f"kvd-bench-lw-{uuid.uuid4().hex[:8]}"
        url = f"shm://{name}?size={2 * nbytes + (64 << 20)}"
    print(f"machine: {describe()}")
    print(f"request: {n_tok} tokens, {a.layers} layers, {nbytes / 2**20:.1f} MiB of KV, store {a.store}; "
          f"{a.reps} repetitions, arms interleaved and rotated")
    try:
        cfg = CacheConfig(model="bench-layerwise", allow_no_store=False)
        writer = KVDirectCache(layout, url, config=cfg)
        toks = rng.integers(0, 1 << 30, n_tok).astype(np.int64)
        writer.write_back(toks, np.arange(n_tok))
        writer.flush()
        reader_store = open_store(url)
        readers = {"layerwise": reader_store, "whole": WholeObjects(reader_store),
                   "control": WholeObjects(reader_store)}
        caches = {arm: KVDirectCache(layout, readers[arm], config=cfg) for arm in ARMS}
        first = {arm: [] for arm in ARMS}
        total = {arm: [] for arm in ARMS}
        for r in range(a.reps + 1):  # the first round warms up and is not counted
            order = ARMS[r % 3:] + ARMS[:r % 3]
            for arm in order:
                c = caches[arm]
                c.evict(slots)
                m = c.match(toks)
                assert m.pool_len == n_tok, f"{arm}: the pool holds {m.pool_len} of {n_tok} tokens"
                t0 = time.perf_counter()
                lw = c.load_layerwise(m, np.arange(n_tok, 2 * n_tok))
                got = lw.wait_layer(0)
                assert got == n_tok, f"{arm}: layer 0 of {got} tokens, status {lw.status[:4]}, {reader_store.stats()}"
                t1 = time.perf_counter()
                assert lw.finish() == n_tok
                t2 = time.perf_counter()
                if r:
                    first[arm].append((t1 - t0) * 1e3)
                    total[arm].append((t2 - t0) * 1e3)
        med = {arm: float(np.median(first[arm])) for arm in ARMS}
        med_total = {arm: float(np.median(total[arm])) for arm in ARMS}
        res = {"machine": describe(), "store": a.store, "tokens": n_tok, "layers": a.layers,
               "kv_mib": nbytes / 2**20, "reps": a.reps, "first_layer_ms_p50": med, "whole_load_ms_p50": med_total,
               "ratio_first_layer": med["layerwise"] / med["whole"],
               "ratio_whole_load": med_total["layerwise"] / med_total["whole"],
               "control_vs_whole": med["control"] / med["whole"]}
        print(f"{'arm':>10}  {'wait for layer 0 p50 ms':>24}  {'whole load p50 ms':>18}")
        for arm in ARMS:
            print(f"{arm:>10}  {med[arm]:>24.2f}  {med_total[arm]:>18.2f}")
        print(f"layerwise / whole, wait for layer 0: {res['ratio_first_layer']:.3f} (goal ~ 1/{a.layers} = "
              f"{1 / a.layers:.3f}); whole load: {res['ratio_whole_load']:.3f}; control / whole: "
              f"{res['control_vs_whole']:.3f} (must be ~1)")
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
        for c in caches.values():
            c.close()
        writer.close()
    finally:
        if master is not None:
            master.stop()
        if name is not None:
            from kvdirect.stores.shm import destroy_pool

            destroy_pool(name, missing_ok=True)


if __name__ == "__main__":
    main()
