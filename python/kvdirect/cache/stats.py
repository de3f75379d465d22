"""Counters, failure kinds and latency windows of one cache (thread-safe)."""
from __future__ import annotations

import collections
import threading

import numpy as np

COUNTERS = ("match_calls", "device_hit_tokens", "pool_hit_tokens", "miss_tokens",
            "query_keys", "load_calls", "loaded_pages", "loaded_bytes", "load_failed_pages",
            "stored_pages", "stored_bytes", "store_failed_pages", "skipped_existing_pages",
            "dropped_writeback_pages", "evicted_tokens")


class CacheStats:
    def __init__(self, window: int):
        self.c = dict.fromkeys(COUNTERS, 0)
        self.failures: collections.Counter = collections.Counter()
        self.load_ms = collections.deque(maxlen=window)
        self.store_ms = collections.deque(maxlen=window)
        self.lock = threading.Lock()

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                self.c[k] += v

    def failure(self, kind: str) -> None:
        with self.lock:
            self.failures[kind] += 1

    def snapshot(self) -> dict:
        with self.lock:
            d = dict(self.c)
            d["failures"] = dict(self.failures)
            for name, q in (("load_ms", self.load_ms), ("store_ms", self.store_ms)):
                a = np.asarray(q, dtype=np.float64)
                d[name] = ({"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                            "p99": float(np.percentile(a, 99)), "count": int(a.size)} if a.size else
                           {"count": 0})
        return d
