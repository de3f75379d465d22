"""One vLLM engine process for tests and bench/bench_vllm.py: runs a JSON job, prints a JSON result.

    python tests/vllm/driver.py JOB.json OUT.json

Runs the offline ``LLM`` in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni``
executor) unless the job says ``"multiprocess": true`` (needed by LMCache's
connector), so the test can read vLLM's scheduler, block pool and the connector
objects directly. Job keys (all optional but ``model`` and ``phases``):

* ``dtype``, ``block_size``, ``prefix_caching``, ``num_blocks`` (small KV space),
  ``max_model_len``, ``max_num_seqs``, ``max_num_batched_tokens``, ``tensor_parallel_size``, ``attention_backend`` (e.g. ``CPU_MLA``)
* ``env``: environment variables set before vLLM starts (e.g. ``VLLM_CPU_OMP_THREADS_BIND``)
* ``kv``: null, ``{"connector": "kvdirect", "extra": {...}, "role": "kv_both"}``,
  ``{"connector": "example", "path": DIR}`` or ``{"connector": "lmcache", "port": P}``
* ``fault``: wrap the kvdirect store in the project's FlakyStore (tests/vllm/faulty_kvdirect.py)
  (``{"fail_rate": .., "ops": ["get"], "seed": .., "mode": "error" | "timeout" | "evict",
  "delay_s": .., "delay_rate": .., "deadline_s": .., "seed_per_rank": bool}``), or a list of such
  (nested, the first innermost)
* ``phases``: list of ``{"prompts": [[ids]], "max_tokens": n, "n": samples per prompt (top-1
  sampling: greedy tokens), "mode": "batch" |
  "sequential" (one request at a time, wall time per request = TTFT with max_tokens 1;
  ``settle_s``: idle seconds before each request)
  | "abort" (abort ``abort`` of the requests after ``abort_after_steps`` steps)}``
* ``dump_pages``: hash the KV bytes of the blocks kvdirect saved / loaded and of
  the pool objects under the same keys (``loaded_diff_rows``: for a loaded block that no longer
  equals its pool object, which of its ``layers x block_size`` equal slices differ).
* ``drain_saves``: after the phases, wait until the connector wrote what it accepted
  (in-process engines; ``drain`` in the result says how)
* ``cpu_report``: after the phases, the CPU binding of this process and its
  descendants (engine core, workers) as ``processes``: per process its name, the
  OpenMP / vLLM CPU variables it started with and its threads grouped by the CPUs
  they may run on (``/proc``; Linux only).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _kv_config(job):
    kv = job.get("kv")
    if not kv:
        return None
    from vllm.config import KVTransferConfig

    c = kv["connector"]
    if c == "kvdirect":
        # with faults: the same connector, from a test-only module that wraps its store (faulty_kvdirect)
        module = "faulty_kvdirect" if job.get("fault") else "kvdirect.vllm"
        return KVTransferConfig(kv_connector="KVDirectConnector", kv_connector_module_path=module,
                                kv_role=kv.get("role", "kv_both"), kv_connector_extra_config=kv.get("extra", {}))
    if c == "example":
        return KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                                kv_connector_extra_config={"shared_storage_path": kv["path"]})
    if c == "lmcache":
        return KVTransferConfig(kv_connector="LMCacheMPConnector", kv_role="kv_both",
                                kv_connector_extra_config={"lmcache.mp.host": "tcp://127.0.0.1",
                                                           "lmcache.mp.port": int(kv["port"]),
                                                           "lmcache.mp.mq_timeout": 30})
    if c == "mooncake_store":  # vLLM's own MooncakeStoreConnector; MOONCAKE_CONFIG_PATH names its store
        return KVTransferConfig(kv_connector="MooncakeStoreConnector", kv_role="kv_both",
                                kv_connector_extra_config=kv.get("extra", {}))
    raise ValueError(f"unknown connector {c!r}")


def _install_fault(faults):
    """The job's faults reach every process that loads the connector (TP workers the executor
    spawns too): through the environment, read by the test-only module faulty_kvdirect."""
    os.environ["KVDIRECT_TEST_FAULTS"] = json.dumps(faults)
    import faulty_kvdirect  # noqa: F401 - this process (in-process engine) wraps its stores now


def _injected(store) -> dict:
    """Injected failures of every FlakyStore layer, by mode."""
    out = {}
    while hasattr(store, "injected"):
        for k, v in store.injected.items():
            key = f"{store.mode}:{k}" if k != "timeout" else "timeout"
            out[key] = out.get(key, 0) + v
        store = store.inner
    return out


def _engine_parts(llm):
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # in-process client
    sched = getattr(core, "scheduler", None)
    return core, sched


def _metrics(llm) -> dict:
    out = {}
    try:
        for m in llm.get_metrics():
            v = getattr(m, "value", None)
            if isinstance(v, (int, float)):
                out[m.name] = out.get(m.name, 0) + v
    except Exception as e:  # noqa: BLE001
        out["error"] = repr(e)
    return out


def _page_bytes(tensors, block: int) -> bytes:
    return b"".join(t[block].contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
                    for t in tensors)


def _diff_rows(a: bytes, b: bytes, rows: int) -> list[int]:
    """Which of ``rows`` equal slices of two page objects differ (MLA: one row per layer and token)."""
    n = len(a) // rows
    return [r for r in range(rows) if a[r * n:(r + 1) * n] != b[r * n:(r + 1) * n]]


def _dump_pages(worker_conn, url) -> dict:
    from kvdirect.stores import open_store

    w = worker_conn.worker
    tensors = list(w.layout._refs[0])
    store = open_store(url)
    out, diff = {}, {}
    try:
        for kind, rec in (("saved", w.recent_saves), ("loaded", w.recent_loads)):
            rows = []
            for _rid, first, keys, blocks, ok in rec:
                n_ok = int(ok.sum()) if hasattr(ok, "sum") else int(ok)
                for i, (k, b) in enumerate(zip(keys, blocks)):
                    good = bool(ok[i]) if hasattr(ok, "__len__") else i < n_ok
                    if not good:
                        continue
                    pool = store.get_bytes(k)
                    blk = _page_bytes(tensors, int(b))
                    rows.append([k, hashlib.sha256(blk).hexdigest(),
                                 None if pool is None else hashlib.sha256(pool).hexdigest(), first + i])
                    if kind == "loaded" and pool is not None and len(pool) == len(blk) and pool != blk:
                        diff.setdefault(k, _diff_rows(blk, pool, len(tensors) * w.layout.page_size))
            out[kind] = rows
        out["loaded_diff_rows"] = diff
    finally:
        store.close()
    return out


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


CPU_VARS = ("OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND", "GOMP_CPU_AFFINITY", "KMP_AFFINITY",
            "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


def process_cpus(root: int) -> list[dict]:
    """``root`` and its descendants: name, CPU variables from its environment, threads by allowed CPUs."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            stat = _read(f"/proc/{d}/stat")
            if stat:
                parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo += sorted(c for c, p in parent.items() if p == pid)
    out = []
    for pid in tree:
        env = dict(kv.split("=", 1) for kv in _read(f"/proc/{pid}/environ").split("\0") if "=" in kv)
        groups: dict = {}
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            st = _read(f"/proc/{pid}/task/{tid}/status")
            cpus = next((ln.split(":", 1)[1].strip() for ln in st.splitlines() if ln.startswith("Cpus_allowed_list")),
                        "?")
            g = groups.setdefault(cpus, {"cpus": cpus, "threads": 0, "names": set()})
            g["threads"] += 1
            g["names"].add(_read(f"/proc/{pid}/task/{tid}/comm").strip())
        out.append({"pid": pid, "name": _read(f"/proc/{pid}/comm").strip(),
                    "env": {k: env[k] for k in CPU_VARS if k in env},
                    "threads": [dict(g, names=sorted(g["names"])[:12]) for g in groups.values()]})
    return out


def drain_saves(timeout_s: float = 900) -> dict:
    """Wait until the in-process worker connector has written every save it accepted, so that a
    process that only stores (bench_vllm's instance A) does not exit with writes in flight. kvdirect:
    ``flush()``; vLLM's MooncakeStoreConnector: its sending thread's queue is empty. Other connectors
    (ExampleConnector writes synchronously; LMCache runs multiprocess and finishes at shutdown) are
    named as not drained here."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    t0 = time.perf_counter()
    if not has_kv_transfer_group():
        return {"connector": None, "waited_s": 0.0}
    c = get_kv_transfer_group()
    name = type(c).__name__
    if getattr(c, "worker", None) is not None and hasattr(c.worker, "flush"):
        c.worker.flush()
        how = "flush()"
    elif getattr(getattr(c, "connector_worker", None), "kv_send_thread", None) is not None:
        q = c.connector_worker.kv_send_thread.request_queue
        deadline = time.monotonic() + timeout_s
        while q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        how = f"sending queue empty ({q.unfinished_tasks} left)"
    else:
        how = "not drained here"
    return {"connector": name, "how": how, "waited_s": round(time.perf_counter() - t0, 3)}


_LLM: dict = {}


def run(job: dict) -> dict:
    os.environ.update(job.get("env") or {})  # before vLLM reads it (its worker processes inherit it)
    if not job.get("multiprocess"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if job.get("fault"):
        _install_fault(job["fault"])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(model=job["model"], dtype=job.get("dtype", "float32"), block_size=job.get("block_size", 32),
              enable_prefix_caching=job.get("prefix_caching", True), max_model_len=job.get("max_model_len", 4096),
              max_num_seqs=job.get("max_num_seqs", 16), seed=0, disable_log_stats=False,
              kv_transfer_config=_kv_config(job), enforce_eager=True)
    if not job.get("multiprocess"):
        kw["distributed_executor_backend"] = "uni"
    if job.get("num_blocks"):
        kw["num_gpu_blocks_override"] = int(job["num_blocks"])
    if job.get("max_num_batched_tokens"):
        kw["max_num_batched_tokens"] = int(job["max_num_batched_tokens"])
    if job.get("attention_backend"):
        kw["attention_config"] = {"backend": job["attention_backend"]}
    if job.get("tensor_parallel_size", 1) > 1:
        kw["tensor_parallel_size"] = int(job["tensor_parallel_size"])
        kw["distributed_executor_backend"] = "mp"
    t0 = time.perf_counter()
    llm = LLM(**kw)
    _LLM["llm"] = llm
    result: dict = {"start_s": time.perf_counter() - t0, "phases": []}
    for ph in job["phases"]:
        # n > 1: vLLM refuses greedy sampling, so sample with top_k=1 (the same tokens, without
        # depending on the random stream, which a step recomputed after a failed load advances)
        n = ph.get("n", 1)
        sp = SamplingParams(max_tokens=ph.get("max_tokens", 4), temperature=0.0 if n == 1 else 1.0, ignore_eos=True,
                            n=n, top_k=-1 if n == 1 else 1)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in ph["prompts"]]
        mode = ph.get("mode", "batch")
        res = {"outputs": [], "cached_tokens": [], "wall_ms": []}
        if mode == "batch":
            outs = llm.generate(prompts, sp, use_tqdm=False)
            res["outputs"] = [list(o.outputs[0].token_ids) for o in outs]
            if sp.n > 1:
                res["samples"] = [[list(c.token_ids) for c in o.outputs] for o in outs]
            res["cached_tokens"] = [o.num_cached_tokens for o in outs]
        elif mode == "sequential":
            for p in prompts:
                time.sleep(ph.get("settle_s", 0))  # untimed: lets background writes of the previous request finish
                t = time.perf_counter()
                o = llm.generate([p], sp, use_tqdm=False)[0]
                res["wall_ms"].append((time.perf_counter() - t) * 1e3)
                res["outputs"].append(list(o.outputs[0].token_ids))
                res["cached_tokens"].append(o.num_cached_tokens)
        elif mode == "abort":
            eng = llm.llm_engine
            ids = [f"abort-{i}" for i in range(len(prompts))]
            for rid, p in zip(ids, prompts):
                eng.add_request(rid, p, sp)
            for _ in range(ph.get("abort_after_steps", 1)):
                eng.step()
            eng.abort_request(ids[: ph.get("abort", len(ids))])
            done = {}
            for _ in range(10000):
                if not eng.has_unfinished_requests():
                    break
                for o in eng.step():
                    if o.finished:
                        done[o.request_id] = list(o.outputs[0].token_ids)
            res["outputs"] = [done.get(r) for r in ids]
        else:
            raise ValueError(f"unknown mode {mode!r}")
        result["phases"].append(res)
    if job.get("drain_saves"):
        result["drain"] = drain_saves() if not job.get("multiprocess") else {
            "connector": "in the engine's worker process", "how": "not drained here (ends with the engine)"}
    # let held requests drain: empty steps deliver pending save completions (and the release of
    # blocks a timed-out get was still writing)
    core, sched = _engine_parts(llm)
    if core is not None:
        deadline = time.monotonic() + 30
        while sched is not None and len(sched.requests) and time.monotonic() < deadline:
            core.step() if hasattr(core, "step") else None
            time.sleep(0.01)
    result["metrics"] = _metrics(llm)
    if job.get("cpu_report"):
        result["processes"] = process_cpus(os.getpid())
    if sched is not None:
        bp = sched.kv_cache_manager.block_pool
        result["blocks"] = {"free": bp.get_num_free_blocks(), "total": bp.num_gpu_blocks,
                            "requests_left": len(sched.requests)}
        conn = sched.get_kv_connector()
        if conn is not None and hasattr(conn, "scheduler") and conn.scheduler is not None:
            s = conn.scheduler
            result["sched_stats"] = dict(s.stats)
            result["sched_state"] = {"requests": len(s._reqs), "loads": len(s._loads)}
            import dataclasses

            result["fingerprints"] = [{f.name: getattr(fp, f.name) for f in dataclasses.fields(fp)}
                                      for fp in s.fingerprints or ()]  # per TP rank
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        if has_kv_transfer_group():
            wc = get_kv_transfer_group()
            if getattr(wc, "worker", None) is not None:
                w = wc.worker
                w.flush()
                result["worker_stats"] = {k: v for k, v in w.stats.items()}
                result["layout_kind"] = w.fingerprint.layout_kind
                import dataclasses

                result["fingerprint"] = {f.name: getattr(w.fingerprint, f.name)
                                         for f in dataclasses.fields(w.fingerprint)}
                result["worker_state"] = {"inflight_pages": w._inflight_pages, "inflight": dict(w._inflight),
                                          "late": sorted(w._late), "finishing": sorted(w._finishing)}
                if job.get("dump_pages"):
                    result["pages"] = _dump_pages(wc, job["kv"]["extra"]["store"])
                if hasattr(w.store, "injected"):
                    result["injected"] = _injected(w.store)
    except Exception as e:  # noqa: BLE001
        result["introspection_error"] = repr(e)
    return result


def main(argv):
    job = json.loads(open(argv[0]).read())
    res = run(job)
    with open(argv[1], "w") as f:
        json.dump(res, f)
    llm = _LLM.get("llm")
    if llm is not None and job.get("multiprocess"):
        llm.llm_engine.engine_core.shutdown()  # the engine-core and worker processes end with it
    os._exit(0)  # vLLM's atexit hooks can hang an in-process engine; results are written


if __name__ == "__main__":
    main(sys.argv[1:])
