"""``kvdirect demo --engine sglang``: the two-instance experiment on real SGLang servers.

Servers (``python -m sglang.launch_server`` on CPU, one model with seeded random
weights written locally), all up at once: ONE phase, and for each prompt of each
reuse level every mode in an order rotated from prompt to prompt, so that drift on
the machine hits every mode alike. Each mode's number is its reader's *first*
request for the prompt, after a writer served the prompt's document and its pages
reached the pool, and with the reader's device cache flushed (every reader, every
prompt: none pays for evicting earlier prompts). The writer of kvdirect's modes is
another server; SGLang's linker and HiCache are their own writers (their device and
host caches flushed before the measured request, so the hit comes from the pool):
eleven servers did not fit in 24 GiB (SGLang's scheduler, tokenizer and detokenizer
processes hold about 1.8 GB per server here; the kernel's OOM killer stopped a run).

* **baseline**: SGLang's own radix cache, prefix not resident (flushed);
* **ideal**: the same server with the shared prefix already on the device;
* **kvdirect** / **kvdirect_mooncake**: ``--radix-cache-backend kvdirect`` with
  layer-wise loading, on the embedded shm pool / on Mooncake (writer: a kvdirect
  radix server on that pool);
* **linker** / **linker_mooncake**: SGLang's own tree with kvdirect's linker
  (``KVDirectLinker``), shm / Mooncake, reading the same pool objects (same keys);
* **sglang_linker**: SGLang's own Mooncake linker on the same master; SGLang refuses
  dense models there as shipped, so its servers load the benchmark-only patch
  ``bench/sglang_demo_patches/dense_linker.py`` ("SGLang Mooncake linker + dense-model patch");
* **hicache**: SGLang's HiCache (device -> host -> L3 Mooncake, same master), with the
  benchmark-only ``bench/sglang_hicache_cpu`` ("SGLang HiCache + CPU transfer patch").

Readers of kvdirect's modes do not write back (the pool holds the writers' documents
only). Besides TTFT (client side, first streamed chunk), every server loads the
benchmark-only timers (``bench/sglang_demo_patches/timers.py``): the time the hit adds
on the request path (``match_prefix`` + ``init_load_back`` + the forward's waits for
layers + the linkers' finish + HiCache's L3 prefetch) and the writer's pool write time
for the document. Greedy outputs must be identical across modes.

On CPU, SGLang's ``torch_native`` attention pads the query to the whole sequence, so
attention over the cached prefix still runs: that bounds the TTFT gain of any cache
(*ideal* is the bound) and hides what a load costs. By default (``attention="prefix"``)
every server of the run, baseline included, loads the benchmark-only patch
``bench/sglang_demo_patches/prefix_attention.py`` ("torch_native attention without the
redundant prefix rows"): the same attention for the new tokens, without the rows for
the cached prefix, as a GPU backend computes it. ``attention="torch_native"`` runs
SGLang as shipped. Runs from a clone of the repository (it uses
``scripts/sglang-env.sh``, ``tests/e2e_sglang/standin`` and ``bench/``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kvdirect.demo import SGLANG_MODES as MODES
from kvdirect.demo.report import bar_plot, change, machine_info, render, ttft_stats
from kvdirect.errors import ConfigError

LABELS = {"baseline": "SGLang cache, prefix not resident", "ideal": "SGLang cache, prefix on device",
          "kvdirect": "kvdirect radix backend, shm", "kvdirect_mooncake": "kvdirect radix backend, Mooncake",
          "linker": "kvdirect linker, shm", "linker_mooncake": "kvdirect linker, Mooncake",
          "sglang_linker": "SGLang Mooncake linker (+dense-model patch)",
          "hicache": "SGLang HiCache L3 Mooncake (+CPU patch)"}
BOUND_NOTE = ("On CPU, SGLang's torch_native attention pads the query to the whole sequence: attention over "
              "the cached prefix still runs, which bounds the TTFT gain of any cache here (ideal is that bound).")
PREFIX_NOTE = ("Every server ran the benchmark-only patch 'torch_native attention without the redundant prefix "
               "rows' (bench/sglang_demo_patches/prefix_attention.py): attention for the new tokens only, so "
               "a hit's TTFT shows what its load costs.")
#: --sglang-attention: what the servers' torch_native attention computes
ATTENTION = {"prefix": "torch_native + prefix_attention patch", "torch_native": "torch_native as shipped"}
#: --sglang-attention: the benchmark-only patches every server of the run loads
ATTENTION_PATCHES = {"prefix": ["prefix_attention"], "torch_native": []}
#: pool-backed modes: the writer that serves each prompt's document first
WRITERS = {"kvdirect": "W-shm", "linker": "W-shm", "kvdirect_mooncake": "W-mooncake",
           "linker_mooncake": "W-mooncake", "sglang_linker": "sglang_linker", "hicache": "hicache"}
MOONCAKE_MODES = ("kvdirect_mooncake", "linker_mooncake", "sglang_linker", "hicache")
#: server-side timers that make up the load time on the request path
REQUEST_PATH = ("match", "load_back", "layer_wait", "finish", "prefetch")
#: where a linker load's time goes, off the request path: started -> layer 0 / last layer
#: complete, and started -> the forward first asks for a layer (same counter class, both linkers)
LINKER_SPANS = ("linker_l0", "linker_all", "linker_reach")
#: memory of one SGLang server on CPU besides its KV pool: its scheduler, tokenizer (HTTP) and
#: detokenizer processes (measured with eleven servers up: 0.73-0.89 + 0.60-0.61 GB RSS for the
#: first two, ~0.3 GB the third)
SERVER_BYTES = 1850 << 20


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
    attention: str = "prefix"        # see ATTENTION

    def __post_init__(self):
        self.reuse = tuple(float(r) for r in self.reuse)
        self.modes = tuple(self.modes)
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ConfigError(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"--sglang-attention: {self.attention!r}; choose from {', '.join(ATTENTION)}")
        if "baseline" not in self.modes:
            raise ConfigError("--modes must include baseline (the comparison is against it)")
        if self.prompts < 1 or self.prompt_len < 2 or self.output_len < 1 or self.page_size < 1:
            raise ConfigError("--prompts, --output-len and --page-size must be >= 1, --prompt-len >= 2")
        if not self.reuse or any(not 0.0 <= r <= 1.0 for r in self.reuse):
            raise ConfigError(f"--reuse values must lie in [0, 1], got {list(self.reuse)}")


def find_repo() -> Path:
    """The clone this demo runs from (it needs files that are not part of the wheel)."""
    need = ("scripts/sglang-env.sh", "tests/e2e_sglang/standin/sgl_kernel/__init__.py",
            "bench/sglang_hicache_cpu/sitecustomize.py", "bench/sglang_demo_patches/sitecustomize.py")
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


def _head_dim(spec: dict) -> int:
    return spec.get("explicit_head_dim") or spec["hidden_size"] // spec["num_attention_heads"]


def weight_bytes(spec: dict) -> int:
    """fp32 weights of the demo's model (each server holds a copy; the transfer shape's are 0.6 GiB)."""
    h, inter, vocab = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    q, kv = spec["num_attention_heads"] * _head_dim(spec), spec["num_key_value_heads"] * _head_dim(spec)
    layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    return 4 * (2 * vocab * h + spec["num_hidden_layers"] * layer)


def kv_bytes_per_token(spec: dict) -> int:
    """fp16 KV bytes per token (SGLang keeps this model's KV in float16 on CPU)."""
    return 2 * spec["num_hidden_layers"] * spec["num_key_value_heads"] * _head_dim(spec) * 2


class Timers:
    """The benchmark-only timers of one server (``bench/sglang_demo_patches/timers.py``):
    ``mark()`` before a request, ``since(mark)`` after it: per name, the sum of ms and pages."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def mark(self) -> dict:
        return {f.name: f.stat().st_size for f in self.path.glob("*.jsonl")}

    def since(self, mark: dict) -> dict:
        out: dict = {}
        for f in self.path.glob("*.jsonl"):
            with open(f, "rb") as fh:
                fh.seek(mark.get(f.name, 0))
                for line in fh.read().decode().splitlines():
                    try:
                        e = json.loads(line)
                    except json.JSONDecodeError:  # a line still being written
                        continue
                    ms, pages = out.get(e["w"], (0.0, 0))
                    out[e["w"]] = (ms + e["ms"], pages + e["p"])
        return out


class _Servers:
    """The servers of the run; all stopped at the end, whatever happens."""

    #: servers started at once: SGLang on CPU sizes its KV pool from the memory free before and
    #: after loading the weights, so servers allocating at the same moment can make one of them
    #: refuse to start ("Loaded weights leave no GPU memory for the KV cache"; seen with 11)
    WAVE = 4

    def __init__(self, python: Path, model: str, standin: Path, patches: Path, page_size: int, logdir: Path,
                 progress: bool, every: tuple = ()):
        self.python, self.model, self.standin, self.patches = str(python), model, standin, patches
        self.every = list(every)  # patches every server loads
        self.page_size, self.logdir, self.progress = page_size, logdir, progress
        self.all, self.timers = [], {}

    def start(self, specs: dict) -> dict:
        from kvdirect.demo.sglang_cpu.server import Server

        servers, started = {}, []
        for name, kw in specs.items():
            if len(started) == self.WAVE:  # see WAVE
                for s in started:
                    s.wait_ready()
                started = []
            kw = dict(kw)
            patches = ["timers", *self.every, *kw.pop("patches", [])]
            tdir = self.logdir / "timers" / name
            env = {**kw.pop("env", {}), "KVDIRECT_BENCH_PATCHES": ",".join(patches),
                   "KVDIRECT_BENCH_TIMERS": str(tdir)}
            s = Server(self.python, self.model, page_size=self.page_size, pythonpath=[self.patches, self.standin],
                       log_dir=str(self.logdir), name=name, env=env, **kw)
            s.launch()
            started.append(s)
            self.all.append(s)
            self.timers[name] = Timers(tdir)
            servers[name] = s
        _say(self.progress, f"starting {len(servers)} servers: {', '.join(servers)} (SGLang start-up: "
                            "15-60 s each on 2 cores)")
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
        time.sleep(0.05)


def _gen(server, ids, n):
    from kvdirect.demo.sglang_cpu.client import cached_tokens

    r = server.generate(ids, n)
    return {"ttft_ms": r["ttft_s"] * 1e3, "out": r["output_ids"], "hit": cached_tokens(r["meta_info"])}


def _flush(server) -> None:
    from kvdirect.demo.sglang_cpu import client

    _wait(lambda: client.post(server.url, "/flush_cache")[0] == 200, 30, f"{server.name} /flush_cache")


def linker_args(url: str) -> list[str]:
    cfg = {"linker": "KVDirectLinker", "linker_module_path": "kvdirect.sglang.linker",
           "linker_extra_config": {"store": url, "allow_no_store": False, "write_back": False}}
    return ["--enable-unified-cache-external-linker", "--unified-cache-external-linker-backend", "dynamic",
            "--unified-cache-external-linker-config", json.dumps(cfg)]


def server_specs(cfg: SGLangDemoConfig, pool: str | None, mooncake_url: str | None, mooncake_env: dict,
                 max_tokens: int) -> dict:
    """Name -> Server keyword arguments of every server the modes need (writers first)."""
    common = dict(max_total_tokens=max_tokens)
    modes = set(cfg.modes)
    specs = {}
    radix = lambda url, **kv: dict(kvdirect_config={"store": url, "allow_no_store": False, **kv}, **common)  # noqa
    if modes & {"kvdirect", "linker"}:
        specs["W-shm"] = radix(pool)
    if modes & {"kvdirect_mooncake", "linker_mooncake"}:
        specs["W-mooncake"] = radix(mooncake_url)
    sgl_linker = dict(radix="sglang", patches=["dense_linker"], env=mooncake_env,
                      args=["--enable-unified-cache-external-linker", "--unified-cache-external-linker-backend",
                            "mooncake"], **common)
    hicache = dict(radix="sglang", patches=["hicache_cpu"], env=mooncake_env, **common,
                   args=["--enable-hierarchical-cache", "--hicache-io-backend", "direct", "--hicache-mem-layout",
                         "page_first_direct", "--hicache-write-policy", "write_through",
                         "--hicache-storage-prefetch-policy", "wait_complete", "--hicache-storage-backend",
                         "mooncake",
                         # the host tier at twice the device pool, stated: SGLang's auto-sizing keeps 10 GiB of
                         # the host free and refused HiCache once eleven servers were up (no host memory left)
                         "--hicache-ratio", "2"])
    specs["sglang"] = dict(radix="sglang", **common)  # baseline and ideal
    readers = {"kvdirect": radix(pool, write_back=False, layerwise=True),
               "kvdirect_mooncake": radix(mooncake_url, write_back=False, layerwise=True),
               "linker": dict(radix="sglang", args=linker_args(pool or ""), **common),
               "linker_mooncake": dict(radix="sglang", args=linker_args(mooncake_url or ""), **common),
               "sglang_linker": dict(sgl_linker), "hicache": dict(hicache)}
    for mode in cfg.modes:
        if mode in readers:
            specs[mode] = readers[mode]
    return specs


def memory_estimate(cfg: SGLangDemoConfig, specs: dict, kv_token: int, max_tokens: int, pool_bytes: int,
                    segment_bytes: int) -> int:
    """Bytes the run needs: servers, their KV pools, the shm pool, Mooncake segments, HiCache host pools."""
    n_mc = sum(1 for name in specs if name in MOONCAKE_MODES or name == "W-mooncake")
    n_hic = sum(1 for name in specs if name == "hicache")
    return (len(specs) * (SERVER_BYTES + weight_bytes(cfg.spec) + max_tokens * kv_token)
            + (pool_bytes if "W-shm" in specs else 0)
            + n_mc * segment_bytes + n_hic * 2 * max_tokens * kv_token)


def run_demo(cfg: SGLangDemoConfig, *, progress: bool = True) -> dict:
    import shutil
    import signal

    from kvdirect.engine.model import DEFAULT_SPEC
    from kvdirect.runtime import available_memory
    from kvdirect.services import find_mooncake_master, mooncake_store_url, start_mooncake_master
    from kvdirect.stores.shm import destroy_pool

    t_start = time.monotonic()
    # a SIGTERM (e.g. `timeout`) must still stop the servers and remove the pool: run the finally blocks
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    repo = find_repo()
    spec = dict(DEFAULT_SPEC, **cfg.spec)
    spec.setdefault("max_position_embeddings", max(8192, cfg.prompt_len + cfg.output_len + 64))
    cfg.spec = spec
    levels = workload(cfg)
    kv_token = kv_bytes_per_token(spec)
    doc_pages = cfg.prompt_len // cfg.page_size
    per_prompt = (cfg.prompt_len + cfg.output_len + cfg.page_size) * kv_token
    # room for a prompt and a document on each server; more where the KV is small
    max_tokens = max(2 * (cfg.prompt_len + cfg.output_len + cfg.page_size), min(16384, (256 << 20) // kv_token))
    pool_bytes = int(8 * per_prompt) + (64 << 20)            # shm: a few documents (LRU beyond)
    # each Mooncake client's contribution: a document and a prompt (LRU beyond); four or more clients
    segment_bytes = max(int(2 * per_prompt), 256 << 20)
    mooncake_env = {"MOONCAKE_PROTOCOL": "tcp", "MOONCAKE_GLOBAL_SEGMENT_SIZE": str(segment_bytes),
                    "MOONCAKE_DEVICE": "", "MC_TCP_BIND_ADDRESS": "127.0.0.1"}
    pool_name = f"kvdirect-sgl-demo-{uuid.uuid4().hex[:8]}"
    pool = f"shm://{pool_name}?size={pool_bytes}"
    specs = server_specs(cfg, pool, "mooncake://pending", mooncake_env, max_tokens)
    need = memory_estimate(cfg, specs, kv_token, max_tokens, pool_bytes, segment_bytes)
    have = available_memory()
    if need > 0.9 * have:
        raise ConfigError(f"the {len(specs)} servers of modes {','.join(cfg.modes)} need about {need / 2**30:.1f} GiB "
                          f"and {have / 2**30:.1f} GiB are available: run fewer --modes at once (each pool-backed "
                          "mode adds a reader, each store a writer), or a shorter --prompt-len")
    python = ensure_env(repo, cfg.sglang_env, progress)
    work = Path(tempfile.mkdtemp(prefix="kvdirect-sglang-demo-"))
    _say(progress, f"writing the model (seeded random weights) to {work / 'model'}")
    r = subprocess.run([str(python), "-W", "ignore", "-m", "kvdirect.demo.sglang_cpu.model", str(work / "model"),
                        "--seed", str(cfg.seed), "--spec", json.dumps(spec)], capture_output=True, text=True, cwd="/")
    if r.returncode:
        raise ConfigError(f"writing the demo model failed: {r.stderr.strip()[-500:]}")
    recs = {m: [[None] * len(p) for _, p in levels] for m in cfg.modes}
    servers = _Servers(python, str(work / "model"), repo / "tests" / "e2e_sglang" / "standin",
                       repo / "bench" / "sglang_demo_patches", cfg.page_size, work, progress,
                       every=ATTENTION_PATCHES[cfg.attention])
    master = None
    try:
        if set(cfg.modes) & set(MOONCAKE_MODES):
            if find_mooncake_master() is None and not (python.parent / "mooncake_master").exists():
                raise ConfigError("mooncake_master not found (pip install 'kvdirect[mooncake]')")
            os.environ["PATH"] = f"{os.environ.get('PATH', '')}{os.pathsep}{python.parent}"
            master = start_mooncake_master()
            # every client of the master, SGLang's and kvdirect's, must find every other's segment:
            # the same HTTP metadata server for all (P2PHANDSHAKE clients are invisible to it)
            mooncake_env.update(MOONCAKE_MASTER=f"127.0.0.1:{master.ports['rpc']}", MOONCAKE_LOCAL_HOSTNAME="127.0.0.1",
                                MOONCAKE_TE_META_DATA_SERVER=f"http://127.0.0.1:{master.ports['http']}/metadata")
        mc_url = (mooncake_store_url("127.0.0.1", master.ports["rpc"], master.ports["http"],
                                     segment=str(segment_bytes), buffer=str(max(int(per_prompt) + (16 << 20),
                                                                                64 << 20)), timeout=60)
                  if master else None)
        s = servers.start(server_specs(cfg, pool, mc_url, mooncake_env, max_tokens))
        writers = sorted({WRITERS[m] for m in cfg.modes if m in WRITERS}, key=list(s).index)
        # warm every server up (first-request costs: kernels, allocations), untimed; the prompt shares
        # nothing with the workload (token 0 never starts a workload sequence)
        warm = np.random.default_rng([cfg.seed, 0xAA]).integers(1, int(spec["vocab_size"]), cfg.prompt_len)
        warm[0] = 0
        for srv in s.values():
            _gen(srv, warm, cfg.output_len)
            _flush(srv)
        for li, (shared, pairs) in enumerate(levels):
            keep = min(shared, cfg.prompt_len - 1) // cfg.page_size * cfg.page_size
            for i, (doc, prompt) in enumerate(pairs):
                _say(progress, f"reuse {100 * cfg.reuse[li]:.0f}%, prompt {i + 1}/{len(pairs)}")
                written = {}
                if shared:  # each writer serves the document; wait until its pages are in the pool
                    for w in writers:
                        mark = servers.timers[w].mark()
                        _gen(s[w], doc, cfg.output_len)
                        try:
                            _wait(lambda: servers.timers[w].since(mark).get("put", (0, 0))[1] >= doc_pages, 180,
                                  f"{w}'s pages of the document in the pool")
                        except ConfigError as e:
                            raise ConfigError(f"{e}; the end of its log:\n{s[w].log_tail(30)}") from None
                        written[w] = servers.timers[w].since(mark).get("put", (0.0, 0))
                order = list(cfg.modes)
                shift = (li * len(pairs) + i) % len(order)  # rotate the order: drift hits each mode alike
                for mode in order[shift:] + order[:shift]:
                    if mode in ("baseline", "ideal"):
                        _flush(s["sglang"])
                        if mode == "ideal" and keep:
                            _gen(s["sglang"], prompt[:keep + 1], 1)  # the shared prefix is now on device
                        recs[mode][li][i] = _gen(s["sglang"], prompt, cfg.output_len)
                        continue
                    _flush(s[mode])  # the pages come from the pool (a self-writer holds the document)
                    mark = servers.timers[mode].mark()
                    rec = _gen(s[mode], prompt, cfg.output_len)
                    t = servers.timers[mode].since(mark)
                    rec["load_ms"] = sum(t.get(k, (0.0, 0))[0] for k in REQUEST_PATH)
                    rec["timers_ms"] = {k: v[0] for k, v in t.items() if k in REQUEST_PATH + LINKER_SPANS}
                    rec["writeback_ms"] = written.get(WRITERS[mode], (0.0, 0))[0]
                    recs[mode][li][i] = rec
    finally:
        servers.stop()
        if master is not None:
            master.stop()
        destroy_pool(pool_name, missing_ok=True)
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
            if mode not in ("baseline", "ideal"):
                run[f"hit_tokens_{mode}"] = float(np.mean([r["hit"]["total"] - r["hit"]["device"] for r in rs]))
                run[f"load_ms_p50_{mode}"] = float(np.percentile([r.get("load_ms", 0.0) for r in rs], 50))
                parts = sorted({k for r in rs for k in r.get("timers_ms", {}) if k in REQUEST_PATH})
                run[f"load_parts_ms_p50_{mode}"] = {k: float(np.percentile([r["timers_ms"].get(k, 0.0) for r in rs],
                                                                           50)) for k in parts}
                spans = sorted({k for r in rs for k in r.get("timers_ms", {}) if k in LINKER_SPANS})
                if spans:
                    run[f"linker_spans_ms_p50_{mode}"] = {k: float(np.percentile(
                        [r["timers_ms"].get(k, 0.0) for r in rs], 50)) for k in spans}
                run[f"writeback_ms_p50_{mode}"] = float(np.percentile([r.get("writeback_ms", 0.0) for r in rs], 50))
        if "kvdirect" in cfg.modes:
            kv = recs["kvdirect"][li]
            run["hit_rate"] = sum(r["hit"]["total"] for r in kv) / (len(kv) * cfg.prompt_len)
        base = run["ttft_p50_ms_baseline"]
        for mode in cfg.modes:
            if mode != "baseline":
                run[f"ttft_change_{mode}"] = run[f"ttft_p50_ms_{mode}"] / base - 1.0  # negative = faster
                if "ideal" in cfg.modes and mode != "ideal":
                    run[f"{mode}_vs_ideal"] = run[f"ttft_p50_ms_{mode}"] / run["ttft_p50_ms_ideal"] - 1.0
        # the goals: load time on the same Mooncake store against SGLang's linker; pool hit against device hit
        sgl = run.get("load_ms_p50_sglang_linker")
        for mode in ("kvdirect_mooncake", "linker_mooncake"):
            if sgl and f"load_ms_p50_{mode}" in run:
                run[f"load_ratio_{mode}_vs_sglang_linker"] = run[f"load_ms_p50_{mode}"] / sgl
        run["outputs_identical"] = bool(identical)
        runs.append(run)
    cfg_d = asdict(cfg)
    cfg_d["reuse"], cfg_d["modes"] = list(cfg.reuse), list(cfg.modes)
    return {"engine": "sglang", "sglang": "0.5.23", "machine": machine_info("cpu"), "config": cfg_d,
            "labels": {m: LABELS[m] for m in cfg.modes}, "attention": ATTENTION[cfg.attention],
            "note": PREFIX_NOTE if cfg.attention == "prefix" else BOUND_NOTE, "runs": runs,
            "outputs_identical": all(r["outputs_identical"] for r in runs), "wall_s": wall_s}


def render_table(result: dict) -> str:
    modes = result["config"]["modes"]
    pooled = [m for m in modes if m not in ("baseline", "ideal")]
    head = ["reuse"] + [f"{m} p50 ms" for m in modes]
    head += [f"{m} vs ideal" for m in pooled if "ideal" in modes]
    head += [f"{m} load ms" for m in pooled] + ["outputs identical"]
    rows = []
    for r in result["runs"]:
        row = [f"{100 * r['reuse']:.0f}%"] + [f"{r[f'ttft_p50_ms_{m}']:.0f}" for m in modes]
        row += [change(r.get(f"{m}_vs_ideal")) for m in pooled if "ideal" in modes]
        row += [f"{r[f'load_ms_p50_{m}']:.1f}" for m in pooled]
        row += ["yes" if r["outputs_identical"] else "NO"]
        rows.append(row)
    notes = ["", "p50 ms: TTFT of the reader's first request; vs ideal: over the prefix-on-device time; load ms: "
             "time the hit added on the request path (server-side timers, p50).", result["note"]]
    return "\n".join([render(head, rows), *notes])


def plot(result: dict, path: str) -> None:
    runs, modes = result["runs"], result["config"]["modes"]
    bar_plot(path, [f"{100 * r['reuse']:.0f}%" for r in runs],
             {result["labels"][m]: [r[f"ttft_p50_ms_{m}"] for r in runs] for m in modes},
             xlabel="prefix reuse", ylabel="TTFT p50 (ms), reader's first request",
             title="SGLang 0.5.23 on CPU: kvdirect vs SGLang's " + ", ".join(
                 w for w, ms in (("cache", ("baseline",)), ("Mooncake linker", ("sglang_linker",)),
                                 ("HiCache", ("hicache",))) if set(ms) & set(modes)),
             figsize=(11, 5), footnote=("every server: torch_native + benchmark-only prefix_attention patch"
                                        if result["config"].get("attention") == "prefix" else
                                        "torch_native attention on CPU bounds every cache's gain (ideal)"))
