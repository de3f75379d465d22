"""The device launch layer: streams, events, host buffers and page copies per device kind.

The ordered transfer path (:mod:`kvdirect.cache.transfer`) is written once
against :class:`~kvdirect.device.base.DeviceOps`; :func:`device_ops` picks the
launch layer for a layout's device:

* ``cpu``: the C++ copy engine (synchronous);
* ``cuda[:N]``: the CUDA kernels (``libkvdirect_cuda.so``) on torch CUDA
  streams, pinned host buffers; without the kernels, torch tensor ops;
* ``npu[:N]``: the Ascend C kernels (``libkvdirect_ascend.so``, loaded at run
  time when kvdirect was built with CANN) on torch_npu streams; without them,
  torch_npu tensor ops (:mod:`kvdirect.device.tensor_ops`);
* ``sim[:N]``: the simulated asynchronous device of the CPU suite
  (:mod:`kvdirect.device.sim`).

A device with no way to move pages is a configuration error raised here, at
cache construction, with one line naming the device and the fix.
"""
from __future__ import annotations

from kvdirect.device.base import DeviceOps, HostBuffer, layer_segments  # noqa: F401
from kvdirect.errors import BackendUnavailableError, ConfigError


def _split(device: str) -> tuple[str, int]:
    kind, _, idx = str(device).partition(":")
    try:
        return kind, int(idx or 0)
    except ValueError:
        raise ConfigError(f"bad device {device!r}: expected KIND or KIND:INDEX (cpu, cuda:0, npu:0)") from None


def device_ops(layout, *, store: str = "the pool") -> DeviceOps:
    """The launch layer for ``layout.device``; raises when pages there cannot be moved.

    ``store`` names the pool in the error (e.g. ``shm://``)."""
    kind, idx = _split(layout.device)
    dev = layout.device
    if kind == "cpu":
        from kvdirect.device.engine_ops import CpuOps

        return CpuOps(layout)
    if kind == "sim":
        from kvdirect.device.sim import SimOps

        return SimOps(idx, layout)
    if kind not in ("cuda", "npu"):
        raise ConfigError(f"no copy path for KV pages on {dev!r}: kvdirect moves pages on cpu, cuda and npu; "
                          "build the layout from the engine's KV tensors on one of those")
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError(f"the KV layout is on {dev} but torch is not importable, so pages cannot be "
                                      f"moved between {dev} and {store}: install torch for this device") from None
    if kind == "npu":
        try:
            import torch_npu  # noqa: F401  (registers torch.npu)
        except ImportError:
            raise BackendUnavailableError(
                f"the KV layout is on {dev} but torch_npu is not importable, so pages cannot be moved between {dev} "
                f"and {store}: install torch_npu (with the Ascend driver and CANN) on the NPU machine") from None
    mod = getattr(torch, kind)
    if not mod.is_available() or idx >= mod.device_count():
        raise BackendUnavailableError(f"the KV layout is on {dev} but torch sees {mod.device_count()} {kind} "
                                      f"device(s), so pages cannot be moved between {dev} and {store}: "
                                      f"run on the machine that holds {dev}")
    from kvdirect.copy import CopyEngine
    from kvdirect.device.engine_ops import CudaOps, NpuKernelOps
    from kvdirect.device.tensor_ops import TensorOps

    try:
        engine = CopyEngine(device=f"{kind}:{idx}")
    except BackendUnavailableError:  # kernels not built: torch tensor ops on the same streams
        return TensorOps(kind, idx, layout)
    return (CudaOps if kind == "cuda" else NpuKernelOps)(idx, layout, engine)
