"""What this process can see at run time: devices and store clients.

Probes go through ctypes and importlib only, so they work without torch and
never crash when a driver is absent.
"""
from __future__ import annotations

import ctypes
import glob
import importlib
import os
import re
from dataclasses import dataclass


@dataclass
class Probe:
    available: bool
    detail: str


def cuda_devices() -> Probe:
    """Count CUDA devices through the driver API (libcuda), without torch."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return Probe(False, "no CUDA driver (libcuda.so.1 not found)")
    rc = lib.cuInit(0)
    if rc != 0:
        return Probe(False, f"CUDA driver present but cuInit failed (error {rc})")
    n = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(n))
    if rc != 0 or n.value == 0:
        return Probe(False, "CUDA driver present, no device visible")
    return Probe(True, f"{n.value} CUDA device(s) visible")


def npu_devices() -> Probe:
    """Ascend NPUs: device nodes plus the ACL runtime library."""
    nodes = sorted(glob.glob("/dev/davinci[0-9]*"))
    if not nodes:
        return Probe(False, "no Ascend NPU (/dev/davinci* absent)")
    try:
        acl = ctypes.CDLL("libascendcl.so")
    except OSError:
        return Probe(False, f"{len(nodes)} NPU device node(s) but libascendcl.so not loadable "
                            "(source CANN's set_env.sh)")
    n = ctypes.c_uint32(0)
    if acl.aclrtGetDeviceCount(ctypes.byref(n)) != 0:
        return Probe(False, "ACL present but aclrtGetDeviceCount failed")
    return Probe(True, f"{n.value} NPU device(s) visible")


#: per store client module: (pip extra, distributions to report the version of, Debian packages of the
#: system libraries it loads). Mooncake's extension modules link libibverbs / libnuma (and its transfer
#: engine librdmacm); without them ``import mooncake.store`` fails with an ImportError naming the .so.
STORE_CLIENTS = {
    "mooncake.store": ("mooncake", ("mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine"),
                       ("libibverbs1", "librdmacm1", "libnuma1")),
    "memcache_hybrid": ("memcache", ("memcache-hybrid",), ()),
}
#: shared library -> the Debian package that ships it
LIBRARY_PACKAGES = {"libibverbs.so.1": "libibverbs1", "librdmacm.so.1": "librdmacm1", "libnuma.so.1": "libnuma1"}
_MISSING_SO = re.compile(r"([\w.+-]+\.so(?:\.[\w]+)*): cannot open shared object file")


@dataclass
class ClientImport:
    """Outcome of importing a store client: ``state`` is ok, not_installed, missing_library or broken."""

    module: str
    state: str
    message: str          # one line: what happened and the command that fixes it
    library: str | None = None
    version: str | None = None


def apt_command(module: str) -> str:
    pkgs = STORE_CLIENTS.get(module, (None, (), ()))[2]
    return f"apt-get install -y {' '.join(pkgs)}" if pkgs else ""


def _dist_version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (module.split(".")[0], *STORE_CLIENTS.get(module, (None, ()))[1]):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def client_import(module: str) -> ClientImport:
    """Import a store client module and say precisely why it fails (never raises)."""
    extra = STORE_CLIENTS.get(module, (module,))[0]
    pip = f'pip install "kvdirect[{extra}]"'
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):  # the package itself (or its submodule) is absent
            apt = apt_command(module)
            return ClientImport(module, "not_installed", f"{module} is not installed ({e}): {pip}"
                                + (f" and its system libraries: {apt}" if apt else ""))
        err = e
    except ImportError as e:  # a missing shared library is an ImportError, not ModuleNotFoundError
        err = e
    except Exception as e:  # a client whose import itself crashes (OSError from ctypes, ...)
        err = e
    else:
        ver = getattr(mod, "__version__", None) or _dist_version(module)
        return ClientImport(module, "ok", f"imports ({ver or 'version unknown'})", version=ver)
    ver = _dist_version(module)
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    installed = f"{module} ({ver or 'version unknown'}) is installed but"
    m = _MISSING_SO.search(str(err))
    if m:
        lib = m.group(1)
        pkg = LIBRARY_PACKAGES.get(lib)
        apt = apt_command(module)
        fix = (f"install its system libraries: {apt}" if apt and pkg in apt.split()
               else f"install the system package that provides {lib}" + (f" (Debian: {pkg})" if pkg else ""))
        return ClientImport(module, "missing_library",
                            f"{installed} cannot load the system library {lib}"
                            + (f" (Debian package {pkg})" if pkg else "") + f"; {fix}", library=lib, version=ver)
    return ClientImport(module, "broken", f"{installed} does not import ({type(err).__name__}: {first}); "
                                          f"reinstall it: {pip}" + (f" and {apt_command(module)}"
                                                                      if apt_command(module) else ""),
                        version=ver)


def store_client(module: str) -> Probe:
    """Whether a store client imports (mooncake.store, memcache_hybrid); if not, why and the fix."""
    ci = client_import(module)
    return Probe(ci.state == "ok", ci.message if ci.state == "ok" else f"not importable: {ci.message}")


def ascend_home() -> str | None:
    return os.environ.get("ASCEND_HOME_PATH") or None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), or the platform's best guess."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One line naming the machine a benchmark ran on (benchmarks print it with their figures)."""
    import platform

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, load avg {load:.2f}")


def available_memory() -> int:
    """Bytes of memory available to new work (MemAvailable), for up-front size checks."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
