"""What a process tree leaves in /dev/shm, found by ownership and removed once it is gone.

Engines leave files in /dev/shm when they are killed: SGLang's ``sem.mp-*``
semaphores (Python multiprocessing), ``sglang_loads_*.shm`` load snapshots,
``sgl_shm_*`` segments and ``multi_tokenizer_args_*``; vLLM's ``psm_*`` queues.
The code that starts such a process tree removes them afterwards with
:class:`ShmLeftovers`, and only the files that tree made, never by name prefix:
another user's engine on the same machine dies when its semaphore is unlinked
under it (``FileNotFoundError`` in ``SemLock._rebuild``).

A file counts as the tree's when it did not exist when the tree started and

* a process of the tree mapped it or held it open while alive (``note``, called
  periodically: the files are matched by inode, because glibc's ``sem_open``
  maps a temporary name and links it to ``sem.NAME`` afterwards), or
* its name carries the pid of a process of the tree (SGLang's
  ``sgl_shm_<kind>_<pid>_<rand>`` and ``multi_tokenizer_args_<pid>``).

``remove`` (after the tree is gone) unlinks those that no live process maps or
holds open. kvdirect's own shm pools (``kvdirect-NAME``) are never removed:
a pool outlives the processes that open it, whoever created it.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

SHM = Path("/dev/shm")
DURABLE_PREFIXES = ("kvdirect-",)  # pools: destroyed by whoever owns the URL, not by a server's stop


def _entries(shm: Path) -> dict[str, int]:
    """name -> inode of every file in the directory now."""
    out = {}
    try:
        it = list(os.scandir(shm))
    except OSError:
        return out
    for e in it:
        try:
            out[e.name] = e.inode()
        except OSError:
            pass
    return out


def creator_pid(name: str) -> int | None:
    """The creating pid a name carries (SGLang's pid-stamped families), else None."""
    try:
        if name.startswith("sgl_shm_"):
            parts = name.split("_")
            pid = int(parts[-2]) if len(parts) >= 5 else None
        elif name.startswith("multi_tokenizer_args_"):
            pid = int(name.rsplit("_", 1)[-1])
        else:
            return None
    except ValueError:
        return None
    return pid if pid and pid > 0 else None


def used_inodes(pids, shm: Path = SHM) -> set[int]:
    """Inodes of files under ``shm`` that the processes ``pids`` map or hold open."""
    try:
        dev = os.stat(shm).st_dev
    except OSError:
        return set()
    prefix = str(shm).encode() + b"/"
    out: set[int] = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_bytes()
        except OSError:
            maps = b""
        i = maps.find(prefix)
        while i >= 0:  # "addr perms offset dev inode path": the inode is the field before the path
            start = maps.rfind(b"\n", 0, i) + 1
            fields = maps[start:i].split()
            if len(fields) >= 5 and fields[4].isdigit():
                out.add(int(fields[4]))
            i = maps.find(prefix, i + 1)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if st.st_dev == dev:
                out.add(st.st_ino)
    return out


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def group_pids(pgid: int) -> list[int]:
    """Live pids of process group ``pgid`` (a tree started with ``start_new_session=True``:
    its group id is the first process's pid, and the group outlives that process)."""
    out = []
    for pid in all_pids():
        try:
            if os.getpgid(pid) == pgid:
                out.append(pid)
        except OSError:  # gone meanwhile
            pass
    return out


class ShmLeftovers:
    """The /dev/shm files of one process tree (see the module docstring). Create it
    before the tree starts; call ``note(pids)`` while it runs and ``remove()`` after."""

    def __init__(self, shm: Path | str = SHM):
        self.shm = Path(shm)
        self._before = set(_entries(self.shm).items())  # (name, inode) that are not the tree's
        self.pids: set[int] = set()
        self._seen: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def note(self, pids) -> None:
        """Remember the tree's pids and the files they map or hold open now."""
        pids = list(pids)
        if not pids:
            return
        inodes = used_inodes(pids, self.shm)
        now = _entries(self.shm)
        with self._lock:
            self.pids.update(pids)
            for name, ino in now.items():
                if ino in inodes and (name, ino) not in self._before:
                    self._seen.add((name, ino))

    def seen(self) -> list[str]:
        """Names of every file the tree was seen mapping or holding open (existing now or not)."""
        with self._lock:
            return sorted({name for name, _ in self._seen})

    def owned(self) -> list[str]:
        """Names of the files that exist now and are the tree's (used or not)."""
        with self._lock:
            seen, pids = set(self._seen), set(self.pids)
        out = []
        for name, ino in _entries(self.shm).items():
            if name.startswith(DURABLE_PREFIXES) or (name, ino) in self._before:
                continue
            if (name, ino) in seen or creator_pid(name) in pids:
                out.append(name)
        return sorted(out)

    def remove(self) -> list[str]:
        """Unlink the tree's files that no live process maps or holds open; returns their
        names. Call it after the tree has exited."""
        mine = self.owned()
        if not mine:
            return []
        busy = used_inodes(all_pids(), self.shm)
        removed = []
        for name in mine:
            path = self.shm / name
            try:
                if os.stat(path).st_ino in busy:
                    continue  # another process still uses it
                os.unlink(path)
                removed.append(name)
            except FileNotFoundError:
                pass
        return removed


class Watcher:
    """Calls ``leftovers.note(pids())`` every ``interval`` seconds on a daemon thread
    until ``stop()``, so files made and kept while the tree runs are known if it is
    killed between two explicit notes."""

    def __init__(self, leftovers: ShmLeftovers, pids, interval: float = 1.0):
        self.leftovers, self._pids, self.interval = leftovers, pids, interval
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="kvdirect-shm-watch", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.leftovers.note(self._pids())
            except Exception:  # noqa: BLE001 - a failed look is retried at the next tick
                time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)
