"""kvdirect.shm_leftovers: a killed process tree's /dev/shm files go, nobody else's.

The tree here is a Python process in its own session that makes what SGLang's
processes make (a multiprocessing semaphore ``sem.mp-*``, a pid-stamped
``sgl_shm_*`` file, a file it keeps open) and opens a kvdirect pool file; it is
SIGKILLed. Files with the same prefixes made by another process (before the tree
started, after it, open or not) must stay: a prefix sweep would unlink another
user's semaphore under its engine.
"""
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kvdirect.shm_leftovers import ShmLeftovers, creator_pid, group_pids

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs /dev/shm (Linux)")

TREE = r"""
import multiprocessing as mp, os, sys, time
lock = mp.get_context("spawn").Lock()           # /dev/shm/sem.mp-*: glibc maps a temporary name first
stamped = f"/dev/shm/sgl_shm_test_{os.getpid()}_{os.urandom(4).hex()}"
open(stamped, "wb").write(b"x")                  # closed at once: known by the pid in its name
held = open(f"/dev/shm/kvdtest-held-{os.getpid()}", "wb")   # kept open
pool = open(sys.argv[1], "ab")                   # a kvdirect pool this tree uses (and here creates)
print("sem." + lock._semlock.name.lstrip("/"), os.path.basename(stamped), os.path.basename(held.name), flush=True)
time.sleep(600)
"""


def test_creator_pid_of_sglang_names():
    assert creator_pid("sgl_shm_mm_1234_ab12cd34") == 1234
    assert creator_pid("sgl_shm_node_check_77_ab12cd34") == 77
    assert creator_pid("multi_tokenizer_args_4321") == 4321
    assert creator_pid("sem.mp-x1y2z3") is None and creator_pid("sgl_shm_x") is None


def test_killed_tree_leaves_nothing_and_others_files_stay(tmp_path):
    import multiprocessing as mp

    tag = uuid.uuid4().hex[:8]
    pre = SHM / f"sem.mp-kvdtest{tag}pre"          # another process's, older than the tree
    pre.write_bytes(b"x")
    pool = SHM / f"kvdirect-kvdtest-{tag}"
    leftovers = ShmLeftovers()
    tree = subprocess.Popen([sys.executable, "-c", TREE, str(pool)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    others = []
    try:
        made = tree.stdout.readline().split()
        assert len(made) == 3, made
        # other processes' files, made while the tree runs: a live semaphore (this process),
        # a file nobody has open, one stamped with this process's pid
        live_lock = mp.get_context("spawn").Lock()
        live = "sem." + live_lock._semlock.name.lstrip("/")
        orphan = SHM / f"sem.mp-kvdtest{tag}post"
        orphan.write_bytes(b"x")
        stamped = SHM / f"sgl_shm_test_{os.getpid()}_{tag}"
        stamped.write_bytes(b"x")
        others = [pre, orphan, stamped, SHM / live]
        leftovers.note(group_pids(tree.pid))
        assert set(made) <= set(leftovers.owned())
        os.killpg(tree.pid, signal.SIGKILL)        # no clean-up code of the tree runs
        tree.wait(30)
        deadline = time.monotonic() + 30
        while group_pids(tree.pid) and time.monotonic() < deadline:  # its resource tracker, too
            time.sleep(0.05)
        assert all((SHM / n).exists() for n in made), "the tree's files should be left behind by SIGKILL"
        removed = leftovers.remove()
        assert sorted(removed) == sorted(made)
        assert not [n for n in made if (SHM / n).exists()]
        assert {made[0], made[2]} <= set(leftovers.seen())  # what it mapped or held stays on record
        assert not set(leftovers.seen()) & {p.name for p in others}
        assert all(p.exists() for p in others), [str(p) for p in others if not p.exists()]
        assert pool.exists(), "a kvdirect pool outlives the processes that use it"
        del live_lock
    finally:
        if tree.poll() is None:
            os.killpg(tree.pid, signal.SIGKILL)
            tree.wait()
        for p in [pre, pool, *others[:3]]:
            p.unlink(missing_ok=True)
