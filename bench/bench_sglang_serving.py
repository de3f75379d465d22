"""SGLang's own load generator against each cache mode: ``sglang.bench_serving`` with the
``generated-shared-prefix`` dataset (groups of prompts sharing a system prompt).

Per mode (the modes of ``kvdirect demo --engine sglang``, same servers, same
benchmark-only patches): the mode's writer runs the benchmark first (computing every
prompt and writing it to the pool), then the reader -- the second server, the one
measured -- runs exactly the same benchmark (same seed, so the same prompts), so its
prefixes come from the pool. SGLang's linker and HiCache are their own writers, as in
the demo: their device (and host) caches are flushed before the measured run.
``baseline`` is a fresh server with SGLang's own cache (within the run, later prompts
of a group hit the system prompt on the device);
``ideal`` is that same server running the benchmark a second time (everything on the
device). Reported per mode, from bench_serving's own result: request throughput, TTFT
p50 / p99, and the cache hit rate (``--cache-report``: cached / prompt tokens).
Modes run one after another (two servers at a time), in an order rotated per round.
``--repeats N`` runs the measured benchmark N times per round on the same servers, the
device cache flushed (``/flush_cache``) before each, so every repeat loads its prefixes
from the pool again (``baseline``: a fresh cache each time, ``ideal`` right after it);
the summary gives the median of every run and the quartiles.

Usage (from a clone; the SGLang environment comes from scripts/sglang-env.sh):
  python bench/bench_sglang_serving.py [--modes baseline,kvdirect,...] [--model-size small|default|transfer]
      [--groups 8] [--prompts-per-group 8] [--system-len 2048] [--question-len 128] [--output-len 16]
      [--concurrency 4] [--page-size 64] [--rounds 1] [--repeats 1] [--json PATH]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from kvdirect.demo import SGLANG_MODES, SGLANG_TRANSFER_MODEL, SMALL_MODEL  # noqa: E402
from kvdirect.demo import sglang as D  # noqa: E402

SIZES = {"default": {}, "small": SMALL_MODEL, "transfer": SGLANG_TRANSFER_MODEL}


def bench(python: Path, url: str, tokenizer: Path, a, out: Path, seed: int) -> dict:
    n = a.groups * a.prompts_per_group
    cmd = [str(python), "-W", "ignore", "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", url,
           "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(a.groups),
           "--gsp-prompts-per-group", str(a.prompts_per_group), "--gsp-system-prompt-len", str(a.system_len),
           "--gsp-question-len", str(a.question_len), "--gsp-output-len", str(a.output_len),
           "--gsp-range-ratio", "1.0", "--num-prompts", str(n), "--max-concurrency", str(a.concurrency),
           "--tokenizer", str(tokenizer), "--tokenize-prompt", "--cache-report", "--disable-tqdm",
           "--seed", str(seed), "--output-file", str(out)]
    # HOME: bench_serving caches its generated prompts under ~/.cache/sglang keyed without the vocabulary,
    # so another model's cached token ids would be sent to this one; the run's own folder starts empty
    r = subprocess.run(cmd, capture_output=True, text=True, cwd="/", timeout=7200,
                       env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "HOME": str(tokenizer.parent / "home")})
    if r.returncode or not out.exists():
        raise RuntimeError(f"bench_serving failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    res = json.loads(out.read_text().strip().splitlines()[-1])
    out.unlink()
    cache = res.get("cache_report") or {}
    return {"request_throughput": res["request_throughput"], "ttft_p50_ms": res["median_ttft_ms"],
            "ttft_p99_ms": res["p99_ttft_ms"], "completed": res.get("completed"),
            "hit_rate": (cache.get("cache_hit_rate_pct") or 0.0) / 100.0,
            "cached_tokens": {k: cache.get(k) for k in ("device_cached_tokens", "host_cached_tokens",
                                                        "storage_cached_tokens")}}


def settle(timers: "D.Timers", quiet_s: float = 3.0, timeout: float = 600) -> float:
    """Wait until a writer's pool writes stopped (no new timer line for ``quiet_s``); their total ms."""
    start = timers.mark()
    last, since, t0 = None, time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - t0 < timeout:
        now = timers.mark()
        if now != last:
            last, since = now, time.monotonic()
        time.sleep(0.2)
    return timers.since(start).get("put", (0.0, 0))[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(m for m in SGLANG_MODES))
    ap.add_argument("--model-size", default="small", choices=sorted(SIZES))
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--prompts-per-group", type=int, default=8)
    ap.add_argument("--system-len", type=int, default=2048)
    ap.add_argument("--question-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1,
                    help="measured runs per mode and round, the device cache flushed before each")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sglang-env", default=None)
    ap.add_argument("--sglang-attention", default="prefix", choices=sorted(D.ATTENTION),
                    help="as kvdirect demo --engine sglang (default: the benchmark-only prefix_attention patch)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    for name in ("groups", "prompts_per_group", "system_len", "question_len", "output_len", "concurrency",
                 "page_size", "rounds", "repeats"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    unknown = [m for m in modes if m not in SGLANG_MODES]
    if unknown or not modes:
        ap.error(f"--modes: unknown {unknown or 'none given'}; choose from {', '.join(SGLANG_MODES)}")
    if a.concurrency < 4:
        print("note: the comparison is meant for --concurrency >= 4", file=sys.stderr)
    prompt_len = a.system_len + a.question_len
    cfg = D.SGLangDemoConfig(prompts=1, prompt_len=prompt_len, output_len=a.output_len, page_size=a.page_size,
                             modes=modes if "baseline" in modes else ("baseline", *modes),
                             spec=dict(SIZES[a.model_size]), sglang_env=a.sglang_env, attention=a.sglang_attention)
    from kvdirect.engine.model import DEFAULT_SPEC
    from kvdirect.services import find_mooncake_master, mooncake_store_url, start_mooncake_master
    from kvdirect.stores.shm import destroy_pool

    repo = D.find_repo()
    python = D.ensure_env(repo, cfg.sglang_env, True)
    spec = dict(DEFAULT_SPEC, **cfg.spec)
    spec.setdefault("max_position_embeddings", max(8192, prompt_len + a.output_len + 64))
    kv_token = D.kv_bytes_per_token(spec)
    n_req = a.groups * a.prompts_per_group
    max_tokens = max(a.concurrency * 2 * (prompt_len + a.output_len + a.page_size),
                     min(32768, (256 << 20) // kv_token))
    work = Path(tempfile.mkdtemp(prefix="kvdirect-bench-serving-"))
    model = str(work / "model")
    r = subprocess.run([str(python), "-W", "ignore", "-m", "kvdirect.demo.sglang_cpu.model", model,
                        "--seed", str(a.seed), "--spec", json.dumps(spec)], capture_output=True, text=True, cwd="/")
    if r.returncode:
        raise SystemExit(f"writing the model failed: {r.stderr[-500:]}")
    # bench_serving draws prompt tokens from the tokenizer's vocabulary; loaded from the model folder it is
    # SGLang's Qwen2Tokenizer (config.json says qwen2), which adds <|endoftext|> as id == vocab_size, out of
    # the model's embedding (the server dies on it). The tokenizer files alone load as the plain word list.
    tokenizer = work / "tokenizer"
    tokenizer.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer / f).write_bytes((Path(model) / f).read_bytes())
    pool_bytes = int(2 * n_req * (prompt_len + a.output_len) * kv_token) + (64 << 20)
    segment_bytes = max(pool_bytes, 256 << 20)
    servers = D._Servers(python, model, repo / "tests" / "e2e_sglang" / "standin",
                         repo / "bench" / "sglang_demo_patches", a.page_size, work, True,
                         every=D.ATTENTION_PATCHES[a.sglang_attention])
    results = {m: [] for m in cfg.modes if m != "ideal"}
    if "ideal" in cfg.modes:
        results["ideal"] = []
    print(f"machine: {describe()}\nworkload: {a.groups} groups x {a.prompts_per_group} prompts, system prompt "
          f"{a.system_len} + question {a.question_len} tokens, output {a.output_len}, concurrency "
          f"{a.concurrency}, page {a.page_size}, model {a.model_size}; {a.rounds} round(s); attention "
          f"{D.ATTENTION[a.sglang_attention]}", flush=True)
    order = [m for m in cfg.modes if m != "ideal"]
    failures = []  # a mode that failed is recorded (and shown), the others still run
    try:
        for rnd in range(a.rounds):
            shift = rnd % len(order)
            for mode in order[shift:] + order[:shift]:
                master = None
                pool_name = f"kvd-bench-serving-{uuid.uuid4().hex[:8]}"
                pool = f"shm://{pool_name}?size={pool_bytes}"
                try:
                    env = {"MOONCAKE_PROTOCOL": "tcp", "MOONCAKE_GLOBAL_SEGMENT_SIZE": str(segment_bytes),
                           "MOONCAKE_DEVICE": "", "MC_TCP_BIND_ADDRESS": "127.0.0.1"}
                    mc_url = None
                    if mode in D.MOONCAKE_MODES:
                        if find_mooncake_master() is None:
                            os.environ["PATH"] = f"{os.environ.get('PATH', '')}{os.pathsep}{python.parent}"
                        master = start_mooncake_master()
                        env.update(MOONCAKE_MASTER=f"127.0.0.1:{master.ports['rpc']}",
                                   MOONCAKE_LOCAL_HOSTNAME="127.0.0.1",
                                   MOONCAKE_TE_META_DATA_SERVER=f"http://127.0.0.1:{master.ports['http']}/metadata")
                        mc_url = mooncake_store_url("127.0.0.1", master.ports["rpc"], master.ports["http"],
                                                    segment=str(segment_bytes), buffer="256MiB", timeout=60)
                    one = D.SGLangDemoConfig(prompts=1, prompt_len=prompt_len, page_size=a.page_size,
                                             modes=("baseline", mode) if mode != "baseline" else ("baseline",))
                    specs = D.server_specs(one, pool, mc_url, env, max_tokens)
                    names = ["sglang"] if mode == "baseline" else list(dict.fromkeys([D.WRITERS[mode], mode]))
                    s = servers.start({n: specs[n] for n in names})
                    print(f"[round {rnd + 1}] {mode}: running", flush=True)
                    measured = s["sglang" if mode == "baseline" else mode]
                    if mode != "baseline":
                        w = names[0]
                        bench(python, s[w].url, tokenizer, a, work / "out.jsonl", a.seed)  # the writer: same prompts
                        put_ms = settle(servers.timers[w])  # its pool writes are over
                    for rep in range(a.repeats):
                        D._flush(measured)  # every repeat starts from an empty device cache (a fresh server: no-op)
                        res = bench(python, measured.url, tokenizer, a, work / "out.jsonl", a.seed)
                        res.update(round=rnd + 1, repeat=rep + 1)
                        if mode != "baseline":
                            res["writer_put_ms"] = put_ms
                        results[mode].append(res)
                        if mode == "baseline" and "ideal" in results:  # the same prompts again: all on the device
                            results["ideal"].append(dict(bench(python, measured.url, tokenizer, a, work / "out.jsonl",
                                                               a.seed), round=rnd + 1, repeat=rep + 1))
                        print(f"[round {rnd + 1}.{rep + 1}] {mode}: {res['request_throughput']:.3f} req/s, TTFT p50 "
                              f"{res['ttft_p50_ms']:.0f} ms, hit rate {100 * res['hit_rate']:.1f}%", flush=True)
                except Exception as e:  # noqa: BLE001 - recorded with the server logs' tail, never dropped
                    failures.append({"round": rnd + 1, "mode": mode, "error": str(e)[-3000:]})
                    why = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
                    print(f"[round {rnd + 1}] {mode}: FAILED: {why}", flush=True)
                finally:
                    servers.stop()
                    if master is not None:
                        master.stop()
                    destroy_pool(pool_name, missing_ok=True)
    finally:
        servers.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for mode, rs in results.items():
        if not rs:
            continue
        summary[mode] = {k: float(np.median([r[k] for r in rs])) for k in ("request_throughput", "ttft_p50_ms",
                                                                          "ttft_p99_ms", "hit_rate")}
        summary[mode]["runs"] = len(rs)
        summary[mode]["request_throughput_quartiles"] = [float(q) for q in np.percentile(
            [r["request_throughput"] for r in rs], [25, 75])]
    best_other = max((v["request_throughput"] for m, v in summary.items() if not m.startswith(("kvdirect", "linker"))
                      and m != "ideal"), default=None)
    print(f"\n{'mode':>18}  {'req/s':>8}  {'quartiles':>15}  {'TTFT p50 ms':>12}  {'TTFT p99 ms':>12}  "
          f"{'hit rate':>8}  runs")
    for mode, v in summary.items():
        q = v["request_throughput_quartiles"]
        print(f"{mode:>18}  {v['request_throughput']:>8.3f}  {q[0]:>7.3f}-{q[1]:<7.3f}  {v['ttft_p50_ms']:>12.0f}  "
              f"{v['ttft_p99_ms']:>12.0f}  {100 * v['hit_rate']:>7.1f}%  {v['runs']}")
    if best_other:
        for mode, v in summary.items():
            if mode.startswith(("kvdirect", "linker")):
                print(f"{mode}: throughput / best non-kvdirect mode = {v['request_throughput'] / best_other:.3f} "
                      "(goal >= 1)")
    for f in failures:
        print(f"FAILED: round {f['round']} {f['mode']} (the error is in the JSON)")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": describe(), "args": vars(a),
                                            "attention": D.ATTENTION[a.sglang_attention], "rounds": results,
                                            "summary": summary, "failures": failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
