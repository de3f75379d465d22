"""The pool is never poisoned: a real vLLM engine with a faulty store, then every pool object audited.

Instance A writes documents into an shm pool. Instance F (a new process, kv_both) serves
prompts over that pool through a fault-injecting store (kvdirect.stores._testing.FlakyStore,
nested): pages evicted between the scheduler's existence query and the worker's get, gets
failing with garbage left in the blocks, and gets delayed past a deadline (they time out
and still write the blocks when they return). Its batches hold identical prompts and n=2
requests, so vLLM shares blocks being loaded between requests of one step.

Then the audit: every page key the run could have written (every full page of every token
sequence sent, with F's layout fingerprint) is read from the pool and compared byte for byte
with the object a cold instance R stored for the same tokens (R computes every page itself:
kv_producer, an empty pool of its own), and the number of objects found must equal the pool's
object count (nothing else is in it). F's outputs equal R's.
"""
import numpy as np

from conftest import _shm, kvdirect, run_engines, tokens

P = 32
COMMON = dict(max_num_batched_tokens=8192, max_model_len=2048, block_size=P)
FAULTS = [  # innermost first
    {"mode": "evict", "fail_rate": 0.12, "ops": ["get"], "seed": 11},
    {"mode": "error", "fail_rate": 0.12, "ops": ["get"], "seed": 12},
    {"mode": "error", "fail_rate": 0.0, "ops": ["get"], "seed": 9,  # seed 9: the second get call is late
     "delay_s": 1.0, "delay_rate": 0.34, "deadline_s": 0.25},
]


def workload():
    docs = [tokens(700 + i, 320) for i in range(3)]  # 10 pages each
    x = [tokens(800 + i, 100) for i in range(4)]
    phases = [
        # identical prompts in one batch: the second shares the blocks the first is loading
        {"prompts": [docs[0], docs[0], docs[1][:160] + x[0], docs[1][:160] + x[0], docs[2][:224] + x[1]],
         "max_tokens": 4},
        # n=2: two requests of one prompt, same step
        {"prompts": [docs[2], docs[1], docs[0][:96] + x[2]], "max_tokens": 4, "n": 2},
        {"prompts": [docs[1][:288] + x[3], docs[1][:288] + x[3], docs[2]], "max_tokens": 4},
    ]
    return docs, phases


def page_keys(fingerprints: list, sequences) -> set:
    """Every key a run could write: every full page of every sequence, for every TP rank."""
    from kvdirect import keys as K

    out = set()
    for toks in sequences:
        n = len(toks) // P
        if n:
            d = K.page_digests(np.asarray(toks[: n * P], dtype=np.int64), P)
            for f in fingerprints:
                out.update(K.pool_keys(d, K.LayoutFingerprint(**f)))
    return out


def audit(url: str, reference_url: str, fingerprints: list, sequences) -> dict:
    """Every object of the pool at ``url`` against the cold reference pool (no key listing: the
    keys of every page sent are read, and their number must be the pool's object count)."""
    from kvdirect.stores import open_store

    pool, ref = open_store(url), open_store(reference_url)
    try:
        found, wrong, unknown = 0, [], []
        for k in sorted(page_keys(fingerprints, sequences)):
            got = pool.get_bytes(k)
            if got is None:
                continue
            found += 1
            cold = ref.get_bytes(k)
            if cold is None:
                unknown.append(k)
            elif got != cold:
                wrong.append(k)
        return {"found": found, "objects": pool.stats()["objects"], "wrong": wrong, "no_reference": unknown}
    finally:
        pool.close()
        ref.close()


def test_faulty_store_never_poisons_the_pool(model):
    docs, phases = workload()
    sequences = docs + [p for ph in phases for p in ph["prompts"]]
    pools = {n: _shm() for n in ("served", "cold")}
    urls = {n: next(g) for n, g in pools.items()}
    try:
        first = run_engines({
            "A": dict(model=model, kv=kvdirect(urls["served"]), phases=[{"prompts": docs, "max_tokens": 1}],
                      **COMMON),
            "R": dict(model=model, kv=dict(kvdirect(urls["cold"]), role="kv_producer"),
                      phases=[{"prompts": docs, "max_tokens": 1}] + phases, **COMMON),
        })
        f = run_engines({"F": dict(model=model, kv=kvdirect(urls["served"]), phases=phases, fault=FAULTS,
                                   **COMMON)})["F"]
        cold = first["R"]
        assert cold["metrics"]["vllm:external_prefix_cache_hits"] == 0  # R computed every page
        assert f["fingerprints"] == cold["fingerprints"] == [f["fingerprint"]]

        # the faults happened, and the run still loaded pages from the pool
        inj = f["injected"]
        assert inj["evict:get"] > 0 and inj["error:get"] > 0 and inj["timeout"] > 0, inj
        m = f["metrics"]
        assert m["vllm:kvdirect_load_failures"] > 0 and m["vllm:kvdirect_late_loads"] > 0, m
        assert m["vllm:kvdirect_save_withheld_pages"] > 0, m
        assert m["vllm:kvdirect_hit_tokens"] == m["vllm:external_prefix_cache_hits"] > 0, m
        assert m["vllm:kvdirect_loaded_bytes"] == m["vllm:kvdirect_loaded_pages"] * (
            f["worker_stats"]["stored_bytes"] // f["worker_stats"]["stored_pages"])

        # outputs equal the cold instance's (fp32), n=2 samples included
        for ph_f, ph_r in zip(f["phases"], cold["phases"][1:]):
            assert ph_f["outputs"] == ph_r["outputs"]
            assert ph_f.get("samples") == ph_r.get("samples")

        # every object in the pool is the page a cold engine computes for its tokens
        a = audit(urls["served"], urls["cold"], f["fingerprints"], sequences)
        assert a["wrong"] == [] and a["no_reference"] == [], a
        assert a["found"] == a["objects"] > len(docs) * (320 // P), a

        ws = f["worker_state"]
        assert f["blocks"]["requests_left"] == 0 and not ws["late"] and not ws["finishing"], (f["blocks"], ws)
        assert f["blocks"]["free"] == f["blocks"]["total"] - 1, f["blocks"]
    finally:
        for g in pools.values():
            next(g, None)
