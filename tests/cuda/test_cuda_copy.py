"""CUDA copy engine on a real GPU: byte-exact round trips for every layout,
checked against a torch index_select baseline. Skipped without a CUDA device."""
import pytest

torch = pytest.importorskip("torch", reason="the CUDA engine tests need torch with CUDA")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible (torch.cuda.is_available() is False)", allow_module_level=True)

from kvdirect import CopyEngine, KVLayout  # noqa: E402
from kvdirect.errors import BackendUnavailableError  # noqa: E402

DEV = torch.device("cuda")
P, PAGES, LAYERS = 4, 11, 3


@pytest.fixture(scope="module")
def engine():
    try:
        return CopyEngine(device="cuda")
    except BackendUnavailableError as e:
        pytest.fail(f"CUDA device visible but the CUDA engine is unavailable: {e}")


def _rand(shape, dtype):
    return torch.randint(-100, 100, shape, device=DEV).to(dtype)


def _pool(kind, dtype):
    """(layout, buffers, planes): planes are [pages, page_bytes_of_plane] uint8 views in object order."""
    if kind in ("mha", "mha_vdim"):
        vd = 4 if kind == "mha_vdim" else 8
        k = [_rand((PAGES * P, 2, 8), dtype) for _ in range(LAYERS)]
        v = [_rand((PAGES * P, 2, vd), dtype) for _ in range(LAYERS)]
        bufs, lay = k + v, KVLayout.from_mha(k, v, P)
        planes = [x for kv in zip(k, v) for x in kv]
    elif kind == "mla":
        bufs = [_rand((PAGES * P, 1, 12), dtype) for _ in range(LAYERS)]
        lay, planes = KVLayout.from_mla(bufs, P), bufs
    elif kind in ("ascend", "ascend_mla"):
        h, vd = (1, 4) if kind == "ascend_mla" else (2, 8)
        k = [_rand((PAGES, P, h, 8), dtype) for _ in range(LAYERS)]
        v = [_rand((PAGES, P, h, vd), dtype) for _ in range(LAYERS)]
        bufs, lay = k + v, KVLayout.from_ascend(k, v, P, is_mla=kind == "ascend_mla")
        planes = [x for kv in zip(k, v) for x in kv]
    elif kind == "page_first":
        b = _rand((PAGES, LAYERS, 2, P, 2, 8), dtype)
        bufs, lay, planes = [b], KVLayout.page_first(b), [b]
    planes = [x.view(torch.uint8).reshape(PAGES, -1) for x in planes]
    return lay, bufs, planes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("kind", ["mha", "mha_vdim", "mla", "ascend", "ascend_mla", "page_first"])
def test_round_trip_vs_index_select(kind, dtype, engine):
    lay, bufs, planes = _pool(kind, dtype)
    pages = torch.tensor([7, 1, 4, 10, 2], device=DEV)     # odd count, non-adjacent, unordered
    stream = torch.cuda.current_stream().cuda_stream
    objs = torch.zeros((len(pages), lay.page_bytes), dtype=torch.uint8, device=DEV)
    engine.gather(lay.plan((pages * P).cpu().numpy()), objs, stream=stream)
    # baseline: index_select per plane, planes concatenated in object order within each page
    ref = torch.cat([pl.index_select(0, pages) for pl in planes], dim=1)
    torch.cuda.synchronize()
    assert torch.equal(objs, ref)
    before = [b.clone() for b in bufs]
    dst = torch.tensor([0, 9, 3], device=DEV)
    engine.scatter(lay.plan((dst * P).cpu().numpy()), objs[[4, 0, 2]], stream=stream)
    torch.cuda.synchronize()
    # every plane: written pages hold the objects' bytes, other pages unchanged
    seg_off = 0
    for j, pl in enumerate(planes):
        seg = pl.shape[1]
        got = pl.index_select(0, dst)
        want = objs[[4, 0, 2]][:, seg_off:seg_off + seg]
        assert torch.equal(got, want), f"plane {j}"
        seg_off += seg
    keep = torch.tensor([p for p in range(PAGES) if p not in (0, 9, 3)], device=DEV)
    old_planes = _planes_of(kind, before)
    for pl, old in zip(planes, old_planes):
        assert torch.equal(pl.index_select(0, keep), old.index_select(0, keep))


def _planes_of(kind, bufs):
    if kind == "page_first":
        return [bufs[0].view(torch.uint8).reshape(PAGES, -1)]
    if kind == "mla":
        return [b.view(torch.uint8).reshape(PAGES, -1) for b in bufs]
    n = len(bufs) // 2
    return [x.view(torch.uint8).reshape(PAGES, -1) for kv in zip(bufs[:n], bufs[n:]) for x in kv]


def test_copy_segments_unaligned(engine):
    src = torch.randint(0, 255, (1 << 20,), dtype=torch.uint8, device=DEV)
    dst = torch.zeros_like(src)
    base_s, base_d = src.data_ptr(), dst.data_ptr()
    offs = [(0, 3, 1), (1, 100, 70_001), (200_000, 200_013, 65_536 * 3 + 5), (500_000, 700_000, 16)]
    engine.copy_segments([base_s + s for s, _, _ in offs], [base_d + d for _, d, _ in offs], [n for *_, n in offs],
                         stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    exp = torch.zeros_like(src)
    for s, d, n in offs:
        exp[d:d + n] = src[s:s + n]
    assert torch.equal(dst, exp)


def test_side_stream(engine):
    lay, _, planes = _pool("mha", torch.bfloat16)
    s = torch.cuda.Stream()
    objs = torch.zeros((2, lay.page_bytes), dtype=torch.uint8, device=DEV)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        engine.gather(lay.plan([P * 5, P * 6]), objs, stream=s.cuda_stream)
    s.synchronize()
    ref = torch.stack([pl[[5, 6]] for pl in planes], dim=1).reshape(2, -1)
    assert torch.equal(objs, ref)
