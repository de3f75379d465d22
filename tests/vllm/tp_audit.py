"""TP=2 pool audit, run by hand (not in the suite: four TP=2 engines take about 10 minutes on
2 cores). Inside the vLLM environment, from tests/vllm:

    VLLM_CPU_OMP_THREADS_BIND="0|1" python tp_audit.py

The same as test_pool_audit.py with tensor_parallel_size=2: A writes documents, F serves the
prompts with gets failing (and pages evicted) on different pages on each rank, R is a cold
TP=2 instance. A failed load on one rank must keep every rank from saving the pages computed
on it (the ranks agree on the first failed page); then every object in the pool must equal
R's, and F's outputs R's. Prints the audit and exits non-zero on a wrong page or output.
"""
import json
import os
import sys

from conftest import _shm, kvdirect, run_engines
from test_pool_audit import COMMON, audit, workload

FAULTS = [
    {"mode": "evict", "fail_rate": 0.1, "ops": ["get"], "seed": 21, "seed_per_rank": True},
    {"mode": "error", "fail_rate": 0.15, "ops": ["get"], "seed": 22, "seed_per_rank": True},
]


def main() -> int:
    if "|" not in os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""):
        print('set VLLM_CPU_OMP_THREADS_BIND="0|1" (vLLM refuses TP=2 on one NUMA node without it)')
        return 2
    import make_model

    model = str(make_model.build("tiny"))
    docs, phases = workload()
    sequences = docs + [p for ph in phases for p in ph["prompts"]]
    tp = dict(COMMON, tensor_parallel_size=2)
    pools = {n: _shm() for n in ("served", "cold")}
    urls = {n: next(g) for n, g in pools.items()}
    try:
        first = run_engines({
            "A": dict(model=model, kv=kvdirect(urls["served"]), phases=[{"prompts": docs, "max_tokens": 1}], **tp),
            "R": dict(model=model, kv=dict(kvdirect(urls["cold"]), role="kv_producer"),
                      phases=[{"prompts": docs, "max_tokens": 1}] + phases, **tp),
        })
        f = run_engines({"F": dict(model=model, kv=kvdirect(urls["served"]), phases=phases, fault=FAULTS, **tp)})["F"]
        cold = first["R"]
        assert len(f["fingerprints"]) == 2 and f["fingerprints"] == cold["fingerprints"]
        same = [a["outputs"] == b["outputs"] for a, b in zip(f["phases"], cold["phases"][1:])]
        a = audit(urls["served"], urls["cold"], f["fingerprints"], sequences)
        m = {k: v for k, v in f["metrics"].items() if k.startswith("vllm:kvdirect_")}
        print(json.dumps({"outputs_equal_cold": same, "audit": a, "metrics": m}, indent=1))
        ok = all(same) and not a["wrong"] and not a["no_reference"] and a["found"] == a["objects"]
        ok = ok and m.get("vllm:kvdirect_load_failures", 0) > 0
        return 0 if ok else 1
    finally:
        for g in pools.values():
            next(g, None)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
