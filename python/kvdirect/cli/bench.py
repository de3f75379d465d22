"""`kvdirect bench load`: direct vs staged (three-tier) load latency on one store."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (load: direct vs staged three-tier path, write-back, "
                                     "misses, against memcpy)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    lp = bsub.add_parser("load", help="load latency per request: kvdirect's direct path vs a staged path")
    lp.add_argument("--store", default=None, help="store URL (default: a temporary embedded shm pool)")
    lp.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    lp.add_argument("--requests", type=int, default=8)
    lp.add_argument("--prompt-len", type=int, default=3584)
    lp.add_argument("--page-size", type=int, default=64)
    lp.add_argument("--layers", type=int, default=16)
    lp.add_argument("--kv-heads", type=int, default=2)
    lp.add_argument("--head-dim", type=int, default=128)
    lp.add_argument("--rounds", type=int, default=3)
    lp.add_argument("--misses", type=int, default=400, help="full-miss samples (p50/p99 of their cost)")

    def run(args):
        from kvdirect.benchload import main_json
        return main_json(args)

    lp.set_defaults(func=run)
