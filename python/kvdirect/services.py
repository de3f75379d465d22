"""Start and stop the external services kvdirect's distributed stores talk to.

* :func:`start_mooncake_master` runs ``mooncake_master`` (shipped in the
  ``mooncake-transfer-engine`` wheel) on loopback with its HTTP metadata server,
  on free ports, and returns a :class:`Service` whose ``store_url`` opens it.
* :func:`start_memcache_meta` runs MemCache's ``MetaService`` in its own Python
  process (``MetaService.main()`` blocks), writing a ``meta.conf`` for it.

Both are used by the tests, the benchmarks and ``kvdirect memcache meta``. A
service is always stopped by its own pid (SIGTERM, then SIGKILL), never by name.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from kvdirect.errors import ConfigError, StoreError

_HERE_HOST = "127.0.0.1"


def free_port(host: str = _HERE_HOST) -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = _HERE_HOST) -> list[int]:
    """``n`` distinct free ports (all sockets held open while choosing)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> bool:
    """True once something accepts TCP connections on host:port; False on timeout or if proc died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass
class Service:
    """A child process kvdirect started; ``stop()`` ends it by pid."""

    name: str
    proc: subprocess.Popen
    host: str
    ports: dict[str, int]
    log_path: Path
    store_url: str = ""
    workdir: Path | None = None
    config_path: Path | None = None
    _own_workdir: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM the process (its own group, so helpers it spawned go too), SIGKILL after timeout_s."""
        if self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)  # the child leads its own group (start_new_session)
                except ProcessLookupError:
                    break
                except PermissionError:
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL at once (fault-injection tests)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _workdir(workdir, prefix: str) -> tuple[Path, bool]:
    if workdir is not None:
        p = Path(workdir)
        p.mkdir(parents=True, exist_ok=True)
        return p, False
    return Path(tempfile.mkdtemp(prefix=prefix)), True


def _spawn(argv: list[str], log_path: Path, env: dict | None, cwd: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(cwd), start_new_session=True)
    finally:
        log.close()


# ----------------------------------------------------------------------------- Mooncake


def find_mooncake_master() -> str | None:
    """Path of the ``mooncake_master`` binary: PATH, then this interpreter's scripts dir."""
    exe = shutil.which("mooncake_master")
    if exe:
        return exe
    cand = Path(sysconfig.get_path("scripts")) / "mooncake_master"
    return str(cand) if cand.exists() else None


def mooncake_store_url(host: str, rpc_port: int, http_port: int, *, protocol: str = "tcp",
                       segment: str = "256MiB", buffer: str = "64MiB", local: str = _HERE_HOST,
                       timeout: float = 5.0, admin: str | None = None) -> str:
    return (f"mooncake://{host}:{rpc_port}?metadata=http://{host}:{http_port}/metadata"
            f"&protocol={protocol}&segment={segment}&buffer={buffer}&local={local}&timeout={timeout:g}"
            + (f"&admin={admin}" if admin else ""))


def start_mooncake_master(*, host: str = _HERE_HOST, rpc_port: int | None = None, http_port: int | None = None,
                          metrics_port: int | None = None, extra_args: list[str] = (), workdir=None,
                          ready_timeout_s: float = 20.0, store_params: dict | None = None) -> Service:
    """Run ``mooncake_master`` on loopback with the HTTP metadata server; wait until both ports accept.

    Ports default to free ones. ``store_params`` are passed to :func:`mooncake_store_url`
    to build ``Service.store_url``. Raises StoreError (with the log tail) if it does not come up.
    """
    exe = find_mooncake_master()
    if exe is None:
        raise StoreError("mooncake_master not found: pip install \"kvdirect[mooncake]\" "
                         "(the mooncake-transfer-engine wheel ships it)")
    want = [p for p in (rpc_port, http_port, metrics_port) if p is None]
    picked = iter(free_ports(len(want), host))
    rpc_port = rpc_port or next(picked)
    http_port = http_port or next(picked)
    metrics_port = metrics_port or next(picked)
    wd, own = _workdir(workdir, "kvd-mooncake-")
    log_path = wd / "mooncake_master.log"
    argv = [exe, f"--rpc_port={rpc_port}", f"--rpc_address={host}",
            "--enable_http_metadata_server=true", f"--http_metadata_server_host={host}",
            f"--http_metadata_server_port={http_port}", f"--metrics_host={host}",
            f"--metrics_port={metrics_port}", "--enable_metric_reporting=false", *extra_args]
    proc = _spawn(argv, log_path, None, wd)
    svc = Service("mooncake_master", proc, host, {"rpc": rpc_port, "http": http_port, "metrics": metrics_port},
                  log_path, mooncake_store_url(host, rpc_port, http_port, **{"admin": f"http://{host}:{metrics_port}",
                                                                    **(store_params or {})}), wd, None, own)
    deadline = time.monotonic() + ready_timeout_s
    ok = (wait_port(host, rpc_port, ready_timeout_s, proc)
          and wait_port(host, http_port, max(0.1, deadline - time.monotonic()), proc))
    if not ok:
        tail = svc.log_tail()
        svc.stop()
        raise StoreError(f"mooncake_master did not come up on {host}:{rpc_port} (http {http_port}) "
                         f"within {ready_timeout_s:g}s; argv: {' '.join(argv)}\nlog:\n{tail}")
    return svc


# ----------------------------------------------------------------------------- MemCache

META_CONF_TEMPLATE = """\
# MemCache MetaService configuration written by kvdirect
ock.mmc.meta_service_url = {meta_url}
ock.mmc.meta_service.config_store_url = {config_store_url}
ock.mmc.meta_service.metrics_url = {metrics_url}
ock.mmc.log_level = {log_level}
"""

LOCAL_CONF_TEMPLATE = """\
# MemCache client (local service) configuration written by kvdirect
ock.mmc.meta_service_url = {meta_url}
ock.mmc.local_service.config_store_url = {config_store_url}
ock.mmc.local_service.world_size = {world_size}
ock.mmc.local_service.protocol = {protocol}
ock.mmc.local_service.dram.size = {dram_size}
ock.mmc.log_level = {log_level}
"""


def parse_tcp_url(url: str) -> tuple[str, int]:
    """'tcp://HOST:PORT' -> (HOST, PORT); ConfigError otherwise."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    try:
        port = u.port
    except ValueError:
        port = None
    if u.scheme != "tcp" or not u.hostname or not port:
        raise ConfigError(f"expected a MetaService URL like tcp://127.0.0.1:15000, got {url!r}")
    return u.hostname, port


def read_conf(path) -> dict[str, str]:
    """Parse MemCache's ``key = value`` config format (``#`` comments)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def write_meta_conf(path, *, host: str = _HERE_HOST, meta_port: int | None = None,
                    config_store_port: int | None = None, metrics_port: int | None = None,
                    log_level: str = "info") -> dict[str, str]:
    """Write a MetaService ``meta.conf``; free ports for those not given. Returns the URLs."""
    want = [p for p in (meta_port, config_store_port, metrics_port) if p is None]
    picked = iter(free_ports(len(want), host))
    urls = {
        "meta_url": f"tcp://{host}:{meta_port or next(picked)}",
        "config_store_url": f"tcp://{host}:{config_store_port or next(picked)}",
        "metrics_url": f"http://{host}:{metrics_port or next(picked)}",
        "log_level": log_level,
    }
    Path(path).write_text(META_CONF_TEMPLATE.format(**urls))
    return urls


def write_local_conf(path, *, meta_url: str, config_store_url: str, protocol: str = "host_shm",
                     world_size: int = 1, dram_size: str = "256MB", log_level: str = "info") -> None:
    """Write a client ``local.conf`` pointing at a MetaService."""
    Path(path).write_text(LOCAL_CONF_TEMPLATE.format(meta_url=meta_url, config_store_url=config_store_url,
                                                     protocol=protocol, world_size=world_size,
                                                     dram_size=dram_size, log_level=log_level))


def meta_service_argv() -> list[str]:
    """The command that runs MetaService in the foreground (reads MMC_META_CONFIG_PATH)."""
    return [sys.executable, "-c",
            "import sys; from memcache_hybrid import MetaService; sys.exit(MetaService.main() or 0)"]


def start_memcache_meta(*, config=None, url: str | None = None, workdir=None,
                        ready_timeout_s: float = 20.0) -> Service:
    """Run MemCache's MetaService in a child process; wait until its meta and admin ports accept.

    ``config``: an existing ``meta.conf`` (used as is). Otherwise a ``meta.conf`` is written
    into ``workdir`` with ``url`` (``tcp://HOST:PORT``) as the meta service address, or free
    loopback ports. ``Service.ports`` holds ``meta`` and ``config_store``; ``Service.store_url``
    is blank (clients need a local.conf: see :func:`write_local_conf`).
    """
    try:
        import memcache_hybrid  # noqa: F401
    except ImportError as e:
        raise StoreError(f"memcache_hybrid is not importable ({e}); pip install \"kvdirect[memcache]\"") from None
    wd, own = _workdir(workdir, "kvd-memcache-")
    if config is not None:
        conf_path = Path(config).resolve()
        if not conf_path.is_file():
            raise StoreError(f"MetaService config {conf_path} does not exist")
        conf = read_conf(conf_path)
    else:
        conf_path = wd / "meta.conf"
        host, port = parse_tcp_url(url) if url else (_HERE_HOST, None)
        write_meta_conf(conf_path, host=host, meta_port=port)
        conf = read_conf(conf_path)
    meta_url = conf.get("ock.mmc.meta_service_url")
    if not meta_url:
        raise StoreError(f"{conf_path} has no ock.mmc.meta_service_url line")
    host, meta_port = parse_tcp_url(meta_url)
    cs_url = conf.get("ock.mmc.meta_service.config_store_url", "")
    ports = {"meta": meta_port}
    if cs_url:
        ports["config_store"] = parse_tcp_url(cs_url)[1]
    env = dict(os.environ, MMC_META_CONFIG_PATH=str(conf_path))
    log_path = wd / "meta_service.log"
    proc = _spawn(meta_service_argv(), log_path, env, wd)
    svc = Service("memcache_meta", proc, host, ports, log_path, "", wd, conf_path, own)
    # the admin (metrics) port opens after the meta port; audits and tests list keys through it
    metrics = urllib.parse.urlsplit(conf.get("ock.mmc.meta_service.metrics_url", ""))
    waits = [(host, meta_port, meta_url)]
    if metrics.hostname and metrics.port:
        waits.append((metrics.hostname, metrics.port, metrics.geturl()))
    deadline = time.monotonic() + ready_timeout_s
    for h, p, what in waits:
        if not wait_port(h, p, max(0.1, deadline - time.monotonic()), proc):
            tail = svc.log_tail()
            svc.stop()
            raise StoreError(f"MemCache MetaService did not come up on {what} within {ready_timeout_s:g}s "
                             f"(config {conf_path})\nlog:\n{tail}")
    return svc
