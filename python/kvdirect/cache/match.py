"""The match: one index match plus at most one batched existence query to the pool.

A match may instead *hold* the pages it finds (``hold=True``, stores with
``hold_at_match``): the read session a layer-wise load reads through is opened in
place of the existence query (the same one round trip, and it answers which pages
exist). The load then reads through it (``take_held``), so a hit costs one round
trip to the pool's master instead of two. Whoever matched with ``hold`` must hand the
match to a load or ``release_held`` it: the session pins pages until it ends.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvdirect.cache.health import STORE_FAILURES
from kvdirect.cache.indexing import NodeHandle
from kvdirect.cache.inputs import as_tokens
from kvdirect.cache.parts import CacheParts
from kvdirect.cache.transfer import first_failure
from kvdirect.errors import StoreError
from kvdirect.stores.base import NOT_FOUND, status_name


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
    _held: object | None = None         # read session over the queried pages (match with hold=True)


def _exists_prefix(p: CacheParts, digests: np.ndarray) -> int:
    """How many leading pages the pool holds; a store failure is a miss, never a crash."""
    keys = p.keys.pool_keys(digests)
    p.stats.add(query_keys=len(keys))
    return _exists_keys(p, keys)


def _exists_keys(p: CacheParts, keys: list) -> int:
    try:
        found = int(p.store.exists_prefix(keys))
        p.health.recovered()
        return found
    except STORE_FAILURES as e:
        p.health.failed("exists", e)
        return 0


def _held_prefix(p: CacheParts, digests: np.ndarray):
    """Open the read session over these pages: (leading pages the pool holds, the session
    holding them, or None when it holds none). A store failure is a miss, never a crash."""
    keys = p.keys.pool_keys(digests)
    p.stats.add(query_keys=len(keys))
    try:
        session = p.transfer.open_layerwise(keys)
    except STORE_FAILURES as e:
        p.health.failed("exists", e)
        return 0, None
    if session is None:  # this transfer reads these pages whole: no session to hold
        return _exists_keys(p, keys), None
    st = session.status
    found = first_failure(st)
    if found == 0 and st[0] != NOT_FOUND:
        # no answer for the first page (master gone, deadline): a failure, as exists() raises
        end_held(session)
        p.health.failed("exists", StoreError(f"read session over {len(keys)} pages: {status_name(st[0])}"))
        return 0, None
    p.health.recovered()
    if found == 0:
        end_held(session)
        return 0, None
    return found, session


def end_held(session) -> None:
    """End a held read session nobody will read (counts no reads). Ending is local to the
    client (no round trip), so it is done at once, before the caller opens other sessions."""
    session.narrow(0)
    session.end()


def release_held(m: CacheMatch) -> None:
    """End the read session a match with ``hold=True`` opened, if no load took it."""
    session, m._held = m._held, None
    if session is not None:
        end_held(session)


def take_held(m: CacheMatch, keys: list):
    """The match's held session narrowed to the load's ``keys`` (the first pages it
    opened), or None (then the load opens its own); the match no longer holds it."""
    session, m._held = m._held, None
    if session is None:
        return None
    if len(keys) > len(session.keys) or session.keys[:len(keys)] != keys:
        end_held(session)
        return None
    session.narrow(len(keys))
    return session


def match(p: CacheParts, tokens, namespace: str | None, exclude_last: bool = False,
          pool: bool = True, hold: bool = False) -> CacheMatch:
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
    found, held = 0, None
    if upto > dev_pages:
        if query and getattr(p.store, "local_lookup", False):
            # a local pool answers one key at once: ask for the first unknown page before
            # hashing the others, so a miss costs one page hash and one lookup
            digests = p.keys.digests(t, namespace, r.node, known, known + 1)
            if _exists_prefix(p, digests[known:]) == 0:
                query = False
        if query or digests is None:
            digests = p.keys.digests(t, namespace, r.node, known, upto)
        if query and hold and idx_pool_pages == 0 and getattr(p.store, "hold_at_match", False):
            found, held = _held_prefix(p, digests[known:upto])
        elif query:
            found = _exists_prefix(p, digests[known:upto])
    pool_pages = idx_pool_pages + found
    if p.tp_reduce is not None:
        # TP ranks must agree on the prefix they reuse: the shortest one wins
        agreed = p.reduce(dev_pages + pool_pages)
        pool_pages = max(0, min(pool_pages, agreed - dev_pages))
    p.stats.add(match_calls=1, device_hit_tokens=r.device_len, pool_hit_tokens=pool_pages * P,
                miss_tokens=n_all - r.device_len - pool_pages * P)
    m = CacheMatch(t, namespace, r.device_len, r.device_slots, pool_pages * P, NodeHandle(r.node),
                   _digests=digests, _index_pool_pages=idx_pool_pages, _held=held)
    if held is not None and pool_pages == 0:
        release_held(m)  # the TP ranks agreed on none of them
    return m
