"""Several hosts: three SGLang servers in three network namespaces share one Mooncake pool.

The namespaces hang off one Linux bridge (in a fourth namespace), addresses in
198.18.0.0/15; ``mooncake_master`` runs on host 1. Hosts 1 and 2 serve documents, host 3
serves prompts that share them (pool hits across the bridge). Host 2 is then killed
(SIGKILL) and started again mid-run: the pages in its Mooncake segment are gone, host 3
keeps serving (what it cannot fetch it recomputes and writes again), and the restarted
host 2 serves new documents that host 3 then hits. Every output equals the references.

Afterwards the pool is audited from inside host 1: ``kvdirect pool audit`` (every listed
object read whole, key format, page sizes) must be clean, and every object's bytes must
equal the same key's bytes in a clean run: one server on an shm pool that served the same
requests in the same order (so the same pages were computed the same way). An object the
clean run does not have, or whose bytes differ, fails the test; so does a key the master
lists that cannot be read.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from audit import page_keys
from conftest import expected_hit
from kvdirect.services import find_mooncake_master, free_ports, mooncake_store_url
from kvdirect.demo.sglang_cpu.client import cached_tokens
from test_mooncake import PUT_TIMEOUT_S, TwoHosts, _ip, master_in_netns, master_keys, wait_keys
from test_shared_pool import kv_config
from workload import OUTPUT_LEN, Workload

PAGE = 16


class Hosts:
    """``n`` network namespaces on one bridge (made and removed by the test)."""

    def __init__(self, n: int):
        tag = uuid.uuid4().hex[:6]
        self.switch = f"kvd-sw-{tag}"
        self.ns = [f"kvd-h{i}-{tag}" for i in range(n)]
        self.veth = [(f"kvh{i}{tag}", f"kvs{i}{tag}") for i in range(n)]
        octet = int(tag[:2], 16)
        self.addr = [f"198.19.{octet}.{i + 1}" for i in range(n)]
        self.made = []

    def up(self):
        _ip("netns", "add", self.switch)
        self.made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for ns, (host_end, switch_end), addr in zip(self.ns, self.veth, self.addr):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", switch_end)
            _ip("link", "set", host_end, "netns", ns)
            _ip("link", "set", switch_end, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", switch_end, "master", "br0")
            _ip("-n", self.switch, "link", "set", switch_end, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", host_end)
            _ip("-n", ns, "link", "set", host_end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def down(self):
        for ns in self.made:  # deleting a namespace removes its ends of the veth pairs
            _ip("netns", "del", ns, check=False)
        self.made.clear()


#: runs inside a namespace: sha256 of every listed object's bytes (None: unreadable)
_READ_BACK = r"""
import hashlib, json, sys
from kvdirect.stores import open_store
job = json.load(sys.stdin)
store = open_store(job["url"])
try:
    keys = [k for k, _ in store.list_objects()]
    out = {}
    for k in keys:
        try:
            b = store.get_bytes(k)
        except Exception as e:  # reported per key
            b = None
        out[k] = None if b is None else hashlib.sha256(b).hexdigest()
finally:
    store.close()
json.dump(out, sys.stdout)
"""


def settle_keys(metrics_url: str, ns: str, quiet_s: float = 3.0, timeout: float = 120) -> int:
    """The master's key count once it has not changed for ``quiet_s`` (write-backs over)."""
    deadline = time.monotonic() + timeout
    last, since = master_keys(metrics_url, ns), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.3)
        now = master_keys(metrics_url, ns)
        if now != last:
            last, since = now, time.monotonic()
    return last


def read_back(ns: str, url: str) -> dict:
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _READ_BACK], input=json.dumps({"url": url}),
                       capture_output=True, text=True, timeout=600, cwd="/")
    assert r.returncode == 0, f"reading the pool back failed: {r.stderr[-3000:]}"
    return json.loads(r.stdout)


def audit(ns: str, url: str) -> dict:
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "kvdirect", "pool", "audit", url, "--json",
                        "--progress-every", "0"], capture_output=True, text=True, timeout=600, cwd="/")
    assert r.returncode == 0, f"kvdirect pool audit found faults (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    return json.loads(r.stdout)


def test_three_hosts_one_restarted_pool_audited(farm, pools, references):
    why = TwoHosts.unavailable()
    if why:
        pytest.skip(f"network namespaces cannot be created here: {why}")
    exe = find_mooncake_master()
    assert exe, "mooncake_master not found in the SGLang environment"
    wl = Workload(per_level=3)
    docs = list(wl.docs)
    first, second, third = docs[:2], docs[2:4], docs[4:]
    shared = [p for p in wl.prompts if p[0] > 0]
    fresh = [p for p in wl.prompts if p[0] == 0]
    hosts = Hosts(3).up()
    master = None
    try:
        h1, h2, h3 = hosts.ns
        a1, a2, a3 = hosts.addr
        rpc, http, metrics = free_ports(3)
        master = master_in_netns(exe, h1, a1, rpc, http, metrics)
        url = lambda local, timeout=PUT_TIMEOUT_S: mooncake_store_url(a1, rpc, http, segment="64MiB", buffer="32MiB",
                                                                      local=local, timeout=timeout)
        admin = f"http://{a1}:{metrics}"
        metrics_url = f"{admin}/metrics"
        host = lambda ns, addr, name, **kw: dict(kvdirect_config=kv_config(url(addr, **kw)), netns=ns, name=name)
        # host 3 reads from the others' segments: a shorter deadline, so reads from host 2's
        # dead segment fail fast (writers keep the long one, see PUT_TIMEOUT_S)
        s1, s2, s3 = farm.start_all([host(h1, a1, "host-1"), host(h2, a2, "host-2"),
                                     host(h3, a3, "host-3", timeout=10)])
        served = []  # every request, in order: the clean run repeats them

        def serve(server, seqs, hits=None):
            results = server.generate_many(seqs, OUTPUT_LEN)
            for i, (ids, r) in enumerate(zip(seqs, results)):
                assert r["output_ids"] == references[ids.tobytes()], f"{server.name}: wrong output"
                if hits is not None:
                    got = cached_tokens(r["meta_info"])["pool"]
                    assert got == hits[i], f"{server.name}: {got} pool-hit tokens, expected {hits[i]}"
            served.extend(seqs)

        pages = lambda seqs: len(seqs) * (wl.prompt_len // PAGE)
        serve(s1, first)
        serve(s2, second)
        assert wait_keys(metrics_url, pages(first + second), netns=h1) >= pages(first + second)
        # host 3 hits pages living in hosts 1 and 2's segments
        hit_first = [p for p in shared if any(p[2][0] == d[0] for d in first + second)]
        serve(s3, [p[2] for p in hit_first], [expected_hit(p[1], wl.prompt_len, PAGE) for p in hit_first])

        # host 2 goes away and comes back (a new process, a new segment)
        s2.kill()
        serve(s3, second)  # host 2's pages are gone: recomputed (and written again), never wrong
        s2b = farm.start(**host(h2, a2, "host-2-restarted"))
        serve(s2b, third)
        assert wait_keys(metrics_url, pages(third), netns=h1) >= pages(third)
        rest = [p for p in shared if not any(p is q for q in hit_first)]  # tuples holding arrays: by identity
        serve(s3, [p[2] for p in rest], [expected_hit(p[1], wl.prompt_len, PAGE) for p in rest])
        serve(s3, [p[2] for p in fresh], [0] * len(fresh))
        for s in (s1, s2b, s3):
            assert s.alive(), s.log_tail()

        # host 3's last write-backs are asynchronous: wait until the pool stops growing
        settle_keys(metrics_url, h1)
        # the pool, read from host 1: the audit is clean, every object equals the clean run's
        audit_url = f"{url(a1)}&admin={admin}".replace("segment=64MiB", "segment=0")
        report = audit(h1, audit_url)
        pool = read_back(h1, audit_url)
    finally:
        farm.stop_all()
        if master is not None:
            os.killpg(master.pid, 9)
            master.wait()
        hosts.down()

    clean_url = pools.new()
    clean = farm.start(kvdirect_config=kv_config(clean_url), name="clean-run")
    for ids, r in zip(served, clean.generate_many(served, OUTPUT_LEN)):
        assert r["output_ids"] == references[ids.tobytes()]
    farm.stop_all()
    from kvdirect.stores import open_store

    store = open_store(clean_url)
    try:
        want = {k: hashlib.sha256(store.get_bytes(k)).hexdigest() for k, _ in store.list_objects()}
    finally:
        store.close()
    unreadable = [k for k, h in pool.items() if h is None]
    unexpected = [k for k in pool if k not in want]
    differ = [k for k, h in pool.items() if h is not None and k in want and want[k] != h]
    assert not unreadable, f"{len(unreadable)} listed objects cannot be read"
    assert not unexpected, f"{len(unexpected)} objects no clean run writes"
    assert not differ, f"{len(differ)} of {len(pool)} objects differ from the clean run"
    assert report.get("objects") == len(pool) > 0, (report.get("objects"), len(pool))
    # the prompt pages of the documents served after the restart are all there. Objects in
    # host 2's segment died with it, whoever wrote them (the master places objects in any
    # host's segment); an instance that still holds such a page on its device (host 3, which
    # loaded it) believes it stored and does not write it again, so the pool may hold fewer
    # objects than the clean run (never others)
    prefix = next(iter(want)).rsplit("/", 1)[0] + "/"
    must = page_keys(prefix, third, PAGE)
    assert must and not [k for k in must if k not in pool], "pages written after the restart are missing"
    assert len(must) <= len(pool) <= len(want), (len(must), len(pool), len(want))
