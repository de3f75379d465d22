#!/usr/bin/env bash
# The SGLang engine environment: one virtual environment in which a real SGLang
# 0.5.23 server runs on a CPU-only machine, with this checkout installed into it.
# tests/test_sglang_plugin.py (SGLang's cache classes, tests/sglang/, and the
# real-server suite, tests/e2e_sglang/), `kvdirect demo --engine sglang` and
# .ci/run all use it through this script.
#
#   usage: scripts/sglang-env.sh [DIR]
#     DIR defaults to $KVDIRECT_SGLANG_VENV, else ~/.cache/kvdirect/sglang-venv.
#
# First run: about 6 GB on disk (PyPI's torch 2.14.1, which SGLang 0.5.23 pins,
# brings its CUDA libraries although nothing here uses them) and 4-8 minutes on
# 2 cores. Later runs reuse it: the recipe is redone only when this script
# changed, kvdirect is reinstalled only when the checkout changed. A build that
# did not finish is started again from scratch. Any failure exits non-zero with
# the reason (the tests report it as a failure, never as a skip).
#
# Why each piece:
# - sglang is installed --no-deps: its full dependency set pulls GPU kernel
#   packages that cannot be used here; the modules below are what the server
#   imports on CPU (jsonschema: the OpenAI chat entry point; xgrammar: function
#   call detection, even with --grammar-backend none; soundfile: a model config;
#   einops: expert-distribution recording).
# - SGLang also imports a few CPU ops from `sgl_kernel`, whose CPU build is not on
#   PyPI: the tests and the demo put an import-only stand-in on PYTHONPATH
#   (tests/e2e_sglang/standin/), not this environment.
# - mooncake-transfer-engine-non-cuda: kvdirect's mooncake:// store and SGLang
#   HiCache's L3 Mooncake backend (the demo's baseline).
# - datasets: imported by SGLang's load generator (`python -m sglang.bench_serving`,
#   bench/bench_sglang_serving.py), whatever the dataset.
# - sglang-router (SGLang's load balancer, `--pd-disaggregation --mini-lb`) and
#   prometheus_client (imported by SGLang's Mooncake PD transfer backend): the
#   prefill/decode disaggregation test (tests/e2e_sglang/test_pd.py).
# - kvdirect is installed non-editable (a wheel built from the checkout), so no
#   editable import hook shadows another kvdirect put on PYTHONPATH.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-${KVDIRECT_SGLANG_VENV:-$HOME/.cache/kvdirect/sglang-venv}}
python=${KVDIRECT_SGLANG_PYTHON:-python3}
t0=$(date +%s)
say() { echo "sglang-env: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }

# The recipe. Its digest is kept in the environment: change a line, and the next
# run installs again over the existing environment.
recipe=(
  "torch==2.14.1 torchvision==0.29.1 numpy"
  "--no-deps sglang==0.5.23"
  "orjson psutil pyzmq requests packaging pydantic msgspec xxhash setproctitle pybase64 triton
   zstandard pillow starlette tqdm IPython aiohttp transformers==5.19.0 dill apache-tvm-ffi==0.1.11
   sentencepiece compressed-tensors==0.18.0 gguf openai==2.8.0 partial_json_parser"
  "fastapi uvicorn uvloop python-multipart jsonschema xgrammar==0.2.7 soundfile==0.13.1 einops python-dateutil<3"
  "mooncake-transfer-engine-non-cuda==0.3.13.post1"
  "datasets==5.2.0"
  "sglang-router==0.3.2 prometheus_client"
  "pytest scikit-build-core>=0.10 pybind11>=2.12 cmake ninja"
)
recipe_digest=$(printf '%s\n' "$python" "${recipe[@]}" | sha256sum | cut -c1-16)
building="$dir/.kvdirect-building"
stamp="$dir/.kvdirect-recipe"
py="$dir/bin/python"

if [ -e "$building" ]; then
  say "an earlier build of $dir did not finish: removing it"
  rm -rf "$dir"
fi

if [ ! -x "$py" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$recipe_digest" ]; then
  if [ -x "$py" ]; then
    say "updating the SGLang environment $dir (the recipe changed)"
  else
    say "building the SGLang 0.5.23 environment in $dir: about 6 GB on disk, 4-8 minutes on 2 cores;"
    say "built once and reused by later runs (set KVDIRECT_SGLANG_VENV to put it elsewhere)"
    mkdir -p "$dir"
    touch "$building"
    "$python" -m venv --clear "$dir" || die "cannot create a venv with $python at $dir"
    touch "$building"  # --clear emptied the folder
  fi
  "$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  for line in "${recipe[@]}"; do
    # shellcheck disable=SC2086  # each recipe line is a list of pip arguments
    say "pip install $(echo $line | cut -c1-90)"
    "$py" -m pip install -q $line 2>"$dir/.pip-error" \
      || die "pip install $line failed: $(tail -n 5 "$dir/.pip-error" | tr '\n' ' ')"
  done
  rm -f "$dir/.pip-error"
  echo "$recipe_digest" > "$stamp"
  rm -f "$building"
fi

# kvdirect from this checkout, reinstalled when its sources changed.
srcs=(python csrc CMakeLists.txt pyproject.toml build_support VERSION)
if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
  src_digest=$(cd "$root" && { git ls-files -s -- "${srcs[@]}"; git diff HEAD -- "${srcs[@]}";
    git ls-files -z -o --exclude-standard -- "${srcs[@]}" | xargs -0 -r sha256sum; } | sha256sum | cut -c1-16)
else  # not a git checkout: hash the files themselves
  src_digest=$(cd "$root" && find "${srcs[@]}" -type f -not -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
fi
if [ "$(cat "$dir/.kvdirect-checkout" 2>/dev/null)" != "$root $src_digest" ]; then
  say "installing kvdirect from $root into $dir"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} "$py" -m pip install -q --no-deps \
    --no-build-isolation --force-reinstall --config-settings=build-dir=build/sglang-env "$root" \
    2>"$dir/.pip-error" || die "installing kvdirect from $root failed: $(tail -n 8 "$dir/.pip-error" | tr '\n' ' ')"
  rm -f "$dir/.pip-error"
  echo "$root $src_digest" > "$dir/.kvdirect-checkout"
fi

# What the tests and the demo rely on, checked every time (a second or two).
(cd / && "$py" -W ignore - <<'PY') || die "the environment at $dir is incomplete (see above); delete it and run again"
import importlib, sys
from importlib.metadata import entry_points, version
assert version("sglang") == "0.5.23", version("sglang")
for m in ("sglang.srt.mem_cache.registry", "sglang.srt.mem_cache.radix_cache", "fastapi", "uvicorn",
          "uvloop", "jsonschema", "xgrammar", "soundfile", "einops", "mooncake.store", "kvdirect._core",
          "sglang_router.launch_router", "prometheus_client",
          "kvdirect.sglang"):
    importlib.import_module(m)
import kvdirect
eps = [e.value for e in entry_points(group="sglang.srt.plugins") if e.name == "kvdirect"]
assert eps == ["kvdirect.sglang:register"], eps
assert "site-packages" in kvdirect.__file__, f"kvdirect imported from {kvdirect.__file__}"
PY
say "ready: $dir ($(du -sh "$dir" 2>/dev/null | cut -f1), $(( $(date +%s) - t0 )) s)"
echo "$dir"
