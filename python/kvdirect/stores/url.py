"""Store URLs: ``scheme://[host[:port]][/name]?key=value&...`` plus size parsing."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from kvdirect.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4,
          "tib": 1 << 40}


def parse_size(text: str | int) -> int:
    """'8GiB', '512MB', '1048576' -> bytes. Clear error on anything else."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must be >= 0, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"bad size {text!r}: use e.g. 512MiB, 8GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class StoreURL:
    scheme: str
    host: str | None
    port: int | None
    path: str
    params: dict[str, str] = field(default_factory=dict)
    raw: str = ""

    def pop(self, key: str, default=None):
        return self.params.pop(key, default)

    def reject_unknown(self) -> None:
        """Call after popping every known parameter."""
        if self.params:
            raise ConfigError(f"unknown parameter(s) {sorted(self.params)} in store URL {self.raw!r}")


def parse_url(url: str) -> StoreURL:
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"store URL must look like scheme://..., got {url!r} "
                          "(e.g. shm://kvdirect?size=8GiB, mooncake://127.0.0.1:50051?..., memcache://?config=...)")
    u = urlsplit(url)
    try:
        port = u.port
    except ValueError as e:
        raise ConfigError(f"bad port in store URL {url!r}: {e}") from None
    params = dict(parse_qsl(u.query, keep_blank_values=True))
    return StoreURL(u.scheme.lower(), u.hostname, port, u.path.lstrip("/"), params, url)
