#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the CUDA tests (tests/gpu), the training tests
# with the GPU as their device, and the GPU inference benchmark. CI has no GPU and skips them.
# Usage: scripts/gpu_check.sh [LOG_DIR]   (run from the repository root; PYTHON overrides python)
set -uo pipefail

PYTHON="${PYTHON:-python}"
LOGS="${1:-gpu-check}"
mkdir -p "${LOGS}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "${LOGS}/gpu.txt"
"${PYTHON}" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible')" \
    | tee -a "${LOGS}/gpu.txt"

# The unit tests that train or load bundles pick the GPU themselves (device() and
# select_device("auto")): run on a GPU machine they check the CUDA path, resume included.
"${PYTHON}" -m pytest -q -rs -s -p no:cacheprovider tests/gpu tests/unit/test_train_loop.py \
    tests/unit/test_fracture.py tests/unit/test_bundle.py 2>&1 | tee "${LOGS}/tests.log"
tests=${PIPESTATUS[0]}

"${PYTHON}" benchmarks/gpu.py ${GPU_BENCHMARK_ARGS:-} 2>&1 | tee "${LOGS}/benchmark.log"
bench=${PIPESTATUS[0]}

echo "tests exit ${tests}, benchmark exit ${bench}"
[ "${tests}" -eq 0 ] && [ "${bench}" -eq 0 ]
