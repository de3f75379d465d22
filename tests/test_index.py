"""PrefixIndex: edge cases, the write-back hooks, input types and errors.

The random differential test against a reference model lives in
test_index_model.py; these are the named cases the issue asks for.
"""
from __future__ import annotations

import threading
from array import array

import numpy as np
import pytest

import kvdirect
from kvdirect.errors import ConfigError
from kvdirect.index import POOL_IN_POOL, POOL_UNKNOWN, POOL_WRITING, MatchResult, PrefixIndex


def toks(*pages, P):
    """Token ids for the given page labels: page label k -> [k*100, k*100+1, ...]."""
    return np.array([k * 100 + i for k in pages for i in range(P)], dtype=np.int64)


def slots_for(n, base=0):
    return np.arange(base, base + n, dtype=np.int64)


def check(ix):
    assert ix._check() == ""
    assert ix.evictable_size + ix.protected_size == ix.total_size


# ---------------------------------------------------------------------------
# public surface
# ---------------------------------------------------------------------------
def test_exported_names():
    assert kvdirect.PrefixIndex is PrefixIndex
    assert kvdirect.MatchResult is MatchResult
    ix = PrefixIndex(4)
    r = ix.match([1, 2, 3, 4])
    assert isinstance(r, MatchResult)
    dl, ds, pl, node, dg = r  # a named tuple
    assert (dl, pl, node, dg) == (0, 0, 0, None) and ds.dtype == np.int64 and ds.size == 0
    assert not ds.flags.writeable  # the shared empty array cannot be modified
    assert "page_size=4" in repr(ix)
    assert ix.stats()["page_size"] == 4


def test_basic_insert_match_sizes():
    ix = PrefixIndex(4)
    t = toks(1, 2, 3, P=4)
    assert ix.insert(t, slots_for(12, 100)) == 0
    assert (ix.total_size, ix.evictable_size, ix.protected_size, len(ix)) == (12, 12, 0, 3)
    r = ix.match(t[:10])  # 2 full pages; the partial third page is ignored
    assert r.device_len == 8 and r.pool_len == 0
    assert r.device_slots.tolist() == list(range(100, 108))
    # inserting again: everything already cached, caller frees its duplicates
    assert ix.insert(t, slots_for(12, 500)) == 12
    assert ix.match(t).device_slots.tolist() == list(range(100, 112))
    check(ix)


def test_page_size_one_and_large_pages():
    ix = PrefixIndex(1)
    ix.insert([5, 6, 7], [0, 1, 2])
    ix.insert([5, 6, 8], [9, 10, 11])
    assert ix.match([5, 6, 8, 9]).device_slots.tolist() == [0, 1, 11]
    assert ix.total_size == 4
    big = PrefixIndex(1024)
    t = np.arange(3000, dtype=np.int64)
    assert big.insert(t, slots_for(3000)) == 0
    assert big.total_size == 2048  # two full pages, the rest is a partial page
    r = big.match(np.concatenate([t[:2048], [-1] * 100]))
    assert r.device_len == 2048 and r.device_slots.tolist() == list(range(2048))
    assert big.evict(1).tolist() == list(range(1024, 2048))  # one page, exactly
    check(ix), check(big)


def test_empty_and_short_keys():
    ix = PrefixIndex(8)
    for empty in ([], (), np.array([], np.int64), array("q"), np.array([], np.int32)):
        assert ix.insert(empty, []) == 0
        r = ix.match(empty)
        assert (r.device_len, r.pool_len, r.node) == (0, 0, 0)
    assert ix.insert([1, 2, 3], []) == 0  # shorter than a page: nothing to cache
    assert ix.insert_pool_only([1, 2, 3]) == 0
    assert len(ix) == 0 and ix.total_size == 0
    assert ix.match([1, 2, 3]).device_len == 0
    assert ix.evict(100).size == 0
    check(ix)


def test_repeated_pages_inside_one_key():
    P = 2
    ix = PrefixIndex(P)
    t = toks(7, 7, 7, 7, P=P)
    ix.insert(t, slots_for(8))
    assert ix.match(toks(7, 7, P=P)).device_slots.tolist() == [0, 1, 2, 3]
    assert ix.match(toks(7, 7, 7, 7, 7, P=P)).device_len == 8
    assert len(ix) == 4
    # leaves go first: the deepest copy of the repeated page
    assert ix.evict(1).tolist() == [6, 7]
    assert ix.match(t).device_len == 6
    check(ix)


def test_namespaces_never_share():
    ix = PrefixIndex(2)
    t = toks(1, 2, P=2)
    ix.insert(t, slots_for(4))
    assert ix.match(t, namespace="tenant-a").device_len == 0
    assert ix.match(t, "").device_len == 4  # "" is the default namespace
    assert ix.insert(t, slots_for(4, 50), namespace="tenant-a") == 0
    assert ix.match(t, namespace="tenant-a").device_slots.tolist() == [50, 51, 52, 53]
    assert ix.match(t).device_slots.tolist() == [0, 1, 2, 3]
    ix.insert_pool_only(toks(1, 2, 3, P=2), namespace="lora-x")
    assert ix.match(toks(1, 2, 3, P=2)).pool_len == 0
    assert ix.match(toks(1, 2, 3, P=2), namespace="lora-x").pool_len == 6
    assert ix.total_size == 8
    check(ix)


def test_evict_everything_and_lru_order():
    P = 2
    ix = PrefixIndex(P)
    ix.insert(toks(1, 2, P=P), slots_for(4, 0))
    ix.insert(toks(3, 4, P=P), slots_for(4, 10))
    ix.insert(toks(1, 5, P=P), slots_for(4, 20))  # shares page 1
    ix.match(toks(3, 4, P=P))  # now the most recent
    # least recent leaf first: page 2 (under 1), then page 5, then page 1, then 4, 3
    freed = ix.evict(10**9)
    assert freed.tolist() == [2, 3, 22, 23, 0, 1, 12, 13, 10, 11]
    assert (ix.total_size, ix.evictable_size, ix.protected_size, len(ix)) == (0, 0, 0, 0)
    assert ix.match(toks(1, 2, P=P)).device_len == 0
    check(ix)


def test_eviction_while_locked():
    P = 2
    ix = PrefixIndex(P)
    ix.insert(toks(1, 2, 3, P=P), slots_for(6))
    ix.insert(toks(1, 9, P=P), slots_for(4, 100))
    r = ix.match(toks(1, 2, P=P))
    ix.lock(r.node)
    assert ix.protected_size == 4 and ix.evictable_size == 4  # pages 3 and 9
    freed = ix.evict(10**6)
    assert sorted(freed.tolist()) == [4, 5, 102, 103]  # page 3 and page 9; path 1-2 stays
    assert ix.total_size == 4 and ix.evictable_size == 0
    assert ix.match(toks(1, 2, 3, P=P)).device_slots.tolist() == [0, 1, 2, 3]
    ix.unlock(r.node)
    assert ix.evictable_size == 4
    assert ix.evict(4).tolist() == [2, 3, 0, 1]
    check(ix)


def test_lock_unlock_errors_and_stale_handles():
    ix = PrefixIndex(2)
    ix.insert(toks(1, 2, P=2), slots_for(4))
    r = ix.match(toks(1, 2, P=2))
    with pytest.raises(ConfigError, match="not locked"):
        ix.unlock(r.node)
    ix.lock(0), ix.unlock(0)  # "nothing matched" handle: no-op
    # a handle stays valid across splits and keeps naming the same path end
    short = ix.match(toks(1, P=2))
    ix.lock(r.node)
    assert ix.path_states(r.node)[0].size == 2 and ix.path_states(short.node)[0].size == 1
    with pytest.raises(ConfigError, match="not locked"):
        ix.unlock(short.node)  # locks pair with the same handle
    ix.unlock(r.node)
    ix.evict(100)
    for call in (ix.lock, ix.unlock, ix.path_digests, ix.path_states):
        with pytest.raises(ConfigError, match="stale"):
            call(r.node)
    for bad in (-1, "3", 1.5, None, True):
        with pytest.raises(ConfigError):
            ix.lock(bad)
    ix.reset()
    assert len(ix) == 0


# ---------------------------------------------------------------------------
# pool states and write-back hooks
# ---------------------------------------------------------------------------
def test_write_back_pins_then_pool_only_then_back_to_device():
    P = 2
    ix = PrefixIndex(P)
    t = toks(1, 2, 3, P=P)
    ix.insert(t, slots_for(6))
    assert ix.mark_writing(t, 0, 3) == 3
    assert ix.mark_writing(t, 0, 3) == 0  # already WRITING
    assert ix.protected_size == 6 and ix.evictable_size == 0
    assert ix.evict(100).size == 0  # pinned: never freed while a write reads it
    assert ix.path_states(ix.match(t).node)[0].tolist() == [POOL_WRITING] * 3
    assert ix.mark_in_pool(t, 1, 2) == 2  # pages 2, 3 stored; page 1 still writing
    assert ix.protected_size == 2
    assert ix.evict(100).tolist() == [4, 5, 2, 3]
    assert ix.pool_only_pages == 2 and ix.total_size == 2
    r = ix.match(t)
    assert (r.device_len, r.pool_len) == (2, 4)
    assert ix.mark_in_pool(t, 0, 1) == 1
    ix.evict(2)
    r = ix.match(t)
    assert (r.device_len, r.pool_len) == (0, 6) and ix.pool_only_pages == 3
    # a load brings them back: nothing was on device, the caller's slots are kept
    assert ix.insert(t, slots_for(6, 40)) == 0
    assert ix.pool_only_pages == 0 and ix.total_size == 6
    r = ix.match(t)
    assert r.device_slots.tolist() == list(range(40, 46)) and r.pool_len == 0
    assert ix.path_states(r.node)[0].tolist() == [POOL_IN_POOL] * 3  # pool state kept
    check(ix)


def test_partial_device_prefix_then_pool_pages_return():
    P = 2
    ix = PrefixIndex(P)
    t = toks(1, 2, 3, P=P)
    ix.insert(t, slots_for(6))
    ix.mark_in_pool(t, 0, 3)
    ix.evict(2)  # page 3 -> pool-only
    r = ix.match(t)
    assert (r.device_len, r.pool_len) == (4, 2)
    assert ix.insert(t, slots_for(6, 70)) == 4  # first 4 tokens were on device
    assert ix.match(t).device_slots.tolist() == [0, 1, 2, 3, 74, 75]
    check(ix)


def test_write_failed_unpins_and_page_is_dropped_on_eviction():
    P = 2
    ix = PrefixIndex(P)
    t = toks(1, 2, P=P)
    ix.insert(t, slots_for(4))
    ix.mark_writing(t, 0, 2)
    assert ix.mark_write_failed(t, 0, 2) == 2
    assert ix.mark_write_failed(t, 0, 2) == 0
    assert ix.evictable_size == 4
    ix.evict(100)
    assert len(ix) == 0 and ix.pool_only_pages == 0  # never marked stored: not kept
    check(ix)


def test_mark_not_in_pool_drops_pool_only_pages_unless_locked():
    P = 2
    ix = PrefixIndex(P)
    t = toks(1, 2, 3, P=P)
    ix.insert_pool_only(t)
    r = ix.match(t)
    assert (r.device_len, r.pool_len) == (0, 6)
    ix.lock(r.node)
    assert ix.mark_not_in_pool(t, 1, 1) == 1  # page 2 missing from the pool
    assert len(ix) == 3  # locked: kept until unlocked
    assert ix.match(t).pool_len == 2  # page 1 only
    ix.unlock(r.node)
    assert len(ix) == 1 and ix.pool_only_pages == 1  # pages 2 and 3 went with it
    # device pages only lose their pool state
    ix.insert(t, slots_for(6))
    ix.mark_in_pool(t, 0, 3)
    assert ix.mark_not_in_pool(t, 0, 3) == 3
    assert ix.total_size == 6
    check(ix)


def test_pool_only_pages_are_bounded_lru():
    P = 2
    ix = PrefixIndex(P, max_pool_only_pages=3)
    ix.insert_pool_only(toks(1, 2, P=P))
    ix.insert_pool_only(toks(3, 4, P=P))
    assert ix.pool_only_pages == 3  # page 2 (least recent leaf) dropped
    assert ix.match(toks(1, 2, P=P)).pool_len == 2
    ix.insert_pool_only(toks(5, P=P))
    assert ix.pool_only_pages == 3
    # page 1 was refreshed by the match above: page 4 (least recent leaf) went
    assert ix.match(toks(1, P=P)).pool_len == 2
    assert ix.match(toks(3, 4, P=P)).pool_len == 2
    assert ix.match(toks(5, P=P)).pool_len == 2
    zero = PrefixIndex(P, max_pool_only_pages=0)
    zero.insert(toks(1, P=P), slots_for(2))
    zero.mark_in_pool(toks(1, P=P), 0, 1)
    assert zero.evict(2).tolist() == [0, 1] and len(zero) == 0
    check(ix), check(zero)


def test_insert_pool_only_marks_existing_pages():
    P = 2
    ix = PrefixIndex(P)
    t = toks(1, 2, P=P)
    ix.insert(toks(1, P=P), slots_for(2))
    assert ix.insert_pool_only(t) == 2  # page 1 UNKNOWN -> IN_POOL, page 2 new
    assert ix.insert_pool_only(t) == 0
    r = ix.match(t)
    assert (r.device_len, r.pool_len) == (2, 2)
    ix.mark_writing(t, 0, 2)  # only device pages can be WRITING; page 1 is IN_POOL
    assert ix.protected_size == 0
    check(ix)


def test_marks_are_robust_against_splits_and_missing_pages():
    P = 2
    ix = PrefixIndex(P)
    t = toks(1, 2, 3, 4, P=P)
    ix.insert(t, slots_for(8))
    ix.match(toks(1, 2, 9, P=P))  # split after page 2
    assert ix.mark_writing(t, 1, 3) == 3
    assert ix.mark_in_pool(toks(1, 2, 8, P=P), 0, 3) == 2  # page 8 is not cached
    with pytest.raises(ConfigError, match="not inside"):
        ix.mark_in_pool(t, 3, 2)
    assert ix.mark_in_pool(t, 0, 4, namespace="other") == 0
    check(ix)


# ---------------------------------------------------------------------------
# digests
# ---------------------------------------------------------------------------
def test_digests_follow_pages():
    P = 2
    ix = PrefixIndex(P)
    t = toks(1, 2, 3, P=P)
    dg = np.arange(96, dtype=np.uint8).reshape(3, 32)
    ix.insert(t, slots_for(6), digests=dg[:2])
    r = ix.match(toks(1, 2, P=P))
    assert r.last_digest == dg[1].tobytes()
    r3 = ix.match(t)
    assert r3.last_digest is None
    d, mask = ix.path_digests(r3.node)
    assert mask.tolist() == [True, True, False] and d[:2].tobytes() == dg[:2].tobytes()
    ix.set_path_digests(r3.node, dg[2:], first_page=2)
    assert ix.match(t).last_digest == dg[2].tobytes()
    with pytest.raises(ConfigError):
        ix.set_path_digests(r3.node, dg, first_page=1)
    with pytest.raises(ConfigError):
        ix.set_path_digests(r3.node, np.zeros((1, 31), np.uint8))
    with pytest.raises(ConfigError):
        ix.insert(t, slots_for(6), digests=np.zeros((4, 32), np.uint8))  # more rows than pages
    ix.insert_pool_only(toks(5, P=P), digests=b"\x07" * 32)
    assert ix.match(toks(5, P=P)).last_digest == b"\x07" * 32
    # digests survive eviction to pool-only
    ix.mark_in_pool(t, 0, 3)
    ix.evict(100)
    r = ix.match(t)
    assert r.pool_len == 6 and r.last_digest == dg[2].tobytes()
    check(ix)


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda v: np.asarray(v, np.int64), lambda v: np.asarray(v, np.int32),
    lambda v: array("q", v), lambda v: array("i", v), lambda v: array("l", v),
    list, tuple, lambda v: memoryview(array("q", v)),
], ids=["np64", "np32", "array_q", "array_i", "array_l", "list", "tuple", "memoryview"])
def test_token_input_types_are_equivalent(make):
    ix = PrefixIndex(4)
    v = list(range(10, 22))
    ix.insert(np.asarray(v, np.int64), slots_for(12))
    r = ix.match(make(v))
    assert r.device_len == 12 and r.device_slots.tolist() == list(range(12))
    assert ix.insert(make(v), make(list(range(12)))) == 12


def test_torch_tensor_input():
    torch = pytest.importorskip("torch", reason="torch not installed in this environment")
    ix = PrefixIndex(4)
    t = torch.arange(12, dtype=torch.int64)
    ix.insert(t, torch.arange(100, 112))
    r = ix.match(t.to(torch.int32))
    assert r.device_slots.tolist() == list(range(100, 112))


def test_int32_and_int64_spellings_are_one_key_but_big_ids_differ():
    ix = PrefixIndex(2)
    ix.insert(np.array([1, 2], np.int32), [0, 1])
    assert ix.match(np.array([1, 2], np.int64)).device_len == 2
    assert ix.match([1 + 2**32, 2]).device_len == 0  # no truncation to 32 bits


def test_slots_extra_entries_ignored_and_int32_widened():
    ix = PrefixIndex(4)
    ix.insert(list(range(6)), np.arange(10, 20, dtype=np.int32))
    assert ix.match(list(range(4))).device_slots.tolist() == [10, 11, 12, 13]
    ix.insert(list(range(6, 10)), np.arange(7, dtype=np.int64))  # > 4 slots: extras ignored
    assert ix.total_size == 8


@pytest.mark.parametrize("bad,msg", [
    (np.arange(8, dtype=np.float32), "int32 or int64"),
    (np.arange(8, dtype=np.uint64), "int32 or int64"),
    (np.zeros((2, 4), np.int64), "1-D"),
    (np.arange(16, dtype=np.int64)[::2], "contiguous"),
    (np.arange(8, dtype=">i8"), "big-endian"),
    ("abcd", "integer"),
    (b"abcdefgh", "format"),
    ([1.5, 2.5, 3.5, 4.5], "expected an int token id"),
    ((1, 2, None, 4), "expected an int token id"),
    ([True, False, True, False], "expected an int token id"),
    ([2**70, 1, 2, 3], "does not fit in int64"),
    (object(), "1-D|int32 or int64"),
])
def test_bad_tokens_raise_config_error(bad, msg):
    ix = PrefixIndex(4)
    with pytest.raises(ConfigError, match=msg):
        ix.match(bad)
    with pytest.raises(ConfigError, match=msg):
        ix.insert(bad, np.arange(8))
    assert len(ix) == 0


def test_bad_arguments_raise_config_error():
    ix = PrefixIndex(4)
    with pytest.raises(ConfigError, match="need >= 8"):
        ix.insert(list(range(9)), np.arange(7))
    with pytest.raises(ConfigError, match=">= 0"):
        ix.insert(list(range(4)), [0, 1, -2, 3])
    with pytest.raises(ConfigError, match="namespace"):
        ix.match([1, 2, 3, 4], namespace=3)
    with pytest.raises(ConfigError, match="num_tokens"):
        ix.evict(-1)
    with pytest.raises(ConfigError):
        ix.evict(2.5)
    with pytest.raises(ConfigError, match="digests"):
        ix.insert(list(range(4)), range(4), digests=b"x" * 31)
    with pytest.raises(TypeError):
        ix.match()
    with pytest.raises(TypeError):
        ix.match([1], bogus=1)
    for ps in (0, -1, 1.5, "4", True):
        with pytest.raises(ConfigError):
            PrefixIndex(ps)
    with pytest.raises(ConfigError):
        PrefixIndex(4, max_pool_only_pages=-1)
    assert len(ix) == 0 and ix._check() == ""


def test_match_result_slots_are_a_fresh_array():
    ix = PrefixIndex(2)
    ix.insert([1, 2, 3, 4], [5, 6, 7, 8])
    a = ix.match([1, 2, 3, 4]).device_slots
    a[:] = -1  # the caller owns it; the index is unaffected
    assert ix.match([1, 2, 3, 4]).device_slots.tolist() == [5, 6, 7, 8]


def test_match_slots_are_a_snapshot_built_on_first_access():
    P = 4
    ix = PrefixIndex(P)
    t = toks(1, 2, 3, P=P)
    ix.insert(t, slots_for(12, 40))
    r = ix.match(t)
    assert ix.evict(1 << 30).size == 12  # every page gone before the slots are read
    assert r.device_slots.tolist() == list(range(40, 52))  # what the match saw
    assert r.device_slots is r.device_slots  # built once, then the same array
    assert r[1] is r.device_slots and len(r) == 5
    with pytest.raises(IndexError):
        r[5]
    assert "device_len=12" in repr(r)
    with pytest.raises(TypeError):
        MatchResult()  # only match() makes them


@pytest.mark.parametrize("order", ["runs", "reversed pages", "scattered tokens"])
def test_match_slots_across_nodes_and_slot_shapes(order):
    """Slots leave a match as runs of consecutive slots: pages of one node, pages of
    consecutive nodes that continue each other, nodes holding a slot per token."""
    P = 4
    ix = PrefixIndex(P)
    base = toks(1, 2, 3, 4, 5, P=P)
    if order == "runs":
        slots = np.arange(20, dtype=np.int64) + 7
    elif order == "reversed pages":
        slots = (np.arange(5)[::-1, None] * P + np.arange(P)).reshape(-1).astype(np.int64)
    else:
        slots = np.random.default_rng(3).permutation(100)[:20].astype(np.int64)
    ix.insert(base, slots)
    ix.match(base[:2 * P])  # split the node after two pages: the path is now two nodes
    ix.insert(np.concatenate([base[:3 * P], toks(9, P=P)]), np.concatenate([slots[:3 * P], [90, 91, 92, 93]]))
    for n in (P, 2 * P, 3 * P, 5 * P):
        assert ix.match(base[:n]).device_slots.tolist() == slots[:n].tolist()
    assert ix.match(np.concatenate([base[:3 * P], toks(9, P=P)])).device_slots.tolist() == \
        slots[:3 * P].tolist() + [90, 91, 92, 93]
    check(ix)


# ---------------------------------------------------------------------------
# threads: completion marks from another thread
# ---------------------------------------------------------------------------
def test_completion_marks_from_another_thread():
    P = 4
    ix = PrefixIndex(P, max_pool_only_pages=50)
    rng = np.random.default_rng(0)
    keys = [rng.integers(0, 3, size=P * 6) for _ in range(40)]
    stop = threading.Event()
    errors = []

    def completions():
        i = 0
        try:
            while not stop.is_set():
                k = keys[i % len(keys)]
                ix.mark_in_pool(k, 0, 6) if i % 3 else ix.mark_write_failed(k, 0, 6)
                i += 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    th = threading.Thread(target=completions)
    th.start()
    try:
        base = 0
        for it in range(3000):
            k = keys[it % len(keys)]
            ix.match(k)
            ix.insert(k, np.arange(base, base + k.size))
            base += k.size
            ix.mark_writing(k, 0, 6)
            if it % 7 == 0:
                ix.evict(3 * P)
    finally:
        stop.set()
        th.join()
    assert not errors
    check(ix)
    # whatever the completions did, every match is a whole-page prefix of the key whose slots are
    # distinct and come from the insertions of this test (nothing invented, nothing shared)
    for k in keys:
        m = ix.match(k)
        slots = m.device_slots
        assert m.device_len % P == 0 and m.device_len <= k.size and len(slots) == m.device_len
        assert len(np.unique(slots)) == len(slots) and (slots < base).all() and (slots >= 0).all()


def test_insert_path_is_insert_then_mark_then_match():
    """insert_path gives what insert + mark_in_pool + set digests + match gave, in one call."""
    P = 4
    a, b = PrefixIndex(P), PrefixIndex(P)
    t = toks(1, 2, 3, 4, P=P)
    dg = np.arange(4 * 32, dtype=np.uint8).reshape(4, 32)
    for ix in (a, b):  # pages 0-1 on device, 2-3 pool-only
        ix.insert(t[:2 * P], slots_for(2 * P, 10))
        ix.insert_pool_only(t)
    slots = np.concatenate([slots_for(2 * P, 10), slots_for(2 * P, 60)])
    already, r = a.insert_path(t, slots, None, dg, in_pool_first=2)
    assert b.insert(t, slots, None, dg) == already == 2 * P
    b.mark_in_pool(t, 2, 2)
    want = b.match(t)
    assert (r.device_len, r.pool_len, r.last_digest) == (want.device_len, want.pool_len, want.last_digest)
    assert r.device_slots.tolist() == want.device_slots.tolist() == slots.tolist()
    assert a.path_states(r.node)[0].tolist() == b.path_states(want.node)[0].tolist()
    assert a.path_digests(r.node)[0].tolist() == dg.tolist()
    assert a.match(t).node == r.node
    # a prefix ending inside a node: the node is split, the handle names the prefix's end
    already, r2 = a.insert_path(t[:3 * P], slots[:3 * P])
    assert already == 3 * P and r2.device_len == 3 * P and a.match(t[:3 * P]).node == r2.node
    with pytest.raises(ConfigError):
        a.insert_path(t, slots, in_pool_first=-1)
    already, r3 = a.insert_path(t[:P - 1], slots[:P - 1])  # no full page
    assert already == 0 and r3.node == 0 and r3.device_len == 0
    check(a), check(b)
