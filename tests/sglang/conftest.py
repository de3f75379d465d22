"""Tests that run inside an SGLang 0.5.23 environment (see tests/test_sglang_plugin.py)."""
import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def pool_url(monkeypatch):
    """A fresh embedded shm pool, named in KVDIRECT_CONFIG as SGLang users do; destroyed after."""
    name = f"kvd-sgl-{uuid.uuid4().hex[:10]}"
    url = f"shm://{name}?size=32MiB"
    monkeypatch.setenv("KVDIRECT_CONFIG", '{"store": "%s", "allow_no_store": false}' % url)
    yield url
    from kvdirect.stores.shm import destroy_pool
    destroy_pool(name, missing_ok=True)  # tests refused at start-up never create it

try:  # outside an SGLang environment these run through tests/test_sglang_plugin.py
    import sglang.srt  # noqa: F401  (not just "sglang": tests/sglang itself looks like one)
except ImportError:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def mooncake_url(monkeypatch):
    """A mooncake_master on loopback (kvdirect.services), named in KVDIRECT_CONFIG; stopped after."""
    from kvdirect.services import start_mooncake_master

    master = start_mooncake_master(store_params=dict(segment="64MiB", buffer="16MiB", timeout=10))
    monkeypatch.setenv("KVDIRECT_CONFIG", '{"store": "%s", "allow_no_store": false}' % master.store_url)
    yield master.store_url
    master.stop()
