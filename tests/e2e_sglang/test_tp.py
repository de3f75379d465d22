"""Tensor parallelism: real SGLang servers with ``--tp-size 2`` on CPU (see ``conftest.TP2``).

* Two TP2 servers share one shm pool: server B's first request for each prompt hits the
  shared whole pages in the pool (on both ranks: the ranks agree on one count), its greedy
  tokens equal the TP1 references and its log-probabilities equal server A's, which computed
  the same prompts without a pool hit.
* A TP1 server on the same pool (MHA: each TP rank stores its own heads under keys that
  carry ``tp_size``/``tp_rank``) shares no page with the TP2 writer: no hit, outputs equal
  plain TP1.
* Memory pressure in a TP2 server: a device KV smaller than the work, chunked prefill,
  concurrent requests; pages load back from the pool; no wrong output, no leak, no hang.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from conftest import expected_hit, tp2, wait_pool_objects
from kvdirect.demo.sglang_cpu import client
from kvdirect.demo.sglang_cpu.client import cached_tokens
from test_pressure import assert_idle_and_flushable
from test_shared_pool import check_prompts, kv_config
from workload import OUTPUT_LEN, Workload

PER_LEVEL = 4


def test_tp2_servers_share_pool_tp1_reads_nothing(farm, pools, references):
    wl = Workload(per_level=PER_LEVEL)
    url = pools.new()
    a, b = farm.start_all([tp2(kvdirect_config=kv_config(url), name="A-tp2"),
                           tp2(kvdirect_config=kv_config(url), name="B-tp2")])
    cold = a.generate_many(wl.docs, OUTPUT_LEN, logprobs=True)
    for doc, r in zip(wl.docs, cold):
        assert r["output_ids"] == references[doc.tobytes()], "TP2 output differs from TP1's"
        assert len(r["logprobs"]) == OUTPUT_LEN
    # MHA under TP: each rank writes its own half of the heads as its own page object
    pages = len(wl.docs) * (wl.prompt_len // 16)
    assert wait_pool_objects(url, 2 * pages) == 2 * pages, "both TP ranks' pages should reach the pool"

    totals = check_prompts(b, wl, references, 16)
    assert totals["pool"] > 0
    # the documents again on B (whole prompt in the pool): same tokens and log-probabilities
    # as server A computing them without any cached prefix
    hit = b.generate_many(wl.docs, OUTPUT_LEN, logprobs=True)
    for doc, c, h in zip(wl.docs, cold, hit):
        assert cached_tokens(h["meta_info"])["total"] == expected_hit(wl.prompt_len, wl.prompt_len, 16)
        assert h["output_ids"] == c["output_ids"]
        assert h["logprobs"] == c["logprobs"], "log-probabilities differ between a pool hit and a cold prefill"

    # a TP1 server on the same pool: the TP2 pages are not its pages (other keys)
    farm.stop_all()
    objects = wait_pool_objects(url, 0)
    c = farm.start(kvdirect_config=kv_config(url), name="C-tp1")
    for (reuse, shared, ids), r in zip(wl.prompts, c.generate_many([p[2] for p in wl.prompts], OUTPUT_LEN)):
        assert cached_tokens(r["meta_info"])["total"] == 0, f"a TP1 server hit TP2 pages (reuse {reuse})"
        assert r["output_ids"] == references[ids.tobytes()]
    # ... and it wrote its own (TP1) pages next to them
    assert wait_pool_objects(url, objects + 1) > objects


def test_tp2_memory_pressure(farm, pools, references):
    wl = Workload(per_level=PER_LEVEL)
    url = pools.new()
    # 768 tokens of device KV for 256-token prompts: evictions all the time;
    # chunks of 96 tokens: every prompt is prefilled in 3 chunks
    s = farm.start(**tp2(page_size=16, max_total_tokens=768, kvdirect_config=kv_config(url), name="pressure-tp2",
                         args=["--chunked-prefill-size", "96", "--max-running-requests", "4"]))
    for doc, r in zip(wl.docs, s.generate_many(wl.docs, OUTPUT_LEN)):
        assert r["output_ids"] == references[doc.tobytes()]
    pages = len(wl.docs) * (wl.prompt_len // 16)
    assert wait_pool_objects(url, 2 * pages) >= 2 * pages

    # the documents again: most were evicted from the device, so they load back from the pool
    back = s.generate_many(wl.docs, OUTPUT_LEN)
    for doc, r in zip(wl.docs, back):
        assert r["output_ids"] == references[doc.tobytes()]
        assert cached_tokens(r["meta_info"])["total"] == expected_hit(wl.prompt_len, wl.prompt_len, 16)
    assert sum(cached_tokens(r["meta_info"])["pool"] for r in back) > 0, \
        "nothing was loaded back from the pool under memory pressure"

    # concurrent requests over every reuse level: admission under pressure on both ranks
    order = np.random.default_rng(5).permutation(len(wl.prompts))
    prompts = [wl.prompts[i][2] for i in order]
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda ids: client.generate(s.url, ids, OUTPUT_LEN), prompts))
    for ids, r in zip(prompts, results):
        assert r["output_ids"] == references[ids.tobytes()], "wrong output under concurrency"
    assert_idle_and_flushable(s)
