import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvd_testutil import DATA, ROOT, run_cli  # noqa: E402,F401  (helpers for test modules)

# hypothesis: CI profile runs more examples; every run is deterministic-seeded
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
except ImportError:  # hypothesis is in the [test] extra
    pass


# ----------------------------------------------------------------------------- @pytest.mark.mooncake
#
# Tests that need Mooncake's client. The package absent (pip extra not installed): skipped, with the
# install command. The package installed but not importable (most often a system library missing,
# libibverbs1 / librdmacm1 / libnuma1): the test FAILS with the library and the apt command. A broken
# install must not pass as a clean run; deselect deliberately with -m "not mooncake".

_client_imports: dict = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "mooncake: needs Mooncake's client (skipped when the package is absent, "
                                       "fails when it is installed but cannot load its system libraries)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("mooncake") is None:
        return
    from kvdirect.runtime import client_import

    ci = _client_imports.get("mooncake.store")
    if ci is None:
        ci = _client_imports["mooncake.store"] = client_import("mooncake.store")
    if ci.state == "not_installed":
        pytest.skip(ci.message)
    if ci.state != "ok":
        pytest.fail(f"{ci.message} (to run without Mooncake on purpose: -m 'not mooncake')", pytrace=False)
