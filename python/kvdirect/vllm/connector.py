"""``KVDirectConnector``: kvdirect as a vLLM v1 KV connector (``KVConnectorBase_V1``).

Load it with::

    --kv-transfer-config '{"kv_connector": "KVDirectConnector",
                           "kv_connector_module_path": "kvdirect.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"store": "shm://kvd?size=4GiB"}}'

The scheduler-side instance (engine-core process) decides hits, loads and saves
(:mod:`kvdirect.vllm.scheduler`); each worker moves the pages
(:mod:`kvdirect.vllm.worker`). This class only adapts vLLM's calls to them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

import numpy as np

from kvdirect import keys as _keys
from kvdirect.errors import ConfigError
from kvdirect.vllm import settings
from kvdirect.vllm import stats as _stats
from kvdirect.vllm.plan import StepPlan, WorkerReport
from kvdirect.vllm.scheduler import SchedulerSide
from kvdirect.vllm.worker import WorkerSide

log = logging.getLogger("kvdirect.vllm")


@dataclass
class KVDirectConnectorMetadata(KVConnectorMetadata):
    plan: StepPlan


@dataclass
class KVDirectWorkerMetadata(KVConnectorWorkerMetadata):
    report: WorkerReport

    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "KVConnectorWorkerMetadata":
        if not isinstance(other, KVDirectWorkerMetadata):
            return self
        return KVDirectWorkerMetadata(self.report.merge(other.report))


@dataclass
class KVDirectHandshake(KVConnectorHandshakeMetadata):
    """A worker's layout fingerprint fields, sent to the scheduler once at start-up."""

    fingerprint: dict


def _tp() -> tuple[int, int]:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def _tp_min():
    """``agree(x) -> elementwise minimum of x over the TP group`` (gloo, the group's CPU side),
    or None with one rank. Every rank calls it in the same step with the same plan."""
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return None

    def agree(x):
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group.cpu_group)
        return t.numpy()

    return agree


class KVDirectConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.config = settings.cache_config(vllm_config)
        settings.check_supported(vllm_config, kv_cache_config)
        ktc = self._kv_transfer_config
        self._load = bool(ktc.is_kv_consumer)
        self._save = bool(ktc.is_kv_producer)
        self.block_size = int(kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size)
        self.tp_size = int(vllm_config.parallel_config.tensor_parallel_size)
        self.store = settings.open_pool(self.config)
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        self._held: set[str] = set()  # worker without a store: held requests to report finished
        self._no_store_errors: set[int] = set()
        self._agree = None
        self._stats = _stats.Deltas()
        self._handshake: KVDirectHandshake | None = None
        if role == KVConnectorRole.SCHEDULER:
            if getattr(ktc, "kv_load_failure_policy", "recompute") != "recompute":
                # a pool page that cannot be read is a cache miss, never a failed request
                log.info("kvdirect: kv_load_failure_policy -> 'recompute' (was %r)", ktc.kv_load_failure_policy)
                ktc.kv_load_failure_policy = "recompute"
            self.scheduler = SchedulerSide(self.config, self.block_size, self.store, tp_size=self.tp_size,
                                           load=self._load, save=self._save)
        log.info("kvdirect connector (%s): store=%s model=%r block=%d tp=%d",
                 role.name.lower(), None if self.store is None else self.store.scheme, self.config.model,
                 self.block_size, self.tp_size)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save dropped at preemption is only a future miss

    # ==== scheduler side ==============================================================
    def set_xfer_handshake_metadata(self, metadata) -> None:
        if self.scheduler is None:
            return
        fps = {int(r): m.fingerprint for r, m in metadata.items() if isinstance(m, KVDirectHandshake)}
        if fps:
            self.scheduler.set_fingerprints(fps)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.num_new_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self.scheduler.after_alloc(request, ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return KVDirectConnectorMetadata(self.scheduler.build_step(scheduler_output))

    def update_connector_output(self, connector_output) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        report = meta.report if isinstance(meta, KVDirectWorkerMetadata) else None
        self.scheduler.on_worker_output(report, connector_output.finished_sending)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request), None

    # ==== worker side =================================================================
    def register_kv_caches(self, kv_caches: dict) -> None:
        if self.store is None:
            return
        group = self._kv_cache_config.kv_cache_groups[0]
        spec = group.kv_cache_spec
        names, tensors, seen = [], [], {}
        for name in group.layer_names:
            t = kv_caches.get(name)
            if t is None:
                raise ConfigError(f"kvdirect vLLM connector: no KV cache tensor for layer {name!r}")
            if t.data_ptr() in seen:  # layers sharing one KV cache: moved once
                continue
            seen[t.data_ptr()] = name
            names.append(name)
            tensors.append(t)
        block_dim = self._block_dim(tensors[0])
        if settings.is_mla(spec):  # kvdirect's "mla" pages: the same on every TP rank
            layout = settings.mla_layout(self._vllm_config, spec, tensors, backend=self._backend(names[0]),
                                         num_blocks=int(tensors[0].shape[block_dim]), block_size=self.block_size)
        else:
            fmt = self._object_format(names[0], tensors[0])
            layout = settings.blocks_layout(self._vllm_config, spec, tensors,
                                            num_blocks=int(tensors[0].shape[block_dim]), block_size=self.block_size,
                                            object_format=fmt, block_dim=block_dim)
        rank, size = _tp()
        fp = _keys.LayoutFingerprint.from_layout(layout, model=self.config.model, tp_rank=rank, tp_size=size)
        # layer names map to their position; shared layers to the layer that owns the tensor
        layer_names = names + [n for n in group.layer_names if n not in names]
        # MLA pages have keys without the rank (every rank holds the same latent): rank 0 alone puts them
        writes = not fp.is_mla or rank == 0
        self.worker = WorkerSide(self.config, self.store, layout, names, fp, rank=rank, agree=self._tp_agree(),
                                 writes=writes)
        for n in layer_names[len(names):]:
            t = kv_caches[n]
            self.worker.layer_of[n] = names.index(seen[t.data_ptr()])
        self._handshake = KVDirectHandshake(dataclass_fields(fp))
        log.info("kvdirect worker %d/%d: %r, page %d bytes, key prefix %s", rank, size, layout,
                 layout.page_bytes, fp.key_prefix)

    def _block_dim(self, t) -> int:
        n = int(self._kv_cache_config.num_blocks)
        for d, size in enumerate(t.shape):
            if int(size) == n:
                return d
        raise ConfigError(f"kvdirect vLLM connector: KV tensor shape {tuple(t.shape)} has no block dim "
                          f"of {n} blocks")

    def _backend(self, layer_name: str) -> str:
        """The attention backend's name for a layer (``unknown`` when vLLM does not say)."""
        ctx = self._vllm_config.compilation_config.static_forward_context.get(layer_name)
        backend = getattr(ctx, "attn_backend", None)
        if backend is None and callable(getattr(ctx, "get_attn_backend", None)):
            backend = ctx.get_attn_backend()
        return getattr(backend, "get_name", lambda: "unknown")()

    def _object_format(self, layer_name: str, t) -> str:
        """The engine's byte format of a block: backend, its ISA/kernel variant, cache dtype, shape."""
        ctx = self._vllm_config.compilation_config.static_forward_context.get(layer_name)
        backend = self._backend(layer_name)
        isa = getattr(ctx, "isa", None) or getattr(getattr(ctx, "impl", None), "isa", None)
        if isa is None and backend == "CPU_ATTN":
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            spec = self._kv_cache_config.kv_cache_groups[0].kv_cache_spec
            isa = _get_attn_isa(spec.dtype, self.block_size, spec.head_size,
                                self._vllm_config.cache_config.cache_dtype)
        cache_dtype = self._vllm_config.cache_config.cache_dtype
        shape = "x".join(str(int(s)) for s in t.shape[self._block_dim(t) + 1:])
        return f"vllm/{backend}/{isa}/{cache_dtype}/{shape}"

    def _tp_agree(self):
        if self._agree is None:
            self._agree = _tp_min() or (lambda x: x)
        return self._agree

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self._handshake

    def handle_preemptions(self, kv_connector_metadata) -> None:
        if self.worker is not None and isinstance(kv_connector_metadata, KVDirectConnectorMetadata):
            self.worker.handle_preemptions(kv_connector_metadata.plan.preempted)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        plan = self._get_connector_metadata().plan
        if self.worker is not None:
            self.worker.start_load(plan)
        else:  # this worker serves without the pool (allow_no_store): its loads fail
            if plan.loads:
                self._no_store_errors.update(np.concatenate([r.block_ids for r in plan.loads]).tolist())

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.worker is not None:
            self.worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # saves start in wait_for_save, after every layer has written its KV

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        plan = self._get_connector_metadata().plan
        if self.worker is not None:
            self.worker.hold(plan.held)
            self.worker.finish_loads()  # loads known good (on every TP rank) before any save
            self.worker.submit_saves(plan)
        else:  # this worker serves without the pool (allow_no_store): nothing to wait for
            self._held.update(plan.held)
            runs = [r for r in plan.loads if len(r)]
            if runs:  # the other ranks agree on failed loads here: take part (every page failed)
                self._tp_agree()(np.zeros(len(runs), dtype=np.int64))

    def get_finished(self, finished_req_ids: set[str]):
        if self.worker is None:
            done, self._held = self._held, set()
            return (done or None), None
        return (self.worker.get_finished(finished_req_ids) or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self.worker is None:
            out, self._no_store_errors = self._no_store_errors, set()
            return out
        return self.worker.take_load_errors()

    # ---- operability: vLLM's KV connector stats (logged per interval) and Prometheus ---
    def get_kv_connector_stats(self):
        if self.scheduler is not None:
            data = self._stats.take(self.scheduler.stats, _stats.SCHEDULER_COUNTERS)
        elif self.worker is not None:
            data = self._stats.take(self.worker.stats, _stats.WORKER_COUNTERS,
                                    pending_save_pages=self.worker.pending_save_pages())
        else:
            return None
        return _stats.KVDirectConnectorStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return _stats.KVDirectConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return _stats.KVDirectPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def build_connector_worker_meta(self):
        if self.worker is None:
            return None
        report = self.worker.take_report()
        return KVDirectWorkerMetadata(report) if report else None

    def shutdown(self):
        try:
            if self.worker is not None:
                self.worker.close()
        finally:
            if self.store is not None:
                self.store.close()
                self.store = None


def dataclass_fields(fp) -> dict:
    import dataclasses

    return {f.name: getattr(fp, f.name) for f in dataclasses.fields(fp)}
