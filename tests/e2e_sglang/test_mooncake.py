"""Real SGLang servers sharing a Mooncake Store pool (a real ``mooncake_master``, TCP):
on loopback, and as two hosts in two network namespaces joined by a veth pair."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid

import pytest

from kvdirect.services import find_mooncake_master, free_ports, mooncake_store_url, start_mooncake_master
from test_shared_pool import check_prompts, kv_config, serve_documents
from workload import Workload


def master_keys(metrics_url: str, netns: str | None = None) -> int:
    if netns:
        r = subprocess.run(["ip", "netns", "exec", netns, "python3", "-c",
                            f"import urllib.request;print(urllib.request.urlopen('{metrics_url}',timeout=5).read().decode())"],
                           capture_output=True, text=True, timeout=30)
        text = r.stdout
    else:
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    m = re.search(r"^master_key_count (\d+)", text, re.M)
    return int(m.group(1)) if m else 0


#: a store call's deadline: a timed-out put is a miss and backs the store off, which loses
#: the pages written meanwhile; on a 2-core machine running two servers (and, across the
#: namespaces, the first put opening a TCP connection to the peer's segment) 5 s is tight
PUT_TIMEOUT_S = 30


def master_in_netns(exe: str, ns: str, addr: str, rpc: int, http: int, metrics: int) -> subprocess.Popen:
    """``mooncake_master`` inside network namespace ``ns``, serving RPC, metadata and admin on ``addr``."""
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, exe, f"--rpc_port={rpc}", f"--rpc_address={addr}",
         "--enable_http_metadata_server=true", f"--http_metadata_server_host={addr}",
         f"--http_metadata_server_port={http}", f"--metrics_host={addr}", f"--metrics_port={metrics}",
         "--enable_metric_reporting=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_keys(metrics_url: str, n: int, netns: str | None = None, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        have = master_keys(metrics_url, netns)
        if have >= n or time.monotonic() > deadline:
            return have
        time.sleep(0.3)


def test_two_servers_over_mooncake(farm, references):
    wl = Workload(per_level=6)
    with start_mooncake_master() as master:
        url = lambda: mooncake_store_url("127.0.0.1", master.ports["rpc"], master.ports["http"],
                                         segment="64MiB", buffer="32MiB", timeout=PUT_TIMEOUT_S)
        a, b = farm.start_all([dict(kvdirect_config=kv_config(url()), name="A-mooncake"),
                               dict(kvdirect_config=kv_config(url()), name="B-mooncake")])
        serve_documents(a, wl, references)
        pages = len(wl.docs) * (wl.prompt_len // 16)
        metrics = f"http://127.0.0.1:{master.ports['metrics']}/metrics"
        assert wait_keys(metrics, pages) >= pages, f"server A's pages did not reach Mooncake:\n{a.log_tail(30)}"
        totals = check_prompts(b, wl, references, 16)
        assert totals["pool"] > 0
        farm.stop_all()


# ---- two hosts -------------------------------------------------------------------
def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


class TwoHosts:
    """Network namespaces A and B joined by a veth pair, addresses in 198.18.0.0/15 (the
    range set aside for network benchmarks), both made and removed by this test."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = (f"kvd-a-{tag}", f"kvd-b-{tag}")
        self.veth = (f"kva{tag}", f"kvb{tag}")
        octet = int(tag[:2], 16)
        self.addr = (f"198.18.{octet}.1", f"198.18.{octet}.2")
        self.made = []

    @staticmethod
    def unavailable() -> str:
        """Why namespaces cannot be made here ('' when they can)."""
        if shutil.which("ip") is None:
            return "the `ip` command (Debian package iproute2) is not installed"
        if os.geteuid() != 0:
            return "creating network namespaces needs root (CI runs as root)"
        probe = f"kvd-probe-{uuid.uuid4().hex[:6]}"
        r = _ip("netns", "add", probe, check=False)
        if r.returncode:
            return f"`ip netns add` failed: {r.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
        return ""

    def up(self):
        for ns in self.ns:
            _ip("netns", "add", ns)
            self.made.append(ns)
        _ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for ns, dev, addr in zip(self.ns, self.veth, self.addr):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def down(self):
        for ns in self.made:  # deleting a namespace removes its end of the veth pair (and so both)
            _ip("netns", "del", ns, check=False)
        self.made.clear()


def test_two_hosts_in_network_namespaces(farm, references):
    why = TwoHosts.unavailable()
    if why:
        pytest.skip(f"network namespaces cannot be created here: {why}")
    exe = find_mooncake_master()
    assert exe, "mooncake_master not found in the SGLang environment"
    hosts = TwoHosts().up()
    master = None
    try:
        ns_a, ns_b = hosts.ns
        host_a, host_b = hosts.addr
        rpc, http, metrics = free_ports(3)
        master = master_in_netns(exe, ns_a, host_a, rpc, http, metrics)
        # A writes with the long deadline; B keeps the default, so its loads from A's
        # segment fail fast once A is killed
        url = lambda local, timeout: mooncake_store_url(host_a, rpc, http, segment="64MiB", buffer="32MiB",
                                                        local=local, timeout=timeout)
        wl = Workload(per_level=6)
        a, b = farm.start_all([dict(kvdirect_config=kv_config(url(host_a, PUT_TIMEOUT_S)), netns=ns_a, name="host-A"),
                               dict(kvdirect_config=kv_config(url(host_b, 5)), netns=ns_b, name="host-B")])
        docs = a.generate_many(wl.docs)
        for doc, r in zip(wl.docs, docs):
            assert r["output_ids"] == references[doc.tobytes()]
        pages = len(wl.docs) * (wl.prompt_len // 16)
        metrics_url = f"http://{host_a}:{metrics}/metrics"
        assert wait_keys(metrics_url, pages, netns=ns_a) >= pages, \
            f"host A's pages did not reach Mooncake:\n{a.log_tail(30)}"
        # host B loads host A's pages across the link
        shared = [i for i, p in enumerate(wl.prompts) if p[0] > 0]
        first = set(shared[::2])
        half = Workload(per_level=6)
        half.prompts = [wl.prompts[i] for i in sorted(first)]
        totals = check_prompts(b, half, references, 16)
        assert totals["pool"] > 0
        # host A goes away: B keeps serving correct outputs (pages it cannot fetch are recomputed)
        a.kill()
        rest = [p for i, p in enumerate(wl.prompts) if i not in first]
        for (reuse, shared, ids), r in zip(rest, b.generate_many([p[2] for p in rest])):
            assert r["output_ids"] == references[ids.tobytes()], f"wrong output after host A died (reuse {reuse})"
        assert b.alive()
    finally:
        farm.stop_all()
        if master is not None:
            os.killpg(master.pid, 9)
            master.wait()
        hosts.down()
