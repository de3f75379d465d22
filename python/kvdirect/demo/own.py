"""The reference experiment: two serving instances sharing one KV pool.

Instance A and instance B are separate processes (multiprocessing spawn) with
the same seeded model. A serves its documents with kvdirect and writes their KV
back to the pool. B then serves prompts that share a fraction (0, 50, 100%) of
their leading tokens with A's documents, each prompt three ways, back to back:

* baseline -- no cache: the whole prompt is prefilled;
* ideal    -- the shared prefix is already resident in B's device KV pool
              (no transfer): only the suffix is prefilled;
* kvdirect -- ``kvdirect.KVDirectCache`` matches the prefix, loads A's pages
              from the pool into B's device pool, and B prefills the suffix.

TTFT (request arrival to first token) is measured for each; outputs must be
identical (greedy tokens) and first-token logits are compared with the
baseline's. ``run_demo`` returns the JSON-able result; ``kvdirect demo`` is
the command-line front end (``kvdirect.cli.demo``); tables, chart and JSON are
written by ``kvdirect.demo.report``.

One sign convention everywhere (CLI table, JSON, README): a *change* is a
ratio minus one, negative when faster. Per reuse level (``runs[i]``):

* ``ttft_change`` = kvdirect mean TTFT / baseline mean TTFT - 1 ("TTFT change
  with kvdirect"; -0.957 is 95.7% faster);
* ``ttft_change_ideal`` = ideal / baseline - 1 (the best any cache could do);
* ``kvdirect_vs_ideal`` = kvdirect / ideal - 1 (the cost of the transfer);
* ``ttft_{mean,p50,p99}_ms_{baseline,ideal,kvdirect}``, ``hit_rate``,
  ``bytes_loaded``, ``outputs_identical[_MODE]``, ``max_logit_diff[_MODE]``.

``reference.ttft_change`` holds the reference design's figures in the same
convention. :func:`render_table` prints the table (``markdown=True``: the
README's).
"""
from __future__ import annotations

import logging
import os
import queue as queue_mod
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np

from kvdirect.demo import OWN_MODES as MODES
from kvdirect.demo.report import bar_plot, change, machine_info, pct, render, ttft_stats
from kvdirect.engine.model import ModelSpec
from kvdirect.errors import ConfigError, KVDirectError

log = logging.getLogger("kvdirect.demo")
# SGLang PR #14056 (Qwen3-32B, two instances, Ascend A3): TTFT change
REFERENCE = {"model": "Qwen3-32B, 2 instances, Ascend A3 (SGLang PR #14056)",
             "ttft_change": {"1.0": -0.935, "0.5": -0.466}}


@dataclass
class DemoConfig:
    prompts: int = 12  # per reuse level
    prompt_len: int = 3584
    reuse: tuple = (0.0, 0.5, 1.0)
    output_len: int = 4
    page_size: int = 64
    store_url: str | None = None  # None: an embedded shm pool made for this run
    device: str = "cpu"
    modes: tuple = MODES
    seed: int = 0
    spec: ModelSpec = field(default_factory=ModelSpec)

    def __post_init__(self):
        self.reuse = tuple(float(r) for r in self.reuse)
        self.modes = tuple(self.modes)
        if isinstance(self.spec, dict):
            self.spec = ModelSpec(**self.spec)
        for name in ("prompts", "output_len", "page_size", "prompt_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if self.prompt_len < 2 * self.page_size:
            raise ConfigError(f"--prompt-len must be at least two pages ({2 * self.page_size} tokens)")
        if not self.reuse or any(not 0.0 <= r <= 1.0 for r in self.reuse):
            raise ConfigError(f"--reuse values must lie in [0, 1], got {list(self.reuse)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or "baseline" not in self.modes:
            raise ConfigError(f"modes must include 'baseline' and be among {MODES}, got {list(self.modes)}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reuse"], d["modes"] = list(self.reuse), list(self.modes)
        return d

    @property
    def num_slots(self) -> int:
        """Device pool per instance: room for a resident prefix, a request and some cache."""
        per_req = self.prompt_len + self.output_len + self.page_size
        return -(-4 * per_req // self.page_size) * self.page_size


# -- workload -----------------------------------------------------------------
def documents(cfg: DemoConfig) -> np.ndarray:
    """Instance A's documents, ``[prompts, prompt_len]`` int32."""
    rng = np.random.default_rng([cfg.seed, 0xA])
    return rng.integers(0, cfg.spec.vocab_size, (cfg.prompts, cfg.prompt_len), dtype=np.int32)


def shared_len(cfg: DemoConfig, reuse: float) -> int:
    return int(round(reuse * cfg.prompt_len))


def prompts_b(cfg: DemoConfig, level: int, docs: np.ndarray | None = None) -> np.ndarray:
    """Instance B's prompts for reuse level ``level``: A's documents' first
    ``shared_len`` tokens, then tokens of their own (fresh per level)."""
    docs = documents(cfg) if docs is None else docs
    k = shared_len(cfg, cfg.reuse[level])
    rng = np.random.default_rng([cfg.seed, 0xB, level])
    out = rng.integers(0, cfg.spec.vocab_size, docs.shape, dtype=np.int32)
    out[:, :k] = docs[:, :k]
    if 0 < k < cfg.prompt_len:  # make sure the token right after the shared part differs
        same = out[:, k] == docs[:, k]
        out[same, k] = (docs[same, k] + 1) % cfg.spec.vocab_size
    return out


def ideal_prefix_len(cfg: DemoConfig, reuse: float) -> int:
    """Prefix a perfect cache would supply: whole pages of the shared part,
    leaving at least one token to prefill (the engine matches ``tokens[:-1]``)."""
    k = min(shared_len(cfg, reuse), cfg.prompt_len - 1)
    return k // cfg.page_size * cfg.page_size


# -- the kvdirect cache of one instance -----------------------------------------
def open_kvdirect_cache(engine, store_url: str, model_id: str):
    """``KVDirectCache`` over the engine's device pool and the shared store."""
    from kvdirect import KVDirectCache, KVLayout, open_store
    from kvdirect.config import CacheConfig

    pool = engine.pool
    layout = KVLayout.from_mha(pool.k_buffers, pool.v_buffers, page_size=pool.page_size)
    store = open_store(store_url)
    return KVDirectCache(layout, store, page_size=pool.page_size, free_slots=pool.allocator.free,
                         config=CacheConfig(store=None, model=model_id, allow_no_store=False))


def _close_cache(cache) -> None:
    if cache is not None:
        cache.flush()
        cache.close()


# -- the two instances ----------------------------------------------------------
_ORDERS = (("baseline", "ideal", "kvdirect"), ("kvdirect", "baseline", "ideal"), ("baseline", "kvdirect", "ideal"))

def _instance(role: str, cfg_dict: dict, store_url: str | None, events, a_done, b_done) -> None:
    """Process body of instance A or B; reports through ``events``."""
    try:
        cfg = DemoConfig(**cfg_dict)
        import torch

        from kvdirect.engine import Engine, weights_digest

        engine = Engine.build(cfg.spec, num_slots=cfg.num_slots, page_size=cfg.page_size, device=cfg.device)
        digest = weights_digest(engine.model)
        model_id = f"kvdirect-demo-qwen2-{digest[:16]}"
        # warm up kernels and first-touch memory at full size, untimed
        warm = np.random.default_rng([cfg.seed, 0xC]).integers(0, cfg.spec.vocab_size, cfg.prompt_len, dtype=np.int32)
        engine.serve(warm, cfg.output_len)
        events.put(("ready", role, {"digest": digest, "threads": torch.get_num_threads()}))
        use_kvd = "kvdirect" in cfg.modes
        docs = documents(cfg)
        step = lambda: events.put(("step", role, 1))  # noqa: E731
        if role == "A":
            cache = open_kvdirect_cache(engine, store_url, model_id) if use_kvd else None
            ttft_ms = serve_documents(cfg, engine, cache, docs, step)
            if cache is not None:
                cache.flush()  # every page of A is in the pool before B starts
            events.put(("done", role, {"ttft_ms": ttft_ms, "digest": digest}))
            # stay up while B serves, as a serving instance would: with Mooncake, objects
            # live in the memory their writers contribute and vanish when those leave
            b_done.wait(timeout=24 * 3600)
            _close_cache(cache)
            return
        a_done.wait()
        cache = open_kvdirect_cache(engine, store_url, model_id) if use_kvd else None
        levels = serve_levels(cfg, engine, cache, docs, step)
        _close_cache(cache)
        events.put(("done", role, {"levels": levels, "digest": digest}))
    except BaseException as e:
        events.put(("error", role, (f"{type(e).__name__}: {e}", traceback.format_exc())))
        raise SystemExit(1)


def serve_documents(cfg: DemoConfig, engine, cache, docs, step=lambda: None) -> list[float]:
    """Instance A: serve (and so write back) every document; returns TTFTs in ms."""
    out = []
    for doc in docs:
        out.append(engine.serve(doc, cfg.output_len, cache=cache).ttft_s * 1e3)
        step()
    return out


def serve_levels(cfg: DemoConfig, engine, cache, docs, step=lambda: None) -> list[dict]:
    """Instance B: every reuse level, each prompt as baseline, ideal and kvdirect
    (``cache``; None skips that mode). Returns one summary per level."""
    from kvdirect.engine import DevicePrefixCache

    ideal = DevicePrefixCache(cfg.page_size, engine.allocator.free)
    levels = []
    for li, reuse in enumerate(cfg.reuse):
        if cache is not None:  # B's device pool starts each level cold: hits must come from the pool
            cache.flush()
            cache.evict(engine.pool.num_slots)
        keep = ideal_prefix_len(cfg, reuse)
        recs = {m: [] for m in cfg.modes if m != "kvdirect" or cache is not None}
        for i, prompt in enumerate(prompts_b(cfg, li, docs)):
            # rotate the order of the three runs so drift on a noisy machine hits each alike;
            # ideal needs the baseline's KV of the shared prefix, so it always follows it
            for mode in _ORDERS[i % len(_ORDERS)]:
                if mode not in recs:
                    continue
                if mode != "kvdirect":
                    _make_room(engine, cache, 2 * (cfg.prompt_len + cfg.output_len + cfg.page_size))
                if mode == "baseline":
                    base = engine.serve(prompt, cfg.output_len, keep=keep if "ideal" in recs else 0)
                    recs["baseline"].append(base)
                    if "ideal" in recs:
                        ideal.write_back(prompt[:keep], base.kept_slots)  # now resident, no transfer
                elif mode == "ideal":
                    recs["ideal"].append(engine.serve(prompt, cfg.output_len, cache=ideal))
                    ideal.clear()
                else:
                    recs["kvdirect"].append(engine.serve(prompt, cfg.output_len, cache=cache))
            step()
        levels.append(_summarise_level(cfg, reuse, recs, engine.pool.bytes_per_token))
    return levels


def _make_room(engine, cache, num_tokens: int) -> None:
    """Baseline and ideal runs do not go through kvdirect's cache, so they cannot
    evict from it on their own: free device pages it holds when they need room."""
    short = num_tokens - engine.allocator.free_slots_count
    if cache is not None and short > 0:
        cache.evict(short)


def _summarise_level(cfg: DemoConfig, reuse: float, recs: dict, bytes_per_token: int) -> dict:
    base = recs["baseline"]
    run = {"reuse": reuse, "prompts": len(base), "shared_tokens": shared_len(cfg, reuse)}
    for mode, rs in recs.items():
        run.update(ttft_stats([r.ttft_s * 1e3 for r in rs], mode))
    identical, max_diff = True, 0.0
    for mode in ("ideal", "kvdirect"):
        if mode not in recs:
            continue
        same = all(r.output_ids == b.output_ids for r, b in zip(recs[mode], base))
        diff = max(float((r.first_logits - b.first_logits).abs().max()) for r, b in zip(recs[mode], base))
        run[f"outputs_identical_{mode}"] = same
        run[f"max_logit_diff_{mode}"] = diff
        identical &= same
        if mode == "kvdirect":
            max_diff = diff
    mb = run["ttft_mean_ms_baseline"]
    if "kvdirect" in recs:
        kv = recs["kvdirect"]
        run["ttft_change"] = run["ttft_mean_ms_kvdirect"] / mb - 1.0
        run["hit_rate"] = sum(r.cached_tokens for r in kv) / sum(r.prompt_len for r in kv)
        run["bytes_loaded"] = int(sum(r.loaded_tokens for r in kv) * bytes_per_token)
        run["max_logit_diff"] = max_diff
    if "ideal" in recs:
        run["ttft_change_ideal"] = run["ttft_mean_ms_ideal"] / mb - 1.0
        run["ideal_hit_rate"] = sum(r.cached_tokens for r in recs["ideal"]) / sum(r.prompt_len for r in recs["ideal"])
        if "kvdirect" in recs:
            run["kvdirect_vs_ideal"] = run["ttft_mean_ms_kvdirect"] / run["ttft_mean_ms_ideal"] - 1.0
    run["outputs_identical"] = identical
    return run


# -- the driver --------------------------------------------------------------------
class _Progress:
    """rich progress bars when rich is installed, plain lines otherwise."""

    def __init__(self, totals: dict, enabled: bool):
        self.enabled, self.bars, self.rich = enabled, None, None
        self.counts = dict.fromkeys(totals, 0)
        self.totals = totals
        if not enabled:
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), transient=False)
            self.bars = {k: self.rich.add_task(f"instance {k}", total=v) for k, v in totals.items()}
            self.rich.start()
        except ImportError:
            pass

    def note(self, role: str, text: str) -> None:
        if self.enabled:
            (self.rich.console.print if self.rich else print)(f"instance {role}: {text}")

    def step(self, role: str, n: int) -> None:
        self.counts[role] += n
        if self.rich:
            self.rich.update(self.bars[role], advance=n)
        elif self.enabled:
            print(f"instance {role}: {self.counts[role]}/{self.totals[role]}", flush=True)

    def close(self) -> None:
        if self.rich:
            self.rich.stop()


def run_demo(cfg: DemoConfig, *, progress: bool = True, timeout_s: float = 3600) -> dict:
    """Run the experiment; returns {"machine", "config", "runs", ...}."""
    import multiprocessing as mp

    use_kvd = "kvdirect" in cfg.modes
    pool_store = None
    store_url = cfg.store_url
    if use_kvd and store_url is None:
        # bytes the pool must hold: A's documents + every prompt B writes back
        need = cfg.prompts * (1 + len(cfg.reuse)) * (cfg.prompt_len + cfg.output_len) * cfg.spec.kv_bytes_per_token()
        size_mib = max(64, -(-2 * need // (1 << 20)))
        from kvdirect.runtime import available_memory

        if size_mib << 20 > 0.8 * available_memory():
            raise ConfigError(f"the demo's KV pool would need {size_mib / 1024:.1f} GiB and "
                              f"{available_memory() / 2**30:.1f} GiB are available: use fewer --prompts "
                              "or a shorter --prompt-len")
        store_url = f"shm://kvdirect-demo-{os.getpid()}-{uuid.uuid4().hex[:8]}?size={size_mib}MiB"
    if use_kvd and store_url.startswith("shm://"):
        from kvdirect import open_store

        pool_store = open_store(store_url)  # the embedded pool lives as long as this run

    ctx = mp.get_context("spawn")
    events, a_done, b_done = ctx.Queue(), ctx.Event(), ctx.Event()
    cfg_dict = cfg.to_dict()
    roles = ["A", "B"] if use_kvd else ["B"]
    if not use_kvd:
        a_done.set()
    procs = {r: ctx.Process(target=_instance, args=(r, cfg_dict, store_url, events, a_done, b_done),
                            name=f"kvdirect-demo-{r}", daemon=True) for r in roles}
    totals = {"A": cfg.prompts, "B": cfg.prompts * len(cfg.reuse)}
    bar = _Progress({r: totals[r] for r in roles}, progress)
    results, t0 = {}, time.monotonic()
    try:
        for p in procs.values():
            p.start()
        while len(results) < len(roles):
            try:
                kind, role, payload = events.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in procs.items() if r not in results and not p.is_alive()]
                if dead:
                    raise KVDirectError(f"demo instance {dead[0]} exited ({procs[dead[0]].exitcode}) without a result")
                if time.monotonic() - t0 > timeout_s:
                    raise KVDirectError(f"demo did not finish within {timeout_s:.0f} s")
                continue
            if kind == "error":
                summary, tb = payload
                log.debug("demo instance %s failed:\n%s", role, tb)
                raise KVDirectError(f"demo instance {role} failed: {summary}")
            if kind == "ready":
                bar.note(role, f"model ready ({payload['threads']} threads, weights {payload['digest'][:12]})")
            elif kind == "step":
                bar.step(role, payload)
            elif kind == "done":
                results[role] = payload
                if role == "A":
                    a_done.set()
                else:
                    b_done.set()
    finally:
        b_done.set()
        bar.close()
        for p in procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()
        if pool_store is not None:
            # a pool made for this run goes away with it; a user's pool (--store) stays
            pool_store.destroy() if cfg.store_url is None else pool_store.close()

    if use_kvd and results["A"]["digest"] != results["B"]["digest"]:
        raise KVDirectError("instances A and B built different model weights; the demo needs identical models")
    out = {"machine": machine_info(cfg.device), "config": {**cfg_dict, "store_url": store_url,
           "num_slots_per_instance": cfg.num_slots, "kv_bytes_per_token": cfg.spec.kv_bytes_per_token()},
           "reference": REFERENCE, "runs": results["B"]["levels"], "wall_s": time.monotonic() - t0}
    if "A" in results:
        a = np.asarray(results["A"]["ttft_ms"])
        out["instance_a"] = {"prompts": len(a), "ttft_mean_ms": float(a.mean())}
    out["outputs_identical"] = all(r["outputs_identical"] for r in out["runs"])
    return out


# -- reporting -------------------------------------------------------------------
def _fmt_ms(run: dict, mode: str) -> str:
    k = f"ttft_mean_ms_{mode}"
    if k not in run:
        return "-"
    return f"{run[k]:.0f} / {run[f'ttft_p50_ms_{mode}']:.0f} / {run[f'ttft_p99_ms_{mode}']:.0f}"


TABLE_HEAD = ["prefix reuse", "baseline TTFT mean / p50 / p99 (ms)", "kvdirect TTFT mean / p50 / p99 (ms)",
              "ideal TTFT mean (ms)", "TTFT change with kvdirect", "kvdirect vs ideal", "pool hit rate",
              "KV loaded", "outputs identical"]


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The demo table (README and CLI alike): header and one row per reuse level."""
    rows = []
    for r in result["runs"]:
        ideal = f"{r['ttft_mean_ms_ideal']:.0f}" if "ttft_mean_ms_ideal" in r else "-"
        loaded = f"{r['bytes_loaded'] / (1 << 20):.1f} MiB" if "bytes_loaded" in r else "-"
        same = "yes" if r["outputs_identical"] else "NO"
        if "max_logit_diff" in r:
            same += f" (max logit diff {r['max_logit_diff']:.3g})"
        rows.append([f"{100 * r['reuse']:.0f}%", _fmt_ms(r, "baseline"), _fmt_ms(r, "kvdirect"), ideal,
                     change(r.get("ttft_change")), change(r.get("kvdirect_vs_ideal")), pct(r.get("hit_rate")),
                     loaded, same])
    return list(TABLE_HEAD), rows


def render_table(result: dict, *, markdown: bool = False) -> str:
    return render(*table_rows(result), markdown=markdown)


def plot(result: dict, path: str) -> None:
    runs = result["runs"]
    modes = [m for m in MODES if f"ttft_mean_ms_{m}" in runs[0]]
    notes = {"kvdirect": [f"{100 * r['ttft_change']:+.0f}%" for r in runs]} if "kvdirect" in modes else None
    m, cfg = result["machine"], result["config"]
    bar_plot(path, [f"{100 * r['reuse']:.0f}%" for r in runs],
             {mode: [r[f"ttft_mean_ms_{mode}"] for r in runs] for mode in modes},
             xlabel="prefix reuse", ylabel="mean TTFT (ms)", notes=notes,
             colors={"baseline": "#9e9e9e", "kvdirect": "#1f77b4", "ideal": "#2ca02c"},
             title=f"kvdirect demo: {cfg['prompt_len']}-token prompts, 2 instances, one pool\n"
                   f"{m.get('gpu') or m['cpu']} ({m['cores']} cores), {cfg['device']}")
