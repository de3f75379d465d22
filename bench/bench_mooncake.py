"""MooncakeStore adapter vs the raw Mooncake client on the same data, same master, same run.

64 objects x 1 MiB (default), put then get, several rounds, fresh keys per round (a put of an
existing key is skipped by Mooncake). Both paths use the same registered buffers; the raw path
calls batch_put_from / batch_get_into directly, the adapter path goes through
MooncakeStore.put / get (argument checks, per-key status mapping, deadline thread).

    python bench/bench_mooncake.py [--objects 64] [--size 1MiB] [--rounds 7] [--segments 1]

Prints best and median per-round throughput for each path and the adapter's overhead.
Goal: overhead <= 10%.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def machine() -> str:
    from kvdirect.runtime import machine_description
    return machine_description()


def main() -> int:
    from kvdirect.services import start_mooncake_master
    from kvdirect.stores import ScatterList, base, open_store
    from kvdirect.stores.url import parse_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=64)
    ap.add_argument("--size", default="1MiB")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--segments", type=int, default=1, help="segments per object (>1: *_multi_buffers)")
    args = ap.parse_args()
    n, size, segs = args.objects, parse_size(args.size), args.segments
    seg = size // segs
    pool = max(256 << 20, 4 * args.rounds * n * size)

    print(f"machine: {machine()}")
    print(f"workload: {n} objects x {size} B ({segs} segment(s) each), {args.rounds} rounds, loopback tcp")
    svc = start_mooncake_master(store_params=dict(segment=f"{pool}", buffer="64MiB", timeout=30))
    try:
        store = open_store(svc.store_url)
        raw = store._client  # the same client object: same connection, same segment
        src = np.random.default_rng(0).integers(0, 256, n * size, dtype=np.uint8)
        dst = np.zeros_like(src)
        store.register(src.ctypes.data, src.nbytes)
        store.register(dst.ctypes.data, dst.nbytes)
        offs = (np.arange(n * segs, dtype=np.uint64) * seg).reshape(n, segs)
        sc_src = ScatterList(src.ctypes.data + offs, np.full((n, segs), seg, np.uint64))
        sc_dst = ScatterList(dst.ctypes.data + offs, np.full((n, segs), seg, np.uint64))
        nbytes = n * seg * segs

        def raw_round(r):
            keys = [f"raw-{r}-{i}" for i in range(n)]
            t0 = time.perf_counter()
            if segs == 1:
                rc = raw.batch_put_from(keys, sc_src.addrs[:, 0].tolist(), sc_src.sizes[:, 0].tolist())
            else:
                rc = raw.batch_put_from_multi_buffers(keys, sc_src.addrs.tolist(), sc_src.sizes.tolist())
            t1 = time.perf_counter()
            if segs == 1:
                rg = raw.batch_get_into(keys, sc_dst.addrs[:, 0].tolist(), sc_dst.sizes[:, 0].tolist())
            else:
                rg = raw.batch_get_into_multi_buffers(keys, sc_dst.addrs.tolist(), sc_dst.sizes.tolist())
            t2 = time.perf_counter()
            assert all(x == 0 for x in rc) and all(x == nbytes // n for x in rg), (rc[:3], rg[:3])
            return t1 - t0, t2 - t1

        def adapter_round(r):
            keys = [f"kvd-{r}-{i}" for i in range(n)]
            t0 = time.perf_counter()
            sp = store.put(keys, sc_src)
            t1 = time.perf_counter()
            sg = store.get(keys, sc_dst)
            t2 = time.perf_counter()
            assert (sp == base.OK).all() and (sg == base.OK).all()
            return t1 - t0, t2 - t1

        adapter_round(-1)  # warm-up both paths
        raw_round(-1)
        res = {"raw": [], "adapter": []}
        for r in range(args.rounds):  # interleaved so that noise hits both alike
            res["raw"].append(raw_round(r))
            res["adapter"].append(adapter_round(r))
        assert np.array_equal(src, dst)
        store.close()
    finally:
        svc.stop()

    gbps = lambda t: nbytes / t / 1e9  # noqa: E731
    print(f"{'path':<9} {'op':<4} {'best GB/s':>10} {'median GB/s':>12} {'median ms':>10}")
    summary = {}
    for op, j in (("put", 0), ("get", 1)):
        for path in ("raw", "adapter"):
            ts = [x[j] for x in res[path]]
            summary[(path, op)] = (min(ts), statistics.median(ts))
            print(f"{path:<9} {op:<4} {gbps(min(ts)):>10.3f} {gbps(statistics.median(ts)):>12.3f} "
                  f"{statistics.median(ts) * 1e3:>10.2f}")
    for op in ("put", "get"):
        best = summary[("adapter", op)][0] / summary[("raw", op)][0] - 1
        med = summary[("adapter", op)][1] / summary[("raw", op)][1] - 1
        print(f"adapter overhead {op}: best {best * 100:+.1f}%  median {med * 100:+.1f}%  (goal <= +10%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
