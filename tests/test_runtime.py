"""kvdirect.runtime: why a store client does not import, and the command that fixes it."""
import types

import pytest

from kvdirect import runtime
from kvd_testutil import MISSING_LIB_ERROR


def _importing_raises(monkeypatch, exc):
    def import_module(name):
        raise exc
    monkeypatch.setattr(runtime, "importlib", types.SimpleNamespace(import_module=import_module))


@pytest.mark.parametrize("lib, pkg", [("libibverbs.so.1", "libibverbs1"), ("librdmacm.so.1", "librdmacm1"),
                                      ("libnuma.so.1", "libnuma1")])
def test_missing_mooncake_library_names_it_and_the_apt_command(monkeypatch, lib, pkg):
    _importing_raises(monkeypatch, ImportError(MISSING_LIB_ERROR.replace("libibverbs.so.1", lib)))
    ci = runtime.client_import("mooncake.store")
    assert ci.state == "missing_library" and ci.library == lib
    assert f"cannot load the system library {lib} (Debian package {pkg})" in ci.message
    assert ci.message.endswith("apt-get install -y libibverbs1 librdmacm1 libnuma1")
    probe = runtime.store_client("mooncake.store")
    assert not probe.available and probe.detail == f"not importable: {ci.message}"


def test_a_library_outside_the_known_packages_is_still_named(monkeypatch):
    _importing_raises(monkeypatch, ImportError("libascendcl.so: cannot open shared object file: No such file"))
    ci = runtime.client_import("memcache_hybrid")
    assert ci.state == "missing_library" and ci.library == "libascendcl.so"
    assert "install the system package that provides libascendcl.so" in ci.message


def test_not_installed_gives_the_pip_extra(monkeypatch):
    _importing_raises(monkeypatch, ModuleNotFoundError("No module named 'mooncake'", name="mooncake"))
    ci = runtime.client_import("mooncake.store")
    assert ci.state == "not_installed"
    assert 'pip install "kvdirect[mooncake]" and its system libraries: apt-get install -y libibverbs1' in ci.message
    _importing_raises(monkeypatch, ModuleNotFoundError("No module named 'memcache_hybrid'", name="memcache_hybrid"))
    ci = runtime.client_import("memcache_hybrid")
    assert ci.state == "not_installed" and ci.message.endswith('pip install "kvdirect[memcache]"')


def test_a_dependency_missing_inside_the_client_is_broken_not_absent(monkeypatch):
    """ModuleNotFoundError for another module (the client's own dependency) is a broken install."""
    _importing_raises(monkeypatch, ModuleNotFoundError("No module named 'yaml'", name="yaml"))
    ci = runtime.client_import("mooncake.store")
    assert ci.state == "broken" and "No module named 'yaml'" in ci.message and "reinstall" in ci.message
    _importing_raises(monkeypatch, ImportError("store.so: undefined symbol: _ZN8mooncake5Store"))
    ci = runtime.client_import("mooncake.store")
    assert ci.state == "broken" and "undefined symbol" in ci.message


def test_import_state_agrees_with_a_real_import():
    """client_import's verdict against ground truth: the module imported in a fresh interpreter.
    Imports there: "ok" with the distribution's version. Does not: never "ok", and the reason given
    is the one the import raised."""
    import subprocess
    import sys

    for module in runtime.STORE_CLIENTS:
        r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
        ci = runtime.client_import(module)
        if r.returncode == 0:
            assert ci.state == "ok", (module, ci)
            assert ci.version == runtime._dist_version(module) and ci.version, (module, ci)
            assert ci.message == f"imports ({ci.version})"
        else:
            last = r.stderr.strip().splitlines()[-1]          # e.g. "ModuleNotFoundError: No module named 'x'"
            assert ci.state != "ok" and "\n" not in ci.message, (module, ci)
            assert last.split(": ", 1)[-1] in ci.message, (last, ci.message)
