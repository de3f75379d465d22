"""docs/reliability.md is written by scripts/reliability_report.py from a run of this suite:
check that it still describes the suite as it is (case tables, scenarios, cited tests)."""
from __future__ import annotations

import re
import sys

from kvd_testutil import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import reliability_report as report  # noqa: E402

DOC = (ROOT / "docs" / "reliability.md").read_text()


def test_doc_is_what_the_script_renders_from_the_stored_run():
    """Figures from the stored run, case tables from the suite as it is now: any drift fails."""
    assert report.bad_input_section() in DOC, \
        "the bad-input tables changed: rerun `python scripts/reliability_report.py --render`"
    assert report.render(report.load_figures(report.FIGURES)) == DOC, \
        "docs/reliability.md was edited by hand or the template changed: rerun the script"


def test_every_reported_scenario_is_rendered_from_a_run():
    reported = set()
    for f in (ROOT / "tests" / "reliability").glob("test_*.py"):
        src = f.read_text()
        reported |= set(re.findall(r'\breport\(\s*"(\w+)"', src))
        modes = re.findall(r'parametrize\("mode", \[([^\]]*)\]', src)
        for stem in re.findall(r'\breport\(\s*f"(\w+)\{mode\}"', src):
            reported |= {stem + m for m in re.findall(r'"(\w+)"', modes[0])}
    assert reported and reported <= set(report.SCENARIOS), sorted(reported - set(report.SCENARIOS))
    assert "not run (skipped" not in DOC and "no pytest summary" not in DOC
    run = report.load_figures(report.FIGURES)["_run"]
    assert re.fullmatch(r"\d+ passed(, \d+ skipped)?", run["summary"]), run["summary"]  # nothing failed
    assert "written by\n`python scripts/reliability_report.py`" in DOC


def test_cited_tests_exist():
    cited = set(re.findall(r"(test_\w+\.py)::(test_\w+)", DOC))
    assert cited
    for fname, test in cited:
        files = list((ROOT / "tests").rglob(fname))
        assert files and any(f"def {test}(" in f.read_text() for f in files), f"{fname}::{test}"


def test_render_uses_every_figure_it_is_given():
    figs = {"shm_full_with_pins": dict(pinned_objects=8, puts_ok=123457, puts_no_space=0, evictions=99,
                                       wrong_objects_read=0, pins_left=0, data_lost=3, objects_checked=4321)}
    text = report.render(figs)
    assert "123,457 puts OK" in text and "all 8 pinned objects" in text and "3 of 4,321 objects" in text
    assert "mooncake_master_sigkill: not run" in text  # a scenario without figures says so


def test_doc_names_the_commit_it_was_measured_at():
    run = report.load_figures(report.FIGURES)["_run"]
    assert re.fullmatch(r"`[0-9a-f]{12}`( \+ uncommitted changes)?", run["commit"]), run.get("commit")
    assert f"at commit {run['commit']}." in DOC


def test_doc_claims_hold_when_recomputed():
    """Not only a re-render: run a scenario now and check the doc's invariant figures against it
    (the shm pool filled 3x over under pins: wrong objects read, data lost, pinned objects, pins left)."""
    sys.path.insert(0, str(ROOT / "tests" / "reliability"))
    from test_faults import pool_full_scenario

    stored = report.load_figures(report.FIGURES)["shm_full_with_pins"]
    now = pool_full_scenario()
    for k in ("wrong_objects_read", "data_lost", "pinned_objects", "pins_left"):
        assert now[k] == stored[k], (k, now[k], stored[k])
    assert now["objects_checked"] > 0 and now["evictions"] > 0
    row = report.FAULTS["shm_full_with_pins"](stored)
    assert f"{stored['data_lost']} of {stored['objects_checked']:,} objects" in row and "| " + " | ".join(
        str(c) for c in row) + " |" in DOC
