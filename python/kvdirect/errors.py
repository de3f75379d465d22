"""Exceptions raised at kvdirect's Python boundary.

Every error says what was wrong and what to do about it; C++ status codes are
translated here, never leaked as bare integers.
"""
from __future__ import annotations


class KVDirectError(Exception):
    """Base class of every error kvdirect raises on purpose."""


class ConfigError(KVDirectError, ValueError):
    """Bad configuration or bad input: the message says which and how to fix it."""


class StoreError(KVDirectError, RuntimeError):
    """A store could not be opened or used (unreachable service, missing driver)."""


class LayoutMismatchError(ConfigError):
    """A KV layout does not match the pool or the fingerprint it must match."""


class BackendUnavailableError(KVDirectError, RuntimeError):
    """An optional backend (CUDA, Ascend) was not built or its runtime is absent."""
