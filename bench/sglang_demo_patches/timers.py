"""BENCHMARK-ONLY: server-side timers for ``kvdirect demo --engine sglang``.

Wraps, in every process of the server, the calls through which a cache hit reaches the
request path, and the pool writes, and appends one JSON line per call to
``$KVDIRECT_BENCH_TIMERS/<pid>.jsonl``: ``{"w": what, "ms": duration, "p": pages}``.
The same names for every mode, so "load time on the request path" means the same thing:

* ``match``: the tree cache's ``match_prefix`` (the pool existence query of kvdirect's
  radix backend; the linker's lookup inside SGLang's tree);
* ``load_back``: ``init_load_back`` (kvdirect's radix backend: until layer 0 is in;
  SGLang's tree: allocating slots and queueing the linker load; HiCache: host -> device);
* ``layer_wait``: time the forward pass blocked in a layer counter's ``wait_until``
  (kvdirect's ``LayerLoads``, SGLang's ``LayerWiseLoadCounter``, HiCache's ``LayerDoneCounter``);
* ``finish``: ``finish_external_linker_loads`` after the forward (linkers);
* ``prefetch``: HiCache's L3 prefetch, from ``prefetch_from_storage`` to the first
  ``check_prefetch_progress`` that reports it done (the request waits for it to be admitted);
* ``linker_l0`` / ``linker_all`` (not on the request path: where the linker's load time goes):
  from ``start_layer_wise_loading`` (the counter's ``update_producer``) until layer 0 / the last
  layer is reported complete; ``linker_reach`` until the forward first asks for a layer of that
  load (what a load has to beat to add no wait); the same counter class for both linkers;
* ``put``: a pool write (kvdirect's ``Transfer.put``; SGLang's ``MooncakeStore.batch_set_v1/v2``
  for its linker and HiCache), ``p`` = pages stored.
"""
import json
import os
import threading
import time

from after_import import install

_DIR = os.environ.get("KVDIRECT_BENCH_TIMERS")
_lock = threading.Lock()
_file = None


def record(what: str, ms: float, pages: int = 0) -> None:
    global _file
    if not _DIR:
        return
    with _lock:
        if _file is None:
            os.makedirs(_DIR, exist_ok=True)
            _file = open(os.path.join(_DIR, f"{os.getpid()}.jsonl"), "a", buffering=1)
        _file.write(json.dumps({"w": what, "ms": round(ms, 4), "p": int(pages)}) + "\n")


def _timed(fn, what, pages=None):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        record(what, (time.perf_counter() - t0) * 1e3, pages(out) if pages else 0)
        return out

    wrapper.__wrapped__ = fn
    return wrapper


def _wrap_class(cls, name, what, pages=None):
    if name in vars(cls):
        setattr(cls, name, _timed(vars(cls)[name], what, pages))


def _patch_registry(module) -> None:
    create = module.create_tree_cache

    def create_tree_cache(*args, **kwargs):
        cache = create(*args, **kwargs)
        for name, what in (("match_prefix", "match"), ("init_load_back", "load_back"),
                           ("finish_external_linker_loads", "finish")):
            fn = getattr(cache, name, None)
            if fn is not None:
                setattr(cache, name, _timed(fn, what))
        if hasattr(cache, "prefetch_from_storage") and hasattr(cache, "check_prefetch_progress"):
            started = {}
            prefetch, check = cache.prefetch_from_storage, cache.check_prefetch_progress

            def prefetch_from_storage(*a, **kw):
                handle = kw.get("request", a[0] if a else None)
                started.setdefault(str(handle), time.perf_counter())
                return prefetch(*a, **kw)

            def check_prefetch_progress(request, *a, **kw):
                done = check(request, *a, **kw)
                t0 = started.pop(str(request), None) if done else None
                if t0 is not None:
                    record("prefetch", (time.perf_counter() - t0) * 1e3)
                return done

            cache.prefetch_from_storage, cache.check_prefetch_progress = prefetch_from_storage, check_prefetch_progress
        return cache

    module.create_tree_cache = create_tree_cache


def _patch_counter(cls) -> None:
    """Where a linker load's time goes: started -> layer 0 / last layer complete, and when the
    forward first reached it (see the module docstring)."""
    started, reached = {}, set()
    update, complete, wait = cls.update_producer, cls.complete, cls.wait_until

    def update_producer(self):
        index = update(self)
        started[(id(self), index)] = time.perf_counter()
        return index

    def complete_(self, index, layer):
        complete(self, index, layer)
        t0 = started.get((id(self), index))
        if t0 is not None and layer in (0, self.num_layers - 1):
            record("linker_l0" if layer == 0 else "linker_all", (time.perf_counter() - t0) * 1e3)

    def wait_until(self, threshold):
        key = (id(self), self.consumer_index)
        t0 = started.get(key)
        if t0 is not None and key not in reached:
            reached.add(key)
            record("linker_reach", (time.perf_counter() - t0) * 1e3)
            for old in [k for k in started if k[0] == key[0] and k[1] < key[1] - 64]:
                started.pop(old, None)  # loads long settled
        return wait(self, threshold)

    cls.update_producer, cls.complete, cls.wait_until = update_producer, complete_, wait_until


def _ok_pages_v2(results):
    from sglang.srt.mem_cache.hicache_storage import PoolName

    if not isinstance(results, dict):
        return 0
    kv = results.get(PoolName.KV, results.get("kv", []))
    return sum(1 for r in kv if r)


def _ok_pages_v1(results):
    return sum(1 for r in results or () if r)


install({
    "sglang.srt.mem_cache.registry": _patch_registry,
    "sglang.srt.managers.cache_controller": lambda m: _wrap_class(m.LayerDoneCounter, "wait_until", "layer_wait"),
    "sglang.srt.mem_cache.unified_cache.unified_cache_linker":
        lambda m: (_patch_counter(m.LayerWiseLoadCounter),
                   _wrap_class(m.LayerWiseLoadCounter, "wait_until", "layer_wait")),
    "sglang.srt.mem_cache.storage.mooncake_store.mooncake_store": lambda m: (
        _wrap_class(m.MooncakeStore, "batch_set_v2", "put", _ok_pages_v2),
        _wrap_class(m.MooncakeStore, "batch_set_v1", "put", _ok_pages_v1)),
    "kvdirect.sglang.layerwise": lambda m: _wrap_class(m.LayerLoads, "wait_until", "layer_wait"),
    "kvdirect.cache.transfer": lambda m: _wrap_class(m.Transfer, "put", "put", lambda st: int((st == 0).sum())),
})
