"""`kvdirect demo --engine sglang` without servers: arguments, workload, server plan, result fields.
(The experiment itself runs real SGLang servers; tests/e2e_sglang covers the pieces it starts.)"""
import json
import subprocess
import sys

import numpy as np
import pytest

from kvdirect.demo.sglang import (MODES, WRITERS, SGLangDemoConfig, Timers, render_table, server_specs, summarise,
                                  workload)
from kvdirect.errors import ConfigError


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown"):
        SGLangDemoConfig(modes=("baseline", "kvdirect", "bogus"))
    with pytest.raises(ConfigError, match="must include baseline"):
        SGLangDemoConfig(modes=("kvdirect",))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        SGLangDemoConfig(reuse=(1.5,))
    with pytest.raises(ConfigError, match=">= 1"):
        SGLangDemoConfig(page_size=0)
    with pytest.raises(ConfigError, match="--sglang-attention"):
        SGLangDemoConfig(attention="flash")


@pytest.mark.parametrize("args,words", [
    (["--device", "cuda"], "CPU only"),
    (["--store", "shm://x"], "drop --store"),
    (["--modes", "baseline,kvdirect,nope"], "comma list of baseline"),
    (["--sglang-attention", "flash"], "invalid choice"),
])
def test_cli_refuses_before_any_work(args, words):
    r = subprocess.run([sys.executable, "-m", "kvdirect", "demo", "--engine", "sglang", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr


def test_workload_shares_exactly_the_reuse_fraction():
    cfg = SGLangDemoConfig(prompts=3, prompt_len=256, reuse=(0, 0.5, 1), spec={"vocab_size": 512})
    levels = workload(cfg)
    firsts = set()
    for reuse, (shared, pairs) in zip(cfg.reuse, levels):
        assert shared == int(round(reuse * 256))
        for doc, prompt in pairs:
            assert len(doc) == len(prompt) == 256
            common = int(np.argmax(doc != prompt)) if (doc != prompt).any() else 256
            assert common == shared
            firsts.update([int(doc[0]), int(prompt[0])])
    assert len(firsts) == 3 * 3 + 3  # every document, and every prompt that shares nothing, starts differently


def test_one_phase_plan_writers_per_key_family_and_benchmark_patches():
    cfg = SGLangDemoConfig(modes=MODES)
    specs = server_specs(cfg, "shm://p?size=1", "mooncake://m", {"MOONCAKE_MASTER": "m"}, 4096)
    # one writer per kvdirect key family (its radix backend and linker share keys), one reader per mode;
    # SGLang's linker and HiCache write their own documents (eleven servers did not fit in 24 GiB)
    assert set(specs) == {"W-shm", "W-mooncake", "sglang", *MODES} - {"baseline", "ideal"}
    assert {WRITERS[m] for m in MODES if m in WRITERS} <= set(specs)
    assert WRITERS["sglang_linker"] == "sglang_linker" and WRITERS["hicache"] == "hicache"
    assert "--hicache-ratio" in specs["hicache"]["args"]  # stated, not auto-sized against the host's free memory
    for m in ("kvdirect", "kvdirect_mooncake"):  # readers only load, layer by layer
        assert specs[m]["kvdirect_config"]["write_back"] is False and specs[m]["kvdirect_config"]["layerwise"]
    linker_cfg = json.loads(specs["linker"]["args"][specs["linker"]["args"].index(
        "--unified-cache-external-linker-config") + 1])
    assert linker_cfg["linker_module_path"] == "kvdirect.sglang.linker" and "patches" not in specs["linker"]
    assert specs["sglang_linker"]["patches"] == ["dense_linker"] and specs["hicache"]["patches"] == ["hicache_cpu"]
    assert "MOONCAKE_MASTER" in specs["sglang_linker"]["env"]
    few = server_specs(SGLangDemoConfig(modes=("baseline", "ideal", "linker")), "shm://p", None, {}, 4096)
    assert set(few) == {"W-shm", "sglang", "linker"}


def test_timers_sum_each_request_since_its_mark(tmp_path):
    t = Timers(tmp_path / "t")
    f = tmp_path / "t" / "123.jsonl"
    f.write_text(json.dumps({"w": "match", "ms": 1.5, "p": 0}) + "\n")
    mark = t.mark()
    with open(f, "a") as fh:
        fh.write(json.dumps({"w": "load_back", "ms": 2.0, "p": 0}) + "\n")
        fh.write(json.dumps({"w": "put", "ms": 3.0, "p": 4}) + "\n")
        fh.write(json.dumps({"w": "put", "ms": 1.0, "p": 2}) + "\n" + '{"w": "par')  # a line being written
    assert t.since(mark) == {"load_back": (2.0, 0), "put": (4.0, 6)}


def test_result_fields():
    cfg = SGLangDemoConfig(prompts=2, prompt_len=128, reuse=(0, 1), modes=MODES)
    levels = workload(cfg)
    rec = lambda ms, hit=0, out=(1, 2), load=0.0: {"ttft_ms": ms, "out": list(out), "load_ms": load,  # noqa
                                                    "writeback_ms": 5.0,
                                                    "hit": {"total": hit, "device": 0, "pool": hit, "storage": 0}}
    recs = {m: [[rec(100.0 + k) for k in range(2)] for _ in levels] for m in MODES}
    recs["kvdirect_mooncake"][1] = [rec(40.0, 64, load=2.0), rec(42.0, 64, load=4.0)]
    recs["sglang_linker"][1] = [rec(45.0, 64, load=10.0), rec(47.0, 64, load=10.0)]
    recs["ideal"][1] = [rec(38.0), rec(40.0)]
    result = summarise(cfg, levels, recs, 1.0)
    assert result["engine"] == "sglang" and result["outputs_identical"] is True
    run = result["runs"][1]
    for f in ("ttft_mean_ms_kvdirect", "ttft_p50_ms_baseline", "ttft_p50_ms_hicache", "hit_tokens_kvdirect_mooncake",
              "load_ms_p50_linker", "writeback_ms_p50_sglang_linker", "hit_rate", "outputs_identical"):
        assert f in run, f
    assert run["hit_tokens_kvdirect_mooncake"] == 64 and run["load_ms_p50_kvdirect_mooncake"] == 3.0
    assert run["load_ratio_kvdirect_mooncake_vs_sglang_linker"] == pytest.approx(0.3)
    assert run["ttft_change_kvdirect_mooncake"] == pytest.approx(41 / 100.5 - 1)      # negative = faster
    assert run["kvdirect_mooncake_vs_ideal"] == pytest.approx(41 / 39 - 1)
    assert "prefix_attention" in result["note"] and "patch" in result["attention"]
    assert "load ms" in render_table(result)
    shipped = summarise(SGLangDemoConfig(prompts=2, prompt_len=128, reuse=(0, 1), modes=MODES,
                                         attention="torch_native"), levels, recs, 1.0)
    assert "pads the query" in shipped["note"] and shipped["attention"] == "torch_native as shipped"
    recs["linker"][0][1] = rec(100.0, out=(9, 9))
    assert summarise(cfg, levels, recs, 1.0)["outputs_identical"] is False


def test_memory_estimate_counts_each_servers_weights():
    """Each server holds the model's weights: the transfer shape's (0.6 GiB in fp32) made a run that the
    estimate let through run out of memory. The count equals the model's parameters."""
    torch = pytest.importorskip("torch", reason="the engine needs the [demo] extra (torch)")
    pytest.importorskip("transformers", reason="the engine needs the [demo] extra (transformers)")
    from kvdirect.demo import SGLANG_TRANSFER_MODEL
    from kvdirect.demo.sglang import weight_bytes
    from kvdirect.engine.model import ModelSpec, build_model

    small = dict(SGLANG_TRANSFER_MODEL, num_hidden_layers=2, vocab_size=512)
    n = sum(p.numel() for p in build_model(ModelSpec(**small)).parameters() if p.dim() == 2)
    assert weight_bytes(small) == 4 * n
    full = weight_bytes(dict(SGLANG_TRANSFER_MODEL))
    assert 0.5 * 2**30 < full < 0.7 * 2**30
    del torch
