"""The match: one index match plus at most one batched existence query to the pool."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvdirect.cache.health import STORE_FAILURES
from kvdirect.cache.indexing import NodeHandle
from kvdirect.cache.inputs import as_tokens
from kvdirect.cache.parts import CacheParts


@dataclass
class CacheMatch:
    """Result of ``KVDirectCache.match``; pass it to ``load``."""

    tokens: np.ndarray       # the tokens the match covers (without the last one with exclude_last)
    namespace: str | None
    device_len: int          # tokens resident on device, from the start
    device_slots: np.ndarray  # int64 slots of those tokens
    pool_len: int            # further tokens available in the pool
    node: NodeHandle         # index handle (an int) for lock/unlock; counts the locks taken through it
    loaded_len: int = 0      # tokens load() brought in
    _digests: np.ndarray | None = None  # page digests [pages from 0 .. device+pool), uint8 x 32
    _index_pool_pages: int = 0          # pool pages the index knew without asking the store


def _exists_prefix(p: CacheParts, digests: np.ndarray) -> int:
    """How many leading pages the pool holds; a store failure is a miss, never a crash."""
    keys = p.keys.pool_keys(digests)
    p.stats.add(query_keys=len(keys))
    try:
        found = int(p.store.exists_prefix(keys))
        p.health.recovered()
        return found
    except STORE_FAILURES as e:
        p.health.failed("exists", e)
        return 0


def match(p: CacheParts, tokens, namespace: str | None, exclude_last: bool = False,
          pool: bool = True) -> CacheMatch:
    t = as_tokens(tokens)
    n_all = len(t)
    if exclude_last and n_all:
        t = t[:-1]  # the engine computes at least the last token (it needs its logits)
    P = p.page_size
    r = p.index.match(t, namespace)
    dev_pages, idx_pool_pages = r.device_len // P, r.pool_len // P
    known = dev_pages + idx_pool_pages
    full = len(t) // P
    if not (pool and p.health.available()):
        idx_pool_pages = 0  # device only, or the pool is unreachable: its pages are misses for now
    query = pool and p.health.available() and full - known >= max(p.config.min_query_pages, 1)
    upto = min(full, known + p.config.max_query_pages) if query else known
    digests = None
    found = 0
    if upto > dev_pages:
        if query and getattr(p.store, "local_lookup", False):
            # a local pool answers one key at once: ask for the first unknown page before
            # hashing the others, so a miss costs one page hash and one lookup
            digests = p.keys.digests(t, namespace, r.node, known, known + 1)
            if _exists_prefix(p, digests[known:]) == 0:
                query = False
        if query or digests is None:
            digests = p.keys.digests(t, namespace, r.node, known, upto)
        if query:
            found = _exists_prefix(p, digests[known:upto])
    pool_pages = idx_pool_pages + found
    if p.tp_reduce is not None:
        # TP ranks must agree on the prefix they reuse: the shortest one wins
        agreed = p.reduce(dev_pages + pool_pages)
        pool_pages = max(0, min(pool_pages, agreed - dev_pages))
    p.stats.add(match_calls=1, device_hit_tokens=r.device_len, pool_hit_tokens=pool_pages * P,
                miss_tokens=n_all - r.device_len - pool_pages * P)
    return CacheMatch(t, namespace, r.device_len, r.device_slots, pool_pages * P, NodeHandle(r.node),
                      _digests=digests, _index_pool_pages=idx_pool_pages)
