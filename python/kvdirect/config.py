"""One place for kvdirect's options: ``CacheConfig``.

Loaded from keyword arguments, a JSON string, a JSON file, or the
``KVDIRECT_CONFIG`` environment variable (a JSON string or a path to a JSON
file). Unknown keys are errors, so a typo never silently does nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kvdirect.errors import ConfigError

ENV_VAR = "KVDIRECT_CONFIG"


@dataclass
class CacheConfig:
    #: store URL (``shm://NAME?size=...``, ``mooncake://...``, ``memcache://...``). No default
    #: pool: ``""`` (unset) makes KVDirectCache refuse to start unless it is given a store;
    #: ``None`` says deliberately "device-only cache, no pool" (logged once, ``stats()["mode"]``)
    store: str | None = ""
    #: when the store is unreachable at start (never when its URL is malformed), run without a
    #: pool with a warning instead of failing
    allow_no_store: bool = True
    #: model identity in every page key (required by KVDirectCache). Instances share pool
    #: pages only when their identities are equal, so it must tell apart everything that
    #: changes the KV bytes besides the layout: the weights (name or path), their revision
    #: and their quantization. Engine integrations fill it with :func:`model_identity`.
    model: str | None = None
    #: write finished pages back to the pool asynchronously
    write_back: bool = True
    #: skip the store existence query when fewer uncached full pages than this remain
    min_query_pages: int = 1
    #: bound on keys sent in one existence query (pages beyond are treated as misses)
    max_query_pages: int = 2048
    #: bound on pages being written at once; see ``backpressure``
    max_inflight_pages: int = 8192
    #: what write_back does when the in-flight bound is reached: "wait" or "drop"
    backpressure: str = "wait"
    #: threads issuing puts
    writer_threads: int = 1
    #: after a store failure, skip the store for this long, doubling up to retry_max_s
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    #: pages the index remembers as pool-only (evicted from device, still in the pool)
    max_pool_only_pages: int = 1 << 20
    #: stage device pages through host memory: None = when the store cannot address device memory
    stage: bool | None = None
    #: bytes of each host staging buffer (bounds memory used when staging)
    staging_bytes: int = 64 << 20
    #: layer-by-layer loading with per-layer completion (see KVDirectCache.load_layerwise)
    layerwise: bool = False
    #: seconds between repeated log lines for the same error kind
    log_interval_s: float = 30.0
    #: latency samples kept for percentiles
    latency_window: int = 4096
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.store is not None and not isinstance(self.store, str):
            raise ConfigError(f"store must be a URL string (or null for a device-only cache), got {self.store!r}")
        if self.backpressure not in ("wait", "drop"):
            raise ConfigError(f"backpressure must be 'wait' or 'drop', got {self.backpressure!r}")
        for name in ("min_query_pages", "max_query_pages", "max_inflight_pages", "writer_threads",
                     "max_pool_only_pages", "latency_window", "staging_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "min_query_pages" else 1):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise ConfigError(f"model must be a non-empty identity string, got {self.model!r}")
        if self.retry_initial_s <= 0 or self.retry_max_s < self.retry_initial_s:
            raise ConfigError("need 0 < retry_initial_s <= retry_max_s")

    @classmethod
    def from_dict(cls, d: dict) -> "CacheConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown kvdirect config key(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text_or_path: str) -> "CacheConfig":
        s = text_or_path.strip()
        if not s.startswith("{"):
            p = Path(s)
            if not p.is_file():
                raise ConfigError(f"kvdirect config {s!r} is neither a JSON object nor a readable file")
            s = p.read_text()
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError(f"kvdirect config is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError("kvdirect config must be a JSON object")
        return cls.from_dict(d)

    @classmethod
    def from_env(cls, **overrides) -> "CacheConfig":
        """``KVDIRECT_CONFIG`` (JSON or path) with keyword overrides on top."""
        raw = os.environ.get(ENV_VAR)
        base = dataclasses.asdict(cls.from_json(raw)) if raw else {}
        base.update(overrides)
        return cls.from_dict(base)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_identity(model: str, *, revision: str | None = None, quantization: str | None = None,
                   config_file: str | os.PathLike | None = None, overrides=None) -> str:
    """A model identity string for ``CacheConfig.model`` from what an engine knows.

    ``model``: the served name, hub id or path; ``revision`` and ``quantization``
    as the engine was started with; ``config_file``: the model's ``config.json``
    where one exists (its SHA-256 enters the identity, so a changed architecture
    or a re-quantised checkpoint under the same name never shares pages);
    ``overrides``: changes the engine applies on top of that config (vLLM's
    ``hf_overrides``, SGLang's ``--json-model-override-args``), a dict or a JSON
    object string; a digest of them enters the identity (none or ``{}``: nothing).
    Weights replaced under the same name, revision and config are not detected:
    give such a deployment an explicit ``model`` (e.g. with a version).
    """
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"model identity needs a model name or path, got {model!r}")
    parts = [model.strip()]
    if revision:
        parts.append(f"rev={revision}")
    if quantization:
        parts.append(f"quant={quantization}")
    if config_file is not None and Path(config_file).is_file():
        parts.append("config=" + hashlib.sha256(Path(config_file).read_bytes()).hexdigest()[:16])
    digest = overrides_digest(overrides)
    if digest:
        parts.append(f"overrides={digest}")
    return "|".join(parts)


def overrides_digest(overrides) -> str | None:
    """16 hex chars of SHA-256 over the overrides as canonical JSON; None when there are none.
    ConfigError for what cannot be identified (a function, a value JSON cannot hold)."""
    if overrides is None:
        return None
    if isinstance(overrides, str):
        text = overrides.strip()
        if not text:
            return None
        try:
            overrides = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"model config overrides are not valid JSON ({e}): {text[:80]!r}") from None
    if callable(overrides) or not isinstance(overrides, dict):
        raise ConfigError(f"model config overrides must be a dict or a JSON object to enter the model identity, got "
                          f"{type(overrides).__name__}; set \"model\" in the kvdirect config to an identity that "
                          "names this override")
    if not overrides:
        return None
    try:
        canon = json.dumps(overrides, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model config overrides cannot enter the model identity ({e}); set \"model\" in the "
                          "kvdirect config to an identity that names them") from None
    return hashlib.sha256(canon.encode("ascii")).hexdigest()[:16]
