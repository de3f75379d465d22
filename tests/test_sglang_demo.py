"""`kvdirect demo --engine sglang` without servers: arguments, workload, result fields.
(The experiment itself runs real SGLang servers; tests/e2e_sglang covers those.)"""
import subprocess
import sys

import numpy as np
import pytest

from kvdirect.errors import ConfigError
from kvdirect.demo.sglang import MODES, SGLangDemoConfig, render_table, summarise, workload


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown"):
        SGLangDemoConfig(modes=("baseline", "kvdirect", "bogus"))
    with pytest.raises(ConfigError, match="must include baseline"):
        SGLangDemoConfig(modes=("kvdirect",))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        SGLangDemoConfig(reuse=(1.5,))
    with pytest.raises(ConfigError, match=">= 1"):
        SGLangDemoConfig(page_size=0)


@pytest.mark.parametrize("args,words", [
    (["--device", "cuda"], "CPU only"),
    (["--store", "shm://x"], "drop --store"),
    (["--modes", "baseline,kvdirect,nope"], "comma list of baseline"),
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


def test_result_fields():
    cfg = SGLangDemoConfig(prompts=2, prompt_len=128, reuse=(0, 1), modes=MODES)
    levels = workload(cfg)
    rec = lambda ms, pool=0, storage=0, out=(1, 2): {"ttft_ms": ms, "out": list(out),
                                                      "hit": {"pool": pool, "device": 0, "storage": storage}}
    recs = {m: [[rec(100.0 + k) for k in range(2)] for _ in levels] for m in MODES}
    recs["kvdirect"][1] = [rec(40.0, pool=64), rec(42.0, pool=64)]
    recs["hicache"][1] = [rec(60.0, storage=64), rec(61.0, storage=64)]
    recs["ideal"][1] = [rec(38.0), rec(40.0)]
    result = summarise(cfg, levels, recs, 1.0)
    assert result["engine"] == "sglang" and result["outputs_identical"] is True
    run = result["runs"][1]
    for f in ("ttft_mean_ms_kvdirect", "ttft_p50_ms_kvdirect", "ttft_p50_ms_baseline", "ttft_p50_ms_hicache",
              "ttft_p50_ms_hicache_file", "ttft_p50_ms_kvdirect_layerwise", "hit_tokens_kvdirect",
              "hit_tokens_hicache", "outputs_identical"):
        assert f in run, f
    assert run["reuse"] == 1.0 and run["hit_tokens_kvdirect"] == 64 and run["hit_tokens_hicache"] == 64
    assert run["ttft_change_kvdirect"] == pytest.approx(41 / 100.5 - 1)      # negative = faster
    assert run["kvdirect_vs_ideal"] == pytest.approx(41 / 39 - 1)
    assert "torch_native" in result["note"] and "torch_native" in render_table(result)
    recs["kvdirect"][0][1] = rec(100.0, out=(9, 9))
    assert summarise(cfg, levels, recs, 1.0)["outputs_identical"] is False
