"""One-line description of the machine a benchmark ran on."""
import os
import platform


def describe() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import numpy as np
        npv = np.__version__
    except ImportError:
        npv = "-"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, numpy {npv}")
