"""Mooncake Store adapter: kvdirect's Store interface over ``mooncake.store.MooncakeDistributedStore``.

URL::

    mooncake://MASTER_HOST:PORT?metadata=http://127.0.0.1:18080/metadata&protocol=tcp
        &segment=4GiB&buffer=128MiB&local=127.0.0.1&device=&timeout=5

``segment`` is the memory this client contributes to the pool, ``buffer`` its
local transfer buffer, ``local`` the address other clients reach it at,
``device`` the RDMA device list (``protocol=rdma``), ``timeout`` the deadline in
seconds of every store call (0: none). Optional: ``workers`` (threads running
calls, default 4), ``require_registered`` (0/1, see below), ``device_memory``
(0/1: the transport reads accelerator memory directly; default 0),
``check`` (0/1: probe master and metadata server before setup, default 1),
``admin`` (the master's admin HTTP server, its ``--metrics_port``; default
``http://MASTER_HOST:9003``, Mooncake's default): ``list_objects`` (operator
tools, ``kvdirect pool audit``) reads the key list there (``/get_all_keys``), as
the client itself cannot list keys.

Semantics (how Mooncake's integer results become kvdirect statuses):

* ``batch_put_from*`` returns 0 per stored key; ``OBJECT_ALREADY_EXISTS`` (-705)
  also means the pool holds the key (page keys name their content), so OK; any
  other negative value is a failure (NO_SPACE, UNAVAILABLE, IO_ERROR, ...).
* ``batch_get_into*`` returns the bytes delivered per key, negative on error. A
  key is OK only when exactly its scatter list's total size was delivered; an
  object of another size is CORRUPT (a layout mismatch), never used.
* Objects live in the memory that clients contribute (``segment``): when the
  client holding an object's replica closes, the object is gone.
* ``remove`` does not force: Mooncake keeps objects under a read lease
  (``default_kv_lease_ttl``, 10 s by default; reads and existence queries grant
  it) and refuses to remove them until it expires (-706): that key is reported
  (StoreError), not counted as absent.
* Failures follow the store contract (``kvdirect.stores.base``): ``exists``
  raises StoreError when the master cannot answer (a dead master answers -900
  per key at once; a hung one runs into the deadline). ``put_bytes`` /
  ``get_bytes`` / ``remove`` raise StoreError on failure; ``put_bytes`` of an
  object larger than the client's transfer buffer (``buffer``) is False
  (TOO_LARGE), as is one the pool has no room for. ``get`` of the byte API
  answers b"" both for "absent" and for a failed read (empty objects cannot be
  stored), so ``get_bytes`` asks ``get_size`` to tell them apart.

If the package is installed but a system library it links is not (libibverbs,
librdmacm, libnuma: ``apt-get install -y libibverbs1 librdmacm1 libnuma1``),
opening raises StoreError naming the library and that command.

Piecewise reads (``open_read``, used by layer-by-layer loads): a get session
(``batch_get_session_start``: the master is asked for the replicas once) and then one
``batch_get_into_multi_buffer_ranges`` call per piece (a layer of every page), each
key's range starting where its previous piece ended; ``batch_get_session_end`` at the
end. The session start answers per key whether it exists (-704 for an absent key), in
the one round trip an existence query costs, so a cache may open it at its match
(``hold_at_match``) and narrow it to the pages it then loads. Ending is local to the
client (no round trip: with the master stopped and a call stuck in the client it still
returns at once), so it runs on the caller's thread, without the deadline runner's
hand-off. The client keeps one session per key, which its first end ends for every
reader: the adapter ends a key's session only when no other open session of the store
holds the key, so two loads over the same pages never cut each other off. A session
start that runs past the deadline keeps its keys counted until the abandoned call returns
and ends them then (it may still open them in the client). A key counts
as delivered only when every piece delivered exactly its bytes and the pieces cover its
whole object; a range past the end of a smaller object fails
(INVALID_ARGUMENT). An object larger than expected under the same key is not
detected by ranged reads (keys carry the layout fingerprint, so only a fingerprint
collision could produce one).

Memory registration: ``register(addr, length)`` calls ``register_buffer`` once
per region (a repeat is a no-op). With ``protocol=tcp`` Mooncake copies through
sockets and reads/writes any address of this process, so segments outside
registered regions still work (tested). With RDMA the NIC can only use
registered memory, so by default (``require_registered`` = protocol is not tcp)
keys with an unregistered segment fail with INVALID_ARGUMENT before any call,
instead of a transfer error deep inside the transport. Call ``unregister(addr)``
before freeing a registered region; a new region overlapping earlier ones is taken
as memory that was freed and reused: the stale registrations are dropped first
(Mooncake refuses overlapping registrations).
"""
from __future__ import annotations

import logging
import os
import threading
from urllib.parse import urlsplit

import numpy as np

from kvdirect import runtime
from kvdirect.errors import ConfigError, StoreError
from kvdirect.stores import base
from kvdirect.stores._remote import (CallTimeout, CallUnavailable, RemoteStore, http_key_list,
                                     import_client_module, map_codes, tcp_reachable, url_flag)
from kvdirect.stores.base import ScatterList
from kvdirect.stores.url import StoreURL, parse_size

log = logging.getLogger(__name__)

INSTALL_HINT = ('pip install "kvdirect[mooncake]" (mooncake-transfer-engine-non-cuda on CPU machines, '
                'mooncake-transfer-engine with CUDA) and the system libraries it loads: '
                f"{runtime.apt_command('mooncake.store')}")

# Mooncake ErrorCode (mooncake-store/include/types.h) -> kvdirect status
MC_OK = 0
MC_OBJECT_ALREADY_EXISTS = -705
#: mooncake_master's default --metrics_port: its admin HTTP server (/get_all_keys, /metrics)
DEFAULT_ADMIN_PORT = 9003
_CODES = {
    0: base.OK,
    -1: base.IO_ERROR,            # INTERNAL_ERROR
    -10: base.TOO_LARGE,          # BUFFER_OVERFLOW
    -101: base.UNAVAILABLE,       # SEGMENT_NOT_FOUND
    -200: base.NO_SPACE,          # NO_AVAILABLE_HANDLE
    -400: base.INVALID_ARGUMENT,  # INVALID_KEY
    -500: base.IO_ERROR,          # WRITE_FAIL
    -600: base.INVALID_ARGUMENT,  # INVALID_PARAMS (also: destination smaller than the object)
    -601: base.INVALID_ARGUMENT,  # ILLEGAL_CLIENT
    -602: base.INVALID_ARGUMENT,  # NON_CONTIGUOUS_BUFFER_NOT_SUPPORTED
    -700: base.IO_ERROR, -701: base.IO_ERROR, -702: base.IO_ERROR,
    -703: base.NOT_FOUND,         # REPLICA_IS_NOT_READY: a put still in flight -> not there yet
    -704: base.NOT_FOUND,         # OBJECT_NOT_FOUND
    -706: base.BUSY,              # OBJECT_HAS_LEASE
    -707: base.IO_ERROR,          # LEASE_EXPIRED during the transfer: bytes may be stale
    -708: base.BUSY,
    -710: base.NOT_FOUND, -712: base.NOT_FOUND,
    -800: base.IO_ERROR,          # TRANSFER_FAIL
    -900: base.UNAVAILABLE,       # RPC_FAIL (master unreachable)
    -901: base.UNAVAILABLE,
    -1010: base.UNAVAILABLE, -1011: base.UNAVAILABLE,
    -1700: base.NO_SPACE,         # TENANT_QUOTA_EXCEEDED
}
_PUT_CODES = {**_CODES, MC_OBJECT_ALREADY_EXISTS: base.OK}
#: segments ("slices") per batch call: over TCP, one batch get of 56 keys x 64 segments of
#: 128 KiB (3584 slices, 448 MiB) from another client's segment stalled until Mooncake's own
#: 60 s transfer timeout on a 2-core machine, while 1024-slice batches of the same data took
#: under a second; larger transfers are split into calls of at most this many slices
MAX_SLICES_PER_CALL = 1024
_GET_CODES = {**_CODES, MC_OBJECT_ALREADY_EXISTS: base.IO_ERROR}


def import_client():
    """The MooncakeDistributedStore class, or StoreError naming what is missing and the command that fixes it
    (the pip extra when the package is absent; the Debian packages when a system library is)."""
    return import_client_module("mooncake.store", "Mooncake", INSTALL_HINT).MooncakeDistributedStore


def put_status(rc) -> np.ndarray:
    """Per-key kvdirect status from batch_put_from* results (0 = stored)."""
    return map_codes(rc, _PUT_CODES, base.IO_ERROR)


def get_status(rc, expected_sizes) -> np.ndarray:
    """Per-key status from batch_get_into* results: OK only if exactly the expected bytes were delivered."""
    rc = np.asarray(rc, np.int64)
    st = map_codes(np.minimum(rc, 0), _GET_CODES, base.IO_ERROR)
    delivered = rc >= 0
    exact = rc == np.asarray(expected_sizes, np.int64)
    st[delivered & exact] = base.OK
    st[delivered & ~exact] = base.CORRUPT  # object of another size: another layout, or truncated
    return st


class MooncakeStore(RemoteStore):
    """Mooncake Store client behind kvdirect's Store interface (see the module docstring)."""

    scheme = "mooncake"
    hold_at_match = True  # batch_get_session_start answers per key, as batch_is_exist does
    label = "Mooncake"
    codes, put_codes = _CODES, _PUT_CODES

    def __init__(self, master: str, metadata: str, *, protocol: str = "tcp", segment: int = 4 << 30,
                 buffer: int = 128 << 20, local: str = "127.0.0.1", device: str = "", timeout_s: float = 5.0,
                 workers: int = 4, require_registered: bool | None = None, device_memory: bool = False,
                 check: bool = True, client=None, admin: str | None = None):
        self.master, self.metadata, self.protocol = master, metadata, protocol
        self.admin = admin or f"http://{master.rpartition(':')[0]}:{DEFAULT_ADMIN_PORT}"
        self.segment, self.buffer, self.local, self.device = int(segment), int(buffer), local, device
        self.require_registered = (protocol != "tcp") if require_registered is None else bool(require_registered)
        self.supports_device_memory = bool(device_memory)
        self._init_remote(timeout_s, workers, client)
        # the client keeps one get session per key, ended by the first end over it: the keys of
        # each open session, so a session ends a key only when no other one still holds it
        self._session_keys: dict[MooncakeRead, frozenset] = {}
        self._session_lock = threading.Lock()
        if client is not None:  # an already set-up client (tests, or a caller sharing one)
            return
        cls = import_client()
        if check:
            self._preflight()
        self._client = cls()
        bind = local in ("127.0.0.1", "localhost", "::1") and "MC_TCP_BIND_ADDRESS" not in os.environ
        if bind:
            # a loopback client listens on loopback only (by default Mooncake binds its RPC
            # server to the first active network interface, even for a local-only pool);
            # only for this setup: left in the environment, it would make every later
            # client of this process, and every process it starts, bind to loopback too
            os.environ["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
        try:
            rc = self._client.setup(local, metadata, self.segment, self.buffer, protocol, device, master)
        finally:
            if bind:
                os.environ.pop("MC_TCP_BIND_ADDRESS", None)
        if rc != 0:
            raise StoreError(f"Mooncake setup failed (rc={rc}) with master {master}, metadata {metadata}, "
                             f"protocol {protocol!r}, segment {self.segment} B: {self._start_hint()}")

    # ------------------------------------------------------------------ opening

    def _start_hint(self) -> str:
        host, _, port = self.master.rpartition(":")
        mport = urlsplit(self.metadata).port if self.metadata.startswith("http") else None
        return (f"is mooncake_master running at {self.master}? start it with: mooncake_master "
                f"--rpc_port={port} --enable_http_metadata_server=true"
                + (f" --http_metadata_server_port={mport}" if mport else "")
                + " (or `python -c 'from kvdirect.services import start_mooncake_master'` in tests)")

    def _preflight(self) -> None:
        """Fail in seconds when the master or metadata server is down (setup alone retries ~90 s holding the GIL)."""
        host, _, port = self.master.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"Mooncake master must be HOST:PORT, got {self.master!r}")
        if not tcp_reachable(host, int(port)):
            raise StoreError(f"cannot reach the Mooncake master at {self.master}: {self._start_hint()}")
        if self.metadata.startswith("http"):
            u = urlsplit(self.metadata)
            if not u.hostname or not tcp_reachable(u.hostname, u.port or 80):
                raise StoreError(f"cannot reach the Mooncake metadata server {self.metadata}: start the master with "
                                 f"--enable_http_metadata_server=true --http_metadata_server_port={u.port}, "
                                 "or point metadata= at your etcd/HTTP metadata service")

    # ------------------------------------------------------------------ helpers

    def _where(self) -> str:
        return f"; master {self.master}"

    def _usable(self, scatter: ScatterList) -> np.ndarray:
        """bool per key: may be handed to the client (sizes > 0, memory registered when required)."""
        ok = scatter.object_sizes > 0
        if self.require_registered:
            ok &= self._regions.covered(scatter.addrs, scatter.sizes)
        return ok

    def _move(self, op: str, keys: list[str], sub: ScatterList) -> np.ndarray:
        """One batch call: per-key statuses."""
        multi = sub.addrs.shape[1] > 1
        name = f"batch_{op}_{'from' if op == 'put' else 'into'}" + ("_multi_buffers" if multi else "")
        if multi:
            rc = self._call(name, keys, sub.addrs.tolist(), sub.sizes.tolist())
        else:
            rc = self._call(name, keys, sub.addrs[:, 0].tolist(), sub.sizes[:, 0].tolist())
        return put_status(rc) if op == "put" else get_status(rc, sub.object_sizes)

    def _transfer(self, op: str, keys: list[str], scatter: ScatterList) -> np.ndarray:
        n = len(keys)
        st = np.full(n, base.INVALID_ARGUMENT, np.int32)
        if n == 0:
            return st
        idx = np.flatnonzero(self._usable(scatter))
        if idx.size == 0:
            return st
        sub = scatter if idx.size == n else scatter.take(idx)
        sub_keys = keys if idx.size == n else [keys[i] for i in idx]
        res = np.empty(idx.size, np.int32)
        for lo, hi in _slices(idx.size, sub.addrs.shape[1]):
            part = sub if (lo, hi) == (0, idx.size) else sub.take(slice(lo, hi))
            res[lo:hi] = self._batch_statuses(hi - lo, lambda: self._move(op, sub_keys[lo:hi], part), op)
        st[idx] = res
        self._count(op, st, scatter.object_sizes)
        return st

    # ------------------------------------------------------------------ Store interface

    def register(self, addr: int, length: int, memory: str | None = None) -> None:
        """register_buffer once per region (Mooncake needs no memory kind). A new region overlapping earlier ones means that memory
        was freed and reused (two live allocations cannot overlap): the stale registrations are
        dropped first, since Mooncake refuses overlapping ones (INVALID_PARAMS)."""
        with self._reg_lock:
            if self._regions.covered(np.array([[int(addr)]], np.uint64), np.array([[int(length)]], np.uint64))[0]:
                return  # already registered: once per region
            for start in self._regions.overlapping(addr, length):
                self._unregister_locked(start)
            self._regions.add(addr, length)
            self._register_buffer(addr, length)

    def _unregister_locked(self, start: int) -> None:
        try:
            self._call("unregister_buffer", int(start))
        except (CallTimeout, CallUnavailable) as e:
            log.warning("mooncake unregister_buffer(0x%x): %s", start, e)
        self._regions.remove(start)

    def unregister(self, addr: int) -> None:
        """Forget a region registered at addr (before freeing that memory)."""
        with self._reg_lock:
            if int(addr) in self._regions.overlapping(addr, 1):
                self._unregister_locked(int(addr))

    def open_read(self, keys, object_sizes) -> "MooncakeRead":
        """A get session over ``keys``, read piece by piece (see the module docstring)."""
        return MooncakeRead(self, base.check_keys(keys), object_sizes)

    def _too_large(self, size: int) -> bool:
        # the client copies through its transfer buffer: larger objects fail (-600); TOO_LARGE for
        # this client (raise buffer= to store it)
        return size > self.buffer

    def _empty_get(self, key: str) -> None:
        size = int(self._ask("get_size", key))
        if size < 0 and map_codes([size], _CODES, base.IO_ERROR)[0] == base.NOT_FOUND:
            return None
        why = f"the object has {size} bytes" if size >= 0 else f"get_size: {size}"
        raise StoreError(f"Mooncake get({key[:40]!r}) delivered nothing ({why}; master {self.master})")

    def list_objects(self):
        """Keys from the master's admin server (``admin=``; sizes unknown: None). The client API has no
        listing call."""
        for key in http_key_list(self.admin, f"Mooncake master {self.master} (admin= in the store URL: its "
                                             "--metrics_port)", self._runner.timeout_s or 30.0):
            yield key, None

    def stats(self) -> dict:
        return dict(super().stats(), master=self.master, protocol=self.protocol)


def _slices(n: int, segments: int):
    """(lo, hi) key ranges of batch calls carrying at most MAX_SLICES_PER_CALL segments."""
    step = max(1, MAX_SLICES_PER_CALL // max(1, segments))
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


class MooncakeRead:
    """Piecewise reads in one Mooncake get session (the interface of ``ShmStore.open_read``).

    ``status`` holds each key's state so far (OK until a start or a piece failed);
    ``read(scatter)`` reads the next bytes of the first ``len(scatter)`` keys (one batched
    ranged call); ``end()`` ends the session and returns the final status: OK only for
    keys whose pieces all arrived whole and cover the object. Always call ``end()`` (or
    use it as a context manager). ``narrow(n)`` keeps the first ``n`` keys (a session
    opened at a match, then used by a load of fewer pages).
    """

    def __init__(self, store: MooncakeStore, keys: list[str], object_sizes):
        self._store, self.keys = store, keys
        n = len(keys)
        self._sizes = np.ascontiguousarray(object_sizes, dtype=np.uint64)
        if self._sizes.shape != (n,):
            raise ConfigError(f"open_read: {n} keys but {self._sizes.size} object sizes")
        self._done = np.zeros(n, dtype=np.uint64)  # bytes of each object read so far
        self._final = None
        self._started = False
        self.status = self._start()

    def _start(self) -> np.ndarray:
        if not self.keys:
            return np.zeros(0, np.int32)
        store = self._store
        with store._session_lock:  # registered first: an end elsewhere leaves these keys' session open
            store._session_keys[self] = frozenset(self.keys)  # every key it opens, also after narrow()
        st = store._batch_statuses(len(self.keys), lambda: map_codes(
            store._call("batch_get_session_start", self.keys, on_late=self._end_keys), _GET_CODES,
            base.IO_ERROR), "get session")
        # a call that answered opened a session for these keys (also for keys it found absent)
        self._started = not ((st == base.TIMEOUT) | (st == base.UNAVAILABLE)).all()
        if (st == base.UNAVAILABLE).all():
            self._end_keys()  # not tried; an end that skipped these keys for this session's sake is owed
        # timed out: the abandoned start may still open these keys in the client, so they stay
        # registered and end once it returns (on_late), not now
        return st

    def narrow(self, n: int) -> None:
        """Keep only the first ``n`` keys: ``status``, reads, ``end()``'s result and the read
        counters cover them alone (``narrow(0)``: a session given up unread counts nothing).
        Before any read only."""
        if not 0 <= n <= len(self.keys):
            raise ConfigError(f"open_read: narrow({n}) of a session over {len(self.keys)} keys")
        if self._final is not None or self._done.any():
            raise ConfigError("open_read: narrow() after a read or end()")
        self.keys, self.status = self.keys[:n], self.status[:n]
        self._sizes, self._done = self._sizes[:n], self._done[:n]

    def read(self, scatter: ScatterList) -> None:
        m = len(scatter)
        if m == 0:
            return
        if m > len(self.keys) or (self.status[:m] != base.OK).any():
            raise ConfigError("open_read: read() covers keys that failed or do not exist")
        want = scatter.object_sizes
        usable = self._store._usable(scatter)
        offsets = self._done[:m, None] + (np.cumsum(scatter.sizes, axis=1, dtype=np.uint64) - scatter.sizes)
        idx = np.flatnonzero(usable)
        st = np.full(m, base.INVALID_ARGUMENT, np.int32)
        for lo, hi in _slices(idx.size, scatter.addrs.shape[1]):
            rows = idx[lo:hi]
            sub = scatter.take(rows)
            keys = self.keys[lo:hi] if idx.size == m else list(map(self.keys.__getitem__, rows.tolist()))
            st[rows] = self._store._batch_statuses(hi - lo, lambda: get_status(self._store._call(
                "batch_get_into_multi_buffer_ranges", keys, sub.addrs.tolist(), sub.sizes.tolist(),
                offsets[rows].tolist()), sub.object_sizes), "ranged get")
        self.status[:m] = st
        self._done[:m] += np.where(st == base.OK, want, np.uint64(0))

    def end(self) -> np.ndarray:
        if self._final is None:
            if self._started:
                self._end_keys()  # (a session that did not start was unregistered in _start)
            final = self.status.copy()
            final[(final == base.OK) & (self._done != self._sizes)] = base.IO_ERROR  # not read whole
            self._store._count("get", final, self._sizes)
            self._final = final
        return self._final

    def _end_keys(self) -> None:
        """Unregister this session and end the client's session over its keys that no other
        open session of this store holds (set operations: no Python loop over the keys)."""
        store = self._store
        with store._session_lock:
            mine = store._session_keys.pop(self, frozenset())
            last = mine.difference(*store._session_keys.values())
            if not last:
                return
            try:  # under the lock, so no start slips in between
                store._call_local("batch_get_session_end", list(last))
            except (CallTimeout, CallUnavailable, RuntimeError) as e:  # the reads are over either way
                log.warning("mooncake batch_get_session_end: %s", e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.end()


def open_url(u: StoreURL) -> MooncakeStore:
    """``mooncake://MASTER:PORT?metadata=...&protocol=tcp&segment=4GiB&buffer=128MiB&local=...&device=&timeout=5``"""
    if not u.host or not u.port:
        raise ConfigError(f"Mooncake URL needs the master as HOST:PORT: mooncake://127.0.0.1:50051?metadata=..., "
                          f"got {u.raw!r}")
    metadata = u.pop("metadata")
    if not metadata:
        raise ConfigError(f"Mooncake URL needs metadata=http://HOST:PORT/metadata (or an etcd address), got {u.raw!r}")
    protocol = u.pop("protocol", "tcp") or "tcp"
    if protocol not in ("tcp", "rdma"):
        raise ConfigError(f"Mooncake protocol must be tcp or rdma, got {protocol!r}")
    try:
        timeout_s = float(u.pop("timeout", "5"))
        workers = int(u.pop("workers", "4"))
    except ValueError as e:
        raise ConfigError(f"bad number in {u.raw!r}: {e}") from None
    kw = dict(protocol=protocol, segment=parse_size(u.pop("segment", "4GiB")),
              buffer=parse_size(u.pop("buffer", "128MiB")), local=u.pop("local", "127.0.0.1") or "127.0.0.1",
              device=u.pop("device", "") or "", timeout_s=timeout_s, workers=workers,
              require_registered=url_flag(u, "require_registered", None),
              device_memory=url_flag(u, "device_memory", False), check=url_flag(u, "check", True),
              admin=u.pop("admin", None) or None)
    if kw["admin"] and not kw["admin"].startswith(("http://", "https://")):
        raise ConfigError(f"admin={kw['admin']!r} in {u.raw!r}: the master's admin server as http://HOST:PORT")
    u.reject_unknown()
    return MooncakeStore(f"{u.host}:{u.port}", metadata, **kw)
