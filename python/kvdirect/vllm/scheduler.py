"""The connector's scheduler side: which prompt pages the pool has, what to load and save.

Runs in vLLM's scheduler (engine-core) process; no vLLM import (requests and
scheduler outputs are read by attribute), so it is unit-tested without vLLM.

* Match (``get_num_new_matched_tokens``): one ``PrefixIndex.match`` of the prompt
  (pages the index already knows are in the pool) plus at most one batched
  ``Store.exists`` for the pages after them, over every TP rank's keys at once.
  Every whole prompt page the pool holds is claimed, capped at the request's
  length - 1 tokens (vLLM must compute one): a prompt of whole pages whose pages
  are all in the pool loads every page, the last one's final token is then
  recomputed by the forward (``PageRun.recompute_tail``). Repeated calls for one
  request give the same answer and change no request state; what the pool
  confirmed is remembered in the index (a cache, not a claim).
* Loads: ``update_state_after_alloc`` turns the hit into (pages, blocks) for the
  worker; ``build_step`` hands them out once.
* Saves: every step, each scheduled request's pages that became fully computed
  and that the pool is not known to hold are planned for saving: prompt pages, and
  pages of generated tokens as decoding fills them (so the next turn of a
  conversation, on any instance, finds its previous answer in the pool), with
  the request's earlier blocks (``prior_blocks``) so that a worker can withhold
  pages computed on top of a block whose load failed. A request that had saves
  planned, or whose timed-out gets may still write its blocks, is held when it
  finishes (``request_finished`` -> True, announced to the workers in
  ``StepPlan.held``) until every worker reports it done (``finished_sending``).
* Worker reports: pages acknowledged by every TP rank that writes (a bit per rank)
  enter the index (MLA: pages are the same on every rank, keyed without the rank;
  rank 0 alone writes them, so its acknowledgement is the page's); a failed load
  makes those pages unknown again, and a failed load or a withheld save re-plans
  the pages' save once vLLM has recomputed them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from kvdirect import keys as _keys
from kvdirect.cache.health import StoreHealth
from kvdirect.cache.stats import CacheStats
from kvdirect.config import CacheConfig
from kvdirect.errors import ConfigError, KVDirectError
from kvdirect.index import PrefixIndex
from kvdirect.vllm.lora import adapter_identity
from kvdirect.vllm.plan import PageRun, StepPlan, WorkerReport

log = logging.getLogger("kvdirect.vllm")

_EMPTY_DIGESTS = np.zeros((0, 32), dtype=np.uint8)


def request_namespace(request) -> tuple[str | None, bytes | None] | None:
    """(index namespace, key seed) for a request, or None when its KV is not a function
    of its token ids alone (multimodal inputs, prompt embeddings) or of what can be
    identified (a LoRA adapter without its files): such requests are neither loaded
    nor saved."""
    if getattr(request, "prompt_token_ids", None) is None or getattr(request, "mm_features", None):
        return None
    if getattr(request, "prompt_embeds", None) is not None:
        return None
    lora = getattr(request, "lora_request", None)
    lora_name = None
    if lora is not None:  # the adapter's files, not vLLM's name and id (kvdirect.vllm.lora)
        ident = adapter_identity(lora)
        if ident is None:
            return None
        lora_name = f"lora:{ident}"
    salt = getattr(request, "cache_salt", None) or None
    if lora_name is None and salt is None:
        return None, None
    ns = "|".join(p for p in (lora_name, f"salt:{salt}" if salt else None) if p)
    return ns, _keys.namespace_seed(extra_key=lora_name, cache_salt=salt)


@dataclass
class _Req:
    request: object
    tokens: np.ndarray       # token ids: the prompt, then generated tokens of whole computed pages
    namespace: str | None
    digests: np.ndarray      # uint8 [full pages of ``tokens``, 32]
    acks: np.ndarray         # int64 [pages]: bit r set = TP rank r acknowledged the page
    indexed: int = 0         # leading pages inserted into the index
    save_next: int = 0       # first page not yet planned for saving
    known_pool: int = 0      # leading pages the pool was known to hold when the request was admitted
    saves_planned: bool = False
    late_load: bool = False  # a timed-out get may still write its blocks (held at finish until quiet)
    finished: bool = False
    hit: tuple[int, int, int] | None = None  # (num_computed_tokens given, pool pages, tokens claimed)
    seed: bytes | None = None  # namespace seed of the page digests


class SchedulerSide:
    def __init__(self, config: CacheConfig, block_size: int, store, *, tp_size: int = 1,
                 load: bool = True, save: bool = True):
        self.config = config
        self.P = int(block_size)
        self.store = store
        self.tp_size = int(tp_size)
        self.load_enabled = bool(load) and store is not None
        self.save_enabled = bool(save) and store is not None and config.write_back
        self.index = PrefixIndex(self.P, max_pool_only_pages=config.max_pool_only_pages)
        self.fingerprints: list[_keys.LayoutFingerprint] | None = None
        self._reqs: dict[str, _Req] = {}
        self._unsupported: set[str] = set()
        self._loads: dict[str, PageRun] = {}
        self._held: set[str] = set()  # held at finish since the last plan (StepPlan.held)
        self._set_writers(range(self.tp_size))  # MLA: rank 0 alone (set_fingerprints)
        self._health = StoreHealth(store, config, CacheStats(config.latency_window))
        self.stats = dict.fromkeys(("match_calls", "query_keys", "queries", "index_hit_pages", "query_hit_pages",
                                    "hit_requests", "hit_tokens", "load_pages", "load_failed_requests",
                                    "save_pages_planned", "saved_pages_acked", "save_failed_pages",
                                    "late_load_requests", "held_requests"), 0)

    def _set_writers(self, ranks) -> None:
        """The ranks that put pages, and their ack bits (a page every writer stored)."""
        self.writers = list(ranks)
        self._all_ranks = sum(1 << r for r in self.writers)

    # ---- layouts from the workers ------------------------------------------------
    def set_fingerprints(self, fps: dict[int, dict]) -> None:
        """Per TP rank, the fingerprint fields each worker derived from its real KV tensors."""
        ranks = sorted(fps)
        if ranks != list(range(self.tp_size)):
            raise ConfigError(f"kvdirect vLLM connector: layouts from TP ranks {ranks}, expected 0..{self.tp_size - 1}")
        self.fingerprints = [_keys.LayoutFingerprint(**fps[r]) for r in ranks]
        if self.fingerprints[0].is_mla:
            # MLA pages are the same on every rank (keys without the rank): rank 0 alone puts them
            if len({fp.digest for fp in self.fingerprints}) != 1:
                raise ConfigError("kvdirect vLLM connector: TP ranks report different MLA layouts "
                                  f"{[fp.digest for fp in self.fingerprints]}; an MLA page is the same on "
                                  "every rank")
            self._set_writers([0])
        else:
            self._set_writers(range(self.tp_size))
        log.info("kvdirect: page keys %s (model %r, %s, block %d, %d layers)",
                 [fp.key_prefix for fp in self.fingerprints], self.fingerprints[0].model,
                 self.fingerprints[0].layout_kind, self.P, self.fingerprints[0].num_layers)

    def _keys(self, digests: np.ndarray) -> list:
        """Every writing rank's keys, rank-major (MLA: rank 0's, the one key of each page)."""
        if self.fingerprints is None:
            raise ConfigError("kvdirect vLLM connector: no KV layout from the workers (handshake missing)")
        out: list = []
        for r in self.writers:
            out += _keys.pool_keys(digests, self.fingerprints[r])
        return out

    # ---- request state -------------------------------------------------------------
    def _state(self, request) -> _Req | None:
        rid = request.request_id
        st = self._reqs.get(rid)
        if st is not None or rid in self._unsupported:
            return st
        ns = request_namespace(request)
        if ns is None:
            self._unsupported.add(rid)
            return None
        namespace, seed = ns
        tokens = np.asarray(request.prompt_token_ids, dtype=np.int64)
        n = len(tokens) // self.P
        digests = _keys.page_digests(tokens[: n * self.P], self.P, namespace_seed=seed) if n else _EMPTY_DIGESTS
        st = _Req(request, tokens, namespace, digests, np.zeros(n, dtype=np.int64), seed=seed)
        self._reqs[rid] = st
        return st

    def _extend(self, st: _Req, upto: int) -> None:
        """Generated tokens: extend the request's tokens and page digests to the whole pages of
        its first ``upto`` tokens (vLLM's ``all_token_ids``: prompt + output so far). Called
        when a page beyond the known ones has been computed, once per page."""
        P = self.P
        ids = getattr(st.request, "all_token_ids", None)
        if ids is None:
            return
        pages = min(int(upto), len(ids)) // P
        have = len(st.digests)
        if pages <= have:
            return
        new = np.asarray(ids[len(st.tokens): pages * P], dtype=np.int64)
        tokens = np.concatenate([st.tokens, new]) if len(st.tokens) < pages * P else st.tokens
        tail = _keys.page_digests(tokens[have * P: pages * P], P, namespace_seed=st.seed,
                                  prior=st.digests[-1].tobytes() if have else None)
        st.tokens = tokens
        st.digests = np.concatenate([st.digests, tail])
        st.acks = np.concatenate([st.acks, np.zeros(pages - have, dtype=np.int64)])

    def _forget(self, rid: str) -> None:
        self._reqs.pop(rid, None)
        self._unsupported.discard(rid)
        self._loads.pop(rid, None)

    # ---- match ---------------------------------------------------------------------
    def num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:
        if not (self.load_enabled or self.save_enabled):
            return 0
        st = self._state(request)  # also without loads (kv_producer): the request's pages are saved
        if st is None or not self.load_enabled:
            return 0
        P = self.P
        cap = int(request.num_tokens) - 1  # never the last token: vLLM computes at least one
        limit = min(-(-cap // P), len(st.digests))  # whole pages that hold a claimable token
        if limit * P <= num_computed_tokens:
            st.hit = None
            return 0
        self.stats["match_calls"] += 1
        pages = self._pool_pages(st, limit)
        claim = min(pages * P, cap)
        st.hit = (int(num_computed_tokens), pages, claim)  # for after_alloc (overwritten per call)
        return max(0, claim - int(num_computed_tokens))

    def _pool_pages(self, st: _Req, limit: int) -> int:
        """Leading pages [0, limit) the pool holds: the index first, one exists query after."""
        P = self.P
        r = self.index.match(st.tokens[: limit * P], st.namespace)
        known = min(r.pool_len // P, limit)
        self.stats["index_hit_pages"] += known
        if not self._health.available():
            return 0  # the pool is unreachable: its pages are misses for now
        if limit - known < max(self.config.min_query_pages, 1):
            return known
        upto = min(limit, known + self.config.max_query_pages)
        n = upto - known
        try:
            present = np.asarray(self.store.exists(self._keys(st.digests[known:upto])), dtype=bool)
            self._health.recovered()
        except ConfigError:
            raise
        except Exception as e:  # a store error is a miss, never a crash
            self._health.failed("exists", e)
            return 0
        self.stats["queries"] += 1
        self.stats["query_keys"] += n * len(self.writers)
        per_rank = present.reshape(len(self.writers), n)
        miss = ~per_rank.all(axis=0)
        found = int(np.argmax(miss)) if miss.any() else n
        if found:
            self.stats["query_hit_pages"] += found
            self._index_upto(st, known + found)
        return known + found

    def _index_upto(self, st: _Req, pages: int) -> None:
        if pages > st.indexed:
            self.index.insert_pool_only(st.tokens[: pages * self.P], st.namespace, digests=st.digests[:pages])
            st.indexed = pages

    # ---- allocation -> loads -----------------------------------------------------------
    def after_alloc(self, request, block_ids: list[int], num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        hit, st.hit = st.hit, None
        if hit is not None:
            st.known_pool = max(st.known_pool, hit[1])  # leading pages the pool holds: never re-saved
        if num_external_tokens <= 0 or hit is None:
            self._loads.pop(request.request_id, None)
            return
        computed, pages, claim = hit
        P = self.P
        end = computed + int(num_external_tokens)
        if computed % P or not computed < end <= claim:
            # vLLM would treat these tokens as loaded: fail loudly rather than serve unloaded blocks
            raise KVDirectError(f"kvdirect: vLLM allocated {num_external_tokens} external tokens after "
                                f"{computed} computed; the pool hit covers tokens {computed}..{claim}")
        first, n = computed // P, -(-end // P) - computed // P  # pages holding a loaded token
        blocks = np.asarray(block_ids[first:first + n], dtype=np.int64)
        if len(blocks) != n:
            raise ConfigError(f"kvdirect: request {request.request_id} has {len(block_ids)} blocks, "
                              f"needs {first + n} for its pool hit")
        # a hit ending inside a page: the forward writes the rest of that page (the same tokens' KV)
        self._loads[request.request_id] = PageRun(request.request_id, first, st.digests[first:first + n], blocks,
                                                  recompute_tail=bool(end % P))
        self.stats["load_pages"] += n
        self.stats["hit_requests"] += 1
        self.stats["hit_tokens"] += int(num_external_tokens)

    # ---- per step ----------------------------------------------------------------------
    def build_step(self, scheduler_output) -> StepPlan:
        so = scheduler_output
        preempted = frozenset(getattr(so, "preempted_req_ids", None) or ())
        plan = StepPlan(preempted=preempted, held=frozenset(self._held),
                        fingerprint_digests=tuple(fp.digest for fp in self.fingerprints or ()))
        self._held.clear()
        scheduled = getattr(so, "num_scheduled_tokens", {}) or {}
        for rid in list(self._loads):
            if rid in scheduled:
                plan.loads.append(self._loads.pop(rid))
        self._loads.clear()  # a load not scheduled this step is void (its blocks were not used)
        if not self.save_enabled:
            return plan
        computed = {nr.req_id: nr.num_computed_tokens for nr in getattr(so, "scheduled_new_reqs", ())}
        cached = getattr(so, "scheduled_cached_reqs", None)
        if cached is not None:
            computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        block_state = getattr(so, "kv_connector_block_state", None)
        for rid, n_sched in scheduled.items():
            st = self._reqs.get(rid)
            if st is None or rid not in computed:
                continue
            upto = int(computed[rid]) + int(n_sched)  # tokens whose KV exists after this step
            if upto // self.P > len(st.digests):
                self._extend(st, upto)  # decoding filled a page of generated tokens
            full = min(upto, len(st.tokens)) // self.P
            lo = max(st.save_next, st.known_pool)
            if full <= lo:
                continue
            ids = block_state.get_block_ids(rid) if block_state is not None else None
            if ids is None:
                continue
            req_blocks = np.asarray(ids[0][:full], dtype=np.int64)
            if len(req_blocks) != full:
                continue
            # the pages were computed reading the request's earlier blocks: the worker withholds
            # them when one of those blocks did not load
            plan.saves.append(PageRun(rid, lo, st.digests[lo:full], req_blocks[lo:], prior_blocks=req_blocks[:lo]))
            st.save_next = full
            st.saves_planned = True
            self.stats["save_pages_planned"] += full - lo
        return plan

    def request_finished(self, request) -> bool:
        """True: hold the request's blocks until every worker reports it done (its saves
        acknowledged, no timed-out get still writing its blocks)."""
        rid = request.request_id
        st = self._reqs.get(rid)
        self._loads.pop(rid, None)
        if st is not None and (st.saves_planned or st.late_load):
            st.finished = True
            self._held.add(rid)
            self.stats["held_requests"] += 1
            return True
        self._forget(rid)
        return False

    def on_worker_output(self, report: WorkerReport | None, finished_sending=None) -> None:
        if report:
            touched: set[str] = set()
            for a in report.acks:
                st = self._reqs.get(a.req_id)
                ok = np.asarray(a.ok, dtype=bool)
                self.stats["save_failed_pages"] += int((~ok).sum())
                if st is None:
                    continue
                st.acks[a.first_page:a.first_page + len(ok)] |= ok.astype(np.int64) << a.rank
                touched.add(a.req_id)
            for rid in touched:
                st = self._reqs[rid]
                whole = (st.acks & self._all_ranks) == self._all_ranks  # every writing rank stored its part
                whole[: st.known_pool] = True
                run = int(np.argmin(whole)) if not whole.all() else len(whole)
                before = st.indexed
                self._index_upto(st, run)
                self.stats["saved_pages_acked"] += max(0, st.indexed - before)
            for rid, page in sorted(set(report.load_failures)):  # TP ranks agree: one report each
                self.stats["load_failed_requests"] += 1
                st = self._reqs.get(rid)
                if st is None:
                    continue
                # vLLM recomputes from the failed page: those pages are not in the pool
                st.known_pool = min(st.known_pool, page)
                st.save_next = min(st.save_next, page)
                if st.indexed > page:
                    self.index.mark_not_in_pool(st.tokens, page, st.indexed - page, namespace=st.namespace)
                    st.indexed = page
            for rid, page in set(report.withheld):
                st = self._reqs.get(rid)
                if st is not None:  # planned again once vLLM has recomputed the pages
                    st.save_next = min(st.save_next, page)
            for rid in set(report.late_loads):
                st = self._reqs.get(rid)
                if st is not None and not st.late_load:
                    st.late_load = True
                    self.stats["late_load_requests"] += 1
        for rid in finished_sending or ():
            st = self._reqs.get(rid)
            if st is not None and st.finished:
                self._forget(rid)
