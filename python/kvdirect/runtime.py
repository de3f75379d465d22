"""What this process can see at run time: devices and store clients.

Probes go through ctypes and importlib only, so they work without torch and
never crash when a driver is absent.
"""
from __future__ import annotations

import ctypes
import glob
import importlib
import os
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


def store_client(module: str) -> Probe:
    """Whether a store client imports (mooncake.store, memcache_hybrid)."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ImportError, or a missing shared library (OSError)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return Probe(False, f"not importable: {msg}")
    ver = getattr(mod, "__version__", None)
    if ver is None:
        top = module.split(".")[0]
        for dist in (top, "mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine",
                     "memcache-hybrid"):
            try:
                from importlib.metadata import version
                ver = version(dist)
                break
            except Exception:
                continue
    return Probe(True, f"imports ({ver or 'version unknown'})")


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
