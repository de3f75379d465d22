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


def worker(url, tensors, cfg=None, store=None, layout=None):
    cfg = cfg or CacheConfig(model="m", store=url)
    layout = layout or KVLayout.from_blocks(tensors, num_blocks=NUM_BLOCKS, page_size=P,
                                            object_format="test/blocks", kv_heads=HEADS, head_dim=HEAD)
    from kvdirect import keys as K

    fp = K.LayoutFingerprint.from_layout(layout, model=cfg.model)
    return WorkerSide(cfg, store or open_store(url), layout, [f"l{i}" for i in range(LAYERS)], fp), fp


def scheduler(url, fp, store=None, **cfg):
    import dataclasses

    s = SchedulerSide(CacheConfig(model="m", store=url, **cfg), P, store or open_store(url))
    s.set_fingerprints({0: {f.name: getattr(fp, f.name) for f in dataclasses.fields(fp)}})
    return s


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


def save_doc(url, toks, blocks, seed=1, *, src=None, layout=None, cfg=None, **req_kw):
    """Instance A: prefill of a document, its pages saved and acknowledged."""
    src = kv_blocks(seed) if src is None else src
    w, fp = worker(url, src, cfg=cfg, layout=layout)
    s = scheduler(url, fp)
    req = request("a", toks, **req_kw)
    assert s.num_new_matched_tokens(req, 0) == 0
    s.after_alloc(req, [], 0)
    plan = s.build_step(sched_output(new=[("a", 0, len(toks))], blocks={"a": blocks}))
    assert [len(r) for r in plan.saves] == [len(toks) // P] and not plan.loads
    w.submit_saves(plan)
    assert s.request_finished(req)           # saves planned: vLLM must hold the blocks
    w.flush()
    assert w.get_finished({"a"}) == {"a"}    # acknowledged: blocks may be freed
    s.on_worker_output(w.take_report(), {"a"})
    assert s.stats["saved_pages_acked"] == len(toks) // P and not s._reqs
    w.close()
    return src, fp


def test_save_then_load_moves_the_same_bytes(pool):
    toks = np.arange(10, 10 + 5 * P).tolist()
    src, fp = save_doc(pool, toks, list(range(5)))
    dst = kv_blocks()
    store = Counting(open_store(pool))
    s = scheduler(pool, fp, store=store)
    req = request("b", toks)
    # never the last token: 5 pages stored, 4 claimed; block aligned; asking twice is the same answer
    assert s.num_new_matched_tokens(req, 0) == 4 * P
    assert s.num_new_matched_tokens(req, 0) == 4 * P
    assert store.calls == ["exists"]          # the second ask came from the index
    assert s.num_new_matched_tokens(req, P) == 3 * P  # one page already computed locally
    s.num_new_matched_tokens(req, 0)
    s.after_alloc(req, [40, 41, 42, 43, 44], 4 * P)
    plan = s.build_step(sched_output(new=[("b", 0, 4 * P + P)], blocks={"b": [40, 41, 42, 43, 44]}))
    assert [(r.first_page, r.block_ids.tolist()) for r in plan.loads] == [(0, [40, 41, 42, 43])]
    assert [(r.first_page, len(r)) for r in plan.saves] == [(4, 1)]  # only the page it computes
    w, _ = worker(pool, dst)
    w.start_load(plan)
    assert w.take_load_errors() == set()
    for layer in range(LAYERS):
        assert torch.equal(dst[layer][40:44], src[layer][0:4])
    w.close()


def test_failed_get_reports_blocks_from_the_first_failure(pool):
    toks = np.arange(100, 100 + 6 * P).tolist()
    _, fp = save_doc(pool, toks, list(range(6)))
    dst = kv_blocks()
    flaky = FlakyStore(open_store(pool), fail_rate=1.0, fail_ops=("get",))
    w, _ = worker(pool, dst, store=flaky)
    s = scheduler(pool, fp)
    req = request("b", toks)
    assert s.num_new_matched_tokens(req, 0) == 5 * P
    s.after_alloc(req, list(range(20, 26)), 5 * P)
    plan = s.build_step(sched_output(new=[("b", 0, 6 * P)], blocks={"b": list(range(20, 26))}))
    w.start_load(plan)
    assert w.take_load_errors() == {20, 21, 22, 23, 24}
    report = w.take_report()
    assert report.load_failures == [("b", 0)]
    s.on_worker_output(report, None)
    # the failed pages are recomputed by vLLM: the scheduler plans their save again
    plan = s.build_step(sched_output(cached=[("b", 0, 6 * P)], blocks={"b": list(range(20, 26))}))
    assert [(r.first_page, len(r)) for r in plan.saves] == [(0, 6)]
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
    w.submit_saves(s.build_step(sched_output(new=[("a", 0, 4 * P)], blocks={"a": [0, 1, 2, 3]})))
    s.request_finished(req)
    w.flush()
    assert w.get_finished({"a"}) == {"a"}
    s.on_worker_output(w.take_report(), {"a"})
    assert s.stats["saved_pages_acked"] == 0 and s.stats["save_failed_pages"] == 4
    other = scheduler(pool, fp)
    assert other.num_new_matched_tokens(request("b", toks), 0) == 0
    w.close()


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
    assert s.num_new_matched_tokens(request("y", toks), 0) == 2 * P


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
    assert scheduler(pool, fp).num_new_matched_tokens(request("y", toks), 0) == 2 * P  # control
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
    assert scheduler(pool, fp_rope).num_new_matched_tokens(request("y", toks), 0) == 2 * P
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
    assert s.num_new_matched_tokens(request("c", toks, lora=lora(a_copy, "other", 7)), 0) == 2 * P
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
