"""Runs tests/sglang/ inside an environment with the real sglang==0.5.23 (CPU).

SGLang pins torch and GPU packages that do not belong in kvdirect's own test
environment, so its tests run in a separate virtual environment:

* ``KVDIRECT_SGLANG_VENV`` if set: used as it is when it exists (e.g. one made by
  ``shared/scripts/sglang-cpu-venv.sh``), built there when it does not;
* else ``~/.cache/kvdirect/sglang-venv``, built on first use (~6 GB, minutes).

A venv is built with the recipe of ``shared/scripts/sglang-cpu-venv.sh`` (CPU
torch, sglang --no-deps, the modules its cache classes import). A build that
did not finish leaves a marker and is redone from scratch next time. This
checkout is installed into the venv (editable) when the venv's ``kvdirect`` is
another copy, lacks the plugin entry point, or its compiled core is older than
the C++ sources.
"""
import os
import shutil
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
BUILDING = ".kvdirect-building"   # present while (or if) a build did not finish
SUITE_TIMEOUT_S = 180


def _run(cmd, timeout, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _build_venv(venv: Path) -> None:
    py = venv / "bin" / "python"
    venv.mkdir(parents=True, exist_ok=True)
    (venv / BUILDING).touch()
    r = _run([sys.executable, "-m", "venv", str(venv)], 300)
    if r.returncode:
        pytest.skip(f"cannot create the SGLang venv at {venv}: {r.stderr.strip()[-500:]}")
    for pkgs in RECIPE:
        r = _run([str(py), "-m", "pip", "install", "-q", *pkgs], 1800)
        if r.returncode:
            pytest.skip(f"cannot install {pkgs[:3]} into the SGLang venv {venv} "
                        f"(network?): {r.stderr.strip()[-500:]}")
    (venv / BUILDING).unlink()


def _venv() -> Path:
    venv = Path(os.environ.get("KVDIRECT_SGLANG_VENV") or Path.home() / ".cache/kvdirect/sglang-venv")
    if (venv / BUILDING).exists():      # an earlier build was interrupted
        shutil.rmtree(venv)
    if not (venv / "bin" / "python").exists():
        _build_venv(venv)
    r = _run([str(venv / "bin" / "python"), "-c",
              "import sglang, sglang.srt.mem_cache.registry; print(sglang.__version__)"], 300)
    if r.returncode or r.stdout.strip() != SGLANG.split("==")[1]:
        pytest.skip(f"{venv} does not hold a working {SGLANG}: {(r.stdout + r.stderr).strip()[-500:]}")
    return venv


_PROBE = """
import kvdirect, kvdirect._core, kvdirect.sglang
from importlib.metadata import entry_points
eps = [e.value for e in entry_points(group="sglang.srt.plugins") if e.name == "kvdirect"]
print(kvdirect.__file__); print(kvdirect._core.__file__); print(eps == ["kvdirect.sglang:register"])
"""


def _stale(py: Path) -> str:
    """Why this checkout must be (re)installed into the venv ('' when it need not)."""
    r = _run([str(py), "-c", _PROBE], 300, cwd="/")
    if r.returncode:
        return "kvdirect does not import"
    pkg, core, ep = r.stdout.split()
    if not Path(pkg).resolve().is_relative_to(ROOT):
        return f"the venv's kvdirect is {pkg}"
    if ep != "True":
        return "the sglang.srt.plugins entry point is not installed"
    sources = [ROOT / "CMakeLists.txt", ROOT / "pyproject.toml", *ROOT.glob("csrc/**/*")]
    if max(p.stat().st_mtime for p in sources if p.is_file()) > Path(core).stat().st_mtime:
        return "the compiled core is older than the sources"
    return ""


def _install_checkout(py: Path) -> None:
    if not _stale(py):
        return
    r = _run([str(py), "-m", "pip", "install", "-q", "--no-build-isolation", "-e", str(ROOT)], 1800,
             env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")})
    if r.returncode:
        raise AssertionError(f"installing this checkout into the SGLang venv failed:\n{r.stderr[-3000:]}")
    why = _stale(py)
    assert not why, f"after installing this checkout into {py.parent.parent}: {why}"


def test_sglang_plugin_suite():
    venv = _venv()
    py = venv / "bin" / "python"
    _install_checkout(py)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KVDIRECT_CONFIG")}
    try:
        r = _run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::UserWarning",
                  str(ROOT / "tests" / "sglang")], SUITE_TIMEOUT_S, cwd=str(ROOT / "tests" / "sglang"),
                 env=env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"tests/sglang did not finish within {SUITE_TIMEOUT_S}s:\n"
                             f"{(e.stdout or b'')[-4000:]!r}") from None
    out = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, f"tests/sglang failed in {venv}:\n{out}"
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, out
