"""Optional Prometheus exposition of ``KVDirectCache.stats()`` (needs prometheus_client)."""
from __future__ import annotations


def register_prometheus(cache, registry=None, prefix: str = "kvdirect"):
    """Expose a cache's counters and latency percentiles on a prometheus_client registry.

    Values are read from ``cache.stats()`` at scrape time (no extra work on the
    serving path). Returns the collector (pass it to ``registry.unregister``)."""
    try:
        from prometheus_client import REGISTRY
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    except ImportError as e:
        from kvdirect.errors import ConfigError
        raise ConfigError("Prometheus metrics need prometheus_client: pip install 'kvdirect[metrics]'") from e

    class _Collector:
        def collect(self):
            s = cache.stats()
            for name in type(cache)._counter_names():
                yield CounterMetricFamily(f"{prefix}_{name}", f"kvdirect {name.replace('_', ' ')}",
                                          value=s[name])
            fails = CounterMetricFamily(f"{prefix}_failures", "store failures by kind", labels=["kind"])
            for kind, n in s["failures"].items():
                fails.add_metric([kind], n)
            yield fails
            for op in ("load_ms", "store_ms"):
                g = GaugeMetricFamily(f"{prefix}_{op}", f"{op[:-3]} latency percentiles (ms)",
                                      labels=["quantile"])
                for q in ("p50", "p90", "p99"):
                    if q in s[op]:
                        g.add_metric([q], s[op][q])
                yield g
            for name in ("inflight_pages", "quarantined_slots", "device_tokens"):
                yield GaugeMetricFamily(f"{prefix}_{name}", name.replace("_", " "), value=s[name])
            yield GaugeMetricFamily(f"{prefix}_store_available", "1 when the pool is in use",
                                    value=float(s["store_available"]))

    collector = _Collector()
    (registry or REGISTRY).register(collector)
    return collector
