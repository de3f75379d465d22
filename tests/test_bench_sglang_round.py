"""bench/bench_sglang_round.py refuses bad counts before it starts a store or imports SGLang."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_sglang_round", Path(__file__).resolve().parent.parent / "bench" / "bench_sglang_round.py")
br = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(br)


@pytest.mark.parametrize("argv", [["--requests", "0"], ["--rounds", "0"], ["--tokens", "63"], ["--heads", "0"],
                                  ["--store", "nope"]])
def test_bad_arguments_are_refused_before_anything_starts(argv, capsys):
    with pytest.raises(SystemExit) as e:
        br.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
