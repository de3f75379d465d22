"""The vLLM connector's scheduler and worker logic without vLLM (kvdirect.vllm.scheduler / .worker /
.settings), on a real shm pool with torch tensors standing in for vLLM's CPU KV blocks.
The same code runs inside the real engine in tests/vllm/."""
import types
import uuid

import numpy as np
import pytest

from kvdirect.config import CacheConfig
from kvdirect.errors import ConfigError, KVDirectError
from kvdirect.layout import KVLayout
from kvdirect.stores import open_store
from kvdirect.stores._testing import FlakyStore
from kvdirect.stores.shm import destroy_pool
from kvdirect.vllm import settings
from kvdirect.vllm.plan import StepPlan
from kvdirect.vllm.scheduler import SchedulerSide
from kvdirect.vllm.worker import WorkerSide

torch = pytest.importorskip("torch")

P, LAYERS, HEADS, HEAD = 16, 3, 2, 8
NUM_BLOCKS = 64


class Counting:
    """Counts store calls (the scheduler must ask at most once per request)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        if name in ("exists", "get", "put"):
            def wrapped(*a, **k):
                self.calls.append(name)
                return fn(*a, **k)
            return wrapped
        return fn


@pytest.fixture
def pool():
    name = f"kvd-vs-{uuid.uuid4().hex[:8]}"
    url = f"shm://{name}?size=64MiB"
    yield url
    destroy_pool(name, missing_ok=True)


def request(rid, toks, **kw):
    return types.SimpleNamespace(request_id=rid, prompt_token_ids=list(toks), num_tokens=len(toks), mm_features=[],
                                 lora_request=kw.get("lora"), cache_salt=kw.get("salt"), prompt_embeds=None)


def kv_blocks(seed=None):
    g = torch.Generator().manual_seed(seed or 0)
    return [torch.randn(NUM_BLOCKS, HEADS, P, 2 * HEAD, generator=g) if seed is not None
            else torch.zeros(NUM_BLOCKS, HEADS, P, 2 * HEAD) for _ in range(LAYERS)]


def worker(url, tensors, cfg=None, store=None, layout=None, rank=0, tp=1, agree=None):
    cfg = cfg or CacheConfig(model="m", store=url)
    layout = layout or KVLayout.from_blocks(tensors, num_blocks=NUM_BLOCKS, page_size=P,
                                            object_format="test/blocks", kv_heads=HEADS, head_dim=HEAD)
    from kvdirect import keys as K

    fp = K.LayoutFingerprint.from_layout(layout, model=cfg.model, tp_rank=rank, tp_size=tp)
    return WorkerSide(cfg, store or open_store(url), layout, [f"l{i}" for i in range(LAYERS)], fp, rank=rank,
                      agree=agree), fp


def scheduler(url, fp, store=None, **cfg):
    """The scheduler side; ``fp``: one fingerprint, or a list (one per TP rank)."""
    import dataclasses

    fps = fp if isinstance(fp, list) else [fp]
    s = SchedulerSide(CacheConfig(model="m", store=url, **cfg), P, store or open_store(url), tp_size=len(fps))
    s.set_fingerprints({r: {f.name: getattr(f_, f.name) for f in dataclasses.fields(f_)} for r, f_ in enumerate(fps)})
    return s


def run_step(s, workers, so, forward=None):
    """One vLLM engine step as the connector drives it: plan, loads before the forward, the
    forward (``forward(worker)`` writes the KV of the computed tokens), then loads settled and
    saves submitted, load errors and finished requests taken, the report back to the scheduler.
    Workers of several TP ranks run on threads (their ``agree`` is a collective).
    Returns (plan, load errors per rank, finished per rank)."""
    import threading

    plan = s.build_step(so)
    ws = workers if isinstance(workers, list) else [workers]
    out = [None] * len(ws)

    def one(i, w):
        w.hold(plan.held)
        w.handle_preemptions(plan.preempted)
        w.start_load(plan)
        if forward is not None:
            forward(w)
        w.finish_loads()
        w.submit_saves(plan)
        out[i] = (w.take_load_errors(), w.get_finished())

    threads = [threading.Thread(target=one, args=(i, w)) for i, w in enumerate(ws)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in ws:
        w.flush()
    reports = [w.take_report() for w in ws]
    report = None
    for r in reports:
        report = r if report is None else (report.merge(r) if r else report)
    finished = set.intersection(*[set(f) for _, f in out])
    s.on_worker_output(report, finished)
    return plan, [e for e, _ in out], finished


class MinOverRanks:
    """``agree`` for worker threads standing in for TP ranks: the elementwise minimum."""

    def __init__(self, n):
        import threading

        self.n, self.barrier, self.vals = n, threading.Barrier(n), {}

    def fn(self, rank):
        def agree(x):
            self.vals[rank] = np.asarray(x)
            self.barrier.wait()
            out = np.minimum.reduce([self.vals[r] for r in range(self.n)])
            self.barrier.wait()
            return out
        return agree


def pool_has(url, keys) -> list[bool]:
    st = open_store(url)
    try:
        return [bool(x) for x in st.exists(keys)]
    finally:
        st.close()


def pool_page(url, key):
    st = open_store(url)
    try:
        return st.get_bytes(key)
    finally:
        st.close()


def block_bytes(tensors, block) -> bytes:
    return b"".join(t[block].contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in tensors)


def sched_output(new=(), cached=(), blocks=None):
    """new/cached: (req_id, num_computed_before, num_scheduled)."""
    blocks = blocks or {}
    return types.SimpleNamespace(
        num_scheduled_tokens={r: n for r, _, n in (*new, *cached)},
        scheduled_new_reqs=[types.SimpleNamespace(req_id=r, num_computed_tokens=c) for r, c, _ in new],
        scheduled_cached_reqs=types.SimpleNamespace(req_ids=[r for r, _, _ in cached],
                                                    num_computed_tokens=[c for _, c, _ in cached]),
        kv_connector_block_state=types.SimpleNamespace(get_block_ids=lambda r: (blocks[r],) if r in blocks else None),
        preempted_req_ids=set())


def save_doc(url, toks, blocks, seed=1, tp=1, *, src=None, layout=None, cfg=None, **req_kw):
    """Instance A: prefill of a document, its pages saved and acknowledged (on every TP rank)."""
    srcs = [kv_blocks(seed + r) for r in range(tp)] if src is None else ([src] if tp == 1 else list(src))
    ws, fps = zip(*[worker(url, srcs[r], cfg=cfg, layout=layout, rank=r, tp=tp) for r in range(tp)])
    s = scheduler(url, list(fps))
    req = request("a", toks, **req_kw)
    assert s.num_new_matched_tokens(req, 0) == 0
    s.after_alloc(req, [], 0)
    plan, _, finished = run_step(s, list(ws), sched_output(new=[("a", 0, len(toks))], blocks={"a": blocks}))
    assert [len(r) for r in plan.saves] == [len(toks) // P] and not plan.loads
    assert s.request_finished(req)           # saves planned: vLLM must hold the blocks
    plan, _, finished = run_step(s, list(ws), sched_output())
    assert plan.held == {"a"} and finished == {"a"}  # acknowledged: blocks may be freed
    assert s.stats["saved_pages_acked"] == len(toks) // P and not s._reqs
    for w in ws:
        w.close()
    return (srcs[0], fps[0]) if tp == 1 else (srcs, list(fps))


def test_save_then_load_moves_the_same_bytes(pool):
    toks = np.arange(10, 10 + 5 * P + 3).tolist()
    src, fp = save_doc(pool, toks, list(range(5)))
    dst = kv_blocks()
    store = Counting(open_store(pool))
    s = scheduler(pool, fp, store=store)
    req = request("b", toks)
    # the 5 whole pages stored are claimed; asking twice is the same answer
    assert s.num_new_matched_tokens(req, 0) == 5 * P
    assert s.num_new_matched_tokens(req, 0) == 5 * P
    assert store.calls == ["exists"]          # the second ask came from the index
    assert s.num_new_matched_tokens(req, P) == 4 * P  # one page already computed locally
    s.num_new_matched_tokens(req, 0)
    s.after_alloc(req, [40, 41, 42, 43, 44, 45], 5 * P)
    w, _ = worker(pool, dst)
    plan, errors, _ = run_step(s, w, sched_output(new=[("b", 5 * P, 3)], blocks={"b": [40, 41, 42, 43, 44, 45]}))
    assert [(r.first_page, r.block_ids.tolist(), r.recompute_tail) for r in plan.loads] == \
        [(0, [40, 41, 42, 43, 44], False)]
    assert plan.saves == []  # the pages it loaded are in the pool; the partial last one is no page
    assert errors == [set()]
    for layer in range(LAYERS):
        assert torch.equal(dst[layer][40:45], src[layer][0:5])
    w.close()


def test_saves_yield_to_a_running_load_and_count_it(pool, monkeypatch):
    """Loads go first: each write-back chunk waits while a load runs on the worker's transfer
    path (bounded), and the waits reach the connector's stats."""
    from kvdirect.cache import transfer as T

    monkeypatch.setattr(T, "WRITEBACK_CHUNK_BYTES", 1)  # one page per chunk
    toks = np.arange(10, 10 + 5 * P).tolist()
    w, fp = worker(pool, kv_blocks(1))
    w.transfer._t.loads_first.max_wait_s = 0.05  # the load below outlasts the write-back
    s = scheduler(pool, fp)
    req = request("a", toks)
    assert s.num_new_matched_tokens(req, 0) == 0
    s.after_alloc(req, [], 0)
    with w.transfer._t.loads_first.loading():
        plan, _, _ = run_step(s, w, sched_output(new=[("a", 0, len(toks))], blocks={"a": list(range(5))}))
    assert [len(r) for r in plan.saves] == [5]
    assert w.stats["writeback_waits_for_loads"] == 5  # every chunk waited (and then went)
    assert s.request_finished(req)
    run_step(s, w, sched_output())
    assert s.stats["saved_pages_acked"] == 5
    w.close()


def test_last_whole_page_is_claimed_up_to_the_last_token(pool):
    """A prompt of whole pages that are all in the pool: every page is loaded and vLLM recomputes
    only the last token, into the last loaded page (as LMCache claims: 2047 of 2048)."""
    toks = np.arange(30, 30 + 4 * P).tolist()
    src, fp = save_doc(pool, toks, [0, 1, 2, 3])
    s = scheduler(pool, fp)
    req = request("b", toks)
    assert s.num_new_matched_tokens(req, 0) == 4 * P - 1   # not block aligned: vLLM accepts it
    assert s.num_new_matched_tokens(req, 3 * P) == P - 1   # vLLM's own cache held 3 pages
    assert s.num_new_matched_tokens(request("short", toks[:P]), 0) == P - 1
    assert s.num_new_matched_tokens(request("one", toks[:1]), 0) == 0
    s.num_new_matched_tokens(req, 0)
    with pytest.raises(KVDirectError, match="external tokens"):
        s.after_alloc(req, [8, 9, 10, 11], 4 * P)  # a claim beyond the hit is never loaded
    s.num_new_matched_tokens(req, 0)
    s.after_alloc(req, [8, 9, 10, 11], 4 * P - 1)  # blocks rounded up to whole pages
    dst = kv_blocks()
    w, _ = worker(pool, dst)
    plan, errors, _ = run_step(s, w, sched_output(new=[("b", 4 * P - 1, 1)], blocks={"b": [8, 9, 10, 11]}))
    assert [(r.first_page, r.block_ids.tolist(), r.recompute_tail) for r in plan.loads] == \
        [(0, [8, 9, 10, 11], True)]
    assert plan.saves == []  # the last page came from the pool: the forward's rewrite of it is never saved
    assert errors == [set()] and s.stats["hit_tokens"] == 4 * P - 1
    for layer in range(LAYERS):
        assert torch.equal(dst[layer][8:12], src[layer][0:4])
    w.close()


class SlowLayers:
    """A store whose piecewise (layer by layer) reads take ``delay_s`` per layer."""

    def __init__(self, inner, delay_s):
        self.inner, self.delay_s, self.reads = inner, delay_s, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open_read(self, keys, sizes):
        import time

        rd = self.inner.open_read(keys, sizes)
        outer = self

        class Reader:
            status = rd.status

            def read(self, scatter):
                time.sleep(outer.delay_s)
                outer.reads += 1
                rd.read(scatter)

            def end(self):
                return rd.end()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                rd.end()

        return Reader()


def test_layerwise_reads_a_page_the_forward_writes_into_before_the_forward(pool):
    """vLLM's CPU attention writes a layer's new KV before it waits for that layer: the last
    page, whose last token the forward recomputes, is complete before start_load returns."""
    toks = np.arange(60, 60 + 3 * P).tolist()
    src, fp = save_doc(pool, toks, [0, 1, 2])
    s = scheduler(pool, fp)
    req = request("b", toks)
    assert s.num_new_matched_tokens(req, 0) == 3 * P - 1
    s.after_alloc(req, [20, 21, 22], 3 * P - 1)
    dst = kv_blocks()
    slow = SlowLayers(open_store(pool), 0.2)
    w, _ = worker(pool, dst, cfg=CacheConfig(model="m", store=pool, layerwise=True), store=slow)
    plan = s.build_step(sched_output(new=[("b", 3 * P - 1, 1)], blocks={"b": [20, 21, 22]}))
    w.start_load(plan)
    for layer in range(LAYERS):  # before any layer is waited for, the recomputed page is whole
        assert torch.equal(dst[layer][22], src[layer][2])
    assert w._step.layerwise is not None and slow.reads < LAYERS  # the other pages still arrive by layer
    for layer in range(LAYERS):
        w.wait_layer(f"l{layer}")
        assert torch.equal(dst[layer][20:22], src[layer][0:2])
    w.finish_loads()
    assert w.take_load_errors() == set()
    w.close()


def test_failed_get_reports_blocks_from_the_first_failure(pool):
    toks = np.arange(100, 100 + 6 * P + 1).tolist()
    _, fp = save_doc(pool, toks, list(range(6)))
    dst = kv_blocks()
    flaky = FlakyStore(open_store(pool), fail_rate=1.0, fail_ops=("get",))
    w, _ = worker(pool, dst, store=flaky)
    s = scheduler(pool, fp)
    req = request("b", toks)
    assert s.num_new_matched_tokens(req, 0) == 6 * P
    s.after_alloc(req, list(range(20, 27)), 6 * P)
    plan = s.build_step(sched_output(new=[("b", 6 * P, 1)], blocks={"b": list(range(20, 27))}))
    w.start_load(plan)
    assert w.take_load_errors() == {20, 21, 22, 23, 24, 25}
    report = w.take_report()
    assert report.load_failures == [("b", 0)]
    s.on_worker_output(report, None)
    # the failed pages are recomputed by vLLM: the scheduler plans their save again
    plan = s.build_step(sched_output(cached=[("b", 0, 6 * P + 1)], blocks={"b": list(range(20, 27))}))
    assert [(r.first_page, len(r)) for r in plan.saves] == [(0, 6)]
    w.close()


def keys_of(fp, toks, pages):
    from kvdirect import keys as K

    d = K.page_digests(np.asarray(toks[: len(toks) // P * P], dtype=np.int64), P)
    return K.pool_keys(np.ascontiguousarray(d[list(pages)]), fp)


def computed(pages_blocks, value=7.0):
    """A forward that writes the KV of the pages it computes (here: a constant per block)."""
    def forward(w):
        for t in w.layout._refs[0]:
            t[list(pages_blocks)] = value
    return forward


def test_saves_after_a_failed_load_are_withheld(pool):
    """Issue 19.1: pages computed in the step of a failed load (on blocks that were never filled)
    are never saved; they are saved once vLLM recomputed them."""
    N = 5 * P + 3
    toks = np.arange(200, 200 + N).tolist()
    save_doc(pool, toks[: 3 * P], [0, 1, 2])
    dst = kv_blocks(9)  # stale bytes in the blocks
    w, fp = worker(pool, dst, store=FlakyStore(open_store(pool), fail_rate=1.0, fail_ops=("get",)))
    s = scheduler(pool, fp)
    req = request("b", toks)
    assert s.num_new_matched_tokens(req, 0) == 3 * P
    blocks = list(range(20, 26))
    s.after_alloc(req, blocks, 3 * P)
    plan, errors, _ = run_step(s, w, sched_output(new=[("b", 3 * P, N - 3 * P)], blocks={"b": blocks}),
                               forward=computed([23, 24, 25], 7.0))
    assert [(r.first_page, len(r)) for r in plan.saves] == [(3, 2)]  # planned with the load ...
    assert errors == [{20, 21, 22}]
    assert pool_has(pool, keys_of(fp, toks, [3, 4])) == [False, False]  # ... never written
    assert w.stats["save_withheld_pages"] == 2
    # vLLM recomputes from page 0: every page is saved now, from the recomputed blocks
    plan, errors, _ = run_step(s, w, sched_output(cached=[("b", 0, N)], blocks={"b": blocks}),
                               forward=computed(range(20, 26), 3.0))
    assert [(r.first_page, len(r)) for r in plan.saves] == [(0, 5)] and errors == [set()]
    assert pool_has(pool, keys_of(fp, toks, [3, 4])) == [True, True]
    assert pool_page(pool, keys_of(fp, toks, [4])[0]) == block_bytes(dst, 24)
    w.close()


def test_tp_a_failed_load_on_one_rank_withholds_every_ranks_saves(pool):
    """Issue 19.1 under TP: a page computed on rank 0 read rank 1's (unfilled) KV through the
    all-reduce, so rank 1's failed load spoils rank 0's computed pages too: the ranks agree on
    the first failed page and neither saves pages computed on top of it."""
    N = 5 * P + 3
    toks = np.arange(300, 300 + N).tolist()
    _, fps = save_doc(pool, toks[: 3 * P], [0, 1, 2], tp=2)
    agree = MinOverRanks(2)
    w0, _ = worker(pool, kv_blocks(9), rank=0, tp=2, agree=agree.fn(0))
    w1, _ = worker(pool, kv_blocks(9), rank=1, tp=2, agree=agree.fn(1),
                   store=FlakyStore(open_store(pool), fail_rate=1.0, fail_ops=("get",)))
    s = scheduler(pool, fps)
    req = request("b", toks)
    assert s.num_new_matched_tokens(req, 0) == 3 * P
    blocks = list(range(20, 26))
    s.after_alloc(req, blocks, 3 * P)
    _, errors, _ = run_step(s, [w0, w1], sched_output(new=[("b", 3 * P, N - 3 * P)], blocks={"b": blocks}),
                            forward=computed([23, 24, 25]))
    assert pool_has(pool, keys_of(fps[0], toks, [3, 4]) + keys_of(fps[1], toks, [3, 4])) == [False] * 4
    assert errors == [{20, 21, 22}, {20, 21, 22}]  # rank 0 loaded fine, and still reports them
    w0.close()
    w1.close()


def test_tp_a_page_counts_once_every_rank_stored_it(pool):
    """Acknowledgements are per rank: rank 0 acknowledging a page twice (a save planned again)
    does not make it stored on rank 1."""
    from kvdirect.vllm.plan import SaveAck, WorkerReport

    toks = np.arange(400, 400 + 2 * P + 1).tolist()
    _, fp0 = worker(pool, kv_blocks(), rank=0, tp=2)
    _, fp1 = worker(pool, kv_blocks(), rank=1, tp=2)
    s = scheduler(pool, [fp0, fp1])
    req = request("a", toks)
    s.num_new_matched_tokens(req, 0)
    s.after_alloc(req, [], 0)
    s.build_step(sched_output(new=[("a", 0, len(toks))], blocks={"a": [0, 1, 2]}))
    ack0 = SaveAck(0, "a", 0, np.ones(2, bool))
    s.on_worker_output(WorkerReport(acks=[ack0]), None)
    s.on_worker_output(WorkerReport(acks=[ack0]), None)
    assert s.stats["saved_pages_acked"] == 0
    assert s.index.match(np.asarray(toks[: 2 * P]), None).pool_len == 0
    s.on_worker_output(WorkerReport(acks=[SaveAck(1, "a", 0, np.array([True, False]))]), None)
    assert s.stats["saved_pages_acked"] == 1


def test_a_request_sharing_blocks_never_saves_a_failed_load(pool):
    """Issue 19.2: vLLM shares the blocks a request is loading with a second request of the same
    prompt in the same step. The page in block 12 is evicted between the existence query and the
    get: the second request must not write the unfilled block (nor pages computed on it), although
    the pool now says that key is missing."""
    N = 5 * P + 3
    toks = np.arange(500, 500 + N).tolist()
    save_doc(pool, toks[: 3 * P], [0, 1, 2])
    dst = kv_blocks(9)  # stale bytes in the blocks
    w, fp = worker(pool, dst)
    page2 = keys_of(fp, toks, [2])[0]

    class EvictPage2:  # evicted between the scheduler's exists and the worker's get
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get(self, keys, scatter):
            if page2 in keys:
                self.inner.remove([page2])
            return self.inner.get(keys, scatter)

    w.store = w.transfer.store = w.transfer._t.store = EvictPage2(w.store)
    s = scheduler(pool, fp)
    a, b = request("a", toks), request("b", toks)
    assert s.num_new_matched_tokens(a, 0) == 3 * P
    s.after_alloc(a, list(range(10, 16)), 3 * P)
    assert s.num_new_matched_tokens(b, 5 * P) == 0  # vLLM's own cache: a's blocks 10..14
    s.after_alloc(b, list(range(10, 15)) + [20], 0)
    so = sched_output(new=[("a", 3 * P, N - 3 * P), ("b", 5 * P, 3)],
                      blocks={"a": list(range(10, 16)), "b": list(range(10, 15)) + [20]})
    plan, errors, _ = run_step(s, w, so, forward=computed([13, 14, 15, 20]))
    assert sorted((r.req_id, r.first_page, len(r)) for r in plan.saves) == [("a", 3, 2), ("b", 0, 5)]
    assert errors == [{12}]
    assert pool_has(pool, keys_of(fp, toks, range(5))) == [True, True, False, False, False]
    assert w.stats["save_withheld_pages"] == 2 + 3
    assert s._reqs["a"].save_next == s._reqs["b"].save_next == 2  # saved after vLLM recomputes them
    w.close()


def late_get_setup(pool, rid, bound_s, base=600):
    N = 4 * P + 3
    toks = np.arange(base, base + N).tolist()
    src, fp = save_doc(pool, toks[: 3 * P], [0, 1, 2])
    # every get returns TIMEOUT after 0.05 s and writes the blocks 0.6 s later, with 0xA5 garbage in
    # the second page (a transport that leaves partial bytes behind)
    late = FlakyStore(FlakyStore(open_store(pool), fail_rate=0.5, fail_ops=("get",), seed=1),
                      delay_s=0.6, delay_ops=("get",), fail_ops=(), deadline_s=0.05)
    dst = kv_blocks(9)
    w, _ = worker(pool, dst, store=late)
    w.late_get_wait_s = bound_s
    s = scheduler(pool, fp)
    req = request(rid, toks)
    assert s.num_new_matched_tokens(req, 0) == 3 * P
    s.after_alloc(req, [20, 21, 22, 23, 24], 3 * P)
    so = sched_output(new=[(rid, 3 * P, N - 3 * P)], blocks={rid: [20, 21, 22, 23, 24]})
    return s, w, late, dst, fp, toks, req, so


def test_a_timed_out_get_returns_before_vllm_recomputes_into_its_blocks(pool):
    """Issue 19.3: a get that timed out keeps running and writes the blocks when it returns; vLLM
    recomputes into the same blocks from the next step. The step ends only once the get returned,
    so the recompute overwrites whatever it wrote."""
    s, w, late, dst, fp, toks, req, so = late_get_setup(pool, "b", 30.0)
    plan, errors, _ = run_step(s, w, so, forward=computed([23, 24]))
    assert errors == [{20, 21, 22}] and late.injected["timeout"] == 1
    assert late.quiesce(0)  # the late get already returned: nothing writes the blocks any more
    assert w.stats["late_load_requests"] == 1 and not w._late
    assert pool_has(pool, keys_of(fp, toks, [3])) == [False]  # computed on the failed load
    # the recompute (next step) is the blocks' last writer; then they are saved
    plan, errors, _ = run_step(s, w, sched_output(cached=[("b", 0, len(toks))], blocks={"b": [20, 21, 22, 23, 24]}),
                               forward=computed(range(20, 25), 5.0))
    assert [(r.first_page, len(r)) for r in plan.saves] == [(0, 4)] and errors == [set()]
    assert all((t[20:25] == 5.0).all() for t in dst)  # no late byte over the recomputed KV
    assert pool_page(pool, keys_of(fp, toks, [3])[0]) == block_bytes(dst, 23)
    w.close()


def test_a_late_get_past_the_bound_holds_its_blocks(pool):
    """Issue 19.3, past the wait bound: the request's blocks are not handed back (finish, abort,
    preemption) before the store is quiet, and nothing is saved from them meanwhile."""
    import time

    for end, base in (("finish", 1000), ("preempt", 2000)):
        s, w, late, dst, fp, toks, req, so = late_get_setup(pool, end, 0.0, base)
        plan, errors, _ = run_step(s, w, so, forward=computed([23, 24]))
        assert errors == [{20, 21, 22}] and late.injected["timeout"]
        assert not late.quiesce(0)  # the get is still running
        # vLLM recomputes (a step without loads): nothing is saved from the quarantined blocks
        plan, _, _ = run_step(s, w, sched_output(cached=[(end, 0, len(toks))], blocks={end: [20, 21, 22, 23, 24]}),
                              forward=computed(range(20, 25), 5.0))
        assert [(r.first_page, len(r)) for r in plan.saves] == [(0, 4)] and not late.quiesce(0)
        assert pool_has(pool, keys_of(fp, toks, [3])) == [False]
        if end == "finish":
            assert s.request_finished(req)  # held: vLLM keeps the blocks
            t0 = time.monotonic()
            while True:
                _, _, finished = run_step(s, w, sched_output())
                if finished:
                    break
                assert time.monotonic() - t0 < 10
            assert finished == {end} and late.quiesce(0)  # released only once the get returned
        else:
            w.handle_preemptions({end})  # before the next forward may overwrite the blocks
            assert late.quiesce(0)
            s.request_finished(req)
            run_step(s, w, sched_output())
        assert pool_has(pool, keys_of(fp, toks, [3])) == [False]  # nothing computed on them was saved
        w.close()
        late.close()


def test_one_log_line_per_failure_kind_per_interval(pool, caplog):
    import logging

    w, _ = worker(pool, kv_blocks(), cfg=CacheConfig(model="m", store=pool, log_interval_s=3600))
    with caplog.at_level(logging.WARNING, logger="kvdirect.vllm"):
        for _ in range(3):
            w._store_error("get", RuntimeError("boom"))
            w._store_error("put", RuntimeError("bang"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "get failed (boom)" in lines[0] and "put failed (bang)" in lines[1], lines
    w._last_log["store_get"] -= 7200  # the interval passed: the next line says how many were not logged
    with caplog.at_level(logging.WARNING, logger="kvdirect.vllm"):
        w._store_error("get", RuntimeError("boom"))
    assert "(+2 more since the last such line)" in caplog.records[-1].getMessage()
    assert w.stats["get_errors"] == 4
    w.close()


def test_failed_puts_are_never_claimed(pool):
    toks = np.arange(7, 7 + 4 * P).tolist()
    src = kv_blocks(3)
    flaky = FlakyStore(open_store(pool), fail_rate=1.0, fail_ops=("put",))
    w, fp = worker(pool, src, store=flaky)
    s = scheduler(pool, fp)
    req = request("a", toks)
    s.num_new_matched_tokens(req, 0)
    s.after_alloc(req, [], 0)
    run_step(s, w, sched_output(new=[("a", 0, 4 * P)], blocks={"a": [0, 1, 2, 3]}))
    assert s.request_finished(req)
    assert run_step(s, w, sched_output())[2] == {"a"}
    assert s.stats["saved_pages_acked"] == 0 and s.stats["save_failed_pages"] == 4
    other = scheduler(pool, fp)
    assert other.num_new_matched_tokens(request("b", toks), 0) == 0
    w.close()


def test_a_save_only_instance_saves(pool):
    """kv_role "kv_producer": no loads, every computed page saved."""
    toks = np.arange(900, 900 + 3 * P + 5).tolist()
    w, fp = worker(pool, kv_blocks(2))
    import dataclasses

    s = SchedulerSide(CacheConfig(model="m", store=pool), P, open_store(pool), load=False, save=True)
    s.set_fingerprints({0: {f.name: getattr(fp, f.name) for f in dataclasses.fields(fp)}})
    req = request("a", toks)
    assert s.num_new_matched_tokens(req, 0) == 0
    s.after_alloc(req, [], 0)
    plan, _, _ = run_step(s, w, sched_output(new=[("a", 0, len(toks))], blocks={"a": [4, 5, 6, 7]}))
    assert [(r.first_page, len(r)) for r in plan.saves] == [(0, 3)]
    assert pool_has(pool, keys_of(fp, toks, range(3))) == [True] * 3
    w.close()


def test_pages_of_generated_tokens_are_saved_as_decoding_fills_them(pool):
    """Multi-turn: the pages a request's generated tokens fill are saved too (vLLM's
    ``all_token_ids``), so the next turn (prompt + answer + a new message), on another
    instance, loads the previous answer's pages. Before, only prompt pages were saved."""
    prompt = np.arange(100, 100 + 2 * P + 5).tolist()
    answer = np.arange(1500, 1500 + P).tolist()
    src = kv_blocks(3)
    w, fp = worker(pool, src)
    s = scheduler(pool, fp)
    req = request("a", prompt)
    req.all_token_ids = list(prompt)
    s.num_new_matched_tokens(req, 0)
    s.after_alloc(req, [], 0)
    blocks = {"a": [4, 5, 6, 7]}
    plan, _, _ = run_step(s, w, sched_output(new=[("a", 0, len(prompt))], blocks=blocks))
    assert [(r.first_page, len(r)) for r in plan.saves] == [(0, 2)]
    # decode: step k feeds the k-th generated token back (its KV is computed in that step)
    saves = []
    for k in range(P):
        req.all_token_ids = prompt + answer[: k + 1]
        req.num_tokens = len(req.all_token_ids)
        plan, _, _ = run_step(s, w, sched_output(cached=[("a", len(prompt) + k, 1)], blocks=blocks))
        saves += [(k, r.first_page, r.block_ids.tolist()) for r in plan.saves]
    # page 2 (tokens 2P .. 3P-1: 5 prompt tokens, then generated ones) is whole after step P - 6
    assert saves == [(P - 6, 2, [6])]
    conversation = prompt + answer[: P - 5]
    key = keys_of(fp, conversation, [2])
    assert pool_page(pool, key[0]) == block_bytes(src, 6)
    assert s.request_finished(req)
    run_step(s, w, sched_output())
    assert not s._reqs
    w.close()
    # the next turn on another instance: the answer's page comes from the pool
    s2 = scheduler(pool, fp)
    turn2 = conversation + np.arange(1800, 1800 + 20).tolist()
    assert s2.num_new_matched_tokens(request("b", turn2), 0) == 3 * P


def test_preempted_request_saves_finish_before_its_blocks_are_reused(pool):
    src = kv_blocks(5)
    slow = FlakyStore(open_store(pool), delay_s=0.3, fail_ops=("put",), delay_ops=("put",))
    w, fp = worker(pool, src, store=slow)
    s = scheduler(pool, fp)
    toks = np.arange(1, 1 + 3 * P).tolist()
    req = request("a", toks)
    s.num_new_matched_tokens(req, 0)
    s.after_alloc(req, [], 0)
    w.submit_saves(s.build_step(sched_output(new=[("a", 0, 3 * P)], blocks={"a": [5, 6, 7]})))
    assert w._inflight["a"] == 1
    w.handle_preemptions({"a"})               # returns only when the put has read the blocks
    assert not w._inflight
    w.close()


def test_namespaces_do_not_share_pages(pool):
    toks = np.arange(50, 50 + 3 * P).tolist()
    _, fp = save_doc(pool, toks, [0, 1, 2])
    s = scheduler(pool, fp)
    assert s.num_new_matched_tokens(request("x", toks, salt="tenant-2"), 0) == 0
    assert s.num_new_matched_tokens(request("y", toks), 0) == 3 * P - 1


def fake_vllm_config(extra, model_path="m", **mc):
    return types.SimpleNamespace(
        kv_transfer_config=types.SimpleNamespace(kv_connector_extra_config=extra),
        model_config=types.SimpleNamespace(model=model_path, served_model_name=None, revision=mc.get("revision"),
                                           quantization=mc.get("quantization"), is_encoder_decoder=False))


def test_settings_from_extra_config(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    cfg = settings.cache_config(fake_vllm_config({"store": "shm://x?size=1MiB"}, str(tmp_path), revision="r1"))
    assert cfg.store == "shm://x?size=1MiB" and cfg.allow_no_store is False
    assert cfg.model.startswith(str(tmp_path)) and "rev=r1" in cfg.model and "config=" in cfg.model
    other = settings.cache_config(fake_vllm_config({}, str(tmp_path), quantization="fp8"))
    assert other.model != cfg.model
    with pytest.raises(ConfigError, match="kvdirect vLLM connector: .*unknown kvdirect config key"):
        settings.cache_config(fake_vllm_config({"stroe": "shm://x"}))
    assert settings.cache_config(fake_vllm_config({"model": "mine"})).model == "mine"


@pytest.mark.parametrize("url, words", [("shm://bad name", "bad store URL"), ("nosuch://h", "unknown store scheme"),
                                        ("shm://x?sise=1", "unknown parameter")])
def test_bad_store_urls_fail_with_one_line(url, words):
    with pytest.raises(ConfigError) as e:
        settings.open_pool(CacheConfig(model="m", store=url, allow_no_store=False))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unreachable_store_is_an_error_unless_allowed():
    url = "mooncake://127.0.0.1:1?metadata=http://127.0.0.1:1/metadata&protocol=tcp&segment=16MiB&timeout=1"
    with pytest.raises(KVDirectError, match="allow_no_store"):
        settings.open_pool(CacheConfig(model="m", store=url, allow_no_store=False))
    assert settings.open_pool(CacheConfig(model="m", store=url, allow_no_store=True)) is None


def test_unsupported_setups_are_refused():
    spec = type("SlidingWindowSpec", (), {})()
    vc = types.SimpleNamespace(parallel_config=types.SimpleNamespace(pipeline_parallel_size=1),
                               speculative_config=None, model_config=types.SimpleNamespace())
    kcc = types.SimpleNamespace(kv_cache_groups=[types.SimpleNamespace(kv_cache_spec=spec)])
    with pytest.raises(ConfigError, match="SlidingWindowSpec"):
        settings.check_supported(vc, kcc)
    vc.parallel_config.pipeline_parallel_size = 2
    with pytest.raises(ConfigError, match="pipeline parallelism"):
        settings.check_supported(vc, kcc)


def test_worker_refuses_device_memory(pool):
    class FakeLayout:
        device = "cuda:0"

    from kvdirect.vllm.worker import PageTransfer

    with pytest.raises(ConfigError, match="only vLLM CPU"):
        PageTransfer(open_store(pool), FakeLayout())


def test_layout_from_blocks_planes():
    """[2 (K/V), blocks, ...] layouts (GPU backends) become two segments per layer."""
    ts = [torch.zeros(2, 10, 16, 2, 8) for _ in range(2)]
    lay = KVLayout.from_blocks(ts, num_blocks=10, page_size=16, object_format="x", kv_heads=2, head_dim=8,
                               block_dim=1)
    sc = lay.plan(np.array([3 * 16]))
    es = 4
    block = 16 * 2 * 8 * es
    base = ts[0].data_ptr()
    assert lay.segments_per_page == 4 and (sc.sizes == block).all()
    assert sc.addrs[0, 0] - base == 3 * block and sc.addrs[0, 1] - base == 10 * block + 3 * block
    with pytest.raises(ConfigError, match="not contiguous"):
        KVLayout.from_blocks([t.transpose(2, 3) for t in ts], num_blocks=10, page_size=16, object_format="x",
                             kv_heads=2, head_dim=8, block_dim=1)
    assert StepPlan().loads == []


# ---- identity: what changes the KV bytes must change the keys -------------------------------------
SPEC = types.SimpleNamespace(num_kv_heads=HEADS, head_size=HEAD)


def fp8_instance(url, cache_dtype, fmt="vllm/TRITON_ATTN/None/fp8/2x16x16", seed=0):
    """uint8 blocks (vLLM's fp8 storage) and the layout the connector builds for them."""
    g = torch.Generator().manual_seed(seed)
    blocks = [torch.randint(0, 256, (NUM_BLOCKS, HEADS, P, 2 * HEAD), dtype=torch.uint8, generator=g)
              for _ in range(LAYERS)]
    vc = types.SimpleNamespace(cache_config=types.SimpleNamespace(cache_dtype=cache_dtype))
    layout = settings.blocks_layout(vc, SPEC, blocks, num_blocks=NUM_BLOCKS, block_size=P, object_format=fmt,
                                    block_dim=0)
    return blocks, layout


def _fake_platform(monkeypatch, fp8):
    plat = types.ModuleType("vllm.platforms")
    plat.current_platform = types.SimpleNamespace(fp8_dtype=lambda: fp8)
    monkeypatch.setitem(__import__("sys").modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(__import__("sys").modules, "vllm.platforms", plat)


def test_fp8_formats_never_share_pages(pool):
    toks = np.arange(300, 300 + 3 * P).tolist()
    src, lay = fp8_instance(pool, "fp8_e4m3")
    assert lay.dtype == "float8_e4m3fn"
    _, fp = save_doc(pool, toks, [0, 1, 2], src=src, layout=lay)
    _, lay5 = fp8_instance(pool, "fp8_e5m2")
    w5, fp5 = worker(pool, None, layout=lay5)
    assert lay5.dtype == "float8_e5m2" and fp5.key_prefix != fp.key_prefix
    assert scheduler(pool, fp5).num_new_matched_tokens(request("x", toks), 0) == 0
    assert scheduler(pool, fp).num_new_matched_tokens(request("y", toks), 0) == len(toks) - 1  # control: every page, the last token left to compute
    w5.close()
    assert settings.kv_dtype(types.SimpleNamespace(cache_config=types.SimpleNamespace(cache_dtype="auto"))) is None


def test_fp8_means_the_platforms_e4m3_variant(pool, monkeypatch):
    """`fp8` is e4m3fn on CUDA and e4m3fnuz on some ROCm GPUs: same cache_dtype name and object format,
    different bytes -- the pages must not be shared."""
    toks = np.arange(400, 400 + 3 * P).tolist()
    _fake_platform(monkeypatch, torch.float8_e4m3fn)
    src, lay = fp8_instance(pool, "fp8")
    _, fp = save_doc(pool, toks, [0, 1, 2], src=src, layout=lay)
    _fake_platform(monkeypatch, torch.float8_e4m3fnuz)
    _, lay_nuz = fp8_instance(pool, "fp8")
    assert (lay.dtype, lay_nuz.dtype) == ("float8_e4m3fn", "float8_e4m3fnuz")
    assert lay.object_format == lay_nuz.object_format
    w, fp_nuz = worker(pool, None, layout=lay_nuz)
    assert scheduler(pool, fp_nuz).num_new_matched_tokens(request("x", toks), 0) == 0
    w.close()


def test_hf_overrides_enter_the_model_identity(pool, tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')

    def model(overrides):
        vc = fake_vllm_config({"store": pool}, str(tmp_path))
        vc.model_config.hf_overrides = overrides
        return settings.cache_config(vc).model

    plain, none = model({}), model(None)
    rope, rope2 = model({"rope_theta": 20000.0}), model({"rope_theta": 20000.0})
    assert plain == none and "overrides=" not in plain
    assert rope == rope2 and rope != plain and model({"rope_theta": 10000.0}) != rope
    with pytest.raises(ConfigError, match=r"hf_overrides: .*function|hf_overrides: .*must be a dict") as e:
        model(lambda cfg: cfg)
    assert "\n" not in str(e.value) and '"model"' in str(e.value)
    # two engines differing only in the override share no page
    toks = np.arange(500, 500 + 3 * P).tolist()
    _, fp_rope = save_doc(pool, toks, [0, 1, 2], cfg=CacheConfig(model=rope, store=pool))
    w, fp_plain = worker(pool, kv_blocks(), cfg=CacheConfig(model=plain, store=pool))
    assert fp_plain.key_prefix != fp_rope.key_prefix
    assert scheduler(pool, fp_plain).num_new_matched_tokens(request("x", toks), 0) == 0
    assert scheduler(pool, fp_rope).num_new_matched_tokens(request("y", toks), 0) == len(toks) - 1
    w.close()


def lora(path, name="sql", int_id=1):
    return types.SimpleNamespace(lora_name=name, lora_int_id=int_id, lora_path=str(path))


def adapter(folder, weights: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def test_lora_namespace_is_what_defines_the_adapter(pool, tmp_path):
    """Two different adapters under one name and int id share no page; one adapter under two names shares."""
    from kvdirect.vllm.scheduler import request_namespace

    a = adapter(tmp_path / "host1" / "sql", b"weights-A" * 100)
    b = adapter(tmp_path / "host2" / "sql", b"weights-B" * 100)
    a_copy = adapter(tmp_path / "copy-of-a", b"weights-A" * 100)
    toks = np.arange(600, 600 + 3 * P).tolist()
    _, fp = save_doc(pool, toks, [0, 1, 2], lora=lora(a))
    s = scheduler(pool, fp)
    assert s.num_new_matched_tokens(request("b", toks, lora=lora(b)), 0) == 0      # same name and id
    assert s.num_new_matched_tokens(request("n", toks), 0) == 0                    # the base model
    assert s.num_new_matched_tokens(request("c", toks, lora=lora(a_copy, "other", 7)), 0) == len(toks) - 1
    ns_a = request_namespace(request("q", toks, lora=lora(a)))
    # replaced in place (same path, new weights): a new identity
    (a / "adapter_model.safetensors").write_bytes(b"weights-A2" * 100)
    assert request_namespace(request("q", toks, lora=lora(a)))[0] != ns_a[0]


def test_lora_that_cannot_be_identified_is_neither_loaded_nor_saved(pool, tmp_path):
    toks = np.arange(700, 700 + 3 * P).tolist()
    _, fp = save_doc(pool, toks, [0, 1, 2])
    s = scheduler(pool, fp)
    req = request("u", toks, lora=lora(tmp_path / "no-such-adapter"))
    assert s.num_new_matched_tokens(req, 0) == 0
    s.after_alloc(req, [], 0)
    plan = s.build_step(sched_output(new=[("u", 0, len(toks))], blocks={"u": [3, 4, 5]}))
    assert not plan.saves and not plan.loads
