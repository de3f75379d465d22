"""Drive an SGLang prefix cache the way SGLang 0.5.23's scheduler does, on CPU.

Uses SGLang's real ReqToTokenPool, KV pools, allocators, Req and the cache
helpers the scheduler calls (match_kv_cache via Req.init_next_round_input,
lock/unlock, init_load_back, prefix_device_indices, release_kv_cache ->
checkpoint + free_kv_row). The "forward pass" writes deterministic KV
(a function of the token prefix and position) into the new slots only, so
loaded pages are checked byte for byte against what another instance computed.
"""
from __future__ import annotations

import itertools
from array import array
from dataclasses import dataclass, field

import numpy as np
import torch

from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InitLoadBackParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import checkpoint_kv_cache, release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.registry import TreeCacheBuildContext
from sglang.srt.sampling.sampling_params import SamplingParams

LAYERS, HEADS, DIM = 2, 2, 8
MODEL = "test/tiny-model"
_rid = itertools.count()
_server_args = None


def server_args():
    """A real ServerArgs, published to SGLang's runtime context (the scheduler's helpers read it)."""
    global _server_args
    if _server_args is None:
        from sglang.srt.runtime_context import get_context
        from sglang.srt.server_args import ServerArgs

        _server_args = ServerArgs(model_path=MODEL, device="cpu", radix_cache_backend="kvdirect")
        get_context().set_server_args(_server_args)
    return _server_args


@dataclass
class Engine:
    """One SGLang "instance": pools, allocator and a tree cache."""
    page_size: int
    kind: str = "mha"
    size: int = 512
    kvpool: object = None
    allocator: object = None
    req_to_token_pool: object = None
    params: object = None
    cache: object = None
    served: list = field(default_factory=list)
    dtype: object = None         # the pool's KV dtype (SGLang's kv_cache_dtype); None: float32 / bfloat16 (MLA)
    quant_method: object = None  # SGLang's KV quantization recipe (MHA), e.g. an FP4 one
    max_context: int = 1024      # longest request

    def __post_init__(self):
        server_args()
        P = self.page_size
        if self.kind == "mha":
            extra = {} if self.quant_method is None else {"quant_method": self.quant_method}
            self.kvpool = MHATokenToKVPool(size=self.size, page_size=P, dtype=self.dtype or torch.float32,
                                           head_num=HEADS, head_dim=DIM, layer_num=LAYERS, device="cpu",
                                           enable_memory_saver=False, **extra)
        else:
            self.kvpool = MLATokenToKVPool(size=self.size, page_size=P, dtype=self.dtype or torch.bfloat16,
                                           kv_lora_rank=16, qk_rope_head_dim=8, layer_num=LAYERS, device="cpu",
                                           enable_memory_saver=False)
        if P == 1:
            self.allocator = TokenToKVPoolAllocator(self.size, torch.float32, "cpu", self.kvpool, need_sort=False)
        else:
            self.allocator = PagedTokenToKVPoolAllocator(self.size, P, torch.float32, "cpu", self.kvpool,
                                                         need_sort=False)
        self.req_to_token_pool = ReqToTokenPool(size=16, max_context_len=self.max_context, device="cpu",
                                                enable_memory_saver=False)
        self.params = CacheInitParams(disable=False, req_to_token_pool=self.req_to_token_pool,
                                      token_to_kv_pool_allocator=self.allocator, page_size=P)

    def context(self, **kw):
        from types import SimpleNamespace
        base = dict(server_args=server_args(),
                    params=self.params, is_hybrid_swa=False, is_hybrid_ssm=False,
                    enable_hierarchical_cache=False, disable_radix_cache=False, tp_worker=None,
                    model_config=SimpleNamespace(model_path=MODEL), tp_size=1, tp_rank=0,
                    tp_group=None)
        base.update(kw)
        return TreeCacheBuildContext(**base)

    # ---- KV content -------------------------------------------------------------
    def buffers(self):
        if self.kind == "mha":
            return list(self.kvpool.k_buffer) + list(self.kvpool.v_buffer)
        return list(self.kvpool.kv_buffer)

    def kv_at(self, slots: torch.Tensor) -> list:
        return [b[slots.long()].clone() for b in self.buffers()]

    def compute(self, tokens: np.ndarray, slots: torch.Tensor, start: int) -> None:
        """The forward pass: KV of positions [start, len) into their slots."""
        t = tokens.astype(np.int64)
        h = (np.cumsum(t * 2654435761 % 1000003) % 1000003).astype(np.float64)
        for i, b in enumerate(self.buffers()):
            width = b[0].numel()
            vals = (h[:, None] * (i + 1) / 7.0 + np.arange(width)[None, :]) % 1000.0
            b[slots[start:].long()] = torch.from_numpy(vals[start:]).to(b.dtype).view(-1, *b.shape[1:])

    def attention_reads(self) -> None:
        """What the forward pass's attention does first in each layer: read the layer's
        KV through the pool (which waits on a registered layer transfer counter)."""
        for layer in range(LAYERS):
            if self.kind == "mha":
                self.kvpool.get_key_buffer(layer)
                self.kvpool.get_value_buffer(layer)
            else:
                self.kvpool.get_key_buffer(layer)

    # ---- one request, scheduler style -----------------------------------------------
    def waiting(self, tokens, **kw) -> Req:
        """A request in the waiting queue, matched (calc_priority) but not admitted."""
        req = Req(f"r{next(_rid)}", "", array("q", np.asarray(tokens, dtype=np.int64).tolist()),
                  SamplingParams(max_new_tokens=1), **kw)
        req.init_next_round_input(self.cache)
        return req

    def serve(self, tokens, *, extra_key=None, cache_salt=None, finish=True, chunk=None, on_chunk=None):
        """One request. ``chunk``: chunked prefill of that many tokens per round; after each
        round but the last the scheduler checkpoints the unfinished request
        (``checkpoint_kv_cache``) and ``on_chunk(req, extend_end)`` is called."""
        r = self.admit(tokens, extra_key=extra_key, cache_salt=cache_salt)
        return self.prefill([r], finish=finish, chunk=chunk, on_chunk=on_chunk)[0]

    def admit(self, tokens, *, extra_key=None, cache_salt=None) -> dict:
        """Match, load back, lock and allocate one request (``PrefillAdder.add_one_req``); a
        scheduling round admits each of its requests so before it matches the next."""
        tokens = np.asarray(tokens, dtype=np.int64)
        cache = self.cache
        req = Req(f"r{next(_rid)}", "", array("q", tokens.tolist()), SamplingParams(max_new_tokens=1),
                  extra_key=extra_key, cache_salt=cache_salt)
        req.init_next_round_input(cache)                 # -> match_kv_cache -> match_prefix
        device_hit, host_hit = req.prefix_len, req.host_hit_length
        loaded = 0
        # PrefillAdder.add_one_req: no pin before init_load_back for a non-unified tree
        if req.host_hit_length > 0:
            loaded, req.last_node = cache.init_load_back(InitLoadBackParams(
                best_match_node=req.best_match_node, host_hit_length=req.host_hit_length, req=req))
            req.prefix_len += loaded
            if cache.load_back_is_cache_owned():
                req.kv.cache_protected_len = req.prefix_len
        req.lock = cache.lock(req.last_node)             # _commit_prefill_admission
        self.req_to_token_pool.alloc([req])
        prefix = cache.prefix_device_indices(req) if req.prefix_len else torch.empty(0, dtype=torch.int64)
        n_new = len(tokens) - req.prefix_len
        P = self.page_size
        need = -(-n_new // P) * P
        if self.allocator.available_size() < need:       # the scheduler evicts to admit
            cache.evict(EvictParams(num_tokens=need - self.allocator.available_size()))
        new = self.allocator.alloc(need)
        assert new is not None, "device pool exhausted in test"
        new = new[:n_new]
        slots = torch.cat([prefix.to(torch.int64), new.to(torch.int64)])
        self.req_to_token_pool.write((req.kv.req_pool_idx, slice(0, len(tokens))), slots.to(torch.int32))
        req.kv.kv_allocated_len = len(tokens)
        return dict(req=req, tokens=tokens, device_hit=device_hit, host_hit=host_hit, loaded=loaded,
                    slots=slots)

    def prefill(self, admitted, *, finish=True, chunk=None, on_chunk=None) -> list:
        """The forward pass of admitted requests (one per round with ``chunk``), then release."""
        cache = self.cache
        out = []
        first = True
        for r in admitted:
            req, tokens, slots = r["req"], r["tokens"], r["slots"]
            start = req.prefix_len
            step = chunk or len(tokens)
            while True:                                  # one prefill round per chunk
                end = min(start + step, len(tokens))
                req.extend_end = end
                if first or chunk:                       # a batch reads each layer once
                    self.attention_reads()
                    first = False
                self.compute(tokens[:end], slots[:end], start)
                req.kv.kv_committed_len = end
                if end == len(tokens):
                    break
                checkpoint_kv_cache(req, cache)          # stash_chunked_request
                if on_chunk is not None:
                    on_chunk(req, end)
                start = req.prefix_len
            row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, : len(tokens)].to(torch.int64)
            kv = self.kv_at(row)                         # the KV the request attends to
            out.append(dict(r, kv=kv))
        for r in out:
            if finish:
                r["req"].finished_reason = FINISH_LENGTH(length=0)
                release_kv_cache(r["req"], cache, checkpoint=True)  # -> checkpoint, free_kv_row, unlock
            self.served.append(r["req"])
        return out
