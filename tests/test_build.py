"""The foundation: the extension builds, links nothing device-specific, and
`kvdirect doctor` tells the truth about this machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kvdirect
from kvdirect import _core
from kvd_testutil import ROOT, run_cli

sys.path.insert(0, str(ROOT / "build_support"))
import kvd_version  # noqa: E402


def test_core_reports_its_build():
    info = _core.build_info
    assert info["cpu"] is True
    assert info["version"] == _core.__version__
    assert kvdirect.__version__.startswith(kvd_version.base_version())
    assert "-O3" in info["cxx_flags"] or info["sanitize"]
    if not info["cuda"]:
        assert info["cuda_reason"], "a build without CUDA must say why"


def test_core_links_no_device_runtime():
    """One core build serves every torch and CUDA/CANN version: it must not link them."""
    so = Path(_core.__file__)
    out = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
    for lib in ("libtorch", "libc10", "libcudart", "libcuda.so", "libascendcl", "libpython"):
        assert lib not in out, f"_core links {lib}:\n{out}"


def test_cuda_library_present_iff_built():
    pkg = Path(_core.__file__).parent   # editable installs keep built libs beside _core
    libs = list(pkg.glob("libkvdirect_cuda*.so"))
    assert bool(libs) == bool(_core.build_info["cuda"])


def test_doctor_exits_zero_and_is_truthful():
    d = json.loads(run_cli("doctor", "--json").stdout)
    assert d["version"] == kvdirect.__version__
    assert d["backends_built"][0] == "cpu"
    assert ("cuda" in d["backends_built"]) == bool(_core.build_info["cuda"])
    assert ("ascend" in d["backends_built"]) == bool(_core.build_info["ascend"])
    # device visibility must agree with an independent probe
    try:
        import ctypes
        ctypes.CDLL("libcuda.so.1")
        have_driver = True
    except OSError:
        have_driver = False
    if not have_driver:
        assert d["devices"]["cuda"]["available"] is False
    if not list(Path("/dev").glob("davinci[0-9]*")):
        assert d["devices"]["npu"]["available"] is False
    # store clients reported as importable exactly when they import
    for key, mod in (("mooncake", "mooncake.store"), ("memcache", "memcache_hybrid")):
        r = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True)
        assert d["stores"][key]["available"] == (r.returncode == 0), (key, d["stores"][key])


_DOCTOR_WITH = """
import sys
sys.path.insert(0, {tests!r})
from kvd_testutil import fake_import_failure
fake_import_failure({kind!r})
from kvdirect.cli import main
sys.exit(main(["doctor"]))
"""


@pytest.mark.parametrize("kind", ["missing-lib", "not-installed"])
def test_doctor_says_what_mooncake_lacks(kind):
    """Mooncake installed without its system libraries: doctor names the library and the apt command;
    not installed at all: the pip extra (and the apt command it will need)."""
    code = _DOCTOR_WITH.format(tests=str(ROOT / "tests"), kind=kind)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # installed but unusable: an error (exit 1, one line naming it); not installed: no error
    if kind == "missing-lib":
        assert r.returncode == 1, r.stderr[-2000:]
        (err,) = r.stderr.strip().splitlines()
        assert err.startswith("kvdirect doctor: error: installed store client cannot be used: mooncake (") and \
            "libibverbs.so.1" in err, err
    else:
        assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("mooncake ")]
    assert " no " in line and "apt-get install -y libibverbs1 librdmacm1 libnuma1" in line, line
    if kind == "missing-lib":
        assert "cannot load the system library libibverbs.so.1 (Debian package libibverbs1)" in line, line
    else:
        assert 'pip install "kvdirect[mooncake]"' in line, line


def test_doctor_fails_for_a_broken_client_on_the_path(tmp_path):
    """A store client that is there but broken (here: a memcache_hybrid whose own dependency is missing,
    first on PYTHONPATH) makes doctor exit 1 and say so in one line; the report still prints."""
    pkg = tmp_path / "memcache_hybrid"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import kvd_no_such_dependency_of_memcache  # noqa\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = run_cli("doctor", env=env, check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    (err,) = r.stderr.strip().splitlines()
    assert err.startswith("kvdirect doctor: error: installed store client cannot be used: memcache (") and \
        "kvd_no_such_dependency_of_memcache" in err, err
    assert r.stdout.startswith("kvdirect ") and "memcache" in r.stdout
    d = json.loads(run_cli("doctor", "--json", env=env, check=False).stdout)
    assert d["stores"]["memcache"]["state"] == "broken" and len(d["problems"]) == 1
    # the same client simply absent is no error
    (pkg / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'memcache_hybrid'\", "
                                     "name='memcache_hybrid')\n")
    r = run_cli("doctor", env=env, check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_doctor_human_output():
    out = run_cli("doctor").stdout
    assert out.startswith(f"kvdirect {kvdirect.__version__}")
    for word in ("backends", "cuda", "npu", "mooncake", "memcache"):
        assert word in out


def test_cli_without_command_shows_help_and_fails():
    r = run_cli(check=False)
    assert r.returncode == 2 and "doctor" in r.stdout
    r = run_cli("no-such-command", check=False)
    assert r.returncode != 0 and "invalid choice" in r.stderr


def test_status_names():
    assert _core.status_name(_core.Status.OK) == "ok"
    assert _core.status_name(_core.Status.CORRUPT) == "corrupt"


def test_lazy_exports_fail_clearly():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kvdirect.nope  # noqa: B018


# ---- the wheel's version label: one wheel per CANN version ------------------

def test_version_without_ascend_has_no_label(tmp_path):
    assert kvd_version.local_label({}) == ""
    assert kvd_version.local_label({"ASCEND_HOME_PATH": str(tmp_path), "KVDIRECT_ASCEND": "OFF"}) == ""


@pytest.mark.parametrize("fname,content,label", [
    ("version.cfg", "# CANN\nversion=8.2.RC1\n", "+cann8.2.rc1"),
    ("ascend_toolkit_install.info", "package_name=Ascend-cann-toolkit\nversion=8.0.0\n", "+cann8.0.0"),
    ("version.cfg", "toolkit_installed_version=[8.1.RC1.alpha001:8.1.RC1]\n", "+cann8.1.rc1.alpha001"),
])
def test_version_with_cann_label(tmp_path, fname, content, label):
    (tmp_path / fname).write_text(content)
    env = {"ASCEND_HOME_PATH": str(tmp_path)}
    assert kvd_version.local_label(env) == label
    from packaging.version import Version
    v = Version(kvd_version.base_version() + label)  # valid PEP 440
    assert v.local


def test_version_with_cann_but_no_version_file_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="KVDIRECT_ASCEND=OFF"):
        kvd_version.local_label({"ASCEND_HOME_PATH": str(tmp_path)})
