"""What passes between the connector's scheduler side and its workers (picklable, no vLLM).

Scheduler -> workers, once per step (:class:`StepPlan`): which pages to load into
which blocks before the forward, which to save after it, which requests were
preempted. Workers -> scheduler (:class:`WorkerReport`): per-page results of
saves the store acknowledged and the first page of each failed load. A page is
named by its 32-byte digest (SHA-256 chain over the tokens, kvdirect.keys);
every worker forms the pool key with its own layout fingerprint.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PageRun:
    """Consecutive pages ``first_page ..`` of one request and the blocks that hold them."""

    req_id: str
    first_page: int
    digests: np.ndarray    # uint8 [n, 32]
    block_ids: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.block_ids)


@dataclass
class StepPlan:
    loads: list[PageRun] = field(default_factory=list)
    saves: list[PageRun] = field(default_factory=list)
    preempted: frozenset = frozenset()
    fingerprint_digests: tuple = ()  # per TP rank, as the scheduler keys pages (checked by workers)


@dataclass
class SaveAck:
    rank: int
    req_id: str
    first_page: int
    ok: np.ndarray  # bool [n]: page stored (whole object acknowledged) on this rank


@dataclass
class WorkerReport:
    acks: list[SaveAck] = field(default_factory=list)
    load_failures: list[tuple[str, int]] = field(default_factory=list)  # (req_id, first failed page)

    def merge(self, other: "WorkerReport") -> "WorkerReport":
        return WorkerReport(self.acks + other.acks, self.load_failures + other.load_failures)

    def __bool__(self) -> bool:
        return bool(self.acks or self.load_failures)
