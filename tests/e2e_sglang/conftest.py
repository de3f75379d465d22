"""Real SGLang 0.5.23 servers on CPU (run through tests/test_sglang_plugin.py).

These tests run inside the SGLang environment (``scripts/sglang-env.sh``): they
start ``python -m sglang.launch_server`` processes on loopback (or inside network
namespaces they create), send token ids to ``/generate`` and compare greedy
outputs. Every server is stopped and every pool, master and SGLang /dev/shm file
they made is removed at teardown, also when a test fails. ``standin/`` holds the
import-only ``sgl_kernel`` module (see its docstring); a call into it fails the
test that started the server. ``testplugin/`` is a TEST-ONLY SGLang plugin (an MLA
dispatch for ``torch_native``, a record of the shm store's puts), put on a server's
path only by tests that ask for it (``testplugin=True``).
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "standin"
TESTPLUGIN = HERE / "testplugin"  # TEST-ONLY SGLang plugin (see its docstring); on a server's path only when asked
sys.path.insert(0, str(HERE))

try:  # outside the SGLang environment these run through tests/test_sglang_plugin.py
    import sglang.srt  # noqa: F401
except ImportError:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def workdir():
    """Models and server logs of this session (removed at the end; a failing test's
    message carries the tail of the server's log)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="kvdirect-e2e-sglang-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def standin_calls(workdir) -> Path:
    return workdir / "sgl_kernel_calls.txt"


def _write_model(path: Path, seed: int) -> str:
    from kvdirect.engine.model import ModelSpec
    from kvdirect.demo.sglang_cpu.model import TEST_SPEC, write_model

    write_model(path, ModelSpec(**TEST_SPEC, seed=seed))
    return str(path)


@pytest.fixture(scope="session")
def model_dir(workdir) -> str:
    """The tests' model (seeded random weights, written locally)."""
    return _write_model(workdir / "model-a", seed=0)


@pytest.fixture(scope="session")
def other_model_dir(workdir) -> str:
    """Same shape, other weights: must never share pool pages with ``model_dir``."""
    return _write_model(workdir / "model-b", seed=1)


class Farm:
    """Starts servers and remembers them, so that teardown stops every one."""

    def __init__(self, model: str, workdir: Path, calls: Path):
        self.model, self.workdir, self.calls = model, workdir, calls
        self.servers = []

    def start(self, *, wait: bool = True, model: str | None = None, **kw):
        from kvdirect.demo.sglang_cpu.server import Server

        env = dict(kw.pop("env", {}) or {})
        env["KVDIRECT_SGL_KERNEL_CALLS"] = str(self.calls)
        path = [*kw.pop("more_path", []), STANDIN]  # e.g. a test-only sitecustomize folder
        if kw.pop("testplugin", False):  # the test-only SGLang plugin (MLA on torch_native)
            path.append(TESTPLUGIN)
        s = Server(sys.executable, model or self.model, pythonpath=path, env=env,
                   log_dir=str(self.workdir), **kw)
        self.servers.append(s)
        if wait:
            s.start()
        else:
            s.launch()
        return s

    def start_all(self, specs: list[dict]):
        """Start several servers side by side (start-up is mostly waiting)."""
        servers = [self.start(wait=False, **kw) for kw in specs]
        for s in servers:
            s.wait_ready()
        return servers

    def stop_all(self):
        """Stop every server; each removes the /dev/shm files its own processes made."""
        errors = []
        for s in self.servers:
            try:
                s.stop()
            except Exception as e:  # keep stopping the others
                errors.append(e)
        self.servers.clear()
        if errors:
            raise errors[0]

    def check_standin(self):
        if self.calls.exists() and self.calls.read_text().strip():
            raise AssertionError("SGLang called into the sgl_kernel import stand-in: "
                                 + ", ".join(sorted(set(self.calls.read_text().split()))))


@pytest.fixture
def farm(model_dir, workdir, standin_calls):
    f = Farm(model_dir, workdir, standin_calls)
    yield f
    f.stop_all()
    f.check_standin()


@pytest.fixture(scope="module")
def module_farm(model_dir, workdir, standin_calls):
    f = Farm(model_dir, workdir, standin_calls)
    yield f
    f.stop_all()
    f.check_standin()


class Pools:
    """Unique embedded shm pools, destroyed at teardown."""

    def __init__(self):
        self.names = []

    def new(self, size: str = "256MiB") -> str:
        # 4 KiB blocks: an object takes at least one block, and page-size-1 pages are ~1 KiB
        name = f"kvd-e2e-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        return f"shm://{name}?size={size}&block=4KiB"

    def destroy(self):
        from kvdirect.stores.shm import destroy_pool

        for n in self.names:
            destroy_pool(n, missing_ok=True)
        self.names.clear()


@pytest.fixture
def pools():
    p = Pools()
    yield p
    p.destroy()


@pytest.fixture(scope="module")
def module_pools():
    p = Pools()
    yield p
    p.destroy()


# ---- tensor parallelism on CPU -------------------------------------------------
#: ``--tp-size 2`` on a CPU-only machine (SGLang 0.5.23): one OpenMP core per rank (otherwise
#: ``numa_utils.py`` asserts ranks <= NUMA nodes); an NCCL library path that does not load (the
#: SGLang environment's torch is a CUDA build shipping pip's libnccl, so SGLang would try NCCL on
#: CPU tensors: "Expected a cuda device, but got: cpu"; without it the ranks all-reduce over gloo).
#: ``--max-total-tokens`` is always given (each rank would otherwise size its KV for all memory).
TP2 = dict(args=["--tp-size", "2"],
           env={"SGLANG_CPU_OMP_THREADS_BIND": "0|1", "SGLANG_NCCL_SO_PATH": "/nonexistent/libnccl-kvdirect-tests.so"})


def tp2(**kw) -> dict:
    """Server arguments for ``--tp-size 2`` merged with ``kw`` (``args`` and ``env`` are joined)."""
    return dict(kw, args=[*TP2["args"], *kw.get("args", ())], env={**TP2["env"], **kw.get("env", {})})


# ---- prompts -----------------------------------------------------------------
VOCAB = 2048


def documents(n: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, size=(n, length), dtype=np.int64)


def with_prefix(doc: np.ndarray, shared: int, seed: int) -> np.ndarray:
    """``doc[:shared]`` followed by fresh tokens (the first differs from ``doc[shared]``)."""
    rng = np.random.default_rng(seed)
    tail = rng.integers(1, VOCAB, size=len(doc) - shared, dtype=np.int64)
    if shared < len(doc) and len(tail) and tail[0] == doc[shared]:
        tail[0] = doc[shared] % (VOCAB - 1) + 1
    return np.concatenate([doc[:shared], tail])


def expected_hit(shared: int, prompt_len: int, page_size: int) -> int:
    """Tokens a cache can reuse: whole pages of the shared prefix, the last prompt
    token always computed (SGLang matches at most len - 1 tokens)."""
    return min(shared, prompt_len - 1) // page_size * page_size


def wait_pool_objects(url: str, n: int, timeout: float = 60) -> int:
    """Wait until the shm pool at ``url`` holds at least ``n`` objects (write-back is asynchronous)."""
    import time

    from kvdirect.stores import open_store

    store = open_store(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            have = int(store.stats().get("objects", 0))
            if have >= n or time.monotonic() > deadline:
                return have
            time.sleep(0.2)
    finally:
        store.close()


@pytest.fixture(scope="session")
def clean_pool(model_dir, workdir, standin_calls):
    """Reference pages for pool audits (audit.CleanPool): a server per page size, started on
    first use, without faults or memory pressure, writing to its own pool."""
    from audit import CleanPool

    f, p = Farm(model_dir, workdir, standin_calls), Pools()
    yield CleanPool(f, p)
    f.stop_all()
    p.destroy()
    f.check_standin()


@pytest.fixture(scope="session")
def references(model_dir, workdir, standin_calls):
    """Greedy outputs of every workload sequence from a server with SGLang's own radix
    cache and from one with ``--disable-radix-cache``; they must agree with each other."""
    from workload import Workload, outputs

    seqs = Workload().sequences()
    f = Farm(model_dir, workdir, standin_calls)
    try:
        radix, plain = f.start_all([dict(radix="sglang", name="ref-radix"), dict(radix="none", name="ref-plain")])
        ref_radix = outputs(radix, seqs)
        ref_plain = outputs(plain, seqs)
    finally:
        f.stop_all()
    f.check_standin()
    differ = [k for k in ref_plain if ref_plain[k] != ref_radix[k]]
    assert not differ, f"SGLang's own cache and --disable-radix-cache disagree on {len(differ)} prompts"
    return ref_plain
