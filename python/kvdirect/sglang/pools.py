"""KV layouts of SGLang's device KV pools, read off the real pool objects.

SGLang keeps its KV in a ``KVCache`` subclass reachable as
``token_to_kv_pool_allocator.get_kvcache()``. kvdirect needs only the
buffers' addresses, strides and dtype (a :class:`kvdirect.KVLayout`), never a
copy. The pool classes are matched by exact class name, so that a subclass
with another memory layout (FP4, page-major, DSA, HND, ...) is refused with a
clear message instead of being read with the wrong geometry.

Supported (SGLang 0.5.23):

========================  =====================================================
``MHATokenToKVPool``      per layer K ``[size + page_size, heads, head_dim]``
                          and V ``[..., v_head_dim]`` -> ``KVLayout.from_mha``
``MLATokenToKVPool``      per layer ``[size + page_size, 1, lora + rope]``
                          -> ``KVLayout.from_mla``
``NPUMHATokenToKVPool``   all-layer K/V ``[layers, pages + 1, page_size, heads,
                          dim]`` -> ``KVLayout.from_ascend``
``NPUMLATokenToKVPool``   split MLA K (nope) / V (rope) ``[layers, pages + pad,
                          page_size, 1, dim]`` -> ``KVLayout.from_ascend(is_mla=True)``
========================  =====================================================

The layout's dtype is the pool's **logical** KV dtype (``kvcache.dtype``), not the
storage dtype of its buffers: SGLang stores every fp8 format (e4m3fn, e5m2,
e4m3fnuz) as ``uint8`` (``store_dtype``), and servers with different fp8 formats
must not read each other's pages (the dtype enters the layout fingerprint).
Quantized KV caches that keep scales in separate buffers (SGLang's FP4 recipes:
``k_scale_buffer`` / ``v_scale_buffer`` / ``kv_scale_buffer``) are refused: a page
moved without its scales would be wrong KV.
"""
from __future__ import annotations

from kvdirect.errors import ConfigError

MHA_POOLS = ("MHATokenToKVPool",)
MLA_POOLS = ("MLATokenToKVPool",)
NPU_MHA_POOLS = ("NPUMHATokenToKVPool",)
NPU_MLA_POOLS = ("NPUMLATokenToKVPool",)
SUPPORTED_POOLS = MHA_POOLS + MLA_POOLS + NPU_MHA_POOLS + NPU_MLA_POOLS


def _per_layer(buf, what: str) -> list:
    """A list of per-layer tensors from a list/tuple or one tensor with a leading layer dim."""
    if buf is None:
        raise ConfigError(f"the SGLang KV pool has no {what} (was it created with a memory saver "
                          "or sparsity offload that leaves buffers unallocated?)")
    if isinstance(buf, (list, tuple)):
        return list(buf)
    return [buf[i] for i in range(buf.shape[0])]


SCALE_BUFFERS = ("k_scale_buffer", "v_scale_buffer", "native_k_scale_buffer", "native_v_scale_buffer",
                 "kv_scale_buffer")


def kv_dtype(kvcache) -> str | None:
    """The pool's logical KV dtype name (``float8_e5m2`` for an fp8 pool stored as uint8); None when
    the pool does not say (then the buffers' dtype is used)."""
    dt = getattr(kvcache, "dtype", None)
    return None if dt is None else str(dt).removeprefix("torch.")


def _refuse_separate_scales(kvcache, name: str) -> None:
    scales = [a for a in SCALE_BUFFERS if getattr(kvcache, a, None) is not None]
    dtype = kv_dtype(kvcache) or ""
    if scales or "float4" in dtype:
        recipe = getattr(getattr(kvcache, "quant_method", None), "name", None) or dtype
        raise ConfigError(
            f"kvdirect does not move the separate scale buffers of SGLang's quantized KV cache ({name}, "
            f"{recipe}{': ' + ', '.join(scales) if scales else ''}): pages without their scales would be wrong "
            "KV; use --kv-cache-dtype auto, fp8_e4m3 or fp8_e5m2, or drop --radix-cache-backend kvdirect")


def layout_from_pool(kvcache, page_size: int):
    """The :class:`kvdirect.KVLayout` of an SGLang KV pool object."""
    from kvdirect.layout import KVLayout

    name = type(kvcache).__name__
    if name in SUPPORTED_POOLS:
        _refuse_separate_scales(kvcache, name)
    dtype = kv_dtype(kvcache)
    if name in MHA_POOLS:
        if getattr(kvcache, "use_hnd", False):
            raise ConfigError("kvdirect does not support SGLANG_USE_HND_KVCACHE (HND layout); unset it")
        return KVLayout.from_mha(_per_layer(kvcache.k_buffer, "k_buffer"),
                                 _per_layer(kvcache.v_buffer, "v_buffer"), page_size=page_size, dtype=dtype)
    if name in MLA_POOLS:
        return KVLayout.from_mla(_per_layer(kvcache.kv_buffer, "kv_buffer"), page_size=page_size, dtype=dtype)
    if name in NPU_MHA_POOLS:
        # FIA mode rebinds k_buffer to per-layer [P*ps, 1, H, D] views; the contiguous
        # all-layer [layers, pages + 1, page_size, H, D] tensors stay available for IO.
        if hasattr(kvcache, "get_hicache_transfer_buffers"):
            k, v = kvcache.get_hicache_transfer_buffers()
        else:
            k, v = kvcache.k_buffer, kvcache.v_buffer
        return KVLayout.from_ascend(_per_layer(k, "k_buffer"), _per_layer(v, "v_buffer"),
                                    page_size=page_size, dtype=dtype)
    if name in NPU_MLA_POOLS:
        if getattr(kvcache, "dsa_kv_cache_store_fp8", False):
            raise ConfigError("kvdirect does not support the NPU DSA fp8 KV store")
        return KVLayout.from_ascend(_per_layer(kvcache.k_buffer, "k_buffer (nope)"),
                                    _per_layer(kvcache.v_buffer, "v_buffer (rope)"),
                                    page_size=page_size, is_mla=True, dtype=dtype)
    raise ConfigError(
        f"kvdirect cannot read the KV layout of SGLang's {name}; supported pools: "
        f"{', '.join(SUPPORTED_POOLS)}. Run without --radix-cache-backend kvdirect for this model.")
