"""`kvdirect pool create|info|destroy`."""
from __future__ import annotations

import json
import os
import uuid

import pytest

from kvd_testutil import run_cli


@pytest.fixture
def name():
    n = f"cli{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield n
    from kvdirect.stores.shm import destroy_pool

    destroy_pool(n, missing_ok=True)


def test_create_info_destroy(name):
    r = run_cli("pool", "create", name, "--size", "4MiB", "--block-size", "16KiB")
    assert "created shm pool" in r.stdout
    path = f"/dev/shm/kvdirect-{name}"
    assert os.path.exists(path) and os.stat(path).st_mode & 0o777 == 0o600

    from kvdirect.stores import open_store

    with open_store(f"shm://{name}?create=no") as s:
        assert s.put_bytes("a", b"x" * 1000)
        assert s.get_bytes("a") is not None
        assert s.get_bytes("missing") is None

    info = json.loads(run_cli("pool", "info", name, "--json").stdout)
    assert info["size"] == 4 << 20 and info["block_size"] == 16 << 10
    assert info["capacity"] <= info["size"] and info["capacity"] > 3 << 20
    assert (info["objects"], info["used"], info["hits"], info["misses"], info["evictions"]) == (1, 16 << 10, 1, 1, 0)

    text = run_cli("pool", "info", name).stdout
    for word in ("capacity", "used", "objects", "hits/misses", "evictions", "1 / 1"):
        assert word in text, text

    r = run_cli("pool", "create", name, "--size", "4MiB", check=False)
    assert r.returncode == 2 and "already exists" in r.stderr  # bad input: exit 2

    assert "destroyed" in run_cli("pool", "destroy", name).stdout
    assert not os.path.exists(path)


def test_missing_pool_and_bad_name(name):
    r = run_cli("pool", "info", name, check=False)
    assert r.returncode == 1 and "kvdirect pool create" in r.stderr
    r = run_cli("pool", "destroy", name, check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = run_cli("pool", "create", "bad/name", "--size", "4MiB", check=False)
    assert r.returncode == 2 and "bad shm pool name" in r.stderr
    r = run_cli("pool", "create", name, "--size", "huge", check=False)
    assert r.returncode == 2 and "bad size" in r.stderr
    assert not os.path.exists(f"/dev/shm/kvdirect-{name}")
