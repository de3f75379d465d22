"""`kvdirect memcache meta`: run an Ascend MemCache MetaService in the foreground.

    kvdirect memcache meta --url tcp://0.0.0.0:15000            # writes a meta.conf, then serves
    kvdirect memcache meta --config /etc/mmc/meta.conf           # uses (or creates) that file
    kvdirect memcache local-conf --meta tcp://HOST:15000 --config-store tcp://HOST:16000 -o mmc-local.conf

Clients then open ``memcache://?config=mmc-local.conf&device=0&protocol=device_sdma``.
"""
from __future__ import annotations

import os
from pathlib import Path


PROTOCOLS = ("device_sdma", "device_rdma", "host_rdma", "host_tcp", "host_shm")
LOG_LEVELS = ("debug", "info", "warn", "error")


def _meta(args) -> int:
    import importlib.util

    from kvdirect.errors import ConfigError, StoreError
    from kvdirect.services import parse_tcp_url, read_conf, write_meta_conf

    conf = Path(args.config) if args.config else Path(args.workdir or ".") / "meta.conf"
    create = not conf.exists() or (args.url and not args.config)
    if args.config and conf.exists() and (args.url or args.config_store_port or args.metrics_port):
        raise ConfigError(f"{conf} exists: --url, --config-store-port and --metrics-port apply only when "
                          "--config names a file to create (drop them, or the file)")
    if conf.exists() and not conf.is_file():
        raise ConfigError(f"--config {conf} is not a file")
    if create and conf.parent.exists() and not conf.parent.is_dir():
        raise ConfigError(f"cannot write {conf}: {conf.parent} is not a folder")
    host, port = parse_tcp_url(args.url) if args.url else ("127.0.0.1", 15000)
    cs_port = args.config_store_port or (port + 1000 if port + 1000 < 65536 else None)
    if create and cs_port in (None, port):
        raise ConfigError(f"--config-store-port must differ from the meta port {port}; give one explicitly")
    if importlib.util.find_spec("memcache_hybrid") is None:
        raise StoreError('memcache_hybrid is not installed: pip install "kvdirect[memcache]"')
    if create:
        conf.parent.mkdir(parents=True, exist_ok=True)
        write_meta_conf(conf, host=host, meta_port=port, config_store_port=cs_port,
                        metrics_port=args.metrics_port, log_level=args.log_level)
        print(f"wrote {conf}", flush=True)
    c = read_conf(conf)
    meta, cs = c.get("ock.mmc.meta_service_url"), c.get("ock.mmc.meta_service.config_store_url")
    if not meta:
        raise ConfigError(f"{conf} has no ock.mmc.meta_service_url line")
    print(f"MemCache MetaService: meta {meta}, config store {cs} (config {conf.resolve()}); "
          f"clients: memcache://?meta_service_url={meta}&config_store_url={cs}&protocol=device_sdma", flush=True)
    os.environ["MMC_META_CONFIG_PATH"] = str(conf.resolve())
    from memcache_hybrid import MetaService

    return int(MetaService.main() or 0)  # blocks until the service is stopped (SIGTERM / SIGINT)


def _local_conf(args) -> int:
    from kvdirect.services import write_local_conf

    write_local_conf(args.output, meta_url=args.meta, config_store_url=args.config_store, protocol=args.protocol,
                     world_size=args.world_size, dram_size=args.dram_size)
    print(f"wrote {args.output}; open it with memcache://?config={Path(args.output).resolve()}&device=0")
    return 0


def register(sub) -> None:
    from kvdirect.cli import _args as A

    p = sub.add_parser("memcache", help="Ascend MemCache helpers (MetaService, client config)")
    ms = p.add_subparsers(dest="memcache_command", metavar="ACTION", required=True)
    m = ms.add_parser("meta", help="run a MemCache MetaService in the foreground")
    m.add_argument("--config", help="meta.conf to use; created if missing")
    m.add_argument("--url", type=A.tcp_url,
                   help="meta service address tcp://HOST:PORT (default tcp://127.0.0.1:15000)")
    m.add_argument("--config-store-port", type=A.port, help="config store port (default: meta port + 1000)")
    m.add_argument("--metrics-port", type=A.port, help="metrics HTTP port (default: a free one)")
    m.add_argument("--workdir", help="where to write meta.conf when --config is not given (default: .)")
    m.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    m.set_defaults(func=_meta, prog=m.prog)
    lc = ms.add_parser("local-conf", help="write a MemCache client config (mmc-local.conf)")
    lc.add_argument("--meta", type=A.tcp_url, required=True, help="tcp://HOST:PORT of the MetaService")
    lc.add_argument("--config-store", type=A.tcp_url, required=True, help="tcp://HOST:PORT of its config store")
    lc.add_argument("--protocol", default="device_sdma", choices=PROTOCOLS)
    lc.add_argument("--world-size", type=A.positive_int, default=8)
    lc.add_argument("--dram-size", type=A.size, default="1GB")
    lc.add_argument("-o", "--output", type=A.output_file, default="mmc-local.conf")
    lc.set_defaults(func=_local_conf, prog=lc.prog)
