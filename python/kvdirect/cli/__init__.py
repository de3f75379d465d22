"""The `kvdirect` command line: one module per subcommand in this package.

Each subcommand module defines ``register(subparsers)``, which adds its parser
and sets ``func`` to a callable taking the parsed args and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `kvdirect --help` lists them.
SUBCOMMANDS = ["demo", "doctor", "bench", "pool", "memcache"]


def build_parser() -> argparse.ArgumentParser:
    from kvdirect import __version__

    p = argparse.ArgumentParser(prog="kvdirect", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"kvdirect {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"kvdirect.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"kvdirect.cli.{name}":
                continue  # subcommand not part of this build yet
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from kvdirect.errors import KVDirectError

    try:
        return int(args.func(args) or 0)
    except KVDirectError as e:  # a clear message, not a traceback
        print(f"kvdirect {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
