"""Test-only: kvdirect's vLLM connector with its store wrapped in the project's fault injection
(kvdirect.stores._testing.FlakyStore). Never part of the connector.

driver.py loads ``kv_connector_module_path="faulty_kvdirect"`` for jobs with ``fault``; the
faults come from ``KVDIRECT_TEST_FAULTS`` (the job's JSON), so every process that loads the
connector gets them, also TP workers that vLLM's executor spawns (they inherit the environment
and sys.path). A spec: ``{"fail_rate", "ops", "seed", "mode": "error" | "timeout" | "evict",
"delay_s", "delay_rate", "delay_ops", "deadline_s", "seed_per_rank"}``; a list nests them, the
first innermost. ``seed_per_rank`` makes each TP rank fail other pages.
"""
import json
import os

from kvdirect.vllm import settings
from kvdirect.vllm.connector import KVDirectConnector  # noqa: F401 - the class vLLM loads from here


def _wrap(open_pool, faults):
    from kvdirect.stores._testing import FlakyStore

    def flaky_open(cfg):
        store = open_pool(cfg)
        rank = 0
        try:  # a worker knows its TP rank when it opens its store
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
        except Exception:  # noqa: BLE001 - the scheduler process has no TP group
            pass
        for f in faults if isinstance(faults, list) else [faults]:
            seed = f.get("seed", 0) + (1000 * rank if f.get("seed_per_rank") else 0)
            store = FlakyStore(store, fail_rate=f.get("fail_rate", 0.3), seed=seed,
                               fail_ops=tuple(f.get("ops", ("get",))), mode=f.get("mode", "error"),
                               delay_s=f.get("delay_s", 0.0), delay_rate=f.get("delay_rate", 1.0),
                               delay_ops=tuple(f.get("delay_ops", f.get("ops", ("get",)))),
                               deadline_s=f.get("deadline_s", 0.0))
        return store

    return flaky_open


if not getattr(settings.open_pool, "_kvd_faulty", False):
    settings.open_pool = _wrap(settings.open_pool, json.loads(os.environ["KVDIRECT_TEST_FAULTS"]))
    settings.open_pool._kvd_faulty = True
