"""Benchmark: kvdirect PrefixIndex vs SGLang 0.5.23 RadixCache / Rust TreeCore.

Workload "index-std": 200 documents x 3584 random tokens inserted, then 200
queries each sharing the first 1792 tokens of one document (the rest random),
page size 64. Reported, side by side in the same run:

* alone: per-query match and per-document insert time through each Python
  API, best of 5 passes (kvdirect with numpy int64, array('q') and list keys;
  also kvdirect's match plus reading ``device_slots``, which SGLang's match
  does not return);
* interleaved: kvdirect and the Rust TreeCore alternating query by query in
  ONE process, both fed SGLang's key type array('q'), each query timed alone
  (timer cost subtracted), each query's best of 5 passes, averaged. Here each
  side finds the other's traffic in the caches, as in a server process. The
  same process then times each side alone the same way (per query, best of
  passes: robust against a busy machine's preemptions);
* the C++ core alone (bench/index_micro.cpp) when its binary is under build/.

Goals (issue 16): interleaved kvdirect >= 10x the TreeCore; alone <= 0.6 us.

SGLang's half runs in this process when `sglang` imports, otherwise through
`--sglang-python` (an interpreter of a venv with sglang, e.g. one built with
the sglang-cpu-venv script): this file re-runs there with --sglang-only and a
copy of the kvdirect package imported here put first on its path (whatever
kvdirect that venv has installed is not used).

    python bench/bench_index.py --sglang-python ~/.cache/kvdirect/sglang-venv/bin/python --json index.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
def bench_kvdirect(a, docs, queries, token_kind, read_slots=False):
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
        if read_slots:
            for q in qk:
                match(q).device_slots
        else:
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


def make_rust_tree(page):
    import warnings

    warnings.filterwarnings("ignore")
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.unified_cache.components import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    c = UnifiedRadixCache(CacheInitParams(
        disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=None,
        page_size=page, tree_components=(ComponentType.FULL,), tree_core_backend="rust"))
    assert c._tree_core_backend == "rust", c._tree_core_backend
    return c


def bench_sglang(a, docs, queries):
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    def make_radix():
        return RadixCache(CacheInitParams(disable=False, req_to_token_pool=None,
                                          token_to_kv_pool_allocator=None, page_size=a.page))

    def make_rust():
        return make_rust_tree(a.page)

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


def bench_interleaved(a, docs, queries):
    """kvdirect and the Rust TreeCore alternating query by query in this process, both
    fed array('q') keys. Per query: the best of `passes` passes, timer cost subtracted;
    the figure is the mean over queries. Also each alone, in this same process."""
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    import kvdirect
    from kvdirect.index import PrefixIndex

    tree = make_rust_tree(a.page)
    ix = PrefixIndex(a.page)
    for i, d in enumerate(docs):
        tree.insert(InsertParams(key=RadixKey(array("q", d.tobytes())),
                                 value=torch.arange(i * a.doc_len, (i + 1) * a.doc_len)))
        ix.insert(array("q", d.tobytes()), np.arange(i * a.doc_len, (i + 1) * a.doc_len, dtype=np.int64))
    qa = [array("q", q.tobytes()) for q in queries]
    qp = [MatchPrefixParams(key=RadixKey(array("q", q.tobytes()))) for q in queries]
    expect = len(queries) * (a.shared // a.page * a.page)
    got_k = sum(ix.match(q).device_len for q in qa)
    got_t = sum(tree.match_prefix(p).device_prefix_len for p in qp)
    if got_k != expect or got_t != expect:
        raise RuntimeError(f"hit tokens differ: kvdirect {got_k}, TreeCore {got_t}, expected {expect}")
    pc, km, tm, n = time.perf_counter, ix.match, tree.match_prefix, len(qa)
    best_k, best_t, empty = [float("inf")] * n, [float("inf")] * n, []
    for _ in range(a.passes):
        for i in range(n):
            t0 = pc()
            km(qa[i])
            t1 = pc()
            tm(qp[i])
            t2 = pc()
            t3 = pc()  # an empty interval: what the timer itself costs
            best_k[i] = min(best_k[i], t1 - t0)
            best_t[i] = min(best_t[i], t2 - t1)
            empty.append(t3 - t2)
    timer = float(np.median(empty))
    k_us = (float(np.mean(best_k)) - timer) * 1e6
    t_us = (float(np.mean(best_t)) - timer) * 1e6

    def alone(fn, xs):  # the same method, one side only
        best = [float("inf")] * len(xs)
        for _ in range(a.passes):
            for i, x in enumerate(xs):
                t0 = pc()
                fn(x)
                best[i] = min(best[i], pc() - t0)
        return (float(np.mean(best)) - timer) * 1e6

    return {"kvdirect_us": k_us, "treecore_us": t_us, "ratio": t_us / k_us, "timer_us": timer * 1e6,
            "kvdirect_alone_us": alone(km, qa), "treecore_alone_us": alone(tm, qp),
            "kvdirect_from": str(Path(kvdirect.__file__).parent)}


def staged_kvdirect() -> str:
    """A copy of the kvdirect package imported here (built extension included), for
    another interpreter's path: it then runs this build, not the one it has installed."""
    import kvdirect

    d = tempfile.mkdtemp(prefix="kvdirect-stage-")
    shutil.copytree(Path(kvdirect.__file__).parent, Path(d) / "kvdirect",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return d


def use_kvdirect_from(path: str) -> None:
    """Import kvdirect from `path` first: also drop editable-install finders that would
    redirect the import to another checkout."""
    sys.path.insert(0, path)
    sys.meta_path[:] = [f for f in sys.meta_path if "kvdirect" not in type(f).__module__]


def sglang_via_subprocess(a):
    stage = staged_kvdirect()
    try:
        cmd = [a.sglang_python, str(Path(__file__).resolve()), "--sglang-only", "--kvdirect-path", stage,
               "--docs", str(a.docs), "--doc-len", str(a.doc_len), "--shared", str(a.shared),
               "--page", str(a.page), "--passes", str(a.passes), "--seed", str(a.seed)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
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
    p.add_argument("--kvdirect-path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args()
    if a.kvdirect_path:
        use_kvdirect_from(a.kvdirect_path)

    docs, queries = workload(a)
    if a.sglang_only:
        out = bench_sglang(a, docs, queries)
        out["_interleaved"] = bench_interleaved(a, docs, queries)
        print(json.dumps(out))
        return 0

    print(f"index-std: {a.docs} docs x {a.doc_len} tokens, queries share {a.shared}, "
          f"page {a.page}, best of {a.passes} passes")
    print(f"machine: {machine()}")
    rows = {}
    for kind in ("numpy int64", "array('q')", "list"):
        rows[f"kvdirect PrefixIndex ({kind})"] = bench_kvdirect(a, docs, queries, kind)
    rows["kvdirect PrefixIndex (array('q') + device_slots)"] = bench_kvdirect(a, docs, queries, "array('q')",
                                                                             read_slots=True)
    sgl = None
    if sglang_available():
        sgl = bench_sglang(a, docs, queries)
        sgl["_interleaved"] = bench_interleaved(a, docs, queries)
    elif a.sglang_python:
        sgl = sglang_via_subprocess(a)
    sgl_version = inter = None
    if sgl:
        sgl_version = sgl.pop("_version", "?")
        inter = sgl.pop("_interleaved", None)
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
    aq = rows["kvdirect PrefixIndex (array('q'))"]
    if sgl:
        rust = rows["SGLang UnifiedRadixCache (Rust TreeCore)"]
        print(f"\nsglang {sgl_version}, each alone: kvdirect match (array('q')) is "
              f"{rust['match_us'] / aq['match_us']:.1f}x the Rust TreeCore, "
              f"{rows['SGLang RadixCache (Python)']['match_us'] / aq['match_us']:.1f}x RadixCache; "
              f"insert {rust['insert_us'] / ours['insert_us']:.2f}x the Rust TreeCore (goal >= 1)")
    else:
        print("\nsglang not importable and no --sglang-python given: baseline rows skipped")
    if inter:
        print(f"interleaved in one process (array('q'), query by query, best of {a.passes} per query): "
              f"kvdirect {inter['kvdirect_us']:.3f} us, TreeCore {inter['treecore_us']:.3f} us = "
              f"{inter['ratio']:.1f}x (goal >= 10x); same process alone: kvdirect "
              f"{inter['kvdirect_alone_us']:.3f} us, TreeCore {inter['treecore_alone_us']:.3f} us")
    print(f"goal match <= 0.6 us/query alone (array('q')): "
          f"{'met' if aq['match_us'] <= 0.6 else 'NOT met'} ({aq['match_us']:.3f} us; numpy int64 "
          f"{ours['match_us']:.3f} us)")
    micro = run_micro(a)
    if micro:
        print("\nC++ core alone (bench/index_micro.cpp):\n" + micro)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "rows": rows, "interleaved": inter,
                                            "sglang": sgl_version, "micro": micro}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
