"""Put kvdirect into your own engine: a complete example on a Hugging Face model.

An engine keeps its KV cache in a paged device buffer: per layer, K and V of
shape ``[pages, page_size, kv_heads, head_dim]``. It serves a request as a
scheduler does, with kvdirect in the loop:

    match -> lock -> allocate -> load -> prefill the rest -> write_back -> free -> unlock -> poll

The prefix KV that kvdirect found (on the device or loaded from the pool) is
gathered from the paged buffer into a ``transformers.DynamicCache``; the
model prefills only the rest; the new KV is scattered back into the paged
buffer and written to the pool. Two processes, instance A and instance B, each
with its own model copy and device buffer, share one embedded shm pool: A
serves documents, B serves prompts that share a prefix with them, once with
kvdirect (the prefix comes from A's pages in the pool) and once without. The
greedy outputs must be identical. ``docs/engines.md`` explains every step.

    python examples/hf_paged_engine.py            # CPU, a few seconds; no download
    python examples/hf_paged_engine.py --json out.json

The model is a small Llama with random weights drawn from a seed, built from a
config: no hub access. Needs torch and transformers (``pip install ".[demo]"``).
"""
from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import sys
import uuid

import numpy as np

import kvdirect
from kvdirect import CacheConfig, KVDirectCache, KVLayout, model_identity, open_store

PAGE = 16  # tokens per KV page


# ---- the model -------------------------------------------------------------------------------

def build_model(seed: int = 0):
    """A tiny Llama with seeded random weights (same seed, same weights in every process)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def forward(model, ids, start: int, past):
    """Logits of the last position; ``past`` (a DynamicCache) grows by ``ids``."""
    import torch

    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x / 4.x
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    return model(input_ids=ids, position_ids=pos, use_cache=True, **{kw: past}).logits[0, -1]


def cache_layers(past):
    """Per-layer (K, V) tensors [1, kv_heads, seq, head_dim] of a DynamicCache."""
    if hasattr(past, "layers"):
        return [(l.keys, l.values) for l in past.layers]
    return list(zip(past.key_cache, past.value_cache))  # transformers < 4.54


# ---- the engine's paged KV buffer ---------------------------------------------------------------

class PagedKV:
    """K and V per layer as ``[pages, page_size, kv_heads, head_dim]``, and a free list of pages.

    A slot is ``page * page_size + offset``; slots travel as int64 numpy arrays, one per token."""

    def __init__(self, model, pages: int = 64, page_size: int = PAGE):
        import torch

        c = model.config
        heads, dim = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
        shape = (pages, page_size, heads, dim)
        self.k = [torch.zeros(shape) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape) for _ in range(c.num_hidden_layers)]
        self.P = page_size
        self.free_pages = list(range(pages))[::-1]

    def alloc(self, n_tokens: int) -> np.ndarray:
        n = -(-n_tokens // self.P)
        if n > len(self.free_pages):
            raise MemoryError("device KV buffer full")
        pages = np.array([self.free_pages.pop() for _ in range(n)], dtype=np.int64)
        return (pages[:, None] * self.P + np.arange(self.P)).reshape(-1)[:n_tokens]

    def free(self, slots) -> None:
        """Give back every page the slots touch (kvdirect calls this for slots it releases)."""
        self.free_pages.extend(int(p) for p in np.unique(np.asarray(slots, np.int64) // self.P))

    def gather(self, slots, past) -> None:
        """Put the KV at ``slots`` into an empty DynamicCache, layer by layer."""
        import torch

        idx = torch.as_tensor(slots)
        for layer, (k, v) in enumerate(zip(self.k, self.v)):
            flat_k, flat_v = k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])  # [slots, heads, dim]
            past.update(flat_k[idx].transpose(0, 1).unsqueeze(0), flat_v[idx].transpose(0, 1).unsqueeze(0), layer)

    def scatter(self, slots, past, start: int) -> None:
        """Store positions ``start .. start + len(slots)`` of a DynamicCache at ``slots``."""
        import torch

        idx = torch.as_tensor(slots)
        end = start + len(slots)
        for (k, v), (lk, lv) in zip(zip(self.k, self.v), cache_layers(past)):
            k.view(-1, *k.shape[2:])[idx] = lk[0, :, start:end].transpose(0, 1)
            v.view(-1, *v.shape[2:])[idx] = lv[0, :, start:end].transpose(0, 1)


# ---- serving one request -------------------------------------------------------------------------

class Engine:
    def __init__(self, model, store_url: str | None, seed: int):
        self.model = model
        self.kv = PagedKV(model)
        self.cache = None
        if store_url:
            layout = KVLayout.from_mha(self.kv.k, self.kv.v, page_size=self.kv.P)  # paged shapes
            # the model identity names the weights: here a config and a seed (real engines: the
            # model path, its revision and quantization, e.g. model_identity(path, revision=...))
            ident = model_identity("example/llama-tiny", revision=f"random-seed-{seed}")
            self.cache = KVDirectCache(layout, store_url, free_slots=self.kv.free,
                                       config=CacheConfig(store=None, model=ident, allow_no_store=False))

    def alloc(self, n_tokens: int) -> np.ndarray:
        short = -(-n_tokens // self.kv.P) - len(self.kv.free_pages)
        if short > 0 and self.cache is not None:
            self.cache.evict(short * self.kv.P)  # unlocked cached pages go back through free_slots
        return self.kv.alloc(n_tokens)

    def serve(self, tokens: np.ndarray, max_new: int = 4, namespace=None) -> dict:
        """Greedy-decode ``max_new`` tokens; reuse cached prefix KV when a cache is configured."""
        import torch
        from transformers import DynamicCache

        n, c = len(tokens), self.cache
        cached, prefix, node, loaded = 0, np.zeros(0, np.int64), None, 0
        if c is not None:
            m = c.match(tokens[:-1], namespace)  # [:-1]: the last token is always computed
            c.lock(m.node)
            loaded = c.load(m, self.alloc(m.pool_len))  # pool pages straight into the buffer
            cached, prefix, node = m.device_len, m.device_slots, m.node  # load() moved the match on
        new = None
        try:
            new = self.alloc(n - cached)  # slots for the tokens this request computes
            past = DynamicCache()
            with torch.inference_mode():
                if cached:
                    self.kv.gather(prefix, past)
                ids = torch.as_tensor(tokens[cached:], dtype=torch.long).unsqueeze(0)
                logits = forward(self.model, ids, cached, past)
                first_logits, out = logits.clone(), [int(logits.argmax())]
                self.kv.scatter(new, past, cached)  # the prompt's new KV into the paged buffer
                for i in range(max_new - 1):
                    logits = forward(self.model, torch.tensor([[out[-1]]]), n + i, past)
                    out.append(int(logits.argmax()))
            slots = np.concatenate([prefix, new])
            if c is not None:
                # the cache keeps the full pages (and writes the new ones to the pool in the
                # background); it reports how many leading tokens it already had
                already = c.write_back(tokens, slots, namespace)
                self.kv.free(slots[cached:already])  # duplicates of pages the cache already had
                self.kv.free(slots[n // self.kv.P * self.kv.P:])  # the partial last page stays ours
            else:
                self.kv.free(slots)
        except BaseException:
            if new is not None:
                self.kv.free(new)  # nothing was handed to the cache: the slots are still ours
            raise
        finally:
            if c is not None:
                c.unlock(node)
                c.poll()  # every scheduler step: applies finished writes
        return {"output": out, "first_logits": first_logits, "cached": cached, "loaded": loaded}


# ---- two instances, one pool ------------------------------------------------------------------------

def workload(seed: int, n_docs: int = 3, doc_len: int = 200, shared: int = 160):
    rng = np.random.default_rng(seed)
    docs = rng.integers(0, 512, (n_docs, doc_len)).astype(np.int32)
    prompts = rng.integers(0, 512, (n_docs, doc_len)).astype(np.int32)
    prompts[:, :shared] = docs[:, :shared]  # B's prompts share their first tokens with A's documents
    prompts[:, shared] = (docs[:, shared] + 1) % 512
    return docs, prompts


def instance_a(store_url: str, seed: int, q) -> None:
    eng = Engine(build_model(seed), store_url, seed)
    docs, _ = workload(seed)
    outs = [eng.serve(d)["output"] for d in docs]
    eng.cache.flush()  # every page is in the pool before B starts
    q.put({"stored_pages": eng.cache.stats()["stored_pages"], "outputs": outs})
    eng.cache.close()


def instance_b(store_url: str, seed: int, q) -> None:
    model = build_model(seed)
    with_cache, without = Engine(model, store_url, seed), Engine(model, None, seed)
    _, prompts = workload(seed)
    rows = []
    for p in prompts:
        r, base = with_cache.serve(p), without.serve(p)
        rows.append({"cached": r["cached"], "loaded": r["loaded"], "identical": r["output"] == base["output"],
                     "max_logit_diff": float((r["first_logits"] - base["first_logits"]).abs().max())})
    q.put({"requests": rows, "stats": {k: with_cache.cache.stats()[k] for k in ("loaded_pages", "pool_hit_tokens")}})
    with_cache.cache.close()


def run(seed: int = 0) -> dict:
    name = f"kvd-example-{uuid.uuid4().hex[:8]}"
    pool = open_store(f"shm://{name}?size=64MiB")  # the pool both instances share; made for this run
    ctx = mp.get_context("spawn")
    try:
        res = {}
        for role, target in (("A", instance_a), ("B", instance_b)):  # B starts after A has finished
            q = ctx.Queue()
            p = ctx.Process(target=target, args=(f"shm://{name}", seed, q))
            p.start()
            res[role] = q.get(timeout=600)
            p.join(60)
            if p.exitcode != 0:
                raise RuntimeError(f"instance {role} exited with {p.exitcode}")
    finally:
        pool.destroy()
    res["identical"] = all(r["identical"] for r in res["B"]["requests"])
    res["pool"] = name
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="two engines share a kvdirect pool (see docs/engines.md)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    res = run(args.seed)
    print(f"kvdirect {kvdirect.__version__}: instance A stored {res['A']['stored_pages']} pages")
    for i, r in enumerate(res["B"]["requests"]):
        print(f"instance B request {i}: {r['cached']} prefix tokens reused ({r['loaded']} loaded from the pool), "
              f"outputs identical to no reuse: {r['identical']}, max first-logit diff {r['max_logit_diff']:.2g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
