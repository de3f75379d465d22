"""The cache's staged transfer path vs plain copies of the same bytes, in one run.

A request of --tokens tokens (every page in the pool) is loaded with
``KVDirectCache.load`` through the embedded shm pool (staged: pool -> host
staging buffer -> device pages) and written back (device -> staging -> pool).
Baselines, same bytes, same run: CPU -- memcpy of the pages' bytes (numpy.copyto)
twice (pool -> host, host -> pages); CUDA -- memcpy (pool -> pinned host) plus one
host-to-device ``copy_`` of a contiguous tensor (the floor of any staged path).

Usage: python bench/bench_transfer.py [--device cpu|cuda] [--tokens 3584] [--layers 16]
"""
import argparse
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
from kvdirect.stores.shm import destroy_pool  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, default=3584)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    import torch

    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    P, n_tok = a.page_size, a.tokens // a.page_size * a.page_size
    slots_total = 2 * n_tok + P
    mk = (lambda: torch.randn((slots_total, a.heads, a.head_dim), device=dev).to(torch.bfloat16))
    k, v = [mk() for _ in range(a.layers)], [mk() for _ in range(a.layers)]
    layout = KVLayout.from_mha(k, v, P)
    nbytes = n_tok // P * layout.page_bytes
    name = f"kvd-bench-xfer-{uuid.uuid4().hex[:8]}"
    url = f"shm://{name}?size={nbytes * (a.reps + 3) + (64 << 20)}"
    print(f"machine: {describe()}; device {a.device}" +
          (f" ({torch.cuda.get_device_name(dev)})" if a.device == "cuda" else ""))
    print(f"request: {n_tok} tokens, {a.layers} layers, {nbytes / 2**20:.1f} MiB; best of {a.reps}")
    try:
        cfg = CacheConfig(model="bench-transfer", stage=True, allow_no_store=False)
        c = KVDirectCache(layout, url, config=cfg)
        rng = np.random.default_rng(0)
        t_wb, t_load = [], []
        for r in range(a.reps):
            toks = rng.integers(0, 1 << 30, n_tok).astype(np.int64)
            slots = np.arange(n_tok, dtype=np.int64)
            t0 = time.perf_counter()
            c.write_back(toks, slots)
            c.flush()
            t_wb.append(time.perf_counter() - t0)
            c.evict(10**9)
            m = c.match(toks)
            assert m.pool_len == n_tok
            dst = np.arange(n_tok, 2 * n_tok, dtype=np.int64)
            sync()
            t0 = time.perf_counter()
            assert c.load(m, dst) == n_tok
            sync()
            t_load.append(time.perf_counter() - t0)
            c.evict(10**9)
        c.close()
        # baselines on the same bytes
        src, host = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
        dev_buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=a.device == "cuda")

        def staged_floor():
            np.copyto(host, src)                   # pool -> host
            if a.device == "cuda":
                dev_buf.copy_(pinned, non_blocking=True)  # host -> device, one contiguous copy
                sync()
            else:
                np.copyto(src, host)               # host -> pages

        t_floor = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            staged_floor()
            t_floor.append(time.perf_counter() - t0)
        gbs = lambda t: nbytes / min(t) / 1e9  # noqa: E731
        print(f"{'':24} {'ms':>8} {'GB/s':>7} {'ratio to floor':>15}")
        print(f"{'floor (2 plain copies)':24} {min(t_floor) * 1e3:8.2f} {gbs(t_floor):7.2f} {1.0:15.2f}")
        print(f"{'cache.load (staged)':24} {min(t_load) * 1e3:8.2f} {gbs(t_load):7.2f} "
              f"{min(t_load) / min(t_floor):15.2f}")
        print(f"{'write_back + flush':24} {min(t_wb) * 1e3:8.2f} {gbs(t_wb):7.2f} {min(t_wb) / min(t_floor):15.2f}")
    finally:
        destroy_pool(name, missing_ok=True)


if __name__ == "__main__":
    main()
