"""The `kvdirect` command line: one module per subcommand in this package.

Each subcommand module defines ``register(subparsers)``, which adds its parser
and sets ``func`` to a callable taking the parsed args and returning an exit code.
Output conventions (``cli/_args.py``): arguments are checked before any work; an
error is one line on stderr, ``kvdirect SUBCOMMAND: error: MESSAGE``, with exit
status 2 for bad arguments or configuration and 1 when the work itself failed.
"""
from __future__ import annotations

import importlib
import sys

# Subcommand modules, in the order `kvdirect --help` lists them.
SUBCOMMANDS = ["demo", "doctor", "bench", "pool", "memcache"]


def build_parser() -> argparse.ArgumentParser:
    from kvdirect import __version__

    from kvdirect.cli._args import Parser

    p = Parser(prog="kvdirect", description=__doc__.splitlines()[0])
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
    from kvdirect.cli._args import one_line
    from kvdirect.errors import ConfigError, KVDirectError

    try:
        return int(args.func(args) or 0)
    except KVDirectError as e:  # a clear message, not a traceback
        prog = getattr(args, "prog", None) or f"kvdirect {args.command}"
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
