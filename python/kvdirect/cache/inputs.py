"""Engine inputs at the cache boundary: token ids and device slots as numpy arrays."""
from __future__ import annotations

import numpy as np

from kvdirect.errors import ConfigError


def as_tokens(tokens) -> np.ndarray:
    """Token ids as a 1-D int32/int64 numpy array, zero-copy when possible."""
    if hasattr(tokens, "detach") and hasattr(tokens, "numpy"):  # torch tensor on CPU
        tokens = tokens.detach().cpu().numpy()
    a = np.asarray(tokens)
    if a.dtype not in (np.int32, np.int64):
        if a.size == 0:
            return a.astype(np.int32)
        if not np.issubdtype(a.dtype, np.integer):
            raise ConfigError(f"token ids must be integers, got dtype {a.dtype}")
        a = a.astype(np.int64)
    if a.ndim != 1:
        raise ConfigError(f"token ids must be 1-D, got shape {a.shape}")
    return a


def as_slots(slots) -> np.ndarray:
    """Device slots as a contiguous 1-D int64 numpy array."""
    if hasattr(slots, "detach") and hasattr(slots, "numpy"):
        slots = slots.detach().cpu().numpy()
    a = np.asarray(slots)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ConfigError(f"slots must be integers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.int64)
    if a.ndim != 1:
        raise ConfigError(f"slots must be 1-D, got shape {a.shape}")
    return a
