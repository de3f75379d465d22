"""The connector's figures in vLLM's KV connector stats and Prometheus (imports vLLM).

Every engine step, the scheduler side and each worker hand vLLM the change of
their counters since the last step (``get_kv_connector_stats``); vLLM sums the
workers' (TP ranks), adds the scheduler's, logs the sum over each logging
interval ("KV Transfer metrics: ...") and feeds each step's sum to
:class:`KVDirectPromMetrics`. Names (``vllm:kvdirect_<name>_total`` in Prometheus):

* ``hit_tokens``, ``hit_requests``: tokens vLLM took from the pool, requests with a pool hit;
* ``pool_queries``: batched existence queries of the scheduler;
* ``loaded_pages``, ``loaded_bytes``: pages and bytes read into vLLM's blocks (summed over TP ranks);
* ``load_failures``, ``load_failed_pages``: failed loads (recomputed by vLLM) and their pages;
* ``late_loads``: requests whose timed-out get may still write their blocks (held until quiet);
* ``saved_pages``, ``saved_bytes``: pages written to the pool (summed over TP ranks);
* ``save_failed_pages``: puts the store did not acknowledge;
* ``save_dropped_pages``: saves dropped at ``max_inflight_pages`` with ``backpressure: drop``;
* ``save_withheld_pages``: pages not saved because they were computed on a failed load
  (planned again after vLLM recomputes them);
* ``pending_save_pages`` (a gauge, ``vllm:kvdirect_pending_save_pages``): pages being written,
  the largest value seen in the interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

# exported name -> the scheduler's / worker's own counter
SCHEDULER_COUNTERS = {"hit_tokens": "hit_tokens", "hit_requests": "hit_requests", "pool_queries": "queries"}
WORKER_COUNTERS = {"loaded_pages": "loaded_pages", "loaded_bytes": "loaded_bytes",
                   "load_failures": "load_failures", "load_failed_pages": "load_failed_pages",
                   "late_loads": "late_load_requests", "saved_pages": "stored_pages", "saved_bytes": "stored_bytes",
                   "save_failed_pages": "store_failed_pages", "save_dropped_pages": "dropped_save_pages",
                   "save_withheld_pages": "save_withheld_pages",
                   "save_waits_for_loads": "writeback_waits_for_loads"}
GAUGES = ("pending_save_pages",)
COUNTERS = tuple(SCHEDULER_COUNTERS) + tuple(WORKER_COUNTERS)


class Deltas:
    """Changes of a counter dict since the last ``take``."""

    def __init__(self):
        self._last: dict[str, float] = {}

    def take(self, counters: dict, names: dict[str, str], **gauges) -> dict:
        out = {}
        for name, src in names.items():
            v = counters.get(src, 0)
            d = v - self._last.get(src, 0)
            self._last[src] = v
            if d:
                out[name] = d
        out.update({k: v for k, v in gauges.items() if v})
        return out


@dataclass
class KVDirectConnectorStats(KVConnectorStats):
    """Counters summed (over ranks and steps); gauges: the largest value."""

    def reset(self):
        self.data = {}

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in (other.data or {}).items():
            self.data[k] = max(self.data.get(k, 0), v) if k in GAUGES else self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: self.data[k] for k in (*COUNTERS, *GAUGES) if self.data.get(k)}


class KVDirectPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {name: self._counter_cls(name=f"vllm:kvdirect_{name}",
                                                  documentation=f"kvdirect connector: {name.replace('_', ' ')}",
                                                  labelnames=labelnames) for name in COUNTERS}
        self._gauges = {name: self._gauge_cls(name=f"vllm:kvdirect_{name}",
                                              documentation=f"kvdirect connector: {name.replace('_', ' ')}",
                                              labelnames=labelnames, multiprocess_mode="mostrecent")
                        for name in GAUGES}
        self._bound: dict[int, dict[str, Any]] = {}

    def _metrics(self, engine_idx: int) -> dict[str, Any]:
        m = self._bound.get(engine_idx)
        if m is None:
            labels = self.per_engine_labelvalues[engine_idx]
            m = {k: c.labels(*labels) for k, c in (*self._counters.items(), *self._gauges.items())}
            self._bound[engine_idx] = m
        return m

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        if not transfer_stats_data:
            return
        m = self._metrics(engine_idx)
        for k in COUNTERS:
            v = transfer_stats_data.get(k)
            if v:
                m[k].inc(v)
        for k in GAUGES:
            m[k].set(transfer_stats_data.get(k, 0))
