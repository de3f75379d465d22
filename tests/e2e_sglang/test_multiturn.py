"""Multi-turn: a three-turn conversation alternating between two servers sharing a pool.

Turn 1 (server A) generates 64 tokens; turn 2 is turn 1's prompt + its answer + a new
user message, sent to server B, which must hit the pool pages of turn 1's prompt AND of
the tokens A generated (A writes prompt + generated pages back when the request
finishes). Turn 3 goes back to A and hits what B computed in turn 2. Every turn's greedy
tokens equal a server without any prefix cache (``--disable-radix-cache``) running the
same conversation.
"""
from __future__ import annotations

import numpy as np

from conftest import VOCAB, wait_pool_objects
from kvdirect.demo.sglang_cpu.client import cached_tokens
from test_shared_pool import kv_config

PAGE = 16
PROMPT = 200       # first user message
ANSWER = 64        # generated tokens per turn
FOLLOW_UP = 40     # each later user message


def user(turn: int, n: int) -> np.ndarray:
    return np.random.default_rng(700 + turn).integers(1, VOCAB, n, dtype=np.int64)


def conversation(servers, turns: int = 3, pool: str | None = None) -> list[tuple[np.ndarray, dict]]:
    """(prompt, result) per turn; turn t goes to servers[t % len(servers)]. With ``pool``,
    each turn starts once the previous turn's pages are in the pool (writes are asynchronous)."""
    history = np.empty(0, np.int64)
    out = []
    for t in range(turns):
        prompt = np.concatenate([history, user(t, PROMPT if t == 0 else FOLLOW_UP)])
        r = servers[t % len(servers)].generate(prompt, ANSWER)
        out.append((prompt, r))
        history = np.concatenate([prompt, np.asarray(r["output_ids"], np.int64)])
        if pool:
            pages = (len(history) - 1) // PAGE  # the last generated token has no KV
            assert wait_pool_objects(pool, pages) >= pages, f"turn {t + 1}'s pages did not reach the pool"
    return out


def test_three_turns_across_two_servers(farm, pools):
    url = pools.new()
    a, b, plain = farm.start_all([dict(kvdirect_config=kv_config(url), name="turns-A"),
                                  dict(kvdirect_config=kv_config(url), name="turns-B"),
                                  dict(radix="none", name="turns-plain")])
    ref = conversation([plain])
    got = conversation([a, b], pool=url)
    for t, ((p_ref, r_ref), (p, r)) in enumerate(zip(ref, got)):
        assert np.array_equal(p, p_ref) and r["output_ids"] == r_ref["output_ids"], f"turn {t + 1} differs"

    # turn 1 on A: nothing cached
    assert cached_tokens(got[0][1]["meta_info"])["total"] == 0
    # turn 2 on B: every whole page of turn 1's prompt + answer whose KV A computed
    # (the last generated token is never fed back, so it has no KV)
    kv_tokens_1 = PROMPT + ANSWER - 1
    hit2 = cached_tokens(got[1][1]["meta_info"])
    assert hit2["pool"] == kv_tokens_1 // PAGE * PAGE, hit2
    assert hit2["pool"] > PROMPT, "turn 2 did not hit the pages of turn 1's generated tokens"
    # turn 3 on A: its own turn-1 pages on device, B's turn-2 pages from the pool
    kv_tokens_2 = len(got[1][0]) + ANSWER - 1
    hit3 = cached_tokens(got[2][1]["meta_info"])
    assert hit3["total"] == kv_tokens_2 // PAGE * PAGE, hit3
    assert hit3["device"] == kv_tokens_1 // PAGE * PAGE and hit3["pool"] > 0, hit3
