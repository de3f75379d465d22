"""kvdirect as a vLLM KV connector: ``kv_connector_module_path = "kvdirect.vllm"``,
``kv_connector = "KVDirectConnector"`` (see docs/vllm.md).

The connector class imports vLLM; it is loaded on first access, so the
scheduler/worker logic (:mod:`.scheduler`, :mod:`.worker`) imports without vLLM.
"""
from __future__ import annotations

__all__ = ["KVDirectConnector"]


def __getattr__(name: str):
    if name in ("KVDirectConnector", "KVDirectConnectorMetadata", "KVDirectWorkerMetadata", "KVDirectHandshake"):
        from kvdirect.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module 'kvdirect.vllm' has no attribute {name!r}")
