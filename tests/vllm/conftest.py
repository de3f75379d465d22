"""Tests that run inside the vLLM environment (scripts/vllm-env.sh; see tests/test_vllm_connector.py).

Every engine runs in its own process (tests/vllm/driver.py), as two serving
instances would; at most a few run at once on a small machine.
"""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
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


def run_engine(job: dict, *, timeout: int = ENGINE_TIMEOUT_S, expect_fail: bool = False) -> dict:
    """Run one engine process on ``job`` (see driver.py); returns its result dict, or
    (expect_fail) the EngineFailed with its stderr."""
    with tempfile.TemporaryDirectory(prefix="kvd-vllm-") as d:
        jf, of = Path(d) / "job.json", Path(d) / "out.json"
        jf.write_text(json.dumps(job))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KVDIRECT_CONFIG")}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            r = subprocess.run([sys.executable, str(HERE / "driver.py"), str(jf), str(of)], capture_output=True,
                               text=True, timeout=timeout, env=env, cwd=d)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"engine did not finish within {timeout}s:\n{(e.stderr or b'')[-3000:]!r}") \
                from None
        if r.returncode != 0 or not of.exists():
            err = EngineFailed(f"engine exited {r.returncode}:\n{r.stderr[-6000:]}", r.stderr)
            if expect_fail:
                return err
            raise err
        if expect_fail:
            raise AssertionError(f"engine started although it should have refused:\n{r.stderr[-3000:]}")
        return json.loads(of.read_text())


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
