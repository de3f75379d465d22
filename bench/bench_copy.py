"""Gather/scatter bandwidth vs plain copies, side by side in one run.

CPU (default): CopyEngine gather and scatter of N pages (16 segments each:
8 layers x K/V, pages scattered over a pool twice as large) vs single-thread
memcpy of the same bytes (numpy.copyto of one contiguous buffer). Goal: >= 80%
of memcpy for pages of 64 KiB and larger.

CUDA (--device cuda, needs torch with CUDA): the CUDA kernel vs a contiguous
device-to-device copy of the same bytes (goal >= 80%) and vs torch
index_select + copy_ per segment plane (goal: faster).

Usage: python bench/bench_copy.py [--device cpu|cuda] [--total-mib 128]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from kvdirect import CopyEngine, KVLayout  # noqa: E402

LAYERS = 8  # 16 segments per page


def best(fn, reps, sync=lambda: None):
    t = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        t.append(time.perf_counter() - t0)
    return min(t)


def cpu(args):
    print(f"machine: {describe()}")
    eng1, engn = CopyEngine(threads=1), CopyEngine(threads=args.threads)
    print(f"CPU copy engine, {LAYERS} layers x K/V per page, batch {args.total_mib} MiB, best of {args.reps}; "
          f"GB/s and ratio to single-thread memcpy (numpy.copyto) of the same bytes")
    print(f"{'page':>9} {'pages':>6} {'memcpy':>8} | {'gather':>8} {'ratio':>6} {'scatter':>8} {'ratio':>6} "
          f"| threads={engn.threads}: {'gather':>7} {'ratio':>6} {'scatter':>8} {'ratio':>6}")
    rng = np.random.default_rng(0)
    for page_kib in args.pages_kib:
        page = page_kib << 10
        n = max(1, (args.total_mib << 20) // page)
        seg = page // (2 * LAYERS)
        P = 16
        row = seg // P
        pool_pages = 2 * n
        k = [np.ones((pool_pages * P, row), np.uint8) for _ in range(LAYERS)]
        v = [np.ones((pool_pages * P, row), np.uint8) for _ in range(LAYERS)]
        layout = KVLayout.from_mha([x[:, None, :] for x in k], [x[:, None, :] for x in v], P, dtype="uint8")
        slots = (rng.permutation(pool_pages)[:n] * P).astype(np.int64)
        sl = layout.plan(slots)
        objs = np.ones((n, layout.page_bytes), np.uint8)
        src = np.ones_like(objs)
        total = objs.nbytes
        t_mem = best(lambda: np.copyto(objs, src), args.reps)
        res = []
        for eng in (eng1, engn):
            res.append(best(lambda: eng.gather(sl, objs), args.reps))
            res.append(best(lambda: eng.scatter(sl, objs), args.reps))
        gbs = [total / t / 1e9 for t in [t_mem] + res]
        m = gbs[0]
        print(f"{page_kib:>6} KiB {n:>6} {m:8.2f} | {gbs[1]:8.2f} {gbs[1] / m:6.2f} {gbs[2]:8.2f} {gbs[2] / m:6.2f} "
              f"| {'':>10}{gbs[3]:7.2f} {gbs[3] / m:6.2f} {gbs[4]:8.2f} {gbs[4] / m:6.2f}")
        del k, v, objs, src


def cuda(args):
    import torch

    dev = torch.device("cuda")
    print(f"machine: {describe()}; GPU: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    eng = CopyEngine(device="cuda")
    stream = torch.cuda.current_stream()
    sync = torch.cuda.synchronize
    print(f"CUDA copy engine, {LAYERS} layers x K/V per page, batch {args.total_mib} MiB, best of {args.reps}; GB/s")
    print(f"{'page':>9} {'pages':>6} {'d2d copy':>9} | {'gather':>8} {'/d2d':>5} {'scatter':>8} {'/d2d':>5} "
          f"| {'index_select':>12} {'kvd/torch':>9}")
    g = torch.Generator().manual_seed(0)
    for page_kib in args.pages_kib:
        page = page_kib << 10
        n = max(1, (args.total_mib << 20) // page)
        seg = page // (2 * LAYERS)
        P = 16
        row = seg // P
        pool_pages = 2 * n
        k = [torch.randint(0, 255, (pool_pages * P, 1, row), dtype=torch.uint8, device=dev) for _ in range(LAYERS)]
        v = [torch.randint(0, 255, (pool_pages * P, 1, row), dtype=torch.uint8, device=dev) for _ in range(LAYERS)]
        layout = KVLayout.from_mha(k, v, P)
        pages = torch.randperm(pool_pages, generator=g)[:n]
        sl = layout.plan((pages * P).numpy())
        objs = torch.empty((n, layout.page_bytes), dtype=torch.uint8, device=dev)
        src = torch.empty_like(objs)
        idx = pages.to(dev)
        planes = [x.view(pool_pages, seg) for kv in zip(k, v) for x in kv]

        def torch_gather():
            o = objs.view(n, 2 * LAYERS, seg)
            for j, pl in enumerate(planes):
                o[:, j].copy_(pl.index_select(0, idx))

        # correctness first: kernel gather == torch gather, byte for byte
        eng.gather(sl, objs, stream=stream.cuda_stream)
        ref = objs.clone()
        objs.zero_()
        torch_gather()
        assert torch.equal(ref, objs), "CUDA gather differs from the index_select baseline"
        total = objs.numel()
        t_d2d = best(lambda: objs.copy_(src), args.reps, sync)
        t_g = best(lambda: eng.gather(sl, objs, stream=stream.cuda_stream), args.reps, sync)
        t_s = best(lambda: eng.scatter(sl, objs, stream=stream.cuda_stream), args.reps, sync)
        t_t = best(torch_gather, args.reps, sync)
        d2d, gg, ss, tt = (total / t / 1e9 for t in (t_d2d, t_g, t_s, t_t))
        # d2d copy reads and writes `total` bytes, as gather/scatter do
        print(f"{page_kib:>6} KiB {n:>6} {d2d:9.1f} | {gg:8.1f} {gg / d2d:5.2f} {ss:8.1f} {ss / d2d:5.2f} "
              f"| {tt:12.1f} {gg / tt:9.2f}")
        del k, v, objs, src, planes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--pages-kib", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--total-mib", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="CPU engine threads (0: one per CPU)")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    if a.total_mib is None:
        a.total_mib = 128 if a.device == "cpu" else 1024
    cpu(a) if a.device == "cpu" else cuda(a)


if __name__ == "__main__":
    main()
