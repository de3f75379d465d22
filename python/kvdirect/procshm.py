"""The /dev/shm files one process tree made, so that whoever started it removes exactly those.

Engines leave files in /dev/shm when they are killed or exit without their own clean-up
(vLLM's message queues ``psm_*``, SGLang's semaphores). Removing by name prefix would also
remove the files of engines other users run on the same machine, and those engines die. So
the starter of an engine (its own process group: ``start_new_session=True``) calls
:meth:`ShmFiles.note` while it runs (and once more before it stops it): every /dev/shm file a
process of that group maps or holds open is remembered; :meth:`ShmFiles.remove`, after the
group is gone, unlinks those of them that are still there and whose name has one of the
given prefixes. Linux only (``/proc``); elsewhere it notes nothing.
"""
from __future__ import annotations

import os
from pathlib import Path

SHM = "/dev/shm/"


class ShmFiles:
    def __init__(self, pgid: int, prefixes=("psm_",)):
        self.pgid, self.prefixes = int(pgid), tuple(prefixes)
        self.seen: set[str] = set()

    def pids(self) -> list[int]:
        out = []
        for d in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
            if d.name.isdigit():
                try:
                    if os.getpgid(int(d.name)) == self.pgid:
                        out.append(int(d.name))
                except OSError:
                    pass
        return out

    def note(self) -> None:
        """Remember the /dev/shm files the group's processes map or hold open now."""
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                    i = line.find(SHM)
                    if i >= 0:
                        self.seen.add(line[i:].split(" (deleted)")[0])
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    t = os.readlink(fd)
                    if t.startswith(SHM):
                        self.seen.add(t.split(" (deleted)")[0])
            except OSError:  # the process ended meanwhile
                pass

    def remove(self) -> list[str]:
        """Unlink the remembered files with one of the prefixes (call once the group is gone)."""
        gone = []
        for path in sorted(self.seen):
            if Path(path).name.startswith(self.prefixes):
                try:
                    os.unlink(path)
                    gone.append(path)
                except FileNotFoundError:
                    pass
        self.seen.clear()
        return gone
