"""Argument checks shared by the subcommands.

Every subcommand checks its arguments before doing any work and fails with
one line on stderr (``kvdirect SUBCOMMAND: error: ...``) and a non-zero exit:
2 for bad arguments, 1 when the work itself failed. The ``argparse`` types
below raise ``ArgumentTypeError``; checks that need several arguments raise
:class:`~kvdirect.errors.ConfigError` from the subcommand (``main`` prints it).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``PROG: error: MESSAGE (see PROG --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(text) -> str:
    return " ".join(str(text).split())


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def non_negative_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def port(text: str) -> int:
    v = _int(text)
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {v}")
    return v


def size(text: str) -> str:
    """A byte size such as 512MiB or 8GiB (kept as text; checked here)."""
    from kvdirect.errors import ConfigError
    from kvdirect.stores.url import parse_size

    try:
        n = parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a size above 0, got {text!r}")
    return text


def pool_name(text: str) -> str:
    from kvdirect.errors import ConfigError
    from kvdirect.stores.shm import check_name

    try:
        return check_name(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def store_url(text: str) -> str:
    """A store URL with a known scheme (opening it is the subcommand's first step)."""
    from kvdirect.errors import ConfigError
    from kvdirect.stores import SCHEMES, parse_url

    try:
        u = parse_url(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if u.scheme not in SCHEMES:
        raise argparse.ArgumentTypeError(f"unknown store scheme {u.scheme!r} in {text!r}; "
                                         f"known: {', '.join(sorted(SCHEMES))}")
    return text


def pool_target(text: str) -> str:
    """A store URL with a known scheme, or the name of an shm pool."""
    if "://" in text:
        return store_url(text)
    return pool_name(text)


def tcp_url(text: str) -> str:
    """tcp://HOST:PORT."""
    from kvdirect.errors import KVDirectError
    from kvdirect.services import parse_tcp_url

    try:
        parse_tcp_url(text)
    except KVDirectError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def output_file(text: str) -> str:
    """A file this command will write: its folder must exist and be writable, and it is no folder."""
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(parent)!r} of {text!r} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    return text


def existing_pool_url(url: str) -> str:
    """A user's shm:// URL opens an existing pool only, unless it says ``create=``: a typo in a
    pool name must not silently create (and leave behind) a new pool."""
    from kvdirect.stores import parse_url

    u = parse_url(url)
    if u.scheme != "shm" or "create" in u.params:
        return url
    return url + ("&" if "?" in url else "?") + "create=no"


def open_user_store(url: str):
    """Open the store a user named (shm: an existing pool), so that a bad or unreachable store
    fails now, in one line, before any work. Raises ConfigError / StoreError."""
    from kvdirect.stores import open_store

    return open_store(existing_pool_url(url))
