"""The one store interface every L3 pool implements.

Contract (all stores, tested in tests/test_stores_contract.py):

* Keys are ``str`` page keys, ASCII, at most ``MAX_KEY_BYTES`` bytes (MemCache's
  limit is 256 including the terminator).
* A *scatter list* names where one page's bytes live in (device or host) memory:
  ``ScatterList.addrs[i, j]`` / ``ScatterList.sizes[i, j]`` is segment ``j`` of key
  ``i``. The pool object for key ``i`` is the concatenation of its segments in
  order; every segment list of one layout has the same shape, so instances with
  the same layout fingerprint read each other's objects byte for byte.
* ``put`` / ``get`` return one status per key (``numpy.int32``): ``0`` (OK) means
  the whole object was written / every byte was delivered; anything else is a
  failure for that key and the caller must treat the page as absent. Codes are
  ``kvdirect._core.Status`` values (NOT_FOUND=1, ... UNAVAILABLE=7).
* Puts are atomic per key: a reader sees nothing or the whole object.
* ``exists_prefix`` counts leading keys present, stopping at the first miss.
* ``register`` is called once per memory region a store reads or writes
  (device KV pool, staging buffer); never per call.
* Keys name their content: putting a key the pool already holds reports success
  (the pool holds that key's object); a store may keep the first object or
  replace it, a reader still sees one of them whole.
* Objects are at least one byte: ``put_bytes(key, b"")`` is a ConfigError
  everywhere (Mooncake cannot store empty objects).

Failure reporting: a return value is always the pool's answer, never a guess.
When a store cannot give one it says so, per call:

=================  ===========================================================
call               failure is reported as
=================  ===========================================================
``put`` / ``get``  a non-OK status for each key that failed (TIMEOUT,
                   UNAVAILABLE, NO_SPACE, CORRUPT, ...); the call itself never
                   raises for a store failure, so one bad key costs one page.
``exists``         ``StoreError`` when the pool cannot answer for every key
(and ``_prefix``)  (unreachable, timed out, an error answer for any key): a
                   key it knows nothing about is never reported "absent".
                   Callers count that as misses and back off.
``remove``         returns how many keys were present and are now removed
                   (absent keys are no failure); ``StoreError`` when the pool
                   cannot answer or a present key could not be removed (e.g.
                   under Mooncake's read lease).
``put_bytes``      ``True``: stored. ``False``: the pool has no room for it
                   (NO_SPACE / TOO_LARGE, as a put status would say).
                   ``StoreError`` for every other failure (unreachable, timed
                   out, I/O error).
``get_bytes``      the whole object, or ``None`` when the key is absent;
                   ``StoreError`` when the pool cannot answer or cannot
                   deliver the object whole (timed out, corrupt, busy).
=================  ===========================================================

Operator tools (``kvdirect pool audit``, :mod:`kvdirect.audit`; never the serving
path): ``list_objects()`` enumerates the pool's objects, where the store can
(StoreError where it cannot), and ``check_objects(keys)`` reads objects whole and
says, per key, whether a checksum vouched for the content (the shm pool keeps
one per object; Mooncake and MemCache objects carry none, so there a check proves
an object readable and whole, not its bytes right).

Bad input (keys, scatter lists, empty objects) is a ``ConfigError`` on every call.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from kvdirect.errors import ConfigError, StoreError

MAX_KEY_BYTES = 255

OK = 0
NOT_FOUND = 1
INVALID_ARGUMENT = 2
NO_SPACE = 3
CORRUPT = 4
BUSY = 5
TIMEOUT = 6
UNAVAILABLE = 7
IO_ERROR = 8
TOO_LARGE = 9
_STATUS_NAMES = {v: k for k, v in dict(OK=OK, NOT_FOUND=NOT_FOUND, INVALID_ARGUMENT=INVALID_ARGUMENT,
                                       NO_SPACE=NO_SPACE, CORRUPT=CORRUPT, BUSY=BUSY, TIMEOUT=TIMEOUT,
                                       UNAVAILABLE=UNAVAILABLE, IO_ERROR=IO_ERROR, TOO_LARGE=TOO_LARGE).items()}


@dataclass(frozen=True)
class ScatterList:
    """Per-key memory segments: ``addrs`` and ``sizes`` are uint64 arrays of shape (keys, segments)."""

    addrs: np.ndarray
    sizes: np.ndarray

    def __post_init__(self):
        a = np.ascontiguousarray(self.addrs, dtype=np.uint64)
        s = np.ascontiguousarray(self.sizes, dtype=np.uint64)
        if a.ndim == 1:
            a = a.reshape(-1, 1)
        if s.ndim == 1:
            s = s.reshape(-1, 1)
        if a.shape != s.shape:
            raise ConfigError(f"scatter list addrs {a.shape} and sizes {s.shape} must have the same shape")
        object.__setattr__(self, "addrs", a)
        object.__setattr__(self, "sizes", s)

    def __len__(self) -> int:
        return self.addrs.shape[0]

    @property
    def object_sizes(self) -> np.ndarray:
        return self.sizes.sum(axis=1, dtype=np.uint64)

    def take(self, idx) -> "ScatterList":
        return ScatterList(self.addrs[idx], self.sizes[idx])


@dataclass
class ObjectChecks:
    """What :meth:`Store.check_objects` found, per key: ``status`` (int32: OK, CORRUPT, NOT_FOUND,
    BUSY, UNAVAILABLE...), ``checked`` (bool: a checksum was compared, so OK means the bytes are
    those written), ``sizes`` (uint64 object sizes, 0 when unknown) and ``detail`` (index -> why)."""

    status: np.ndarray
    checked: np.ndarray
    sizes: np.ndarray
    detail: dict

    @classmethod
    def empty(cls, n: int) -> "ObjectChecks":
        return cls(np.zeros(n, np.int32), np.zeros(n, bool), np.zeros(n, np.uint64), {})


def check_keys(keys: Sequence[str]) -> list[str]:
    """Validate page keys once at the boundary; returns them as a list."""
    keys = list(keys)
    if not keys:
        return keys
    # C-level passes over the keys (an ASCII key has one byte per character); the per-key
    # loop below only runs to name a bad key (or for non-ASCII keys)
    if (set(map(type, keys)) == {str} and all(map(str.isascii, keys))
            and 0 < min(map(len, keys)) and max(map(len, keys)) <= MAX_KEY_BYTES):
        return keys
    for k in keys:
        if not isinstance(k, str):
            raise ConfigError(f"store keys must be str, got {type(k).__name__}")
        if not k or len(k.encode()) > MAX_KEY_BYTES:
            raise ConfigError(f"store key must be 1..{MAX_KEY_BYTES} bytes, got {len(k.encode())}: {k[:40]!r}...")
    return keys


def check_object(key: str, data) -> tuple[str, int]:
    """Validate put_bytes input once at the boundary: (key, object size in bytes)."""
    (key,) = check_keys([key])
    try:
        n = memoryview(data).nbytes
    except TypeError:
        raise ConfigError(f"put_bytes needs a bytes-like object, got {type(data).__name__}") from None
    if n == 0:
        raise ConfigError(f"put_bytes({key[:40]!r}): objects must be at least 1 byte (stores cannot hold empty ones)")
    return key, n


#: put_bytes statuses that mean "no room for this object" (False); any other failure raises StoreError
NO_ROOM = (NO_SPACE, TOO_LARGE)


def status_name(code: int) -> str:
    """'TIMEOUT' for a kvdirect status code (messages name statuses, never bare integers)."""
    return _STATUS_NAMES.get(int(code), f"status {int(code)}")


class Store(abc.ABC):
    """Abstract L3 pool. Subclasses: ShmStore, MooncakeStore, MemcacheStore."""

    #: URL scheme this store is opened with (shm, mooncake, memcache)
    scheme: str = ""
    #: True when put/get can read/write accelerator memory addresses directly
    #: (RDMA/SDMA). False: the cache manager stages device pages through host memory.
    supports_device_memory: bool = False
    #: True when exists/exists_prefix are in-process lookups (no round trip): a cache
    #: may then ask about a request's first unknown page alone before hashing the rest
    #: (a miss costs one page hash); remote stores get one batched query instead.
    local_lookup: bool = False
    #: True when opening a read session (``open_read``) costs the one round trip an
    #: existence query costs and reports per key whether it exists; its sessions have
    #: ``narrow(n)``. A cache may then open the session at the match (the pages are held
    #: from then on) and the load reads through it: one round trip instead of two.
    hold_at_match: bool = False

    @abc.abstractmethod
    def exists(self, keys: Sequence[str]) -> np.ndarray:
        """bool array, one per key; StoreError when the pool cannot answer (never "absent" for "unknown")."""

    def exists_prefix(self, keys: Sequence[str]) -> int:
        """How many leading keys are present (stops at the first miss)."""
        present = self.exists(keys)
        miss = np.flatnonzero(~present)
        return int(miss[0]) if miss.size else len(present)

    @abc.abstractmethod
    def put(self, keys: Sequence[str], scatter: ScatterList) -> np.ndarray:
        """Write each key's object from its segments; int32 status per key (0 = stored)."""

    @abc.abstractmethod
    def get(self, keys: Sequence[str], scatter: ScatterList) -> np.ndarray:
        """Read each key's object into its segments; int32 status per key (0 = every byte delivered)."""

    def register(self, addr: int, length: int, memory: str | None = None) -> None:
        """Register memory the store will DMA from/to; once per region. Default: nothing needed.

        ``memory``: "device" or "host" where the store must know (MemCache picks
        L2G/G2L or H2G/G2H by it); None: the store's default for its memory."""

    @abc.abstractmethod
    def remove(self, keys: Sequence[str]) -> int:
        """Remove keys; returns how many were present. StoreError if a present key stays or the pool cannot answer."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> bool:
        """Store one object: True stored, False no room (NO_SPACE / TOO_LARGE); StoreError for other failures."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """One whole object, None when absent; StoreError when it cannot be delivered whole."""

    def stats(self) -> dict:
        return {}

    # -- operator tools (audit), never on the serving path ---------------------
    def list_objects(self) -> Iterator[tuple[str, int | None]]:
        """Every object in the pool as ``(key, size in bytes)`` (size None where the listing does not
        say). Objects put or removed while the listing runs may be seen or missed; one present
        throughout is seen once. StoreError when this store cannot enumerate its objects."""
        raise StoreError(f"{self.scheme or type(self).__name__} stores cannot list their objects")

    def check_objects(self, keys: Sequence[str], drop_corrupt: bool = False) -> "ObjectChecks":
        """Read each object whole (for an audit). This default reads through ``get_bytes``: an object
        delivered whole is OK with ``checked`` False (no checksum vouches for its bytes); a key gone
        since it was listed is NOT_FOUND; a failed read is UNAVAILABLE with the store's message.
        Stores that keep checksums override this (the shm pool verifies them in place)."""
        keys = check_keys(keys)
        out = ObjectChecks.empty(len(keys))
        for i, k in enumerate(keys):
            try:
                data = self.get_bytes(k)
            except StoreError as e:
                out.status[i] = UNAVAILABLE
                out.detail[i] = str(e)
                continue
            if data is None:
                out.status[i] = NOT_FOUND
            else:
                out.sizes[i] = len(data)
        return out

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
