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
                                       wrong_objects_read=0, pins_left=0)}
    text = report.render(figs)
    assert "123,457 puts OK" in text and "all 8 pinned objects" in text
    assert "mooncake_master_sigkill: not run" in text  # a scenario without figures says so
