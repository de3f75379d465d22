"""Start-up refusals in the real server: one clear line naming the problem, non-zero exit."""
from __future__ import annotations

import pytest

from test_shared_pool import kv_config

CASES = {
    "hierarchical-cache": (dict(args=["--enable-hierarchical-cache"]),
                           "--radix-cache-backend kvdirect does not support --enable-hierarchical-cache"),
    "unknown-option": (dict(kvdirect_config='{"store": null, "layer_wise": true}'), "layer_wise"),
    "malformed-store-url": (dict(kvdirect_config='{"store": "shm://", "allow_no_store": false}'), "shm://"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_at_start_up(farm, case):
    kw, words = CASES[case]
    kw.setdefault("kvdirect_config", kv_config(None))
    s = farm.start(wait=False, name=f"refuse-{case}", **kw)
    code = s.wait_exit(timeout=180)
    log = s.log_text()
    assert code != 0, f"server started although it should refuse ({case}):\n{s.log_tail()}"
    lines = [ln for ln in log.splitlines() if words in ln and ("kvdirect" in ln or "KVDIRECT" in ln)]
    assert lines, f"no line naming the problem ({words!r}) in the server log:\n{s.log_tail(40)}"
    assert max(len(ln) for ln in lines) < 400, lines
