"""The connector's KV connector stats and Prometheus metrics classes (kvdirect.vllm.stats), without an
engine; inside real engines they are checked by test_engine.py and test_pool_audit.py."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvdirect.vllm import stats


def test_stats_sum_counters_and_keep_the_largest_gauge():
    d = stats.Deltas()
    worker = {"loaded_pages": 3, "stored_pages": 2, "load_ms_total": 1.5}
    assert d.take(worker, stats.WORKER_COUNTERS, pending_save_pages=4) == \
        {"loaded_pages": 3, "saved_pages": 2, "pending_save_pages": 4}
    worker["loaded_pages"] = 5
    assert d.take(worker, stats.WORKER_COUNTERS, pending_save_pages=0) == {"loaded_pages": 2}  # changes only
    assert d.take(worker, stats.WORKER_COUNTERS) == {}

    a = stats.KVDirectConnectorStats(data={"loaded_pages": 2, "pending_save_pages": 4})
    b = stats.KVDirectConnectorStats(data={"loaded_pages": 3, "hit_tokens": 7, "pending_save_pages": 1})
    s = a.aggregate(b)  # ranks / steps: counters add up, the gauge keeps its largest value
    assert s.reduce() == {"hit_tokens": 7, "loaded_pages": 5, "pending_save_pages": 4}
    assert not s.is_empty() and stats.KVDirectConnectorStats(data={"loaded_pages": 0}).is_empty()


def test_prometheus_counters_and_gauge():
    reg = CollectorRegistry()

    def bound(cls):
        return type(cls.__name__, (cls,), {"__init__": lambda self, *a, **k: cls.__init__(self, *a, registry=reg, **k)})

    types = {Gauge: bound(Gauge), Counter: bound(Counter), Histogram: bound(Histogram)}
    vc = type("VC", (), {"kv_transfer_config": None})()
    m = stats.KVDirectPromMetrics(vc, types, ["engine"], {0: ["0"]})
    m.observe({"hit_tokens": 5, "loaded_bytes": 100, "pending_save_pages": 3})
    m.observe({"hit_tokens": 2, "save_withheld_pages": 4})
    v = {(s.name, tuple(s.labels.values())): s.value for f in reg.collect() for s in f.samples}
    assert v[("vllm:kvdirect_hit_tokens_total", ("0",))] == 7
    assert v[("vllm:kvdirect_loaded_bytes_total", ("0",))] == 100
    assert v[("vllm:kvdirect_save_withheld_pages_total", ("0",))] == 4
    assert v[("vllm:kvdirect_pending_save_pages", ("0",))] == 0  # the latest step's value
