"""The examples in examples/ run as documented (docs/engines.md walks through them)."""
import json
import os
import subprocess
import sys

import pytest

from kvd_testutil import ROOT

pytest.importorskip("torch", reason="the examples need the [demo] extra (torch)")
pytest.importorskip("transformers", reason="the examples need the [demo] extra (transformers)")


def test_hf_paged_engine_two_processes_share_a_pool(tmp_path):
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_paged_engine.py"), "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["A"]["stored_pages"] == 3 * (200 // 16)  # every full page of A's documents reached the pool
    for req in res["B"]["requests"]:
        # B's prompts share 160 tokens (10 pages) with A's documents: all of them came from the pool
        assert req["cached"] == 160 and req["loaded"] == 160
        assert req["identical"] and req["max_logit_diff"] <= 1e-4
    assert res["B"]["stats"]["loaded_pages"] == 30
    assert res["identical"] is True
    assert not os.path.exists(f"/dev/shm/kvdirect-{res['pool']}")  # the example's pool is gone
