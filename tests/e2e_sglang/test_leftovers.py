"""A stopped or killed SGLang server leaves nothing in /dev/shm, and nobody else's file goes.

SGLang's processes make ``sem.mp-*`` semaphores (a multiprocessing lock, e.g.
tqdm's while loading weights) and a ``sglang_loads_*.shm`` load snapshot, and
SGLang ends its children with SIGKILL, so these stay behind unless whoever
started the server removes them. ``Server.stop`` removes exactly the files its
own processes made (``kvdirect.shm_leftovers``); files with the same prefixes
made by other processes -- one still in use, one nobody has open -- stay.
One server is stopped (SIGTERM), one is SIGKILLed inside a network namespace.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import uuid
from pathlib import Path

from test_mooncake import TwoHosts
from test_shared_pool import kv_config

SHM = Path("/dev/shm")


def tree_files(server) -> set[str]:
    """The /dev/shm files the server's processes map or hold open now, read from /proc by
    the test itself (by inode: glibc maps a semaphore under a temporary name)."""
    inodes = set()
    for pid in server._pids():
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                f = line.split(maxsplit=5)
                if len(f) == 6 and f[5].startswith("/dev/shm/"):
                    inodes.add(int(f[4]))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                if st.st_dev == os.stat(SHM).st_dev:
                    inodes.add(st.st_ino)
        except OSError:
            pass
    return {e.name for e in os.scandir(SHM) if e.inode() in inodes and not e.name.startswith("kvdirect-")}


def test_servers_remove_their_dev_shm_files_only(farm, pools):
    tag = uuid.uuid4().hex[:8]
    before = SHM / f"sem.mp-kvd{tag}a"  # another process's semaphore-named file, older than the servers
    before.write_bytes(b"x")
    hosts = None if TwoHosts.unavailable() else TwoHosts().up()
    decoys = [before]
    try:
        url = pools.new()
        plain, killed = farm.start_all([
            dict(kvdirect_config=kv_config(url), name="leftovers-term"),
            dict(kvdirect_config=kv_config(url), name="leftovers-kill", netns=hosts.ns[0] if hosts else None)])
        # made by another process while the servers run: a live semaphore, files nobody has open
        live = mp.get_context("spawn").Lock()
        decoys += [SHM / ("sem." + live._semlock.name.lstrip("/")), SHM / f"sem.mp-kvd{tag}b",
                   SHM / f"sglang_loads_kvd{tag}.shm"]
        for d in decoys[2:]:
            d.write_bytes(b"x")
        ids = list(range(1, 60))
        assert plain.generate(ids)["output_ids"] == killed.generate(ids)["output_ids"]
        made = {s.name: tree_files(s) for s in (plain, killed)}
        for name, files in made.items():
            assert any(f.startswith("sem.mp-") for f in files) and any(f.startswith("sglang_loads_") for f in files), \
                f"{name}: expected SGLang's semaphore and load snapshot among {sorted(files)}"
        killed.kill()                      # SIGKILL, nothing of SGLang's own clean-up runs
        removed = {s.name: s.stop() for s in (killed, plain)}
        for name, files in made.items():
            assert files <= set(removed[name]), f"{name} left {sorted(files - set(removed[name]))}"
            assert not [f for f in files if (SHM / f).exists()]
        assert all(d.exists() for d in decoys), f"another process's file was removed: {[str(d) for d in decoys]}"
        assert (SHM / f"kvdirect-{url.split('//')[1].split('?')[0]}").exists(), "the pool outlives its servers"
        del live
    finally:
        farm.stop_all()
        if hosts is not None:
            hosts.down()
        for d in [before, *decoys[2:]]:
            d.unlink(missing_ok=True)
