"""TEST-ONLY fault injection for real SGLang servers (never part of kvdirect or its plugin).

Loaded by the tests that put this folder on a server's PYTHONPATH (Python imports
``sitecustomize`` at start-up in every process, the scheduler's too). With
``KVDIRECT_TEST_FAULT_CONTROL`` set to a file path, every store kvdirect opens in the
process is wrapped in ``kvdirect.stores._testing.FlakyStore`` (piecewise reads
included) that fails nothing until the test writes that file: its content
``get PIECE`` makes the next load fail every key from read piece ``PIECE`` on (0: at
once; 1: after layer 0 arrived and was used), scribbling over the slots as a broken
transport may; the file is consumed by that load (one shot).
"""
import os

_CONTROL = os.environ.get("KVDIRECT_TEST_FAULT_CONTROL")

if _CONTROL:
    import kvdirect.stores as _stores

    _real_open = _stores.open_store

    def _armed():
        try:
            with open(_CONTROL) as f:
                words = f.read().split()
            os.unlink(_CONTROL)
        except FileNotFoundError:
            return None
        return int(words[1]) if len(words) > 1 else 0

    def _open_store(url=_stores.DEFAULT_URL):
        from kvdirect.stores._testing import FlakyStore

        class OneShot(FlakyStore):
            def _arm(self):
                piece = _armed()
                self.fail_rate = 0.0 if piece is None else 1.0
                self.fail_from_piece = piece or 0

            def get(self, keys, scatter):
                self._arm()
                return super().get(keys, scatter)

            def _open_read(self, keys, object_sizes):
                self._arm()
                return super()._open_read(keys, object_sizes)

        return OneShot(_real_open(url), fail_ops=("get",), piecewise=True)

    _stores.open_store = _open_store
