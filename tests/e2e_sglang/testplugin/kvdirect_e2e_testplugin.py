"""TEST-ONLY SGLang plugin of kvdirect's real-server tests: never part of kvdirect's plugin.

What it is: an SGLang general plugin (entry point ``sglang.srt.plugins``, declared by the
``kvdirect_e2e_testplugin-0.0.0.dist-info`` folder next to this file) that SGLang loads
in its launcher and scheduler processes when the test puts this folder on the server's
``PYTHONPATH``. Each part below does nothing unless its environment variable is set, so a
server started without them runs SGLang unchanged.

``KVDIRECT_TEST_MLA_TORCH_NATIVE=1`` -- an MLA dispatch for the ``torch_native`` attention
    backend. SGLang 0.5.23 registers no DeepSeek attention handler for ``torch_native``
    (``models/deepseek_common/attention_backend_handler.py``), so a DeepSeek model falls
    back to the ``triton`` handler, which sends a prefill without a cached prefix down the
    plain multi-head path; ``torch_native`` reads the compressed latent KV buffer and the
    first such prefill fails (``Expected size ... [4, 48] but got: [4, 80]``). The handler
    registered here always takes SGLang's own absorbed MLA path
    (``_dispatch_mla_subtype``), which ``torch_native`` runs. SGLang's model, KV pool and
    attention code are unchanged; only the choice of SGLang's forward method is made here.

``KVDIRECT_TEST_PD_CPU=1`` -- SGLang's PD prefill sender on a CPU torch. With the Mooncake
    transfer backend, ``prefill.py`` copies a chunk's page indices into pinned host memory
    (``pin_memory=True``) and records a ``torch.cuda.Event`` when the sender says it
    accepts host index tensors (``MooncakeKVSender.supports_host_tensor_indices``); a CPU
    torch has neither. Setting that flag to False makes SGLang take its own other branch
    (``kv_to_page_indices`` on the scheduler thread). The KV bytes still move through
    SGLang's Mooncake transfer engine (``MOONCAKE_PROTOCOL=tcp``).

``KVDIRECT_TEST_PUT_LOG=PATH`` -- a record of every ``put`` the kvdirect shm store makes:
    one line per call, ``PID KEY...``, appended to PATH. The TP tests count puts per
    scheduler process (= per TP rank) from it. It wraps the store method and changes
    nothing it does.
"""
from __future__ import annotations

import os


def _mla_torch_native() -> None:
    from sglang.srt.models.deepseek_common.attention_backend_handler import (
        AttentionBackendRegistry,
        _dispatch_mla_subtype,
    )

    def handle_attention_torch_native(attn, forward_batch):
        return _dispatch_mla_subtype(attn, forward_batch)

    AttentionBackendRegistry.register("torch_native", handle_attention_torch_native)


def _pd_cpu() -> None:
    from sglang.srt.disaggregation.mooncake.conn import MooncakeKVSender

    MooncakeKVSender.supports_host_tensor_indices = False


def _put_log(path: str) -> None:
    from kvdirect.stores.shm import ShmStore

    if getattr(ShmStore.put, "_kvdirect_test_logged", False):
        return
    real = ShmStore.put

    def put(self, keys, scatter):
        keys = list(keys)
        with open(path, "a") as f:  # one write per call: lines from several processes never mix
            f.write(f"{os.getpid()} {' '.join(keys)}\n")
        return real(self, keys, scatter)

    put._kvdirect_test_logged = True
    ShmStore.put = put


def register() -> None:
    if os.environ.get("KVDIRECT_TEST_MLA_TORCH_NATIVE") == "1":
        _mla_torch_native()
    if os.environ.get("KVDIRECT_TEST_PD_CPU") == "1":
        _pd_cpu()
    if os.environ.get("KVDIRECT_TEST_PUT_LOG"):
        _put_log(os.environ["KVDIRECT_TEST_PUT_LOG"])
