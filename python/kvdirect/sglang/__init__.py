"""SGLang plugin: ``--radix-cache-backend kvdirect`` without patching SGLang.

SGLang (0.5.23) runs every ``sglang.srt.plugins`` entry point at start-up in
each of its processes; :func:`register` makes the name ``kvdirect`` known to
``sglang.srt.mem_cache.registry``. The scheduler then builds the prefix cache
with :func:`kvdirect.sglang.factory.build_cache`. Options: ``KVDIRECT_CONFIG``
(see docs/sglang.md).

Importing this package does not import SGLang or torch; :func:`register` does.
"""
from __future__ import annotations

BACKEND_NAME = "kvdirect"


def _factory(ctx):
    from kvdirect.sglang.factory import build_cache

    return build_cache(ctx)


def register() -> bool:
    """Register the ``kvdirect`` radix-cache backend with SGLang. Idempotent: SGLang
    loads plugins once per process, but a second call must not fail either.
    Returns True when this call registered it."""
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    if get_radix_cache_factory(BACKEND_NAME) is not None:
        return False
    register_radix_cache_backend(BACKEND_NAME, _factory)
    return True


__all__ = ["BACKEND_NAME", "register"]
