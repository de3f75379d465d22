"""kvdirect's linker behind SGLang's own radix tree, in real SGLang servers.

``--enable-unified-cache-external-linker --unified-cache-external-linker-backend dynamic``
with ``kvdirect.sglang.linker.KVDirectLinker`` (no SGLang patch):

* two servers share pages (embedded shm pool; Mooncake): server B's first request for a
  prompt hits exactly the shared whole pages, its greedy outputs equal the references
  and its logprobs equal those of server A, which computed the prefix and reads it from
  its device (the loaded bytes are the computed ones);
* the shm pool outlives the servers: a restarted linker server hits on its first
  request, so does a ``--radix-cache-backend kvdirect`` server (the same page keys),
  and a server of another model hits nothing;
* faults (a test-only hook, ``faults/sitecustomize.py``, fails one load at once or after
  layer 0 arrived and was used): the request of that load is aborted, the next request
  and the retry are correct, and afterwards the pool equals a clean run's: every object
  the test could have written, byte for byte, and the object count;
* memory pressure: a device KV pool far smaller than the work, chunked prefill and 16
  concurrent requests; loads evict as they go, outputs stay right, nothing leaks.
"""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import HERE, expected_hit, wait_pool_objects
from kvdirect.demo.sglang_cpu import client
from kvdirect.demo.sglang_cpu.client import cached_tokens
from test_pressure import assert_idle_and_flushable
from test_shared_pool import kv_config, serve_documents
from workload import OUTPUT_LEN, Workload

FAULTS = HERE / "faults"
PAGE = 16


def linker_args(url: str, **extra) -> list[str]:
    cfg = {"linker": "KVDirectLinker", "linker_module_path": "kvdirect.sglang.linker",
           "linker_extra_config": {"store": url, "allow_no_store": False, **extra}}
    return ["--enable-unified-cache-external-linker", "--unified-cache-external-linker-backend", "dynamic",
            "--unified-cache-external-linker-config", json.dumps(cfg), "--log-level", "info"]


def linker(url: str, name: str, *, args=(), **kw) -> dict:
    """A server spec: SGLang's own tree with kvdirect's linker on ``url``."""
    return dict(radix="sglang", page_size=PAGE, name=name, args=linker_args(url) + list(args), **kw)


def key_prefix(server) -> str:
    m = re.search(r"kvdirect linker: .* key prefix (kvd1/[0-9a-f]{16}/)", server.log_text())
    assert m, f"no kvdirect linker line in the log of {server.name}:\n{server.log_tail()}"
    return m.group(1)


def check_first_requests(server, wl: Workload, references, device_ref=None) -> int:
    """B's first request per prompt: exact whole-page pool hits and reference outputs; with
    ``device_ref`` (server A, which computed the documents and holds them on its device),
    logprobs equal to A's for the same prompt (A then reads the shared prefix from its device)."""
    pool = 0
    for reuse, shared, ids in wl.prompts:
        r = client.generate(server.url, ids, OUTPUT_LEN, logprobs=True)
        hit = cached_tokens(r["meta_info"])
        want = expected_hit(shared, wl.prompt_len, PAGE)
        assert r["output_ids"] == references[ids.tobytes()], f"output differs at reuse {reuse}"
        assert (hit["pool"], hit["device"]) == (want, 0), f"reuse {reuse}: want {want} pool tokens, got {hit}"
        if device_ref is not None and shared:
            ref = client.generate(device_ref.url, ids, OUTPUT_LEN, logprobs=True)
            assert cached_tokens(ref["meta_info"])["device"] == want
            assert r["logprobs"] == ref["logprobs"], \
                f"reuse {reuse}: logprobs after a pool load differ from the prefix-on-device ones"
        pool += hit["pool"]
    return pool


def test_two_servers_share_pages_then_the_pool_outlives_them(farm, pools, references, other_model_dir):
    wl = Workload(per_level=4)
    url = pools.new()
    a, b = farm.start_all([linker(url, "linker-A"), linker(url, "linker-B")])
    serve_documents(a, wl, references)
    pages = len(wl.docs) * (wl.prompt_len // PAGE)
    assert wait_pool_objects(url, pages) >= pages, f"server A's pages did not reach the pool:\n{a.log_tail(30)}"
    # each prompt goes to B first (its first request: a pool hit), then to A (a device hit)
    assert check_first_requests(b, wl, references, device_ref=a) > 0
    assert key_prefix(a) == key_prefix(b)

    # the pool outlives both servers; the radix backend names pages the same way
    farm.stop_all()
    c, radix, other = farm.start_all([
        linker(url, "linker-C-restart"),
        dict(page_size=PAGE, kvdirect_config=kv_config(url), name="radix-backend"),
        linker(url, "linker-other-model", model=other_model_dir)])
    for s, doc in ((c, wl.docs[-1]), (radix, wl.docs[-2])):
        r = s.generate(doc, OUTPUT_LEN)
        assert cached_tokens(r["meta_info"])["pool"] == expected_hit(wl.prompt_len, wl.prompt_len, PAGE), s.name
        assert r["output_ids"] == references[doc.tobytes()]
    r = other.generate(wl.docs[-3], OUTPUT_LEN)
    assert cached_tokens(r["meta_info"])["total"] == 0, "another model's server read this model's pages"
    assert key_prefix(other) != key_prefix(c)


@pytest.mark.mooncake
def test_two_servers_over_mooncake(farm, references):
    from kvdirect.services import mooncake_store_url, start_mooncake_master
    from test_mooncake import PUT_TIMEOUT_S, wait_keys

    wl = Workload(per_level=4)
    with start_mooncake_master() as master:
        url = mooncake_store_url("127.0.0.1", master.ports["rpc"], master.ports["http"], segment="64MiB",
                                 buffer="32MiB", timeout=PUT_TIMEOUT_S)
        a, b = farm.start_all([linker(url, "linker-A-mooncake"), linker(url, "linker-B-mooncake")])
        serve_documents(a, wl, references)
        pages = len(wl.docs) * (wl.prompt_len // PAGE)
        metrics = f"http://127.0.0.1:{master.ports['metrics']}/metrics"
        assert wait_keys(metrics, pages) >= pages, f"server A's pages did not reach Mooncake:\n{a.log_tail(30)}"
        assert check_first_requests(b, wl, references) > 0
        farm.stop_all()


# ---- faults ----------------------------------------------------------------------------
def abort_message(server, ids) -> str:
    """The error of a request that must be aborted (an error chunk, or an abort finish)."""
    try:
        r = server.generate(ids, OUTPUT_LEN)
    except RuntimeError as e:
        return str(e)
    reason = r["meta_info"].get("finish_reason") or {}
    assert reason.get("type") == "abort", f"the request was served: {r['meta_info']}"
    return str(reason.get("message"))


def run_with_faults(server, wl: Workload, references, url: str, control: Path | None) -> list[str]:
    """Documents, then (device cache flushed: every hit comes from the pool) the prompts; with
    ``control``, the first 100% prompt's load fails at once and the first 50% prompt's after
    layer 0 was used. Returns what happened to each request."""
    serve_documents(server, wl, references)
    pages = len(wl.docs) * (wl.prompt_len // PAGE)
    assert wait_pool_objects(url, pages) >= pages
    assert client.post(server.url, "/flush_cache")[0] == 200
    faults = {} if control is None else {1.0: "get 0", 0.5: "get 1"}
    events = []
    for reuse, shared, ids in wl.prompts:
        spec = faults.pop(reuse, None)
        if spec is not None:
            control.write_text(spec)
            why = abort_message(server, ids)
            assert "External KV cache load failed" in why, why
            assert not control.exists(), "the fault hook did not see the load"
            events.append(f"aborted {reuse}")
        r = server.generate(ids, OUTPUT_LEN)  # the retry (or the only request)
        assert r["output_ids"] == references[ids.tobytes()], f"wrong output at reuse {reuse} ({events})"
        assert cached_tokens(r["meta_info"])["pool"] == expected_hit(shared, wl.prompt_len, PAGE)
        events.append(f"ok {reuse}")
    return events


def pool_objects(url: str, prefix: str, seqs) -> dict[str, bytes]:
    """Every object the test could have written (each full page of each sequence): key -> bytes."""
    from kvdirect import keys as K
    from kvdirect.stores import open_store

    out = {}
    with open_store(url) as s:
        for ids in seqs:
            for h in K.page_hashes(np.asarray(ids, np.int64), PAGE):
                data = s.get_bytes(prefix + h)
                if data is not None:
                    out[prefix + h] = data
        out["#objects"] = s.stats()["objects"]
    return out


def test_failed_loads_abort_only_their_requests_and_leave_the_pool_as_a_clean_run(farm, pools, references,
                                                                                     workdir):
    wl = Workload(per_level=3)
    control = workdir / "fault-control"
    clean_url, fault_url = pools.new(), pools.new()
    clean, faulty = farm.start_all([
        linker(clean_url, "linker-clean"),
        linker(fault_url, "linker-faults", env={"KVDIRECT_TEST_FAULT_CONTROL": str(control)}, more_path=[FAULTS])])
    events = run_with_faults(faulty, wl, references, fault_url, control)
    assert events.count("aborted 1.0") == 1 and events.count("aborted 0.5") == 1, events
    run_with_faults(clean, wl, references, clean_url, None)
    time.sleep(2)  # write-backs of the last requests
    seqs = [*wl.docs, *(p[2] for p in wl.prompts)]
    got, want = pool_objects(fault_url, key_prefix(faulty), seqs), pool_objects(clean_url, key_prefix(clean), seqs)
    assert got.keys() == want.keys(), f"objects only in one pool: {sorted(set(got) ^ set(want))[:4]}"
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"{len(differ)} objects differ from the clean run's"
    assert_idle_and_flushable(faulty)


def test_memory_pressure_chunked_concurrent(farm, pools, references):
    wl = Workload()
    url = pools.new()
    # 1024 tokens of device KV for 256-token prompts: loads evict all the time
    s = farm.start(**linker(url, "linker-pressure", max_total_tokens=1024,
                            args=["--chunked-prefill-size", "96", "--max-running-requests", "8"]))
    for doc, r in zip(wl.docs, s.generate_many(wl.docs, OUTPUT_LEN)):
        assert r["output_ids"] == references[doc.tobytes()]
    pages = len(wl.docs) * (wl.prompt_len // PAGE)
    assert wait_pool_objects(url, pages) >= pages
    back = s.generate_many(wl.docs, OUTPUT_LEN)  # mostly evicted from the device: loaded back
    assert sum(cached_tokens(r["meta_info"])["pool"] for r in back) > 0
    for doc, r in zip(wl.docs, back):
        assert r["output_ids"] == references[doc.tobytes()]
    order = np.random.default_rng(5).permutation(len(wl.prompts))[:16]
    prompts = [wl.prompts[i][2] for i in order]
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(lambda ids: client.generate(s.url, ids, OUTPUT_LEN), prompts))
    for ids, r in zip(prompts, results):
        assert r["output_ids"] == references[ids.tobytes()], "wrong output under concurrency"
    assert_idle_and_flushable(s)
