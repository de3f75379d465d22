"""Two real SGLang servers share one embedded shm pool through ``--radix-cache-backend kvdirect``.

Server A serves documents and writes their KV back; server B's first request
for a prompt sharing 0/50/100% of a document must report the shared whole pages
as pool hits (SGLang's ``cached_tokens_details.host``) and produce the same
greedy tokens as SGLang's own cache and ``--disable-radix-cache``. At page size
64 server B loads layer by layer (``"layerwise": true``: SGLang's KV pool waits
for each layer through kvdirect's counter). At page size 16 the pool then
outlives both servers (a restarted server hits on its first request) and a
server of another model on the same pool hits nothing.
"""
from __future__ import annotations

import pytest

from conftest import expected_hit, wait_pool_objects
from kvdirect.demo.sglang_cpu.client import cached_tokens
from workload import OUTPUT_LEN, Workload


def kv_config(url: str, **kw) -> dict:
    return {"store": url, "allow_no_store": False, **kw}


def serve_documents(server, wl: Workload, references) -> None:
    for doc, r in zip(wl.docs, server.generate_many(wl.docs, OUTPUT_LEN)):
        assert r["output_ids"] == references[doc.tobytes()], "server A's output differs from the reference"


def check_prompts(server, wl: Workload, references, page_size: int, *, pool: bool = True) -> dict:
    """B's requests: outputs equal the references; hits are exactly the shared whole pages."""
    totals = {"pool": 0, "device": 0, "prompts": 0}
    results = server.generate_many([p[2] for p in wl.prompts], OUTPUT_LEN)
    for (reuse, shared, ids), r in zip(wl.prompts, results):
        hit = cached_tokens(r["meta_info"])
        want = expected_hit(shared, wl.prompt_len, page_size) if pool else 0
        assert r["output_ids"] == references[ids.tobytes()], f"output differs at reuse {reuse}"
        assert (hit["pool"], hit["device"]) == (want, 0), \
            f"reuse {reuse}: expected {want} pool-hit tokens, got {hit} ({r['meta_info']})"
        totals["pool"] += hit["pool"]
        totals["prompts"] += 1
    return totals


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_second_server_hits_first_servers_pages(farm, pools, references, page_size, other_model_dir, request):
    wl = Workload()
    url = pools.new()
    # at page size 64, server B loads layer by layer (SGLang's KV pool waits per layer)
    layerwise = page_size == 64
    b_kw = dict(kvdirect_config=kv_config(url, layerwise=True), args=["--log-level", "info"]) if layerwise \
        else dict(kvdirect_config=kv_config(url))
    a, b = farm.start_all([dict(page_size=page_size, kvdirect_config=kv_config(url), name=f"A-p{page_size}"),
                           dict(page_size=page_size, name=f"B-p{page_size}", **b_kw)])
    serve_documents(a, wl, references)
    pages = len(wl.docs) * (wl.prompt_len // page_size)
    assert wait_pool_objects(url, pages) >= pages, "server A's pages did not reach the pool"
    totals = check_prompts(b, wl, references, page_size)
    assert totals["prompts"] >= 32 and totals["pool"] > 0
    if layerwise:
        log = b.log_text()
        assert "layerwise=True" in log and "first layer-wise load" in log, b.log_tail()

    if page_size != 16:
        return
    # The pool outlives both servers: a server started afterwards hits on its first request,
    # and a server of another model (same shapes, other weights) never reads these pages.
    farm.stop_all()
    c, other = farm.start_all([dict(page_size=16, kvdirect_config=kv_config(url), name="C-restart",
                                    args=["--log-level", "info"]),
                               dict(page_size=16, kvdirect_config=kv_config(url), name="other-model",
                                    model=other_model_dir)])
    doc = wl.docs[-1]
    r = c.generate(doc, OUTPUT_LEN)
    assert cached_tokens(r["meta_info"])["pool"] == expected_hit(wl.prompt_len, wl.prompt_len, 16)
    assert r["output_ids"] == references[doc.tobytes()]
    # the pool after two servers were stopped and one restarted on it: every page is a clean one
    from audit import assert_pool_clean

    reqs = [(d, OUTPUT_LEN) for d in wl.docs] + [(p[2], OUTPUT_LEN) for p in wl.prompts]
    assert_pool_clean(url, request.getfixturevalue("clean_pool"), c, reqs,
                      [references[ids.tobytes()] for ids, _ in reqs], 16)
    r = other.generate(doc, OUTPUT_LEN)
    assert cached_tokens(r["meta_info"])["total"] == 0, "another model's server read this model's pages"
    assert r["output_ids"] != references[doc.tobytes()], "the other model should compute other tokens"
