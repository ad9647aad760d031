#!/usr/bin/env bash
# Set up dicom-ai from a fresh clone, then run the demo or the whole test suite.
#
#   bash scripts/bootstrap.sh            install only: .venv with pinned CPU torch + dicom-ai[dev]
#   bash scripts/bootstrap.sh demo       install, then replay sample_studies/ (findings table)
#   bash scripts/bootstrap.sh test       install, apt peers when missing, ruff, mypy, pytest
#
# Re-running is fast: pip is skipped while .venv matches pyproject.toml + constraints.txt.
# Environment: PYTHON (default python3, must be >= 3.11), VENV (default .venv),
# TORCH_INDEX_URL (a CUDA build of the same torch, e.g. https://download.pytorch.org/whl/cu128).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.dicom-ai-install"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root (or sudo) to run: $*"
        return 1
    fi
}

install_python() {
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        log "$PYTHON is missing or older than 3.11; set PYTHON=/path/to/python3.11"
        exit 1
    fi
    [ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
    local want
    want=$({ cat pyproject.toml constraints.txt; echo "${TORCH_INDEX_URL:-}"; } | sha256sum | cut -d' ' -f1)
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/dicom-ai" ]; then
        log "$VENV is up to date"
        return
    fi
    # torch first and pinned: a free resolution would download a multi-GB CUDA build. The
    # constraint torch==2.13.0 below also accepts a CUDA build (2.13.0+cu128) installed here.
    log "installing torch==2.13.0 ${TORCH_INDEX_URL:+from $TORCH_INDEX_URL}"
    "$VENV/bin/python" -m pip install --quiet torch==2.13.0 \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    log "installing dicom-ai[dev] with constraints.txt"
    "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev]"
    echo "$want" >"$STAMP"
}

install_peers() {
    # The integration tests talk to real peers: Orthanc (+ DICOMweb plugin), DCMTK, dicom3tools,
    # PixelMed's validators (libpixelmed-java does not pull a JRE itself), and OHIF Viewer in
    # Chromium (tests/integration/test_ohif.py installs OHIF and playwright-core from npm into
    # ~/.cache/dicom-ai/ohif itself), and Prometheus's promtool (lints /metrics, tests the alert
    # rules in deploy/prometheus/; the server it comes with is never started).
    local plugin=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
    local pixelmed=/usr/share/java/pixelmed.jar
    if ! { command -v Orthanc >/dev/null && command -v storescu >/dev/null \
        && command -v dciodvfy >/dev/null && [ -e "$plugin" ] && [ -e "$pixelmed" ] \
        && command -v java >/dev/null && [ -x /usr/bin/chromium ] && command -v promtool >/dev/null; }; then
        log "installing apt peers: orthanc dcmtk dicom3tools orthanc-dicomweb libpixelmed-java" \
            "default-jre-headless chromium prometheus"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            orthanc dcmtk dicom3tools orthanc-dicomweb libpixelmed-java default-jre-headless chromium \
            prometheus
    fi
    # playwright-core needs node >= 20, newer than Debian 12's nodejs: use the one installed.
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        log "node and npm (node >= 20) are needed for the OHIF viewer test"
        return 1
    fi
}

run_demo() {
    exec "$VENV/bin/dicom-ai" replay sample_studies --out out/replay
}

run_tests() {
    install_peers
    # DCMTK and Orthanc leave Nagle's algorithm on without it: transfers stall at ~21 instances/s.
    export TCP_NODELAY=1
    # Every step runs even after a failure, so one report shows lint, types and tests together.
    local failed=() rc=0
    log "ruff"
    "$VENV/bin/ruff" check . || failed+=(ruff)
    log "mypy"
    "$VENV/bin/mypy" || failed+=(mypy)
    log "pytest"
    "$VENV/bin/pytest" -q || rc=$?
    if [ "$rc" -eq 5 ]; then
        log "no tests collected"
        rc=0
    fi
    [ "$rc" -eq 0 ] || failed+=("pytest (exit $rc)")
    if [ "${#failed[@]}" -gt 0 ]; then
        log "FAILED: ${failed[*]}"
        # pytest's own status when it failed, else 1.
        exit $((rc != 0 ? rc : 1))
    fi
    log "ruff, mypy and pytest passed"
}

case "${1:-install}" in
    install) install_python ;;
    demo) install_python; run_demo ;;
    test) install_python; run_tests ;;
    -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) log "unknown command '$1' (install, demo, test)"; exit 64 ;;
esac
