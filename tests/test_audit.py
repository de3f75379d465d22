"""Pool audit (kvdirect.audit, `kvdirect pool audit`): every object read, corrupt ones found.

Corruption is planted the way it happens: bytes flipped in the pool file where an object's
blocks lie (ShmStore.object_extents), pages of the wrong size under a fingerprint, malformed
kvdirect keys. A clean pool audits clean (exit 0); a damaged one names exactly the damaged keys
(exit 1) and leaves them in place unless --remove-corrupt.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest

from kvdirect.audit import audit, key_fingerprint, render
from kvdirect.errors import StoreError
from kvdirect.keys import LayoutFingerprint
from kvdirect.stores import open_store
from kvdirect.stores.base import BUSY, CORRUPT, NOT_FOUND, OK
from kvdirect.stores.shm import ShmStore, destroy_pool

from kvd_testutil import run_cli

PAGE = 6000  # bytes: spans two 4 KiB blocks


def fingerprint(model="audit-model"):
    return LayoutFingerprint(model=model, dtype="float16", num_layers=2, kv_heads=1, head_dim=8, page_size=4)


def page_keys(n, model="audit-model", seed=0):
    toks = np.random.default_rng(seed).integers(0, 30000, 4 * n, dtype=np.int32)
    return fingerprint(model).page_keys(toks)


def flip(store: ShmStore, key: str, where: int = 4100) -> None:
    """Flip one bit of `key`'s object byte `where`, in the pool file itself."""
    for off, length in store.object_extents(key):
        if where < length:
            with open(store.path, "r+b") as f:
                f.seek(off + where)
                b = f.read(1)
                f.seek(off + where)
                f.write(bytes([b[0] ^ 0x10]))
            return
        where -= length
    raise AssertionError("offset past the object")


@pytest.fixture
def pool():
    name = f"audit{os.getpid()}-{uuid.uuid4().hex[:8]}"
    s = open_store(f"shm://{name}?size=8MiB&block=4KiB&create=yes")
    keys = page_keys(12)
    rng = np.random.default_rng(1)
    content = {k: rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes() for k in keys}
    for k, v in content.items():
        assert s.put_bytes(k, v)
    yield s, content
    s.close()
    destroy_pool(name, missing_ok=True)


def test_clean_pool_audits_clean(pool):
    s, content = pool
    assert s.put_bytes("someone-elses-key", b"x" * 10)
    res = audit(s)
    assert res.ok and res.content_verified
    assert (res.objects, res.verified, res.unverified, res.foreign) == (13, 13, 0, 1)
    assert res.bytes == PAGE * 12 + 10
    assert res.corrupt == [] and res.unreadable == []
    fp = fingerprint().digest
    assert res.fingerprints == {fp: {"objects": 12, "page_bytes": PAGE, "sizes": {PAGE: 12}}}
    assert "result: clean" in render(res)
    r = run_cli("pool", "audit", s.name)
    assert r.returncode == 0 and "corrupt     0" in r.stdout and "result: clean" in r.stdout


def test_flipped_bytes_are_found_and_left_unless_removed(pool):
    s, content = pool
    keys = list(content)
    bad = {keys[2], keys[7]}
    for k in bad:
        flip(s, k)
    res = audit(s)
    assert not res.ok
    assert {k for k, _ in res.corrupt} == bad
    assert all(why == "checksum mismatch" for _, why in res.corrupt)
    assert res.verified == 10 and res.objects == 12
    # an audit reports; the corrupt objects stay until the operator asks
    assert all(s.exists(sorted(bad)))
    r = run_cli("pool", "audit", f"shm://{s.name}", "--json", check=False)
    assert r.returncode == 1, r.stderr
    d = json.loads(r.stdout)
    assert {c["key"] for c in d["corrupt"]} == bad and d["ok"] is False and d["content_verified"] is True
    text = run_cli("pool", "audit", s.name, check=False).stdout
    assert "corrupt     2" in text and all(k in text for k in bad) and "PROBLEMS FOUND" in text

    r = run_cli("pool", "audit", s.name, "--remove-corrupt", check=False)
    assert r.returncode == 1 and "removed     2 corrupt objects" in r.stdout
    assert not any(s.exists(sorted(bad)))
    assert all(s.get_bytes(k) == content[k] for k in keys if k not in bad)  # the rest untouched
    assert run_cli("pool", "audit", s.name).returncode == 0


def test_sizes_and_key_format_are_checked(pool):
    s, content = pool
    fp = fingerprint().digest
    short = f"kvd1/{fp}/" + "ab" * 32
    assert s.put_bytes(short, b"y" * (PAGE - 64))  # a page of another size under the same fingerprint
    malformed = f"kvd1/{fp}/not-a-page-hash"
    assert s.put_bytes(malformed, b"z" * PAGE)
    res = audit(s)
    reasons = dict(res.corrupt)
    assert set(reasons) == {short, malformed}
    assert re.search(rf"size {PAGE - 64} B, but 12 of 13 pages of fingerprint {fp} have {PAGE} B", reasons[short])
    assert "malformed kvdirect key" in reasons[malformed]
    assert key_fingerprint(short) == fp and key_fingerprint(malformed) is None


def test_tied_sizes_flag_the_whole_fingerprint():
    name = f"audit{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open_store(f"shm://{name}?size=4MiB&block=4KiB&create=yes") as s:
        try:
            a, b = page_keys(2, model="tie")
            s.put_bytes(a, b"a" * 100)
            s.put_bytes(b, b"b" * 200)
            res = audit(s)
            assert {k for k, _ in res.corrupt} == {a, b}
            assert res.fingerprints[fingerprint("tie").digest]["page_bytes"] is None
        finally:
            s.destroy()


def test_objects_without_checksum_are_unverified_not_clean_by_content(pool):
    s, content = pool
    with open_store(f"shm://{s.name}?checksum=off") as raw:
        k = page_keys(1, seed=9)[0]
        raw.put_bytes(k, b"q" * PAGE)
        flip(raw, k, 10)  # nothing can tell: no checksum was written
    res = audit(s)
    assert res.ok and not res.content_verified
    assert res.unverified == 1 and res.verified == 12
    assert "UNVERIFIED for 1 objects" in render(res)


def test_progress_is_reported(pool):
    s, _ = pool
    extra = page_keys(600, seed=3)  # 612 objects: three batches of 256 objects read
    for k in extra:
        assert s.put_bytes(k, b"p" * 100)
    seen = []
    audit(s, progress=lambda done, problems: seen.append((done, problems)), progress_every=200)
    assert seen == [(256, 0), (512, 0), (612, 0)]  # after each batch that crossed a multiple of 200
    r = run_cli("pool", "audit", s.name, "--progress-every", "200", check=False)
    assert [ln for ln in r.stderr.splitlines() if "objects audited" in ln] == [
        f"... {n} objects audited, {p} problems so far" for n, p in [(256, 0), (512, 0), (612, 0)]]


class _Listing(ShmStore):
    """The shm pool, plus keys listed that the pool does not hold (gone since listed)."""

    extra: list = []

    def list_objects(self, batch=4096):
        yield from super().list_objects(batch)
        for k in self.extra:
            yield k, None


def test_vanished_and_unreadable_objects(pool):
    s, content = pool
    st = _Listing(s.name, create="no")
    try:
        st.extra = [page_keys(1, seed=5)[0]]
        res = audit(st)
        assert res.ok and res.vanished == 1 and res.objects == 12

        class Busy(_Listing):
            def check_objects(self, keys, drop_corrupt=False):
                out = super().check_objects(keys, drop_corrupt)
                out.status[0] = BUSY
                out.detail[0] = "pin table full"
                return out

        b = Busy(s.name, create="no")
        try:
            res = audit(b)
            assert not res.ok and len(res.unreadable) == 1 and res.unreadable[0][1] == "pin table full"
        finally:
            b.close()
    finally:
        st.close()


def test_check_objects_in_place(pool):
    s, content = pool
    keys = list(content)
    flip(s, keys[0], 3)
    chk = s.check_objects([keys[0], keys[1], "absent"])
    assert chk.status.tolist() == [CORRUPT, OK, NOT_FOUND]
    assert chk.checked.tolist() == [True, True, False]
    assert chk.sizes.tolist() == [PAGE, PAGE, 0]
    assert s.exists([keys[0]]).tolist() == [True]  # not dropped
    assert s.check_objects([keys[0]], drop_corrupt=True).status.tolist() == [CORRUPT]
    assert s.exists([keys[0]]).tolist() == [False]
    assert s.stats()["pins"] == 0


def test_listing_pages_through_the_pool(pool):
    s, content = pool
    got = []
    cursor = 0
    while True:  # pages of 5: every object once
        cursor, objs = s._pool.list(cursor, 5)
        assert len(objs) <= 5
        got += [k for k, _, _ in objs]
        if cursor == 0:
            break
    assert sorted(got) == sorted(content)
    assert dict(s.list_objects()) == {k: PAGE for k in content}


def test_a_store_that_cannot_list_says_so():
    from kvdirect.stores._testing import FakeMemcacheModule
    from kvdirect.stores.memcache import MemcacheStore

    st = MemcacheStore({"meta_service_url": "tcp://127.0.0.1:1", "protocol": "host_shm"},
                       module=FakeMemcacheModule(), check=False, memory="host")
    try:
        with pytest.raises(StoreError, match=r"cannot list keys: give admin=http://HOST:PORT"):
            audit(st)
    finally:
        st.close()


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="under scripts/sanitize.sh: MemCache's MetaService dlopens a library with RTLD_DEEPBIND, "
                           "which AddressSanitizer refuses")
def test_memcache_lists_through_the_meta_service():
    """A real MetaService answers /get_all_keys (empty: no client can attach without CANN here)."""
    pytest.importorskip("memcache_hybrid", reason="memcache-hybrid is in the [test] extra")
    from kvdirect.services import read_conf, start_memcache_meta
    from kvdirect.stores._testing import FakeMemcacheModule
    from kvdirect.stores.memcache import MemcacheStore

    with start_memcache_meta() as svc:
        admin = read_conf(svc.config_path)["ock.mmc.meta_service.metrics_url"]
        st = MemcacheStore({"meta_service_url": "tcp://127.0.0.1:1", "protocol": "host_shm"},
                           module=FakeMemcacheModule(), check=False, memory="host", admin=admin)
        try:
            res = audit(st)
            assert res.ok and res.objects == 0
        finally:
            st.close()


@pytest.mark.mooncake
def test_mooncake_audit_reads_every_object_and_says_content_is_unverified():
    from kvdirect.services import start_mooncake_master

    # a short read lease: the audit's own reads lease the objects it may then remove
    with start_mooncake_master(store_params=dict(segment="16MiB", buffer="16MiB", timeout=5),
                               extra_args=["--default_kv_lease_ttl=200"]) as svc:
        assert "admin=http://" in svc.store_url
        with open_store(svc.store_url) as s:
            keys = page_keys(6, model="mc")
            for k in keys:
                assert s.put_bytes(k, bytes([len(k) % 251]) * 3000)
            wrong = f"kvd1/{fingerprint('mc').digest}/" + "cd" * 32
            assert s.put_bytes(wrong, b"w" * 2000)
            res = audit(s)
            assert res.objects == 7 and res.unverified == 7 and not res.content_verified
            assert [k for k, _ in res.corrupt] == [wrong]
            # the CLI's audit client contributes no memory (segment=0): the pool keeps its objects
            r = run_cli("pool", "audit", svc.store_url, "--remove-corrupt", check=False)
            assert r.returncode == 1, r.stderr
            assert "UNVERIFIED for 7 objects" in r.stdout, r.stdout
            assert "removed     1 corrupt objects" in r.stdout, r.stdout
            assert s.exists(keys).all() and not s.exists([wrong])[0]
            r = run_cli("pool", "audit", svc.store_url, "--json")
            d = json.loads(r.stdout)
            assert d["ok"] and d["objects"] == 6 and d["content_verified"] is False


@pytest.mark.parametrize("args,code,pattern", [
    (["pool", "audit", "bad$name"], 2, r"bad shm pool name"),
    (["pool", "audit", "bogus://x"], 2, r"unknown store scheme 'bogus'"),
    (["pool", "audit", "shm://x?sise=1GiB"], 2, r"unknown parameter.*sise"),
    (["pool", "audit", "x", "--progress-every", "-1"], 2, r"--progress-every: must be >= 0"),
    (["pool", "audit", "mooncake://127.0.0.1:1?metadata=http://127.0.0.1:2/m&admin=ftp://h"], 2,
     r"admin='ftp://h'.*http://HOST:PORT"),
    (["pool", "audit", "no-such-pool-{pid}"], 1, r"does not exist"),
])
def test_audit_bad_input_is_one_line_with_its_exit_status(args, code, pattern):
    args = [a.format(pid=os.getpid()) for a in args]
    r = subprocess.run([sys.executable, "-m", "kvdirect", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.stderr
    assert r.stdout == ""
