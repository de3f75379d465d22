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
from kvdirect.stores._remote import (CallTimeout, CallUnavailable, DeadlineRunner, Regions, check_batch,
                                     http_key_list, map_codes, tcp_reachable)
from kvdirect.stores.base import ScatterList, Store
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
_GET_CODES = {**_CODES, MC_OBJECT_ALREADY_EXISTS: base.IO_ERROR}


def import_client():
    """The MooncakeDistributedStore class, or StoreError naming what is missing and the command that fixes it
    (the pip extra when the package is absent; the Debian packages when a system library is)."""
    ci = runtime.client_import("mooncake.store")
    if ci.state == "not_installed":
        raise StoreError(f"Mooncake client not installed: {INSTALL_HINT}")
    if ci.state != "ok":
        raise StoreError(f"Mooncake client not importable: {ci.message}")
    from mooncake.store import MooncakeDistributedStore

    return MooncakeDistributedStore


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


class MooncakeStore(Store):
    """Mooncake Store client behind kvdirect's Store interface (see the module docstring)."""

    scheme = "mooncake"

    def __init__(self, master: str, metadata: str, *, protocol: str = "tcp", segment: int = 4 << 30,
                 buffer: int = 128 << 20, local: str = "127.0.0.1", device: str = "", timeout_s: float = 5.0,
                 workers: int = 4, require_registered: bool | None = None, device_memory: bool = False,
                 check: bool = True, client=None, admin: str | None = None):
        self.master, self.metadata, self.protocol = master, metadata, protocol
        self.admin = admin or f"http://{master.rpartition(':')[0]}:{DEFAULT_ADMIN_PORT}"
        self.segment, self.buffer, self.local, self.device = int(segment), int(buffer), local, device
        self.require_registered = (protocol != "tcp") if require_registered is None else bool(require_registered)
        self.supports_device_memory = bool(device_memory)
        self._runner = DeadlineRunner(timeout_s, workers, "kvd-mooncake")
        self._regions = Regions()
        self._reg_lock = threading.Lock()
        self._closed = False
        self._counts = {"put_keys": 0, "put_ok": 0, "get_keys": 0, "get_ok": 0, "put_bytes": 0, "get_bytes": 0,
                        "exists_calls": 0, "failed_by_status": {}}
        self._owns_client = client is None
        if client is not None:  # an already set-up client (tests, or a caller sharing one): not closed by us
            self._client = client
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

    def _call(self, name: str, *args, **kwargs):
        if self._closed:
            raise CallUnavailable("store is closed")
        return self._runner.call(getattr(self._client, name), *args, **kwargs)

    def _count_failures(self, st: np.ndarray) -> None:
        bad = st[st != base.OK]
        if bad.size:
            d = self._counts["failed_by_status"]
            for code, n in zip(*np.unique(bad, return_counts=True)):
                d[int(code)] = d.get(int(code), 0) + int(n)

    def _usable(self, scatter: ScatterList) -> np.ndarray:
        """bool per key: may be handed to the client (sizes > 0, memory registered when required)."""
        ok = scatter.object_sizes > 0
        if self.require_registered:
            ok &= self._regions.covered(scatter.addrs, scatter.sizes)
        return ok

    def _transfer(self, op: str, keys: list[str], scatter: ScatterList) -> np.ndarray:
        n = len(keys)
        st = np.full(n, base.INVALID_ARGUMENT, np.int32)
        if n == 0:
            return st
        usable = self._usable(scatter)
        idx = np.flatnonzero(usable)
        if idx.size == 0:
            return st
        sub = scatter if idx.size == n else scatter.take(idx)
        sub_keys = keys if idx.size == n else [keys[i] for i in idx]
        single = sub.addrs.shape[1] == 1
        try:
            if op == "put":
                if single:
                    rc = self._call("batch_put_from", sub_keys, sub.addrs[:, 0].tolist(), sub.sizes[:, 0].tolist())
                else:
                    rc = self._call("batch_put_from_multi_buffers", sub_keys, sub.addrs.tolist(), sub.sizes.tolist())
                res = put_status(rc)
            else:
                if single:
                    rc = self._call("batch_get_into", sub_keys, sub.addrs[:, 0].tolist(), sub.sizes[:, 0].tolist())
                else:
                    rc = self._call("batch_get_into_multi_buffers", sub_keys, sub.addrs.tolist(), sub.sizes.tolist())
                res = get_status(rc, sub.object_sizes)
            if len(res) != idx.size:  # a client that returns the wrong count: trust none of it
                res = np.full(idx.size, base.IO_ERROR, np.int32)
        except CallTimeout:
            res = np.full(idx.size, base.TIMEOUT, np.int32)
        except CallUnavailable:
            res = np.full(idx.size, base.UNAVAILABLE, np.int32)
        except RuntimeError as e:  # pybind11-translated C++ exception inside the client
            log.warning("mooncake %s raised %s", op, e)
            res = np.full(idx.size, base.IO_ERROR, np.int32)
        st[idx] = res
        ok = st == base.OK
        nbytes = int(scatter.object_sizes[ok].sum())
        self._counts[f"{op}_keys"] += n
        self._counts[f"{op}_ok"] += int(ok.sum())
        self._counts[f"{op}_bytes"] += nbytes
        self._count_failures(st)
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
            try:
                rc = self._call("register_buffer", int(addr), int(length))
            except (CallTimeout, CallUnavailable) as e:
                rc = f"no answer ({e})"
            if rc != 0:
                self._regions.remove(addr)  # so that a retry re-registers
                raise StoreError(f"Mooncake register_buffer(0x{int(addr):x}, {int(length)}) failed: {rc}")

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

    def _ask(self, name: str, *args):
        """A control-plane call whose answer the caller needs: StoreError when there is none."""
        try:
            return self._call(name, *args)
        except (CallTimeout, CallUnavailable, RuntimeError) as e:
            raise StoreError(f"Mooncake {name} did not answer (master {self.master}): {e}") from None

    def _failed(self, name: str, keys: list[str], rc: np.ndarray, bad: np.ndarray) -> StoreError:
        codes = ", ".join(f"{int(c)} ({base.status_name(map_codes([c], _CODES, base.IO_ERROR)[0])})"
                          for c in np.unique(rc[bad])[:4])
        return StoreError(f"Mooncake {name} failed for {int(bad.sum())} of {len(keys)} keys (first "
                          f"{keys[int(np.flatnonzero(bad)[0])][:40]!r}; Mooncake codes {codes}; master {self.master})")

    def exists(self, keys) -> np.ndarray:
        keys = base.check_keys(keys)
        if not keys:
            return np.zeros(0, bool)
        self._counts["exists_calls"] += 1
        # no answer, or an error answer for any key (-900 when the master is gone): StoreError, so the
        # cache counts misses and backs off; "absent" would be a guess
        rc = np.asarray(self._ask("batch_is_exist", keys), np.int64)
        if rc.shape != (len(keys),):
            raise StoreError(f"Mooncake batch_is_exist answered {rc.size} results for {len(keys)} keys")
        bad = (rc != 0) & (rc != 1)
        if bad.any():
            raise self._failed("batch_is_exist", keys, rc, bad)
        return rc == 1

    def put(self, keys, scatter: ScatterList) -> np.ndarray:
        keys, scatter = check_batch(keys, scatter)
        return self._transfer("put", keys, scatter)

    def get(self, keys, scatter: ScatterList) -> np.ndarray:
        keys, scatter = check_batch(keys, scatter)
        return self._transfer("get", keys, scatter)

    def remove(self, keys) -> int:
        keys = base.check_keys(keys)
        if not keys:
            return 0
        rc = np.asarray(self._ask("batch_remove", keys), np.int64)
        if rc.shape != (len(keys),):
            raise StoreError(f"Mooncake batch_remove answered {rc.size} results for {len(keys)} keys")
        st = map_codes(rc, _CODES, base.IO_ERROR)
        bad = (st != base.OK) & (st != base.NOT_FOUND)  # e.g. -706 OBJECT_HAS_LEASE: read recently, still there
        if bad.any():
            raise self._failed("batch_remove", keys, rc, bad)
        return int((st == base.OK).sum())

    def put_bytes(self, key: str, data: bytes) -> bool:
        key, size = base.check_object(key, data)
        if size > self.buffer:  # the client copies through its transfer buffer: larger objects fail (-600)
            return False        # TOO_LARGE for this client (raise buffer= to store it)
        rc = self._ask("put", key, data if isinstance(data, bytes) else bytes(data))
        st = int(put_status([rc])[0])
        if st == base.OK or st in base.NO_ROOM:
            return st == base.OK
        raise StoreError(f"Mooncake put({key[:40]!r}) failed: {rc} ({base.status_name(st)}; master {self.master})")

    def get_bytes(self, key: str) -> bytes | None:
        (key,) = base.check_keys([key])
        data = self._ask("get", key)
        if data:
            return bytes(data)
        # b"" is Mooncake's answer for "absent" and for every failure (objects are never empty): ask the size
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
        d = dict(self._counts, failed_by_status=dict(self._counts["failed_by_status"]))
        d.update(scheme=self.scheme, master=self.master, protocol=self.protocol, registered_regions=len(self._regions),
                 timeouts=self._runner.timeouts, refused_calls=self._runner.refused,
                 abandoned_calls=self._runner.abandoned)
        return d

    def quiesce(self, timeout_s: float | None = None) -> bool:
        """Wait until calls that timed out have returned (their destination memory is no longer written)."""
        return self._runner.quiesce(timeout_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        client = getattr(self, "_client", None)
        if client is not None and self._owns_client and self._runner.abandoned == 0:
            try:
                self._runner.call(client.close)
            except (CallTimeout, CallUnavailable, RuntimeError) as e:
                log.warning("mooncake close: %s", e)
        self._runner.shutdown()


def _flag(u: StoreURL, name: str, default):
    v = u.pop(name, None)
    if v is None or v == "":
        return default
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={v!r} in {u.raw!r}: use 0 or 1")


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
              require_registered=_flag(u, "require_registered", None),
              device_memory=_flag(u, "device_memory", False), check=_flag(u, "check", True),
              admin=u.pop("admin", None) or None)
    if kw["admin"] and not kw["admin"].startswith(("http://", "https://")):
        raise ConfigError(f"admin={kw['admin']!r} in {u.raw!r}: the master's admin server as http://HOST:PORT")
    u.reject_unknown()
    return MooncakeStore(f"{u.host}:{u.port}", metadata, **kw)
