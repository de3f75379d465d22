"""Runs the SGLang suites inside the SGLang engine environment.

* ``tests/sglang/``: SGLang 0.5.23's real cache classes, KV pools and
  allocators, driven as its scheduler drives them (a few seconds);
* ``tests/e2e_sglang/``: real ``python -m sglang.launch_server`` processes on
  CPU sharing pools (shm, Mooncake, two network namespaces), layer-wise loading,
  start-up refusals (about 10 minutes on 2 cores).

SGLang pins torch and packages that do not belong in kvdirect's own test
environment, so both run in ONE separate virtual environment built and kept up
to date by ``scripts/sglang-env.sh`` (``KVDIRECT_SGLANG_VENV``, default
``~/.cache/kvdirect/sglang-venv``): about 6 GB and 4-8 minutes the first time,
announced when it starts, reused afterwards; this checkout is (re)installed into
it when its sources changed. A failed build is a failed test, with the reason.
``KVDIRECT_SGLANG_E2E=0`` leaves out the real-server suite (e.g. a quick local run).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "sglang-env.sh"
DEFAULT_VENV = Path.home() / ".cache" / "kvdirect" / "sglang-venv"


def _venv_dir() -> Path:
    return Path(os.environ.get("KVDIRECT_SGLANG_VENV") or DEFAULT_VENV)


@pytest.fixture(scope="module")
def sglang_python(pytestconfig) -> Path:
    """The SGLang environment's Python, built or updated by scripts/sglang-env.sh."""
    venv = _venv_dir()
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    fresh = not (venv / "bin" / "python").exists()
    ctx = capman.global_and_fixture_disabled() if capman else None
    if ctx:
        ctx.__enter__()
    try:
        if fresh:
            print(f"\n[kvdirect] building the SGLang engine environment for the SGLang tests in {venv}: "
                  "about 6 GB, 4-8 minutes on 2 cores, once (reused by later runs; "
                  "KVDIRECT_SGLANG_VENV puts it elsewhere)", file=sys.stderr, flush=True)
        r = subprocess.run(["bash", str(SCRIPT), str(venv)], stdout=subprocess.PIPE, stderr=None if fresh else
                           subprocess.PIPE, text=True, timeout=3600)
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    if r.returncode:
        raise AssertionError(f"scripts/sglang-env.sh could not build the SGLang environment at {venv} "
                             f"(exit {r.returncode}):\n{(r.stderr or '')[-3000:]}")
    return venv / "bin" / "python"


def _suite(py: Path, folder: str, timeout: int, extra=()) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KVDIRECT_CONFIG")}
    cmd = [str(py), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-W", "ignore::UserWarning",
           *extra, str(ROOT / "tests" / folder)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           cwd=str(ROOT / "tests" / folder), env=env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"tests/{folder} did not finish within {timeout}s:\n"
                             f"{(e.stdout or b'')[-4000:]!r}") from None
    out = r.stdout[-8000:] + r.stderr[-2000:]
    assert r.returncode == 0, f"tests/{folder} failed in the SGLang environment:\n{out}"
    return r.stdout


def test_sglang_cache_classes(sglang_python):
    """tests/sglang/: no skips allowed."""
    out = _suite(sglang_python, "sglang", 600)
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, out[-4000:]


@pytest.mark.skipif(os.environ.get("KVDIRECT_SGLANG_E2E") == "0", reason="KVDIRECT_SGLANG_E2E=0 was set")
def test_sglang_real_servers(sglang_python):
    """tests/e2e_sglang/: the only skip allowed is the two-namespace test where namespaces
    cannot be created (it says why)."""
    out = _suite(sglang_python, "e2e_sglang", 3600)
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary, out[-4000:]
    skips = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]
    assert all("network namespace" in ln for ln in skips), "\n".join(skips)
    print(summary)
