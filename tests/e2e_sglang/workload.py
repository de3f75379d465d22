"""The prompts the real-server tests send, and the reference outputs they are checked against.

Documents are served by server A (which writes their KV to the pool); server B
then sends prompts that share 0%, 50% or 100% of a document. Each document is
the base of one B prompt only, so B's hits must come from the pool. Fresh
prompts (0%) start with a token no document starts with.
"""
from __future__ import annotations

import numpy as np

from conftest import VOCAB, documents, with_prefix

PROMPT_LEN = 256
PER_LEVEL = 12
LEVELS = (0.0, 0.5, 1.0)
OUTPUT_LEN = 4


class Workload:
    def __init__(self, prompt_len: int = PROMPT_LEN, per_level: int = PER_LEVEL, levels=LEVELS, seed: int = 1):
        n_docs = per_level * sum(1 for r in levels if r > 0)
        self.prompt_len = prompt_len
        self.docs = documents(n_docs, prompt_len, seed=seed)
        self.docs[:, 0] = np.arange(1, n_docs + 1)           # distinct first tokens
        self.prompts = []                                     # (reuse, shared tokens, ids)
        d = 0
        for li, r in enumerate(levels):
            for i in range(per_level):
                if r == 0:
                    ids = documents(1, prompt_len, seed=seed * 1000 + i)[0]
                    ids[0] = VOCAB - 1 - i                    # shares nothing with anything else
                    self.prompts.append((r, 0, ids))
                else:
                    shared = int(round(r * prompt_len))
                    ids = self.docs[d] if shared >= prompt_len else with_prefix(self.docs[d], shared, seed * 77 + d)
                    self.prompts.append((r, shared, ids))
                    d += 1

    def sequences(self) -> list[np.ndarray]:
        """Every distinct prompt (documents and B prompts)."""
        seen, out = set(), []
        for ids in [*self.docs, *(p[2] for p in self.prompts)]:
            k = ids.tobytes()
            if k not in seen:
                seen.add(k)
                out.append(ids)
        return out


def outputs(server, seqs, max_new_tokens: int = OUTPUT_LEN) -> dict[bytes, list[int]]:
    return {ids.tobytes(): r["output_ids"] for ids, r in zip(seqs, server.generate_many(seqs, max_new_tokens))}
