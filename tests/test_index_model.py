"""Differential test of the C++ PrefixIndex against a pure-Python reference model.

The model is a trie of single pages with the same documented semantics
(csrc/index/index.h) and brute-force choices: it knows nothing about nodes,
splits, LRU lists or counters. Random sequences of insert / insert_pool_only /
match / lock / unlock / evict / mark_* / digest calls over small alphabets (so
sharing and splitting happen constantly) are applied to both, every result is
compared, and sizes plus the C++ internal invariants are checked after every
step.

Volume: a seeded loop runs a fixed number of operations (>= 10,000 with CI set),
and a hypothesis state machine explores and shrinks on top of it.
"""
from __future__ import annotations

import os
import random
from array import array

import numpy as np
import pytest

from kvdirect.errors import ConfigError
from kvdirect.index import PrefixIndex

UNKNOWN, IN_POOL, WRITING = 0, 1, 2
CI = bool(os.environ.get("CI"))
SEEDED_OPS = int(os.environ.get("KVD_INDEX_MODEL_OPS", 12000 if CI else 3000))


# ---------------------------------------------------------------------------
# reference model
# ---------------------------------------------------------------------------
class Page:
    __slots__ = ("key", "parent", "children", "slots", "state", "digest", "lock", "own_locks",
                 "ts", "depth", "alive")

    def __init__(self, key, parent, depth):
        self.key = key
        self.parent = parent
        self.children = {}
        self.slots = None
        self.state = UNKNOWN
        self.digest = None
        self.lock = 0
        self.own_locks = 0
        self.ts = 0
        self.depth = depth
        self.alive = True


class RefIndex:
    def __init__(self, page_size: int, max_pool_only_pages: int):
        self.P = page_size
        self.max_pool = max_pool_only_pages
        self.roots = {}
        self.clock = 0

    # -- helpers
    def _root(self, ns, create):
        ns = ns or None
        r = self.roots.get(ns)
        if r is None and create:
            r = self.roots[ns] = Page(None, None, 0)
        return r

    def _pages(self, tokens):
        P = self.P
        return [tuple(tokens[i * P:(i + 1) * P]) for i in range(len(tokens) // P)]

    def pages(self):
        stack = list(self.roots.values())
        while stack:
            p = stack.pop()
            stack.extend(p.children.values())
            if p.parent is not None:
                yield p

    def _path_to(self, page):
        path = []
        while page is not None and page.parent is not None:
            path.append(page)
            page = page.parent
        return path[::-1]

    def _touch(self, path):
        if path:
            self.clock += 1
            for p in path:
                p.ts = self.clock

    def _remove(self, page):
        del page.parent.children[page.key]
        stack = [page]
        while stack:
            p = stack.pop()
            p.alive = False
            stack.extend(p.children.values())

    def _pinned(self, page):  # a WRITING page at or below
        stack = [page]
        while stack:
            p = stack.pop()
            if p.state == WRITING:
                return True
            stack.extend(p.children.values())
        return False

    def _settle(self):
        for p in list(self.pages()):
            if p.alive and p.slots is None and p.state != IN_POOL and p.lock == 0:
                self._remove(p)
        while self.pool_only_pages > self.max_pool:
            cands = [p for p in self.pages() if p.slots is None and not p.children and p.lock == 0]
            if not cands:
                break
            self._remove(min(cands, key=lambda p: (p.ts, -p.depth)))

    # -- sizes
    @property
    def total_size(self):
        return self.P * sum(1 for p in self.pages() if p.slots is not None)

    @property
    def protected_size(self):
        return self.P * sum(1 for p in self.pages()
                            if p.slots is not None and (p.lock > 0 or self._pinned(p)))

    @property
    def pool_only_pages(self):
        return sum(1 for p in self.pages() if p.slots is None)

    def __len__(self):
        return sum(1 for _ in self.pages())

    # -- API
    def match(self, tokens, ns=None):
        root = self._root(ns, False)
        path, dev, pool = [], 0, 0
        if root is not None:
            node = root
            for key in self._pages(tokens):
                c = node.children.get(key)
                if c is None:
                    break
                if c.slots is not None:
                    assert pool == 0, "model: device page after a pool page"
                    dev += 1
                elif c.state == IN_POOL:
                    pool += 1
                else:
                    break
                path.append(c)
                node = c
        self._touch(path)
        slots = [s for p in path if p.slots is not None for s in p.slots]
        end = path[-1] if path else None
        return dev * self.P, slots, pool * self.P, end, (end.digest if end else None)

    def insert(self, tokens, slots, ns=None, digests=None):
        pages = self._pages(tokens)
        if not pages:
            return 0
        node = self._root(ns, True)
        cached, contiguous, path = 0, True, []
        for i, key in enumerate(pages):
            c = node.children.get(key)
            if c is None:
                c = node.children[key] = Page(key, node, node.depth + 1)
            if c.slots is not None:
                if contiguous:
                    cached += 1
            else:
                contiguous = False
                c.slots = tuple(slots[i * self.P:(i + 1) * self.P])
            path.append(c)
            node = c
        for i in range(min(len(digests or ()), len(path))):
            path[i].digest = digests[i]
        self._touch(path)
        self._settle()
        return cached * self.P

    def insert_pool_only(self, tokens, ns=None, digests=None):
        pages = self._pages(tokens)
        if not pages:
            return 0
        node = self._root(ns, True)
        changed, path = 0, []
        for key in pages:
            c = node.children.get(key)
            if c is None:
                c = node.children[key] = Page(key, node, node.depth + 1)
                c.state = IN_POOL
                changed += 1
            elif c.state == UNKNOWN:
                c.state = IN_POOL
                changed += 1
            path.append(c)
            node = c
        for i in range(min(len(digests or ()), len(path))):
            path[i].digest = digests[i]
        self._touch(path)
        self._settle()
        return changed

    def lock(self, page):
        page.own_locks += 1
        for p in self._path_to(page):
            p.lock += 1

    def unlock(self, page):
        if page is None:
            return
        if page.own_locks == 0:
            raise ConfigError("not locked")
        page.own_locks -= 1
        for p in self._path_to(page):
            p.lock -= 1
        self._settle()

    def mark(self, op, tokens, first, n, ns=None):
        pages = self._pages(tokens)
        if first < 0 or n < 0 or first + n > len(pages):
            raise ConfigError("range")
        root = self._root(ns, False)
        changed = 0
        if root is not None and n > 0:
            node = root
            for i, key in enumerate(pages[:first + n]):
                c = node.children.get(key)
                if c is None:
                    break
                if i >= first:
                    s = c.state
                    if op == "writing" and c.slots is not None and s == UNKNOWN:
                        c.state = WRITING
                    elif op == "in_pool" and s != IN_POOL:
                        c.state = IN_POOL
                    elif op == "write_failed" and s == WRITING:
                        c.state = UNKNOWN
                    elif op == "not_in_pool" and s == IN_POOL:
                        c.state = UNKNOWN
                    changed += c.state != s
                node = c
        self._settle()
        return changed

    def evict(self, num_tokens):
        need = -(-num_tokens // self.P)
        freed = []
        while need > 0:
            cands = [p for p in self.pages()
                     if p.slots is not None and p.lock == 0 and not self._pinned(p)
                     and not any(c.slots is not None for c in p.children.values())]
            if not cands:
                break
            p = min(cands, key=lambda p: (p.ts, -p.depth))
            freed.extend(p.slots)
            p.slots = None
            need -= 1
            if p.state != IN_POOL:
                self._remove(p)
        self._settle()
        return freed

    def path_digests(self, page):
        return [p.digest for p in self._path_to(page)]

    def set_path_digests(self, page, digests, first):
        path = self._path_to(page)
        if first + len(digests) > len(path):
            raise ConfigError("rows")
        for i, d in enumerate(digests):
            path[first + i].digest = d

    def path_states(self, page):
        path = self._path_to(page)
        return [p.state for p in path], sum(1 for p in path if p.slots is not None)

    def reset(self):
        for p in list(self.pages()):
            p.alive = False
        self.roots.clear()


# ---------------------------------------------------------------------------
# driver: applies one operation to both and compares
# ---------------------------------------------------------------------------
KINDS = ["np64", "np32", "list", "array_q", "array_i", "tuple"]


def as_kind(tokens, kind):
    big = any(t > 2**31 - 1 or t < -2**31 for t in tokens)
    if big and kind in ("np32", "array_i"):
        kind = "np64"
    if kind == "np64":
        return np.asarray(tokens, dtype=np.int64)
    if kind == "np32":
        return np.asarray(tokens, dtype=np.int32)
    if kind == "array_q":
        return array("q", tokens)
    if kind == "array_i":
        return array("i", tokens)
    if kind == "tuple":
        return tuple(tokens)
    return list(tokens)


def digest_of(tokens_prefix_len, salt):
    return bytes([(tokens_prefix_len * 7 + salt + i) % 256 for i in range(32)])


class Driver:
    def __init__(self, page_size, max_pool):
        self.P = page_size
        self.idx = PrefixIndex(page_size, max_pool_only_pages=max_pool)
        self.ref = RefIndex(page_size, max_pool)
        self.handles = []  # (cpp id, model page)
        self.ids = {}  # id(model page) -> (model page, cpp id)
        self.next_slot = 0
        self.ops = 0

    def _record(self, cpp_node, page):
        if page is None:
            assert cpp_node == 0
            return
        assert cpp_node != 0
        prev = self.ids.get(id(page))
        if prev is not None and prev[0] is page and page.alive:
            assert prev[1] == cpp_node, "the same path end must keep its handle"
        self.ids[id(page)] = (page, cpp_node)
        self.handles.append((cpp_node, page))
        if len(self.handles) > 64:
            self.handles = self.handles[-64:]

    def _slots(self, n_tokens, runs, extra, rng):
        pages = n_tokens // self.P
        base = self.next_slot
        self.next_slot += (pages + 1) * self.P + extra
        slots = list(range(base, base + pages * self.P + extra))
        if not runs:
            rng.shuffle(slots)
        return slots

    def check(self):
        idx, ref = self.idx, self.ref
        assert idx.total_size == ref.total_size
        assert idx.protected_size == ref.protected_size
        assert idx.evictable_size == ref.total_size - ref.protected_size
        assert idx.pool_only_pages == ref.pool_only_pages
        assert len(idx) == len(ref)
        assert idx.pool_only_pages <= idx.max_pool_only_pages or any(
            p.lock > 0 or p.children for p in ref.pages() if p.slots is None)
        err = idx._check()
        assert err == "", err

    # -- operations
    def insert(self, tokens, ns, kind, runs, extra, with_digest, rng):
        slots = self._slots(len(tokens), runs, extra, rng)
        pages = len(tokens) // self.P
        dg = [digest_of(i, 1) for i in range(pages)] if with_digest and pages else None
        arg = np.frombuffer(b"".join(dg), np.uint8).reshape(-1, 32) if dg else None
        if rng.random() < 0.5:
            got = self.idx.insert(as_kind(tokens, kind), np.asarray(slots, np.int64), ns, arg)
            want = self.ref.insert(tokens, slots, ns, dg)
            assert got == want
            return
        # insert_path: the insert, and the path as a match right after it sees it (that
        # match only re-stamps the newest path: recency order is the same either way)
        got, r = self.idx.insert_path(as_kind(tokens, kind), np.asarray(slots, np.int64), ns, arg)
        want = self.ref.insert(tokens, slots, ns, dg)
        assert got == want
        dev, path_slots, pool, end, digest = self.ref.match(tokens, ns)
        assert (r.device_len, r.pool_len) == (dev, 0) and dev == pages * self.P
        assert r.device_slots.tolist() == path_slots and r.last_digest == digest
        self._record(r.node, end)

    def insert_pool_only(self, tokens, ns, kind, with_digest):
        pages = len(tokens) // self.P
        dg = [digest_of(i, 2) for i in range(pages)] if with_digest and pages else None
        got = self.idx.insert_pool_only(as_kind(tokens, kind), namespace=ns,
                                        digests=b"".join(dg) if dg else None)
        want = self.ref.insert_pool_only(tokens, ns, dg)
        assert got == want

    def match(self, tokens, ns, kind):
        r = self.idx.match(as_kind(tokens, kind), ns)
        dev, slots, pool, end, digest = self.ref.match(tokens, ns)
        assert (r.device_len, r.pool_len) == (dev, pool)
        assert r.device_slots.dtype == np.int64 and r.device_slots.tolist() == slots
        assert r.last_digest == digest
        self._record(r.node, end)

    def _pick(self, i):
        if not self.handles:
            return 0, None
        return self.handles[i % len(self.handles)]

    def lock(self, i):
        node, page = self._pick(i)
        if page is not None and not page.alive:
            with pytest.raises(ConfigError):
                self.idx.lock(node)
            return
        self.idx.lock(node)
        if page is not None:
            self.ref.lock(page)

    def unlock(self, i):
        node, page = self._pick(i)
        if page is not None and (not page.alive or page.own_locks == 0):
            with pytest.raises(ConfigError):
                self.idx.unlock(node)
            return
        self.idx.unlock(node)
        self.ref.unlock(page)

    def evict(self, n):
        got = self.idx.evict(n)
        want = self.ref.evict(n)
        assert got.dtype == np.int64 and got.tolist() == want

    def mark(self, op, tokens, first, n, ns, kind):
        fn = getattr(self.idx, "mark_" + op)
        pages = len(tokens) // self.P
        if first < 0 or n < 0 or first + n > pages:
            with pytest.raises(ConfigError):
                fn(as_kind(tokens, kind), first, n, ns)
            with pytest.raises(ConfigError):
                self.ref.mark(op, tokens, first, n, ns)
            return
        got = fn(as_kind(tokens, kind), first, n, namespace=ns)
        want = self.ref.mark(op, tokens, first, n, ns)
        assert got == want

    def digests(self, i, first, salt):
        node, page = self._pick(i)
        if page is not None and not page.alive:
            with pytest.raises(ConfigError):
                self.idx.path_digests(node)
            return
        d, mask = self.idx.path_digests(node)
        want = self.ref.path_digests(page) if page is not None else []
        assert d.shape == (len(want), 32) and mask.shape == (len(want),)
        for row, m, w in zip(d, mask, want):
            assert bool(m) == (w is not None)
            if w is not None:
                assert row.tobytes() == w
        states, devp = self.idx.path_states(node)
        wstates, wdev = self.ref.path_states(page) if page is not None else ([], 0)
        assert states.tolist() == wstates and devp == wdev
        if page is None:
            return
        n = max(0, len(want) - first)
        rows = [digest_of(first + k, salt) for k in range(n)]
        if rows:
            self.idx.set_path_digests(node, np.frombuffer(b"".join(rows), np.uint8)
                                      .reshape(-1, 32), first_page=first)
            self.ref.set_path_digests(page, rows, first)

    def reset(self):
        self.idx.reset()
        self.ref.reset()


# ---------------------------------------------------------------------------
# seeded loop: a fixed number of operations, whatever hypothesis does
# ---------------------------------------------------------------------------
def random_tokens(rng, P):
    n = rng.randint(0, 5 * P + P - 1)
    alphabet = [0, 1] if rng.random() < 0.8 else [0, 1, 2, -3, 2**33]
    return [rng.choice(alphabet) for _ in range(n)]


def run_random(seed, n_ops, P, max_pool):
    rng = random.Random(seed)
    d = Driver(P, max_pool)
    nss = [None, "", "tenant-a", "b"]
    for _ in range(n_ops):
        r = rng.random()
        toks = random_tokens(rng, P)
        ns = rng.choice(nss)
        kind = rng.choice(KINDS)
        if r < 0.22:
            d.insert(toks, ns, kind, rng.random() < 0.6, rng.randint(0, 2), rng.random() < 0.3, rng)
        elif r < 0.30:
            d.insert_pool_only(toks, ns, kind, rng.random() < 0.5)
        elif r < 0.52:
            d.match(toks, ns, kind)
        elif r < 0.60:
            d.lock(rng.randrange(1000))
        elif r < 0.68:
            d.unlock(rng.randrange(1000))
        elif r < 0.76:
            d.evict(rng.randint(0, 4 * P))
        elif r < 0.95:
            pages = len(toks) // P
            first = rng.randint(0, pages)
            n = rng.randint(0, pages - first)
            if rng.random() < 0.03:
                n += 1  # out of range: both must refuse
            op = rng.choice(["writing", "writing", "in_pool", "write_failed", "not_in_pool"])
            d.mark(op, toks, first, n, ns, kind)
        elif r < 0.999:
            d.digests(rng.randrange(1000), rng.randint(0, 3), rng.randint(0, 9))
        else:
            d.reset()
        d.check()
        d.ops += 1
    return d.ops


@pytest.mark.parametrize("P,max_pool", [(1, 3), (2, 0), (2, 1000), (3, 2), (4, 5)])
def test_differential_seeded(P, max_pool):
    n = SEEDED_OPS // 5 + 1
    assert run_random(1000 * P + max_pool, n, P, max_pool) == n


# ---------------------------------------------------------------------------
# hypothesis state machine (explores and shrinks)
# ---------------------------------------------------------------------------
hyp = pytest.importorskip("hypothesis", reason="hypothesis is in the [test] extra")
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

token = st.one_of(st.integers(0, 1), st.integers(0, 1), st.sampled_from([2, -3, 2**33]))
keys = st.lists(token, max_size=13)
nss = st.sampled_from([None, "", "a"])
kinds = st.sampled_from(KINDS)


class IndexMachine(RuleBasedStateMachine):
    @initialize(P=st.sampled_from([1, 2, 3]), max_pool=st.sampled_from([0, 1, 3, 1000]))
    def init(self, P, max_pool):
        self.d = Driver(P, max_pool)
        self.rng = random.Random(P * 31 + max_pool)

    @rule(tokens=keys, ns=nss, kind=kinds, runs=st.booleans(), extra=st.integers(0, 2),
          with_digest=st.booleans())
    def insert(self, tokens, ns, kind, runs, extra, with_digest):
        self.d.insert(tokens, ns, kind, runs, extra, with_digest, self.rng)

    @rule(tokens=keys, ns=nss, kind=kinds, with_digest=st.booleans())
    def insert_pool_only(self, tokens, ns, kind, with_digest):
        self.d.insert_pool_only(tokens, ns, kind, with_digest)

    @rule(tokens=keys, ns=nss, kind=kinds)
    def match(self, tokens, ns, kind):
        self.d.match(tokens, ns, kind)

    @rule(i=st.integers(0, 63))
    def lock(self, i):
        self.d.lock(i)

    @rule(i=st.integers(0, 63))
    def unlock(self, i):
        self.d.unlock(i)

    @rule(n=st.integers(0, 12))
    def evict(self, n):
        self.d.evict(n)

    @rule(op=st.sampled_from(["writing", "in_pool", "write_failed", "not_in_pool"]), tokens=keys,
          first=st.integers(0, 5), n=st.integers(0, 5), ns=nss, kind=kinds)
    def mark(self, op, tokens, first, n, ns, kind):
        pages = len(tokens) // self.d.P
        first = min(first, pages)
        n = min(n, pages - first + (1 if n == 5 else 0))
        self.d.mark(op, tokens, first, n, ns, kind)

    @rule(i=st.integers(0, 63), first=st.integers(0, 3), salt=st.integers(0, 9))
    def digests(self, i, first, salt):
        self.d.digests(i, first, salt)

    @invariant()
    def consistent(self):
        if hasattr(self, "d"):
            self.d.check()


IndexMachine.TestCase.settings = settings(
    max_examples=300 if CI else 40, stateful_step_count=50, deadline=None)
test_index_state_machine = IndexMachine.TestCase
