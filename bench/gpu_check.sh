#!/usr/bin/env bash
# One prepared GPU check for the device path: build with nvcc, run the CUDA tests
# (copy kernels byte-exact vs torch index_select; the cache round trip on CUDA:
# shm store, staged through pinned buffers, write-back, load, layer-wise load,
# every byte compared), the simulated-device ordering tests, the CUDA copy
# benchmark (vs device-to-device copy_ of the same bytes and index_select) and
# the staged transfer benchmark (vs plain copies). Needs a CUDA device,
# nvcc, torch with CUDA, and the build requirements (scikit-build-core,
# pybind11, numpy, pytest) already installed: GPU machines may be offline.
# Logs go to $OUT (if set) and stdout. Exit status: non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
export KVDIRECT_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-8}
PY=${PYTHON:-python3}
rc=0
step() { echo "== $*"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/device.txt"
nvcc --version | tail -1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" \
  || { echo "torch is required for the CUDA tests"; exit 2; }

step "build (KVDIRECT_CUDA=ON)"
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "build failed"; exit 3
fi
$PY -m kvdirect doctor | tee "$OUT/doctor.txt"
grep -q "cuda kernels  yes" "$OUT/doctor.txt" || { echo "CUDA kernels were not built"; exit 4; }

step "CUDA tests (copy kernels; cache round trip: write-back, load, layer-wise, bytes verified)"
$PY -m pytest -q -rs tests/cuda 2>&1 | tee "$OUT/tests_cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
grep -q "skipped" "$OUT/tests_cuda.txt" && grep -q "no CUDA device" "$OUT/tests_cuda.txt" && { echo "tests were skipped"; rc=1; }

step "stream ordering on the simulated device (CPU; must pass, and fail with KVDIRECT_SIM_SKIP_SYNC=1)"
$PY -m pytest -q tests/test_simdevice.py tests/test_simdevice_skip_sync.py 2>&1 | tail -3 | tee "$OUT/tests_simdevice.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

step "CPU copy tests (same build)"
$PY -m pytest -q tests/test_copy.py tests/test_layout.py 2>&1 | tail -3 | tee "$OUT/tests_cpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

step "CUDA copy benchmark (kernel gather/scatter vs device-to-device copy_ of the same bytes)"
timeout 240 $PY bench/bench_copy.py --device cuda --pages-kib 64 256 1024 4096 2>&1 | tee "$OUT/bench_copy_cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

step "staged transfer benchmark (cache.load / write_back through pinned buffers vs plain copies)"
timeout 240 $PY bench/bench_transfer.py --device cuda 2>&1 | tee "$OUT/bench_transfer_cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

echo "== done rc=$rc (logs in $OUT)"
exit $rc
