"""The prefix index: one radix tree for device-resident and pool-resident KV pages.

``PrefixIndex`` is the C++ index (``csrc/index/index.h`` documents the full
contract); this module adds constructor validation and documentation. Hot
methods (``match``, ``insert``) run straight in C++ with no Python frame.

Summary of the contract:

* Pages of ``page_size`` tokens; a trailing partial page is ignored. Token ids
  are int32 or int64 (numpy arrays, ``array('i'/'l'/'q')``, CPU torch tensors
  are read in place; lists/tuples are converted). Bad input raises
  :class:`kvdirect.errors.ConfigError`.
* ``namespace`` (``None`` or ``""`` = default) separates tenants / LoRA
  adapters: different namespaces never share pages.
* Per page: device slots or none; pool state ``POOL_UNKNOWN`` / ``POOL_IN_POOL``
  / ``POOL_WRITING``; an optional 32-byte storage digest.
* ``match(tokens, namespace=None) -> MatchResult(device_len, device_slots,
  pool_len, node, last_digest)``: ``device_len`` tokens resident on device from
  the start (their slots in ``device_slots``, a fresh numpy int64 array, or a
  shared read-only empty one), then ``pool_len``
  tokens known to be in the pool. ``node`` is an int handle of the matched path
  (0 when nothing matched); matching splits nodes as needed and refreshes
  recency. The result keeps the slots as the runs of consecutive slots the
  index holds (a page or more each) and builds ``device_slots`` on first
  access: a snapshot of the match, so a caller that needs only lengths and the
  node pays nothing per token.
* ``insert(tokens, slots, namespace=None, digests=None) -> int``: caches the full
  pages on device and returns how many leading tokens were *already* on device.
  The caller frees its own slots for ``[0, returned)``; the index owns every
  slot after that, including those given to pages that were pool-only (they
  become device-resident again and keep their pool state). ``slots`` needs at
  least ``len(tokens) // page_size * page_size`` int64 entries; extra entries
  are ignored. Slots must be >= 0.
* ``insert_path(tokens, slots, namespace=None, digests=None, in_pool_first=None)
  -> (int, MatchResult)``: ``insert`` plus what a finished load or a write-back
  asks next, in one call: pages from ``in_pool_first`` on are marked in the
  pool, and the result describes the inserted path as ``match(tokens)`` would
  now (every full page on device, ``node`` its end).
* ``insert_pool_only(tokens, namespace=None, digests=None) -> int``: records
  pages a store query found in the pool (no slots); returns pages that changed.
* ``lock(node)`` / ``unlock(node)``: reference counts along the path; locked
  pages are never evicted or dropped. Each ``unlock(node)`` pairs with an earlier
  ``lock`` of the same handle (else ConfigError). Handles stay valid across node
  splits; a handle whose last page left the index raises ConfigError ("stale").
* ``evict(num_tokens) -> numpy.int64 array``: frees ``ceil(num_tokens /
  page_size)`` pages, least recently used first, page by page from the leaves;
  pages with a pool write in flight (and their ancestors) are pinned. An evicted
  page that is in the pool stays as pool-only (reported by later matches in
  ``pool_len``); at most ``max_pool_only_pages`` such pages are kept (least
  recently used dropped first).
* Write-back hooks, all by tokens and page range (robust to node splits), each
  returning the number of pages changed: ``mark_writing`` (device pages
  UNKNOWN -> WRITING, pinned), ``mark_in_pool`` (-> IN_POOL, unpinned),
  ``mark_write_failed`` (WRITING -> UNKNOWN), ``mark_not_in_pool`` (IN_POOL ->
  UNKNOWN; pool-only pages are dropped with everything after them unless locked,
  then as soon as they are unlocked).
* Sizes in tokens: ``total_size`` (device-resident), ``protected_size`` (locked,
  or at/above a WRITING page), ``evictable_size`` (= what ``evict`` can free
  now); ``pool_only_pages``; ``len(index)`` = pages held.
* Digests: ``path_digests(node) -> (uint8[pages, 32], bool[pages])``,
  ``set_path_digests(node, digests, first_page=0)``, ``MatchResult.last_digest``.
* Thread safety: an internal mutex guards every call. One scheduler thread drives
  the index; completion marks may come from other threads.
"""
from __future__ import annotations

import operator

from kvdirect import _core
from kvdirect.errors import ConfigError

MatchResult = _core.MatchResult
POOL_UNKNOWN = _core.POOL_UNKNOWN
POOL_IN_POOL = _core.POOL_IN_POOL
POOL_WRITING = _core.POOL_WRITING

DEFAULT_MAX_POOL_ONLY_PAGES = 65536

__all__ = ["PrefixIndex", "MatchResult", "POOL_UNKNOWN", "POOL_IN_POOL", "POOL_WRITING",
           "DEFAULT_MAX_POOL_ONLY_PAGES"]


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an int, got {type(value).__name__}") from None


class PrefixIndex(_core.PrefixIndex):
    """Page-granular prefix index of device-resident and pool-resident KV pages.

    Args:
        page_size: tokens per page (>= 1); SGLang's ``page_size``.
        max_pool_only_pages: how many pages without device slots (known to be in
            the pool) the index keeps at most; least recently used are dropped.
    """

    __slots__ = ()

    def __init__(self, page_size: int, max_pool_only_pages: int = DEFAULT_MAX_POOL_ONLY_PAGES):
        page_size = _as_int(page_size, "page_size")
        max_pool_only_pages = _as_int(max_pool_only_pages, "max_pool_only_pages")
        if page_size < 1:
            raise ConfigError(f"page_size must be >= 1, got {page_size}")
        if max_pool_only_pages < 0:
            raise ConfigError(f"max_pool_only_pages must be >= 0, got {max_pool_only_pages}")
        super().__init__(page_size, max_pool_only_pages)

    def __repr__(self) -> str:
        return (f"PrefixIndex(page_size={self.page_size}, total_size={self.total_size}, "
                f"protected_size={self.protected_size}, pool_only_pages={self.pool_only_pages})")
