"""Helpers shared by test modules (a plain module: conftest.py files are not importable
by name once several directories have one)."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"   # facts the tests check against, each with how it was made


def run_cli(*args, env=None, check=True):
    r = subprocess.run([sys.executable, "-m", "kvdirect", *args], capture_output=True,
                       text=True, env=env, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"kvdirect {' '.join(args)} exited {r.returncode}\n"
                             f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def wait_for_file(path, timeout=15.0) -> None:
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"child never reached its hold point ({path})")
        time.sleep(0.002)


def run_bounded(fn, timeout=30.0):
    """Run fn on a thread; fail (instead of hanging the suite) if it deadlocks."""
    box = {}

    def target():
        try:
            box["v"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["e"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"operation did not finish within {timeout}s (deadlock?)"
    if "e" in box:
        raise box["e"]
    return box.get("v")
