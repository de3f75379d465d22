"""BENCHMARK-ONLY patches for the servers of ``kvdirect demo --engine sglang`` (never part of
kvdirect or its plugin). Python imports ``sitecustomize`` at start-up in every process of a
server whose ``PYTHONPATH`` holds this folder; ``KVDIRECT_BENCH_PATCHES`` (a comma list)
says which patches load:

* ``hicache_cpu``: ``bench/sglang_hicache_cpu`` ("SGLang HiCache + CPU transfer patch");
* ``dense_linker``: :mod:`dense_linker` ("SGLang Mooncake linker + dense-model patch");
* ``prefix_attention``: :mod:`prefix_attention` ("torch_native attention without the
  redundant prefix rows": an extend request's attention runs only its new query rows);
* ``timers``: :mod:`timers`, server-side timers around the calls a cache hit makes on the
  request path and around the pool writes (``KVDIRECT_BENCH_TIMERS`` names the folder).

Results measured with the first three are labelled with the patch's name.
"""
import importlib.util
import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_WANT = {p.strip() for p in os.environ.get("KVDIRECT_BENCH_PATCHES", "").split(",") if p.strip()}

if "hicache_cpu" in _WANT:
    _spec = importlib.util.spec_from_file_location("kvdirect_bench_hicache_cpu",
                                                   _HERE.parent / "sglang_hicache_cpu" / "sitecustomize.py")
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)  # installs its own after-import hook
if _WANT & {"dense_linker", "prefix_attention", "timers"}:
    sys.path.insert(0, str(_HERE))
    if "dense_linker" in _WANT:
        import dense_linker  # noqa: F401
    if "prefix_attention" in _WANT:
        import prefix_attention  # noqa: F401
    if "timers" in _WANT:
        import timers  # noqa: F401
    sys.path.remove(str(_HERE))
