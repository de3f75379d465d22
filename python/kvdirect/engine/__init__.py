"""A small reference serving engine: a Hugging Face Qwen2 model with seeded
random weights, a paged device KV pool, and a request runner that drives a
prefix cache (``kvdirect.KVDirectCache``) the way a serving engine does.

Needs the ``demo`` extra (torch, transformers).
"""
from kvdirect.engine.kv_pool import OutOfSlots, PagedKVPool, SlotAllocator
from kvdirect.engine.model import ModelSpec, build_model, weights_digest
from kvdirect.engine.runner import DevicePrefixCache, Engine, RequestResult

__all__ = ["DevicePrefixCache", "Engine", "ModelSpec", "OutOfSlots", "PagedKVPool", "RequestResult",
           "SlotAllocator", "build_model", "weights_digest"]
