#!/usr/bin/env bash
# Retrain, re-export and evaluate the shipped classification bundles on a CUDA GPU.
#
# The recipes are the same as on the CPU (dicom_ai/train/recipes.py); the training loop puts the
# network and every batch on CUDA whenever torch sees a GPU, so only the wall time changes.
# Usage: scripts/train_gpu.sh [DATA_DIR] [CACHE_DIR]   (run from the repository root)
set -euo pipefail

DATA="${1:-${DICOM_AI_TRAIN_DATA:-../shared/data}}"
CACHE="${2:-${DICOM_AI_TRAIN_CACHE:-${HOME}/.cache/dicom-ai}}"
PYTHON="${PYTHON:-python}"

"${PYTHON}" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch; train on the CPU with `dicom-ai train` instead")
print(f"training on {torch.cuda.get_device_name(0)}")
PY

# The CPU only decodes the cached arrays and augments batches; a few threads keep the GPU fed.
THREADS="${THREADS:-4}"
for model in cxr-pneumonia fundus-dr derm-lesion; do
    start=$(date +%s)
    dicom-ai train "${model}" --data "${DATA}" --cache "${CACHE}" --threads "${THREADS}"
    echo "${model}: trained and exported in $(( $(date +%s) - start )) s"
    dicom-ai evaluate "models/${model}" --data "${DATA}" --cache "${CACHE}" \
        --plots "models/${model}/docs"
done
