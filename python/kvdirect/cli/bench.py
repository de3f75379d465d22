"""`kvdirect bench load`: direct vs staged (three-tier) load latency on one store."""
from __future__ import annotations

from kvdirect.cli import _args as A


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (load: direct vs staged three-tier path, write-back, "
                                     "misses, against memcpy)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    lp = bsub.add_parser("load", help="load latency per request: kvdirect's direct path vs a staged path")
    lp.add_argument("--store", type=A.store_url, default=None,
                    help="store URL; an shm:// pool must exist (`kvdirect pool create`) unless the URL says "
                         "create=... (default: a temporary embedded shm pool, removed afterwards)")
    lp.add_argument("--json", type=A.output_file, default=None, metavar="PATH", help="also write the results as JSON")
    lp.add_argument("--requests", type=A.positive_int, default=8)
    lp.add_argument("--prompt-len", type=A.positive_int, default=3584, help="tokens per request (at least one page)")
    lp.add_argument("--page-size", type=A.positive_int, default=64)
    lp.add_argument("--layers", type=A.positive_int, default=16)
    lp.add_argument("--kv-heads", type=A.positive_int, default=2)
    lp.add_argument("--head-dim", type=A.positive_int, default=128)
    lp.add_argument("--rounds", type=A.positive_int, default=3)
    lp.add_argument("--misses", type=A.positive_int, default=400, help="full-miss samples (p50/p99 of their cost)")

    def run(args):
        from kvdirect.benchload import check_workload, main_json

        check_workload(args.requests, args.prompt_len, args.page_size, args.layers, args.kv_heads, args.head_dim,
                       args.rounds, own_pool=args.store is None)
        if args.store:
            A.open_user_store(args.store).close()  # a bad or unreachable store fails here, before any work
            args.store = A.existing_pool_url(args.store)
        return main_json(args)

    lp.set_defaults(func=run, prog=lp.prog)
