"""Build the kvdirect prefix cache from SGLang's ``TreeCacheBuildContext``.

Everything kvdirect needs comes from the context (allocator -> KV pool ->
layout; TP rank/size/group; model path) plus one ``CacheConfig`` read from
``KVDIRECT_CONFIG``. Configurations kvdirect cannot serve correctly are
refused here, at start-up, with the reason and what to do instead.
"""
from __future__ import annotations

import logging
from pathlib import Path

from kvdirect.config import CacheConfig
from kvdirect.config import model_identity as _model_identity
from kvdirect.errors import ConfigError

log = logging.getLogger("kvdirect.sglang")


def check_supported(ctx) -> None:
    """Raise ConfigError for model/server setups the kvdirect cache cannot serve."""
    params = ctx.params
    why = None
    if ctx.is_hybrid_swa:
        why = "hybrid sliding-window-attention (SWA) models"
    elif ctx.is_hybrid_ssm:
        why = "hybrid Mamba/SSM models"
    elif getattr(ctx, "is_dsa", False):
        why = "DSA (sparse-attention indexer) models"
    elif ctx.enable_hierarchical_cache:
        why = "--enable-hierarchical-cache together with kvdirect (kvdirect replaces HiCache's tiers)"
    elif getattr(params, "is_eagle", False):
        why = "EAGLE speculative decoding (bigram keys)"
    elif getattr(params, "mtp_draft_device_pools", ()) or getattr(params, "sidecar_draft_device_pools", ()):
        why = "speculative decoding with separate draft KV pools (draft KV would not be loaded)"
    elif getattr(params, "sliding_window_size", None):
        why = "models with a sliding window"
    elif getattr(params, "attn_cp_size", 1) > 1 or getattr(params, "pp_size", 1) > 1:
        why = "context or pipeline parallelism (attn_cp_size/pp_size > 1)"
    if why:
        raise ConfigError(f"--radix-cache-backend kvdirect does not support {why}; "
                          "drop --radix-cache-backend kvdirect for this deployment")


def model_identity(ctx, config: CacheConfig) -> str:
    """The model identity in kvdirect's page keys: ``config.model`` when set, else the
    served model name (or ``--model-path``), its revision, the weight quantization, a
    digest of its ``config.json`` and one of ``--json-model-override-args`` (see
    :func:`kvdirect.config.model_identity`)."""
    if config.model:
        return config.model
    sa = ctx.server_args
    mc = ctx.model_config
    name = (getattr(sa, "served_model_name", None) or getattr(sa, "model_path", None)
            or getattr(mc, "model_path", None))
    if not name:
        raise ConfigError("kvdirect cannot tell which model this server runs (no served_model_name or "
                          "model_path); set \"model\" in KVDIRECT_CONFIG")
    path = getattr(sa, "model_path", None) or getattr(mc, "model_path", None)
    cfg = Path(path) / "config.json" if path else None
    return _model_identity(str(name), revision=getattr(sa, "revision", None),
                           quantization=getattr(sa, "quantization", None) or getattr(mc, "quantization", None),
                           config_file=cfg, overrides=getattr(sa, "json_model_override_args", None))


def _tp_reduce(ctx):
    """All-reduce MIN across TP ranks (CPU group when SGLang has one)."""
    if ctx.tp_size <= 1:
        return None
    from kvdirect.cache import torch_dist_min

    group = getattr(ctx.params, "tp_cache_group", None)
    if group is None and ctx.tp_group is not None:
        group = getattr(ctx.tp_group, "cpu_group", None) or getattr(ctx.tp_group, "device_group", None)
    if group is None:
        raise ConfigError("kvdirect with tp_size > 1 needs SGLang's TP process group; none in the build context")
    return torch_dist_min(group)


def decode_node(ctx) -> bool:
    """A PD decode node (``--disaggregation-mode decode``, its radix cache enabled with
    ``--disaggregation-decode-enable-radix-cache``). SGLang promises a decode node's host
    hits to the prefill node and fills them only through HiCache's load-back, so kvdirect
    runs there offload only: device hits, write-back of prompt and generated pages, no
    pool hits (the prefill node loads those)."""
    return getattr(ctx.server_args, "disaggregation_mode", None) == "decode"


def forward_stream(ctx):
    """The model runner's forward stream. SGLang's overlap scheduler forwards on it while
    the cache is called on the scheduler's own stream: every transfer also follows the
    work queued there (SGLang's HiCache fences its loads and writes on the same stream)."""
    runner = getattr(getattr(ctx, "tp_worker", None), "model_runner", None)
    return getattr(runner, "forward_stream", None)


def build_cache(ctx, *, config: CacheConfig | None = None, store=None):
    """The ``register_radix_cache_backend`` factory: TreeCacheBuildContext -> cache."""
    from kvdirect.sglang.pools import layout_from_pool
    from kvdirect.sglang.radix_cache import KVDirectRadixCache

    check_supported(ctx)
    config = config or CacheConfig.from_env()
    config = CacheConfig.from_dict({**config.to_dict(), "model": model_identity(ctx, config)})
    params = ctx.params
    kvcache = params.token_to_kv_pool_allocator.get_kvcache()
    layout = layout_from_pool(kvcache, params.page_size)
    cache = KVDirectRadixCache(params, layout, config=config, store=store, tp_rank=ctx.tp_rank,
                               tp_size=ctx.tp_size, tp_reduce_min=_tp_reduce(ctx),
                               forward_stream=forward_stream(ctx), offload_only=decode_node(ctx))
    if config.layerwise:
        if ctx.tp_size > 1:
            raise ConfigError("kvdirect \"layerwise\": true is not supported with tensor parallelism yet "
                              "(ranks would have to agree on every layer); drop it or use --tp-size 1")
        cache.enable_layerwise(kvcache)
    log.info("kvdirect prefix cache: %r, store=%s, model=%s, tp=%d/%d, layerwise=%s%s", layout,
             cache.kv.store.scheme if cache.kv.store is not None else None, config.model,
             ctx.tp_rank, ctx.tp_size, config.layerwise,
             ", PD decode node: offload only (writes pages back, reports no pool hits)"
             if cache.offload_only else "")
    return cache
