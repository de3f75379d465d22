"""`kvdirect bench load`: both paths load every page; JSON carries the agreed fields."""
import glob
import json

from kvd_testutil import run_cli


def test_bench_load_json(tmp_path):
    before = set(glob.glob("/dev/shm/kvdirect-kvdirect-bench-*"))
    out = tmp_path / "load.json"
    r = run_cli("bench", "load", "--requests", "2", "--prompt-len", "512", "--layers", "2",
                "--head-dim", "64", "--rounds", "1", "--json", str(out))
    d = json.loads(out.read_text())
    assert d["direct_ms"] > 0 and d["staged_ms"] > 0
    # 2 layers x K/V x 2 heads x 64 dims x fp16 x 512 tokens
    assert d["bytes_per_request"] == 2 * 2 * 2 * 64 * 2 * 512
    assert d["config"]["stored_pages"] == 2 * 512 // 64
    assert "direct / staged" in r.stdout
    assert set(glob.glob("/dev/shm/kvdirect-kvdirect-bench-*")) == before  # temporary pool removed


def test_bench_load_bad_store_is_a_clear_error():
    r = run_cli("bench", "load", "--store", "nope://x", "--requests", "1", check=False)
    assert r.returncode == 1 and "unknown store scheme" in r.stderr and "Traceback" not in r.stderr
