"""BENCHMARK-ONLY: "SGLang Mooncake linker + dense-model patch".

SGLang 0.5.23's own direct linker (``--unified-cache-external-linker-backend mooncake``)
refuses every dense model: ``_PlainKvStrategy`` (hybrid_pool_assembler.py) has no
``build_direct_linker_pool_group`` ("The selected hybrid pool strategy does not support
the direct external linker"). This adds one, built from SGLang's own helpers the other
strategies use: one KV pool entry over the pool's K and V buffers, layer ``i`` -> ``i``
(``_mha_device_pool_entry``; MLA pools are not covered). Nothing else of SGLang changes.
"""
from after_import import install


def _patch(module) -> None:
    def build_direct_linker_pool_group(self, *, kvcache, params, page_size):
        from sglang.srt.mem_cache.hicache_storage import PoolName
        from sglang.srt.mem_cache.hybrid_cache.linker_pool_assembler import (DevicePoolGroup,
                                                                             _mha_device_pool_entry)

        layers = kvcache.layer_num
        return DevicePoolGroup([_mha_device_pool_entry(PoolName.KV, kvcache, {i: i for i in range(layers)},
                                                       page_size)], layers, page_size)

    module._PlainKvStrategy.build_direct_linker_pool_group = build_direct_linker_pool_group


install({"sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler": _patch})
