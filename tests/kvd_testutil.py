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


# ----------------------------------------------------------------------------- store clients that do not import

#: What `import mooncake.store` raises when a system library it links is absent: glibc's dlopen
#: message as Python reports it. Observed (Debian 12, mooncake-transfer-engine-non-cuda 0.3.13.post1)
#: by hiding libibverbs.so.1 in a private mount namespace (unshare -m) and importing the module.
MISSING_LIB_ERROR = "libibverbs.so.1: cannot open shared object file: No such file or directory"


class _FailingImport:
    """A meta-path finder that makes one package fail to import like a broken machine would."""

    def __init__(self, package: str, kind: str):
        if kind not in ("missing-lib", "not-installed"):
            raise ValueError(f"kind must be missing-lib or not-installed, got {kind!r}")
        self.package, self.kind = package, kind

    def find_spec(self, name, path=None, target=None):
        if self.kind == "not-installed" and (name == self.package or name.startswith(self.package + ".")):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        if self.kind == "missing-lib" and name == self.package + ".store":
            raise ImportError(MISSING_LIB_ERROR, name=name)
        return None


def fake_import_failure(kind: str, package: str = "mooncake"):
    """Make `import mooncake.store` fail: "missing-lib" (the package is there, libibverbs is not)
    or "not-installed". Returns a function that undoes it."""
    finder = _FailingImport(package, kind)
    saved = {n: m for n, m in sys.modules.items() if n == package or n.startswith(package + ".")}
    for n in saved:
        del sys.modules[n]
    sys.meta_path.insert(0, finder)

    def undo():
        sys.meta_path.remove(finder)
        for n in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[n]
        sys.modules.update(saved)

    return undo
