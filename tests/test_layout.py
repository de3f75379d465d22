"""KVLayout: constructors, validation, and the C++ planner against a slow reference."""
import numpy as np
import pytest

from _layout_pools import DTYPES, KINDS, Pool
from kvdirect import KVLayout
from kvdirect.errors import ConfigError, LayoutMismatchError
from kvdirect.stores.base import ScatterList


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _ref_plan(pool, slots):
    segs = [pool.ref_segments(int(s)) for s in slots]
    return (np.array([[a for a, _ in row] for row in segs], np.uint64).reshape(len(slots), -1),
            np.array([[n for _, n in row] for row in segs], np.uint64).reshape(len(slots), -1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("np_dtype,dtype", DTYPES)
def test_plan_matches_reference(kind, np_dtype, dtype, rng):
    pool = Pool(kind, rng, np_dtype=np_dtype, dtype=dtype)
    L = pool.layout
    slots = np.array([32, 4, 20, 0, 28], np.int64)  # odd count, unordered, non-adjacent
    sl = L.plan(slots)
    assert isinstance(sl, ScatterList)
    addrs, sizes = _ref_plan(pool, slots)
    if kind.startswith("page_first"):  # reference splits the page by (layer, K/V) too
        assert sl.addrs.shape == addrs.shape
    np.testing.assert_array_equal(sl.addrs, addrs)
    np.testing.assert_array_equal(sl.sizes, sizes)
    assert sl.addrs.dtype == np.uint64 and sl.sizes.dtype == np.uint64
    assert L.segments_per_page == sl.addrs.shape[1] == L.num_layers * (1 if L.is_mla and kind != "ascend_mla" else 2)
    assert L.page_bytes == len(pool.ref_object(4)) == int(sl.sizes[0].sum())
    assert L.dtype == dtype and L.device == "cpu" and L.num_layers == 3 and L.page_size == 4


@pytest.mark.parametrize("kind", KINDS)
def test_per_token_slots_equal_first_slots(kind, rng):
    pool = Pool(kind, rng)
    L, P = pool.layout, pool.P
    first = np.array([8, 0, 24], np.int64)
    tokens = (first[:, None] + np.arange(P)).reshape(-1)
    a = L.plan(first)
    for b in (L.plan(tokens), L.plan(tokens, per_token=True), L.plan(tokens.reshape(-1, P)),
              L.plan(tokens.astype(np.int32))):
        np.testing.assert_array_equal(a.addrs, b.addrs)
        np.testing.assert_array_equal(a.sizes, b.sizes)
    np.testing.assert_array_equal(L.page_indices(tokens), [2, 0, 6])


@pytest.mark.parametrize("kind", ["mha_vdim", "mla", "ascend_mla", "page_first"])
def test_plan_layer_and_layer_offsets(kind, rng):
    pool = Pool(kind, rng)
    L = pool.layout
    slots = np.array([12, 4, 32], np.int64)
    full = L.plan(slots)
    off = L.layer_offsets()
    assert off.dtype == np.uint64 and len(off) == L.num_layers + 1 and off[0] == 0 and off[-1] == L.page_bytes
    per = L.segments_per_page // L.num_layers
    for layer in range(L.num_layers):
        part = L.plan_layer(slots, layer)
        np.testing.assert_array_equal(part.addrs, full.addrs[:, layer * per:(layer + 1) * per])
        np.testing.assert_array_equal(part.sizes, full.sizes[:, layer * per:(layer + 1) * per])
        assert int(part.sizes[0].sum()) == int(off[layer + 1] - off[layer])
    with pytest.raises(ConfigError, match="layer 3 out of range"):
        L.plan_layer(slots, 3)


def test_empty_plan(rng):
    L = Pool("mha", rng).layout
    sl = L.plan(np.zeros(0, np.int64))
    assert sl.addrs.shape == (0, L.segments_per_page)


@pytest.mark.parametrize("slots,match", [
    ([4, 6], "index 1 \\(slot 6\\) is not page aligned"),
    ([36], "out of range: the pool has 9 pages"),
    ([-4], "out of range"),
    ([8, 9, 10, 12], "breaks its page"),             # per-token, not consecutive
])
def test_plan_rejects_bad_slots(slots, match, rng):
    L = Pool("mha", rng).layout
    with pytest.raises(ConfigError, match=match):
        L.plan(np.array(slots, np.int64))


def test_plan_rejects_bad_inputs(rng):
    L = Pool("mha", rng).layout
    with pytest.raises(ConfigError, match="not a multiple of page_size"):
        L.plan(np.arange(8, 14), per_token=True)
    with pytest.raises(ConfigError, match="integers"):
        L.plan(np.array([0.0, 4.0]))
    with pytest.raises(ConfigError, match="1-D"):
        L.plan(np.zeros((2, 3), np.int64))


def test_validation_errors(rng):
    k = [np.zeros((32, 2, 8), np.uint16) for _ in range(2)]
    v = [np.zeros((32, 2, 8), np.uint16) for _ in range(2)]
    with pytest.raises(LayoutMismatchError, match="dtype"):
        KVLayout.from_mha([k[0], k[1].view(np.float16)], v, 4)
    with pytest.raises(LayoutMismatchError, match="shape"):
        KVLayout.from_mha([k[0], np.zeros((32, 2, 4), np.uint16)], v, 4)
    with pytest.raises(LayoutMismatchError, match="2 K buffers but 1 V"):
        KVLayout.from_mha(k, v[:1], 4)
    with pytest.raises(LayoutMismatchError, match="slots"):
        KVLayout.from_mha(k, [np.zeros((16, 2, 8), np.uint16)] * 2, 4)
    strided = np.zeros((64, 2, 8), np.uint16)[::2]  # every other slot row: pages not contiguous
    with pytest.raises(ConfigError, match="non-contiguous pages"):
        KVLayout.from_mha([strided, strided], v, 4)
    inner = np.zeros((32, 8, 2), np.uint16).transpose(0, 2, 1)
    with pytest.raises(ConfigError, match="non-contiguous pages"):
        KVLayout.from_mha([inner, inner], v, 4)
    with pytest.raises(ConfigError, match="element size"):
        KVLayout.from_mha(k, v, 4, dtype="float32")
    with pytest.raises(ConfigError, match="torch.Tensor or numpy"):
        KVLayout.from_mha([[1, 2]], v[:1], 4)
    asc = [np.zeros((5, 4, 2, 8), np.uint16)]
    with pytest.raises(LayoutMismatchError, match="page_size=8"):
        KVLayout.from_ascend(asc, asc, 8)
    bad = [np.zeros((5, 8, 2, 8), np.uint16)[:, ::2]]  # slots of a page strided
    with pytest.raises(ConfigError, match="non-contiguous pages"):
        KVLayout.from_ascend(bad, bad)
    with pytest.raises(ConfigError, match="6-D"):
        KVLayout.page_first(np.zeros((4, 2, 2, 4, 8), np.uint8))
    with pytest.raises(ConfigError, match="no full page"):
        KVLayout.from_mha([np.zeros((3, 2, 8), np.uint16)], [np.zeros((3, 2, 8), np.uint16)], 4)
    with pytest.raises(ConfigError, match="unknown dtype"):
        KVLayout.from_addresses([4096], [8192], page_size=4, num_slots=16, kv_heads=1, head_dim=8, dtype="fp7")


def test_stacked_buffers_and_fingerprint(rng):
    k = np.zeros((3, 40, 2, 8), np.uint8)   # [layers, slots, heads, dim]
    v = np.zeros((3, 40, 2, 16), np.uint8)
    L = KVLayout.from_mha(k, v, 8, dtype="float8_e4m3fn")
    assert L.num_layers == 3 and L.num_slots == 40 and L.num_pages == 5
    assert L.page_bytes == 3 * 8 * 2 * (8 + 16)
    assert L.fingerprint_fields() == {"dtype": "float8_e4m3fn", "num_layers": 3, "kv_heads": 2, "head_dim": 8,
                                      "v_head_dim": 16, "page_size": 8, "layout_kind": "mha", "is_mla": False}
    # object format is shared by device layouts that produce the same bytes
    asc = KVLayout.from_ascend(np.zeros((3, 5, 8, 2, 8), np.uint8), np.zeros((3, 5, 8, 2, 16), np.uint8),
                               dtype="float8_e4m3fn")
    assert asc.kind == "ascend" and asc.fingerprint_fields() == L.fingerprint_fields()
    mla = Pool("mla", rng).layout
    assert mla.fingerprint_fields()["layout_kind"] == "mla" and mla.is_mla
    assert mla.fingerprint_fields()["v_head_dim"] is None  # no separate V: LayoutFingerprint reads head_dim
    split = Pool("ascend_mla", rng).layout
    assert split.fingerprint_fields()["layout_kind"] == "mla_split" and split.is_mla
    assert L.regions() == sorted((int(x.ctypes.data), x.nbytes) for x in [k[0], k[1], k[2], v[0], v[1], v[2]])


try:
    import torch
except ImportError:
    torch = None


@pytest.mark.skipif(torch is None, reason="torch not installed: tensor inputs are tested with numpy only")
@pytest.mark.parametrize("tdtype", ["bfloat16", "float16", "float8_e4m3fn"])
def test_torch_tensors(tdtype):
    dt = getattr(torch, tdtype)
    k = [torch.zeros(24, 2, 8, dtype=dt) for _ in range(2)]
    v = [torch.zeros(24, 2, 4, dtype=dt) for _ in range(2)]
    L = KVLayout.from_mha(k, v, 4)
    assert L.dtype == tdtype and L.device == "cpu" and L.v_head_dim == 4
    sl = L.plan(torch.tensor([8, 16]))
    es = k[0].element_size()
    assert sl.addrs[0, 0] == k[0].data_ptr() + 8 * 2 * 8 * es
    assert sl.addrs[1, 3] == v[1].data_ptr() + 16 * 2 * 4 * es
    assert sl.sizes[0, 1] == 4 * 2 * 4 * es
    with pytest.raises(ConfigError, match="non-contiguous"):
        KVLayout.from_mha([t[:, :, :4] for t in k], v, 4)


# ---- every constructor: paged shapes read correctly, anything else refused ---------------

def test_paged_mha_equals_slot_major_mha(rng):
    """[pages, page_size, heads, dim] per layer holds the same pages as [slots, heads, dim]."""
    P, pages = 4, 6
    flat_k = [_r(rng, (pages * P, 2, 8)) for _ in range(2)]
    flat_v = [_r(rng, (pages * P, 2, 8)) for _ in range(2)]
    flat = KVLayout.from_mha(flat_k, flat_v, P)
    paged = KVLayout.from_mha([x.reshape(pages, P, 2, 8) for x in flat_k],
                              [x.reshape(pages, P, 2, 8) for x in flat_v], P)
    assert (paged.kv_heads, paged.head_dim, paged.num_pages, paged.num_slots) == (2, 8, pages, pages * P)
    assert paged.fingerprint_fields() == flat.fingerprint_fields()
    slots = np.array([20, 0, 8])
    np.testing.assert_array_equal(paged.plan(slots).addrs, flat.plan(slots).addrs)
    stacked = KVLayout.from_mha(np.stack([x.reshape(pages, P, 2, 8) for x in flat_k]),
                                np.stack([x.reshape(pages, P, 2, 8) for x in flat_v]), P)
    assert stacked.fingerprint_fields() == flat.fingerprint_fields() and stacked.num_pages == pages


def _r(rng, shape, dtype=np.float16):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("build,exc,match", [
    # from_mha: a paged buffer's page size must be the one given (it used to read page_size as heads)
    (lambda: KVLayout.from_mha([np.zeros((6, 16, 2, 8))] * 2, [np.zeros((6, 16, 2, 8))] * 2, 4),
     LayoutMismatchError, r"holds pages of 16 slots but page_size=4"),
    (lambda: KVLayout.from_mha(np.zeros((6, 4, 2, 8)), np.zeros((6, 4, 2, 8)), 4),
     ConfigError, r"reads as 6 stacked layers of one 4-slot page.*pass a list"),
    (lambda: KVLayout.from_mha([np.zeros((24, 2, 8))], [np.zeros((6, 4, 2, 8))], 4),
     LayoutMismatchError, r"both paged"),
    (lambda: KVLayout.from_mha([np.zeros((24, 16))], [np.zeros((24, 16))], 4),
     ConfigError, r"layer 0 has shape \(24, 16\); expected \[num_slots, kv_heads, head_dim\] or paged"),
    (lambda: KVLayout.from_mha([np.zeros((2, 6, 4, 2, 8))], [np.zeros((2, 6, 4, 2, 8))], 4),
     ConfigError, r"expected \[num_slots, kv_heads, head_dim\]"),
    (lambda: KVLayout.from_mha(np.zeros((24, 16)), np.zeros((24, 16)), 4),
     ConfigError, r"got shape \(24, 16\)"),
    (lambda: KVLayout.from_mha([np.zeros((24, 2, 8))], [np.zeros((24, 4, 8))], 4),
     LayoutMismatchError, r"K has 2 KV heads but V has 4"),
    (lambda: KVLayout.from_mha([np.zeros((6, 4, 2, 8))], [np.zeros((5, 4, 2, 8))], 4),
     LayoutMismatchError, r"K has 6 pages but V has 5"),
    (lambda: KVLayout.from_mha([np.zeros((6, 8, 2, 8))[:, ::2]], [np.zeros((6, 4, 2, 8))], 4),
     ConfigError, r"non-contiguous pages"),
    (lambda: KVLayout.from_mha([np.zeros((24, 2, 8))], [np.zeros((24, 2, 8))], 4.0),
     ConfigError, r"page_size must be a positive int"),
    (lambda: KVLayout.from_mha([np.zeros((24, 2, 8))], [np.zeros((24, 2, 8))], True),
     ConfigError, r"page_size must be a positive int"),
    # from_mla
    (lambda: KVLayout.from_mla([np.zeros((6, 16, 72))], 4),
     LayoutMismatchError, r"shape \(6, 16, 72\) is not an MLA pool with page_size=4"),
    (lambda: KVLayout.from_mla([np.zeros((6, 4, 2, 72))], 4),
     LayoutMismatchError, r"not an MLA pool"),
    (lambda: KVLayout.from_mla(np.zeros((6, 4, 1, 72)), 4),
     ConfigError, r"stacked layers of one 4-slot page"),
    (lambda: KVLayout.from_mla([np.zeros((24, 72))], 4),
     ConfigError, r"expected \[num_slots, 1, dim\], or paged"),
    (lambda: KVLayout.from_mla([np.zeros((24, 1, 72))], 0),
     ConfigError, r"page_size must be a positive int"),
    # from_ascend
    (lambda: KVLayout.from_ascend([np.zeros((24, 2, 8))], [np.zeros((24, 2, 8))], 4),
     ConfigError, r"expected \[pages \+ 1, page_size, kv_heads, dim\]"),
    (lambda: KVLayout.from_ascend([np.zeros((5, 4, 2, 8))], [np.zeros((5, 4, 1, 8))], 4),
     LayoutMismatchError, r"\[pages \+ 1, page_size, heads\] must match"),
    (lambda: KVLayout.from_ascend([np.zeros((5, 4, 2, 8))], [np.zeros((5, 4, 2, 4))], 4, is_mla=True),
     LayoutMismatchError, r"is_mla=True: split MLA buffers are \[pages \+ 1, page_size, 1, dim\]"),
    (lambda: KVLayout.from_ascend([np.zeros((5, 4, 2, 8))], [np.zeros((5, 4, 2, 8))], -4),
     ConfigError, r"page_size must be a positive int"),
    # page_first
    (lambda: KVLayout.page_first(np.zeros((4, 2, 3, 4, 2, 8))), ConfigError, r"K/V \(2\) or MLA \(1\)"),
    (lambda: KVLayout.page_first([np.zeros((4, 2, 2, 4, 2, 8))]), ConfigError, r"torch.Tensor or numpy"),
    # from_addresses
    (lambda: KVLayout.from_addresses([4096], [8192], page_size=4, num_slots=16, kv_heads=0, head_dim=8,
                                     dtype="float16"), ConfigError, r"kv_heads must be a positive int"),
    (lambda: KVLayout.from_addresses([4096], [8192], page_size=4, num_slots=-16, kv_heads=2, head_dim=8,
                                     dtype="float16"), ConfigError, r"num_slots must be a positive int"),
    (lambda: KVLayout.from_addresses([0], [8192], page_size=4, num_slots=16, kv_heads=2, head_dim=8,
                                     dtype="float16"), ConfigError, r"k_addrs must be non-null"),
    (lambda: KVLayout.from_addresses([4096], page_size=4, num_slots=16, kv_heads=2, head_dim=8,
                                     dtype="float16", is_mla=True), ConfigError, r"one latent head"),
    (lambda: KVLayout.from_addresses([4096], [8192], page_size=0, num_slots=16, kv_heads=2, head_dim=8,
                                     dtype="float16"), ConfigError, r"page_size must be a positive int"),
])
def test_constructors_refuse_what_they_cannot_read(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_paged_mla_shapes(rng):
    P, pages = 4, 5
    flat = [_r(rng, (pages * P, 1, 72)) for _ in range(2)]
    a = KVLayout.from_mla(flat, P)
    b = KVLayout.from_mla([x.reshape(pages, P, 72) for x in flat], P)
    c = KVLayout.from_mla([x.reshape(pages, P, 1, 72) for x in flat], P)
    d = KVLayout.from_mla(np.stack([x.reshape(pages, P, 72) for x in flat]), P)
    slots = np.array([16, 4])
    for L in (b, c, d):
        assert L.fingerprint_fields() == a.fingerprint_fields() and L.num_pages == pages
    for L in (b, c):
        np.testing.assert_array_equal(L.plan(slots).addrs, a.plan(slots).addrs)
