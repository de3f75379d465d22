"""``kvdirect demo --engine sglang``: the two-instance experiment on real SGLang servers.

Servers (``python -m sglang.launch_server`` on CPU, one model with seeded random
weights written locally), per prompt of each reuse level:

* **kvdirect**: server A serves the document and writes its KV back to an
  embedded shm pool; server B's first request for the prompt (sharing 0/50/100%
  of the document) loads the shared pages from the pool (``kvdirect_layerwise``:
  a third server doing the same with layer-wise loading).
* **baseline**: SGLang's own radix cache with the prefix not resident (flushed).
* **ideal**: the same server with the shared prefix already resident on device.
* **hicache** / **hicache_file**: SGLang's own HiCache (device -> host -> L3) with
  an L3 Mooncake store / the L3 file store: server H1 serves the document, H2's
  first request hits L3. HiCache does not run on CPU as shipped: these servers
  load the benchmark-only patch ``bench/sglang_hicache_cpu`` ("SGLang HiCache +
  CPU transfer patch": SGLang's control path, torch copies in place of its CUDA
  copy kernels).

Every mode gets the same prompts; greedy outputs must be identical across modes.
TTFT is measured by the client (first streamed chunk). On CPU SGLang's
``torch_native`` attention pads the query to the whole sequence, so attention
over the cached prefix still runs: that bounds the gain of any cache (compare
with *ideal*, the best a cache can do in that server).

Runs from a clone of the repository: it uses ``scripts/sglang-env.sh`` (the
SGLang environment), ``tests/e2e_sglang/standin`` (the ``sgl_kernel`` import
stand-in) and ``bench/sglang_hicache_cpu``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kvdirect.demo import SGLANG_MODES as MODES
from kvdirect.demo.report import bar_plot, change, machine_info, render, ttft_stats
from kvdirect.errors import ConfigError

LABELS = {"baseline": "SGLang cache, prefix not resident", "ideal": "SGLang cache, prefix on device",
          "kvdirect": "kvdirect (shm pool)", "kvdirect_layerwise": "kvdirect, layer-wise",
          "hicache": "SGLang HiCache L3 Mooncake (+CPU patch)", "hicache_file": "SGLang HiCache L3 file (+CPU patch)"}
BOUND_NOTE = ("On CPU, SGLang's torch_native attention pads the query to the whole sequence: attention over "
              "the cached prefix still runs, which bounds the TTFT gain of any cache here (ideal is that bound).")


@dataclass
class SGLangDemoConfig:
    prompts: int = 6                  # per reuse level
    prompt_len: int = 3584
    reuse: tuple = (0.0, 0.5, 1.0)
    output_len: int = 4
    page_size: int = 64
    modes: tuple = MODES
    seed: int = 0
    spec: dict = field(default_factory=dict)  # ModelSpec fields (default: the own-engine demo's model)
    sglang_env: str | None = None    # the SGLang environment (default: scripts/sglang-env.sh's)

    def __post_init__(self):
        self.reuse = tuple(float(r) for r in self.reuse)
        self.modes = tuple(self.modes)
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ConfigError(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
        for m in ("baseline", "kvdirect"):
            if m not in self.modes:
                raise ConfigError(f"--modes must include {m} (the comparison is against it)")
        if self.prompts < 1 or self.prompt_len < 2 or self.output_len < 1 or self.page_size < 1:
            raise ConfigError("--prompts, --output-len and --page-size must be >= 1, --prompt-len >= 2")
        if not self.reuse or any(not 0.0 <= r <= 1.0 for r in self.reuse):
            raise ConfigError(f"--reuse values must lie in [0, 1], got {list(self.reuse)}")


def find_repo() -> Path:
    """The clone this demo runs from (it needs files that are not part of the wheel)."""
    need = ("scripts/sglang-env.sh", "tests/e2e_sglang/standin/sgl_kernel/__init__.py",
            "bench/sglang_hicache_cpu/sitecustomize.py")
    for base in [Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents]:
        if all((base / n).exists() for n in need):
            return base
    raise ConfigError("it runs from a clone of the kvdirect repository (it uses "
                      + ", ".join(need) + "): cd into the clone and run it again")


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[sglang demo] {text}", file=sys.stderr, flush=True)


def ensure_env(repo: Path, env_dir: str | None, progress: bool) -> Path:
    """Build or update the SGLang environment (scripts/sglang-env.sh); its Python."""
    cmd = ["bash", str(repo / "scripts" / "sglang-env.sh")] + ([env_dir] if env_dir else [])
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True)
    if r.returncode:
        raise ConfigError(f"scripts/sglang-env.sh failed: {(r.stderr or '').strip()[-500:]}")
    return Path(r.stdout.strip().splitlines()[-1]) / "bin" / "python"


def workload(cfg: SGLangDemoConfig):
    """Per level: (shared tokens, [(document, prompt)]). Documents never repeat, and the
    first token tells documents, prompts and levels apart."""
    vocab = int(cfg.spec.get("vocab_size", 8192))
    rng = np.random.default_rng(cfg.seed)
    levels = []
    n = 0
    for reuse in cfg.reuse:
        shared = int(round(reuse * cfg.prompt_len))
        pairs = []
        for _ in range(cfg.prompts):
            doc = rng.integers(1, vocab, cfg.prompt_len, dtype=np.int64)
            doc[0] = 1 + n
            tail = rng.integers(1, vocab, cfg.prompt_len - shared, dtype=np.int64)
            if len(tail):
                tail[0] = vocab - 1 - n  # never continues the document
            prompt = np.concatenate([doc[:shared], tail]) if shared < cfg.prompt_len else doc.copy()
            if shared == 0:
                prompt[0] = vocab - 1 - n
            pairs.append((doc, prompt))
            n += 1
        levels.append((shared, pairs))
    return levels


class _Servers:
    """Servers of one phase; all stopped at the end, whatever happens."""

    def __init__(self, python: Path, model: str, pythonpath, page_size: int, logdir: str, progress: bool):
        self.python, self.model, self.pythonpath = str(python), model, [str(p) for p in pythonpath]
        self.page_size, self.logdir, self.progress = page_size, logdir, progress
        self.all = []

    def start(self, specs: dict) -> dict:
        from kvdirect.demo.sglang_cpu.server import Server

        servers = {}
        for name, kw in specs.items():
            kw = dict(kw)
            s = Server(self.python, self.model, page_size=self.page_size, pythonpath=self.pythonpath + list(
                kw.pop("more_path", [])), log_dir=self.logdir, name=name, **kw)
            s._log = open(s.log_path, "wb")
            s.proc = subprocess.Popen(s.cmd, stdout=s._log, stderr=subprocess.STDOUT, env=s.env,
                                      start_new_session=True, stdin=subprocess.DEVNULL)
            self.all.append(s)
            servers[name] = s
        _say(self.progress, f"starting {', '.join(servers)} (SGLang start-up: 15-60 s each on 2 cores)")
        for s in servers.values():
            s.wait_ready()
        return servers

    def stop(self):
        for s in self.all:
            s.stop()
        self.all.clear()


def _wait(pred, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise ConfigError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _wait_written(count, at_least: int, timeout: float, what: str) -> None:
    """Wait until a store holds ``at_least`` objects and stopped growing for 0.5 s
    (an L3 store may keep K and V, or several pages, per object)."""
    _wait(lambda: count() >= at_least, timeout, what)
    last, since = count(), time.monotonic()
    while time.monotonic() - since < 0.5:
        time.sleep(0.1)
        now = count()
        if now != last:
            last, since = now, time.monotonic()


def _shm_objects(url: str) -> int:
    from kvdirect.stores import open_store

    s = open_store(url)
    try:
        return int(s.stats().get("objects", 0))
    finally:
        s.close()


def _mooncake_keys(metrics_url: str) -> int:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    m = re.search(r"^master_key_count (\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def _files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def _gen(server, ids, n):
    r = server.generate(ids, n)
    from kvdirect.demo.sglang_cpu.client import cached_tokens

    return {"ttft_ms": r["ttft_s"] * 1e3, "out": r["output_ids"], "hit": cached_tokens(r["meta_info"])}


def _flush(server) -> None:
    from kvdirect.demo.sglang_cpu import client

    _wait(lambda: client.post(server.url, "/flush_cache")[0] == 200, 30, f"{server.name} /flush_cache")


def run_demo(cfg: SGLangDemoConfig, *, progress: bool = True) -> dict:
    from kvdirect.engine.model import DEFAULT_SPEC
    from kvdirect.services import find_mooncake_master, start_mooncake_master
    from kvdirect.stores.shm import destroy_pool

    import signal

    t_start = time.monotonic()
    # a SIGTERM (e.g. `timeout`) must still stop the servers and remove the pool: run the finally blocks
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    repo = find_repo()
    python = ensure_env(repo, cfg.sglang_env, progress)
    spec = dict(DEFAULT_SPEC, **cfg.spec)
    spec.setdefault("max_position_embeddings", max(8192, cfg.prompt_len + cfg.output_len + 64))
    cfg.spec = spec
    work = Path(tempfile.mkdtemp(prefix="kvdirect-sglang-demo-"))
    standin = repo / "tests" / "e2e_sglang" / "standin"
    patch = repo / "bench" / "sglang_hicache_cpu"
    _say(progress, f"writing the model (seeded random weights) to {work / 'model'}")
    r = subprocess.run([str(python), "-W", "ignore", "-m", "kvdirect.demo.sglang_cpu.model", str(work / "model"),
                        "--seed", str(cfg.seed), "--spec", json.dumps(spec)],
                       capture_output=True, text=True, cwd="/")
    if r.returncode:
        raise ConfigError(f"writing the demo model failed: {r.stderr.strip()[-500:]}")
    model = str(work / "model")
    levels = workload(cfg)
    n_prompts = sum(len(p) for _, p in levels)
    kv_bytes = 2 * spec["num_hidden_layers"] * spec["num_key_value_heads"] * (
        spec["hidden_size"] // spec["num_attention_heads"]) * 4
    pool_bytes = int(n_prompts * 3 * (cfg.prompt_len + cfg.output_len) * kv_bytes * 1.5) + (64 << 20)
    max_tokens = max(4 * (cfg.prompt_len + cfg.output_len + cfg.page_size), 16384)
    recs = {m: [[None] * len(p) for _, p in levels] for m in cfg.modes}
    servers = _Servers(python, model, [standin], cfg.page_size, str(work), progress)
    pool_name = f"kvdirect-sgl-demo-{uuid.uuid4().hex[:8]}"
    pool = f"shm://{pool_name}?size={pool_bytes}"
    kv_cfg = {"store": pool, "allow_no_store": False}
    common = dict(max_total_tokens=max_tokens)
    try:
        # ---- phase 1: kvdirect A -> B (and B layer-wise), SGLang's own cache (baseline, ideal)
        # B and B-layerwise only load: written back, one's prompt would be in the pool when
        # the other serves the same prompt, and it would hit far more than A's document
        reader = {**kv_cfg, "write_back": False}
        specs = {"A": dict(kvdirect_config=kv_cfg, **common), "B": dict(kvdirect_config=reader, **common),
                 "sglang": dict(radix="sglang", **common)}
        if "kvdirect_layerwise" in cfg.modes:
            specs["B-layerwise"] = dict(kvdirect_config={**reader, "layerwise": True}, **common)
        s = servers.start(specs)
        for li, (shared, pairs) in enumerate(levels):
            keep = min(shared, cfg.prompt_len - 1) // cfg.page_size * cfg.page_size
            for i, (doc, prompt) in enumerate(pairs):
                _say(progress, f"kvdirect/baseline/ideal: reuse {100 * cfg.reuse[li]:.0f}%, prompt {i + 1}/{len(pairs)}")
                if shared:
                    before = _shm_objects(pool)
                    _gen(s["A"], doc, cfg.output_len)
                    _wait_written(lambda: _shm_objects(pool), before + cfg.prompt_len // cfg.page_size, 60,
                                  "server A's pages in the pool")
                runs = [("kvdirect", "B")] + ([("kvdirect_layerwise", "B-layerwise")] if "B-layerwise" in s else [])
                runs.append(("baseline", None))
                if "ideal" in cfg.modes:
                    runs.append(("ideal", None))
                shift = (li * len(pairs) + i) % len(runs)  # rotate the order: drift hits each mode alike
                for mode, name in runs[shift:] + runs[:shift]:
                    if name:
                        recs[mode][li][i] = _gen(s[name], prompt, cfg.output_len)
                    else:
                        _flush(s["sglang"])
                        if mode == "ideal" and keep:
                            _gen(s["sglang"], prompt[:keep + 1], 1)  # the shared prefix is now on device
                        recs[mode][li][i] = _gen(s["sglang"], prompt, cfg.output_len)
        servers.stop()
        destroy_pool(pool_name, missing_ok=True)

        # ---- phase 2 and 3: SGLang HiCache with an L3 store (benchmark-only CPU patch)
        hicache_args = ["--enable-hierarchical-cache", "--hicache-io-backend", "direct",
                        "--hicache-mem-layout", "page_first_direct", "--hicache-write-policy", "write_through",
                        "--hicache-storage-prefetch-policy", "wait_complete"]
        for mode in ("hicache", "hicache_file"):
            if mode not in cfg.modes:
                continue
            master = None
            try:
                if mode == "hicache":
                    if find_mooncake_master() is None and not (python.parent / "mooncake_master").exists():
                        raise ConfigError("mooncake_master not found (pip install 'kvdirect[mooncake]')")
                    os.environ["PATH"] = f"{os.environ.get('PATH', '')}{os.pathsep}{python.parent}"
                    master = start_mooncake_master()
                    env = {"MOONCAKE_MASTER": f"127.0.0.1:{master.ports['rpc']}", "MOONCAKE_PROTOCOL": "tcp",
                           "MOONCAKE_GLOBAL_SEGMENT_SIZE": str(max(pool_bytes // 2, 256 << 20)),
                           "MOONCAKE_TE_META_DATA_SERVER": "P2PHANDSHAKE", "MOONCAKE_DEVICE": "",
                           "MC_TCP_BIND_ADDRESS": "127.0.0.1"}
                    args = hicache_args + ["--hicache-storage-backend", "mooncake"]
                    metrics = f"http://127.0.0.1:{master.ports['metrics']}/metrics"
                    count = lambda: _mooncake_keys(metrics)
                else:
                    l3 = work / "hicache-l3"
                    l3.mkdir()
                    env = {"SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR": str(l3)}
                    args = hicache_args + ["--hicache-storage-backend", "file"]
                    count = lambda: _files(l3)
                kw = dict(radix="sglang", args=args, env=env, more_path=[patch], **common)
                h = servers.start({f"{mode}-1": kw, f"{mode}-2": dict(kw)})
                h1, h2 = h[f"{mode}-1"], h[f"{mode}-2"]
                for li, (shared, pairs) in enumerate(levels):
                    for i, (doc, prompt) in enumerate(pairs):
                        _say(progress, f"{mode}: reuse {100 * cfg.reuse[li]:.0f}%, prompt {i + 1}/{len(pairs)}")
                        if shared:
                            before = count()
                            _gen(h1, doc, cfg.output_len)
                            _wait_written(count, before + cfg.prompt_len // cfg.page_size, 120,
                                          f"{mode} L3 write-through of server 1's pages")
                        recs[mode][li][i] = _gen(h2, prompt, cfg.output_len)
            finally:
                servers.stop()
                if master is not None:
                    master.stop()
    finally:
        servers.stop()
        destroy_pool(pool_name, missing_ok=True)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return summarise(cfg, levels, recs, time.monotonic() - t_start)


def summarise(cfg: SGLangDemoConfig, levels, recs, wall_s: float) -> dict:
    runs = []
    for li, (shared, pairs) in enumerate(levels):
        run = {"reuse": cfg.reuse[li], "prompts": len(pairs), "shared_tokens": shared}
        identical = True
        for mode in cfg.modes:
            rs = recs[mode][li]
            run.update(ttft_stats([r["ttft_ms"] for r in rs], mode))
            identical &= all(r["out"] == b["out"] for r, b in zip(rs, recs["baseline"][li]))
        kv = recs["kvdirect"][li]
        run["hit_tokens_kvdirect"] = float(np.mean([r["hit"]["pool"] for r in kv]))
        run["hit_rate"] = sum(r["hit"]["pool"] + r["hit"]["device"] for r in kv) / (len(kv) * cfg.prompt_len)
        for mode in ("hicache", "hicache_file"):
            if mode in cfg.modes:
                run[f"hit_tokens_{mode}"] = float(np.mean([r["hit"]["storage"] + r["hit"]["pool"]
                                                           for r in recs[mode][li]]))
        if "kvdirect_layerwise" in cfg.modes:
            run["hit_tokens_kvdirect_layerwise"] = float(np.mean([r["hit"]["pool"]
                                                                  for r in recs["kvdirect_layerwise"][li]]))
        base = run["ttft_p50_ms_baseline"]
        for mode in cfg.modes:
            if mode != "baseline":
                run[f"ttft_change_{mode}"] = run[f"ttft_p50_ms_{mode}"] / base - 1.0  # negative = faster
                if "ideal" in cfg.modes and mode != "ideal":
                    run[f"{mode}_vs_ideal"] = run[f"ttft_p50_ms_{mode}"] / run["ttft_p50_ms_ideal"] - 1.0
        run["outputs_identical"] = bool(identical)
        runs.append(run)
    cfg_d = asdict(cfg)
    cfg_d["reuse"], cfg_d["modes"] = list(cfg.reuse), list(cfg.modes)
    return {"engine": "sglang", "sglang": "0.5.23", "machine": machine_info("cpu"), "config": cfg_d,
            "labels": {m: LABELS[m] for m in cfg.modes}, "note": BOUND_NOTE, "runs": runs,
            "outputs_identical": all(r["outputs_identical"] for r in runs), "wall_s": wall_s}


def render_table(result: dict) -> str:
    modes = result["config"]["modes"]
    head = ["reuse"] + [f"{m} p50 ms" for m in modes] + ["TTFT change (kvdirect)", "kvdirect vs ideal"]
    head += [f"{m} vs ideal" for m in modes if m.startswith("hicache") or m == "kvdirect_layerwise"]
    head += ["pool hit tokens", "outputs identical"]
    rows = []
    for r in result["runs"]:
        row = [f"{100 * r['reuse']:.0f}%"] + [f"{r[f'ttft_p50_ms_{m}']:.0f}" for m in modes]
        row += [change(r.get("ttft_change_kvdirect")), change(r.get("kvdirect_vs_ideal"))]
        row += [change(r.get(f"{m}_vs_ideal")) for m in modes if m.startswith("hicache") or m == "kvdirect_layerwise"]
        row += [f"{r['hit_tokens_kvdirect']:.0f}", "yes" if r["outputs_identical"] else "NO"]
        rows.append(row)
    return "\n".join([render(head, rows), "", "TTFT change: negative = faster than baseline; "
                      "vs ideal: over the prefix-on-device time.", result["note"]])


def plot(result: dict, path: str) -> None:
    runs, modes = result["runs"], result["config"]["modes"]
    bar_plot(path, [f"{100 * r['reuse']:.0f}%" for r in runs],
             {result["labels"][m]: [r[f"ttft_p50_ms_{m}"] for r in runs] for m in modes},
             xlabel="prefix reuse", ylabel="TTFT p50 (ms), second server's first request",
             title="SGLang 0.5.23 on CPU: kvdirect vs SGLang's cache and HiCache", figsize=(10, 4.8),
             footnote="torch_native attention on CPU bounds every cache's gain (ideal)")
