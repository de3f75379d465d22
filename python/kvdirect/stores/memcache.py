"""Ascend MemCache adapter: kvdirect's Store interface over ``memcache_hybrid.DistributedObjectStore``.

URL::

    memcache://?config=/path/mmc-local.conf&device=0&protocol=device_sdma&memory=device

``config`` is a MemCache client config (``ock.mmc.*`` lines); any LocalConfig field
can also be given (or overridden) as a parameter: ``meta_service_url``,
``config_store_url``, ``protocol``, ``world_size``, ``dram_size``, ``hbm_size``,
``log_level`` ... Other parameters: ``device`` (device id passed to ``init``),
``memory`` (``device``: KV pages in NPU memory, copied with L2G / G2L;
``host``: host memory, H2G / G2H), ``timeout`` (seconds per call, default 30),
``init_timeout`` (default 120), ``verify`` (0/1, default 1: check each object's
stored size with ``batch_get_key_info`` before a get), ``check`` (0/1: probe the
MetaService before init), ``admin`` (the MetaService's HTTP server, its
``ock.mmc.meta_service.metrics_url``): ``list_objects`` (operator tools,
``kvdirect pool audit``) reads the key list there (``/get_all_keys``). Checked on
these machines against a real MetaService with no client attached (the client
needs CANN), i.e. with an empty key list only.

Semantics: ``batch_put_from_layers`` / ``batch_get_into_layers`` return one int
per key, 0 = done, anything else failed (MemCache already reports a duplicate
put as 0). ``batch_is_exist`` returns 1 / 0 / negative error: an error for any
key, or no answer within the deadline, makes ``exists`` raise StoreError (the
store contract in ``kvdirect.stores.base``: never "absent" for "unknown"); so do
failed ``remove_batch`` entries (other than "not found"), ``put`` errors other
than no room, and a ``get`` that delivers nothing for a key ``is_exist`` reports
present. A get is used only if the key's stored size equals its scatter list's
total (``verify``).
Limits enforced per call: at most 512 keys (batches are split), 255 segments
per key (more: TOO_LARGE), keys under 256 bytes.

``register(addr, length, memory=None)`` registers a region once; ``memory``
tags it ``device`` or ``host`` so keys whose segments all lie in host regions
use H2G / G2H even when the store's default is device memory (a staging buffer
next to an NPU KV pool).

If the client cannot start (no Ascend driver / CANN, MetaService down) opening
raises :class:`kvdirect.errors.StoreError`; KVDirectCache catches StoreError at
open and runs without a pool.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np

from kvdirect import runtime
from kvdirect.errors import ConfigError, StoreError
from kvdirect.stores import base
from kvdirect.stores._remote import (CallTimeout, CallUnavailable, DeadlineRunner, Regions, check_batch,
                                     http_key_list, map_codes, tcp_reachable)
from kvdirect.stores.base import ScatterList, Store
from kvdirect.stores.url import StoreURL

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "kvdirect[memcache]" (memcache-hybrid, which pulls memfabric-hybrid)'

#: copy directions, used when the module does not export them (values of memcache_hybrid 1.3.0)
DIRECTIONS_FALLBACK = {"L2G": 0, "G2L": 1, "G2H": 2, "H2G": 3, "AUTO": 9}
MAX_BATCH_KEYS = 512
MAX_SEGMENTS = 255
MEMORY_KINDS = ("device", "host")
_DEVICE, _HOST = 0, 1

# MmcErrorCode (memfabric_hybrid mmc_types.h) -> kvdirect status
_CODES = {
    0: base.OK,
    -1: base.IO_ERROR,
    -3000: base.INVALID_ARGUMENT,  # MMC_INVALID_PARAM (also: wrong direction, too many keys/segments)
    -3001: base.NO_SPACE,          # MALLOC_FAILED
    -3003: base.UNAVAILABLE,       # NOT_STARTED
    -3004: base.TIMEOUT,
    -3006: base.OK,                # DUPLICATED_OBJECT (put: the pool already holds it)
    -3007: base.NOT_FOUND,         # OBJECT_NOT_EXISTS
    -3008: base.UNAVAILABLE,       # NOT_INITIALIZED
    -3013: base.NO_SPACE,          # EXCEED_CAPACITY
    -3016: base.NO_SPACE,          # NOT_ENOUGH_MEMORY
    -3017: base.UNAVAILABLE,       # NOT_CONNET_META
    -3018: base.UNAVAILABLE,       # NOT_CONNET_LOCAL
    -3019: base.UNAVAILABLE,       # CLIENT_NOT_INIT
    -3102: base.NOT_FOUND,         # UNMATCHED_KEY
    -3104: base.BUSY,              # LEASE_NOT_EXPIRED
    -3106: base.IO_ERROR,          # LEASE_EXPIRED
}
_GET_CODES = {**_CODES, -3006: base.IO_ERROR}


def import_module():
    ci = runtime.client_import("memcache_hybrid")
    if ci.state == "not_installed":
        raise StoreError(f"MemCache client not installed. Install it: {INSTALL_HINT}")
    if ci.state != "ok":
        raise StoreError(f"MemCache client not importable: {ci.message}")
    import memcache_hybrid

    return memcache_hybrid


def directions(module) -> dict[str, int]:
    """Direction codes from the module (``memcache_hybrid.L2G`` ...), the 1.3.0 values as fallback."""
    out = {}
    for name, fallback in DIRECTIONS_FALLBACK.items():
        v = getattr(module, name, None)
        try:
            out[name] = int(v) if v is not None else fallback
        except (TypeError, ValueError):
            out[name] = int(getattr(v, "value", fallback))
    return out


def status(rc, get: bool = False) -> np.ndarray:
    """Per-key kvdirect status from a put/get result list (0 = done)."""
    return map_codes(rc, _GET_CODES if get else _CODES, base.IO_ERROR)


def read_conf(path) -> dict[str, str]:
    """MemCache ``ock.mmc.*`` config -> LocalConfig field names (``ock.mmc.local_service.dram.size`` -> ``dram_size``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"MemCache config {p} does not exist")
    out = {}
    for line in p.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" not in line:
            continue
        k, v = (x.strip() for x in line.split("=", 1))
        for prefix in ("ock.mmc.local_service.", "ock.mmc."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k.replace(".", "_")] = v
    return out


def build_local_config(module, fields: dict[str, str]):
    """A LocalConfig with the given fields set (types follow the defaults); unknown fields are an error."""
    lc = module.LocalConfig()
    for k, v in fields.items():
        if not hasattr(lc, k) or k == "str":
            raise ConfigError(f"unknown MemCache LocalConfig field {k!r}")
        cur = getattr(lc, k)
        try:
            if isinstance(cur, bool):
                val = str(v).lower() in ("1", "true", "yes", "on")
            elif isinstance(cur, int):
                val = int(v)
            else:
                val = str(v)
        except ValueError:
            raise ConfigError(f"MemCache LocalConfig field {k}={v!r}: expected {type(cur).__name__}") from None
        setattr(lc, k, val)
    return lc


def _ascend_diagnosis() -> str:
    home = os.environ.get("ASCEND_HOME_PATH")
    drv = [p for p in ("/usr/local/Ascend/driver/version.info", "/etc/ascend_install.info") if os.path.exists(p)]
    acl = None
    if home:
        for cand in ("lib64/libascendcl.so", "runtime/lib64/libascendcl.so"):
            if os.path.exists(os.path.join(home, cand)):
                acl = os.path.join(home, cand)
    return (f"ASCEND_HOME_PATH={home or '(unset)'}, libascendcl.so {'at ' + acl if acl else 'not found'}, "
            f"Ascend driver info {'at ' + drv[0] if drv else 'not found'}")


class MemcacheStore(Store):
    """MemCache client behind kvdirect's Store interface (see the module docstring)."""

    scheme = "memcache"

    def __init__(self, fields: dict | None = None, *, device_id: int = 0, memory: str = "device",
                 timeout_s: float = 30.0, init_timeout_s: float = 120.0, verify_size: bool = True, workers: int = 4,
                 check: bool = True, client=None, module=None, admin: str | None = None):
        if memory not in MEMORY_KINDS:
            raise ConfigError(f"memory must be one of {MEMORY_KINDS}, got {memory!r}")
        self.memory, self.device_id, self.verify_size = memory, int(device_id), bool(verify_size)
        self.admin = admin
        self.supports_device_memory = memory == "device"
        self._module = module if module is not None else import_module()
        self.dir = directions(self._module)
        self._runner = DeadlineRunner(timeout_s, workers, "kvd-memcache")
        self._regions = Regions()
        self._reg_lock = threading.Lock()
        self._closed = False
        self._counts = {"put_keys": 0, "put_ok": 0, "get_keys": 0, "get_ok": 0, "put_bytes": 0, "get_bytes": 0,
                        "failed_by_status": {}}
        self._owns_client = client is None
        if client is not None:
            self._client = client
            return
        fields = dict(fields or {})
        lc = build_local_config(self._module, fields)
        meta = getattr(lc, "meta_service_url", "")
        if check and meta.startswith("tcp://"):
            host, _, port = meta[len("tcp://"):].rpartition(":")
            if not tcp_reachable(host, int(port)):
                raise StoreError(f"cannot reach the MemCache MetaService at {meta}: start one with "
                                 f"`kvdirect memcache meta --url {meta}` (or your deployment's meta service)")
        self._client = self._module.DistributedObjectStore()
        rc = self._client.setup(lc)
        if rc != 0:
            raise StoreError(f"MemCache setup(LocalConfig) failed (rc={rc}); config: {fields}")
        try:
            rc = self._runner.call(self._client.init, self.device_id, timeout_s=init_timeout_s)
        except (CallTimeout, CallUnavailable) as e:
            rc = f"no answer within {init_timeout_s:g}s ({e})"
        if rc != 0:
            raise StoreError(
                f"MemCache client init(device {self.device_id}) failed (rc={rc}): the MemCache client needs the "
                f"Ascend NPU driver and CANN (ASCEND_HOME_PATH pointing at a CANN toolkit with libascendcl.so; "
                f"`source /usr/local/Ascend/ascend-toolkit/set_env.sh`) and a reachable MetaService at {meta} "
                f"(protocol {getattr(lc, 'protocol', '?')}). Found: {_ascend_diagnosis()}. "
                "kvdirect runs without the pool when the store cannot be opened.")

    # ------------------------------------------------------------------ helpers

    def _call(self, name: str, *args):
        if self._closed:
            raise CallUnavailable("store is closed")
        return self._runner.call(getattr(self._client, name), *args)

    def _kinds(self, scatter: ScatterList) -> np.ndarray:
        default = _DEVICE if self.memory == "device" else _HOST
        return self._regions.tags(scatter.addrs, scatter.sizes, default)

    def _batched(self, name: str, keys: list[str], scatter: ScatterList, direction: int, get: bool) -> np.ndarray:
        """One client call per <= 512 keys; per-key statuses."""
        out = np.empty(len(keys), np.int32)
        for lo in range(0, len(keys), MAX_BATCH_KEYS):
            hi = min(lo + MAX_BATCH_KEYS, len(keys))
            try:
                rc = self._call(name, keys[lo:hi], scatter.addrs[lo:hi].tolist(), scatter.sizes[lo:hi].tolist(),
                                direction)
                st = status(rc, get=get)
                if st.shape != (hi - lo,):
                    st = np.full(hi - lo, base.IO_ERROR, np.int32)
            except CallTimeout:
                st = np.full(hi - lo, base.TIMEOUT, np.int32)
            except CallUnavailable:
                st = np.full(hi - lo, base.UNAVAILABLE, np.int32)
            except (RuntimeError, ValueError) as e:  # C++ exception (e.g. std::invalid_argument)
                log.warning("memcache %s raised %s", name, e)
                st = np.full(hi - lo, base.IO_ERROR, np.int32)
            out[lo:hi] = st
        return out

    def _stored_sizes(self, keys: list[str]) -> np.ndarray | None:
        """Stored object sizes (0 = absent) from batch_get_key_info; None if the query failed."""
        sizes = np.empty(len(keys), np.int64)
        for lo in range(0, len(keys), MAX_BATCH_KEYS):
            hi = min(lo + MAX_BATCH_KEYS, len(keys))
            try:
                infos = self._call("batch_get_key_info", keys[lo:hi])
            except (CallTimeout, CallUnavailable, RuntimeError):
                return None
            if len(infos) != hi - lo:
                return None
            sizes[lo:hi] = [int(i.size()) for i in infos]
        return sizes

    def _transfer(self, op: str, keys: list[str], scatter: ScatterList) -> np.ndarray:
        n = len(keys)
        st = np.full(n, base.INVALID_ARGUMENT, np.int32)
        if n == 0:
            return st
        want = scatter.object_sizes
        todo = want > 0
        if scatter.addrs.shape[1] > MAX_SEGMENTS:
            st[:] = base.TOO_LARGE
            todo[:] = False
        if op == "get" and self.verify_size and todo.any():
            idx = np.flatnonzero(todo)
            stored = self._stored_sizes([keys[i] for i in idx])
            if stored is None:
                st[idx] = base.UNAVAILABLE
                todo[:] = False
            else:
                match = stored == want[idx].astype(np.int64)
                st[idx[stored == 0]] = base.NOT_FOUND
                st[idx[(stored != 0) & ~match]] = base.CORRUPT  # another layout's object: never read it
                todo[idx[~match]] = False
        kinds = self._kinds(scatter)
        for kind in (_DEVICE, _HOST):
            idx = np.flatnonzero(todo & (kinds == kind))
            if idx.size == 0:
                continue
            if op == "put":
                d = self.dir["L2G"] if kind == _DEVICE else self.dir["H2G"]
                res = self._batched("batch_put_from_layers", [keys[i] for i in idx], scatter.take(idx), d, False)
            else:
                d = self.dir["G2L"] if kind == _DEVICE else self.dir["G2H"]
                res = self._batched("batch_get_into_layers", [keys[i] for i in idx], scatter.take(idx), d, True)
            st[idx] = res
        ok = st == base.OK
        self._counts[f"{op}_keys"] += n
        self._counts[f"{op}_ok"] += int(ok.sum())
        self._counts[f"{op}_bytes"] += int(want[ok].sum())
        bad = st[~ok]
        if bad.size:
            d = self._counts["failed_by_status"]
            for code, cnt in zip(*np.unique(bad, return_counts=True)):
                d[int(code)] = d.get(int(code), 0) + int(cnt)
        return st

    # ------------------------------------------------------------------ Store interface

    def register(self, addr: int, length: int, memory: str | None = None) -> None:
        memory = memory or self.memory
        if memory not in MEMORY_KINDS:
            raise ConfigError(f"memory must be one of {MEMORY_KINDS}, got {memory!r}")
        with self._reg_lock:
            if not self._regions.add(addr, length, _DEVICE if memory == "device" else _HOST):
                return
            try:
                rc = self._call("register_buffer", int(addr), int(length))
            except (CallTimeout, CallUnavailable) as e:
                rc = f"no answer ({e})"
            if rc != 0:
                self._regions.remove(addr)
                raise StoreError(f"MemCache register_buffer(0x{int(addr):x}, {int(length)}) failed: {rc}")

    def _ask(self, name: str, *args):
        """A call whose answer the caller needs: StoreError when there is none."""
        try:
            return self._call(name, *args)
        except (CallTimeout, CallUnavailable, RuntimeError, ValueError) as e:
            raise StoreError(f"MemCache {name} did not answer: {e}") from None

    @staticmethod
    def _failed(name: str, keys: list[str], rc: np.ndarray, bad: np.ndarray) -> StoreError:
        codes = ", ".join(f"{int(c)} ({base.status_name(status([c])[0])})" for c in np.unique(rc[bad])[:4])
        return StoreError(f"MemCache {name} failed for {int(bad.sum())} of {len(keys)} keys (first "
                          f"{keys[int(np.flatnonzero(bad)[0])][:40]!r}; MemCache codes {codes})")

    def exists(self, keys) -> np.ndarray:
        keys = base.check_keys(keys)
        out = np.zeros(len(keys), bool)
        for lo in range(0, len(keys), MAX_BATCH_KEYS):
            hi = min(lo + MAX_BATCH_KEYS, len(keys))
            # 1 present, 0 absent, negative: the pool could not answer for that key -> StoreError
            # (the cache counts misses and backs off; "absent" would be a guess)
            rc = np.asarray(self._ask("batch_is_exist", keys[lo:hi]), np.int64)
            if rc.shape != (hi - lo,):
                raise StoreError(f"MemCache batch_is_exist answered {rc.size} results for {hi - lo} keys")
            bad = (rc != 0) & (rc != 1)
            if bad.any():
                raise self._failed("batch_is_exist", keys[lo:hi], rc, bad)
            out[lo:hi] = rc == 1
        return out

    def put(self, keys, scatter: ScatterList) -> np.ndarray:
        keys, scatter = check_batch(keys, scatter)
        return self._transfer("put", keys, scatter)

    def get(self, keys, scatter: ScatterList) -> np.ndarray:
        keys, scatter = check_batch(keys, scatter)
        return self._transfer("get", keys, scatter)

    def remove(self, keys) -> int:
        keys = base.check_keys(keys)
        n = 0
        for lo in range(0, len(keys), MAX_BATCH_KEYS):
            part = keys[lo:lo + MAX_BATCH_KEYS]
            rc = np.asarray(self._ask("remove_batch", part), np.int64)
            if rc.shape != (len(part),):
                raise StoreError(f"MemCache remove_batch answered {rc.size} results for {len(part)} keys")
            st = status(rc)
            bad = (st != base.OK) & (st != base.NOT_FOUND)
            if bad.any():
                raise self._failed("remove_batch", part, rc, bad)
            n += int((st == base.OK).sum())
        return n

    def put_bytes(self, key: str, data: bytes) -> bool:
        key, _ = base.check_object(key, data)
        rc = self._ask("put", key, data if isinstance(data, bytes) else bytes(data))
        st = int(status([rc])[0])
        if st == base.OK or st in base.NO_ROOM:
            return st == base.OK
        raise StoreError(f"MemCache put({key[:40]!r}) failed: {rc} ({base.status_name(st)})")

    def get_bytes(self, key: str) -> bytes | None:
        (key,) = base.check_keys([key])
        data = bytes(self._ask("get", key))
        if data:
            return data
        # b"" is the client's answer for "absent" and for a failed read (objects are never empty)
        rc = int(self._ask("is_exist", key))
        if rc == 0:
            return None
        why = "the key exists" if rc == 1 else f"is_exist: {rc} ({base.status_name(status([rc])[0])})"
        raise StoreError(f"MemCache get({key[:40]!r}) delivered nothing ({why})")

    def list_objects(self):
        """Keys from the MetaService's HTTP server (``admin=``; sizes unknown: None)."""
        if not self.admin:
            raise StoreError("MemCache clients cannot list keys: give admin=http://HOST:PORT (the MetaService's "
                             "ock.mmc.meta_service.metrics_url) in the store URL")
        for key in http_key_list(self.admin, "MemCache MetaService", self._runner.timeout_s or 30.0):
            yield key, None

    def stats(self) -> dict:
        d = dict(self._counts, failed_by_status=dict(self._counts["failed_by_status"]))
        d.update(scheme=self.scheme, memory=self.memory, device_id=self.device_id,
                 registered_regions=len(self._regions), timeouts=self._runner.timeouts,
                 refused_calls=self._runner.refused, abandoned_calls=self._runner.abandoned)
        return d

    def quiesce(self, timeout_s: float | None = None) -> bool:
        return self._runner.quiesce(timeout_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_client and self._runner.abandoned == 0:
            try:
                self._runner.call(self._client.close)
            except (CallTimeout, CallUnavailable, RuntimeError) as e:
                log.warning("memcache close: %s", e)
        self._runner.shutdown()


def _num(u: StoreURL, name: str, default, kind=float):
    v = u.pop(name, None)
    if v is None or v == "":
        return default
    try:
        return kind(v)
    except ValueError:
        raise ConfigError(f"{name}={v!r} in {u.raw!r}: expected a number") from None


def _flag(u: StoreURL, name: str, default: bool) -> bool:
    v = u.pop(name, None)
    if v is None or v == "":
        return default
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={v!r} in {u.raw!r}: use 0 or 1")


def parse(u: StoreURL) -> tuple[dict, dict]:
    """(LocalConfig fields, MemcacheStore keyword arguments) from a memcache:// URL."""
    fields = {}
    conf = u.pop("config")
    if conf:
        fields.update(read_conf(conf))
    kw = dict(device_id=_num(u, "device", 0, int), memory=u.pop("memory", "device") or "device",
              timeout_s=_num(u, "timeout", 30.0), init_timeout_s=_num(u, "init_timeout", 120.0),
              verify_size=_flag(u, "verify", True), workers=_num(u, "workers", 4, int), check=_flag(u, "check", True),
              admin=u.pop("admin", None) or None)
    if kw["admin"] and not kw["admin"].startswith(("http://", "https://")):
        raise ConfigError(f"admin={kw['admin']!r} in {u.raw!r}: the MetaService's HTTP server as http://HOST:PORT")
    if kw["memory"] not in MEMORY_KINDS:
        raise ConfigError(f"memory={kw['memory']!r} in {u.raw!r}: use device or host")
    fields.update(u.params)  # the rest are LocalConfig fields (checked against the real class at open)
    u.params.clear()
    if not fields.get("meta_service_url"):
        raise ConfigError(f"MemCache URL {u.raw!r} names no MetaService: give config=/path/mmc-local.conf "
                          "or meta_service_url=tcp://HOST:PORT")
    return fields, kw


def open_url(u: StoreURL) -> MemcacheStore:
    """``memcache://?config=/path/mmc-local.conf&device=0&protocol=device_sdma&memory=device``"""
    fields, kw = parse(u)
    return MemcacheStore(fields, **kw)
