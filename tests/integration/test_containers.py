"""The container files, built and run for real by ``deploy/test-containers.sh``.

The script builds the Debian base image (debootstrap + ``docker import``), the CPU image from an
offline wheelhouse, runs it (C-ECHO, C-STORE, health check, non-root, read-only models, clean
stop) and the compose demo with Orthanc (a study stored into dicom-ai → its SR in Orthanc). It
prints ``SKIPPED: reason`` and exits 0 only where no Docker daemon can run; that is a skip here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "test-containers.sh"
#: A first run builds everything (≈5 min here on 2 busy cores); later runs reuse the cache.
LIMIT_S = 1500


@pytest.mark.timeout(LIMIT_S + 60)
def test_containers_build_serve_and_deliver_to_orthanc() -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=LIMIT_S, check=False)
    output = done.stdout + done.stderr
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED:")]
    if done.returncode == 0 and skipped:
        pytest.skip(skipped[0])
    assert done.returncode == 0, output[-6000:]
    assert "PASSED" in done.stderr, output[-6000:]
    assert "SR in Orthanc" in done.stderr, output[-6000:]
