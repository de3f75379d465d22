"""The cache's transfer paths on a simulated asynchronous device, with every store.

``kvdirect.device.sim.SimDevice`` runs every copy and every "compute kernel" late,
on its stream's own thread, so a missing wait shows up here as stale bytes:

* write-back: the engine's prefill writes the KV on the compute stream and calls
  ``write_back`` at once; the pool must receive the new bytes (the gather waits
  for the compute stream's event, the store waits for the gather);
* load / layer-wise load: the device pages must hold every byte when ``load``
  returns / when ``wait_layer(l)`` returns (the scatter has completed), also when
  a small staging buffer is reused chunk after chunk, and the load lands after
  work the compute stream still had queued on the same slots.

Every byte is checked against the expected KV: in the pool through a CPU-layout
cache, on the device by reading its memory right after the call (no extra
synchronisation by the test). Stores: the embedded shm pool, a real
``mooncake_master`` on loopback, and MemCache's signature-enforcing test double;
paths: staged (host staging buffers) and direct (the store addresses the pages).
With ``KVDIRECT_SIM_SKIP_SYNC=1`` the transfer path skips its waits on this device
and these tests must fail (``tests/test_simdevice_skip_sync.py`` checks that).
"""
import time
import uuid

import numpy as np
import pytest

from kvdirect import KVLayout
from kvdirect.cache import KVDirectCache
from kvdirect.config import CacheConfig
from kvdirect.device.sim import SimDevice
from kvdirect.stores import open_store

pytestmark = pytest.mark.simdevice

LAYERS, HEADS, DIM, P = 3, 2, 8, 4
SLOTS = 96 * P


def expected_kv(tokens):
    """Per layer [tokens, HEADS, DIM] float32 values that depend on the whole prefix."""
    t = np.asarray(tokens, np.int64)
    h = (np.cumsum(t * 2654435761 % 1000003) % 1000003).astype(np.float64)
    return [(h[:, None, None] * (l + 1) + np.arange(HEADS * DIM).reshape(1, HEADS, DIM)).astype(np.float32)
            for l in range(LAYERS)]


class KV:
    """An engine's KV pool (per-layer K/V, slot-major) and its page allocator, in host memory
    (device "cpu") or in a simulated device's memory, where the prefill runs as a kernel."""

    def __init__(self, sim: SimDevice | None = None):
        self.sim = sim
        new = sim.empty if sim else (lambda shape, dtype: np.zeros(shape, dtype))
        self.k = [new((SLOTS, HEADS, DIM), np.float32) for _ in range(LAYERS)]
        self.v = [new((SLOTS, HEADS, DIM), np.float32) for _ in range(LAYERS)]
        self.layout = KVLayout.from_addresses([a.ctypes.data for a in self.k], [a.ctypes.data for a in self.v],
                                              page_size=P, num_slots=SLOTS, kv_heads=HEADS, head_dim=DIM,
                                              dtype="float32", device=sim.name if sim else "cpu")
        self.free = list(range(0, SLOTS, P))[::-1]

    def alloc(self, n_tokens):
        firsts = [self.free.pop() for _ in range(-(-n_tokens // P))]
        return (np.asarray(firsts, np.int64)[:, None] + np.arange(P)).reshape(-1)[:n_tokens]

    def free_slots(self, slots):
        self.free.extend(int(s) for s in np.unique(np.asarray(slots) // P * P))

    def prefill(self, tokens, slots, start=0):
        """The forward pass writes the KV of tokens[start:] into their slots."""
        exp = expected_kv(tokens)
        s = np.asarray(slots[start:], np.int64).copy()

        def kernel():
            time.sleep(0.03)  # a forward pass takes longer than a copy
            for l in range(LAYERS):
                self.k[l][s] = exp[l][start:]
                self.v[l][s] = -exp[l][start:]

        if self.sim:
            self.sim.launch(kernel)  # runs later, on the compute stream
        else:
            kernel()

    def assert_holds(self, tokens, slots, layers=range(LAYERS)):
        exp = expected_kv(tokens)
        for l in layers:
            np.testing.assert_array_equal(self.k[l][slots], exp[l][:len(slots)], err_msg=f"K layer {l}")
            np.testing.assert_array_equal(self.v[l][slots], -exp[l][:len(slots)], err_msg=f"V layer {l}")

    def assert_untouched_except(self, slots):
        other = np.setdiff1d(np.arange(SLOTS), slots)
        for a in self.k + self.v:
            assert not a[other].any(), "a slot outside the load was written"


# ---- stores ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mooncake_url():
    from kvdirect.services import start_mooncake_master

    svc = start_mooncake_master(store_params=dict(segment="64MiB", buffer="32MiB", timeout=10))
    yield svc.store_url
    svc.stop()


class Stores:
    """Opens handles to one pool (each cache gets its own, as separate engines would)."""

    def __init__(self, kind, request):
        self.kind, self.opened, self.fake = kind, [], None
        self.model = f"sim-test-{uuid.uuid4().hex[:8]}"  # fresh keys: the Mooncake master is shared
        if kind == "shm":
            self.url = f"shm://kvd-sim-{uuid.uuid4().hex[:10]}?size=64MiB"
        elif kind == "mooncake":
            self.url = request.getfixturevalue("mooncake_url")
        else:
            from kvdirect.stores._testing import FakeMemcacheModule

            self.fake = FakeMemcacheModule()

    def open(self, kv: KV):
        if self.kind == "memcache":
            from kvdirect.stores.memcache import MemcacheStore

            s = MemcacheStore({"meta_service_url": "tcp://127.0.0.1:1", "protocol": "host_shm"},
                              module=self.fake, check=False, memory="device" if kv.sim else "host")
            if kv.sim:  # the double only lets L2G/G2L touch memory registered as device memory
                for a in kv.k + kv.v:
                    self.fake.mark_device(a.ctypes.data)
        else:
            s = open_store(self.url)
        self.opened.append(s)
        return s

    def cleanup(self):
        if self.kind == "shm":
            from kvdirect.stores.shm import destroy_pool

            destroy_pool(self.url.split("//")[1].split("?")[0], missing_ok=True)


@pytest.fixture(params=["shm", pytest.param("mooncake", marks=pytest.mark.mooncake), "memcache"])
def stores(request):
    s = Stores(request.param, request)
    yield s
    s.cleanup()


@pytest.fixture(params=["shm", "memcache"])
def local_stores(request):
    """For ordering tests where the store does not matter: the two that open in milliseconds."""
    s = Stores(request.param, request)
    yield s
    s.cleanup()


@pytest.fixture
def sim():
    """The device, with the engine computing on its own stream, current on the test's
    thread only (as SGLang's and vLLM's forward streams): any event the cache records on
    another thread lands on that thread's current stream and orders nothing."""
    with SimDevice(delay_s=0.01, jitter=0.5, seed=7) as dev:
        with dev.stream(dev.new_stream("compute")):
            yield dev


def cache(kv: KV, stores: Stores, **cfg):
    return KVDirectCache(kv.layout, stores.open(kv), free_slots=kv.free_slots,
                         config=CacheConfig(store=None, model=stores.model, **cfg))


def tokens_of(n, seed):
    return np.random.default_rng(seed).integers(0, 50000, n).astype(np.int32)


PATHS = {"staged": dict(stage=True, staging_bytes=2), "direct": dict(stage=False)}  # staging: 2 pages


def path_cfg(kv, path):
    cfg = dict(PATHS[path])
    if "staging_bytes" in cfg:
        cfg["staging_bytes"] = cfg["staging_bytes"] * kv.layout.page_bytes
    return cfg


# ---- write-back: device -> pool ---------------------------------------------------------------

@pytest.mark.parametrize("path", ["staged", "direct"])
def test_write_back_waits_for_the_compute_stream_and_the_gather(sim, stores, path):
    dev = KV(sim)
    c = cache(dev, stores, **path_cfg(dev, path))
    docs = [tokens_of(7 * P, 100 + i) for i in range(3)]
    for d in docs:
        slots = dev.alloc(len(d))
        dev.prefill(d, slots)             # launched on the compute stream, not yet run
        c.write_back(d, slots)            # the cache must wait for it
        c.poll()
    c.flush(timeout=60)
    assert c.stats()["stored_pages"] == 3 * 7
    # every byte in the pool, read back through a CPU-layout instance
    host = KV()
    reader = cache(host, stores)
    for d in docs:
        m = reader.match(d)
        assert m.pool_len == len(d)
        slots = host.alloc(m.pool_len)
        assert reader.load(m, slots) == len(d)
        host.assert_holds(d, slots)
    c.close()
    reader.close()


@pytest.mark.parametrize("path", ["staged", "direct"])
def test_vllm_worker_save_waits_for_the_forward(sim, local_stores, path):
    """vLLM's worker hands its saves over in ``wait_for_save`` (the forward thread, where
    the forward's stream is current) and puts them on writer threads: the put must wait
    for the event recorded at hand-over, not one a writer thread records on its own."""
    from kvdirect import keys as K
    from kvdirect.vllm.plan import PageRun, StepPlan
    from kvdirect.vllm.worker import WorkerSide

    dev = KV(sim)
    cfg = CacheConfig(store=None, model=local_stores.model, **path_cfg(dev, path))
    fp = K.LayoutFingerprint.from_layout(dev.layout, model=cfg.model)
    w = WorkerSide(cfg, local_stores.open(dev), dev.layout, [f"l{i}" for i in range(LAYERS)], fp)
    docs = [tokens_of(7 * P, 500 + i) for i in range(2)]
    for i, d in enumerate(docs):
        slots = dev.alloc(len(d))
        dev.prefill(d, slots)                                   # the forward, not yet run
        digests = K.page_digests(d, P, namespace_seed=K.namespace_seed())
        w.submit_saves(StepPlan(saves=[PageRun(f"r{i}", 0, digests, slots[::P] // P)]))
    w.flush()
    assert w.stats["stored_pages"] == 2 * 7
    host = KV()
    reader = cache(host, local_stores)
    for d in docs:                                              # every byte, through a CPU instance
        m = reader.match(d)
        assert m.pool_len == len(d)
        got = host.alloc(m.pool_len)
        assert reader.load(m, got) == len(d)
        host.assert_holds(d, got)
    w.close()
    reader.close()


@pytest.mark.parametrize("path", ["staged", "direct"])
def test_write_back_follows_the_forward_stream_given(sim, local_stores, path):
    """SGLang's overlap scheduler forwards on a stream that is not current on the thread
    that calls the cache: the engine names it (``forward_stream``) and the write-back
    waits for the work queued there too."""
    dev = KV(sim)
    forward = sim.new_stream("forward")
    c = KVDirectCache(dev.layout, local_stores.open(dev), free_slots=dev.free_slots, forward_stream=forward,
                      config=CacheConfig(store=None, model=local_stores.model, **path_cfg(dev, path)))
    docs = [tokens_of(7 * P, 600 + i) for i in range(2)]
    for d in docs:
        slots = dev.alloc(len(d))
        with sim.stream(forward):
            dev.prefill(d, slots)         # the forward, on the forward stream
        c.write_back(d, slots)            # the scheduler, back on its own stream
    c.flush(timeout=60)
    host = KV()
    reader = cache(host, local_stores)
    for d in docs:
        m = reader.match(d)
        got = host.alloc(m.pool_len)
        assert reader.load(m, got) == len(d)
        host.assert_holds(d, got)
    c.close()
    reader.close()


# ---- load: pool -> device ---------------------------------------------------------------------

def _fill_pool(stores, docs):
    host = KV()
    w = cache(host, stores)
    for d in docs:
        slots = host.alloc(len(d))
        host.prefill(d, slots)
        w.write_back(d, slots)
    w.flush(timeout=60)
    assert w.stats()["stored_pages"] == sum(len(d) // P for d in docs)
    return w


@pytest.mark.parametrize("path", ["staged", "direct"])
def test_loaded_pages_hold_every_byte_when_load_returns(sim, stores, path):
    docs = [tokens_of(9 * P, 200 + i) for i in range(2)]
    w = _fill_pool(stores, docs)
    dev = KV(sim)
    c = cache(dev, stores, **path_cfg(dev, path))
    used = []
    for d in docs:
        m = c.match(d)
        slots = dev.alloc(m.pool_len)
        assert c.load(m, slots) == len(d)
        dev.assert_holds(d, slots)        # no synchronisation by the test: load must have waited
        used.append(slots)
    dev.assert_untouched_except(np.concatenate(used))
    c.close()
    w.close()


@pytest.mark.parametrize("path", ["staged", "direct"])
def test_load_waits_for_work_still_using_the_slots(sim, stores, path):
    """An earlier request's forward pass still writes slots the engine has already freed
    (stream order makes that safe for kernels); a load into them must land after it."""
    d = tokens_of(6 * P, 250)
    w = _fill_pool(stores, [d])
    dev = KV(sim)
    c = cache(dev, stores, **path_cfg(dev, path))
    earlier = dev.alloc(len(d))

    def forward_of_the_earlier_request():
        time.sleep(0.05)
        for a in dev.k + dev.v:
            a[earlier] = 7.0

    sim.launch(forward_of_the_earlier_request)
    dev.free_slots(earlier)
    m = c.match(d)
    slots = dev.alloc(m.pool_len)
    assert set(slots.tolist()) == set(earlier.tolist())  # the allocator hands the same slots out again
    assert c.load(m, slots) == len(d)
    sim.synchronize()                     # whatever was in flight has landed by now
    dev.assert_holds(d, slots)
    c.close()
    w.close()


@pytest.mark.parametrize("path", ["staged", "direct"])
def test_layerwise_load_layer_holds_every_byte_when_reported(sim, stores, path):
    d = tokens_of(10 * P, 300)
    w = _fill_pool(stores, [d])
    dev = KV(sim)
    c = cache(dev, stores, **path_cfg(dev, path))
    m = c.match(d)
    slots = dev.alloc(m.pool_len)
    lw = c.load_layerwise(m, slots)
    for layer in range(LAYERS):
        assert lw.wait_layer(layer, timeout=60) == len(d)
        dev.assert_holds(d, slots, layers=[layer])
    assert lw.finish() == len(d)
    dev.assert_holds(d, slots)
    dev.assert_untouched_except(slots)
    c.close()
    w.close()


@pytest.mark.parametrize("path", ["staged", "direct"])
def test_layerwise_load_waits_for_work_still_using_the_slots(sim, stores, path):
    """As test_load_waits_for_work_still_using_the_slots, layer by layer: the reader runs
    on kvdirect's own thread, but what it waits for is the engine's work queued when the
    load was started (on the engine's compute stream, current on the engine's thread)."""
    d = tokens_of(6 * P, 260)
    w = _fill_pool(stores, [d])
    dev = KV(sim)
    c = cache(dev, stores, **path_cfg(dev, path))
    earlier = dev.alloc(len(d))

    def forward_of_the_earlier_request():
        time.sleep(0.05)
        for a in dev.k + dev.v:
            a[earlier] = 7.0

    sim.launch(forward_of_the_earlier_request)
    dev.free_slots(earlier)
    m = c.match(d)
    slots = dev.alloc(m.pool_len)
    assert set(slots.tolist()) == set(earlier.tolist())
    lw = c.load_layerwise(m, slots)
    assert lw.finish() == len(d)
    sim.synchronize()
    dev.assert_holds(d, slots)
    c.close()
    w.close()


@pytest.mark.parametrize("path", ["staged", "direct"])
def test_device_to_device_round_trip_through_the_pool(sim, stores, path):
    """Two engines on the simulated device: A prefills and writes back, B loads."""
    a, b = KV(sim), KV(sim)
    ca = cache(a, stores, **path_cfg(a, path))
    cb = cache(b, stores, **path_cfg(b, path))
    d = tokens_of(11 * P + 2, 400)
    slots = a.alloc(len(d))
    a.prefill(d, slots)
    ca.write_back(d, slots)
    ca.flush(timeout=60)
    m = cb.match(d)
    assert m.pool_len == 11 * P
    got = b.alloc(m.pool_len)
    assert cb.load(m, got) == 11 * P
    b.assert_holds(d, got)
    ca.close()
    cb.close()
