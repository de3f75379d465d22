"""L3 stores behind one interface, opened from a URL.

``open_store("shm://NAME?size=8GiB")`` (embedded shared-memory pool, default),
``open_store("mooncake://HOST:PORT?metadata=http://...&protocol=tcp&segment=4GiB")``,
``open_store("memcache://?config=/path/mmc-local.conf")``.

Test only: ``faulty+URL`` opens ``URL`` wrapped in the fault injector of
:mod:`kvdirect.stores._testing` (``FlakyStore``) with the options given as JSON in
the environment variable ``KVDIRECT_TEST_STORE_FAULTS``; without that variable
such a URL is refused, and the variable alone changes nothing. Real-engine tests
use it to inject store failures into servers they start.
"""
from __future__ import annotations

import importlib
import json
import os

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

FAULTY_PREFIX = "faulty+"
FAULTS_ENV = "KVDIRECT_TEST_STORE_FAULTS"


def open_store(url: str = DEFAULT_URL) -> Store:
    if isinstance(url, str) and url.startswith(FAULTY_PREFIX):
        return _open_faulty(url)
    u = parse_url(url)
    mod = SCHEMES.get(u.scheme)
    if mod is None:
        raise ConfigError(f"unknown store scheme {u.scheme!r} in {url!r}; known: {', '.join(sorted(SCHEMES))}")
    return importlib.import_module(mod).open_url(u)


def _open_faulty(url: str) -> Store:
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        raise ConfigError(f"{url!r}: {FAULTY_PREFIX}URL injects store failures and is for tests only; it needs "
                          f"their options as JSON in {FAULTS_ENV} (e.g. '{{\"fail_rate\": 0.2, \"fail_ops\": "
                          f"[\"get\"]}}'); use the URL without {FAULTY_PREFIX!r} to serve")
    try:
        opts = json.loads(spec)
        if not isinstance(opts, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ConfigError(f"{FAULTS_ENV} must be a JSON object of FlakyStore options: {e}") from None
    from kvdirect.stores._testing import FlakyStore

    inner = open_store(url[len(FAULTY_PREFIX):])
    try:
        return FlakyStore(inner, **opts)
    except (TypeError, ValueError) as e:
        inner.close()
        raise ConfigError(f"{FAULTS_ENV}: {e}") from None
