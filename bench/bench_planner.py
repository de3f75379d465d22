"""Planner: per-page scatter lists for 1024 pages x 64 layers x K/V.

Baseline: the Python list comprehension SGLang's storage backends use to build
page buffer metadata (get_page_buffer_meta: per page, per layer, K and V
pointers from per-token indices). kvdirect: KVLayout.plan (one C++ call).
Goal: >= 50x. Usage: python bench/bench_planner.py [--pages 1024 --layers 64]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from kvdirect import KVLayout  # noqa: E402


def best(fn, reps):
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    P, L, es = a.page_size, a.layers, 2  # bf16
    pool_pages = 4 * a.pages
    row = a.heads * a.head_dim * es
    # fake, never dereferenced base addresses, one K and one V buffer per layer
    k_ptrs = [0x7F0000000000 + i * (pool_pages * P * row * 2) for i in range(L)]
    v_ptrs = [p + pool_pages * P * row for p in k_ptrs]
    layout = KVLayout.from_addresses(k_ptrs, v_ptrs, page_size=P, num_slots=pool_pages * P, kv_heads=a.heads,
                                     head_dim=a.head_dim, dtype="bfloat16")
    rng = np.random.default_rng(0)
    first = (rng.permutation(pool_pages)[:a.pages] * P).astype(np.int64)
    tokens = (first[:, None] + np.arange(P)).reshape(-1)
    token_list = tokens.tolist()

    def python_baseline():
        # as SGLang builds page buffer meta: Python ints, per page, per layer, K then V
        ptrs = [p + token_list[i] * row for i in range(0, len(token_list), P)
                for layer in range(L) for p in (k_ptrs[layer], v_ptrs[layer])]
        sizes = [P * row] * len(ptrs)
        return ptrs, sizes

    ref_ptrs, ref_sizes = python_baseline()
    t0 = time.perf_counter()
    sl = layout.plan(tokens)
    t_cold = time.perf_counter() - t0  # first call: output memory not yet warm
    assert sl.addrs.reshape(-1).tolist() == ref_ptrs and sl.sizes.reshape(-1).tolist() == ref_sizes

    t_py = best(python_baseline, a.reps)
    t_first = best(lambda: layout.plan(first), a.reps * 5)
    t_tok = best(lambda: layout.plan(tokens), a.reps * 5)
    print(f"machine: {describe()}")
    print(f"planner: {a.pages} pages x {L} layers x K/V = {a.pages * L * 2} segments, page_size {P}, best of runs")
    print(f"  python list comprehension (per-token slots)   {t_py * 1e3:9.3f} ms")
    print(f"  KVLayout.plan, per-token slots                {t_tok * 1e3:9.3f} ms   {t_py / t_tok:7.1f}x")
    print(f"  KVLayout.plan, first slot of each page        {t_first * 1e3:9.3f} ms   {t_py / t_first:7.1f}x")
    print(f"  KVLayout.plan, first call (cold output memory) {t_cold * 1e3:8.3f} ms   {t_py / t_cold:7.1f}x")
    print(f"  goal >= 50x: {'met' if t_py / t_tok >= 50 else 'NOT met'}")
    if a.json:
        import json
        Path(a.json).write_text(json.dumps({"machine": describe(), "pages": a.pages, "layers": L,
                                            "python_ms": t_py * 1e3, "plan_tokens_ms": t_tok * 1e3,
                                            "plan_first_slots_ms": t_first * 1e3, "ratio": t_py / t_tok}))


if __name__ == "__main__":
    main()
