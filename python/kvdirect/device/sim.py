"""A simulated asynchronous accelerator, so that stream ordering is tested on CPUs.

``SimDevice`` behaves like a GPU/NPU as far as ordering goes: work launched on a
stream runs later, after a delay, on that stream's own thread; streams run
independently of each other; events mark a point in a stream, ``wait_event``
makes a stream wait for another's event, ``synchronize`` blocks the host.
As in CUDA (and torch_npu), the *current* stream is per host thread: every
thread starts on the device's default stream, and ``with dev.stream(s):`` makes
``s`` current on the calling thread only. An engine that computes on its own
stream (SGLang's forward stream, vLLM's) makes it current on its forward
thread; an event recorded on any other thread lands on that thread's current
stream and orders nothing with respect to the engine's work. Its
"device memory" is ordinary host memory (numpy arrays from :meth:`SimDevice.empty`)
that only stream work should touch, so any missing synchronisation shows up as
stale bytes: a gather read before the compute stream wrote the pages, a host
buffer read before its gather ran, a buffer reused before its scatter ran, a page
counted as loaded before its bytes arrived.

A KV layout on it is built with ``KVLayout.from_addresses(..., device=dev.name)``
(``sim:N``); the cache's transfer path then launches through :class:`SimOps`.
Test support, like ``kvdirect.stores._testing``: never used by production code.
The environment variable ``KVDIRECT_SIM_SKIP_SYNC=1`` makes the transfer path
skip its waits on this device (see ``kvdirect.cache.transfer``) to prove that
the tests see the bug class.
"""
from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time

import numpy as np

from kvdirect.device.base import DeviceOps, HostBuffer, layer_segments

_devices: dict[int, "SimDevice"] = {}
_ids = itertools.count()
_lock = threading.Lock()


class SimEvent:
    def __init__(self):
        self._done = threading.Event()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self, timeout: float = 60.0) -> None:
        if not self._done.wait(timeout):
            raise TimeoutError("simulated device: event not reached within 60 s (a stream is stuck)")


class SimStream:
    """In-order queue of work executed by one thread, each launch after a delay."""

    def __init__(self, device: "SimDevice", name: str):
        self.device, self.name = device, name
        self._q: queue.Queue = queue.Queue()
        self._t = threading.Thread(target=self._loop, name=f"{device.name}-{name}", daemon=True)
        self._t.start()

    def _loop(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, delayed = item
            if delayed:
                time.sleep(self.device._delay())
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported to the test through the device
                self.device.errors.append(e)

    def launch(self, fn) -> None:
        """Run ``fn`` on this stream later (after the device's delay)."""
        self._q.put((fn, True))

    def record_event(self, event: SimEvent | None = None) -> SimEvent:
        ev = event or SimEvent()
        self._q.put((ev._done.set, False))
        return ev

    def wait_event(self, event: SimEvent) -> None:
        self._q.put((lambda: event.synchronize(), False))

    def synchronize(self) -> None:
        self.record_event().synchronize()

    def close(self) -> None:
        self._q.put(None)
        self._t.join(10)


class SimDevice:
    """A simulated accelerator ``sim:N`` (see the module docstring).

    ``delay_s``: mean delay before each launched copy/compute runs; ``jitter``:
    relative spread (seeded). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, delay_s: float = 0.01, jitter: float = 0.5, seed: int = 0):
        with _lock:
            self.index = next(_ids)
            _devices[self.index] = self
        self.name = f"sim:{self.index}"
        self.delay_s, self.jitter = float(delay_s), float(jitter)
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        self._memory: list = []
        self.errors: list = []
        self._streams = [SimStream(self, "default")]
        self._current = threading.local()  # the current stream of each host thread
        self.launched = 0

    def _delay(self) -> float:
        with self._rng_lock:
            u = self._rng.random()
        return max(0.0, self.delay_s * (1 + self.jitter * (2 * u - 1)))

    def empty(self, shape, dtype=np.float32) -> np.ndarray:
        """Device memory (zeroed); valid until the device is closed."""
        a = np.zeros(shape, dtype)
        self._memory.append(a)
        return a

    @property
    def default_stream(self) -> SimStream:
        return self._streams[0]

    def current_stream(self) -> SimStream:
        """The calling thread's current stream (the default stream unless the thread made
        another current with :meth:`stream`)."""
        return getattr(self._current, "stream", None) or self._streams[0]

    @contextlib.contextmanager
    def stream(self, stream: SimStream):
        """Make ``stream`` current on the calling thread (like ``torch.cuda.stream``)."""
        before = getattr(self._current, "stream", None)
        self._current.stream = stream
        try:
            yield stream
        finally:
            self._current.stream = before

    def new_stream(self, name: str = "transfer") -> SimStream:
        s = SimStream(self, f"{name}{len(self._streams)}")
        self._streams.append(s)
        return s

    def launch(self, fn, stream: SimStream | None = None) -> None:
        """Launch ``fn`` (a kernel: reads/writes device memory) on a stream (default: the
        calling thread's current stream)."""
        self.launched += 1
        (stream or self.current_stream()).launch(fn)

    def synchronize(self) -> None:
        """Wait for every stream (the test's own wait; never skipped)."""
        for s in list(self._streams):
            s.synchronize()
        if self.errors:
            raise RuntimeError(f"{self.name}: work launched on a stream failed: {self.errors[0]!r}")

    def close(self) -> None:
        self.synchronize()
        for s in self._streams:
            s.close()
        with _lock:
            _devices.pop(self.index, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def get_device(index: int) -> SimDevice:
    dev = _devices.get(index)
    if dev is None:
        from kvdirect.errors import ConfigError

        raise ConfigError(f"no simulated device sim:{index} in this process (create kvdirect.device.sim.SimDevice "
                          "before building a layout on it)")
    return dev


class SimOps(DeviceOps):
    """Launch layer of the simulated device: the CPU copy engine, run later on a sim stream."""

    kind = "sim"
    asynchronous = True
    host_addressable = True  # its memory is host memory: a store may address it directly

    def __init__(self, index: int, layout):
        super().__init__(f"sim:{index}", layout)
        self.sim = get_device(index)
        self._engines = threading.local()

    def _engine(self):
        e = getattr(self._engines, "e", None)
        if e is None:  # one engine per stream thread
            from kvdirect.copy import CopyEngine

            e = self._engines.e = CopyEngine(threads=1, device="cpu")
        return e

    def stream(self):
        return self.sim.new_stream()

    def compute_event(self):
        return self.sim.current_stream().record_event()

    def record(self, stream):
        return stream.record_event()

    def to_host(self, page_slots, host: HostBuffer, stream) -> None:
        sc = self.layout.plan(page_slots, per_token=False)
        n = len(page_slots) * self.layout.page_bytes
        self.sim.launch(lambda: self._engine().gather(sc, host.addr, n), stream)  # host kept alive by the closure

    def to_device(self, page_slots, host: HostBuffer, stream, layer=None) -> None:
        if layer is None:
            sc = self.layout.plan(page_slots, per_token=False)
            n = len(page_slots) * self.layout.page_bytes
            self.sim.launch(lambda: self._engine().scatter(sc, host.addr, n), stream)
        else:
            src, dst, sizes = layer_segments(self.layout, page_slots, host.addr, layer)
            self.sim.launch(lambda: self._engine().copy_segments(src, dst, sizes), stream)
