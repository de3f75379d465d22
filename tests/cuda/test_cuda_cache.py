"""The cache's transfer path on a real GPU: write-back, load and layer-wise load through the
shm pool (staged: pinned host buffers, the CUDA kernels on a transfer stream), every byte
compared. The compute stream is kept busy (torch.cuda._sleep) before the engine writes its
KV, so a missing wait reads stale bytes. Skipped without a CUDA device."""
import uuid

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the CUDA cache tests need torch with CUDA")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible (torch.cuda.is_available() is False)", allow_module_level=True)

from kvdirect import KVLayout  # noqa: E402
from kvdirect.cache import KVDirectCache  # noqa: E402
from kvdirect.config import CacheConfig  # noqa: E402
from kvdirect.errors import ConfigError  # noqa: E402

DEV = torch.device("cuda")
P, LAYERS, HEADS, DIM, PAGES = 16, 4, 8, 128, 256
BUSY_CYCLES = 50_000_000  # ~tens of ms of GPU time queued before the KV is written


def expected(tokens, layer):
    t = torch.as_tensor(np.asarray(tokens, np.int64), device=DEV)
    h = torch.cumsum(t * 2654435761 % 1000003, 0) % 1000003
    v = h[:, None, None] * (layer + 1) + torch.arange(HEADS * DIM, device=DEV).view(1, HEADS, DIM)
    return (v % 4093).to(torch.bfloat16)


class GpuKV:
    def __init__(self):
        self.k = [torch.zeros((PAGES * P, HEADS, DIM), dtype=torch.bfloat16, device=DEV) for _ in range(LAYERS)]
        self.v = [torch.zeros((PAGES * P, HEADS, DIM), dtype=torch.bfloat16, device=DEV) for _ in range(LAYERS)]
        self.layout = KVLayout.from_mha(self.k, self.v, P)
        self.free = list(range(0, PAGES * P, P))[::-1]

    def alloc(self, n):
        firsts = [self.free.pop() for _ in range(-(-n // P))]
        return (np.asarray(firsts, np.int64)[:, None] + np.arange(P)).reshape(-1)[:n]

    def free_slots(self, slots):
        self.free.extend(int(s) for s in np.unique(np.asarray(slots) // P * P))

    def prefill(self, tokens, slots):
        """The forward pass: queued behind busy work on the current stream, not yet run."""
        torch.cuda._sleep(BUSY_CYCLES)
        idx = torch.as_tensor(slots, device=DEV)
        for l in range(LAYERS):
            e = expected(tokens, l)
            self.k[l].index_copy_(0, idx, e)
            self.v[l].index_copy_(0, idx, -e)

    def assert_holds(self, tokens, slots, layers=range(LAYERS)):
        idx = torch.as_tensor(slots, device=DEV)
        for l in layers:
            e = expected(tokens, l)
            assert torch.equal(self.k[l].index_select(0, idx), e), f"K layer {l}"
            assert torch.equal(self.v[l].index_select(0, idx), -e), f"V layer {l}"


@pytest.fixture
def url():
    name = f"kvd-cuda-{uuid.uuid4().hex[:10]}"
    yield f"shm://{name}?size=1GiB"
    from kvdirect.stores.shm import destroy_pool

    destroy_pool(name, missing_ok=True)


def cache(kv, url, **cfg):
    return KVDirectCache(kv.layout, url, free_slots=kv.free_slots, config=CacheConfig(model="cuda-test", **cfg))


def tokens_of(n, seed):
    return np.random.default_rng(seed).integers(0, 50000, n).astype(np.int32)


@pytest.mark.parametrize("staging_pages", [2, 1024])
def test_write_back_and_load_round_trip(url, staging_pages):
    a, b = GpuKV(), GpuKV()
    page_bytes = a.layout.page_bytes
    ca = cache(a, url, staging_bytes=staging_pages * page_bytes)
    cb = cache(b, url, staging_bytes=staging_pages * page_bytes)
    tr = ca._p.transfer
    buf = tr.pool.acquire()
    assert tr.stage and buf.owner.is_pinned(), "staging buffers must be pinned host memory"
    tr.pool.release(buf)
    docs = [tokens_of(20 * P, 10 + i) for i in range(3)]
    for d in docs:
        slots = a.alloc(len(d))
        a.prefill(d, slots)
        ca.write_back(d, slots)  # right away, as an engine does: the cache waits for the stream
        ca.poll()
    ca.flush(timeout=120)
    assert ca.stats()["stored_pages"] == 3 * 20
    for d in docs:
        m = cb.match(d)
        assert m.pool_len == len(d)
        slots = b.alloc(m.pool_len)
        assert cb.load(m, slots) == len(d)
        b.assert_holds(d, slots)
    ca.close()
    cb.close()


def test_layerwise_load_reports_complete_layers(url):
    a, b = GpuKV(), GpuKV()
    ca, cb = cache(a, url), cache(b, url)
    d = tokens_of(32 * P, 20)
    slots = a.alloc(len(d))
    a.prefill(d, slots)
    ca.write_back(d, slots)
    ca.flush(timeout=120)
    m = cb.match(d)
    got = b.alloc(m.pool_len)
    torch.cuda._sleep(BUSY_CYCLES)  # the compute stream is busy while the load starts
    lw = cb.load_layerwise(m, got)
    for layer in range(LAYERS):
        assert lw.wait_layer(layer, timeout=120) == len(d)
        b.assert_holds(d, got, layers=[layer])
    assert lw.finish() == len(d)
    ca.close()
    cb.close()


def test_a_host_store_cannot_be_used_without_staging(url):
    with pytest.raises(ConfigError, match="cannot address cuda:0 memory"):
        cache(GpuKV(), url, stage=False)


def test_tensor_ops_move_the_same_bytes_as_the_kernels():
    from kvdirect.device import device_ops
    from kvdirect.device.tensor_ops import TensorOps

    kv = GpuKV()
    for t in kv.k + kv.v:
        t.copy_(torch.randint(-500, 500, t.shape, device=DEV).to(torch.bfloat16))
    kernels, tensors = device_ops(kv.layout), TensorOps("cuda", 0, kv.layout)
    assert kernels.kind == "cuda" and type(kernels).__name__ == "CudaOps"
    pages = np.array([9, 3, 200, 41], np.int64) * P
    n = len(pages) * kv.layout.page_bytes
    outs = []
    for ops in (kernels, tensors):
        s = ops.stream()
        host = ops.host_buffer(n)
        ops.to_host(pages, host, s)
        ops.synchronize(ops.record(s))
        outs.append(host.owner.clone())
    assert torch.equal(outs[0], outs[1])
