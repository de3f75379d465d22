"""What the vLLM connector reads from vLLM's configuration, and what it refuses.

Everything comes from ``VllmConfig`` (duck-typed: no vLLM import here) plus the
``kv_connector_extra_config`` dict, whose keys are :class:`kvdirect.config.CacheConfig`
fields. A configuration the connector cannot serve correctly is refused at
engine start with one line saying why and what to do instead.
"""
from __future__ import annotations

import logging
from pathlib import Path

from kvdirect.config import CacheConfig
from kvdirect.config import model_identity as _model_identity
from kvdirect.errors import ConfigError, KVDirectError
from kvdirect.stores import open_store

log = logging.getLogger("kvdirect.vllm")

PREFIX = "kvdirect vLLM connector: "


def cache_config(vllm_config) -> CacheConfig:
    """``CacheConfig`` from ``kv_connector_extra_config``; ``model`` filled from vLLM's
    model config when absent. Unknown keys raise ConfigError."""
    ktc = vllm_config.kv_transfer_config
    extra = dict(getattr(ktc, "kv_connector_extra_config", None) or {})
    if "allow_no_store" not in extra:
        extra["allow_no_store"] = False  # a connector configured without its pool is a mistake
    try:
        cfg = CacheConfig.from_dict(extra)
    except ConfigError as e:
        raise ConfigError(PREFIX + f"kv_connector_extra_config: {e}") from None
    except TypeError as e:  # a value of the wrong type for a field
        raise ConfigError(PREFIX + f"kv_connector_extra_config: {e}") from None
    if not cfg.model:
        cfg = CacheConfig.from_dict({**cfg.to_dict(), "model": model_identity(vllm_config)})
    return cfg


def model_identity(vllm_config) -> str:
    """Served model name (else the model path or hub id), revision, quantization, a
    digest of ``config.json`` (local folder, or the hub cache without any download) and
    one of ``hf_overrides`` (a function there cannot be identified: refused, set
    ``"model"`` in ``kv_connector_extra_config``)."""
    mc = vllm_config.model_config
    name = getattr(mc, "served_model_name", None) or getattr(mc, "model", None)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    if not name:
        raise ConfigError(PREFIX + "cannot tell which model this engine runs; "
                                   "set \"model\" in kv_connector_extra_config")
    path = getattr(mc, "model", None)
    revision = getattr(mc, "revision", None)
    cfg_file = None
    if path and (Path(path) / "config.json").is_file():
        cfg_file = Path(path) / "config.json"
    elif path:
        try:  # hub models: the cached config.json, never a download
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(path, "config.json", revision=revision)
            cfg_file = hit if isinstance(hit, str) else None
        except Exception:  # noqa: BLE001 - no hub client or no cache: identity without the digest
            cfg_file = None
    try:
        return _model_identity(str(name), revision=revision, quantization=getattr(mc, "quantization", None),
                               config_file=cfg_file, overrides=getattr(mc, "hf_overrides", None) or None)
    except ConfigError as e:
        raise ConfigError(PREFIX + f"hf_overrides: {e}") from None


#: vLLM cache_dtype -> the logical KV dtype where the storage dtype hides it (fp8 KV is kept as uint8)
FP8_CACHE_DTYPES = {"fp8_e5m2": "float8_e5m2", "fp8_inc": "float8_e4m3fn"}


def kv_dtype(vllm_config) -> str | None:
    """The logical KV dtype of ``cache_config.cache_dtype`` for the layout fingerprint: the fp8
    format (vLLM stores e4m3, e4m3fnuz and e5m2 alike as uint8; ``fp8``/``fp8_e4m3`` is the
    platform's e4m3 variant, fnuz on some ROCm GPUs). None where the storage dtype already
    says it (``auto``: the model dtype; the cache_dtype name is in the object format too)."""
    cd = str(getattr(vllm_config.cache_config, "cache_dtype", "auto") or "auto")
    if cd in FP8_CACHE_DTYPES:
        return FP8_CACHE_DTYPES[cd]
    if cd in ("fp8", "fp8_e4m3"):
        try:
            from vllm.platforms import current_platform

            return str(current_platform.fp8_dtype()).removeprefix("torch.")
        except ImportError:  # outside vLLM (tests of this module): vLLM's default
            return "float8_e4m3fn"
    return None


def blocks_layout(vllm_config, spec, tensors, *, num_blocks: int, block_size: int, object_format: str,
                  block_dim: int):
    """The KVLayout of vLLM's per-layer KV tensors (what the worker moves), with the logical KV dtype."""
    from kvdirect.layout import KVLayout

    return KVLayout.from_blocks(tensors, num_blocks=num_blocks, page_size=block_size, object_format=object_format,
                                kv_heads=int(spec.num_kv_heads), head_dim=int(spec.head_size),
                                v_head_dim=int(getattr(spec, "head_size_v", spec.head_size)),
                                dtype=kv_dtype(vllm_config), block_dim=block_dim)


#: vLLM MLA backends whose KV cache is the token-major latent: per layer ``[num_blocks, (1,) block_size,
#: kv_lora_rank + rope_dim]``, token ``t`` of block ``b`` at row ``b * block_size + t`` (the latent, then
#: the rotated rope part). CPU_MLA writes ``kv_cache.view(-1, dim)[slot]`` (do_kv_cache_update); AMX_MLA
#: decodes from ``kv_cache.view(-1, 1, dim)``. Such a block is kvdirect's "mla" page object byte for byte.
MLA_TOKEN_MAJOR_BACKENDS = ("CPU_MLA", "AMX_MLA")


def is_mla(spec) -> bool:
    """Whether a KV cache group's spec is vLLM's (dense) MLA spec."""
    return type(spec).__name__ == "MLAAttentionSpec"


def mla_layout(vllm_config, spec, tensors, *, backend: str, num_blocks: int, block_size: int):
    """The KVLayout of vLLM's MLA KV tensors: kvdirect's "mla" object format (one latent segment per
    layer, keys without the TP rank). Only backends known to keep the latent token-major."""
    from kvdirect.layout import KVLayout

    if backend not in MLA_TOKEN_MAJOR_BACKENDS:
        raise ConfigError(PREFIX + f"does not support MLA KV caches of the {backend} attention backend (known "
                                   f"token-major: {', '.join(MLA_TOKEN_MAJOR_BACKENDS)}); drop --kv-transfer-config "
                                   "for this deployment")
    want = (int(num_blocks), int(block_size), int(spec.head_size))
    blocks = []
    for t in tensors:
        shape = tuple(int(n) for n in t.shape)
        if len(shape) == 4 and shape[1] == 1:  # vLLM 0.32 allocates [num_blocks, 1 (head), block_size, dim]
            t, shape = t.squeeze(1), shape[:1] + shape[2:]
        if shape != want:
            raise ConfigError(PREFIX + f"MLA KV tensor of shape {tuple(t.shape)}, expected [num_blocks, (1,) "
                                       f"block_size, kv_lora_rank + rope_dim] = {list(want)}")
        blocks.append(t)
    return KVLayout.from_mla(blocks, int(block_size), dtype=kv_dtype(vllm_config))


def check_supported(vllm_config, kv_cache_config) -> None:
    """Refuse engine setups whose KV the connector would not move correctly."""
    why = None
    pc = vllm_config.parallel_config
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    spec = groups[0].kv_cache_spec if len(groups) == 1 else None
    kind = type(spec).__name__
    if getattr(pc, "pipeline_parallel_size", 1) > 1:
        why = "pipeline parallelism (pipeline_parallel_size > 1)"
    elif getattr(pc, "decode_context_parallel_size", 1) > 1 or \
            getattr(pc, "prefill_context_parallel_size", 1) > 1:
        why = "context parallelism"
    elif getattr(vllm_config, "speculative_config", None) is not None:
        why = "speculative decoding (draft KV would not be loaded)"
    elif len(groups) != 1:
        why = f"models with {len(groups)} KV cache groups (hybrid / sliding-window / Mamba / sparse-MLA models)"
    elif kind not in ("FullAttentionSpec", "MLAAttentionSpec"):
        why = f"{kind} KV caches (only full attention: MHA/GQA, and MLA)"
    elif getattr(spec, "sliding_window", None) or getattr(spec, "attention_chunk_size", None):
        why = "sliding-window or chunked-local attention"
    elif str(getattr(spec, "kv_quant_mode", "NONE")).split(".")[-1] not in ("NONE", "0"):
        why = f"quantized KV modes with side scales ({spec.kv_quant_mode})"
    elif getattr(vllm_config.model_config, "is_encoder_decoder", False):
        why = "encoder-decoder models"
    elif kind == "MLAAttentionSpec":
        why = _mla_unsupported(vllm_config, spec)
    if why:
        raise ConfigError(PREFIX + f"does not support {why}; drop --kv-transfer-config for this deployment")


def _mla_unsupported(vllm_config, spec) -> str | None:
    """What about an MLA spec the "mla" page format does not cover (None: a dense latent cache)."""
    cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto") or "auto")
    role = str(getattr(spec, "cache_role", "") or "").split(".")[-1].upper()
    if getattr(spec, "model_version", None) is not None:
        return f"MLA caches of {spec.model_version} models (compressed sparse attention)"
    if role == "INDEXER" or getattr(spec, "is_index_group_leader", False):
        return "sparse MLA with an indexer cache (DeepSeek-V3.2-style DSA)"
    if cache_dtype != "auto" or getattr(spec, "cache_dtype_str", None) not in (None, "auto") \
            or getattr(spec, "state_content_bytes", None) is not None:
        return f"quantized MLA KV caches (kv_cache_dtype={cache_dtype}; only unquantized latents)"
    if getattr(spec, "tokens_per_state", 1) != 1:
        return f"MLA caches holding {spec.tokens_per_state} tokens per state"
    return None


def open_pool(cfg: CacheConfig):
    """The configured store, or None when it cannot be opened and ``allow_no_store`` is set.
    A malformed URL is always an error."""
    if not cfg.store:
        raise ConfigError(PREFIX + "\"store\" is empty: give a pool URL (shm://NAME?size=..., "
                                   "mooncake://..., memcache://...)")
    try:
        return open_store(cfg.store)
    except ConfigError as e:
        raise ConfigError(PREFIX + f"bad store URL {cfg.store!r}: {e}") from None
    except KVDirectError as e:
        if not cfg.allow_no_store:
            raise KVDirectError(PREFIX + f"cannot open the store {cfg.store!r}: {e} "
                                         "(set \"allow_no_store\": true to serve without it)") from None
        log.warning("%sserving without the pool: cannot open %r: %s", PREFIX, cfg.store, e)
        return None
