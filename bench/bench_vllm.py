"""kvdirect inside vLLM, side by side with vLLM's own prefix cache, LMCache and vLLM's ExampleConnector.

One command (builds or reuses the vLLM environment with LMCache, see scripts/vllm-env.sh;
about 4 GB on first use):

    python bench/bench_vllm.py --json docs/vllm_bench.json --plot docs/vllm_bench.png

Same model (a local random-weight Llama, fp32), same prompts (--tokens, default 2048),
0/50/100% prefix reuse, every engine a new process with the same settings
(block 128, multiprocess engine core, as ``vllm serve`` runs):

* cold: no connector, nothing cached;
* ideal: vLLM's own prefix cache, the documents served earlier in the same process;
* kvdirect: instance A serves the documents into an shm pool, instance B (new process) the prompts;
* lmcache: the same with LMCache's ``LMCacheMPConnector`` and its ``lmcache server``;
* example: the same with vLLM's ``ExampleConnector`` (files in a temporary folder).

TTFT is the wall time of one request with max_tokens=1, requests one at a time, after one
warm-up request per process. Prints a Markdown table; ``--json`` writes
``{"runs": [{"reuse", "ttft_p50_ms", "ttft_mean_ms", "hit_tokens", "outputs_identical"}], "machine"}``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("cold", "ideal", "kvdirect", "lmcache", "example")
LEVELS = (0.0, 0.5, 1.0)


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, **kw)


def venv_python() -> Path:
    venv = subprocess.run(["bash", str(ROOT / "scripts/vllm-env.sh"), "--print-venv"], check=True, text=True,
                          capture_output=True).stdout.strip()
    return Path(venv) / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_files(pgid: int):
    """kvdirect.procshm.ShmFiles for the engine's process group (from the checkout if kvdirect is
    not installed in this Python)."""
    try:
        from kvdirect.procshm import ShmFiles
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("kvd_procshm", ROOT / "python/kvdirect/procshm.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        ShmFiles = mod.ShmFiles
    return ShmFiles(pgid)


def engine(py: Path, job: dict, timeout: int, label: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="kvd-bench-") as d:
        jf, of = Path(d) / "job.json", Path(d) / "out.json"
        jf.write_text(json.dumps(job))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KVDIRECT_CONFIG")}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        t0 = time.perf_counter()
        errf = Path(d) / "stderr"
        with open(errf, "w") as err:
            p = subprocess.Popen([str(py), str(ROOT / "tests/vllm/driver.py"), str(jf), str(of)],
                                 stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=d, start_new_session=True)
            files = shm_files(p.pid)  # vLLM's psm_* queues this engine's processes map
            rc = None
            try:
                while (rc := p.poll()) is None and time.perf_counter() - t0 < timeout:
                    files.note()
                    time.sleep(0.5)
            finally:
                files.note()
                try:  # the engine's own processes (engine core, workers) end with the driver
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
                while files.pids() and time.perf_counter() - t0 < timeout + 10:
                    time.sleep(0.05)
                files.remove()  # only this engine's files: never a prefix sweep (others' engines)
        if rc != 0 or not of.exists():
            raise SystemExit(f"[bench_vllm] {label}: engine failed ({rc}):\n{errf.read_text()[-4000:]}")
        print(f"[bench_vllm] {label}: {time.perf_counter() - t0:.0f} s", flush=True)
        return json.loads(of.read_text())


def workload(n: int, L: int, vocab: int):
    rng = np.random.default_rng(7)
    docs, prompts = {}, {}
    for lvl in LEVELS:
        d = [rng.integers(3, vocab, L).tolist() for _ in range(n)]
        k = int(L * lvl)
        docs[lvl] = d
        prompts[lvl] = [x[:k] + rng.integers(3, vocab, L - k).tolist() for x in d]
    warm = [rng.integers(3, vocab, 256).tolist()]
    return docs, prompts, warm


class LMCacheServer:
    def __init__(self, py: Path, port: int):
        exe = py.parent / "lmcache"
        self.log = tempfile.NamedTemporaryFile(prefix="lmcache-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port),
                                      "--l1-size-gb", "2", "--eviction-policy", "LRU", "--chunk-size", "256",
                                      "--supported-transfer-mode", "engine_driven"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"[bench_vllm] lmcache server exited: {Path(self.log.name).read_text()[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.5)
        self.stop()
        raise SystemExit("[bench_vllm] lmcache server did not open its port within 120 s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per reuse level (default 8)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per prompt (default 2048)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + ",".join(SYSTEMS))
    ap.add_argument("--model", default="bench", help="model recipe of tests/vllm/make_model.py (default bench)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG chart here (needs matplotlib)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per engine process")
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    bad = set(systems) - set(SYSTEMS)
    if bad:
        ap.error(f"unknown systems {sorted(bad)}")

    t_start = time.perf_counter()
    env_args = ["--lmcache"] if "lmcache" in systems else []
    print("[bench_vllm] preparing the vLLM environment (scripts/vllm-env.sh; ~4 GB and ~6 min on first use)",
          flush=True)
    sh(["bash", str(ROOT / "scripts/vllm-env.sh"), *env_args])
    py = venv_python()
    model = subprocess.run([str(py), str(ROOT / "tests/vllm/make_model.py"), args.model], check=True, text=True,
                           capture_output=True).stdout.strip().splitlines()[-1]
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    docs, prompts, warm = workload(args.prompts, args.tokens, vocab)
    all_docs = [p for lvl in LEVELS for p in docs[lvl]]
    all_prompts = [p for lvl in LEVELS for p in prompts[lvl]]
    common = dict(model=model, dtype="float32", block_size=128, max_model_len=args.tokens + 64,
                  max_num_batched_tokens=max(8192, args.tokens + 64), multiprocess=True)
    measure = [{"prompts": warm, "max_tokens": 1, "mode": "sequential"},
               {"prompts": all_prompts, "max_tokens": 1, "mode": "sequential"}]
    store_docs = [{"prompts": all_docs, "max_tokens": 1, "mode": "batch"}]
    results: dict = {}

    def run(label, kv, phases, **kw):
        return engine(py, dict(common, kv=kv, phases=phases, **kw), args.timeout, label)

    for system in systems:
        if system == "cold":
            results[system] = run("cold", None, measure)["phases"][1]
        elif system == "ideal":
            results[system] = run("ideal (same process)", None, store_docs + measure)["phases"][2]
        elif system == "kvdirect":
            url = f"shm://kvd-bench-{uuid.uuid4().hex[:8]}?size=2GiB"
            kv = {"connector": "kvdirect", "extra": {"store": url}}
            try:
                run("kvdirect A (stores)", kv, store_docs)
                results[system] = run("kvdirect B (loads)", kv, measure)["phases"][1]
            finally:
                subprocess.run([str(py), "-m", "kvdirect", "pool", "destroy", url.split("//")[1].split("?")[0]],
                               capture_output=True)
        elif system == "lmcache":
            port = free_port()
            srv = LMCacheServer(py, port)
            try:
                kv = {"connector": "lmcache", "port": port}
                run("lmcache A (stores)", kv, store_docs)
                results[system] = run("lmcache B (loads)", kv, measure)["phases"][1]
            finally:
                srv.stop()
        elif system == "example":
            d = tempfile.mkdtemp(prefix="kvd-example-connector-")
            try:
                kv = {"connector": "example", "path": d}
                run("example A (stores)", kv, store_docs)
                results[system] = run("example B (loads)", kv, measure)["phases"][1]
            finally:
                shutil.rmtree(d, ignore_errors=True)
        summarize(results, args, py, model, systems, t_start)  # partial results survive an interrupted run

    out = summarize(results, args, py, model, systems, t_start)
    print(table(out))
    if args.plot:
        plot(out, args.plot)
    return 0


def summarize(results: dict, args, py: Path, model: str, systems: list, t_start: float) -> dict:
    """The JSON document from the systems measured so far (written after each system)."""
    n = args.prompts
    runs = []
    for i, lvl in enumerate(LEVELS):
        sl = slice(i * n, (i + 1) * n)
        row = {"reuse": lvl, "ttft_p50_ms": {}, "ttft_mean_ms": {}, "hit_tokens": {}}
        ref = results.get("cold", next(iter(results.values())))["outputs"][sl]
        same = True
        for s, r in results.items():
            w = np.asarray(r["wall_ms"][sl])
            row["ttft_p50_ms"][s] = round(float(np.median(w)), 1)
            row["ttft_mean_ms"][s] = round(float(w.mean()), 1)
            row["hit_tokens"][s] = int(np.sum(r["cached_tokens"][sl]) // n)
            same = same and r["outputs"][sl] == ref
        row["outputs_identical"] = bool(same)
        runs.append(row)
    machine = json.loads(subprocess.run(
        [str(py), "-c", "import json, os, torch, vllm; from kvdirect.runtime import machine_description, cpu_model\n"
                        "try:\n import lmcache; lm = getattr(lmcache, '__version__', '0.5.6')\nexcept Exception: lm = None\n"
                        "print(json.dumps({'description': machine_description(), 'cpu': cpu_model(), "
                        "'cores': os.cpu_count(), 'torch': torch.__version__, 'vllm': vllm.__version__, "
                        "'lmcache': lm}))"], check=True, text=True, capture_output=True).stdout)
    recipe = json.loads((Path(model) / "kvdirect-recipe.json").read_text())
    out = {"runs": runs, "machine": machine,
           "setup": {"model": recipe, "dtype": "float32", "block_size": 128, "prompts_per_level": n,
                     "tokens_per_prompt": args.tokens, "systems": systems, "wall_s": round(time.perf_counter() - t_start)}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


def table(out: dict) -> str:
    systems = list(out["runs"][0]["ttft_p50_ms"])
    head = "| prefix reuse | " + " | ".join(f"{s} TTFT p50 / mean (ms)" for s in systems) + \
           " | hit tokens (" + "/".join(systems) + ") | kvdirect / ideal (p50) | kvdirect / lmcache (p50) | outputs identical |"
    lines = [head, "|" + "---|" * (len(systems) + 5)]
    for r in out["runs"]:
        p50, mean = r["ttft_p50_ms"], r["ttft_mean_ms"]
        cells = [f"{p50[s]:.0f} / {mean[s]:.0f}" for s in systems]

        def ratio(a, b):  # of the medians: robust to a noisy machine
            return f"{p50[a] / p50[b]:.2f}x" if a in p50 and b in p50 and p50[b] else "-"

        lines.append(f"| {r['reuse']:.0%} | " + " | ".join(cells) + " | " +
                     "/".join(str(r["hit_tokens"][s]) for s in systems) +
                     f" | {ratio('kvdirect', 'ideal')} | {ratio('kvdirect', 'lmcache')} | "
                     f"{'yes' if r['outputs_identical'] else 'NO'} |")
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(out["runs"][0]["ttft_mean_ms"])
    x = np.arange(len(out["runs"]))
    w = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, s in enumerate(systems):
        ax.bar(x + i * w - 0.4 + w / 2, [r["ttft_mean_ms"][s] for r in out["runs"]], w, label=s)
    ax.set_xticks(x, [f"{r['reuse']:.0%} reuse" for r in out["runs"]])
    ax.set_ylabel("TTFT mean (ms)")
    ax.set_title(f"vLLM {out['machine']['vllm']} CPU, {out['setup']['tokens_per_prompt']}-token prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
