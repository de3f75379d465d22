"""`kvdirect memcache meta`: run an Ascend MemCache MetaService in the foreground.

    kvdirect memcache meta --url tcp://0.0.0.0:15000            # writes a meta.conf, then serves
    kvdirect memcache meta --config /etc/mmc/meta.conf           # uses (or creates) that file
    kvdirect memcache local-conf --meta tcp://HOST:15000 --config-store tcp://HOST:16000 -o mmc-local.conf

Clients then open ``memcache://?config=mmc-local.conf&device=0&protocol=device_sdma``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def _meta(args) -> int:
    from kvdirect.services import parse_tcp_url, read_conf, write_meta_conf
    from kvdirect.errors import StoreError

    import importlib.util

    if importlib.util.find_spec("memcache_hybrid") is None:
        print('kvdirect memcache meta: memcache_hybrid is not installed; pip install "kvdirect[memcache]"',
              file=sys.stderr)
        return 2
    conf = Path(args.config) if args.config else Path(args.workdir or ".") / "meta.conf"
    try:
        if not conf.exists() or args.url and not args.config:
            host, port = parse_tcp_url(args.url) if args.url else ("127.0.0.1", 15000)
            cs_port = args.config_store_port or (port + 1000 if port + 1000 < 65536 else None)
            conf.parent.mkdir(parents=True, exist_ok=True)
            write_meta_conf(conf, host=host, meta_port=port, config_store_port=cs_port,
                            metrics_port=args.metrics_port, log_level=args.log_level)
            print(f"wrote {conf}", flush=True)
        c = read_conf(conf)
        meta, cs = c.get("ock.mmc.meta_service_url"), c.get("ock.mmc.meta_service.config_store_url")
        if not meta:
            raise StoreError(f"{conf} has no ock.mmc.meta_service_url line")
    except StoreError as e:
        print(f"kvdirect memcache meta: {e}", file=sys.stderr)
        return 2
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
    p = sub.add_parser("memcache", help="Ascend MemCache helpers (MetaService, client config)")
    ms = p.add_subparsers(dest="memcache_command", metavar="ACTION")
    m = ms.add_parser("meta", help="run a MemCache MetaService in the foreground")
    m.add_argument("--config", help="meta.conf to use; created if missing")
    m.add_argument("--url", help="meta service address tcp://HOST:PORT (default tcp://127.0.0.1:15000)")
    m.add_argument("--config-store-port", type=int, help="config store port (default: meta port + 1000)")
    m.add_argument("--metrics-port", type=int, help="metrics HTTP port (default: a free one)")
    m.add_argument("--workdir", help="where to write meta.conf when --config is not given (default: .)")
    m.add_argument("--log-level", default="info")
    m.set_defaults(mc_func=_meta)
    lc = ms.add_parser("local-conf", help="write a MemCache client config (mmc-local.conf)")
    lc.add_argument("--meta", required=True, help="tcp://HOST:PORT of the MetaService")
    lc.add_argument("--config-store", required=True, help="tcp://HOST:PORT of its config store")
    lc.add_argument("--protocol", default="device_sdma",
                    help="device_sdma, device_rdma, host_rdma, host_tcp or host_shm")
    lc.add_argument("--world-size", type=int, default=8)
    lc.add_argument("--dram-size", default="1GB")
    lc.add_argument("-o", "--output", default="mmc-local.conf")
    lc.set_defaults(mc_func=_local_conf)

    def dispatch(args) -> int:
        if getattr(args, "mc_func", None) is None:
            p.print_help()
            return 2
        return args.mc_func(args)

    p.set_defaults(func=dispatch)
