"""``KVDirectRadixCache``: SGLang 0.5.23's ``BasePrefixCache`` backed by kvdirect.

How SGLang's scheduler drives a prefix cache, and what this class does:

``match_prefix`` (per waiting request)
    one :meth:`KVDirectCache.match` (C++ index match + at most one batched
    existence query for the pages the index does not know). Device-resident
    pages come back as ``device_prefix_len`` / ``last_device_node``; pool
    pages as ``host_hit_length``, which makes the scheduler call
    ``init_load_back`` when it admits the request.
``init_load_back`` (admission; never on a PD decode node, see ``offload_only``)
    allocates device slots from SGLang's allocator (evicting if needed) and
    reads the pool pages straight into them (:meth:`KVDirectCache.load`). The
    scheduler requires all promised tokens or none: a partial load reports 0
    (the pages that did load stay cached on device; the request recomputes).
``lock`` / ``unlock`` (``inc_lock_ref`` / ``dec_lock_ref``)
    reference counts along the index path.
``checkpoint`` (chunk done, request finished)
    :meth:`KVDirectCache.write_back`: inserts the request's full pages, frees
    its duplicate slots, and puts new pages to the pool asynchronously (pinned
    until written). The row is repointed onto the cached slots, as SGLang's
    ``RadixCache`` does.
``evict``
    LRU eviction in the index; freed slots go back to SGLang's allocator.

Node handles are :class:`Node` objects: the matched device prefix (token ids,
namespace), the index's node and the prefix's device slots. Slots of an
unlocked node go stale once anything is evicted; every use re-validates such
a node against the index (one match) and refuses a prefix that is no longer
resident, so stale slots are never handed to the model.

Completions of asynchronous puts are applied on the scheduler thread at the
start of ``match_prefix``, ``evict`` and ``checkpoint`` (and in
``check_hicache_events``, which SGLang calls only for HiCache-like modes).
"""
from __future__ import annotations

import json
import logging
import weakref
from array import array
from typing import Any, Optional, Sequence

import numpy as np
import torch

from sglang.srt.mem_cache.base_prefix_cache import (
    BasePrefixCache,
    CacheRequestHandle,
    DecLockRefParams,
    DecLockRefResult,
    EvictParams,
    EvictResult,
    IncLockRefResult,
    InitLoadBackParams,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
)

from kvdirect.cache import CacheMatch, KVDirectCache
from kvdirect.config import CacheConfig
from kvdirect.errors import ConfigError, KVDirectError

log = logging.getLogger("kvdirect.sglang")


def namespace_of(extra_key: Optional[str], cache_salt: Optional[str]) -> Optional[str]:
    """One kvdirect namespace for SGLang's two (``extra_key``: LoRA etc., ``cache_salt``:
    tenant). Unambiguous: different pairs never give the same string."""
    if extra_key is None and not cache_salt:
        return None
    return json.dumps([extra_key, cache_salt or None], separators=(",", ":"))


def _tokens(token_ids) -> np.ndarray:
    """Token ids as int64 numpy, zero-copy for SGLang's ``array('q')``."""
    if isinstance(token_ids, array) and token_ids.typecode == "q":
        return np.frombuffer(token_ids, dtype=np.int64) if len(token_ids) else np.empty(0, np.int64)
    if isinstance(token_ids, torch.Tensor):
        return token_ids.detach().to("cpu", torch.int64).numpy()
    return np.asarray(token_ids, dtype=np.int64)


class Node:
    """A cache node handle as SGLang stores it (``req.last_node``)."""

    __slots__ = ("tokens", "namespace", "inode", "slots", "epoch", "locks", "pending", "__weakref__")

    def __init__(self, tokens: np.ndarray, namespace, inode, slots: torch.Tensor, epoch: int):
        self.tokens = tokens          # the device prefix, page aligned (owned copy)
        self.namespace = namespace
        self.inode = inode            # kvdirect index node (None: root)
        self.slots = slots            # int64 device slots of the prefix
        self.epoch = epoch            # eviction epoch at which ``slots`` were read
        self.locks = 0
        # a layer-wise load in flight (layerwise.PendingLoad): ``tokens``/``slots`` include
        # the pages being loaded, ``inode`` is the device prefix they extend (None: none)
        self.pending = None

    @property
    def is_root(self) -> bool:
        return self.inode is None and self.pending is None

    @property
    def length(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"kvdirect.Node(len={len(self.tokens)}, ns={self.namespace!r}, locks={self.locks})"


class KVDirectRadixCache(BasePrefixCache):
    """SGLang prefix cache whose index, pool loads and write-backs are kvdirect's."""

    def __init__(self, params, layout, *, config: CacheConfig | None = None, store=None,
                 tp_rank: int = 0, tp_size: int = 1, tp_reduce_min=None, forward_stream=None,
                 offload_only: bool = False):
        self.disable = params.disable
        self.req_to_token_pool = params.req_to_token_pool
        self.token_to_kv_pool_allocator = params.token_to_kv_pool_allocator
        self.page_size = int(params.page_size)
        self.is_eagle = params.is_eagle
        if self.is_eagle:
            raise ConfigError("kvdirect does not support EAGLE speculative decoding (bigram keys); "
                              "run without --radix-cache-backend kvdirect")
        dev = getattr(self.token_to_kv_pool_allocator, "device", "cpu")
        self.device = torch.device(dev) if isinstance(dev, (str, torch.device)) else torch.device("cpu")
        self.config = config or CacheConfig.from_env()
        # a PD decode node: pool hits are never reported (SGLang would promise them to the
        # prefill node and only HiCache fills them), pages are still written back
        self.offload_only = bool(offload_only)
        self.kv = KVDirectCache(layout, store, page_size=self.page_size, free_slots=self._free_slots,
                                config=self.config, tp_rank=tp_rank, tp_size=tp_size,
                                tp_reduce_min=tp_reduce_min, forward_stream=forward_stream)
        self._epoch = 0
        self._markers: dict[Any, tuple[CacheMatch, int]] = {}
        # matches holding their pool pages (read sessions opened by the match, see match_prefix)
        self._holding: list[CacheMatch] = []
        self._empty = torch.empty((0,), dtype=torch.int64, device=self.device)
        # unlocked nodes handed to the scheduler; protected while init_load_back evicts
        self._handed: weakref.WeakSet = weakref.WeakSet()
        self._version = 0            # bumped whenever pages enter the index (load, write-back)
        self.layer_loads = None      # layerwise.LayerLoads when "layerwise" is on
        self.layerwise_aborts = 0
        self.reset_root()

    def enable_layerwise(self, kvcache) -> None:
        """Register kvdirect's per-layer counter with SGLang's KV pool (see layerwise.py)."""
        from kvdirect.sglang.layerwise import LayerLoads

        self.layer_loads = LayerLoads(self.kv.layout.num_layers, self._finish_pending)
        kvcache.register_layer_transfer_counter(self.layer_loads)

    def _settle(self) -> None:
        """Finish layer-wise loads still in flight before the index is changed."""
        if self.layer_loads is not None and self.layer_loads.pending:
            self.layer_loads.settle()

    def _release_held(self) -> None:
        """End the read sessions of matches no load took (requests matched, not admitted)."""
        while self._holding:
            self.kv.release(self._holding.pop())

    def _settle_sharing(self, tokens: np.ndarray, namespace) -> None:
        """Finish the layer-wise loads in flight that bring a page of ``tokens`` (so a match
        finds those pages on device instead of loading them twice); loads of other pages
        stay in flight, so requests admitted in one round load side by side. Page ``i`` is
        the same page in two sequences iff they agree on its tokens and all before it."""
        if self.layer_loads is None or not self.layer_loads.pending:
            return

        def shares(p) -> bool:
            first = p.load.m.device_len + self.page_size  # end of the first page the load brings
            have = p.node.tokens
            return (p.node.namespace == namespace and len(tokens) >= first and len(have) >= first
                    and np.array_equal(tokens[:first], have[:first]))

        self.layer_loads.settle(shares)

    # ---- plumbing ------------------------------------------------------------
    def reset_root(self) -> None:
        self.root_node = Node(np.empty(0, np.int64), None, None, self._empty, self._epoch)

    def _free_slots(self, slots) -> None:
        if len(slots):
            t = torch.as_tensor(np.ascontiguousarray(slots, dtype=np.int64)).to(self.device)
            self.token_to_kv_pool_allocator.free(t)

    def _slots_tensor(self, slots: np.ndarray) -> torch.Tensor:
        # own the memory: the index's slot view may change on the next call
        return torch.from_numpy(np.array(slots, dtype=np.int64, copy=True)).to(self.device)

    def _node(self, tokens: np.ndarray, namespace, inode, slots: np.ndarray) -> Node:
        if len(tokens) == 0:
            return self.root_node
        return Node(np.array(tokens, dtype=np.int64, copy=True), namespace, inode,
                    self._slots_tensor(slots), self._epoch)

    def _valid(self, node: Node) -> Node:
        """Make sure ``node``'s slots are current (see module docstring)."""
        if node.is_root or node.pending is not None or node.locks > 0 or node.epoch == self._epoch:
            return node
        r = self.kv.index.match(node.tokens, node.namespace)
        if r.device_len < len(node.tokens):
            raise KVDirectError(f"kvdirect: a matched prefix ({len(node.tokens)} tokens) was evicted "
                                f"before it was locked; only {r.device_len} tokens remain on device")
        node.inode, node.slots, node.epoch = r.node, self._slots_tensor(r.device_slots), self._epoch
        return node

    @staticmethod
    def _handle(req) -> Any:
        h = getattr(req, "cache_request_handle", None)
        return h if h is not None else id(req)

    # ---- match / load --------------------------------------------------------
    def reset(self):
        self._release_held()
        self._settle()
        self.kv.reset()
        self._markers.clear()
        self._epoch += 1
        self.reset_root()

    def _key_tokens(self, key):
        if getattr(key, "is_bigram", False):
            raise ConfigError("kvdirect does not support bigram (EAGLE) keys")
        t = _tokens(key.raw_token_ids())
        return t[: len(t) // self.page_size * self.page_size], namespace_of(key.extra_key, key.cache_salt)

    def _result(self, node: Node, host_hit: int = 0) -> MatchResult:
        return MatchResult(device_prefix_len=node.length, last_device_node=node, last_host_node=node,
                           best_match_node=node, host_hit_length=host_hit,
                           full_kv_hit_length=node.length + host_hit)

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        if self.disable or len(params.key) == 0:
            return self._result(self.root_node)
        # SGLang matches a request and, if it admits it, loads it at once (init_load_back):
        # pages a previous match held were not taken by then; unpin them
        self._release_held()
        self.kv.poll()
        tokens, ns = self._key_tokens(params.key)
        if len(tokens) == 0:
            return self._result(self.root_node)
        self._settle_sharing(tokens, ns)
        req = params.req
        # layer-wise, a match for a request holds the pages it finds (stores where that costs
        # the one round trip an existence query costs): init_load_back then needs no second one
        hold = self.layer_loads is not None and req is not None and not self.offload_only
        m = self.kv.match(tokens, ns, pool=not self.offload_only, hold=hold)
        node = self._node(tokens[: m.device_len], ns, m.node, m.device_slots)
        if not node.is_root:
            self._handed.add(node)
        if m.pool_len <= 0 or req is None:
            # a probe match (no request) never promises a load it cannot hand over
            self.kv.release(m)
            return self._result(node)
        if m._held is not None:
            self._holding.append(m)
        m.tokens = m.tokens.copy()  # the request's fill ids keep growing under the view
        self._markers[self._handle(req)] = (m, self._epoch, self._version)
        return self._result(node, host_hit=m.pool_len)

    def touch_prefix(self, key) -> None:
        if self.disable or len(key) == 0:
            return
        tokens, ns = self._key_tokens(key)
        if len(tokens):
            self.kv.index.match(tokens, ns)

    def init_load_back(self, params: InitLoadBackParams):
        """Allocate device slots and read the pool pages into them; all or nothing."""
        node = params.best_match_node
        marker = self._markers.pop(self._handle(params.req), None) if params.req is not None else None
        want = int(params.host_hit_length)
        if marker is None:
            return 0, node
        m, epoch, version = marker
        self._holding = [h for h in self._holding if h is not m]  # this call loads it or gives it up
        if want <= 0:
            self.kv.release(m)
            return 0, node
        layerwise = self.layer_loads is not None
        if layerwise:
            # a load in flight of pages this match shares: finish it, then they are on device
            self._settle_sharing(m.tokens, m.namespace)
        if epoch != self._epoch or (layerwise and version != self._version):
            # evicted (or, layer-wise, inserted) since the match: match again
            self.kv.release(m)
            m = self.kv.match(m.tokens, m.namespace)
            if m.device_len != node.length or m.pool_len < want:
                return 0, node
        want = min(want, m.pool_len)
        allocator = self.token_to_kv_pool_allocator
        if allocator.available_size() < want:
            self._evict_protecting_matches(want - allocator.available_size())
        slots = allocator.alloc(want)
        if slots is None:
            self.kv.release(m)
            return 0, node
        m.pool_len = want
        slots_np = slots.to("cpu", torch.int64).numpy()
        if layerwise:
            return self._start_layerwise(params.req, m, slots_np, want, node)
        loaded = self.kv.load(m, slots_np)  # frees unused slots
        self._version += 1
        if loaded < want:
            # SGLang needs every promised token or none; loaded pages stay cached on device
            return 0, node
        return loaded, self._node(m.tokens[: m.device_len], m.namespace, m.node, m.device_slots)

    def _start_layerwise(self, req, m: CacheMatch, slots: np.ndarray, want: int, node: Node):
        """Start a layer-wise load; promise its tokens once the store holds every page (a read
        session opened; a store without ranged reads: the pages read whole). The scheduler
        does not wait for any layer's bytes: the forward pass does, layer by layer."""
        from kvdirect.sglang.layerwise import PendingLoad

        lw = self.kv.load_layerwise(m, slots)
        if lw.wait_pinned() < want:
            lw.finish()  # applies what arrived whole, frees the rest
            self._version += 1
            return 0, node
        dev = m.device_len
        pnode = Node(np.array(m.tokens[: dev + want], dtype=np.int64, copy=True), m.namespace,
                     m.node if dev else None,
                     self._slots_tensor(np.concatenate([m.device_slots[:dev], slots[:want]])), self._epoch)
        pnode.pending = PendingLoad(lw, want, req, pnode)
        self.layer_loads.add(pnode.pending)
        if not self.layer_loads.started:
            log.info("kvdirect: first layer-wise load: %d tokens pinned in the store; the forward pass waits for "
                     "each of its %d layers",
                     want, self.layer_loads.num_layers)
        self.layer_loads.started += 1
        return want, pnode

    def _finish_pending(self, p) -> None:
        """A layer-wise load is complete: its pages join the index and the node's locks move
        onto them; a shortfall aborts the request that was promised the pages."""
        node = p.node
        m = p.load.m
        base = m.node if m.device_len else None
        p.loaded = p.load.finish()
        self._version += 1
        valid = len(node.tokens) - p.promised + p.loaded
        r = self.kv.index.match(node.tokens[:valid], node.namespace)
        same = np.array_equal(np.asarray(r.device_slots[:valid]), node.slots[:valid].cpu().numpy())
        if p.loaded < p.promised or r.device_len < valid or not same:
            self.layerwise_aborts += 1
            log.warning("kvdirect: layer-wise load delivered %d of %d promised tokens; aborting the "
                        "request that read them", p.loaded, p.promised)
            self._abort(p.req)
        new = r.node if r.device_len else None
        for _ in range(node.locks):
            if new is not None:
                self.kv.index.lock(new)
            if base is not None:
                self.kv.index.unlock(base)
        node.inode, node.pending, node.epoch = new, None, self._epoch
        node.tokens = node.tokens[: r.device_len]
        node.slots = self._slots_tensor(r.device_slots[: r.device_len])

    @staticmethod
    def _abort(req) -> None:
        from http import HTTPStatus

        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        from kvdirect.sglang.layerwise import ABORT_MESSAGE

        if req is None:
            return
        req.to_finish = FINISH_ABORT(ABORT_MESSAGE, HTTPStatus.SERVICE_UNAVAILABLE, "KVLoadFailed")
        req.skip_radix_cache_insert = True  # its KV was computed from the bad page

    def _evict_protecting_matches(self, num_tokens: int) -> None:
        """Evict for a load while other requests of this scheduling round hold matches
        they have not locked yet: pin those prefixes meanwhile, so their slots stay valid."""
        guard = [n for n in list(self._handed)
                 if n.locks == 0 and n.epoch == self._epoch and n.inode is not None]
        for n in guard:
            self.kv.index.lock(n.inode)
        try:
            self.evict(EvictParams(num_tokens=num_tokens))
        finally:
            for n in guard:
                self.kv.index.unlock(n.inode)
                n.epoch = self._epoch

    def load_back_is_cache_owned(self) -> bool:
        return True

    # ---- locks ---------------------------------------------------------------
    def inc_lock_ref(self, node: Node) -> IncLockRefResult:
        if self.disable or node is None or node.is_root:
            return IncLockRefResult(delta=0)
        self._valid(node)
        before = self.kv.evictable_size
        if node.inode is not None:
            self.kv.index.lock(node.inode)
        node.locks += 1
        return IncLockRefResult(delta=self.kv.evictable_size - before)

    def dec_lock_ref(self, node: Node, params: Optional[DecLockRefParams] = None) -> DecLockRefResult:
        if self.disable or node is None or node.is_root:
            return DecLockRefResult(delta=0)
        if node.locks <= 0:
            raise KVDirectError(f"kvdirect: unlock of {node!r} that is not locked")
        before = self.kv.evictable_size
        if node.inode is not None:
            self.kv.index.unlock(node.inode)
        node.locks -= 1
        if node.locks == 0:
            node.epoch = self._epoch  # its slots were pinned until now
        return DecLockRefResult(delta=self.kv.evictable_size - before)

    def inc_host_lock_ref(self, node) -> IncLockRefResult:  # no host tier
        return IncLockRefResult(delta=0)

    def dec_host_lock_ref(self, node, params=None) -> DecLockRefResult:
        return DecLockRefResult(delta=0)

    # ---- device indices -------------------------------------------------------
    def path_device_indices(self, node: Node) -> torch.Tensor:
        return self._valid(node).slots

    def is_root(self, node) -> bool:
        return node is None or node.is_root

    def root_node_handle(self, extra_key: Optional[str] = None):
        return self.root_node

    def dfs_weight_order(self, node_handles: Sequence[Any]) -> list[int]:
        """Requests sharing a longer prefix first, grouped by prefix (no tree walk needed)."""
        return sorted(range(len(node_handles)), key=lambda i: (-node_handles[i].length,
                      node_handles[i].tokens[:1].tobytes()))

    # ---- insert / checkpoint --------------------------------------------------
    def insert(self, params: InsertParams) -> InsertResult:
        """Insert ``key`` -> ``value`` (device slots); returns the already-cached prefix
        length (the caller frees its duplicate slots in that range)."""
        if self.disable:
            return InsertResult(prefix_len=0)
        self._settle()
        self.kv.poll()
        tokens, ns = self._key_tokens(params.key)
        if params.value is None:
            raise ConfigError("kvdirect insert needs device slots (InsertParams.value)")
        slots = _tokens(params.value)[: len(tokens)]
        already = self.kv.write_back(tokens, slots, ns)
        self._version += 1
        r = self.kv.index.match(tokens, ns)
        return InsertResult(prefix_len=already, total_len=len(tokens),
                            last_device_node=self._node(tokens[: r.device_len], ns, r.node, r.device_slots))

    def checkpoint(self, req, *, up_to: int, **kwargs):
        """Insert the request's KV ``[0, up_to)`` (full pages), write new pages to the
        pool, repoint the request's row onto the cached slots and move its lock."""
        if self.disable:
            return
        self._settle()
        self.kv.poll()
        token_ids = req.full_untruncated_fill_ids[:up_to]
        tokens = _tokens(token_ids)
        key_len = len(tokens) // self.page_size * self.page_size
        ns = namespace_of(req.extra_key, req.cache_salt)
        row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
        kv_indices = row[:key_len].to("cpu", torch.int64)
        protected = req.kv.cache_protected_len
        already = self.kv.write_back(tokens[:key_len], kv_indices.numpy(), ns) if key_len else 0
        self._version += 1
        req.kv.cache_inserted_len = max(req.kv.cache_inserted_len, key_len)
        if already > protected:
            # the tree had these pages already (another request): free our duplicates
            self.token_to_kv_pool_allocator.free_segment(
                row[protected:already].to(torch.int64), start_pos=protected)
        if key_len:
            r = self.kv.index.match(tokens[:key_len], ns)
            if r.device_len != key_len:
                raise KVDirectError(f"kvdirect: inserted {key_len} tokens but {r.device_len} matched")
            new_node = self._node(tokens[:key_len], ns, r.node, r.device_slots)
        else:
            new_node = self.root_node
        self.req_to_token_pool.write((req.kv.req_pool_idx, slice(protected, key_len)),
                                     new_node.slots[protected:].to(row.dtype))
        req.kv.cache_protected_len = max(protected, key_len)
        self.unlock(req.lock)
        req.lock = self.lock(new_node)
        req.last_node = new_node

    # ---- eviction, events, sizes ----------------------------------------------
    def evict(self, params: EvictParams) -> EvictResult:
        if self.disable:
            return EvictResult()
        # loads in flight stay in flight: their pages join the index only when they finish,
        # so no eviction can take them, and waiting here (SGLang evicts while it builds the
        # batch once the device pool is full) would make every layer-wise load synchronous
        self.kv.poll()
        n = self.kv.evict(int(params.num_tokens)) if params.num_tokens > 0 else 0
        if n:
            self._epoch += 1
        return EvictResult(num_tokens_evicted=n)

    def check_hicache_events(self) -> None:
        self._settle()
        self.kv.poll()

    def ready_to_load_host_cache(self):
        return None  # loads are synchronous in init_load_back: nothing to start

    def flush_pending_backups(self) -> None:
        self._settle()
        self.kv.poll()

    def release_aborted_request(self, handle: CacheRequestHandle) -> None:
        self._markers.pop(handle, None)
        self._release_held()

    def on_release(self, req, *, checkpointed: bool) -> None:
        self._markers.pop(self._handle(req), None)

    def supports_prefix_sharing(self) -> bool:
        return not self.disable

    def evictable_size(self):
        return self.kv.evictable_size

    def protected_size(self):
        # locked pages and pages pinned by a write in flight: on device, not evictable
        return self.kv.total_size - self.kv.evictable_size

    full_evictable_size = evictable_size
    full_protected_size = protected_size

    def total_size(self):
        return self.kv.total_size

    def pretty_print(self):
        print(f"kvdirect cache: device tokens={self.kv.total_size} evictable={self.kv.evictable_size} "
              f"stats={self.kv.stats()}")

    def stats(self) -> dict:
        d = self.kv.stats()
        if self.layer_loads is not None:
            d["layerwise"] = {"layer_waits": self.layer_loads.waits, "aborted_requests": self.layerwise_aborts}
        return d

    def shutdown(self) -> None:
        self._release_held()
        self._settle()
        self.kv.close()

    release_host_resources = shutdown
