"""BENCHMARK-ONLY: SGLang HiCache + CPU transfer patch (never part of kvdirect's plugin).

What this is: a patch that makes SGLang 0.5.23's own hierarchical cache
(``--enable-hierarchical-cache``: device -> host DRAM -> L3 storage) run on a
CPU-only machine, so that ``kvdirect demo --engine sglang`` can measure it side
by side with kvdirect. SGLang's control path (radix tree, cache controller,
prefetch, write-through, L3 backends) is SGLang's own; only the byte copies that
SGLang does with CUDA kernels are replaced, and only when this folder is on
``PYTHONPATH`` of the SGLang server (Python imports ``sitecustomize`` at start).
Label results measured with it "SGLang HiCache + CPU transfer patch".

Why each change (SGLang 0.5.23, files under ``sglang/srt/mem_cache/pool_host``):
- ``base.py`` keeps a fixed 10 GiB host-RAM reserve when sizing host pools;
  start-up fails on a 24 GiB machine running several servers: lowered to 1 GiB.
- host pools default to CUDA-registered (pinned) memory and there is no CPU
  allocator, so start-up calls ``torch.cuda.cudart()``: plain host memory instead
  (``common.py`` ``ALLOC_MEMORY_FUNCS['cpu']``, ``pin_memory=False``).
- the device<->host copy ops are imported only for CUDA/HIP/XPU (``mha.py``):
  torch index-copy versions of the three ops of ``--hicache-io-backend direct``
  (``transfer_kv_direct``, ``transfer_kv_per_layer_direct_pf_lf``,
  ``transfer_kv_all_layer_direct_lf_pf``) are installed in their place.
Use it with ``--hicache-io-backend direct`` (layout ``page_first_direct``).
"""
import importlib.abc
import importlib.util
import sys

HOST_RESERVE_BYTES = 1 << 30


def _cpu_alloc(dims, dtype, device, pin_memory=False, allocator=None, **_):
    import torch

    return torch.empty(dims, dtype=dtype, device=device)


def transfer_kv_direct(src_layers, dst_layers, src_indices, dst_indices, page_size=None, **_):
    """dst_layers[i][dst_indices] = src_layers[i][src_indices] (token rows)."""
    src_i, dst_i = src_indices.long(), dst_indices.long()
    for src, dst in zip(src_layers, dst_layers):
        dst.index_copy_(0, dst_i.to(dst.device), src.index_select(0, src_i.to(src.device)).to(dst.device))


def _page_first(buf, indices, page_size):
    idx = indices.long().to(buf.device)
    return idx // page_size, idx % page_size


def transfer_kv_per_layer_direct_pf_lf(src_ptrs, dst_ptrs, src_indices, dst_indices, layer_id, page_size, **_):
    """Host page_first_direct [pages, layers, page_size, H, D] -> device layer rows, one layer."""
    for src, dst in zip(src_ptrs, dst_ptrs):
        page, off = _page_first(src, src_indices, page_size)
        rows = src[page, layer_id, off]
        dst.index_copy_(0, dst_indices.long().to(dst.device), rows.reshape(len(page), *dst.shape[1:]).to(dst.device))


def transfer_kv_all_layer_direct_lf_pf(src_ptrs, dst_ptrs, src_indices, dst_indices, page_size, **_):
    """Device layer rows (all K layers, then all V layers) -> host page_first_direct."""
    layers = len(src_ptrs) // len(dst_ptrs)
    src_i = src_indices.long()
    for c, dst in enumerate(dst_ptrs):
        page, off = _page_first(dst, dst_indices, page_size)
        for layer in range(layers):
            src = src_ptrs[c * layers + layer]
            rows = src.index_select(0, src_i.to(src.device)).to(dst.device)
            dst[page, layer, off] = rows.reshape(len(page), *dst.shape[3:])


def _patch(name: str, module) -> None:
    if name.endswith("pool_host.base"):
        module.HICACHE_HOST_MEMORY_RESERVE_BYTES = HOST_RESERVE_BYTES
    elif name.endswith("pool_host.common"):
        module.ALLOC_MEMORY_FUNCS["cpu"] = _cpu_alloc
    elif name.endswith("pool_host.mha"):
        module.transfer_kv_direct = transfer_kv_direct
        module.transfer_kv_per_layer_direct_pf_lf = transfer_kv_per_layer_direct_pf_lf
        module.transfer_kv_all_layer_direct_lf_pf = transfer_kv_all_layer_direct_lf_pf
        init = module.MHATokenToKVPoolHost.__init__

        def __init__(self, *args, **kwargs):
            kwargs["pin_memory"] = False
            init(self, *args, **kwargs)

        module.MHATokenToKVPoolHost.__init__ = __init__


TARGETS = {f"sglang.srt.mem_cache.pool_host.{m}" for m in ("base", "common", "mha")}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``_patch`` right after one of TARGETS has been executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(fullname, module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _PatchAfterImport())
