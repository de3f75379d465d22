"""Benchmark: kvdirect PrefixIndex vs SGLang 0.5.23 RadixCache / Rust TreeCore.

Workload "index-std": 200 documents x 3584 random
tokens inserted, then 200 queries each sharing the first 1792 tokens of one
document (the rest random), page size 64. Reported, best of 5 passes: per-query
match and per-document insert time through each Python API, side by side in
the same run, plus ratios. The C++ microbenchmark of the core alone
(bench/index_micro.cpp) is run too when its binary is found under build/.

SGLang's half runs in this process when `sglang` imports, otherwise through
`--sglang-python` (an interpreter of a venv built with
shared/scripts/sglang-cpu-venv.sh), which re-runs this file with --sglang-only.

    python bench/bench_index.py --sglang-python /work/sglang-venv/bin/python
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from array import array
from pathlib import Path

# numpy's OpenBLAS threads spin and steal a core on small machines; nothing here
# uses BLAS. Set before numpy loads (inherited by the SGLang subprocess).
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def workload(a):
    rng = np.random.default_rng(a.seed)
    docs = rng.integers(0, 32000, size=(a.docs, a.doc_len), dtype=np.int64)
    queries = np.concatenate(
        [docs[:, :a.shared], rng.integers(0, 32000, size=(a.docs, a.doc_len - a.shared))], axis=1)
    return docs, queries


def best_of(passes, fn):
    """Runs fn() `passes` times; returns (best, first) seconds per call of fn's unit."""
    times = [fn() for _ in range(passes)]
    return min(times), times[0]


# ---------------------------------------------------------------------------
# kvdirect
# ---------------------------------------------------------------------------
def bench_kvdirect(a, docs, queries, token_kind):
    from kvdirect.index import PrefixIndex

    conv = {
        "numpy int64": lambda x: np.ascontiguousarray(x),
        "array('q')": lambda x: array("q", x.tobytes()),
        "list": lambda x: x.tolist(),
    }[token_kind]
    dk = [conv(d) for d in docs]
    qk = [conv(q) for q in queries]
    slots = [np.arange(i * a.doc_len, (i + 1) * a.doc_len, dtype=np.int64) for i in range(len(docs))]

    def insert_pass():
        ix = PrefixIndex(a.page)
        t0 = time.perf_counter()
        for d, s in zip(dk, slots):
            ix.insert(d, s)
        return (time.perf_counter() - t0) / len(dk)

    ins_best, _ = best_of(a.passes, insert_pass)
    ix = PrefixIndex(a.page)
    for d, s in zip(dk, slots):
        ix.insert(d, s)
    match = ix.match
    hits = [0]

    def match_pass():
        t0 = time.perf_counter()
        for q in qk:
            match(q)
        dt = (time.perf_counter() - t0) / len(qk)
        hits[0] = sum(match(q).device_len for q in qk)
        return dt

    m_best, m_first = best_of(a.passes, match_pass)
    return {"match_us": m_best * 1e6, "match_first_us": m_first * 1e6,
            "insert_us": ins_best * 1e6, "hit_tokens": hits[0]}


# ---------------------------------------------------------------------------
# SGLang
# ---------------------------------------------------------------------------
def sglang_available():
    try:
        import sglang.srt.mem_cache.radix_cache  # noqa: F401
        return True
    except Exception:
        return False


def bench_sglang(a, docs, queries):
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
    from sglang.srt.mem_cache.unified_cache.components import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    def make_radix():
        return RadixCache(CacheInitParams(disable=False, req_to_token_pool=None,
                                          token_to_kv_pool_allocator=None, page_size=a.page))

    def make_rust():
        c = UnifiedRadixCache(CacheInitParams(
            disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=None,
            page_size=a.page, tree_components=(ComponentType.FULL,), tree_core_backend="rust"))
        assert c._tree_core_backend == "rust", c._tree_core_backend
        return c

    # Inputs are built outside the timed loops (array('q') keys, as SGLang uses).
    dkeys = [array("q", d.tobytes()) for d in docs]
    qparams = [MatchPrefixParams(key=RadixKey(array("q", q.tobytes()))) for q in queries]
    values = [torch.arange(i * a.doc_len, (i + 1) * a.doc_len, dtype=torch.int64)
              for i in range(len(docs))]
    out = {}
    for name, make in (("SGLang RadixCache (Python)", make_radix),
                       ("SGLang UnifiedRadixCache (Rust TreeCore)", make_rust)):
        def insert_pass():
            c = make()
            ps = [InsertParams(key=RadixKey(k), value=v) for k, v in zip(dkeys, values)]
            t0 = time.perf_counter()
            for p in ps:
                c.insert(p)
            return (time.perf_counter() - t0) / len(ps)

        ins_best, _ = best_of(a.passes, insert_pass)
        c = make()
        for k, v in zip(dkeys, values):
            c.insert(InsertParams(key=RadixKey(k), value=v))
        hits = [0]

        def match_pass():
            t0 = time.perf_counter()
            for p in qparams:
                c.match_prefix(p)
            dt = (time.perf_counter() - t0) / len(qparams)
            hits[0] = sum(c.match_prefix(p).device_prefix_len for p in qparams)
            return dt

        m_best, m_first = best_of(a.passes, match_pass)
        out[name] = {"match_us": m_best * 1e6, "match_first_us": m_first * 1e6,
                     "insert_us": ins_best * 1e6, "hit_tokens": hits[0]}
    import sglang

    out["_version"] = getattr(sglang, "__version__", "?")
    return out


def sglang_via_subprocess(a):
    cmd = [a.sglang_python, str(Path(__file__).resolve()), "--sglang-only",
           "--docs", str(a.docs), "--doc-len", str(a.doc_len), "--shared", str(a.shared),
           "--page", str(a.page), "--passes", str(a.passes), "--seed", str(a.seed)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        print(f"SGLang half failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
def machine():
    from kvdirect.runtime import machine_description
    return machine_description()


def run_micro(a):
    bins = sorted(glob.glob(str(ROOT / "build" / "*" / "index_micro")))
    if not bins:
        return None
    r = subprocess.run([bins[-1], str(a.docs), str(a.doc_len), str(a.shared), str(a.page),
                        str(a.passes)], capture_output=True, text=True, timeout=600)
    return r.stdout.strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=200)
    p.add_argument("--doc-len", type=int, default=3584)
    p.add_argument("--shared", type=int, default=1792)
    p.add_argument("--page", type=int, default=64)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sglang-python", default=None,
                   help="interpreter of a venv with sglang, used when sglang does not import here")
    p.add_argument("--sglang-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args()

    docs, queries = workload(a)
    if a.sglang_only:
        print(json.dumps(bench_sglang(a, docs, queries)))
        return 0

    print(f"index-std: {a.docs} docs x {a.doc_len} tokens, queries share {a.shared}, "
          f"page {a.page}, best of {a.passes} passes")
    print(f"machine: {machine()}")
    rows = {}
    for kind in ("numpy int64", "array('q')", "list"):
        rows[f"kvdirect PrefixIndex ({kind})"] = bench_kvdirect(a, docs, queries, kind)
    sgl = None
    if sglang_available():
        sgl = bench_sglang(a, docs, queries)
    elif a.sglang_python:
        sgl = sglang_via_subprocess(a)
    sgl_version = None
    if sgl:
        sgl_version = sgl.pop("_version", "?")
        rows.update(sgl)

    ours = rows["kvdirect PrefixIndex (numpy int64)"]
    w = max(len(k) for k in rows) + 2
    print(f"\n{'':{w}}{'match us/query':>15}{'(1st pass)':>12}{'insert us/doc':>15}"
          f"{'match x':>9}{'insert x':>10}")
    for name, r in rows.items():
        print(f"{name:{w}}{r['match_us']:>15.3f}{r['match_first_us']:>12.2f}{r['insert_us']:>15.2f}"
              f"{r['match_us'] / ours['match_us']:>9.2f}{r['insert_us'] / ours['insert_us']:>10.2f}")
    print("(x = time relative to kvdirect with numpy int64 input; > 1 means kvdirect is faster)")
    expect = a.docs * a.shared // a.page * a.page
    bad = [n for n, r in rows.items() if r["hit_tokens"] != expect]
    if bad:
        print(f"WARNING: hit tokens differ from {expect}: {bad}")
    if sgl:
        rust = rows["SGLang UnifiedRadixCache (Rust TreeCore)"]
        print(f"\nsglang {sgl_version}: kvdirect match is {rust['match_us'] / ours['match_us']:.1f}x "
              f"the Rust TreeCore (goal >= 5x), "
              f"{rows['SGLang RadixCache (Python)']['match_us'] / ours['match_us']:.1f}x RadixCache; "
              f"insert {rust['insert_us'] / ours['insert_us']:.2f}x the Rust TreeCore (goal >= 1)")
    else:
        print("\nsglang not importable and no --sglang-python given: baseline rows skipped")
    print(f"goal match <= 1 us/query: {'met' if ours['match_us'] <= 1.0 else 'NOT met'} "
          f"({ours['match_us']:.3f} us)")
    micro = run_micro(a)
    if micro:
        print("\nC++ core alone (bench/index_micro.cpp):\n" + micro)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "rows": rows,
                                            "sglang": sgl_version, "micro": micro}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
