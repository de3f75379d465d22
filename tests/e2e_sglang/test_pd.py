"""Prefill/decode disaggregation with decode-node offload, in real SGLang servers.

Two prefill servers (``--disaggregation-mode prefill``) and one decode server
(``--disaggregation-mode decode --disaggregation-decode-enable-radix-cache``), all with
``--radix-cache-backend kvdirect`` on one shm pool; SGLang's own load balancer
(``sglang_router.launch_router --pd-disaggregation --mini-lb``) pairs a prefill with the
decode server, and SGLang's Mooncake transfer backend moves the prompt's KV from prefill
to decode over TCP. The decode node writes prompt + generated pages to the pool when a
request finishes (the reference design's "KV cache offload for decode node"), so the next
turn of a conversation, sent through a second prefill server, finds the pages of the
previous turn's generated tokens in the pool. Every turn's tokens equal a plain server
(``--disable-radix-cache``, no disaggregation) running the same conversation.

The servers load the TEST-ONLY plugin ``testplugin/`` with ``KVDIRECT_TEST_PD_CPU=1``:
SGLang's prefill sender uses pinned memory and a CUDA event, which a CPU torch lacks (see
the plugin's docstring). The decode servers use ``--disaggregation-decode-retraction-backup
cpu_tensor`` (SGLang's other choice, ``host_pool``, allocates CUDA-registered host memory).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import wait_pool_objects
from kvdirect.demo.sglang_cpu import client
from kvdirect.demo.sglang_cpu.server import free_port
from test_multiturn import ANSWER, FOLLOW_UP, PAGE, PROMPT, user
from test_shared_pool import kv_config

PD_ENV = {"KVDIRECT_TEST_PD_CPU": "1", "MOONCAKE_PROTOCOL": "tcp", "MOONCAKE_DEVICE": ""}


def prefill(url: str, name: str) -> dict:
    port = free_port()
    return dict(kvdirect_config=kv_config(url), name=name, testplugin=True, env=PD_ENV, bootstrap_port=port,
                args=["--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "mooncake",
                      "--disaggregation-bootstrap-port", str(port), "--log-level", "info"])


def decode(url: str, name: str) -> dict:
    return dict(kvdirect_config=kv_config(url), name=name, testplugin=True, env=PD_ENV,
                args=["--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "mooncake",
                      "--disaggregation-decode-enable-radix-cache",
                      "--disaggregation-decode-retraction-backup", "cpu_tensor"])


class Router:
    """SGLang's PD load balancer (sglang_router, ``--mini-lb``) for one prefill + one decode."""

    def __init__(self, prefill_server, bootstrap_port: int, decode_server, log_dir):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(log_dir, f"router-{self.port}.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--mini-lb",
             "--prefill", prefill_server.url, str(bootstrap_port), "--decode", decode_server.url,
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the router exited: {open(self.log.name).read()[-2000:]}"
            try:
                if client.get(self.url, "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the router did not start: {open(self.log.name).read()[-2000:]}")

    def generate(self, ids, n: int) -> dict:
        return client.generate(self.url, ids, n)

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def prefill_cached_tokens(server) -> list[int]:
    """``#cached-token`` of every prefill batch a prefill server logged (``--log-level info``),
    leaving out SGLang's one-token health-check requests."""
    batches = re.findall(r"Prefill batch.*?#new-token: (\d+), #cached-token: (\d+)", server.log_text())
    return [int(c) for n, c in batches if int(n) + int(c) > 1]


@pytest.fixture
def routers():
    made = []
    yield made
    for r in made:
        r.stop()


def test_pd_decode_node_offload_next_turn_hits_generated_pages(farm, pools, workdir, routers):
    url = pools.new()
    specs = [prefill(url, "pd-P1"), prefill(url, "pd-P2")]
    ports = [s.pop("bootstrap_port") for s in specs]
    p1, p2, d, plain = farm.start_all([*specs, decode(url, "pd-D"), dict(radix="none", name="pd-plain")])
    r1 = Router(p1, ports[0], d, str(workdir))
    routers.append(r1)
    r2 = Router(p2, ports[1], d, str(workdir))
    routers.append(r2)

    # the conversation: turn 1 through P1 + D, turn 2 through P2 + D, turn 3 through P1 + D
    history = np.empty(0, np.int64)
    turns = []
    for t, route in enumerate([r1, r2, r1]):
        prompt = np.concatenate([history, user(t, PROMPT if t == 0 else FOLLOW_UP)])
        want = plain.generate(prompt, ANSWER)["output_ids"]
        got = route.generate(prompt, ANSWER)
        assert got["output_ids"] == want, f"turn {t + 1} through PD differs from a plain server"
        history = np.concatenate([prompt, np.asarray(want, np.int64)])
        turns.append(prompt)
        # the decode node writes prompt + generated pages (the last generated token has no KV)
        pages = (len(history) - 1) // PAGE
        assert wait_pool_objects(url, pages) >= pages, \
            f"turn {t + 1}: the decode node's pages did not reach the pool\n{d.log_tail(30)}"

    # turn 2's prefill (P2, which never saw turn 1) found turn 1's prompt AND generated pages:
    # at least every whole page the decode node computed (prompt + all but the last generated
    # token; with SGLang's overlap scheduler the last one may have been computed too)
    def check(cached: int, prev_turn_len: int, prompt_len: int, what: str):
        kv = (prev_turn_len + ANSWER - 1) // PAGE * PAGE
        assert kv <= cached <= prompt_len - 1 and cached % PAGE == 0, (what, cached, kv)
        assert cached > prev_turn_len, f"{what}: the previous turn's generated tokens were not reused"

    c2 = prefill_cached_tokens(p2)
    assert len(c2) == 1, c2
    check(c2[0], PROMPT, len(turns[1]), "turn 2 on P2")
    # turn 3's prefill (P1) reuses turn 2's pages, which only the decode node computed
    c1 = prefill_cached_tokens(p1)
    assert len(c1) == 2 and c1[0] == 0, c1
    check(c1[1], len(turns[1]), len(turns[2]), "turn 3 on P1")
