"""kvdirect.demo and `kvdirect demo` on a small model."""
import json
import os

import numpy as np
import pytest

from kvd_testutil import run_cli

pytest.importorskip("torch", reason="the demo needs the [demo] extra (torch)")
pytest.importorskip("transformers", reason="the demo needs the [demo] extra (transformers)")

from kvdirect.demo import (DemoConfig, documents, ideal_prefix_len, prompts_b, render_table,  # noqa: E402
                           run_demo, shared_len)
from kvdirect.engine import ModelSpec  # noqa: E402
from kvdirect.errors import ConfigError  # noqa: E402

SMALL = ModelSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512)
SMALL_ARGS = ["--model-size", "small", "--prompts", "2", "--prompt-len", "160", "--page-size", "16", "--quiet"]


def small_cfg(**kw):
    return DemoConfig(**{"prompts": 2, "prompt_len": 160, "page_size": 16, "spec": SMALL, **kw})


def test_workload_shares_exactly_the_configured_prefix():
    cfg = small_cfg(prompts=4, reuse=(0.0, 0.5, 1.0))
    docs = documents(cfg)
    assert docs.shape == (4, 160) and docs.dtype == np.int32
    assert np.array_equal(docs, documents(cfg))  # deterministic: both processes regenerate it
    for level, reuse in enumerate(cfg.reuse):
        b = prompts_b(cfg, level, docs)
        k = shared_len(cfg, reuse)
        assert np.array_equal(b[:, :k], docs[:, :k])
        if k < cfg.prompt_len:
            assert (b[:, k] != docs[:, k]).all()
    assert [ideal_prefix_len(cfg, r) for r in cfg.reuse] == [0, 80, 144]


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError):
        small_cfg(reuse=(1.5,))
    with pytest.raises(ConfigError):
        small_cfg(modes=("kvdirect",))
    with pytest.raises(ConfigError):
        small_cfg(prompt_len=16)


def test_demo_baseline_and_ideal_in_a_separate_process():
    res = run_demo(small_cfg(modes=("baseline", "ideal")), progress=False)
    assert [r["reuse"] for r in res["runs"]] == [0.0, 0.5, 1.0]
    assert res["outputs_identical"] is True
    for r, expect in zip(res["runs"], (0, 80, 144)):
        assert r["outputs_identical_ideal"] is True
        assert r["max_logit_diff_ideal"] <= 1e-4
        assert r["ideal_hit_rate"] == pytest.approx(expect / 160)
        for key in ("ttft_mean_ms_baseline", "ttft_p50_ms_baseline", "ttft_p99_ms_baseline", "ttft_mean_ms_ideal"):
            assert r[key] > 0
        assert "ttft_change" not in r and "ttft_change_ideal" in r  # no kvdirect run, no kvdirect figure
    assert res["machine"]["cores"] == os.cpu_count() and res["config"]["prompt_len"] == 160
    assert "100%" in render_table(res) and "yes" in render_table(res)


def test_cli_writes_json_and_png(tmp_path):
    js, png = tmp_path / "demo.json", tmp_path / "demo.png"
    r = run_cli("demo", *SMALL_ARGS, "--reuse", "0,100%", "--modes", "baseline,ideal",
                "--json", str(js), "--plot", str(png))
    assert "outputs identical" in r.stdout
    d = json.loads(js.read_text())
    assert [x["reuse"] for x in d["runs"]] == [0.0, 1.0]
    assert all(isinstance(x["outputs_identical"], bool) for x in d["runs"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_exits_nonzero_when_outputs_differ(monkeypatch, capsys):
    import kvdirect.demo
    from kvdirect.cli import main

    real = kvdirect.demo.run_demo

    def differing(cfg, **kw):
        res = real(cfg, **kw)
        res["runs"][0]["outputs_identical"] = res["outputs_identical"] = False
        return res

    monkeypatch.setattr(kvdirect.demo, "run_demo", differing)
    assert main(["demo", *SMALL_ARGS, "--reuse", "0", "--modes", "baseline"]) == 1
    assert "NO" in capsys.readouterr().out


def test_demo_kvdirect_two_instances_share_the_pool():
    res = run_demo(small_cfg(), progress=False)
    assert res["outputs_identical"] is True
    runs = {r["reuse"]: r for r in res["runs"]}
    assert runs[0.0]["hit_rate"] == 0 and runs[0.0]["bytes_loaded"] == 0
    assert runs[1.0]["hit_rate"] == pytest.approx(144 / 160)
    assert runs[0.5]["bytes_loaded"] == 2 * 80 * SMALL.kv_bytes_per_token()
    for r in runs.values():
        assert r["outputs_identical"] and r["max_logit_diff"] <= 1e-4


def test_instance_a_then_b_through_the_cache_protocol():
    """The demo's A/B orchestration in one process, with the test-only
    store-backed cache standing in for KVDirectCache (two engines, one store)."""
    from test_engine import StoreBackedCache

    from kvdirect.demo import serve_documents, serve_levels
    from kvdirect.engine import Engine

    cfg = small_cfg(prompts=3)
    store = {}
    a = Engine.build(SMALL, num_slots=cfg.num_slots, page_size=16)
    b = Engine(a.model, type(a.pool).for_model(SMALL, cfg.num_slots, page_size=16))
    docs = documents(cfg)
    ca, cb = StoreBackedCache(a.pool, store), StoreBackedCache(b.pool, store)
    assert len(serve_documents(cfg, a, ca, docs)) == 3
    runs = {r["reuse"]: r for r in serve_levels(cfg, b, cb, docs)}
    bpt = SMALL.kv_bytes_per_token()
    for reuse, hit in ((0.0, 0), (0.5, 80), (1.0, 144)):
        r = runs[reuse]
        assert r["outputs_identical"] and r["outputs_identical_kvdirect"] and r["max_logit_diff"] <= 1e-4
        assert r["hit_rate"] == pytest.approx(hit / 160) == pytest.approx(r["ideal_hit_rate"])
        assert r["bytes_loaded"] == 3 * hit * bpt  # every hit came from the pool: B's device pool started cold
        assert {"ttft_change", "ttft_change_ideal", "kvdirect_vs_ideal", "ttft_p99_ms_kvdirect"} <= set(r)
        assert r["ttft_change"] == pytest.approx(r["ttft_mean_ms_kvdirect"] / r["ttft_mean_ms_baseline"] - 1)
        assert r["kvdirect_vs_ideal"] == pytest.approx(r["ttft_mean_ms_kvdirect"] / r["ttft_mean_ms_ideal"] - 1)
    cb.clear()
    assert b.allocator.free_pages == b.allocator.num_pages  # no slot leaked across 9 x 3 requests


@pytest.mark.mooncake  # skipped without the package, fails without its system libraries (conftest.py)
def test_demo_through_mooncake_matches_uncached(tmp_path):
    """The same experiment with the pool in a real Mooncake Store (loopback master)."""
    from kvdirect.services import start_mooncake_master

    with start_mooncake_master(workdir=tmp_path) as master:
        res = run_demo(small_cfg(store_url=master.store_url), progress=False)
    assert res["outputs_identical"]
    full = [r for r in res["runs"] if r["reuse"] == 1.0][0]
    assert full["hit_rate"] > 0.8 and full["bytes_loaded"] > 0
    assert full["max_logit_diff"] == 0.0


def test_demo_leaves_no_pool_file_behind():
    from kvdirect.stores.shm import pool_path
    from kvdirect.stores.url import parse_url

    res = run_demo(small_cfg(), progress=False)
    name = parse_url(res["config"]["store_url"]).host  # the pool this run made for itself
    assert name.startswith("kvdirect-demo-") and res["runs"][-1]["bytes_loaded"] > 0
    assert not os.path.exists(pool_path(name))


def test_readme_table_is_the_demo_table_of_docs_demo_json():
    """README, CLI and JSON share one convention: the README's table is render_table of docs/demo.json."""
    from kvd_testutil import ROOT

    result = json.loads((ROOT / "docs" / "demo.json").read_text())
    assert render_table(result, markdown=True) in (ROOT / "README.md").read_text(), (
        "README's demo table differs from docs/demo.json; paste the output of: python -c \"import json; "
        "from kvdirect.demo import render_table; print(render_table(json.load(open('docs/demo.json')), "
        "markdown=True))\"")
    for r in result["runs"]:
        assert r["ttft_change"] == pytest.approx(r["ttft_mean_ms_kvdirect"] / r["ttft_mean_ms_baseline"] - 1)
    assert result["reference"]["ttft_change"]["1.0"] < 0  # negative: faster, as in the table
    _recompute_readme_figures(result, (ROOT / "README.md").read_text())


def _recompute_readme_figures(result, readme):
    """Figures recomputed from what they derive from, not re-rendered: ratios from the measured means,
    pool hits and bytes loaded from the workload and the model's shape, the README's prose from the runs."""
    cfg = result["config"]
    spec, P, n = cfg["spec"], cfg["page_size"], cfg["prompt_len"]
    head_dim = spec["hidden_size"] // spec["num_attention_heads"]
    kv_bytes_per_token = spec["num_hidden_layers"] * 2 * spec["num_key_value_heads"] * head_dim * 4  # fp32 K+V
    assert cfg["kv_bytes_per_token"] == kv_bytes_per_token
    runs = {r["reuse"]: r for r in result["runs"]}
    for r in runs.values():
        assert r["kvdirect_vs_ideal"] == pytest.approx(r["ttft_mean_ms_kvdirect"] / r["ttft_mean_ms_ideal"] - 1)
        assert r["ttft_change_ideal"] == pytest.approx(r["ttft_mean_ms_ideal"] / r["ttft_mean_ms_baseline"] - 1)
        # full pages of the shared prefix, never the last prompt token: what a pool can give
        hit_pages = min(r["shared_tokens"], n - 1) // P
        assert r["hit_rate"] == pytest.approx(hit_pages * P / n)
        assert r["bytes_loaded"] == hit_pages * P * kv_bytes_per_token * r["prompts"]
    full, half, none = runs[1.0], runs[0.5], runs[0.0]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    worst = max(r["kvdirect_vs_ideal"] for r in runs.values())
    for text in (f"{cfg['prompts']} prompts per level; whole run {result['wall_s']:.0f} s",
                 f"{100 * full['ttft_change']:+.1f}% TTFT at 100% reuse",
                 f"kvdirect within\n{pct(worst)} of *ideal* at every level",
                 f"no-reuse\nTTFT {100 * none['ttft_change']:+.1f}% against the baseline",
                 f"reduction is {pct(-half['ttft_change'])}", f"*ideal* reaches\n{pct(-half['ttft_change_ideal'])}"):
        assert text in readme, f"README prose disagrees with docs/demo.json: expected {text!r}"
    head = render_table(result).splitlines()[0]
    assert "TTFT change with kvdirect" in head and "kvdirect vs ideal" in head
