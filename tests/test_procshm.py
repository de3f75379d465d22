"""kvdirect.procshm: the /dev/shm files of one process tree are removed, and nobody else's."""
import os
import signal
import subprocess
import sys
import time
import uuid
from multiprocessing import shared_memory

import pytest

from kvdirect.procshm import ShmFiles

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc") or not os.path.isdir("/dev/shm"),
                                reason="Linux /proc and /dev/shm needed")

# an "engine": it creates a psm_ file, starts a child that creates another, and both wait to be killed
ENGINE = r"""
import os, sys, time
from multiprocessing import shared_memory, resource_tracker
def make(tag):
    shm = shared_memory.SharedMemory(create=True, size=4096, name=f"psm_kvdtest_{tag}_{os.getpid()}")
    resource_tracker.unregister(shm._name, "shared_memory")  # as a killed engine: nobody unlinks it
    return shm
a = make("parent")
if os.fork() == 0:
    b = make("child")
    print("child", b.name, flush=True)
    time.sleep(60)
    os._exit(0)
print("parent", a.name, flush=True)
time.sleep(60)
"""


def test_files_of_a_killed_process_tree_are_removed_and_no_others():
    other = shared_memory.SharedMemory(create=True, size=4096, name=f"psm_kvdtest_other_{uuid.uuid4().hex[:8]}")
    p = subprocess.Popen([sys.executable, "-c", ENGINE], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        names = {p.stdout.readline().split()[1] for _ in range(2)}
        files = ShmFiles(p.pid)
        files.note()
        assert {f"/dev/shm/{n}" for n in names} <= files.seen
        assert f"/dev/shm/{other.name}" not in files.seen  # this process is not in the engine's group
        os.killpg(p.pid, signal.SIGKILL)  # no clean-up of its own
        p.wait()
        t0 = time.monotonic()
        while files.pids() and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert all(os.path.exists(f"/dev/shm/{n}") for n in names)  # left behind ...
        assert sorted(files.remove()) == sorted(f"/dev/shm/{n}" for n in names)  # ... removed by its starter
        assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
        assert os.path.exists(f"/dev/shm/{other.name}")  # another engine's file is untouched
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        other.close()
        other.unlink()
