"""MLA: a tiny DeepSeek-V2-shaped model (``mla_model.py``) in real SGLang servers sharing a pool.

SGLang keeps MLA KV as one compressed latent per token (``MLATokenToKVPool``), the same
on every TP rank, so kvdirect stores each page once, under keys without the TP rank:
pages written by a ``--tp-size 2`` server serve a ``--tp-size 1`` server and back. Rank 0
alone writes them (the test counts the shm store's puts per scheduler process).

The servers load the TEST-ONLY plugin ``testplugin/`` with
``KVDIRECT_TEST_MLA_TORCH_NATIVE=1``: SGLang's ``torch_native`` backend has no MLA
dispatch of its own (see the plugin's docstring). Greedy tokens are compared with
Hugging Face transformers running the same weights (fp32 on both sides).
"""
from __future__ import annotations

from collections import Counter

import pytest

from conftest import expected_hit, tp2, wait_pool_objects
from kvdirect.demo.sglang_cpu.client import cached_tokens
from mla_model import hf_greedy, write_mla_model
from test_shared_pool import kv_config
from workload import OUTPUT_LEN, Workload

PAGE = 16


@pytest.fixture(scope="module")
def mla_model(workdir) -> str:
    return write_mla_model(workdir / "mla-model", seed=0)


@pytest.fixture(scope="module")
def mla_workload() -> Workload:
    return Workload(per_level=3)


@pytest.fixture(scope="module")
def hf_references(mla_model, mla_workload) -> dict:
    seqs = mla_workload.sequences()
    return {ids.tobytes(): out for ids, out in zip(seqs, hf_greedy(mla_model, seqs, OUTPUT_LEN))}


def mla_server(model: str, url: str, name: str, put_log=None, **kw) -> dict:
    env = {"KVDIRECT_TEST_MLA_TORCH_NATIVE": "1"}
    if put_log:
        env["KVDIRECT_TEST_PUT_LOG"] = str(put_log)
    return dict(kw, model=model, kvdirect_config=kv_config(url), name=name, testplugin=True, page_size=PAGE,
                args=[*kw.get("args", ()), "--dtype", "float32"], env={**kw.get("env", {}), **env})


def puts_per_process(log) -> Counter:
    """Page puts per scheduler process, from the test plugin's put log."""
    c: Counter = Counter()
    for line in log.read_text().splitlines():
        pid, *keys = line.split()
        c[int(pid)] += len(keys)
    return c


def test_mla_tp2_writer_tp1_reader_share_pages(farm, pools, workdir, mla_model, mla_workload, hf_references):
    wl = mla_workload
    url = pools.new()
    put_log = workdir / "mla-puts.txt"
    put_log.unlink(missing_ok=True)
    a, b = farm.start_all([tp2(**mla_server(mla_model, url, "mla-A-tp2", put_log=put_log)),
                           mla_server(mla_model, url, "mla-B-tp1")])

    # A (TP2) serves the documents: each page is stored once, put by one rank only
    for i, (doc, r) in enumerate(zip(wl.docs, a.generate_many(wl.docs, OUTPUT_LEN))):
        assert r["output_ids"] == hf_references[doc.tobytes()], \
            f"SGLang (MLA, TP2) differs from transformers on document {i}: {r['meta_info']}"
    pages = len(wl.docs) * ((wl.prompt_len + OUTPUT_LEN) // PAGE)  # prompt + generated tokens, whole pages
    assert wait_pool_objects(url, pages) >= pages
    puts = puts_per_process(put_log)
    assert len(puts) == 1, f"MLA pages were put by {len(puts)} TP ranks (processes: {dict(puts)}); rank 0 alone writes them"
    assert sum(puts.values()) == wait_pool_objects(url, pages) == pages

    # B (TP1) hits A's pages: the same bytes serve any TP size
    for (reuse, shared, ids), r in zip(wl.prompts, b.generate_many([p[2] for p in wl.prompts], OUTPUT_LEN)):
        hit = cached_tokens(r["meta_info"])
        assert hit["pool"] == expected_hit(shared, wl.prompt_len, PAGE), (reuse, hit)
        assert r["output_ids"] == hf_references[ids.tobytes()], f"wrong output after an MLA pool hit (reuse {reuse})"

    # and back: A (both ranks) loads the pages B computed for its fresh prompts
    fresh = [p for p in wl.prompts if p[0] == 0.0]
    assert wait_pool_objects(url, pages + len(fresh) * (wl.prompt_len // PAGE)) > pages
    for (_, _, ids), r in zip(fresh, a.generate_many([p[2] for p in fresh], OUTPUT_LEN)):
        assert cached_tokens(r["meta_info"])["pool"] == expected_hit(wl.prompt_len, wl.prompt_len, PAGE)
        assert r["output_ids"] == hf_references[ids.tobytes()]
