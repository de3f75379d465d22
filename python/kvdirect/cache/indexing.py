"""What the cache asks of the prefix index beyond match/insert: page digests and pool
keys (each page hashed once in its lifetime), page-set marks, and node locks."""
from __future__ import annotations

import collections

import numpy as np

from kvdirect import keys as _keys
from kvdirect.index import PrefixIndex

# index pool states (csrc/index/index.h)
UNKNOWN, IN_POOL, WRITING = 0, 1, 2


class PageKeys:
    """Digest chains and pool keys of a request's pages, per namespace."""

    def __init__(self, index: PrefixIndex, page_size: int, fingerprint):
        self.index = index
        self.page_size = page_size
        self.fingerprint = fingerprint
        self._seed_cache: dict = {}

    def seed(self, namespace):
        namespace = _keys.request_namespace(namespace)  # "" and None are one, as in the index
        if namespace not in self._seed_cache:
            self._seed_cache[namespace] = _keys.namespace_seed(extra_key=namespace)
        return self._seed_cache[namespace]

    def digests(self, tokens, namespace, node, known_pages: int, upto_pages: int) -> np.ndarray:
        """Digests of pages [0, upto_pages). Pages on the index path keep theirs, so
        each page is hashed once in its lifetime; new ones are chained from the last known."""
        P = self.page_size
        if known_pages:
            have, mask = self.index.path_digests(node)
            have, mask = have[:known_pages], mask[:known_pages]
        if known_pages and mask.all():
            if upto_pages <= known_pages:
                return have[:upto_pages]
            tail = _keys.page_digests(tokens[known_pages * P:upto_pages * P], P,
                                      prior=have[-1].tobytes(), namespace_seed=self.seed(namespace))
            return np.concatenate([have, tail])
        d = _keys.page_digests(tokens[:upto_pages * P], P, namespace_seed=self.seed(namespace))
        if known_pages:
            self.index.set_path_digests(node, d[:known_pages])
        return d

    def pool_keys(self, digests: np.ndarray) -> list:
        return _keys.pool_keys(digests, self.fingerprint)


def mark(fn, tokens, namespace, pages: np.ndarray) -> int:
    """Apply an index mark to a sorted set of page indices in one call."""
    if pages.size == 0:
        return 0
    first = int(pages[0])
    m = np.zeros(int(pages[-1]) - first + 1, dtype=np.uint8)
    m[pages - first] = 1
    return fn(tokens, first, m.size, namespace=namespace, mask=m)


class NodeLocks:
    """Index node locks with a count per handle, so a lock can follow its request's node."""

    def __init__(self, index: PrefixIndex):
        self.index = index
        self._locked: collections.Counter = collections.Counter()

    def lock(self, node) -> None:
        self.index.lock(node)
        self._locked[id(node)] += 1

    def unlock(self, node) -> None:
        self.index.unlock(node)
        self._locked[id(node)] -= 1
        if self._locked[id(node)] <= 0:
            del self._locked[id(node)]

    def move(self, old, new) -> None:
        for _ in range(self._locked.get(id(old), 0)):
            self.lock(new)
            self.unlock(old)
