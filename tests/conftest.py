import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("KVDIRECT_SHARED", ROOT.parent / "shared"))
if not SHARED.is_dir() and (ROOT.parent.parent / "shared").is_dir():
    SHARED = ROOT.parent.parent / "shared"   # git worktrees under /work/wt/NAME
TESTDATA = SHARED / "testdata"

# hypothesis: CI profile runs more examples; every run is deterministic-seeded
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
except ImportError:  # hypothesis is in the [test] extra
    pass


@pytest.fixture(scope="session")
def testdata() -> Path:
    if not TESTDATA.is_dir():
        pytest.skip(f"shared test data not found at {TESTDATA} (it sits beside the checkout)")
    return TESTDATA


def run_cli(*args, env=None, check=True):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "kvdirect", *args], capture_output=True,
                       text=True, env=env, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"kvdirect {' '.join(args)} exited {r.returncode}\n"
                             f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r
