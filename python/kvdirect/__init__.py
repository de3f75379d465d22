"""kvdirect: move KV-cache pages directly between device memory and a KV pool.

Public names are imported lazily so that ``import kvdirect`` stays cheap and
a component missing from a partial build fails with a clear message only
when it is used.
"""
from __future__ import annotations

import importlib

from kvdirect._version import __version__

# public name -> module that defines it
_EXPORTS = {
    "build_info": "kvdirect._core",
    "KVDirectError": "kvdirect.errors",
    "ConfigError": "kvdirect.errors",
    "LayoutMismatchError": "kvdirect.errors",
    "StoreError": "kvdirect.errors",
    "PrefixIndex": "kvdirect.index",
    "MatchResult": "kvdirect.index",
    "page_hashes": "kvdirect.keys",
    "page_digests": "kvdirect.keys",
    "pool_keys": "kvdirect.keys",
    "LayoutFingerprint": "kvdirect.keys",
    "KVLayout": "kvdirect.layout",
    "CopyEngine": "kvdirect.copy",
    "open_store": "kvdirect.stores",
    "Store": "kvdirect.stores",
    "CacheConfig": "kvdirect.config",
    "model_identity": "kvdirect.config",
    "KVDirectCache": "kvdirect.cache",
    "CacheMatch": "kvdirect.cache",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'kvdirect' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
