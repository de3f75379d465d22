"""scikit-build-core dynamic-metadata provider for kvdirect's version.

The base version lives in ``VERSION``. A wheel built with the Ascend backend
carries the CANN toolkit version as a PEP 440 local label (``0.1.0+cann8.2.rc1``)
so that one wheel exists per CANN version; torch is never part of the label
because the core takes addresses and sizes, not torch types.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_VERSION_FILES = ("version.cfg", "ascend_toolkit_install.info", "version.info")


def base_version() -> str:
    return (_ROOT / "VERSION").read_text().strip()


def ascend_enabled(env: dict | os._Environ = os.environ) -> bool:
    """Mirror CMake's KVDIRECT_ASCEND=AUTO|ON|OFF decision (AUTO: toolkit present)."""
    mode = env.get("KVDIRECT_ASCEND", "AUTO").upper()
    if mode == "OFF":
        return False
    home = env.get("ASCEND_HOME_PATH", "")
    return bool(home) and Path(home).is_dir()


def cann_version(home: str | Path) -> str | None:
    """Read the toolkit version ("8.2.RC1") from a CANN install directory."""
    for name in _VERSION_FILES:
        f = Path(home) / name
        if not f.is_file():
            continue
        for line in f.read_text(errors="replace").splitlines():
            m = re.match(r"\s*(?:toolkit_)?(?:installed_)?version\s*=\s*\[?([0-9][0-9A-Za-z.]*)", line)
            if m:
                return m.group(1)
    return None


def local_label(env: dict | os._Environ = os.environ) -> str:
    if not ascend_enabled(env):
        return ""
    ver = cann_version(env["ASCEND_HOME_PATH"])
    if ver is None:
        raise RuntimeError(
            f"ASCEND_HOME_PATH={env['ASCEND_HOME_PATH']} has no CANN version file "
            f"({', '.join(_VERSION_FILES)}); set KVDIRECT_ASCEND=OFF to build without Ascend"
        )
    parts = [p for p in re.split(r"[^0-9A-Za-z]+", ver.lower()) if p]
    return "+cann" + ".".join(parts)


def full_version(env: dict | os._Environ = os.environ) -> str:
    return base_version() + local_label(env)


def dynamic_metadata(field: str, settings: dict | None = None) -> str:
    if field != "version":
        raise ValueError(f"kvd_version only provides 'version', not {field!r}")
    return full_version()
