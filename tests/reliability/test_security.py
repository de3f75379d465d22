"""Security: pool file permissions and ownership, symlinks, tenant isolation by cache_salt
namespaces (identical tokens), no pickle/eval of stored data, bounded sizes read back."""
from __future__ import annotations

import ast
import hashlib
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from kvdirect import keys as K
from kvdirect.errors import StoreError
from kvdirect.stores import ScatterList, Store, open_store
from kvdirect.stores.base import OK, TOO_LARGE
from kvdirect.stores.shm import destroy_pool, pool_path

from _rel import Device, Driver, make_cache, report, tokens_of, uniq

PKG = pathlib.Path(__file__).resolve().parents[2] / "python" / "kvdirect"
P = 4


@pytest.fixture
def name():
    n = uniq("relsec")
    yield n
    destroy_pool(n, missing_ok=True)


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_pool_files_are_0600_through_every_creation_path(name, tmp_path):
    old = os.umask(0)
    try:
        with open_store(f"shm://{name}?size=2MiB") as s:  # the store API
            assert _mode(s.path) == 0o600
        destroy_pool(name)
        dev = Device(P)
        c = make_cache(dev, f"shm://{name}?size=2MiB", allow_no_store=False)  # the cache manager's default path
        assert _mode(pool_path(name)) == 0o600
        c.close()
        destroy_pool(name)
        r = subprocess.run([sys.executable, "-m", "kvdirect", "pool", "create", name, "--size", "2MiB"],
                           capture_output=True, text=True, timeout=120)  # the CLI
        assert r.returncode == 0, r.stderr
        assert _mode(pool_path(name)) == 0o600
    finally:
        os.umask(old)


def _digest(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _refused_and_untouched(name, match):
    """Opening is refused with a clear error; an engine configured with it runs without the pool
    and never writes into the file."""
    path = pool_path(name)
    before = _digest(path)
    with pytest.raises(StoreError, match=match):
        open_store(f"shm://{name}")
    dev = Device(P)
    with pytest.raises(StoreError, match=match):
        make_cache(dev, f"shm://{name}", allow_no_store=False)
    c = make_cache(dev, f"shm://{name}")  # allow_no_store: serve without a pool
    assert c.store is None
    drv = Driver(c, dev)
    for i in range(5):
        drv.serve(tokens_of(6 * P, i % 2))
    c.close()
    assert drv.wrong_bytes == 0
    assert _digest(path) == before


def test_world_writable_pool_is_refused(name):
    with open_store(f"shm://{name}?size=2MiB") as s:
        s.put_bytes("k", b"v")
    os.chmod(pool_path(name), 0o602)  # writable by others only
    _refused_and_untouched(name, r"mode 602 .*writable")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the pool file to another user")
def test_pool_of_another_user_is_refused(name):
    with open_store(f"shm://{name}?size=2MiB") as s:
        s.put_bytes("k", b"v")
    os.chown(pool_path(name), 65534, 65534)  # nobody
    _refused_and_untouched(name, r"owned by uid 65534, not by this user")


def test_symlinked_pool_path_is_not_followed(name, tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious" * 1000)
    os.symlink(victim, pool_path(name))
    try:
        for create in ("auto", "no", "yes"):
            with pytest.raises((StoreError, Exception)) as ei:
                open_store(f"shm://{name}?size=2MiB&create={create}")
            assert "symbolic link" in str(ei.value) or "exists" in str(ei.value), str(ei.value)
        assert victim.read_bytes() == b"precious" * 1000
    finally:
        os.unlink(pool_path(name))


# ---------------------------------------------------------------------------------------------
# tenants

class RecordingStore(Store):
    """Records the keys every get/exists asked for."""

    scheme = "shm"

    def __init__(self, inner):
        self.inner, self.asked = inner, set()

    def exists(self, keys):
        self.asked.update(keys)
        return self.inner.exists(keys)

    def put(self, keys, scatter):
        return self.inner.put(keys, scatter)

    def get(self, keys, scatter):
        self.asked.update(keys)
        return self.inner.get(keys, scatter)

    def remove(self, keys):
        return self.inner.remove(keys)

    def put_bytes(self, key, data):
        return self.inner.put_bytes(key, data)

    def get_bytes(self, key):
        self.asked.add(key)
        return self.inner.get_bytes(key)


def test_tenants_with_identical_tokens_never_read_each_others_pages(name):
    url = f"shm://{name}?size=16MiB&block=4KiB"
    salts = ["tenant-a", "tenant-b", "tenant-A", "tenant-a ", "租户", None]
    docs = [tokens_of(8 * P + 2, 40 + i) for i in range(4)]
    stores, caches, drivers = {}, {}, {}
    for s in salts:
        dev = Device(P, slots=256)
        stores[s] = RecordingStore(open_store(url))
        caches[s] = make_cache(dev, stores[s])
        drivers[s] = Driver(caches[s], dev, namespace=s)
    try:
        fp = caches[salts[0]].fingerprint
        own_keys = {s: set() for s in salts}
        for s in salts:
            seed = K.namespace_seed(extra_key=s)
            for d in docs:
                own_keys[s].update(K.pool_keys(K.page_digests(d, P, namespace_seed=seed), fp))
        for a in salts:  # identical tokens, different tenants: disjoint key sets
            for b in salts:
                if a != b:
                    assert not own_keys[a] & own_keys[b], (a, b)
        # tenant a writes everything first; then every tenant serves the same documents twice
        for d in docs:
            drivers["tenant-a"].serve(d)
        caches["tenant-a"].flush()
        for rnd in range(2):
            for s in salts:
                for d in docs:
                    m = caches[s].match(d, s)
                    if rnd == 0 and s != "tenant-a":
                        assert m.device_len == 0 and m.pool_len == 0, s  # nothing from tenant a
                    drivers[s].serve(d)
                caches[s].flush()
                caches[s].evict(10**6)
        for s in salts:
            assert drivers[s].wrong_bytes == 0
            foreign = stores[s].asked - own_keys[s]
            assert not foreign, f"tenant {s!r} asked the pool for {len(foreign)} keys of other tenants"
            assert drivers[s].loaded_tokens > 0  # each tenant did reuse its own pages
        report("tenant_isolation", tenants=len(salts), identical_documents=len(docs),
               cross_tenant_keys_asked=0, wrong_kv_bytes=0)
    finally:
        for c in caches.values():
            c.close()


# ---------------------------------------------------------------------------------------------
# nothing read back is unpickled or evaluated

FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}
FORBIDDEN_ATTRS = {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("np", "load"), ("numpy", "load")}


def test_no_pickle_or_eval_in_the_package():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 10
    hits = []
    for f in files:
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            where = f"{f.relative_to(PKG)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for m in mods:
                    if m.split(".")[0] in FORBIDDEN_MODULES:
                        hits.append(f"{where} imports {m}")
            elif isinstance(node, ast.Call):
                fn = node.func
                if isinstance(fn, ast.Name) and fn.id in FORBIDDEN_CALLS:
                    hits.append(f"{where} calls {fn.id}()")
                if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and \
                        (fn.value.id, fn.attr) in FORBIDDEN_ATTRS:
                    hits.append(f"{where} calls {fn.value.id}.{fn.attr}()")
    assert not hits, "code that could execute stored data:\n" + "\n".join(hits)


def test_the_scan_catches_what_it_looks_for(tmp_path):
    """The scanner itself works: a planted pickle.loads / eval is reported."""
    bad = "import pickle\nx = pickle.loads(b'')\ny = eval('1')\nimport numpy as np\nnp.load('f', allow_pickle=True)\n"
    tree = ast.parse(bad)
    found = {type(n).__name__ for n in ast.walk(tree)
             if isinstance(n, ast.Import) and n.names[0].name in FORBIDDEN_MODULES
             or isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in FORBIDDEN_CALLS
             or isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
             and (n.func.value.id, n.func.attr) in FORBIDDEN_ATTRS}
    assert found == {"Import", "Call"}


# ---------------------------------------------------------------------------------------------
# bounded sizes

def test_object_sizes_are_bounded_by_the_pool(name):
    with open_store(f"shm://{name}?size=32MiB&block=64KiB") as s:
        cap = s.stats()["capacity"]
        big = np.random.default_rng(0).integers(0, 256, cap - (1 << 20), dtype=np.uint8)
        assert s.put_bytes("big", big)
        data = s.get_bytes("big")
        assert data is not None and len(data) == big.nbytes and data == big.tobytes()
        huge = np.zeros(cap + 4096, np.uint8)
        st = s.put(["huge"], ScatterList(np.array([[huge.ctypes.data]], np.uint64),
                                         np.array([[huge.nbytes]], np.uint64)))
        assert st.tolist() == [TOO_LARGE] and not s.exists(["huge"])[0]


@pytest.mark.parametrize("field,off,value,match", [
    ("file_size", 24, 1 << 50, r"header says"),
    ("block_size", 32, 1 << 40, r"inconsistent"),
    ("nblocks", 40, 1 << 40, r"inconsistent"),
    ("objs_off", 56, 1 << 60, r"inconsistent"),
])
def test_header_fields_are_bounded(name, field, off, value, match):
    with open_store(f"shm://{name}?size=2MiB") as s:
        path = s.path
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<Q", value))
    with pytest.raises(StoreError, match=match):
        open_store(f"shm://{name}")


_CORRUPT_RECORD = r"""
import struct, sys
from kvdirect.stores import open_store
s = open_store("shm://{name}?size=2MiB&block=4KiB")
s.put_bytes("victimkey", b"v" * 5000)
data = open(s.path, "rb").read()
rec = data.find(b"victimkey") - 80          # ObjRec: 80 bytes of fields, then the key
with open(s.path, "r+b") as f:
    f.seek(rec + 24)                          # ObjRec.size
    f.write(struct.pack("<Q", {size}))
st, b = s.get_bytes_status("victimkey")
print("STATUS", st, None if b is None else len(b))
"""


@pytest.mark.parametrize("size", [9000, 1 << 40])
def test_corrupted_object_record_is_a_clean_miss(name, size):
    r = subprocess.run([sys.executable, "-c", _CORRUPT_RECORD.format(name=name, size=size)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stderr[-2000:]}"
    assert "STATUS 4 None" in r.stdout, r.stdout  # CORRUPT, nothing returned
