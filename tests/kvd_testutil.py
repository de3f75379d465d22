"""Helpers shared by test modules (a plain module: conftest.py files are not importable
by name once several directories have one)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("KVDIRECT_SHARED", ROOT.parent / "shared"))
if not SHARED.is_dir() and (ROOT.parent.parent / "shared").is_dir():
    SHARED = ROOT.parent.parent / "shared"   # git worktrees under /work/wt/NAME
TESTDATA = SHARED / "testdata"


def run_cli(*args, env=None, check=True):
    r = subprocess.run([sys.executable, "-m", "kvdirect", *args], capture_output=True,
                       text=True, env=env, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"kvdirect {' '.join(args)} exited {r.returncode}\n"
                             f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r
