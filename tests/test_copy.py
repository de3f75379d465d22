"""CopyEngine (CPU): byte-exact gather/scatter round trips for every layout, and the
segment math shared with the CUDA and Ascend kernels."""
import os
from pathlib import Path

import numpy as np
import pytest

from _layout_pools import DTYPES, KINDS, Pool
from kvdirect import CopyEngine, _core
from kvdirect.errors import BackendUnavailableError, ConfigError
from kvdirect.stores.base import ScatterList

segmath = _core.segmath


@pytest.fixture
def rng():
    return np.random.default_rng(99)


# threads=1 runs on the caller; min_bytes_per_thread=1 forces every batch to be
# split across all workers, so byte ranges cut through segments.
ENGINES = [dict(threads=1), dict(threads=3, min_bytes_per_thread=1)]


@pytest.mark.parametrize("engine_kw", ENGINES, ids=["1thread", "3threads-split"])
@pytest.mark.parametrize("np_dtype,dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind, np_dtype, dtype, engine_kw, rng):
    pool = Pool(kind, rng, np_dtype=np_dtype, dtype=dtype)
    L, eng = pool.layout, CopyEngine(**engine_kw)
    src_slots = np.array([28, 4, 16, 32, 8], np.int64)    # odd count, non-adjacent, unordered
    objs = np.zeros((len(src_slots), L.page_bytes), np.uint8)
    assert eng.gather(L.plan(src_slots), objs) == objs.nbytes
    for i, s in enumerate(src_slots):          # page i at dst + i * page_bytes
        np.testing.assert_array_equal(objs[i], pool.ref_object(int(s)), err_msg=f"page {i} slot {s}")
    # scatter into other slots (3 pages), everything else must stay untouched
    dst_slots = np.array([0, 20, 12], np.int64)
    pool.zero()
    assert eng.scatter(L.plan(dst_slots), objs[[4, 0, 2]]) == 3 * L.page_bytes
    for i, s in zip([4, 0, 2], dst_slots):
        np.testing.assert_array_equal(pool.ref_object(int(s)), objs[i])
    untouched = [s for s in range(0, L.num_slots, L.page_size) if s not in dst_slots]
    for s in untouched:
        assert not pool.ref_object(s).any(), f"slot {s} written by a scatter that did not name it"
    # and back to the original slots: each page holds its original bytes again
    eng.scatter(L.plan(src_slots), objs)
    for i, s in enumerate(src_slots):
        np.testing.assert_array_equal(pool.ref_object(int(s)), objs[i])


def test_gather_raw_address_and_layer_range(rng):
    pool = Pool("mha_vdim", rng)
    L, eng = pool.layout, CopyEngine(threads=2, min_bytes_per_thread=1)
    slots = np.array([12, 0, 24], np.int64)
    objs = np.zeros((3, L.page_bytes), np.uint8)
    eng.gather(L.plan(slots), objs.ctypes.data, objs.nbytes)
    off = L.layer_offsets()
    for layer in range(L.num_layers):   # a layer-wise gather equals that byte range of each object
        part = np.zeros((3, int(off[layer + 1] - off[layer])), np.uint8)
        eng.gather(L.plan_layer(slots, layer), part)
        np.testing.assert_array_equal(part, objs[:, off[layer]:off[layer + 1]])


def test_gather_bounds_checked(rng):
    L, eng = Pool("mla", rng).layout, CopyEngine(threads=2)
    small = np.zeros(2 * L.page_bytes - 1, np.uint8)
    with pytest.raises(ConfigError, match="more bytes than the packed buffer"):
        eng.gather(L.plan([0, 4]), small)
    with pytest.raises(ConfigError, match="more bytes than the packed buffer"):
        eng.scatter(L.plan([0, 4]), small)
    assert not small.any()
    with pytest.raises(ConfigError, match="needs its size"):
        eng.gather(L.plan([0]), small.ctypes.data)
    with pytest.raises(ConfigError, match="contiguous"):
        eng.gather(L.plan([0]), np.zeros((L.page_bytes, 2), np.uint8)[:, 0])


def test_copy_segments_and_uneven_segments(rng):
    src = rng.integers(0, 256, 100_000, dtype=np.uint8)
    dst = np.zeros_like(src)
    # uneven lengths incl. zero-length and unaligned offsets
    sizes = np.array([0, 1, 4095, 4097, 0, 30_000, 7, 12_345], np.uint64)
    s_off = np.concatenate([[0], np.cumsum(sizes[:-1] + 3)]).astype(np.uint64)
    d_off = np.concatenate([[5], 5 + np.cumsum(sizes[:-1] + 11)]).astype(np.uint64)
    eng = CopyEngine(threads=3, min_bytes_per_thread=1)
    n = eng.copy_segments(src.ctypes.data + s_off, dst.ctypes.data + d_off, sizes)
    assert n == int(sizes.sum())
    expect = np.zeros_like(src)
    for so, do, sz in zip(s_off, d_off, sizes):
        expect[do:do + sz] = src[so:so + sz]
    np.testing.assert_array_equal(dst, expect)
    # the same segments gathered pack back to back
    packed = np.zeros(int(sizes.sum()), np.uint8)
    eng.gather(ScatterList(src.ctypes.data + s_off, sizes), packed)
    np.testing.assert_array_equal(packed, np.concatenate([src[o:o + z] for o, z in zip(s_off, sizes)]))
    with pytest.raises(ConfigError, match="3 sources, 2 destinations"):
        eng.copy_segments([1, 2, 3], [1, 2], [0, 0, 0])


def test_engine_threads():
    assert CopyEngine(threads=3).threads == 3
    # the default is one thread per hardware thread (std::thread::hardware_concurrency: CPUs online)
    assert CopyEngine().threads == os.cpu_count()


@pytest.mark.parametrize("total,workers,align", [(0, 3, 4096), (1, 4, 4096), (10_000, 3, 4096),
                                                 (1 << 20, 7, 4096), (12345, 5, 1), (4096 * 3, 8, 4096)])
def test_worker_range_partitions_exactly(total, workers, align):
    ranges = [segmath.worker_range(total, workers, w, align) for w in range(workers)]
    pos = 0
    for b, e in ranges:
        assert b == pos and e >= b
        assert b % align == 0 or b == total
        pos = e
    assert pos == total
    sizes = [e - b for b, e in ranges]
    assert max(sizes) - min(sizes) <= align   # balanced to within one unit


def test_locate_segment_matches_searchsorted(rng):
    sizes = rng.integers(0, 5, 200).astype(np.uint64)   # many zero-length segments
    sizes[-1] = 3
    prefix = np.concatenate([[0], np.cumsum(sizes)]).astype(np.uint64)
    for off in range(int(prefix[-1])):
        k = segmath.locate_segment(prefix, off)
        assert prefix[k] <= off < prefix[k + 1]
        assert k == np.searchsorted(prefix, off, side="right") - 1
    assert segmath.chunk_count(0, 64) == 0 and segmath.chunk_count(65, 64) == 2


def test_cuda_engine_unavailable_is_clear():
    from kvdirect.runtime import cuda_devices

    if cuda_devices().available:
        pytest.skip("a CUDA device is visible: tests/cuda covers the CUDA engine")
    with pytest.raises(BackendUnavailableError, match="CUDA copy engine"):
        CopyEngine(device="cuda")
    with pytest.raises(ConfigError, match="'cpu' or 'cuda"):
        CopyEngine(device="tpu")


def test_ascend_engine_unavailable_is_clear(monkeypatch):
    """Without a CANN build the Ascend library is absent: the error says how to get it."""
    import kvdirect.copy as copy_mod

    if any(p.is_file() for p in copy_mod._lib_candidates(copy_mod.ASCEND_LIB, "KVDIRECT_ASCEND_LIB")):
        pytest.skip("libkvdirect_ascend.so was built here (CANN present)")
    with pytest.raises(BackendUnavailableError, match=r"libkvdirect_ascend\.so not found.*KVDIRECT_ASCEND=ON"):
        CopyEngine(device="npu:0")
    # a library that exists but cannot be loaded (no ACL runtime) is reported with its path
    fake = Path(__file__)  # not a shared object
    monkeypatch.setenv("KVDIRECT_ASCEND_LIB", str(fake))
    with pytest.raises(BackendUnavailableError, match="cannot load"):
        CopyEngine(device="npu")
