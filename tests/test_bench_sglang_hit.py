"""bench/bench_sglang_hit.py refuses bad arguments before it starts a store or imports SGLang."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_sglang_hit", Path(__file__).resolve().parent.parent / "bench" / "bench_sglang_hit.py")
bh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bh)


@pytest.mark.parametrize("argv", [["--rounds", "1"], ["--tokens", "127"], ["--reuse", "0"], ["--reuse", "1.5"],
                                  ["--rounds", "x"]])
def test_bad_arguments_are_refused_before_anything_starts(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bh.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
