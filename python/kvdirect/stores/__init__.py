"""L3 stores behind one interface, opened from a URL.

``open_store("shm://NAME?size=8GiB")`` (embedded shared-memory pool, default),
``open_store("mooncake://HOST:PORT?metadata=http://...&protocol=tcp&segment=4GiB")``,
``open_store("memcache://?config=/path/mmc-local.conf")``.
"""
from __future__ import annotations

import importlib

from kvdirect.errors import ConfigError
from kvdirect.stores.base import ScatterList, Store, check_keys  # noqa: F401
from kvdirect.stores.url import parse_size, parse_url  # noqa: F401

# scheme -> module defining open_url(StoreURL) -> Store
SCHEMES = {
    "shm": "kvdirect.stores.shm",
    "mooncake": "kvdirect.stores.mooncake",
    "memcache": "kvdirect.stores.memcache",
}

DEFAULT_URL = "shm://kvdirect?size=1GiB"


def open_store(url: str = DEFAULT_URL) -> Store:
    u = parse_url(url)
    mod = SCHEMES.get(u.scheme)
    if mod is None:
        raise ConfigError(f"unknown store scheme {u.scheme!r} in {url!r}; known: {', '.join(sorted(SCHEMES))}")
    return importlib.import_module(mod).open_url(u)
