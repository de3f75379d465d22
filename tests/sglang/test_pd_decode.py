"""kvdirect on an SGLang PD *decode* node (``--disaggregation-mode decode
--disaggregation-decode-enable-radix-cache``), through SGLang 0.5.23's own decode classes.

On a decode node SGLang matches each arriving request against the radix cache
(``DecodePreallocQueue._match_prefix_and_lock``) and promises the matched prefix to
the prefill node (``decode_prefix_len`` = device + host + storage hits), which then
sends only the KV after it. Host and storage hits are filled by HiCache's load-back
only, which kvdirect replaces: a pool hit reported there would leave the request's
row pointing at slots nobody filled. So a decode node is *offload only*: it reports
device hits, never pool hits, and writes the prompt and generated pages back to
the pool when a request finishes (the reference design's "decode node offload"),
for prefill nodes and later requests to load.

The queue is SGLang's real ``DecodePreallocQueue``; only its transfer backend
(``kv_manager``, bootstrap) is not built: the test calls the methods
``pop_preallocated`` calls for one request (match and lock, ``_pre_alloc``) and
plays the prefill node's part (the KV of the positions it is asked for) itself.
"""
from __future__ import annotations

from array import array
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from driver import MODEL, Engine, server_args
from sglang.srt.disaggregation.decode import DecodePreallocQueue
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
from sglang.srt.mem_cache.common import release_kv_cache
from sglang.srt.mem_cache.registry import create_tree_cache
from sglang.srt.runtime_context import get_context
from sglang.srt.sampling.sampling_params import SamplingParams

import kvdirect.sglang as plugin


@pytest.fixture
def decode_args():
    """ServerArgs of a decode node with the decode radix cache, published as SGLang's
    scheduler publishes them (the decode classes read get_disagg())."""
    from sglang.srt.server_args import ServerArgs

    sa = ServerArgs(model_path=MODEL, device="cpu", radix_cache_backend="kvdirect", disaggregation_mode="decode",
                    disaggregation_decode_enable_radix_cache=True, disaggregation_transfer_backend="mooncake")
    get_context().set_server_args(sa)
    yield sa
    get_context().set_server_args(server_args())


def decode_queue(engine: Engine) -> DecodePreallocQueue:
    """SGLang's decode pre-allocation queue over the engine's pools and tree cache
    (everything its match and pre-allocation read; no transfer backend)."""
    q = DecodePreallocQueue.__new__(DecodePreallocQueue)
    q.req_to_token_pool = engine.req_to_token_pool
    q.token_to_kv_pool_allocator = engine.allocator
    q.token_to_kv_pool = engine.kvpool
    q.tree_cache = engine.cache
    q.scheduler = SimpleNamespace(enable_decode_hicache=False, enable_hisparse=False,
                                  tp_worker=SimpleNamespace(is_hybrid_swa=False))
    return q


def extend_row(engine: Engine, req: Req, cur: int, k: int) -> torch.Tensor:
    """Slots for ``k`` more tokens of the request's row (what decode steps allocate)."""
    a = engine.allocator
    row = engine.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
    if a.page_size == 1:
        new = a.alloc(k)
    else:
        new = a.alloc_extend(prefix_lens=torch.tensor([cur]), prefix_lens_cpu=torch.tensor([cur]),
                             seq_lens=torch.tensor([cur + k]), seq_lens_cpu=torch.tensor([cur + k]),
                             last_loc=row[cur - 1:cur].to(torch.int64), extend_num_tokens=k)
    engine.req_to_token_pool.write((req.kv.req_pool_idx, slice(cur, cur + k)), new.to(torch.int32))
    return new


def reference_kv(P: int, tokens: np.ndarray) -> list:
    ref = Engine(P)
    slots = torch.arange(ref.page_size, ref.page_size + len(tokens))
    ref.compute(tokens, slots, 0)
    return ref.kv_at(slots)


@pytest.mark.parametrize("P", [1, 4])
def test_decode_node_promises_only_device_kv_and_offloads(pool_url, decode_args, P):
    plugin.register()
    rng = np.random.default_rng(11)
    doc = rng.integers(1, 30000, 6 * P + 1)
    # a prefill-capable server has already written the document's KV to the pool
    a = Engine(P)
    a.cache = create_tree_cache(a.context())
    a.serve(doc)
    a.cache.kv.flush()
    assert a.cache.kv.stats()["stored_pages"] == len(doc) // P

    d = Engine(P)
    d.cache = create_tree_cache(d.context(server_args=decode_args))
    q = decode_queue(d)
    req = Req("pd-0", "", array("q", doc.tolist()), SamplingParams(max_new_tokens=4))
    match = q._match_prefix_and_lock(req)              # SGLang's decode-side match
    total = match.decode_prefix_len                    # the prefix promised to the prefill node
    q._pre_alloc(req, match.prefix_indices, match.l1_prefix_len, total)
    req.kv.cache_protected_len = total
    row = d.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
    # the prefill node sends the KV of every position after the promised prefix
    n = len(doc)
    d.compute(doc, row[:n].to(torch.int64), total)
    got = d.kv_at(row[:n].to(torch.int64))
    for g, w in zip(got, reference_kv(P, doc)):
        assert torch.equal(g, w), (f"the decode node's row holds wrong KV: {total} tokens were promised to the "
                                   f"prefill node ({match.l1_prefix_len} on device), nothing filled the rest")
    assert total == match.l1_prefix_len == 0  # the pool's pages are not this node's to promise

    # decode: 5 more tokens, then the request finishes; prompt + generated pages go to the pool
    gen = rng.integers(1, 30000, 6)
    seq = np.concatenate([doc, gen])
    extend_row(d, req, n, 5)
    d.compute(seq[:n + 5], row[:n + 5].to(torch.int64), n)
    req.output_ids = gen.tolist()
    req.kv.kv_committed_len = req.kv.kv_allocated_len = n + 5  # the last token's KV is not written yet
    req.finished_reason = FINISH_LENGTH(length=len(gen))
    release_kv_cache(req, d.cache, checkpoint=True)
    d.cache.kv.flush()
    assert d.cache.kv.stats()["stored_pages"] == (n + 5) // P - len(doc) // P  # the document's were there

    # the same prompt again on the decode node: a device hit, promised and correct
    req2 = Req("pd-1", "", array("q", doc.tolist()), SamplingParams(max_new_tokens=4))
    m2 = q._match_prefix_and_lock(req2)
    assert m2.decode_prefix_len == m2.l1_prefix_len == len(doc) // P * P
    q._pre_alloc(req2, m2.prefix_indices, m2.l1_prefix_len, m2.decode_prefix_len)
    row2 = d.req_to_token_pool.req_to_token[req2.kv.req_pool_idx]
    d.compute(doc, row2[:n].to(torch.int64), m2.decode_prefix_len)
    for g, w in zip(d.kv_at(row2[:n].to(torch.int64)), reference_kv(P, doc)):
        assert torch.equal(g, w)

    # a later request (any node) loads what the decode node wrote, byte for byte
    c = Engine(P)
    c.cache = create_tree_cache(c.context())
    follow = np.concatenate([seq, rng.integers(1, 30000, 3)])
    r = c.serve(follow)
    assert r["host_hit"] == (n + 5) // P * P and r["loaded"] == r["host_hit"]
    for g, w in zip(r["kv"], reference_kv(P, follow)):
        assert torch.equal(g, w)
    for e in (a, c, d):
        e.cache.shutdown()
