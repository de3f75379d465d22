"""Pool audit for the real-server tests: every object in a pool against the same page
written by a clean server.

kvdirect has no key listing, so the candidate keys are derived from what a test
sent: the full pages of every request's prompt followed by the tokens it
generated (a server writes back prompt + output), keyed as the server keys them
(``kvd1/<layout fingerprint>/`` from its start-up log, which needs ``--log-level
info``, plus :func:`kvdirect.keys.page_digests` of the tokens). Every candidate
found in the audited pool is read and compared byte for byte with the object of
the same key in a pool written by a clean server (:class:`CleanPool`: no store
faults, no memory pressure, requests one at a time) that was sent the same
requests; and the number found must equal the pool's object count, so nothing
else is in it. A wrong page -- KV computed on top of a failed load, a torn or
stale object, another prompt's KV under this key -- differs in its bytes.
"""
from __future__ import annotations

import re
import time

import numpy as np

from kvdirect import keys as K
from kvdirect.stores import open_store

KEYS_RE = re.compile(r"keys=(kvd1/[0-9a-f]+/)")
DTYPE_RE = re.compile(r"kvdirect prefix cache: KVLayout\(.*?dtype=(\w+)")


def kv_dtype(server) -> np.dtype:
    """The KV dtype of the server's layout (start-up log)."""
    found = set(DTYPE_RE.findall(server.log_text()))
    assert len(found) == 1, found
    name = found.pop()
    return np.dtype("uint16") if name == "bfloat16" else np.dtype(name)


def key_prefix(server) -> str:
    """The pool key prefix the server logged at start-up (``keys=kvd1/<fingerprint>/``)."""
    found = set(KEYS_RE.findall(server.log_text()))
    assert len(found) == 1, f"expected one key prefix in {server.name}'s log (run it with --log-level info): {found}"
    return found.pop()


def page_keys(prefix: str, sequences, page_size: int, where: dict | None = None) -> list[str]:
    """Keys of the full pages of every sequence (default namespace), without repeats;
    ``where`` (if given) gets key -> (sequence index, page index) of its first use."""
    seed = K.namespace_seed()
    out: dict[str, None] = {}
    for i, seq in enumerate(sequences):
        d = K.page_digests(np.asarray(seq, dtype=np.int64), page_size, namespace_seed=seed)
        for j, row in enumerate(d):
            k = prefix + row.tobytes().hex()
            if k not in out and where is not None:
                where[k] = (i, j)
            out[k] = None
    return list(out)


def sequences(requests, outputs) -> list[np.ndarray]:
    """Prompt + generated tokens of each request."""
    return [np.concatenate([np.asarray(ids, np.int64), np.asarray(out, np.int64)]) for ids, out in
            zip(requests, outputs)]


def audit(url: str, clean_url: str, keys: list[str], dtype=None, ulps: int = 0) -> dict:
    """Compare every candidate object of the pool at ``url`` with the clean pool's.

    ``ulps=0``: a page is right only when bit-identical. ``ulps=n`` (with the KV ``dtype``)
    also accepts a page whose values all differ by at most n machine epsilons of the
    dtype, scaled by the page's largest value (at least 1): float rounding, when the
    two servers computed the page in batches of other shapes. ``close`` counts those;
    ``diffs`` gives (largest |difference|, largest |value|) of each page not bit-identical."""
    pool, clean = open_store(url), open_store(clean_url)
    try:
        objects = int(pool.stats()["objects"])
        have = np.asarray(pool.exists(keys), dtype=bool)
        found = [k for k, h in zip(keys, have) if h]
        wrong, unverified, diffs, close = [], [], {}, 0
        for k in found:
            a, b = pool.get_bytes(k), clean.get_bytes(k)
            if b is None:
                unverified.append(k)
                continue
            if a == b:
                continue
            if dtype is not None and dtype.kind == "f" and len(a) == len(b):
                x, y = np.frombuffer(a, dtype).astype(np.float64), np.frombuffer(b, dtype).astype(np.float64)
                d, m = float(np.abs(x - y).max()), float(np.abs(y).max())
                diffs[k] = (d, m)
                if d <= ulps * float(np.finfo(dtype).eps) * max(1.0, m):
                    close += 1
                    continue
            wrong.append(k)
        return dict(objects=objects, found=len(found), wrong=wrong, close=close, unverified=unverified, diffs=diffs)
    finally:
        pool.close()
        clean.close()


def assert_pool_clean(url: str, clean, server, requests, outputs, page_size: int, ulps: int = 0) -> dict:
    """The audit of a test's pool: every object found among the test's pages, each equal to
    the clean server's page of the same key (``clean``: a :class:`CleanPool`; ``ulps``: see
    :func:`audit`)."""
    prefix = key_prefix(server)
    _wait_written(url)
    clean_out = clean.serve(requests, page_size)
    for i, (o, c) in enumerate(zip(outputs, clean_out)):
        if o is not None:
            assert list(o) == list(c), f"request {i}: the audited server's output differs from the clean server's"
    where: dict = {}
    keys = page_keys(prefix, sequences([ids for ids, _ in requests], clean_out), page_size, where)
    r = audit(url, clean.url(page_size), keys, kv_dtype(server), ulps)
    assert r["found"] > 0, r
    detail = [(where[k], len(requests[where[k][0]][0]) // page_size, r["diffs"].get(k)) for k in r["wrong"]]
    assert not r["wrong"], (f"{len(r['wrong'])} of {r['found']} pages in the pool differ from a clean run "
                            f"((request, page), prompt pages, (max |diff|, max |value|)): {detail[:12]}")
    assert not r["unverified"], f"the clean run lacks {len(r['unverified'])} pages: {r['unverified'][:3]}"
    assert r["found"] == r["objects"], f"the pool holds {r['objects']} objects, the test's pages are {r['found']}"
    return r


class CleanPool:
    """Reference pages: a server without faults or memory pressure, one per page size,
    writing to its own pool; each request is sent once, one at a time."""

    def __init__(self, farm, pools):
        self.farm, self.pools = farm, pools
        self.servers: dict[int, tuple] = {}
        self.done: dict[tuple, list] = {}

    def url(self, page_size: int) -> str:
        return self.servers[page_size][1]

    def _server(self, page_size: int):
        if page_size not in self.servers:
            url = self.pools.new()
            s = self.farm.start(page_size=page_size, max_total_tokens=65536, name=f"clean-p{page_size}",
                                kvdirect_config={"store": url, "allow_no_store": False})
            self.servers[page_size] = (s, url)
        return self.servers[page_size][0]

    def serve(self, requests, page_size: int) -> list:
        """Greedy outputs of ``requests`` ((ids, max_new_tokens) pairs), written to the clean pool."""
        s = self._server(page_size)
        outs = []
        for ids, n in requests:
            key = (page_size, np.asarray(ids, np.int64).tobytes(), int(n))
            if key not in self.done:
                self.done[key] = s.generate(ids, int(n))["output_ids"]
            outs.append(self.done[key])
        _wait_written(self.url(page_size))
        return outs


def _wait_written(url: str, quiet_s: float = 1.0, timeout: float = 120) -> None:
    """Wait until the pool's object count stopped growing (write-back is asynchronous)."""
    store = open_store(url)
    try:
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = int(store.stats()["objects"])
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.1)
    finally:
        store.close()
