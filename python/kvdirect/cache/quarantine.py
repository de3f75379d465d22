"""What a timed-out store call may still touch, held until the store is quiet.

A store call that timed out keeps running inside the client until it returns
(``stores/_remote.py``): a get may still write its destination, a put may still
read its source. Device slots such a get targeted are held here instead of
being freed, and clean-ups (dropping late puts) wait here, until the store's
``quiesce()`` reports that no abandoned call is left.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


class Quarantine:
    def __init__(self, store, free_slots: Callable[[np.ndarray], None]):
        self.store = store
        self.free_slots = free_slots
        self._slots: list = []
        self._deferred: list = []

    def quiesced(self, timeout: float = 0.0) -> bool:
        """True when no store call that timed out can still touch memory."""
        q = getattr(self.store, "quiesce", None)
        return True if q is None else bool(q(timeout))

    def hold_slots(self, slots: np.ndarray) -> None:
        self._slots.append(slots)

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the store is quiet (on the scheduler thread, from ``release``)."""
        self._deferred.append(fn)

    @property
    def held_slots(self) -> int:
        return int(sum(len(s) for s in self._slots))

    def release(self) -> None:
        if not (self._slots or self._deferred) or not self.quiesced():
            return
        if self._slots:
            slots, self._slots = np.concatenate(self._slots), []
            self.free_slots(slots)
        deferred, self._deferred = self._deferred, []
        for fn in deferred:
            fn()
