"""What passes between the connector's scheduler side and its workers (picklable, no vLLM).

Scheduler -> workers, once per step (:class:`StepPlan`): which pages to load into
which blocks before the forward, which to save after it, which requests were
preempted, which finished requests the scheduler holds until the workers say
they are done with their blocks. Workers -> scheduler (:class:`WorkerReport`):
per-page results of saves the store acknowledged, the first page of each failed
load, the first page of each save withheld because its blocks were not known
good, and the requests whose timed-out gets may still write their blocks. A page
is named by its 32-byte digest (SHA-256 chain over the tokens, kvdirect.keys);
every worker forms the pool key with its own layout fingerprint.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_NO_BLOCKS = np.zeros(0, dtype=np.int64)


@dataclass
class PageRun:
    """Consecutive pages ``first_page ..`` of one request and the blocks that hold them.

    Loads: ``recompute_tail`` says the forward of this step writes the request's first
    computed token into the run's last page (a hit that ends one token short of a
    whole page), so that page must be complete before the forward starts.
    Saves: ``prior_blocks`` are the request's blocks before ``first_page``: the pages
    of the run were computed reading them."""

    req_id: str
    first_page: int
    digests: np.ndarray    # uint8 [n, 32]
    block_ids: np.ndarray  # int64 [n]
    prior_blocks: np.ndarray = field(default_factory=lambda: _NO_BLOCKS)
    recompute_tail: bool = False

    def __len__(self) -> int:
        return len(self.block_ids)

    def head(self, n: int) -> "PageRun":
        """The first ``n`` pages of the run."""
        return PageRun(self.req_id, self.first_page, self.digests[:n], self.block_ids[:n], self.prior_blocks)


@dataclass
class StepPlan:
    loads: list[PageRun] = field(default_factory=list)
    saves: list[PageRun] = field(default_factory=list)
    preempted: frozenset = frozenset()
    held: frozenset = frozenset()    # finished requests whose blocks vLLM keeps until get_finished says so
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
    withheld: list[tuple[str, int]] = field(default_factory=list)       # (req_id, first page not saved)
    late_loads: list[str] = field(default_factory=list)  # requests whose timed-out gets may still write

    def merge(self, other: "WorkerReport") -> "WorkerReport":
        return WorkerReport(self.acks + other.acks, self.load_failures + other.load_failures,
                            self.withheld + other.withheld, self.late_loads + other.late_loads)

    def __bool__(self) -> bool:
        return bool(self.acks or self.load_failures or self.withheld or self.late_loads)
