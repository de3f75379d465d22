"""kvdirect inside vLLM, side by side with vLLM's own prefix cache and the KV-connector peers, in one run.

One command (builds or reuses the vLLM environment with LMCache and Mooncake, see scripts/vllm-env.sh;
about 4 GB on first use):

    python bench/bench_vllm.py --json docs/vllm_bench.json --plot docs/vllm_bench.png --readme README.md

Systems (every engine a new vLLM process, multiprocess engine core as ``vllm serve`` runs, fp32, block 128):

* cold: no connector, nothing cached;
* ideal: vLLM's own prefix cache: the prompt's document served just before, in the same process;
* kvdirect-shm: kvdirect on its embedded ``shm://`` pool; instance A serves the documents, instance B
  (a new process) the prompts;
* kvdirect-mooncake: kvdirect over ``mooncake://``, same A/B split;
* mooncake-store: vLLM's own ``MooncakeStoreConnector`` on the SAME ``mooncake_master`` and the same
  memory holder (one ``mooncake_client`` process owns the pool's memory; the engines contribute none,
  kvdirect with ``segment=0``, vLLM's connector in its ``standalone-store`` mode);
* lmcache: LMCache 0.5.6 ``LMCacheMPConnector`` with its ``lmcache server``, same A/B split;
* example: vLLM's ``ExampleConnector`` (files in a temporary folder), same A/B split;
* control: kvdirect on an empty ``shm://`` pool (no instance A): must equal cold within noise.

Two model shapes (tests/vllm/make_model.py): ``compute`` (recipe ``bench``: hidden 512, 4 layers, 2 KV
heads, 2048-token prompts, 8 MiB of KV per prompt; the prefill dominates) and ``transfer`` (recipe
``transfer``: hidden 256, 32 layers, 16 KV heads of 128, 1024-token prompts, 0.5 GiB of KV per prompt;
the load itself shows, as it would next to an accelerator's fast prefill).

Fair timing:

* one CPU binding for every engine process: ``VLLM_CPU_OMP_THREADS_BIND`` (``--omp-bind``, default all
  CPUs but the last one, what vLLM picks for a process without a connector) is set for every engine; vLLM
  0.32 otherwise reserves one more CPU when a KV connector is configured and, where that does not fit,
  drops the reservation, so connector processes computed on more cores than cold/ideal. Store server
  processes (lmcache server, mooncake_master, mooncake_client) are pinned to the remaining CPUs
  (``--aux-cpus``), the same for all. The binding is recorded per process in the JSON: the vLLM log lines
  about it and every thread's allowed CPUs (from /proc), and checked to be the same for every engine.
* order: the prompts are split into ``--rounds`` rounds (prompt i in round i % rounds); each round runs
  every system (with fresh stores) in one order, the next round in the reverse order (F R R F ... over
  the shapes), so a slow drift of the machine falls on every system alike. Inside each measuring process
  the reuse levels are interleaved in one phase, rotated per prompt (prompt i: the levels starting at
  level i % 3). Engines cannot run side by side here (memory, 2 cores), so requests of different systems
  are not interleaved one by one.
* TTFT is the wall time of one request with ``max_tokens=1``, one request at a time, after two untimed
  warm-up requests per process, both full length: a miss, then a half hit on a document instance A
  stored with the others (a process's first request of a length pays one-time costs -- about 1.6x
  here -- and a connector's first load its own; with one short warm-up they fell on whichever level
  came first and broke the control). The first token of every request is compared with cold's (fp32
  greedy).

Writes ``--json`` (figures, goals, per-process binding records), ``--plot`` (PNG) and, with ``--readme``,
the block between ``<!-- bench_vllm.py begin -->`` and ``<!-- bench_vllm.py end -->`` in that file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
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
SYSTEMS = {
    "cold": "no connector, nothing cached",
    "ideal": "vLLM's own prefix cache (document served just before, same process)",
    "kvdirect-shm": "kvdirect, embedded shm:// pool",
    "kvdirect-mooncake": "kvdirect over mooncake:// (shared mooncake_master + holder)",
    "mooncake-store": "vLLM MooncakeStoreConnector (same mooncake_master + holder)",
    "lmcache": "LMCache 0.5.6 LMCacheMPConnector + lmcache server",
    "example": "vLLM ExampleConnector (files)",
    "control": "kvdirect on an empty shm:// pool (must equal cold)",
}
KVDIRECT = ("kvdirect-shm", "kvdirect-mooncake")
PEERS = ("mooncake-store", "lmcache", "example")
LOADERS = KVDIRECT + PEERS  # systems with an instance A that serves the documents first
LEVELS = (0.0, 0.5, 1.0)
SHAPES = {"compute": ("bench", 2048), "transfer": ("transfer", 1024)}  # name -> (model recipe, tokens per prompt)
IDEAL_RATIO_GOAL = 1.10
NOISE = 0.05  # a control within 5% of cold (paired by prompt) is within noise even if all pairs lie on one side
BIND_LOG = re.compile(r"ompmultiprocessing|OpenMP|core ids|reserved|torch_utils|Torch threads|OMP_|VLLM_CPU|"
                      r"LD_PRELOAD|CPU core number|NUMA")
BEGIN, END = "<!-- bench_vllm.py begin -->", "<!-- bench_vllm.py end -->"


# ----------------------------------------------------------------------------- pure parts (unit-tested)

def rotate(seq, k: int) -> list:
    k %= len(seq)
    return list(seq[k:]) + list(seq[:k])


def split_rounds(n: int, rounds: int) -> list[list[int]]:
    """Prompt indices per round: prompt i goes to round i % rounds (no empty round)."""
    rounds = max(1, min(rounds, n))
    return [list(range(r, n, rounds)) for r in range(rounds)]


def measure_order(indices) -> list[tuple[float, int]]:
    """(level, prompt) in the order one measuring process serves them: levels rotated per prompt."""
    return [(lvl, i) for i in indices for lvl in rotate(LEVELS, i)]


def system_order(systems, k: int) -> list[str]:
    """The k-th round over the whole run: forward on even k, reversed on odd k."""
    return list(systems) if k % 2 == 0 else list(reversed(systems))


def kv_bytes_per_token(recipe: dict, dtype_bytes: int = 4) -> int:
    head = recipe.get("head_dim") or recipe["hidden_size"] // recipe["num_attention_heads"]
    return recipe["num_hidden_layers"] * recipe["num_key_value_heads"] * head * 2 * dtype_bytes


def cpu_list_str(cpus) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the form VLLM_CPU_OMP_THREADS_BIND and taskset take)."""
    cpus, out = sorted(set(cpus)), []
    for c in cpus:
        if out and c == out[-1][1] + 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def default_cpus(allowed) -> tuple[str, str]:
    """(engine worker CPUs, store server CPUs): all but the last CPU for the workers, the last for servers."""
    allowed = sorted(allowed)
    if len(allowed) < 2:
        return cpu_list_str(allowed), ""
    return cpu_list_str(allowed[:-1]), cpu_list_str(allowed[-1:])


def level_key(lvl: float) -> str:
    return f"{lvl:g}"


def summarize_runs(samples: dict, n: int) -> list[dict]:
    """Per reuse level: TTFT p50/mean, mean hit tokens and output identity (against cold) per system.

    ``samples[system][level_key]`` = {"wall_ms": [n], "hits": [n], "outputs": [n]}, None where not measured
    (yet): a system appears at a level once it has a sample there; ``measured`` counts them.
    """
    runs = []
    ref_sys = "cold" if "cold" in samples else next(iter(samples), None)
    for lvl in LEVELS:
        k = level_key(lvl)
        row = {"reuse": lvl, "ttft_p50_ms": {}, "ttft_mean_ms": {}, "hit_tokens": {}, "outputs_identical": {},
               "measured": {}}
        ref = samples[ref_sys][k]["outputs"] if ref_sys else [None] * n
        for s, per in samples.items():
            got = [j for j, w in enumerate(per[k]["wall_ms"]) if w is not None]
            if not got:
                continue
            w = np.asarray([per[k]["wall_ms"][j] for j in got])
            row["ttft_p50_ms"][s] = round(float(np.median(w)), 1)
            row["ttft_mean_ms"][s] = round(float(w.mean()), 1)
            row["hit_tokens"][s] = int(round(float(np.mean([per[k]["hits"][j] for j in got]))))
            row["outputs_identical"][s] = all(per[k]["outputs"][j] == ref[j] for j in got if ref[j] is not None)
            row["measured"][s] = len(got)
        runs.append(row)
    return runs


def paired_ratios(samples: dict, a: str, b: str, lvl: float) -> list[float]:
    k = level_key(lvl)
    return [x / y for x, y in zip(samples[a][k]["wall_ms"], samples[b][k]["wall_ms"])
            if x is not None and y is not None and y > 0]


def control_check(samples: dict) -> dict | None:
    """control / cold paired by prompt at each level; 'within noise' at 0% when the pairs straddle 1.0
    or their median is within NOISE of it."""
    if "control" not in samples or "cold" not in samples:
        return None
    out = {}
    for lvl in LEVELS:
        r = paired_ratios(samples, "control", "cold", lvl)
        if not r:
            continue
        med = float(np.median(r))
        out[level_key(lvl)] = {"median": round(med, 3), "min": round(min(r), 3), "max": round(max(r), 3),
                               "within_noise": bool(min(r) <= 1.0 <= max(r) or abs(med - 1.0) <= NOISE)}
    return out


def _by_level(runs: list[dict]) -> dict:
    return {level_key(r["reuse"]): r for r in runs}


def goals(shape: dict) -> list[dict]:
    """The issue's goals against this shape's figures, met or not, with the figures that bound them."""
    runs, out = _by_level(shape["runs"]), []
    kvt = shape.get("kv_bytes_per_token", 0)
    for lvl in (0.5, 1.0):
        r = runs[level_key(lvl)]
        p50, hits = r["ttft_p50_ms"], r["hit_tokens"]
        peers = [p for p in PEERS if p in p50]
        if not peers:
            continue
        best = min(peers, key=lambda p: p50[p])
        for k in KVDIRECT:
            if k not in p50:
                continue
            # the goal: on the same store (Mooncake: vLLM's own connector on that master) and on
            # kvdirect's embedded pool (against every peer, whatever it stores in)
            ref, what = (("mooncake-store", "the same store's peer") if k == "kvdirect-mooncake" else
                         (best, "best peer's"))
            if ref not in p50:
                continue
            fig = f"{p50[k]:.0f} ms vs {ref} {p50[ref]:.0f} ms ({p50[k] / p50[ref]:.2f}x)"
            note = f"hit tokens {hits[k]} vs {hits[ref]}"
            if ref != best:
                note += f"; best peer on any store: {best} {p50[best]:.0f} ms ({p50[k] / p50[best]:.2f}x)"
            out.append({"goal": f"{k} TTFT p50 <= {what} at {lvl:.0%} reuse", "figure": fig,
                        "met": bool(p50[k] <= p50[ref]), "note": note})
    r = runs["1"]
    for k in KVDIRECT:
        if k in r["ttft_p50_ms"] and "ideal" in r["ttft_p50_ms"]:
            a, b = r["ttft_p50_ms"][k], r["ttft_p50_ms"]["ideal"]
            loaded = r["hit_tokens"][k] * kvt
            note = f"loads {loaded / 2**20:.0f} MiB per request"
            if a > b and loaded:
                note += f"; {a - b:.0f} ms over ideal = {loaded / ((a - b) / 1e3) / 1e9:.2f} GB/s"
            out.append({"goal": f"{k} / ideal <= {IDEAL_RATIO_GOAL:.2f} at 100% reuse",
                        "figure": f"{a / b:.2f}x ({a:.0f} / {b:.0f} ms)", "met": bool(a / b <= IDEAL_RATIO_GOAL),
                        "note": note})
    if "lmcache" in runs["0"]["hit_tokens"]:
        for k in KVDIRECT:
            if k not in runs["0"]["hit_tokens"]:
                continue
            pairs = [(runs[level_key(lvl)]["hit_tokens"].get(k, 0), runs[level_key(lvl)]["hit_tokens"].get("lmcache", 0))
                     for lvl in LEVELS]
            out.append({"goal": f"{k} hit tokens >= lmcache's at every level",
                        "figure": ", ".join(f"{a} vs {b}" for a, b in pairs),
                        "met": all(a >= b for a, b in pairs), "note": "0% / 50% / 100%"})
    same = [s for r in runs.values() for s, ok in r["outputs_identical"].items() if not ok]
    out.append({"goal": "greedy outputs identical to cold (fp32)", "figure": "all identical" if not same else
                "differ: " + ", ".join(sorted(set(same))), "met": not same, "note": ""})
    c = shape.get("control")
    if c and "0" in c:
        z = c["0"]
        rest = ", ".join(f"{float(k):.0%}: {v['median']:.2f}x" for k, v in c.items() if k != "0")
        out.append({"goal": "control (kvdirect, empty pool) = cold within noise at 0%",
                    "figure": f"{z['median']:.2f}x (pairs {z['min']:.2f}-{z['max']:.2f})",
                    "met": z["within_noise"], "note": f"also {rest}" if rest else ""})
    return out


def _fmt_ms(r: dict, s: str) -> str:
    if s not in r["ttft_p50_ms"]:
        return "-"
    return f"{r['ttft_p50_ms'][s]:.0f} / {r['ttft_mean_ms'][s]:.0f}"


def shape_table(shape: dict) -> str:
    runs = _by_level(shape["runs"])
    systems = [s for s in SYSTEMS if any(s in r["ttft_p50_ms"] for r in shape["runs"])]
    lines = ["| system | 0% reuse: TTFT p50 / mean (ms) | 50% | 100% | hit tokens 0/50/100% | vs cold at 0% (p50) "
             "| outputs = cold |", "|---|---|---|---|---|---|---|"]
    cold0 = runs["0"]["ttft_p50_ms"].get("cold")
    for s in systems:
        hits = "/".join(str(runs[level_key(lvl)]["hit_tokens"].get(s, "-")) for lvl in LEVELS)
        ident = all(r["outputs_identical"].get(s, True) for r in shape["runs"])
        vs = f"{runs['0']['ttft_p50_ms'][s] / cold0:.2f}x" if cold0 and s in runs["0"]["ttft_p50_ms"] else "-"
        lines.append(f"| {s} | " + " | ".join(_fmt_ms(runs[level_key(lvl)], s) for lvl in LEVELS) +
                     f" | {hits} | {vs} | {'yes' if ident else 'NO'} |")
    for s, why in shape.get("failed", {}).items():
        lines.append(f"| {s} | failed: {why} | | | | | |")
    return "\n".join(lines)


def goals_table(out: dict) -> str:
    lines = ["| shape | goal | figure | | limited by / notes |", "|---|---|---|---|---|"]
    for name, shape in out["shapes"].items():
        for g in shape["goals"]:
            lines.append(f"| {name} | {g['goal']} | {g['figure']} | {'met' if g['met'] else '**not met**'} | "
                         f"{g['note']} |")
    return "\n".join(lines)


def markdown(out: dict) -> str:
    """The README block: setup, one table per shape, the goals."""
    m, st, b = out["machine"], out["setup"], out["binding"]
    parts = [f"Generated by `bench/bench_vllm.py` ({st['command']}), {st['date']}, {st['wall_s'] / 60:.0f} min. "
             f"Machine: {m['description']} (at the start; {st.get('load_avg_now', '?')} at the end); vLLM {m['vllm']}, LMCache {m['lmcache']}, torch {m['torch']}. "
             f"{st['prompts_per_level']} prompts per reuse level in {st['rounds']} round(s), system order "
             f"reversed every other round; levels interleaved inside each process; "
             f"{'requests back to back' if not st.get('settle_s') else str(st['settle_s']) + ' s idle before each request'}.",
             f"Binding: `VLLM_CPU_OMP_THREADS_BIND={b['omp_bind']}` for every engine process "
             f"(worker OpenMP threads on CPU {b['omp_bind']}; connector threads in the worker inherit it); "
             f"engine core and driver unpinned; store servers (lmcache server, mooncake_master, mooncake_client) "
             f"pinned to CPU {b['aux_cpus'] or '(none left: shared)'}. Same worker CPUs in every measuring "
             f"process: {'yes' if b['uniform'] else 'NO: ' + ', '.join(b['worker_cpus'])}."]
    for name, shape in out["shapes"].items():
        rc = shape["model"]
        parts.append(f"**{name} shape** (`{rc['name']}`: hidden {rc['hidden_size']}, {rc['num_hidden_layers']} "
                     f"layers, {rc['num_key_value_heads']} KV heads; {shape['tokens']}-token prompts, "
                     f"{shape['kv_bytes_per_prompt'] / 2**20:.0f} MiB of KV per prompt)\n\n" + shape_table(shape))
    parts.append("Goals (p50 of the same run):\n\n" + goals_table(out))
    return "\n\n".join(parts)


def replace_block(text: str, block: str) -> str:
    if BEGIN not in text or END not in text:
        raise ValueError(f"markers {BEGIN} / {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def binding_summary(records: list[dict], omp_bind: str, aux_cpus: str) -> dict:
    """Worker CPUs of every measuring process (the CPU list of its worker's largest thread group)."""
    seen = set()
    for rec in records:
        if rec.get("role") != "measure":
            continue
        for p in rec.get("processes", []):
            if p["name"].startswith("VLLM::Worker") and p["threads"]:
                seen.add(max(p["threads"], key=lambda g: g["threads"])["cpus"])
    return {"omp_bind": omp_bind, "aux_cpus": aux_cpus, "worker_cpus": sorted(seen),
            "uniform": len(seen) == 1}


# ----------------------------------------------------------------------------- processes


class EngineFailed(RuntimeError):
    pass


def shm_leftovers():
    """kvdirect.shm_leftovers (from the checkout if kvdirect is not installed in this Python)."""
    try:
        from kvdirect import shm_leftovers as mod
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("kvd_shm_leftovers", ROOT / "python/kvdirect/shm_leftovers.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, **kw)


def venv_python() -> Path:
    venv = subprocess.run(["bash", str(ROOT / "scripts/vllm-env.sh"), "--print-venv"], check=True, text=True,
                          capture_output=True).stdout.strip()
    return Path(venv) / "bin" / "python"


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all sockets held until every port is picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Aux:
    """A store server process (lmcache server, mooncake_master, mooncake_client) pinned to ``cpus``."""

    def __init__(self, name: str, argv: list[str], ports: list[int], cpus: set[int], logdir: Path,
                 ready_s: float = 120):
        self.name, self.argv = name, argv
        self.rec: dict | None = None  # the JSON record, completed with notes() at stop
        self.log = logdir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=pin)
        deadline = time.monotonic() + ready_s
        for port in ports:
            while True:
                if self.proc.poll() is not None:
                    raise EngineFailed(f"{name} exited ({self.proc.returncode}): {self.tail()}")
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if time.monotonic() > deadline:
                    self.stop()
                    raise EngineFailed(f"{name} did not open port {port} within {ready_s:.0f} s: {self.tail()}")
                time.sleep(0.2)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def record(self) -> dict:
        try:
            cpus = cpu_list_str(os.sched_getaffinity(self.proc.pid))
        except OSError:
            cpus = "?"
        return {"name": self.name, "argv": self.argv, "cpus": cpus}

    def notes(self) -> list[str]:
        """Log lines that say how the server moves KV (LMCache: shm or pickle transport)."""
        keep = re.compile(r"transfer strategy|Insufficient /dev/shm|disabling SHM|Mounting segment", re.I)
        return list(dict.fromkeys(re.sub(r"\x1b\[[0-9;]*m", "", ln).strip()
                                  for ln in self.log.read_text(errors="replace").splitlines() if keep.search(ln)))

    def stop(self):
        if self.rec is not None:
            self.rec["log"] = self.notes()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()


class Bench:
    def __init__(self, args, py: Path, logdir: Path):
        self.args, self.py, self.logdir = args, py, logdir
        self.records: list[dict] = []
        self.aux_records: list[dict] = []
        allowed = os.sched_getaffinity(0)
        omp, aux = default_cpus(allowed)
        self.omp_bind = args.omp_bind or omp
        self.aux_cpus = aux if args.aux_cpus is None else args.aux_cpus
        self.aux_set = {int(c) for part in self.aux_cpus.split(",") if part
                        for c in (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))}

    def env(self, extra: dict | None = None) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KVDIRECT_CONFIG")}
        env.update(VLLM_CPU_KVCACHE_SPACE=str(self.args.kv_space), VLLM_LOGGING_LEVEL="INFO",
                   VLLM_CPU_OMP_THREADS_BIND=self.omp_bind)
        if self.args.reserved_cpus is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(self.args.reserved_cpus)
        env.update(extra or {})
        return env

    def engine(self, job: dict, label: str, meta: dict, extra_env: dict | None = None) -> dict:
        """Run one engine process (tests/vllm/driver.py) and keep its binding record."""
        env = self.env(extra_env)
        with tempfile.TemporaryDirectory(prefix="kvd-bench-") as d:
            jf, of = Path(d) / "job.json", Path(d) / "out.json"
            jf.write_text(json.dumps(dict(job, cpu_report=True)))
            errf = self.logdir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.log"
            t0 = time.perf_counter()
            leftovers = shm_leftovers()
            files = leftovers.ShmLeftovers()  # before the engine starts: what exists now is not its
            with open(errf, "w") as err:
                p = subprocess.Popen([str(self.py), str(ROOT / "tests/vllm/driver.py"), str(jf), str(of)],
                                     stdout=err, stderr=subprocess.STDOUT, env=env, cwd=d, start_new_session=True)
                rc = None
                try:
                    while (rc := p.poll()) is None and time.perf_counter() - t0 < self.args.timeout:
                        files.note(leftovers.group_pids(p.pid))
                        time.sleep(0.5)
                finally:
                    files.note(leftovers.group_pids(p.pid))
                    try:  # the engine's own processes (engine core, workers) end with the driver
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait()
                    deadline = time.perf_counter() + 10
                    while leftovers.group_pids(p.pid) and time.perf_counter() < deadline:
                        time.sleep(0.05)
                    files.remove()  # only this engine's files: never a prefix sweep (others' engines)
            log = errf.read_text(errors="replace")
            wall = time.perf_counter() - t0
            if rc != 0 or not of.exists():
                raise EngineFailed(f"{label}: engine failed ({'timeout' if rc is None else rc}):\n{log[-4000:]}")
            res = json.loads(of.read_text())
        lines = list(dict.fromkeys(ln.strip() for ln in log.splitlines() if BIND_LOG.search(ln)))
        self.records.append(dict(meta, label=label, wall_s=round(wall, 1), start_s=round(res.get("start_s", 0), 1),
                                 multiprocess=bool(job.get("multiprocess")),
                                 env={k: env[k] for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
                                                          "VLLM_CPU_KVCACHE_SPACE", "MOONCAKE_CONFIG_PATH") if k in env},
                                 log=lines, processes=res.pop("processes", []), drain=res.get("drain"),
                                 metrics={k: v for k, v in res.get("metrics", {}).items()
                                          if re.search(r"external_prefix|prompt_tokens_cached|kv_|mooncake|lmcache", k)},
                                 kvdirect={k: res[k] for k in ("worker_stats", "sched_stats") if k in res}))
        print(f"[bench_vllm] {label}: {wall:.0f} s", flush=True)
        return res

    def aux(self, name, argv, ports) -> Aux:
        a = Aux(name, argv, ports, self.aux_set, self.logdir)
        a.rec = a.record()
        self.aux_records.append(a.rec)
        return a


def workload(n: int, L: int, vocab: int):
    rng = np.random.default_rng(7)
    docs, prompts = {}, {}
    for lvl in LEVELS:
        d = [rng.integers(3, vocab, L).tolist() for _ in range(n)]
        k = int(L * lvl)
        docs[lvl] = d
        prompts[lvl] = [x[:k] + rng.integers(3, vocab, L - k).tolist() for x in d]
    # warm-up: a full-length miss, then half of ``warm_doc`` (stored by instance A) and a new tail
    warm_doc = rng.integers(3, vocab, L).tolist()
    warm = [rng.integers(3, vocab, L).tolist(), warm_doc[:L // 2] + rng.integers(3, vocab, L - L // 2).tolist()]
    return docs, prompts, warm, warm_doc


class Stores:
    """The stores of one round of one shape: created per system, removed after it."""

    def __init__(self, bench: Bench, need_bytes: int):
        self.b, self.need = bench, need_bytes
        self.master: Aux | None = None
        self.holder: Aux | None = None
        self.cleanup: list = []

    def mooncake(self) -> tuple[str, str]:
        """One mooncake_master and one memory holder per round, shared by both Mooncake systems."""
        if self.master is None:
            vbin = self.b.py.parent
            rpc, http, metrics, hold = free_ports(4)
            master = self.b.aux("mooncake_master", [
                str(vbin / "mooncake_master"), f"--rpc_port={rpc}", "--rpc_address=127.0.0.1",
                "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
                f"--http_metadata_server_port={http}", "--metrics_host=127.0.0.1", f"--metrics_port={metrics}",
                "--enable_metric_reporting=false"], [rpc, http])
            meta, addr = f"http://127.0.0.1:{http}/metadata", f"127.0.0.1:{rpc}"
            seg_mb = math.ceil(2 * self.need / 2**20)  # both Mooncake systems' pages
            try:
                self.holder = self.b.aux("mooncake_client", [
                    str(vbin / "mooncake_client"), f"--global_segment_size={seg_mb}MB",
                    f"--master_server_address={addr}", f"--metadata_server={meta}", "--protocol=tcp",
                    "--host=127.0.0.1", f"--port={hold}"], [hold])
            except EngineFailed:
                master.stop()
                raise
            self.master, self.meta, self.rpc = master, meta, addr
        return self.meta, self.rpc

    def close(self):
        for f in reversed(self.cleanup):
            f()
        self.cleanup.clear()
        for a in (self.holder, self.master):
            if a is not None:
                a.stop()
        self.master = self.holder = None

    def kv(self, system: str) -> tuple[dict | None, dict, bool]:
        """(kv job entry, extra engine env, instance A in-process) for a system; starts what it needs."""
        size_mb = math.ceil(self.need / 2**20)
        if system in ("cold", "ideal"):
            return None, {}, False
        if system in ("kvdirect-shm", "control"):
            name = f"kvd-bench-{uuid.uuid4().hex[:8]}"
            self.cleanup.append(lambda: subprocess.run([str(self.b.py), "-m", "kvdirect", "pool", "destroy", name],
                                                       capture_output=True))
            return {"connector": "kvdirect", "extra": {"store": f"shm://{name}?size={size_mb}MiB"}}, {}, True
        if system == "kvdirect-mooncake":
            meta, rpc = self.mooncake()
            url = (f"mooncake://{rpc}?metadata={meta}&protocol=tcp&segment=0&buffer=64MiB&local=127.0.0.1"
                   f"&timeout=60")
            return {"connector": "kvdirect", "extra": {"store": url}}, {}, True
        if system == "mooncake-store":
            meta, rpc = self.mooncake()
            fd, cfg = tempfile.mkstemp(prefix="kvd-bench-mooncake-", suffix=".json")
            os.close(fd)
            cfg = Path(cfg)
            cfg.write_text(json.dumps({"metadata_server": meta, "master_server_address": rpc, "protocol": "tcp",
                                       "device_name": "", "mode": "standalone-store", "global_segment_size": 0,
                                       "local_buffer_size": 64 << 20}))
            self.cleanup.append(lambda: cfg.unlink(missing_ok=True))
            return {"connector": "mooncake_store", "extra": {}}, {"MOONCAKE_CONFIG_PATH": str(cfg)}, True
        if system == "lmcache":
            port, = free_ports(1)
            srv = self.b.aux("lmcache_server", [
                str(self.b.py.parent / "lmcache"), "server", "--host", "127.0.0.1", "--port", str(port),
                "--l1-size-gb", f"{max(1.0, self.need / 2**30):.2f}", "--eviction-policy", "LRU", "--chunk-size",
                "256", "--supported-transfer-mode", "engine_driven",
                # LMCache's shared-memory transport for engine-driven transfers (its L1 pool in /dev/shm);
                # without it a CPU engine's KV goes pickled through the message queue (many times slower)
                "--shm-name", f"kvd-bench-{uuid.uuid4().hex[:8]}"], [port])
            self.cleanup.append(srv.stop)
            return {"connector": "lmcache", "port": port}, {}, False  # LMCache's connector needs multiprocess
        if system == "example":
            d = tempfile.mkdtemp(prefix="kvd-example-connector-")
            self.cleanup.append(lambda: shutil.rmtree(d, ignore_errors=True))
            return {"connector": "example", "path": d}, {}, True
        raise ValueError(system)


def run_system(bench: Bench, system: str, stores: Stores, common: dict, docs, prompts, warm, warm_doc, idx,
               order, label: str, meta: dict) -> list[tuple]:
    """Instance A (systems that load) then the measuring process; (wall ms, hit tokens, output) per order entry."""
    settle = bench.args.settle
    kv, extra_env, a_inproc = stores.kv(system)
    if system in LOADERS:
        bench.engine(dict(common, kv=kv, multiprocess=not a_inproc, drain_saves=True, phases=[
            {"prompts": [docs[lvl][i] for i in idx for lvl in LEVELS if lvl > 0] + [warm_doc], "max_tokens": 1,
             "mode": "batch"}]),
            f"{label} A (stores)", dict(meta, role="store"), extra_env)
    warm_ph = {"prompts": warm, "max_tokens": 1, "mode": "sequential"}
    if system == "ideal":  # the warm-up's half hit comes from the device, like every timed hit
        phases = [{"prompts": [warm_doc], "max_tokens": 1, "mode": "batch"}, warm_ph]
        for lvl, i in order:
            phases += [{"prompts": [docs[lvl][i]], "max_tokens": 1, "mode": "batch"},
                       {"prompts": [prompts[lvl][i]], "max_tokens": 1, "mode": "sequential", "settle_s": settle}]
        res = bench.engine(dict(common, kv=kv, multiprocess=True, phases=phases), label, dict(meta, role="measure"),
                           extra_env)
        timed = [res["phases"][3 + 2 * j] for j in range(len(order))]
        return [(ph["wall_ms"][0], ph["cached_tokens"][0], ph["outputs"][0]) for ph in timed]
    res = bench.engine(dict(common, kv=kv, multiprocess=True, phases=[
        warm_ph, {"prompts": [prompts[lvl][i] for lvl, i in order], "max_tokens": 1, "mode": "sequential",
                  "settle_s": settle}]),
        label + (" B (loads)" if system in LOADERS else ""), dict(meta, role="measure"), extra_env)
    ph = res["phases"][1]
    return list(zip(ph["wall_ms"], ph["cached_tokens"], ph["outputs"]))


def run_shape(bench: Bench, name: str, k0: int, systems: list[str], out: dict, save) -> int:
    """Every round of one shape; returns the number of rounds run (for the run-wide order)."""
    args = bench.args
    recipe_name, tokens = SHAPES[name]
    tokens = args.tokens or tokens
    model = subprocess.run([str(bench.py), str(ROOT / "tests/vllm/make_model.py"), recipe_name], check=True,
                           text=True, capture_output=True).stdout.strip().splitlines()[-1]
    recipe = json.loads((Path(model) / "kvdirect-recipe.json").read_text())
    n = args.prompts
    docs, prompts, warm, warm_doc = workload(n, tokens, recipe["vocab_size"])
    kvt = kv_bytes_per_token(recipe)
    samples = {s: {level_key(lvl): {"wall_ms": [None] * n, "hits": [None] * n, "outputs": [None] * n}
                   for lvl in LEVELS} for s in systems}
    shape = out["shapes"][name] = {"model": recipe, "tokens": tokens, "kv_bytes_per_token": kvt,
                                   "kv_bytes_per_prompt": kvt * tokens, "runs": [], "goals": [], "failed": {}}
    common = dict(model=model, dtype="float32", block_size=128, max_model_len=tokens + 64,
                  max_num_batched_tokens=max(8192, tokens + 64))
    rounds = split_rounds(n, args.rounds)
    for r, idx in enumerate(rounds):
        order = measure_order(idx)
        # A writes the 50% and 100% documents and the warm-up document, B writes back what it computes:
        # <= 3.5 prompts per index and 2.5 for the warm-up
        need = int((3.5 * len(idx) + 2.5) * kvt * tokens * 1.2) + (256 << 20)
        stores = Stores(bench, need)
        try:
            for system in system_order(systems, k0 + r):
                if system in shape["failed"]:
                    continue
                meta = {"shape": name, "system": system, "round": r}
                for attempt in range(args.retries + 1):
                    try:
                        got = run_system(bench, system, stores, common, docs, prompts, warm, warm_doc, idx, order,
                                         f"{name} r{r} {system}" + (f" (try {attempt + 1})" if attempt else ""),
                                         dict(meta, attempt=attempt))
                    except EngineFailed as e:
                        lines = str(e).strip().splitlines()
                        why = next((ln for ln in reversed(lines) if re.search(r"error|failed", ln, re.I)), lines[0])
                        out.setdefault("failures", []).append(dict(meta, attempt=attempt, error=str(e)[-4000:]))
                        last = attempt == args.retries
                        print(f"[bench_vllm] {system} FAILED ({'recorded, continuing' if last else 'retrying'}): "
                              f"{why[:300]}", flush=True)
                        if last:
                            shape["failed"][system] = why[:300]
                        else:
                            time.sleep(30)  # a shared machine: memory may come back
                        continue
                    finally:
                        for f in reversed(stores.cleanup):
                            f()
                        stores.cleanup.clear()
                    for (lvl, i), (w, h, o) in zip(order, got):
                        cell = samples[system][level_key(lvl)]
                        cell["wall_ms"][i], cell["hits"][i], cell["outputs"][i] = w, h, o
                    break
                ok = {s: v for s, v in samples.items() if s not in shape["failed"]}
                shape["runs"] = summarize_runs(ok, n)
                shape["control"] = control_check(ok)
                shape["samples"] = ok
                save()
        finally:
            stores.close()
    shape["goals"] = goals(shape)
    save()
    return len(rounds)


def machine(py: Path) -> dict:
    return json.loads(subprocess.run(
        [str(py), "-c", "import json, os, torch, vllm; from kvdirect.runtime import machine_description, cpu_model\n"
                        "try:\n import lmcache; lm = getattr(lmcache, '__version__', '0.5.6')\nexcept Exception: lm = None\n"
                        "print(json.dumps({'description': machine_description(), 'cpu': cpu_model(), "
                        "'cores': os.cpu_count(), 'torch': torch.__version__, 'vllm': vllm.__version__, "
                        "'lmcache': lm}))"], check=True, text=True, capture_output=True).stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4, help="prompts per reuse level (default 4)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, system order reversed every other one (default 2)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ",".join(SHAPES))
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + ",".join(SYSTEMS))
    ap.add_argument("--tokens", type=int, help="tokens per prompt for every shape (default: the shape's own)")
    ap.add_argument("--omp-bind", help="VLLM_CPU_OMP_THREADS_BIND for every engine (default: all CPUs but the last)")
    ap.add_argument("--aux-cpus", help="CPUs of the store servers (default: the last CPU; '' = unpinned)")
    ap.add_argument("--reserved-cpus", type=int, help="VLLM_CPU_NUM_OF_RESERVED_CPU for every engine (only used "
                                                     "with --omp-bind auto)")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="idle seconds before each timed request (default 0: back to back, so a connector's "
                         "background writes of one request overlap the next)")
    ap.add_argument("--kv-space", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE in GiB (default 2)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG chart here (needs matplotlib)")
    ap.add_argument("--readme", help="replace the generated block in this Markdown file")
    ap.add_argument("--logs", help="keep every process's log in this folder (default: a temporary one)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per engine process")
    ap.add_argument("--retries", type=int, default=1, help="reruns of a system whose engine failed (each failure "
                                                          "is recorded in the JSON; default 1)")
    ap.add_argument("--from-json", help="measure nothing: write the table (--readme) and chart (--plot) of an "
                                        "earlier run's JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        out = json.loads(Path(args.from_json).read_text())
        for shape in out["shapes"].values():  # judged by this revision's goals
            shape["goals"] = goals(shape)
        write_outputs(out, args)
        return 0
    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    shapes = [s for s in args.shapes.split(",") if s]
    bad = (set(args.systems.split(",")) - set(SYSTEMS) - {""}) | (set(shapes) - set(SHAPES))
    if bad:
        ap.error(f"unknown systems/shapes {sorted(bad)}")
    for name, v, lo in (("--prompts", args.prompts, 1), ("--rounds", args.rounds, 1), ("--kv-space", args.kv_space, 1),
                        ("--retries", args.retries, 0), ("--tokens", 2 if args.tokens is None else args.tokens, 2)):
        if v < lo:
            ap.error(f"{name} must be >= {lo} (got {v})")
    if args.settle < 0:
        ap.error(f"--settle must be >= 0 (got {args.settle})")
    if args.readme and not Path(args.readme).read_text().count(BEGIN):
        ap.error(f"{args.readme} has no {BEGIN} marker")

    # SIGTERM unwinds like Ctrl-C, so that engines, store servers and pools are cleaned up
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t_start = time.perf_counter()
    env_args = ["--lmcache"] if "lmcache" in systems else []
    print("[bench_vllm] preparing the vLLM environment (scripts/vllm-env.sh; ~4 GB and ~6 min on first use)",
          flush=True)
    sh(["bash", str(ROOT / "scripts/vllm-env.sh"), *env_args])
    py = venv_python()
    logdir = Path(args.logs or tempfile.mkdtemp(prefix="kvd-bench-logs-"))
    logdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, py, logdir)
    out = {"machine": machine(py), "shapes": {},
           "setup": {"command": "python bench/bench_vllm.py " + " ".join(sys.argv[1:] if argv is None else argv),
                     "date": time.strftime("%Y-%m-%d"), "dtype": "float32", "block_size": 128,
                     "prompts_per_level": args.prompts, "rounds": len(split_rounds(args.prompts, args.rounds)),
                     "systems": {s: SYSTEMS[s] for s in systems}, "kv_space_gib": args.kv_space,
                     "ttft": "wall time of one request, max_tokens=1, one at a time, after two full-length warm-up "
                            "requests (a miss, a half hit)",
                     "settle_s": args.settle}}
    print(f"[bench_vllm] logs in {logdir}; VLLM_CPU_OMP_THREADS_BIND={bench.omp_bind}, store servers on CPU "
          f"{bench.aux_cpus or '(unpinned)'}", flush=True)

    def save():
        out["binding"] = binding_summary(bench.records, bench.omp_bind, bench.aux_cpus)
        out["binding"]["store_servers"] = bench.aux_records
        out["processes"] = bench.records
        out["setup"]["wall_s"] = round(time.perf_counter() - t_start)
        out["setup"]["load_avg_now"] = round(os.getloadavg()[0], 2)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")

    k = 0
    for name in shapes:
        k += run_shape(bench, name, k, systems, out, save)
    save()
    write_outputs(out, args)
    return 0


def write_outputs(out: dict, args) -> None:
    md = markdown(out)
    print(md)
    if args.readme:
        p = Path(args.readme)
        p.write_text(replace_block(p.read_text(), md))
    if args.plot:
        plot(out, args.plot)


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(out["shapes"].items())
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 4.2), squeeze=False)
    for ax, (name, shape) in zip(axes[0], shapes):
        systems = [s for s in SYSTEMS if s in shape["runs"][0]["ttft_p50_ms"]]
        x = np.arange(len(shape["runs"]))
        w = 0.85 / max(1, len(systems))
        for i, s in enumerate(systems):
            ax.bar(x + i * w - 0.425 + w / 2, [r["ttft_p50_ms"][s] for r in shape["runs"]], w, label=s)
        ax.set_xticks(x, [f"{r['reuse']:.0%} reuse" for r in shape["runs"]])
        ax.set_yscale("log")  # hits are 10-100x below cold: a linear axis hides the 100% group
        ax.set_ylabel("TTFT p50 (ms, log scale)")
        ax.set_title(f"{name}: {shape['tokens']}-token prompts, {shape['kv_bytes_per_prompt'] / 2**20:.0f} MiB KV each")
        ax.legend(fontsize=7)
    fig.suptitle(f"vLLM {out['machine']['vllm']} CPU, {out['machine']['cores']} cores, one binding for all")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
