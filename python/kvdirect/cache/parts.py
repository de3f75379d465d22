"""The pieces of one cache that its paths share (built by KVDirectCache)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from kvdirect.cache.health import StoreHealth
from kvdirect.cache.indexing import NodeLocks, PageKeys
from kvdirect.cache.quarantine import Quarantine
from kvdirect.cache.stats import CacheStats
from kvdirect.cache.transfer import Transfer
from kvdirect.config import CacheConfig
from kvdirect.index import PrefixIndex


@dataclass
class CacheParts:
    config: CacheConfig
    layout: object
    page_size: int
    index: PrefixIndex
    keys: PageKeys
    locks: NodeLocks
    stats: CacheStats
    health: StoreHealth
    quarantine: Quarantine
    store: object            # Store | None
    transfer: Transfer | None  # None without a store
    free_slots: Callable[[np.ndarray], None]
    tp_reduce: Callable[[int], int] | None
    # this rank puts its pages; False on TP ranks other than 0 when every rank holds the same
    # page bytes under the same keys (MLA: one latent per token, not split across ranks)
    writes: bool = True

    def reduce(self, n: int) -> int:
        """TP ranks agree on a count: the smallest wins (identity without TP)."""
        return int(self.tp_reduce(int(n))) if self.tp_reduce else int(n)
