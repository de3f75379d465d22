"""MLA models in the vLLM connector without vLLM (kvdirect.vllm.settings / scheduler / worker), on a real
shm pool with torch tensors shaped as vLLM's CPU_MLA KV cache (``[num_blocks, 1, block_size, dim]``):
the "mla" page layout, keys without the TP rank, rank 0 alone writing under TP, and what is refused.
The same code runs inside the real engine in tests/vllm/test_mla.py."""
import dataclasses
import types

import numpy as np
import pytest

from kvdirect import keys as K
from kvdirect.config import CacheConfig
from kvdirect.errors import ConfigError
from kvdirect.stores import open_store
from kvdirect.stores._testing import FlakyStore
from kvdirect.vllm import settings
from kvdirect.vllm.scheduler import SchedulerSide
from kvdirect.vllm.worker import WorkerSide
from test_vllm_sides import (MinOverRanks, block_bytes, pool, pool_has, request, run_step,  # noqa: F401 (fixture)
                             sched_output)

torch = pytest.importorskip("torch")

P, LAYERS, DIM = 16, 2, 24     # DIM: kv_lora_rank + rope_dim (576 in DeepSeek-V2/V3)
NUM_BLOCKS = 32
SPEC = types.SimpleNamespace(num_kv_heads=1, head_size=DIM)
AUTO = types.SimpleNamespace(cache_config=types.SimpleNamespace(cache_dtype="auto"))


def mla_blocks(seed=None):
    """One tensor per layer, as vLLM 0.32's CPU_MLA allocates it: [num_blocks, 1, block_size, dim]."""
    g = torch.Generator().manual_seed(seed or 0)
    return [torch.randn(NUM_BLOCKS, 1, P, DIM, generator=g) if seed is not None
            else torch.zeros(NUM_BLOCKS, 1, P, DIM) for _ in range(LAYERS)]


def mla_worker(url, tensors, rank=0, tp=1, agree=None, store=None, model="m"):
    """A worker as KVDirectConnector.register_kv_caches builds it for an MLA model."""
    layout = settings.mla_layout(AUTO, SPEC, tensors, backend="CPU_MLA", num_blocks=NUM_BLOCKS, block_size=P)
    fp = K.LayoutFingerprint.from_layout(layout, model=model, tp_rank=rank, tp_size=tp)
    w = WorkerSide(CacheConfig(model=model, store=url), store or open_store(url), layout,
                   [f"l{i}" for i in range(LAYERS)], fp, rank=rank, agree=agree, writes=not fp.is_mla or rank == 0)
    return w, fp


def scheduler(url, fps, store=None):
    s = SchedulerSide(CacheConfig(model="m", store=url), P, store or open_store(url), tp_size=len(fps))
    s.set_fingerprints({r: {f.name: getattr(fp, f.name) for f in dataclasses.fields(fp)} for r, fp in enumerate(fps)})
    return s


def keys_of(fp, toks, pages):
    return [fp.page_keys(toks)[i] for i in pages]


def latent(tensors, block) -> bytes:
    """The bytes of block ``block`` in every layer, as the "mla" page object holds them."""
    return block_bytes([t[:, 0] for t in tensors], block)


def pool_objects(url) -> int:
    st = open_store(url)
    try:
        return int(st.stats()["objects"])
    finally:
        st.close()


# ---- layout and keys -----------------------------------------------------------------------------

def test_mla_layout_is_the_mla_page_format():
    ts = mla_blocks(1)
    lay = settings.mla_layout(AUTO, SPEC, ts, backend="CPU_MLA", num_blocks=NUM_BLOCKS, block_size=P)
    assert lay.is_mla and lay.object_format == "mla" and lay.kind == "mla"
    assert lay.num_layers == LAYERS and lay.segments_per_page == LAYERS  # one latent segment per layer
    assert lay.page_bytes == LAYERS * P * DIM * 4
    sc = lay.plan(np.array([5 * P]))
    assert list(sc.addrs[0] - np.array([t.data_ptr() for t in ts], dtype=np.uint64)) == [5 * P * DIM * 4] * LAYERS
    # the 3-D form ([num_blocks, block_size, dim]) is the same bytes
    lay3 = settings.mla_layout(AUTO, SPEC, [t[:, 0] for t in ts], backend="CPU_MLA", num_blocks=NUM_BLOCKS,
                               block_size=P)
    assert lay3.fingerprint_fields() == lay.fingerprint_fields()


@pytest.mark.parametrize("backend, tensors, words", [
    ("FLASHMLA", None, "FLASHMLA attention backend"),
    ("CPU_MLA", [torch.zeros(NUM_BLOCKS, 2, P, DIM)] * LAYERS, "expected [num_blocks, (1,) block_size"),
    ("CPU_MLA", [torch.zeros(NUM_BLOCKS, 1, P, DIM + 8)] * LAYERS, "expected [num_blocks, (1,) block_size"),
])
def test_mla_layouts_the_connector_cannot_move_are_refused(backend, tensors, words):
    with pytest.raises(ConfigError) as e:
        settings.mla_layout(AUTO, SPEC, tensors or mla_blocks(), backend=backend, num_blocks=NUM_BLOCKS, block_size=P)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_mla_keys_have_no_rank_and_never_match_mha_pages():
    ts = mla_blocks()
    lay = settings.mla_layout(AUTO, SPEC, ts, backend="CPU_MLA", num_blocks=NUM_BLOCKS, block_size=P)
    fps = [K.LayoutFingerprint.from_layout(lay, model="m", tp_rank=r, tp_size=n) for n in (1, 2, 4) for r in range(n)]
    assert len({fp.key_prefix for fp in fps}) == 1, "an MLA page's key must not depend on the TP position"
    assert fps[0].layout_kind == "mla" and b'"layout_kind":"mla"' in fps[0].canonical()
    assert b'"tp_rank":null' in fps[0].canonical()
    # same model, same page size: an MHA (vLLM CPU blocks) page never shares a key with an MLA page
    mha = settings.blocks_layout(AUTO, types.SimpleNamespace(num_kv_heads=1, head_size=DIM // 2),
                                 [torch.zeros(NUM_BLOCKS, 1, P, DIM) for _ in range(LAYERS)], num_blocks=NUM_BLOCKS,
                                 block_size=P, object_format="vllm/CPU_ATTN/vec/auto/1x16x24", block_dim=0)
    assert mha.page_bytes == lay.page_bytes  # the same size: only the fingerprint tells them apart
    assert K.LayoutFingerprint.from_layout(mha, model="m").key_prefix != fps[0].key_prefix
    # another model (its identity), or another dtype: other keys
    assert K.LayoutFingerprint.from_layout(lay, model="m2").key_prefix != fps[0].key_prefix
    lay16 = settings.mla_layout(AUTO, SPEC, [t.half() for t in ts], backend="CPU_MLA", num_blocks=NUM_BLOCKS,
                                block_size=P)
    assert K.LayoutFingerprint.from_layout(lay16, model="m").key_prefix != fps[0].key_prefix


# ---- what is refused -----------------------------------------------------------------------------

def _vc(cache_dtype="auto"):
    return types.SimpleNamespace(parallel_config=types.SimpleNamespace(pipeline_parallel_size=1),
                                 speculative_config=None, model_config=types.SimpleNamespace(),
                                 cache_config=types.SimpleNamespace(cache_dtype=cache_dtype))


def _spec(name="MLAAttentionSpec", **fields):
    base = dict(sliding_window=None, kv_quant_mode="KVQuantMode.NONE", model_version=None,
                cache_role="SparseCacheRole.SPARSE", is_index_group_leader=False, cache_dtype_str="auto",
                state_content_bytes=None, tokens_per_state=1)
    return type(name, (), {**base, **fields})()


def _groups(*specs):
    return types.SimpleNamespace(kv_cache_groups=[types.SimpleNamespace(kv_cache_spec=s) for s in specs])


def test_dense_mla_is_accepted():
    settings.check_supported(_vc(), _groups(_spec()))
    assert settings.is_mla(_spec()) and not settings.is_mla(_spec("FullAttentionSpec"))


@pytest.mark.parametrize("vc, groups, words", [
    (_vc("fp8"), _groups(_spec()), "quantized MLA KV caches (kv_cache_dtype=fp8"),
    (_vc(), _groups(_spec(cache_dtype_str="fp8_ds_mla", state_content_bytes=656)), "quantized MLA KV caches"),
    (_vc(), _groups(_spec(model_version="deepseek_v4")), "deepseek_v4 models"),
    (_vc(), _groups(_spec(cache_role="SparseCacheRole.INDEXER")), "indexer cache"),
    (_vc(), _groups(_spec(is_index_group_leader=True)), "indexer cache"),
    (_vc(), _groups(_spec(), _spec(cache_role="SparseCacheRole.INDEXER")), "2 KV cache groups"),
    (_vc(), _groups(_spec("SlidingWindowMLASpec")), "SlidingWindowMLASpec"),
    (_vc(), _groups(_spec("HiddenStateCacheSpec")), "HiddenStateCacheSpec"),
    (_vc(), _groups(_spec(tokens_per_state=4)), "4 tokens per state"),
])
def test_mla_caches_the_pages_cannot_hold_are_refused(vc, groups, words):
    with pytest.raises(ConfigError) as e:
        settings.check_supported(vc, groups)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and "drop --kv-transfer-config" in msg, msg


# ---- TP: rank 0 writes, every rank loads ---------------------------------------------------------

def write_doc_tp2(url, toks, blocks):
    """A TP2 instance prefills a document: rank 0 alone puts its pages; both ranks release the request."""
    src = mla_blocks(7)  # the latent is the same on every rank
    agree = MinOverRanks(2)
    (w0, fp0), (w1, fp1) = (mla_worker(url, [t.clone() for t in src], rank=r, tp=2, agree=agree.fn(r))
                            for r in range(2))
    s = scheduler(url, [fp0, fp1])
    assert s.writers == [0]
    req = request("a", toks)
    assert s.num_new_matched_tokens(req, 0) == 0
    s.after_alloc(req, [], 0)
    plan, _, finished = run_step(s, [w0, w1], sched_output(new=[("a", 0, len(toks))], blocks={"a": blocks}))
    assert [len(r) for r in plan.saves] == [len(toks) // P]
    assert s.request_finished(req)  # saves planned: vLLM holds the blocks
    plan, _, finished = run_step(s, [w0, w1], sched_output())
    assert plan.held == {"a"} and finished == {"a"}, "every rank must report the held request finished"
    assert s.stats["saved_pages_acked"] == len(toks) // P and not s._reqs
    assert w0.stats["stored_pages"] == len(toks) // P
    assert not w1.recent_saves and w1.stats["stored_pages"] == 0, "rank 1 must not put (or check) MLA pages"
    for w in (w0, w1):
        w.close()
    return src, fp0


def test_tp2_rank0_alone_writes_and_every_rank_and_a_tp1_instance_load(pool):
    toks = np.arange(100, 100 + 4 * P + 5).tolist()
    src, fp = write_doc_tp2(pool, toks, [3, 4, 5, 6, 7])
    assert pool_objects(pool) == 4, "one object per MLA page, not one per rank"
    assert pool_has(pool, keys_of(fp, toks, range(4))) == [True] * 4
    for b, page in zip([3, 4, 5, 6], range(4)):
        st = open_store(pool)
        try:
            assert st.get_bytes(keys_of(fp, toks, [page])[0]) == latent(src, b)
        finally:
            st.close()

    # a TP2 reader: one exists key per page, both ranks load it
    agree = MinOverRanks(2)
    dst = [mla_blocks() for _ in range(2)]
    readers = [mla_worker(pool, dst[r], rank=r, tp=2, agree=agree.fn(r)) for r in range(2)]
    s = scheduler(pool, [fp for _, fp in readers])
    req = request("b", toks)
    assert s.num_new_matched_tokens(req, 0) == 4 * P
    assert s.stats["query_keys"] == 4  # not one per rank
    blocks = [10, 11, 12, 13, 14]
    s.after_alloc(req, blocks, 4 * P)
    _, errors, _ = run_step(s, [w for w, _ in readers], sched_output(new=[("b", 4 * P, 5)], blocks={"b": blocks}))
    assert errors == [set(), set()]
    for (w, _), ts in zip(readers, dst):
        assert [latent(ts, b) for b in blocks[:4]] == [latent(src, b) for b in [3, 4, 5, 6]]
        w.close()

    # a TP1 reader of the same model hits the TP2 writer's pages
    w1, fp1 = mla_worker(pool, mla_blocks())
    assert fp1.key_prefix == fp.key_prefix
    assert scheduler(pool, [fp1]).num_new_matched_tokens(request("c", toks), 0) == 4 * P
    w1.close()


def test_tp2_an_ack_from_rank_1_alone_does_not_make_an_mla_page_stored(pool):
    """The scheduler takes rank 0's acknowledgement as the page's; a (stray) rank-1 ack is not one."""
    from kvdirect.vllm.plan import SaveAck, WorkerReport

    toks = np.arange(400, 400 + 2 * P + 1).tolist()
    fps = [mla_worker(pool, mla_blocks(), rank=r, tp=2)[1] for r in range(2)]
    s = scheduler(pool, fps)
    req = request("a", toks)
    s.num_new_matched_tokens(req, 0)
    s.after_alloc(req, [], 0)
    s.build_step(sched_output(new=[("a", 0, len(toks))], blocks={"a": [0, 1, 2]}))
    s.on_worker_output(WorkerReport(acks=[SaveAck(1, "a", 0, np.ones(2, bool))]), None)
    assert s.stats["saved_pages_acked"] == 0
    s.on_worker_output(WorkerReport(acks=[SaveAck(0, "a", 0, np.array([True, False]))]), None)
    assert s.stats["saved_pages_acked"] == 1


def test_tp2_a_failed_load_on_rank_1_keeps_rank_0_from_writing_pages_computed_on_it(pool):
    """Rank 1 never writes MLA pages but still takes part in the agreement on failed loads: a page
    rank 0 computes on top of rank 1's failed load read rank 1's garbage through the all-reduce."""
    N = 5 * P + 3
    toks = np.arange(300, 300 + N).tolist()
    _, fp = write_doc_tp2(pool, toks[: 3 * P], [0, 1, 2])
    agree = MinOverRanks(2)
    w0, fp0 = mla_worker(pool, mla_blocks(9), rank=0, tp=2, agree=agree.fn(0))
    w1, fp1 = mla_worker(pool, mla_blocks(9), rank=1, tp=2, agree=agree.fn(1),
                         store=FlakyStore(open_store(pool), fail_rate=1.0, fail_ops=("get",)))
    s = scheduler(pool, [fp0, fp1])
    req = request("b", toks)
    assert s.num_new_matched_tokens(req, 0) == 3 * P
    blocks = list(range(20, 26))
    s.after_alloc(req, blocks, 3 * P)
    _, errors, _ = run_step(s, [w0, w1], sched_output(new=[("b", 3 * P, N - 3 * P)], blocks={"b": blocks}))
    assert errors == [{20, 21, 22}, {20, 21, 22}]  # rank 0 loaded fine and still reports them
    assert pool_has(pool, keys_of(fp, toks, [3, 4])) == [False, False]
    assert w0.stats["save_withheld_pages"] == 2
    for w in (w0, w1):
        w.close()
