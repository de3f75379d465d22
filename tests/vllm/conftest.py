"""Tests that run inside the vLLM environment (scripts/vllm-env.sh; see tests/test_vllm_connector.py).

Every engine runs in its own process (tests/vllm/driver.py), as two serving
instances would; at most a few run at once on a small machine.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Outside a vLLM environment these run through tests/test_vllm_connector.py. Look the module up
# without importing vLLM (slow); "vllm.distributed" because tests/vllm itself looks like "vllm".
try:
    _HAVE_VLLM = importlib.util.find_spec("vllm.distributed.kv_transfer") is not None
except ImportError:
    _HAVE_VLLM = False
if not _HAVE_VLLM:
    collect_ignore_glob = ["test_*.py"]

ENGINE_TIMEOUT_S = int(os.environ.get("KVDIRECT_VLLM_ENGINE_TIMEOUT", "600"))


class EngineFailed(AssertionError):
    def __init__(self, msg, stderr):
        super().__init__(msg)
        self.stderr = stderr


MAX_PARALLEL = int(os.environ.get("KVDIRECT_VLLM_PARALLEL", "3"))  # engines at once (memory, shared cores)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KVDIRECT_CONFIG")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def _kill_group(p, files=None) -> dict:
    """End an engine and anything it started (its own session), whether or not it exited, then
    remove the /dev/shm files its processes made (vLLM's ``psm_*`` message queues): only those,
    never by prefix (another user's engine would lose its queues). Returns the files seen and
    those removed."""
    if files is not None:
        files.note()
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()
    if files is None:
        return {}
    deadline = time.monotonic() + 10
    while files.pids() and time.monotonic() < deadline:  # killed processes may take a moment to go
        time.sleep(0.05)
    seen = sorted(f for f in files.seen if Path(f).name.startswith(files.prefixes))
    return {"seen": seen, "removed": files.remove()}


def run_engines(jobs: dict, *, timeout: int = ENGINE_TIMEOUT_S, expect_fail: bool = False) -> dict:
    """Run independent engine processes (name -> job, see driver.py), at most MAX_PARALLEL at
    once; returns name -> result dict (or, expect_fail, name -> EngineFailed with its stderr)."""
    from kvdirect.procshm import ShmFiles

    pending, running, results = list(jobs.items()), {}, {}
    with tempfile.TemporaryDirectory(prefix="kvd-vllm-") as d:
        try:
            while pending or running:
                while pending and len(running) < MAX_PARALLEL:
                    name, job = pending.pop(0)
                    wd = Path(d) / uuid.uuid4().hex[:8]
                    wd.mkdir()
                    (wd / "job.json").write_text(json.dumps(job))
                    err = open(wd / "stderr", "w")
                    p = subprocess.Popen([sys.executable, str(HERE / "driver.py"), str(wd / "job.json"),
                                          str(wd / "out.json")], stdout=subprocess.DEVNULL, stderr=err,
                                         env=_env(), cwd=wd, start_new_session=True)
                    running[name] = (p, wd, err, time.monotonic(), ShmFiles(p.pid))
                for name, (p, wd, err, t0, files) in list(running.items()):
                    rc = p.poll()
                    if rc is None and time.monotonic() - t0 < timeout:
                        files.note()
                        continue
                    removed = _kill_group(p, files)
                    err.close()
                    del running[name]
                    stderr = (wd / "stderr").read_text(errors="replace")
                    out = wd / "out.json"
                    if rc is None:
                        raise AssertionError(f"engine {name!r} did not finish within {timeout}s:\n{stderr[-3000:]}")
                    if rc != 0 or not out.exists():
                        e = EngineFailed(f"engine {name!r} exited {rc}:\n{stderr[-6000:]}", stderr)
                        if not expect_fail:
                            raise e
                        results[name] = e
                    elif expect_fail:
                        raise AssertionError(f"engine {name!r} started although it should have refused:\n"
                                             f"{stderr[-3000:]}")
                    else:
                        results[name] = json.loads(out.read_text())
                        results[name]["shm"] = removed
                time.sleep(0.2)
        finally:
            for p, _, err, _, files in running.values():
                _kill_group(p, files)
                err.close()
    return results


def run_engine(job: dict, **kw) -> dict:
    return run_engines({"engine": job}, **kw)["engine"]


@pytest.fixture(scope="session")
def model():
    import make_model

    return str(make_model.build("tiny"))


def _shm():
    from kvdirect.stores.shm import destroy_pool

    name = f"kvd-vllm-{uuid.uuid4().hex[:10]}"
    yield f"shm://{name}?size=256MiB"
    destroy_pool(name, missing_ok=True)


@pytest.fixture
def shm_url():
    yield from _shm()


@pytest.fixture(scope="module")
def module_shm_url():
    yield from _shm()


@pytest.fixture(scope="module")
def mooncake_master():
    from kvdirect.services import start_mooncake_master

    svc = start_mooncake_master(store_params=dict(segment="256MiB", buffer="64MiB", timeout=10))
    yield svc
    svc.stop()


def tokens(seed: int, n: int, vocab: int = 2048) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def kvdirect(url: str, **extra) -> dict:
    return {"connector": "kvdirect", "extra": {"store": url, **extra}}
