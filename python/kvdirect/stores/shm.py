"""The embedded shared-memory pool: ``shm://NAME?size=1GiB&checksum=on&create=auto``.

One file ``/dev/shm/kvdirect-NAME`` shared by every process on the node (C++:
csrc/shm/shm_pool.h documents the contract). URL parameters:

* ``size``: pool size when it is created (default 1GiB). Opening an existing pool
  uses the existing one whatever ``size`` says; ``stats()`` then reports
  ``size_requested`` next to the real ``size`` and a warning is issued.
* ``checksum``: ``on`` (default) computes a checksum on put and verifies it on
  get; ``off`` skips both (objects written with it on are then not verified).
* ``create``: ``auto`` (default: open, else create), ``no`` (must exist),
  ``yes`` (must not exist yet).
* ``block``: allocation block size when created (default 64KiB; a power of two,
  ideally the page size or a divisor of it).
* ``prefault``: ``on`` (default) maps the pool's pages into this process on a
  background thread at open, so its first loads do not take page faults (about as
  long as the copy itself); ``off`` leaves that to the first access. It costs one
  core for about 0.1-0.5 s per GiB at open and 2 MiB of page tables per GiB of
  pool in each process: consider ``off`` for pools of hundreds of GiB.
"""
from __future__ import annotations

import atexit
import logging
import re
import threading
import warnings
from typing import Sequence
from urllib.parse import urlsplit

import numpy as np

from kvdirect.errors import ConfigError, StoreError
from kvdirect.stores.base import (BUSY, CORRUPT, INVALID_ARGUMENT, NO_ROOM, NOT_FOUND, OK, ObjectChecks,
                                  ScatterList, Store, check_object, status_name)
from kvdirect.stores.url import StoreURL, parse_size

log = logging.getLogger("kvdirect.shm")

#: (stop, thread) of the prefaults still running. A daemon thread still inside the C++ call when
#: the interpreter finalizes aborts the process ("terminate called without an active exception"):
#: they are stopped and joined at exit (each within one chunk).
_PREFAULTS: set = set()


@atexit.register
def _join_prefaults() -> None:
    running = list(_PREFAULTS)
    for stop, _ in running:
        stop.set()
    for _, t in running:
        t.join()

DEFAULT_SIZE = 1 << 30
DEFAULT_BLOCK = 64 << 10
DEFAULT_PIN_SLOTS = 4096
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
_BOOL = {"on": True, "1": True, "true": True, "yes": True, "off": False, "0": False, "false": False, "no": False}
_WHY = {CORRUPT: " (checksum mismatch: the object was dropped)",
        BUSY: " (pin table full: too many concurrent readers; retry, or create the pool with more pins=)"}
_CREATE = {"auto": "auto", "no": "open", "never": "open", "yes": "create", "always": "create", "only": "create"}


def _core():
    from kvdirect import _core

    return _core


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"bad shm pool name {name!r}: use 1..200 of letters, digits, '.', '_', '-' "
                          "(not starting with '.')")
    return name


def pool_path(name: str) -> str:
    return _core().ShmPool.path_for(check_name(name))


class ShmStore(Store):
    """A handle on the node-local shared-memory pool NAME (see module docstring)."""

    scheme = "shm"
    supports_device_memory = False
    local_lookup = True

    def __init__(self, name: str = "kvdirect", *, size: int | str | None = None, checksum: bool = True,
                 create: str = "auto", block_size: int | str = DEFAULT_BLOCK,
                 pin_slots: int = DEFAULT_PIN_SLOTS, prefault: bool = True):
        check_name(name)
        if create not in _CREATE:
            raise ConfigError(f"create={create!r}: use auto, no or yes")
        requested = parse_size(size) if size is not None else None
        st, msg, pool, created = _core().ShmPool.open(
            name, _CREATE[create], requested if requested is not None else DEFAULT_SIZE,
            parse_size(block_size), int(pin_slots))
        if st != OK:
            if st == INVALID_ARGUMENT:
                raise ConfigError(msg)
            raise StoreError(msg)
        self._pool = pool
        self.name = name
        self.path = pool_path(name)
        self.created = bool(created)
        self.checksum = bool(checksum)
        pool.set_verify_checksum(self.checksum)
        pool.set_write_checksum(self.checksum)
        self._size_requested = requested
        self.prefaulted = None  # bytes, once the background prefault is over
        self._stop_prefault = threading.Event()
        if prefault:  # off the request path: a process's first loads would otherwise take page faults
            t = threading.Thread(target=self._prefault, name=f"kvdirect-shm-prefault-{name}", daemon=True)
            _PREFAULTS.add((self._stop_prefault, t))
            t.start()
        if requested is not None and not created:
            actual = pool.stats()["size"]
            if actual != requested:
                warnings.warn(f"shm pool {name!r} already exists with size {actual} bytes; using it as is "
                              f"(requested {requested}). To resize: `kvdirect pool destroy {name}`.",
                              stacklevel=2)

    def _prefault(self, chunk: int = 64 << 20) -> None:
        """Map the pool's data into this process chunk by chunk (one madvise each; stops on close)."""
        done = 0
        try:
            total = self._pool.data_bytes
            while done < total and not self._stop_prefault.is_set():
                n = self._pool.prefault(done, chunk)
                if n == 0:  # closed, or a kernel without MADV_POPULATE_WRITE
                    break
                done += n
        except Exception as e:  # noqa: BLE001 - a speed-up only: the pool works without it
            log.debug("shm pool %s: prefault: %s", self.name, e)
        self.prefaulted = done
        _PREFAULTS.discard((self._stop_prefault, threading.current_thread()))

    # -- the store interface -------------------------------------------------
    def exists(self, keys: Sequence[str]) -> np.ndarray:
        return self._pool.exists(keys)

    def exists_prefix(self, keys: Sequence[str]) -> int:
        # in C++, stopping at the first absent key: a miss costs one lookup
        return int(self._pool.exists_prefix(keys))

    def put(self, keys: Sequence[str], scatter: ScatterList) -> np.ndarray:
        return self._pool.put(keys, scatter.addrs, scatter.sizes)

    def get(self, keys: Sequence[str], scatter: ScatterList) -> np.ndarray:
        return self._pool.get(keys, scatter.addrs, scatter.sizes)

    def remove(self, keys: Sequence[str]) -> int:
        return int(self._pool.remove(keys))

    def open_read(self, keys: Sequence[str], object_sizes) -> "PiecewiseRead":
        """Pin objects and read them piece by piece (layer-wise loads); see PiecewiseRead."""
        return PiecewiseRead(self._pool, keys, object_sizes)

    def put_bytes(self, key: str, data) -> bool:
        key, _ = check_object(key, data)
        st = self._pool.put_bytes(key, data)
        if st == OK or st in NO_ROOM:
            return st == OK
        raise StoreError(f"shm pool {self.name!r}: put_bytes({key[:40]!r}) failed: {status_name(st)}")

    def get_bytes(self, key: str) -> bytes | None:
        st, data = self._pool.get_bytes(key)
        if st == OK or st == NOT_FOUND:
            return data
        raise StoreError(f"shm pool {self.name!r}: get_bytes({key[:40]!r}) could not deliver the object: "
                         f"{status_name(st)}{_WHY.get(st, '')}")

    def get_bytes_status(self, key: str) -> tuple[int, bytes | None]:
        """Like get_bytes, plus the status (NOT_FOUND, CORRUPT, BUSY...) of a miss."""
        return self._pool.get_bytes(key)

    # -- operator tools (kvdirect.audit) ----------------------------------------
    def list_objects(self, batch: int = 4096):
        """Published objects as (key, size), in record order; the lock is held for one batch of
        records at a time (csrc/shm/shm_pool.h: Pool::list)."""
        cursor = 0
        while True:
            cursor, objs = self._pool.list(cursor, int(batch))
            for key, size, _ in objs:
                yield key, size
            if cursor == 0:
                return

    def check_objects(self, keys: Sequence[str], drop_corrupt: bool = False) -> ObjectChecks:
        """Recompute each object's checksum in place (nothing copied out; ignores checksum=off):
        CORRUPT objects stay in the pool unless ``drop_corrupt``; ``checked`` is False for objects
        written without a checksum (their content is unverified)."""
        st, checked, sizes = self._pool.verify(keys, bool(drop_corrupt))
        detail = {int(i): "checksum mismatch" if checked[i] else "damaged object record"
                  for i in np.flatnonzero(st == CORRUPT)}
        detail.update({int(i): "pin table full (too many concurrent readers)" for i in np.flatnonzero(st == BUSY)})
        return ObjectChecks(st, checked, sizes, detail)

    def object_extents(self, key: str) -> list[tuple[int, int]]:
        """(file offset, length) of each block of ``key``'s bytes in the pool file, in object order:
        for tools and tests that inspect or damage the file directly. StoreError when absent."""
        st, ext = self._pool.object_extents(key)
        if st != OK:
            raise StoreError(f"shm pool {self.name!r}: no extents for {key[:40]!r}: {status_name(st)}")
        return ext

    def stats(self) -> dict:
        s = dict(self._pool.stats())
        s.update(name=self.name, path=self.path, checksum=self.checksum,
                 size_requested=self._size_requested, kernel=_core().shm_copy_kernel(),
                 prefaulted_bytes=self.prefaulted)
        return s

    def close(self) -> None:
        self._stop_prefault.set()
        if self._pool is not None and not self._pool.closed:
            self._pool.close()

    @property
    def closed(self) -> bool:
        return self._pool.closed

    def destroy(self) -> None:
        """Close this handle and unlink the pool file (other processes' mappings stay valid)."""
        self.close()
        destroy_pool(self.name, missing_ok=True)

    def _debug_hold(self, phase: str, seconds: float, marker: str = "") -> None:
        """Test hook: at `phase` (lock, alloc, put_copy, get_copy) create `marker` and sleep, once."""
        self._pool.debug_hold(phase, float(seconds), marker)

    def __repr__(self) -> str:
        return f"ShmStore({self.name!r}, path={self.path!r}, checksum={'on' if self.checksum else 'off'})"


class PiecewiseRead:
    """A batch of pinned objects read in consecutive pieces (one layer at a time).

    ``status`` starts as the per-key result of pinning; ``read(scatter, n)`` copies
    the next bytes of the first ``n`` objects; ``end()`` verifies checksums, unpins
    and returns the final status (OK only for objects delivered whole and verified).
    Always call ``end()`` (or use it as a context manager): pins are held until then.
    """

    def __init__(self, pool, keys, object_sizes):
        self._pool = pool
        sizes = np.ascontiguousarray(object_sizes, dtype=np.uint64)
        self._session, self.status = pool.read_begin(keys, sizes)
        self._final = None

    def read(self, scatter: ScatterList) -> None:
        self._pool.read_next(self._session, scatter.addrs, scatter.sizes)

    def end(self) -> np.ndarray:
        if self._final is None:
            self._final = self._pool.read_end(self._session)
        return self._final

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.end()


def destroy_pool(name: str, missing_ok: bool = False) -> bool:
    """Unlink /dev/shm/kvdirect-NAME; returns whether it existed."""
    st, msg = _core().ShmPool.destroy(check_name(name))
    if st == OK:
        return True
    if st == NOT_FOUND and missing_ok:
        return False
    raise StoreError(msg)


def open_url(u: StoreURL) -> ShmStore:
    # urlsplit lowercases the host: take the name from the raw netloc to keep its case
    parts = urlsplit(u.raw) if u.raw else None
    name = (parts.netloc if parts else u.host) or u.path
    if not name:
        raise ConfigError(f"shm URL needs a pool name, e.g. shm://kvdirect?size=8GiB (got {u.raw!r})")
    if u.path and parts and parts.netloc:
        raise ConfigError(f"shm URL {u.raw!r}: the pool name goes in the host part only, e.g. shm://{name}?size=1GiB")
    size = u.pop("size")
    checksum = u.pop("checksum", "on").lower()
    if checksum not in _BOOL:
        raise ConfigError(f"checksum={checksum!r} in {u.raw!r}: use on or off")
    create = u.pop("create", "auto").lower()
    block = u.pop("block", DEFAULT_BLOCK)
    pins = u.pop("pins", DEFAULT_PIN_SLOTS)
    prefault = u.pop("prefault", "on").lower()
    if prefault not in _BOOL:
        raise ConfigError(f"prefault={prefault!r} in {u.raw!r}: use on or off")
    u.reject_unknown()
    try:
        pins = int(pins)
    except ValueError:
        raise ConfigError(f"pins={pins!r} in {u.raw!r}: use an integer") from None
    return ShmStore(name, size=size, checksum=_BOOL[checksum], create=create, block_size=block, pin_slots=pins,
                    prefault=_BOOL[prefault])
