"""bench/bench_sglang_serving.py refuses bad arguments before it builds a model or starts a server."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_sglang_serving", Path(__file__).resolve().parent.parent / "bench" / "bench_sglang_serving.py")
bs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bs)


@pytest.mark.parametrize("argv, says", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--concurrency", "0"], "--concurrency must be >= 1"),
    (["--groups", "-1"], "--groups must be >= 1"),
    (["--modes", "kvdirect,bogus"], "unknown ['bogus']"),
    (["--modes", ","], "none given"),
    (["--repeats", "x"], "invalid int value"),
])
def test_bad_arguments_are_refused_before_anything_starts(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        bs.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err, err
