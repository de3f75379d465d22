"""`kvdirect bench load`: both paths load every page; JSON carries the agreed fields."""
import glob
import json

from kvd_testutil import run_cli


def test_bench_load_json(tmp_path):
    before = set(glob.glob("/dev/shm/kvdirect-kvdirect-bench-*"))
    out = tmp_path / "load.json"
    r = run_cli("bench", "load", "--requests", "2", "--prompt-len", "512", "--layers", "2",
                "--head-dim", "64", "--rounds", "1", "--misses", "50", "--json", str(out))
    d = json.loads(out.read_text())
    assert d["direct_ms"] > 0 and d["staged_ms"] > 0
    # 2 layers x K/V x 2 heads x 64 dims x fp16 x 512 tokens
    assert d["bytes_per_request"] == 2 * 2 * 2 * 64 * 2 * 512
    assert d["config"]["stored_pages"] == 2 * 512 // 64
    assert "direct / staged" in r.stdout
    # the same run's memcpy baseline, write-back and miss figures (issue 16)
    for k in ("memcpy_gbps", "direct_gbps", "writeback_gbps", "miss_us_p50", "miss_us_p99",
              "direct_one_thread_gbps", "writeback_one_thread_gbps"):
        assert d[k] > 0, k
    assert d["miss_us_p99"] >= d["miss_us_p50"]
    assert d["direct_vs_memcpy"] == d["direct_gbps"] / d["memcpy_gbps"]
    assert set(d["miss_parts_us_p50"]) == {"match", "keys_one_page", "keys_all_pages", "exists_one_key"}
    assert d["config"]["misses"] == 50
    assert set(glob.glob("/dev/shm/kvdirect-kvdirect-bench-*")) == before  # temporary pool removed


def test_bench_load_bad_store_is_a_clear_error():
    r = run_cli("bench", "load", "--store", "nope://x", "--requests", "1", check=False)
    assert r.returncode == 1 and "unknown store scheme" in r.stderr and "Traceback" not in r.stderr
