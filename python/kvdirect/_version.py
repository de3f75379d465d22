"""The installed distribution's version (carries +cannX.Y on Ascend wheels)."""
from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version as _dist_version

    __version__ = _dist_version("kvdirect")
except PackageNotFoundError:  # running from a source tree without install
    from pathlib import Path

    _f = Path(__file__).resolve().parents[2] / "VERSION"
    __version__ = _f.read_text().strip() + "+unknown" if _f.is_file() else "0+unknown"
