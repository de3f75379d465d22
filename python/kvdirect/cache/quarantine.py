"""What a timed-out store call may still touch, held until the store is quiet.

A store call that timed out keeps running inside the client until it returns
(``stores/_remote.py``): a get may still write its destination, a put may still
read its source. Device slots such a get targeted are held here instead of
being freed, and clean-ups (dropping late puts, giving retired staging buffers
back) wait here, until the store's ``quiesce()`` reports that no abandoned call
is left. ``release`` runs on the scheduler thread (``poll``); writer threads
may ``defer`` concurrently.
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np


class Quarantine:
    def __init__(self, store, free_slots: Callable[[np.ndarray], None]):
        self.store = store
        self.free_slots = free_slots
        self._slots: list = []
        self._deferred: list = []
        self._lock = threading.Lock()

    def quiesced(self, timeout: float = 0.0) -> bool:
        """True when no store call that timed out can still touch memory."""
        q = getattr(self.store, "quiesce", None)
        return True if q is None else bool(q(timeout))

    def hold_slots(self, slots: np.ndarray) -> None:
        with self._lock:
            self._slots.append(slots)

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the store is quiet (on the scheduler thread, from ``release``)."""
        with self._lock:
            self._deferred.append(fn)

    @property
    def held_slots(self) -> int:
        return int(sum(len(s) for s in self._slots))

    def release(self) -> None:
        # snapshot first: whatever was held before a "quiet" answer is safe to let go;
        # what is held after it waits for the next release
        with self._lock:
            if not (self._slots or self._deferred):
                return
            slots, deferred = self._slots, self._deferred
            self._slots, self._deferred = [], []
        if not self.quiesced():
            with self._lock:
                self._slots[:0], self._deferred[:0] = slots, deferred
            return
        if slots:
            self.free_slots(np.concatenate(slots))
        for fn in deferred:
            fn()
