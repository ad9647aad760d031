#!/usr/bin/env bash
# Retrain, re-export and evaluate the shipped 2D bundles on a CUDA GPU.
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

# A warm-started recipe (derm-lesion 1.3.0) begins from weights git keeps at
# the revision its WarmStart names; `dicom-ai train --init` checks their SHA-256.
init_args() {
    "${PYTHON}" - "$1" "${CACHE}" <<'PY'
import subprocess, sys
from pathlib import Path
from dicom_ai.train.recipes import RECIPES, XR_FRACTURE
name, cache = sys.argv[1], Path(sys.argv[2])
recipe = XR_FRACTURE if name == "xr-fracture" else RECIPES[name]
if recipe.warm_start is not None:
    ws = recipe.warm_start
    out = cache / f"{name}-init-{ws.sha256[:12]}.pt"
    cache.mkdir(parents=True, exist_ok=True)
    out.write_bytes(subprocess.run(["git", "show", f"{ws.revision}:{ws.path}"],
                                   capture_output=True, check=True).stdout)
    print(f"--init {out}")
PY
}

for model in cxr-pneumonia fundus-dr derm-lesion xr-fracture; do
    start=$(date +%s)
    # shellcheck disable=SC2046
    dicom-ai train "${model}" --data "${DATA}" --cache "${CACHE}" --threads "${THREADS}" \
        $(init_args "${model}")
    echo "${model}: trained and exported in $(( $(date +%s) - start )) s"
    dicom-ai evaluate "models/${model}" --data "${DATA}" --cache "${CACHE}" \
        --plots "models/${model}/docs"
done
