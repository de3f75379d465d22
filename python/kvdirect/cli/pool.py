"""`kvdirect pool create|info|destroy NAME`: manage the embedded shared-memory pool;
`kvdirect pool audit URL|NAME`: read every object of a pool and report corrupt ones (any store)."""
from __future__ import annotations

import json
import sys


def _human(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _create(args) -> int:
    from kvdirect.stores.shm import ShmStore

    with ShmStore(args.name, size=args.size, create="yes", block_size=args.block_size) as s:
        st = s.stats()
    print(f"created shm pool {args.name!r} at {st['path']}: {_human(st['size'])} "
          f"({_human(st['capacity'])} for data in {st['blocks']} blocks of {_human(st['block_size'])})")
    return 0


def _info(args) -> int:
    from kvdirect.stores.shm import ShmStore

    with ShmStore(args.name, create="no") as s:
        st = s.stats()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    lookups = st["hits"] + st["misses"]
    hit_rate = f"{100.0 * st['hits'] / lookups:.1f}%" if lookups else "n/a"
    print(f"shm pool {st['name']!r}  ({st['path']})")
    rows = [
        ("size", _human(st["size"])),
        ("capacity", f"{_human(st['capacity'])}  ({st['blocks']} blocks of {_human(st['block_size'])})"),
        ("used", f"{_human(st['used'])}  ({100.0 * st['used'] / max(1, st['capacity']):.1f}%)"),
        ("objects", f"{st['objects']}  ({_human(st['object_bytes'])} of object data)"),
        ("hits/misses", f"{st['hits']} / {st['misses']}  (hit rate {hit_rate})"),
        ("evictions", str(st["evictions"])),
        ("puts", f"{st['puts']}  ({st['put_failures']} failed)"),
        ("corrupt", str(st["corrupt"])),
        ("in flight", f"{st['writing']} puts, {st['pins']} pins"),
        ("recoveries", f"{st['recoveries']}  (reclaimed {st['reaped_pins']} pins, {st['reaped_writes']} puts "
                       "of dead processes)"),
    ]
    for k, v in rows:
        print(f"  {k:<12} {v}")
    return 0


def _destroy(args) -> int:
    from kvdirect.stores.shm import destroy_pool

    destroy_pool(args.name)
    print(f"destroyed shm pool {args.name!r}")
    return 0


def _audit_url(target: str) -> str:
    """A pool name is the shm pool of that name; a Mooncake audit client contributes no memory."""
    from kvdirect.cli._args import existing_pool_url
    from kvdirect.stores import parse_url

    url = target if "://" in target else f"shm://{target}"
    url = existing_pool_url(url)
    u = parse_url(url)
    if u.scheme == "mooncake":
        # a client that contributes a segment holds replicas: they would vanish when the audit exits
        from urllib.parse import urlencode, urlsplit, urlunsplit

        parts = urlsplit(url)
        params = dict(u.params, segment="0")
        url = urlunsplit(parts._replace(query=urlencode(params, safe="/:")))
    return url


def _audit(args) -> int:
    from kvdirect.audit import audit, render
    from kvdirect.cli._args import open_user_store

    url = _audit_url(args.url)
    show = not args.json and args.progress_every > 0

    def progress(done, problems):
        if show:
            print(f"... {done} objects audited, {problems} problems so far", file=sys.stderr, flush=True)

    with open_user_store(url) as store:
        res = audit(store, remove_corrupt=args.remove_corrupt, progress=progress,
                    progress_every=args.progress_every, name=args.url)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        print(render(res, max_keys=args.max_keys))
    return 0 if res.ok and not res.remove_failed else 1


def register(sub) -> None:
    from kvdirect.cli import _args as A

    p = sub.add_parser("pool", help="create, inspect, audit or destroy a pool")
    ps = p.add_subparsers(dest="pool_cmd", metavar="ACTION", required=True)
    c = ps.add_parser("create", help="create /dev/shm/kvdirect-NAME")
    c.add_argument("name", type=A.pool_name)
    c.add_argument("--size", type=A.size, default="1GiB", help="pool size, e.g. 8GiB (default 1GiB)")
    c.add_argument("--block-size", type=A.size, default="64KiB",
                   help="allocation block, a power of two (default 64KiB)")
    c.set_defaults(func=_create, prog=c.prog)
    i = ps.add_parser("info", help="capacity, used, objects, hits/misses, evictions")
    i.add_argument("name", type=A.pool_name)
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")
    i.set_defaults(func=_info, prog=i.prog)
    d = ps.add_parser("destroy", help="remove the pool file (processes using it keep their mapping)")
    d.add_argument("name", type=A.pool_name)
    d.set_defaults(func=_destroy, prog=d.prog)
    a = ps.add_parser("audit", help="read every object of a pool, verify checksums, report corrupt ones",
                      description="Reads every object of a pool (shm://NAME or a pool NAME, mooncake://..., "
                                  "memcache://...), verifies each checksum where the store keeps one (shm), "
                                  "checks key format and page sizes, and lists corrupt and unreadable objects. "
                                  "Exit status: 0 clean, 1 corrupt or unreadable objects found (or the pool "
                                  "could not be read), 2 bad input.")
    a.add_argument("url", type=A.pool_target, metavar="URL|NAME")
    a.add_argument("--remove-corrupt", action="store_true", help="remove the corrupt objects found")
    a.add_argument("--json", action="store_true", help="print machine-readable JSON (every key)")
    a.add_argument("--progress-every", type=A.non_negative_int, default=10000, metavar="N",
                   help="a progress line on stderr every N objects (0: none; default 10000)")
    a.add_argument("--max-keys", type=A.non_negative_int, default=50, metavar="N",
                   help="corrupt/unreadable keys listed in the text report (default 50; --json lists all)")
    a.set_defaults(func=_audit, prog=a.prog)
