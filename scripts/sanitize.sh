#!/usr/bin/env bash
# Build the C++ core with AddressSanitizer + UndefinedBehaviorSanitizer into its own build
# dir and run a subset of the test suite against it (the shm pool and its audit, keys, layout/copy, index,
# cache manager and its transfer path on the simulated device, and the reliability suite's
# concurrency / fault / fuzz tests).
#
#   scripts/sanitize.sh                  # default subset
#   scripts/sanitize.sh tests/test_x.py  # or any pytest arguments
#   KVDIRECT_SANITIZE=thread scripts/sanitize.sh   # ThreadSanitizer instead (slower)
#
# Needs: a C++ compiler with the sanitizer runtimes (gcc: libasan/libubsan) and the Python
# test dependencies (run it after the README's install command); cmake and pybind11 are
# pip-installed when missing. The normal install is left untouched: the sanitized
# module is staged under build/sanitize/site and put first on PYTHONPATH; a sitecustomize
# there drops an editable install's import hook so every Python process (also children)
# imports the sanitized kvdirect._core. Exits non-zero on any test failure or sanitizer report.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SAN=${KVDIRECT_SANITIZE:-address,undefined}
B=${KVDIRECT_SANITIZE_BUILD:-$ROOT/build/sanitize}
PY=${PYTHON:-python3}
JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

# build tools: the README install builds in an isolated environment, so they may be missing here
command -v cmake >/dev/null || "$PY" -m pip install -q "cmake>=3.18" ninja
"$PY" -m pybind11 --cmakedir >/dev/null 2>&1 || "$PY" -m pip install -q "pybind11>=2.12"
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
echo "== configure + build the core with -fsanitize=$SAN in $B"
cmake -S "$ROOT" -B "$B/cmake" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DKVDIRECT_SANITIZE="$SAN" -DKVDIRECT_CUDA=OFF -DKVDIRECT_ASCEND=OFF -DKVDIRECT_BUILD_BENCH=OFF \
  -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >"$B.cmake.log" 2>&1 \
  || { cat "$B.cmake.log"; exit 1; }
cmake --build "$B/cmake" --target _core -j "$JOBS" >"$B.build.log" 2>&1 || { tail -50 "$B.build.log"; exit 1; }

echo "== stage the package with the sanitized module"
rm -rf "$B/site" && mkdir -p "$B/site"
cp -r "$ROOT/python/kvdirect" "$B/site/kvdirect"
find "$B/site/kvdirect" -name '_core*.so' -delete
cp "$B"/cmake/_core*.so "$B/site/kvdirect/"
cat >"$B/site/sitecustomize.py" <<'PYEOF'
# Staged by scripts/sanitize.sh: make `import kvdirect` find this directory, not an editable install.
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable_skbc_kvdirect")]
PYEOF

case "$SAN" in
  *thread*) RT=libtsan.so ;;
  *address*) RT=libasan.so ;;
  *) RT="" ;;
esac
PRELOAD=""
if [ -n "$RT" ]; then
  PRELOAD=$(${CXX:-g++} -print-file-name="$RT")
  [ -e "$PRELOAD" ] || { echo "sanitizer runtime $RT not found (install gcc's libasan/libtsan)" >&2; exit 1; }
  # libstdc++ must be loaded at startup too: the interpreter does not link it, and the ASan
  # runtime resolves its __cxa_throw interceptor only against libraries present at startup
  PRELOAD="$PRELOAD $(${CXX:-g++} -print-file-name=libstdc++.so)"
fi
if [ $# -eq 0 ]; then
  set -- tests/test_stores_shm.py tests/test_audit.py tests/test_keys.py tests/test_layout.py tests/test_copy.py \
    tests/test_index.py tests/test_cache.py tests/test_cache_transfer.py \
    "tests/test_simdevice.py::test_write_back_waits_for_the_compute_stream_and_the_gather[shm-staged]" \
    "tests/test_simdevice.py::test_loaded_pages_hold_every_byte_when_load_returns[shm-staged]" \
    "tests/test_simdevice.py::test_layerwise_load_layer_holds_every_byte_when_reported[shm-staged]" \
    tests/reliability/test_concurrency.py tests/reliability/test_fuzz.py tests/reliability/test_bad_input.py \
    tests/reliability/test_security.py \
    "tests/reliability/test_faults.py::test_shm_sigkill_at_random_points_many_times" \
    "tests/reliability/test_faults.py::test_pool_full_while_readers_hold_pins" \
    "tests/reliability/test_faults.py::test_flaky_store_pages_are_misses_never_used"
fi

export PYTHONPATH="$B/site${PYTHONPATH:+:$PYTHONPATH}"
export LD_PRELOAD="$PRELOAD"
# leaks: the interpreter's own allocations swamp the report; UB: stop at the first report.
# Reports go to files (pytest captures stderr, and an aborting process loses what it captured).
REPORTS="$B/reports"
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:allow_user_segv_handler=1:log_path=$REPORTS/asan}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:log_path=$REPORTS/ubsan}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:log_path=$REPORTS/tsan}
core=$("$PY" -c "import kvdirect._core as c; print(c.__file__)")
case "$core" in "$B/site/"*) ;; *) echo "wrong kvdirect._core picked up: $core" >&2; exit 1 ;; esac
echo "== pytest under $SAN ($core, LD_PRELOAD=$PRELOAD)"
rc=0
"$PY" -m pytest -q -p no:cacheprovider "$@" || rc=$?
if compgen -G "$REPORTS/*" >/dev/null; then
  echo "== sanitizer reports ($REPORTS):" >&2
  head -c 20000 "$REPORTS"/* >&2
  [ $rc -ne 0 ] || rc=1
else
  echo "== no sanitizer reports"
fi
exit $rc
