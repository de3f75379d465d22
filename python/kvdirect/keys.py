"""Page keys: how a page of tokens is named in the KV pool.

A page's hash is SGLang 0.5.23's storage hash (``get_storage_hash_str``): a
SHA-256 chain over pages, each token as 4-byte little-endian, the first page
seeded by the request namespace (``extra_key``, ``cache_salt``). The hashing
runs in C++ (SHA-NI when the CPU has it) straight from the caller's token
buffer.

Two surfaces:

* :func:`page_hashes` -- SGLang-compatible hex strings (parity, tools);
* :func:`page_digests` / :func:`namespace_seed` / :func:`hex_digests` /
  :func:`pool_keys` -- binary digests for the cache manager; hex is produced
  only when a caller asks for strings.

Both hash full pages only by default, as the cache stores full pages only
(``include_partial=True`` adds a trailing partial page, as SGLang does).

Pool object keys add a :class:`LayoutFingerprint` so that instances whose KV
layouts differ never read each other's pages:
``kvd1/<16 hex fingerprint>/<64 hex page hash>`` (86 bytes, under MemCache's
256-byte limit). The one public way to name a page as the cache does::

    fp = LayoutFingerprint.from_layout(layout, model=..., tp_rank=0, tp_size=1)
    fp.page_keys(tokens, namespace)        # == what KVDirectCache writes and reads
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import cached_property
from typing import Optional, Sequence, Union

import numpy as np

from kvdirect import _core
from kvdirect.errors import ConfigError

__all__ = [
    "page_hashes",
    "page_digests",
    "namespace_seed",
    "hex_digests",
    "pool_keys",
    "request_namespace",
    "LayoutFingerprint",
    "OBJECT_FORMATS",
    "sha256",
    "sha256_kernel",
    "DIGEST_BYTES",
    "KEY_VERSION",
]

DIGEST_BYTES = 32
KEY_VERSION = "kvd1"
MAX_KEY_BYTES = 255
#: page object formats (``KVLayout.object_format``): what ``layout_kind`` names. An engine's
#: own block format (``KVLayout.from_blocks``, opaque bytes, not MLA) is named
#: ``ENGINE/...``, e.g. ``vllm/CPU_ATTN/vec/auto/2x32x128``.
OBJECT_FORMATS = ("mha", "mla", "mla_split")

# The C++ functions are exported as they are (no Python frame on the hot
# path); their docstrings live in csrc/python/bind_keys.cpp.
page_hashes = _core.keys_page_hashes
page_digests = _core.keys_page_digests
namespace_seed = _core.keys_namespace_seed
hex_digests = _core.keys_hex_digests


def sha256(data) -> bytes:
    """SHA-256 with kvdirect's own implementation (for tests and tools)."""
    return _core.keys_sha256(data)


def sha256_kernel() -> str:
    """The SHA-256 kernel in use: ``"shani"`` or ``"portable"``."""
    return _core.keys_sha256_kernel()


# ---- pool object keys --------------------------------------------------------

def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        name = dtype
    else:  # torch.dtype, numpy dtype or type
        name = str(dtype)
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    name = name.removeprefix("torch.")
    if not name:
        raise ConfigError("LayoutFingerprint.dtype must be a non-empty dtype name")
    return name


@dataclasses.dataclass(frozen=True)
class LayoutFingerprint:
    """Everything that makes a page's bytes incompatible between instances.

    Two instances may share a pool page only when their fingerprints are equal.
    Build it from the engine's :class:`~kvdirect.KVLayout` with
    :meth:`from_layout` (what ``KVDirectCache`` does), so that hand-made keys
    equal the cache's. MLA pages hold the compressed latent, identical on every
    TP rank, so ``tp_size``/``tp_rank`` do not enter an MLA fingerprint; MHA
    pages hold a rank's slice of the KV heads, so both do. ``dtype`` is the
    logical KV dtype (``float8_e5m2``), not a storage dtype that hides it
    (engines keep every fp8 format as ``uint8``): ``KVLayout``'s ``dtype=``.
    """

    model: str
    dtype: str
    num_layers: int
    kv_heads: int
    head_dim: int
    v_head_dim: Optional[int] = None  # None: same as head_dim
    page_size: int = 64
    layout_kind: Optional[str] = None  # page object format, one of OBJECT_FORMATS; None: from is_mla
    tp_size: int = 1
    tp_rank: int = 0
    is_mla: bool = False

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("LayoutFingerprint.model must be a non-empty identity string "
                              "(e.g. the model path plus revision)")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if self.v_head_dim is None:
            object.__setattr__(self, "v_head_dim", self.head_dim)
        for name in ("num_layers", "kv_heads", "head_dim", "v_head_dim", "page_size", "tp_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"LayoutFingerprint.{name} must be a positive int, got {v!r}")
            object.__setattr__(self, name, int(v))
        if isinstance(self.tp_rank, bool) or not isinstance(self.tp_rank, (int, np.integer)) \
                or not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError(f"LayoutFingerprint.tp_rank must be in [0, tp_size={self.tp_size}), "
                              f"got {self.tp_rank!r}")
        object.__setattr__(self, "tp_rank", int(self.tp_rank))
        object.__setattr__(self, "is_mla", bool(self.is_mla))
        kind = self.layout_kind
        if kind is None:
            kind = "mla" if self.is_mla else "mha"
        engine_format = isinstance(kind, str) and "/" in kind and not self.is_mla
        if kind not in OBJECT_FORMATS and not engine_format:
            raise ConfigError(f"LayoutFingerprint.layout_kind must be the page object format, one of "
                              f"{', '.join(OBJECT_FORMATS)} or an engine's 'ENGINE/...' block format "
                              f"(KVLayout.object_format), got {kind!r}")
        if not engine_format and (kind != "mha") != self.is_mla:
            raise ConfigError(f"LayoutFingerprint: layout_kind={kind!r} with is_mla={self.is_mla}: "
                              "MLA formats are 'mla' and 'mla_split'")
        object.__setattr__(self, "layout_kind", kind)

    @classmethod
    def from_layout(cls, layout, *, model: str, tp_rank: int = 0, tp_size: int = 1) -> "LayoutFingerprint":
        """The fingerprint ``KVDirectCache`` uses for ``layout`` (a :class:`~kvdirect.KVLayout`).

        ``model``: the model identity (``CacheConfig.model``); ``tp_rank``/``tp_size``:
        this rank's tensor-parallel position (ignored for MLA, as above)."""
        fields = getattr(layout, "fingerprint_fields", None)
        if fields is None:
            raise ConfigError(f"from_layout needs a KVLayout, got {type(layout).__name__}")
        return cls(model=model, tp_rank=tp_rank, tp_size=tp_size, **fields())

    def canonical(self) -> bytes:
        """The exact bytes the digest is taken over (versioned, order-fixed JSON)."""
        fields = {
            "v": 1,
            "model": self.model,
            "dtype": self.dtype,
            "num_layers": self.num_layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "v_head_dim": self.v_head_dim,
            "page_size": self.page_size,
            "layout_kind": self.layout_kind,
            "is_mla": self.is_mla,
            # MLA pages are the same on every rank: leave TP out.
            "tp_size": None if self.is_mla else self.tp_size,
            "tp_rank": None if self.is_mla else self.tp_rank,
        }
        return json.dumps(fields, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True).encode("ascii")

    @cached_property
    def digest(self) -> str:
        """16 hex chars (64 bits) of SHA-256 over :meth:`canonical`."""
        return hashlib.sha256(self.canonical()).hexdigest()[:16]

    @cached_property
    def key_prefix(self) -> str:
        return f"{KEY_VERSION}/{self.digest}/"

    def page_keys(self, tokens, namespace: Optional[str] = None) -> list:
        """Pool keys of the full pages of ``tokens`` in ``namespace``, exactly as
        ``KVDirectCache`` writes and reads them (a trailing partial page has none)."""
        seed = namespace_seed(extra_key=request_namespace(namespace))
        return pool_keys(page_digests(tokens, self.page_size, namespace_seed=seed), self)


def request_namespace(namespace: Optional[str]) -> Optional[str]:
    """The namespace as keys see it: ``""`` and ``None`` are one (default) namespace,
    as in the index."""
    if namespace is not None and not isinstance(namespace, str):
        raise ConfigError(f"namespace must be a str or None, got {type(namespace).__name__}")
    return namespace or None


def pool_keys(digests: Union[np.ndarray, Sequence[str]], fingerprint: LayoutFingerprint) -> list:
    """Pool object keys ``kvd1/<fingerprint>/<page hash hex>``, one per page.

    ``digests``: a uint8 [n, 32] array (from :func:`page_digests`) or a list of
    64-char hex hashes (from :func:`page_hashes`). Formatting runs in C++.
    """
    if not isinstance(fingerprint, LayoutFingerprint):
        raise ConfigError(f"fingerprint must be a LayoutFingerprint, got {type(fingerprint).__name__}")
    return _core.keys_pool_keys(digests, fingerprint.key_prefix)
