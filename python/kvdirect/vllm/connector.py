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

from kvdirect import keys as _keys
from kvdirect.errors import ConfigError
from kvdirect.vllm import settings
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
        self._saves_seen: set[str] = set()  # worker without a store: requests the scheduler may hold
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
        fmt = self._object_format(names[0], tensors[0])
        block_dim = self._block_dim(tensors[0])
        layout = settings.blocks_layout(self._vllm_config, spec, tensors, num_blocks=int(tensors[0].shape[block_dim]),
                                        block_size=self.block_size, object_format=fmt, block_dim=block_dim)
        rank, size = _tp()
        fp = _keys.LayoutFingerprint.from_layout(layout, model=self.config.model, tp_rank=rank, tp_size=size)
        # layer names map to their position; shared layers to the layer that owns the tensor
        layer_names = names + [n for n in group.layer_names if n not in names]
        self.worker = WorkerSide(self.config, self.store, layout, names, fp, rank=rank)
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

    def _object_format(self, layer_name: str, t) -> str:
        """The engine's byte format of a block: backend, its ISA/kernel variant, cache dtype, shape."""
        ctx = self._vllm_config.compilation_config.static_forward_context.get(layer_name)
        backend = getattr(getattr(ctx, "attn_backend", None), "get_name", lambda: "unknown")()
        isa = getattr(ctx, "isa", None) or getattr(getattr(ctx, "impl", None), "isa", None)
        if isa is None and backend == "CPU_ATTN":
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            spec = self._kv_cache_config.kv_cache_groups[0].kv_cache_spec
            isa = _get_attn_isa(spec.dtype, self.block_size, spec.head_size,
                                self._vllm_config.cache_config.cache_dtype)
        cache_dtype = self._vllm_config.cache_config.cache_dtype
        shape = "x".join(str(int(s)) for s in t.shape[self._block_dim(t) + 1:])
        return f"vllm/{backend}/{isa}/{cache_dtype}/{shape}"

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self._handshake

    def handle_preemptions(self, kv_connector_metadata) -> None:
        if self.worker is not None and isinstance(kv_connector_metadata, KVDirectConnectorMetadata):
            self.worker.handle_preemptions(kv_connector_metadata.plan.preempted)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.start_load(self._get_connector_metadata().plan)

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
            self.worker.finish_loads()
            self.worker.submit_saves(plan)
        else:  # this worker serves without the pool (allow_no_store): nothing to wait for
            self._saves_seen.update(r.req_id for r in plan.saves)

    def get_finished(self, finished_req_ids: set[str]):
        if self.worker is None:
            done = self._saves_seen & set(finished_req_ids or ())
            self._saves_seen -= done
            return (done or None), None
        return (self.worker.get_finished(finished_req_ids) or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors() if self.worker is not None else set()

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
