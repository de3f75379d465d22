"""KVDirectCache: one prefix match, one copy, asynchronous write-back.

Ties the C++ ``PrefixIndex``, a ``KVLayout`` (where pages sit in device
memory), a ``Store`` (the L3 pool) and the engine's slot allocator together.

Load path (prefill batch creation)::

    m = cache.match(tokens, ns)          # one index match + at most one batched exists query
    cache.lock(m.node)
    slots = allocator.alloc(m.pool_len)  # device slots for the pool pages
    loaded = cache.load(m, slots)        # pool -> those slots directly; unused slots freed
    ... prefill tokens[m.device_len:] ...

Write-back (request finished, chunk done, decode offload)::

    already = cache.write_back(tokens, slots, ns)  # caller frees slots[cached:already]
    cache.unlock(m.node)
    cache.poll()                         # every scheduler step: applies completions

Threads: one scheduler thread calls everything; put jobs run on writer
threads and only enqueue their results; ``poll`` applies them to the index on
the scheduler thread, so the index sees a single writer.

Never wrong KV: a page is loaded only when its whole get succeeded (per-key
status OK); loading stops at the first failed page; a page counts as stored in
the pool only after its put returned OK; pages being written are pinned in the
index (WRITING) so eviction cannot hand their slots to another request.

A store call is never abandoned while it may still write into device slots:
timeouts are enforced by the store adapters themselves, which return a
per-key TIMEOUT status; slots and staging buffers such a call may still touch
are held until the store is quiet.

Device work is ordered explicitly (``transfer``): the store or the gather waits
for the compute event recorded when the engine called ``load``,
``load_layerwise`` or ``write_back`` (on the calling thread's current stream,
and on ``forward_stream`` when the engine forwards on a stream that is not
current there); a scatter has completed before its staging buffer is reused and
before its pages count as loaded.

Modules (each path is its own unit; ``KVDirectCache`` coordinates them):

* ``manager``: :class:`KVDirectCache`, the coordinator engines call;
* ``match``: :class:`CacheMatch` and the match (index + one existence query);
* ``load``: load and :class:`LayerwiseLoad` (pool -> device slots, index update);
* ``writeback``: write jobs, writer threads, completions, back-pressure;
* ``transfer``: the ordered transfer path between device pages and the store, the
  same for every device (the launch layer is ``kvdirect.device``); ``staging``:
  its host buffers (pinned where the device needs it, retired after a timeout);
* ``indexing``: page digests and pool keys, index marks, node locks;
* ``health``, ``quarantine``, ``stats``: store back-off, what a timed-out call
  may still touch, counters; ``inputs``: token/slot arrays; ``tp``: TP agreement.
"""
from kvdirect.cache.indexing import IN_POOL, UNKNOWN, WRITING
from kvdirect.cache.load import LayerwiseLoad
from kvdirect.cache.manager import KVDirectCache
from kvdirect.cache.match import CacheMatch
from kvdirect.cache.tp import torch_dist_min
from kvdirect.cache.transfer import first_failure

__all__ = ["KVDirectCache", "CacheMatch", "LayerwiseLoad", "IN_POOL", "UNKNOWN", "WRITING",
           "torch_dist_min", "first_failure"]
