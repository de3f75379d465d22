"""The simdevice tests see a missing synchronisation: with ``KVDIRECT_SIM_SKIP_SYNC=1``
the transfer path skips its waits on the simulated device and ``pytest -m simdevice``
must fail -- every test whose bytes depend on a wait, with stale bytes (not a crash).
Without the variable the same tests pass: they run, unmarked by anything else, in the
suite itself (tests/test_simdevice.py)."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

from kvd_testutil import ROOT

# direct-path loads: the store writes the pages synchronously, no device wait is involved
NEEDS_NO_WAIT = ("test_loaded_pages_hold_every_byte_when_load_returns", "test_layerwise_load_layer_holds_every_byte")


def test_simdevice_tests_fail_when_the_transfer_path_skips_its_waits(tmp_path):
    report = tmp_path / "simdevice.xml"
    env = dict(os.environ, KVDIRECT_SIM_SKIP_SYNC="1")
    env.pop("PYTEST_ADDOPTS", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "simdevice", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={report}", "tests/test_simdevice.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 1, f"pytest -m simdevice must fail with KVDIRECT_SIM_SKIP_SYNC=1:\n{r.stdout[-4000:]}"
    cases = {}
    for tc in ET.parse(report).getroot().iter("testcase"):
        outcome = ("failed" if tc.find("failure") is not None else "error" if tc.find("error") is not None
                   else "skipped" if tc.find("skipped") is not None else "passed")
        msg = tc.find("failure").get("message", "") if outcome == "failed" else ""
        cases[tc.get("name")] = (outcome, msg)
    ran = {n: v for n, v in cases.items() if v[0] != "skipped"}
    assert len(ran) >= 20, f"too few simdevice tests ran: {sorted(cases)}"
    assert not [n for n, v in ran.items() if v[0] == "error"], r.stdout[-4000:]
    must_fail = {n for n in ran if not (n.startswith(NEEDS_NO_WAIT) and n.endswith("-direct]"))}
    passed = {n for n, v in ran.items() if v[0] == "passed"}
    assert not must_fail & passed, f"passed although the transfer path skipped its waits: {sorted(must_fail & passed)}"
    stale = [n for n in must_fail if "not equal" in ran[n][1]]
    assert len(stale) == len(must_fail), {n: ran[n][1][:200] for n in must_fail if n not in stale}
