"""What the cache asks of the prefix index beyond match/insert: page digests and pool
keys (each page hashed once in its lifetime), page-set marks, and node locks."""
from __future__ import annotations

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


class NodeHandle(int):
    """A match's index node handle: an int wherever a handle goes, that also counts the
    locks taken through it, so ``load`` moves exactly this request's locks onto its new node.

    The count lives on the object, one per match. Keyed by ``id()`` of plain ints it went
    wrong: ``MatchResult.node`` is a fresh int on every access (a freed one's id is soon another
    handle's, and a count left under it moved a lock the request never took), and small ints are
    shared objects (two requests on one node shared a count, and one load moved both locks)."""

    locks = 0


class NodeLocks:
    """Index node locks; locks taken through a ``NodeHandle`` are counted on it, so a lock can
    follow its request's node. Plain int handles lock the index only (nothing follows them)."""

    def __init__(self, index: PrefixIndex):
        self.index = index

    def lock(self, node) -> None:
        self.index.lock(node)
        if isinstance(node, NodeHandle):
            node.locks += 1

    def unlock(self, node) -> None:
        self.index.unlock(node)
        if isinstance(node, NodeHandle) and node.locks > 0:
            node.locks -= 1

    def move(self, old, new: int) -> NodeHandle:
        """The handle of node ``new`` holding the locks taken through ``old`` (none leave other
        handles of the same node); the new node is locked before the old one is unlocked."""
        new = NodeHandle(new)
        for _ in range(old.locks if isinstance(old, NodeHandle) else 0):
            self.lock(new)
            self.unlock(old)
        return new
