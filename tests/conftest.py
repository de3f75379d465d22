import os
import sys
from pathlib import Path


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

