"""kvdirect.device: which launch layer a layout gets, configurations that cannot move pages
(failing when the cache is built), torch tensor-op copies (checked on CPU tensors against
the C++ planner), and the simulated device's ordering semantics."""
import os
import threading
import time
import uuid

import numpy as np
import pytest

from kvdirect import CopyEngine, KVLayout
from kvdirect.cache import KVDirectCache
from kvdirect.config import CacheConfig
from kvdirect.device import DeviceOps, device_ops
from kvdirect.device.sim import SimDevice
from kvdirect.errors import BackendUnavailableError, ConfigError

torch = pytest.importorskip("torch", reason="torch is in the [test] extra")

P, LAYERS, HEADS, DIM, SLOTS = 4, 3, 2, 8, 64


def _address_layout(device, arrays=None):
    k = arrays or [np.zeros((SLOTS, HEADS, DIM), np.float32) for _ in range(2 * LAYERS)]
    lay = KVLayout.from_addresses([a.ctypes.data for a in k[:LAYERS]], [a.ctypes.data for a in k[LAYERS:]],
                                  page_size=P, num_slots=SLOTS, kv_heads=HEADS, head_dim=DIM, dtype="float32",
                                  device=device)
    return lay, k


def _shm_pool_files():
    return {f for f in os.listdir("/dev/shm") if f.startswith("kvdirect-")} if os.path.isdir("/dev/shm") else set()


# ---- no silent no-pool: a device that cannot move pages fails at construction ----------------

def test_npu_layout_over_shm_without_torch_npu_fails_at_construction():
    try:
        import torch_npu  # noqa: F401
        pytest.skip("torch_npu is installed here: NPU pages can be moved")
    except ImportError:
        pass
    lay, _keep = _address_layout("npu:0")
    name = f"kvd-npu-{uuid.uuid4().hex[:8]}"
    before = _shm_pool_files()
    for allow in (True, False):  # never tolerated like an unreachable store
        with pytest.raises(BackendUnavailableError) as ei:
            KVDirectCache(lay, f"shm://{name}?size=16MiB",
                          config=CacheConfig(model="m", allow_no_store=allow))
        msg = str(ei.value)
        assert "\n" not in msg and "npu:0" in msg and "torch_npu" in msg and "shm://" in msg, msg
    assert _shm_pool_files() == before, "the pool must not be opened for a configuration that cannot use it"
    # a device-only cache on the NPU moves no pages: nothing to check
    c = KVDirectCache(lay, config=CacheConfig(model="m", store=None))
    assert c.stats()["mode"] == "device-only"


def test_devices_without_a_copy_path_are_named():
    lay, _keep = _address_layout("tpu:0")
    with pytest.raises(ConfigError, match=r"no copy path for KV pages on 'tpu:0'"):
        KVDirectCache(lay, f"shm://kvd-tpu-{uuid.uuid4().hex[:8]}?size=16MiB", config=CacheConfig(model="m"))
    if not torch.cuda.is_available():
        lay, _keep = _address_layout("cuda:0")
        with pytest.raises(BackendUnavailableError, match=r"on cuda:0 but torch sees 0 cuda device"):
            device_ops(lay)


class _DeviceMemoryOps(DeviceOps):
    kind = "cuda"  # stands in for device memory a host store cannot address


def test_direct_path_needs_a_store_that_can_address_the_device(tmp_path):
    from kvdirect.cache.quarantine import Quarantine
    from kvdirect.cache.transfer import Transfer
    from kvdirect.stores import open_store
    from kvdirect.stores.shm import destroy_pool

    lay, _keep = _address_layout("cuda:0")
    name = f"kvd-direct-{uuid.uuid4().hex[:8]}"
    store = open_store(f"shm://{name}?size=16MiB")
    try:
        with pytest.raises(ConfigError, match=r"stage=False but the shm:// store cannot address cuda:0 memory"):
            Transfer(store, lay, CacheConfig(model="m", stage=False), _DeviceMemoryOps("cuda:0", lay),
                     Quarantine(store, lambda s: None))
    finally:
        store.close()
        destroy_pool(name, missing_ok=True)


def test_launch_layer_per_device():
    lay, _keep = _address_layout("cpu")
    ops = device_ops(lay)
    assert ops.kind == "cpu" and not ops.asynchronous and ops.host_addressable
    with SimDevice(delay_s=0.0) as sim:
        ops = device_ops(_address_layout(sim.name)[0])
        assert ops.kind == "sim" and ops.asynchronous
    with pytest.raises(ConfigError, match="no simulated device"):
        device_ops(_address_layout("sim:99999")[0])


# ---- torch tensor ops (the NPU path without the Ascend C library), on CPU tensors ------------

def _torch_pool(kind):
    g = torch.Generator().manual_seed(1)
    pages = 9

    def rnd(*shape):
        return torch.randint(-1000, 1000, shape, generator=g).to(torch.bfloat16)

    if kind == "mha":
        k = [rnd(pages * P, HEADS, DIM) for _ in range(LAYERS)]
        v = [rnd(pages * P, HEADS, 4) for _ in range(LAYERS)]
        return KVLayout.from_mha(k, v, P), k + v
    if kind == "mla":
        kv = [rnd(pages * P, 1, 12) for _ in range(LAYERS)]
        return KVLayout.from_mla(kv, P), kv
    if kind == "stacked_mha":  # one [layers, slots, heads, dim] tensor per K and V
        k, v = rnd(LAYERS, pages * P, HEADS, DIM), rnd(LAYERS, pages * P, HEADS, DIM)
        return KVLayout.from_mha(k, v, P), [k, v]
    if kind in ("ascend", "ascend_mla"):
        h, vd = (1, 4) if kind == "ascend_mla" else (HEADS, DIM)
        k = [rnd(pages, P, h, DIM) for _ in range(LAYERS)]
        v = [rnd(pages, P, h, vd) for _ in range(LAYERS)]
        return KVLayout.from_ascend(k, v, P, is_mla=kind == "ascend_mla"), k + v
    b = rnd(pages, LAYERS, 2, P, HEADS, DIM)
    return KVLayout.page_first(b), [b]


@pytest.mark.parametrize("kind", ["mha", "stacked_mha", "mla", "ascend", "ascend_mla", "page_first"])
def test_tensor_ops_move_the_same_bytes_as_the_planner(kind):
    from kvdirect.device.tensor_ops import TensorOps

    lay, bufs = _torch_pool(kind)
    ops = TensorOps("cpu", 0, lay)
    s = ops.stream()
    pages = np.array([7, 1, 4, 2], np.int64) * P
    n, obj = len(pages), lay.page_bytes
    host = ops.host_buffer(n * obj)
    ops.to_host(pages, host, s)
    ops.synchronize(ops.record(s))
    ref = np.zeros(n * obj, np.uint8)
    CopyEngine().gather(lay.plan(pages), ref)
    np.testing.assert_array_equal(host.owner.numpy(), ref)
    # scatter back into other pages: every layer at once, then layer by layer
    before = [b.clone() for b in bufs]
    dst = np.array([0, 8, 3, 5], np.int64) * P
    ops.to_device(dst, host, s)
    got = np.zeros(n * obj, np.uint8)
    CopyEngine().gather(lay.plan(dst), got)
    np.testing.assert_array_equal(got, ref)
    for b, old in zip(bufs, before):
        b.copy_(old)
    for layer in range(lay.num_layers):
        ops.to_device(dst, host, s, layer=layer)
    CopyEngine().gather(lay.plan(dst), got)
    np.testing.assert_array_equal(got, ref)
    # pages not named were not touched
    keep = np.setdiff1d(np.arange(lay.num_pages), dst // P) * P
    a, b = np.zeros(len(keep) * obj, np.uint8), np.zeros(len(keep) * obj, np.uint8)
    CopyEngine().gather(lay.plan(keep), a)
    for t, old in zip(bufs, before):
        t.copy_(old)
    CopyEngine().gather(lay.plan(keep), b)
    np.testing.assert_array_equal(a, b)


def test_tensor_ops_need_the_layout_tensors():
    from kvdirect.device.tensor_ops import TensorOps

    lay, _keep = _address_layout("cpu")
    with pytest.raises(BackendUnavailableError, match="built from raw addresses"):
        TensorOps("cpu", 0, lay)


# ---- the simulated device orders like an accelerator ----------------------------------------

def test_sim_device_runs_work_late_and_orders_it_with_events():
    with SimDevice(delay_s=0.03, jitter=0.0) as sim:
        mem = sim.empty(4, np.int64)
        side = sim.new_stream()
        sim.launch(lambda: mem.__setitem__(0, 1))            # compute stream
        assert mem[0] == 0, "launched work must not run synchronously"
        ev = sim.current_stream().record_event()
        side.wait_event(ev)
        side.launch(lambda: mem.__setitem__(1, mem[0] + 1))   # must see the compute write
        done = side.record_event()
        done.synchronize()
        assert list(mem[:2]) == [1, 2]  # nothing ran at launch (above): synchronize waited for both
        # without the event the side stream runs on its own clock
        sim.launch(lambda: (time.sleep(0.05), mem.__setitem__(2, 1)))
        seen = []
        side.launch(lambda: seen.append(int(mem[2])))
        side.synchronize()
        assert seen == [0]
        sim.synchronize()
        assert mem[2] == 1


def test_sim_current_stream_is_per_thread():
    """As in CUDA: a stream made current on one thread is not current on another, so an
    event another thread records does not follow the work launched here."""
    with SimDevice(delay_s=0.03, jitter=0.0) as sim:
        mem = sim.empty(2, np.int64)
        compute = sim.new_stream("compute")
        with sim.stream(compute):
            assert sim.current_stream() is compute
            sim.launch(lambda: mem.__setitem__(0, 1))           # on compute (current here)
            here = sim.current_stream().record_event()
            there = []
            t = threading.Thread(target=lambda: there.append((sim.current_stream(),
                                                              sim.current_stream().record_event())))
            t.start()
            t.join()
        assert sim.current_stream() is sim.default_stream    # restored on leaving the block
        other_stream, other_event = there[0]
        assert other_stream is sim.default_stream
        other_event.synchronize()
        assert mem[0] == 0, "an event recorded on another thread waited for this thread's work"
        here.synchronize()
        assert mem[0] == 1


def test_sim_device_reports_failed_work():
    with pytest.raises(RuntimeError, match="work launched on a stream failed"):
        with SimDevice(delay_s=0.0) as sim:
            sim.launch(lambda: 1 / 0)


def test_sim_streams_run_on_their_own_threads():
    with SimDevice(delay_s=0.0) as sim:
        names = []
        sim.launch(lambda: names.append(threading.current_thread().name))
        s = sim.new_stream()
        s.launch(lambda: names.append(threading.current_thread().name))
        sim.synchronize()
        assert len(set(names)) == 2 and threading.current_thread().name not in names
