"""Runs tests/sglang/ inside an environment with the real sglang==0.5.23 (CPU).

SGLang pins torch and GPU packages that do not belong in kvdirect's own test
environment, so its tests run in a separate virtual environment:
``KVDIRECT_SGLANG_VENV`` if set (reused; created there if missing), else
``~/.cache/kvdirect/sglang-venv``. It is created with the recipe of
``shared/scripts/sglang-cpu-venv.sh`` (CPU torch, sglang --no-deps, the
modules its cache classes import) and this checkout is installed into it
(editable) when its ``kvdirect`` is not this checkout.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SGLANG = "sglang==0.5.23"
# the recipe of shared/scripts/sglang-cpu-venv.sh
RECIPE = [
    ["torch==2.14.1", "torchvision==0.29.1", "numpy"],
    ["--no-deps", SGLANG],
    ["orjson", "psutil", "pyzmq", "requests", "packaging", "pydantic", "msgspec", "xxhash",
     "setproctitle", "pybase64", "triton", "zstandard", "pillow", "starlette", "tqdm", "IPython",
     "aiohttp", "transformers==5.19.0", "dill", "apache-tvm-ffi==0.1.11", "sentencepiece",
     "compressed-tensors==0.18.0", "gguf", "openai==2.8.0", "partial_json_parser"],
    ["pytest", "scikit-build-core>=0.10", "pybind11>=2.12"],
]


def _run(cmd, timeout, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _venv() -> Path:
    venv = Path(os.environ.get("KVDIRECT_SGLANG_VENV") or Path.home() / ".cache/kvdirect/sglang-venv")
    py = venv / "bin" / "python"
    if not py.exists():
        r = _run([sys.executable, "-m", "venv", str(venv)], 300)
        if r.returncode:
            pytest.skip(f"cannot create the SGLang venv at {venv}: {r.stderr.strip()[-500:]}")
        for pkgs in RECIPE:
            r = _run([str(py), "-m", "pip", "install", "-q", *pkgs], 1800)
            if r.returncode:
                pytest.skip(f"cannot install {pkgs[:3]} into the SGLang venv {venv} "
                            f"(network?): {r.stderr.strip()[-500:]}")
    r = _run([str(py), "-c", "import sglang, sglang.srt.mem_cache.registry; print(sglang.__version__)"], 300)
    if r.returncode or r.stdout.strip() != SGLANG.split("==")[1]:
        pytest.skip(f"{venv} does not hold a working {SGLANG}: {(r.stdout + r.stderr).strip()[-500:]}")
    return venv


def _install_checkout(py: Path) -> None:
    probe = "import kvdirect, kvdirect._core, kvdirect.sglang; print(kvdirect.__file__)"
    r = _run([str(py), "-c", probe], 300, cwd="/")
    if r.returncode == 0 and Path(r.stdout.strip()).resolve().is_relative_to(ROOT):
        return
    _run([str(py), "-m", "pip", "install", "-q", "scikit-build-core>=0.10", "pybind11>=2.12", "pytest"], 600)
    r = _run([str(py), "-m", "pip", "install", "-q", "--no-build-isolation", "-e", str(ROOT)], 1800,
             env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")})
    if r.returncode:
        raise AssertionError(f"installing this checkout into the SGLang venv failed:\n{r.stderr[-3000:]}")


def test_sglang_plugin_suite():
    venv = _venv()
    py = venv / "bin" / "python"
    _install_checkout(py)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KVDIRECT_CONFIG")}
    r = _run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::UserWarning",
              str(ROOT / "tests" / "sglang")], 900, cwd=str(ROOT / "tests" / "sglang"), env=env)
    out = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, f"tests/sglang failed in {venv}:\n{out}"
    assert " passed" in r.stdout and " skipped" not in r.stdout.splitlines()[-1], out
