"""`kvdirect bench load`: both paths load every page; JSON carries the agreed fields."""
import json
import os
import uuid

from kvd_testutil import run_cli

from kvdirect.stores.shm import destroy_pool, pool_path
from kvdirect.stores.url import parse_url

SMALL = ["--requests", "2", "--prompt-len", "512", "--layers", "2", "--head-dim", "64", "--rounds", "1"]


def test_bench_load_json(tmp_path):
    out = tmp_path / "load.json"
    r = run_cli("bench", "load", *SMALL, "--misses", "50", "--json", str(out))
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
    name = parse_url(d["store"]).host  # the temporary pool this run made
    assert name.startswith("kvdirect-bench-") and not os.path.exists(pool_path(name))


def test_bench_load_uses_an_existing_pool_and_leaves_it():
    name = f"bench-{uuid.uuid4().hex[:10]}"
    run_cli("pool", "create", name, "--size", "64MiB")
    try:
        r = run_cli("bench", "load", *SMALL, "--store", f"shm://{name}")
        assert "direct / staged" in r.stdout and os.path.exists(pool_path(name))
    finally:
        destroy_pool(name, missing_ok=True)


def test_bench_load_bad_store_is_a_clear_error():
    r = run_cli("bench", "load", "--store", "nope://x", "--requests", "1", check=False)
    assert r.returncode == 2 and "unknown store scheme" in r.stderr and "Traceback" not in r.stderr
    name = f"bench-{uuid.uuid4().hex[:10]}"
    r = run_cli("bench", "load", *SMALL, "--store", f"shm://{name}", check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr
    assert not os.path.exists(pool_path(name))  # a typo never creates (and leaves) a pool
