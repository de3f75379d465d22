"""Layer-wise loading inside SGLang: the KV pool waits for layer ``l`` before reading it.

SGLang 0.5.23's device KV pools call ``layer_transfer_counter.wait_until(l)``
in ``get_key_buffer`` / ``get_value_buffer`` whenever a counter is registered
with ``register_layer_transfer_counter`` (HiCache registers its own). With
``"layerwise": true``, :class:`LayerLoads` is that counter: ``init_load_back``
starts :meth:`KVDirectCache.load_layerwise` and returns at once, and the next
forward pass reads layer ``l`` of the loaded pages as soon as that layer has
arrived, while later layers are still being read from the pool.

Ordering. Every load started before a forward pass belongs to a batch that is
forwarded no later than it (loads start while a batch is built; the batch is
forwarded next), so ``wait_until(l)`` waits for layer ``l`` of every pending
load. At the last layer the loads are finished (checksums verified, pages
inserted into the index) before that layer is read, so no load outlives the
forward pass that consumes it. Loads of several requests admitted in one round
stay in flight together: a match or load-back settles only the pending loads
that bring pages it shares (so it finds them on device, not in the pool); the
hooks that insert into the index or reset it (insert, checkpoint, reset) settle
them all. An eviction settles none: pages in flight are not in the index until
their load finishes, so it cannot take them, and SGLang evicts while it builds
every batch once the device pool is full (waiting there made loads synchronous).

Failures. A load promises tokens only after the store pinned every page (a
read session opened, before any byte moves; stores without ranged reads: every
page read whole), so the scheduler thread waits for one metadata round trip, not
for layer 0's bytes (it opens the session itself: a hand-off to the reader thread
and back costs up to a CPU time slice each way on a busy host); pages missing then make ``init_load_back`` report no
load-back and the request recomputes, as with synchronous loads. A page that
fails after that (a ranged read that fails, a checksum mismatch found when the
whole object has been read) is never cached, and the request that was promised
it is aborted with a retryable error before its output is sent: its forward
pass has already read the bad bytes, so no output of it may be served.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("kvdirect.sglang")

ABORT_MESSAGE = ("kvdirect: a KV page failed verification while it was being loaded layer by layer; "
                 "the request was stopped before any output of it was sent. Retry it (the page is "
                 "not cached; the retry recomputes it)")


@dataclass
class PendingLoad:
    load: object             # kvdirect.cache.LayerwiseLoad
    promised: int            # tokens init_load_back reported
    req: object              # the SGLang request
    node: object             # the Node handed to the scheduler (moved onto the index when done)
    done: bool = False
    loaded: int = 0
    on_done: list = field(default_factory=list)


class LayerLoads:
    """SGLang's ``layer_transfer_counter`` for kvdirect's layer-wise loads."""

    def __init__(self, num_layers: int, finish):
        self.num_layers = int(num_layers)
        self.pending: list[PendingLoad] = []
        self._finish = finish           # callback(PendingLoad) applied on the scheduler thread
        # SGLang reads these in a few code paths (Mamba pools, speculative decoding);
        # kvdirect refuses those setups, the attributes keep their reads harmless.
        self.consumer_index = -1
        self.producer_index = -1
        self.waits = 0                  # layer waits that found a load still in flight
        self.started = 0                # layer-wise loads started

    # ---- the counter interface SGLang calls ----------------------------------
    def wait_until(self, layer: int) -> None:
        if not self.pending:
            return
        for p in self.pending:
            try:
                p.load.wait_layer(layer, timeout=0)
            except TimeoutError:  # the layer is still arriving: the forward pass waits for it
                self.waits += 1
                p.load.wait_layer(layer)
        if layer >= self.num_layers - 1:
            self.settle()

    def set_consumer(self, index: int) -> None:  # HiCache's batch index: not used here
        pass

    def update_producer(self) -> int:
        return -1

    def reset(self) -> None:
        self.settle()

    # ---- kvdirect side -----------------------------------------------------------
    def add(self, p: PendingLoad) -> None:
        self.pending.append(p)

    def settle(self, which=None) -> None:
        """Finish the pending loads ``which(p)`` selects, every one by default (joins its
        reader, updates the index); the others stay in flight."""
        chosen, keep = [], []
        for p in self.pending:
            (chosen if which is None or which(p) else keep).append(p)
        self.pending = keep
        for p in chosen:
            if not p.done:
                self._finish(p)
                p.done = True
