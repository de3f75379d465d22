"""bench/bench_vllm.py's pure parts: order, summaries, ratios, goals, tables (no vLLM needed)."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_vllm", Path(__file__).resolve().parent.parent / "bench" /
                                               "bench_vllm.py")
bv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bv)


def test_rounds_and_orders():
    assert bv.split_rounds(5, 2) == [[0, 2, 4], [1, 3]]
    assert bv.split_rounds(1, 2) == [[0]]  # never an empty round
    order = bv.measure_order([0, 1, 2, 3])
    assert sorted(order) == sorted((lvl, i) for lvl in bv.LEVELS for i in range(4))  # each once
    assert [lvl for lvl, i in order if i == 1] == [0.5, 1.0, 0.0]  # prompt i starts at level i % 3
    assert [o[0] for o in order[:3]] == [0.0, 0.5, 1.0]
    assert bv.system_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert bv.system_order(["a", "b", "c"], 1) == ["c", "b", "a"]


def test_workload_levels_and_full_length_warm_up():
    docs, prompts, warm, warm_doc = bv.workload(2, 64, 1000)
    for lvl in bv.LEVELS:
        k = int(64 * lvl)
        for d, p in zip(docs[lvl], prompts[lvl]):
            assert len(p) == len(d) == 64 and p[:k] == d[:k] and (k == 64 or p[k:] != d[k:])
    # both warm-ups full length (a first request of a length is slower); the second half-hits warm_doc only
    assert [len(w) for w in warm] == [64, 64] and len(warm_doc) == 64
    assert warm[1][:32] == warm_doc[:32] and warm[1][32:] != warm_doc[32:]
    starts = {tuple(d[:32]) for lvl in bv.LEVELS for d in docs[lvl]}
    assert tuple(warm[0][:32]) not in starts and tuple(warm_doc[:32]) not in starts  # no timed hit warmed


def test_cpu_lists_and_kv_size():
    assert bv.cpu_list_str([5, 0, 1, 2]) == "0-2,5"
    assert bv.default_cpus({0, 1}) == ("0", "1")
    assert bv.default_cpus(range(16)) == ("0-14", "15")
    assert bv.default_cpus({3}) == ("3", "")
    transfer = dict(hidden_size=256, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=16, head_dim=128)
    assert bv.kv_bytes_per_token(transfer) * 1024 == 512 * 2**20  # the transfer shape: 0.5 GiB per prompt
    compute = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
    assert bv.kv_bytes_per_token(compute) * 2048 == 8 * 2**20


def fill(systems: dict, n: int = 2) -> dict:
    """systems: name -> {level: (wall_ms list, hits, output offset)}; outputs equal cold's unless offset."""
    out = {}
    for s, per in systems.items():
        out[s] = {}
        for lvl in bv.LEVELS:
            walls, hits, off = per[lvl]
            out[s][bv.level_key(lvl)] = {"wall_ms": list(walls), "hits": [hits] * n,
                                         "outputs": [[7 + j + off] for j in range(n)]}
    return out


def shape_of(samples, kvt=1 << 20):
    shape = {"runs": bv.summarize_runs(samples, 2), "control": bv.control_check(samples), "kv_bytes_per_token": kvt,
             "model": {"name": "m", "hidden_size": 8, "num_hidden_layers": 2, "num_key_value_heads": 1},
             "tokens": 1024, "kv_bytes_per_prompt": kvt * 1024, "failed": {}}
    shape["goals"] = bv.goals(shape)
    return shape


SAMPLES = fill({
    "cold": {0.0: ([100, 110], 0, 0), 0.5: ([100, 100], 0, 0), 1.0: ([100, 100], 0, 0)},
    "ideal": {0.0: ([100, 100], 0, 0), 0.5: ([60, 60], 512, 0), 1.0: ([20, 20], 896, 0)},
    "kvdirect-shm": {0.0: ([101, 109], 0, 0), 0.5: ([62, 64], 512, 0), 1.0: ([21, 23], 1023, 0)},
    "kvdirect-mooncake": {0.0: ([100, 100], 0, 0), 0.5: ([70, 70], 512, 0), 1.0: ([40, 40], 1023, 0)},
    "mooncake-store": {0.0: ([100, 100], 0, 0), 0.5: ([80, 80], 512, 0), 1.0: ([50, 50], 1023, 0)},
    "lmcache": {0.0: ([100, 100], 0, 0), 0.5: ([65, 65], 512, 0), 1.0: ([30, 30], 1023, 1)},
    "control": {0.0: ([104, 108], 0, 0), 0.5: ([100, 100], 0, 0), 1.0: ([100, 100], 0, 0)},
})


def test_summary_medians_hits_and_identity():
    runs = bv.summarize_runs(SAMPLES, 2)
    r0, r1 = runs[0], runs[2]
    assert r0["ttft_p50_ms"]["cold"] == 105.0 and r0["ttft_mean_ms"]["cold"] == 105.0
    assert r1["hit_tokens"]["kvdirect-shm"] == 1023 and r1["hit_tokens"]["ideal"] == 896
    assert r1["outputs_identical"]["kvdirect-shm"] and not r1["outputs_identical"]["lmcache"]
    assert r0["measured"]["cold"] == 2


def test_partial_samples_are_summarized_from_what_was_measured():
    s = fill({"cold": {lvl: ([100, None], 0, 0) for lvl in bv.LEVELS},
              "kvdirect-shm": {lvl: ([None, None], 0, 0) for lvl in bv.LEVELS}})
    runs = bv.summarize_runs(s, 2)
    assert runs[0]["measured"] == {"cold": 1} and "kvdirect-shm" not in runs[0]["ttft_p50_ms"]


def test_control_within_noise():
    c = bv.control_check(SAMPLES)
    assert c["0"]["median"] == pytest.approx((1.04 + 108 / 110) / 2, abs=1e-3)
    assert c["0"]["within_noise"]  # pairs 1.04 and 0.98 straddle 1.0
    slow = fill({"cold": {lvl: ([100, 100], 0, 0) for lvl in bv.LEVELS},
                 "control": {lvl: ([120, 125], 0, 0) for lvl in bv.LEVELS}})
    assert not bv.control_check(slow)["0"]["within_noise"]
    near = fill({"cold": {lvl: ([100, 100], 0, 0) for lvl in bv.LEVELS},
                 "control": {lvl: ([103, 104], 0, 0) for lvl in bv.LEVELS}})
    assert bv.control_check(near)["0"]["within_noise"]  # one side, but within 5%


def test_goals_against_best_peer_ideal_and_control():
    g = {x["goal"]: x for x in shape_of(SAMPLES)["goals"]}
    a = g["kvdirect-shm TTFT p50 <= best peer's at 100% reuse"]
    assert a["met"] and "lmcache 30 ms" in a["figure"] and "(0.73x)" in a["figure"]
    # over Mooncake the goal is the same store's peer; the best peer on any store is noted
    b = g["kvdirect-mooncake TTFT p50 <= the same store's peer at 100% reuse"]
    assert b["met"] and "mooncake-store 50 ms (0.80x)" in b["figure"]
    assert "best peer on any store: lmcache 30 ms (1.33x)" in b["note"]
    slow = {k: dict(v) for k, v in SAMPLES.items()}
    slow["kvdirect-mooncake"] = fill({"kvdirect-mooncake": {lvl: ([60, 60], 512, 0) for lvl in bv.LEVELS}}
                                     )["kvdirect-mooncake"]
    g2 = {x["goal"]: x for x in shape_of(slow)["goals"]}
    assert not g2["kvdirect-mooncake TTFT p50 <= the same store's peer at 100% reuse"]["met"]
    assert g["kvdirect-shm TTFT p50 <= best peer's at 50% reuse"]["met"]
    i = g["kvdirect-shm / ideal <= 1.10 at 100% reuse"]
    assert i["met"] and i["figure"].startswith("1.10x")
    assert "loads 1023 MiB per request" in i["note"] and "GB/s" in i["note"]
    assert not g["kvdirect-mooncake / ideal <= 1.10 at 100% reuse"]["met"]
    assert g["kvdirect-shm hit tokens >= lmcache's at every level"]["met"]
    o = g["greedy outputs identical to cold (fp32)"]
    assert not o["met"] and "lmcache" in o["figure"]
    assert g["control (kvdirect, empty pool) = cold within noise at 0%"]["met"]


def test_tables_and_readme_block():
    shape = shape_of(SAMPLES)
    shape["failed"] = {"example": "RuntimeError: boom"}
    t = bv.shape_table(shape)
    assert "| kvdirect-shm | 105 / 105 | 63 / 63 | 22 / 22 | 0/512/1023 | 1.00x | yes |" in t
    assert "| lmcache |" in t and "| NO |" in t.split("| lmcache |")[1].splitlines()[0] + "|"
    assert "| example | failed: RuntimeError: boom |" in t
    out = {"machine": {"description": "M", "vllm": "0.32.0", "lmcache": "0.5.6", "torch": "2.13", "cores": 2},
           "setup": {"command": "x", "date": "2026-01-01", "wall_s": 120, "prompts_per_level": 2, "rounds": 2},
           "binding": {"omp_bind": "0", "aux_cpus": "1", "uniform": True, "worker_cpus": ["0"]},
           "shapes": {"transfer": shape}}
    md = bv.markdown(out)
    assert "VLLM_CPU_OMP_THREADS_BIND=0" in md and "**transfer shape**" in md and "**not met**" in md
    text = f"intro\n{bv.BEGIN}\nOLD-BLOCK\n{bv.END}\noutro\n"
    new = bv.replace_block(text, md)
    assert new.startswith("intro\n") and new.endswith("outro\n") and "OLD-BLOCK" not in new
    assert bv.replace_block(new, md) == new  # idempotent
    with pytest.raises(ValueError):
        bv.replace_block("no markers", md)


def test_binding_summary_reads_worker_threads():
    def rec(cpus, role="measure"):
        return {"role": role, "processes": [
            {"name": "python", "threads": [{"cpus": "0-1", "threads": 8, "names": ["python"]}]},
            {"name": "VLLM::Worker", "threads": [{"cpus": cpus, "threads": 40, "names": ["VLLM::Worker"]},
                                                 {"cpus": "0-1", "threads": 2, "names": ["x"]}]}]}
    assert bv.binding_summary([rec("0"), rec("0"), rec("0-1", "store")], "0", "1")["uniform"]
    b = bv.binding_summary([rec("0"), rec("0-1")], "0", "1")
    assert not b["uniform"] and b["worker_cpus"] == ["0", "0-1"]


def test_free_ports_are_distinct():
    """mooncake_master's RPC and metadata ports were once the same port (two free_port() calls)."""
    for _ in range(20):
        ports = bv.free_ports(4)
        assert len(set(ports)) == 4


def test_from_json_rewrites_the_readme_block(tmp_path):
    out = {"machine": {"description": "M", "vllm": "0.32.0", "lmcache": "0.5.6", "torch": "2.13", "cores": 2},
           "setup": {"command": "x", "date": "2026-01-01", "wall_s": 60, "prompts_per_level": 2, "rounds": 1},
           "binding": {"omp_bind": "0", "aux_cpus": "1", "uniform": True, "worker_cpus": ["0"]},
           "shapes": {"compute": shape_of(SAMPLES)}}
    js, md = tmp_path / "b.json", tmp_path / "R.md"
    js.write_text(__import__("json").dumps(out))
    md.write_text(f"# t\n{bv.BEGIN}\nOLD-BLOCK\n{bv.END}\nrest\n")
    assert bv.main(["--from-json", str(js), "--readme", str(md)]) == 0
    text = md.read_text()
    assert "OLD-BLOCK" not in text and "**compute shape**" in text and text.endswith("rest\n")


@pytest.mark.parametrize("argv", [["--prompts", "0"], ["--rounds", "0"], ["--tokens", "0"], ["--settle", "-1"],
                                  ["--systems", "cold,nope"], ["--shapes", "huge"]])
def test_bad_arguments_are_refused_before_anything_starts(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bv.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
