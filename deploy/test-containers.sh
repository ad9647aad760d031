#!/usr/bin/env bash
# Test the container files for real: build the CPU image, `docker run` it (C-ECHO, C-STORE, the
# health check, non-root, read-only models, a clean stop), then the compose demo (a study stored
# into dicom-ai → its SR in the Orthanc container, checked over Orthanc's REST API).
#
#   bash deploy/test-containers.sh        (as root; tests/integration/test_containers.py runs it)
#
# No registry is needed: the Debian base image is made with debootstrap and `docker import`, the
# Python packages come from a wheelhouse in deploy/wheels/ made by `pip download` on this host
# (torch from the wheel pip's find-links hold, never a CUDA build), and builds and containers use
# the host network; all traffic goes to 127.0.0.1 on free ports. Missing tools are installed from
# apt (docker.io, docker-compose, debootstrap, dcmtk). A Docker daemon is started when none runs,
# and stopped again at the end. Exits 0 with a line "SKIPPED: ..." only where no daemon can run.
#
# Environment: DICOM_AI_DOCKER_CACHE (default /var/cache/dicom-ai-docker: the base image tarball
# and dockerd's log), PYTHON (for `pip download`; default .venv/bin/python, else python3),
# KEEP=1 leaves the containers, volumes and the temporary directory for a look afterwards.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE=${DICOM_AI_DOCKER_CACHE:-/var/cache/dicom-ai-docker}
BASE_IMAGE=local/debian:bookworm
IMAGE=dicom-ai:latest
SAMPLE=sample_studies/cxr01/1.dcm
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export TCP_NODELAY=1 DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
T0=$(date +%s)

log() { printf '[containers %4ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }
skip() { echo "SKIPPED: $*"; exit 0; }

# wait_for SECONDS WHAT COMMAND...: run COMMAND once a second until it succeeds or time is up.
wait_for() {
    local limit=$1 what=$2 end
    shift 2
    end=$(($(date +%s) + limit))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || fail "$what: not within ${limit}s"
        sleep 1
    done
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

install_tools() {
    local missing=()
    command -v docker >/dev/null || missing+=(docker.io)
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ -x /usr/bin/storescu ] || missing+=(dcmtk)
    command -v curl >/dev/null || missing+=(curl)
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || fail "missing ${missing[*]} and not root to install them"
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

DOCKERD_PID=
start_daemon() {
    docker info >/dev/null 2>&1 && return
    [ "$(id -u)" -eq 0 ] || skip "no Docker daemon runs and only root can start one"
    mkdir -p "$CACHE"
    # dockerd picks overlay2 where the kernel allows it (≈3x faster builds than vfs), else vfs.
    local driver
    for driver in overlay2 vfs; do
        log "starting dockerd --storage-driver=$driver"
        dockerd --storage-driver="$driver" >>"$CACHE/dockerd.log" 2>&1 &
        DOCKERD_PID=$!
        local i
        for i in $(seq 30); do
            docker info >/dev/null 2>&1 && return
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 1
        done
        kill "$DOCKERD_PID" 2>/dev/null || true
        wait "$DOCKERD_PID" 2>/dev/null || true
        DOCKERD_PID=
    done
    skip "dockerd does not start here (see $CACHE/dockerd.log)"
}

apt_mirror() {
    # The mirror this machine's apt uses (deb822 sources or a classic sources.list).
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
    [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -1)
    echo "${uri:-http://deb.debian.org/debian}"
}

base_image() {
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && { log "base image cached"; return; }
    local tarball=$CACHE/debian-bookworm-minbase.tar
    if [ ! -s "$tarball" ]; then
        local root mirror
        root=$(mktemp -d)
        mirror=$(apt_mirror)
        log "debootstrap --variant=minbase bookworm from $mirror"
        timeout 900 nice -n 10 debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
        # apt inside the image uses the same sources as this host (security updates included).
        if [ -f /etc/apt/sources.list.d/debian.sources ]; then
            cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/"
            rm -f "$root/etc/apt/sources.list"
        fi
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        mkdir -p "$CACHE"
        tar -C "$root" -c . >"$tarball.tmp" && mv "$tarball.tmp" "$tarball"
        rm -rf "$root"
    fi
    log "docker import $tarball"
    docker import -c 'CMD ["/bin/bash"]' "$tarball" "$BASE_IMAGE" >/dev/null
}

wheelhouse() {
    # Every dependency of pyproject.toml as a wheel, torch from pip's find-links (the CPU wheel
    # on disk): the image build then needs no index and cannot pick a CUDA torch. The wheels are
    # kept in the cache with their stamp and copied into the build context each run, because a
    # fresh clone's deploy/wheels/ is empty whatever the cache holds.
    local store=$CACHE/wheels stamp=$CACHE/wheels/stamp want
    want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && ls "$store"/torch-*+cpu-*.whl >/dev/null 2>&1; then
        log "wheelhouse up to date"
    else
        log "pip download into $store"
        rm -rf "$store" && mkdir -p "$store"
        "$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
            >"$WORK/requirements.txt"
        timeout 900 nice -n 10 "$PYTHON" -m pip download --only-binary=:all: \
            -d "$store" -c constraints.txt -r "$WORK/requirements.txt" >"$WORK/pip.log" 2>&1 \
            || { tail -30 "$WORK/pip.log" >&2; fail "pip download"; }
        ls "$store"/torch-*+cpu-*.whl >/dev/null 2>&1 \
            || fail "pip download did not take a CPU torch wheel: $(ls "$store"/torch-* 2>&1)"
        echo "$want" >"$stamp"
    fi
    find deploy/wheels -name '*.whl' -delete
    cp -l "$store"/*.whl deploy/wheels/ 2>/dev/null || cp "$store"/*.whl deploy/wheels/
}

build_image() {
    log "docker build $IMAGE"
    local start=$(date +%s)
    timeout 1800 nice -n 10 docker build --network host -f deploy/Dockerfile \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg OFFLINE_WHEELS=1 -t "$IMAGE" . \
        >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "docker build"; }
    log "built $IMAGE in $(($(date +%s) - start))s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}'))"
}

study_uid() {
    /usr/bin/dcmdump +P 0020,000d "$1" | sed -n 's/.*\[\(.*\)\].*/\1/p' | head -1
}

# echo_ok PORT / store_ok PORT FILE: DCMTK as the modality (calling AE MODALITY, allowed in the
# example config), every step bounded. By path: a venv on PATH has pynetdicom's own `echoscu`.
echo_ok() {
    /usr/bin/echoscu -to 5 -ta 5 -td 5 -aet MODALITY -aec DICOMAI 127.0.0.1 "$1"
}
store_ok() {
    local out
    out=$(/usr/bin/storescu -v -to 10 -ta 10 -td 60 -aet MODALITY -aec DICOMAI 127.0.0.1 "$1" "$2" 2>&1) \
        || { echo "$out" >&2; return 1; }
    grep -q 'Received Store Response (Success)' <<<"$out" || { echo "$out" >&2; return 1; }
}

health_is() {
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$1")" = "$2" ]
}

write_configs() {
    # The shipped examples with this run's free ports (and nothing else changed).
    AI_PORT=$(free_port)
    # Host networking: the HTTP endpoint (and so the health check) would otherwise take 9110,
    # and could ask whatever else holds it.
    export DICOM_AI_HTTP_PORT=$(free_port)
    ORTHANC_DICOM=$(free_port)
    ORTHANC_HTTP=$(free_port)
    sed "s/^port = 4242$/port = $ORTHANC_DICOM/" deploy/dicom-ai.example.toml >"$WORK/dicom-ai.toml"
    [ "$(grep -c "^port = $ORTHANC_DICOM$" "$WORK/dicom-ai.toml")" = 1 ] \
        || fail "deploy/dicom-ai.example.toml: expected one destination line 'port = 4242'"
    python3 - "$ORTHANC_DICOM" "$ORTHANC_HTTP" "$AI_PORT" "$WORK/orthanc.json" <<'EOF'
import json
import sys

dicom, http, ai, out = sys.argv[1:]
cfg = json.load(open("deploy/orthanc/orthanc.json"))
cfg["DicomPort"], cfg["HttpPort"] = int(dicom), int(http)
cfg["DicomModalities"]["DICOMAI"][2] = int(ai)
json.dump(cfg, open(out, "w"), indent=2)
EOF
    chmod 0644 "$WORK/dicom-ai.toml" "$WORK/orthanc.json"
}

test_run() {
    local name=dicomai-run-$$ uid
    RUN_CONTAINER=$name
    log "docker run $IMAGE on 127.0.0.1:$AI_PORT"
    docker run -d --name "$name" --network host --init --read-only --tmpfs /tmp \
        --health-interval 2s --health-start-period 120s \
        -e DICOM_AI_SCP_BIND_ADDRESS=127.0.0.1 -e DICOM_AI_SCP_PORT="$AI_PORT" \
        -e DICOM_AI_HTTP_PORT="$DICOM_AI_HTTP_PORT" \
        -v "$WORK/dicom-ai.toml:/etc/dicom-ai/dicom-ai.toml:ro" -v "$name:/var/lib/dicom-ai" \
        "$IMAGE" >/dev/null
    wait_for 120 "C-ECHO to the container" echo_ok "$AI_PORT"
    log "C-ECHO ok after $(($(date +%s) - T0))s"
    store_ok "$AI_PORT" "$SAMPLE" || fail "C-STORE into the container"
    uid=$(study_uid "$SAMPLE")
    docker exec "$name" dicom-ai status --config /etc/dicom-ai/dicom-ai.toml | grep -q "$uid" \
        || fail "dicom-ai status in the container does not list study $uid"
    log "C-STORE ok; study listed by dicom-ai status"
    wait_for 120 "health check of the container" health_is "$name" healthy
    [ "$(docker exec "$name" id -u)" = 10001 ] || fail "the service does not run as uid 10001"
    docker exec "$name" sh -c 'touch /opt/dicom-ai/models/x' 2>/dev/null \
        && fail "the models directory is writable by the service user"
    docker exec "$name" sh -c 'touch /var/lib/dicom-ai/x && rm /var/lib/dicom-ai/x' \
        || fail "the spool volume is not writable by the service user"
    log "healthy; uid 10001; models read-only; spool writable"
    timeout 90 docker stop -t 60 "$name" >/dev/null
    [ "$(docker inspect -f '{{.State.ExitCode}}' "$name")" = 0 ] \
        || { docker logs --tail 30 "$name" >&2; fail "the service did not stop cleanly on SIGTERM"; }
    log "stopped cleanly (exit 0)"
}

orthanc_api() {
    curl -sf --max-time 10 "http://127.0.0.1:$ORTHANC_HTTP$1" "${@:2}"
}

sr_in_orthanc() {
    orthanc_api /tools/find -d "{\"Level\": \"Series\", \"Query\": {\"StudyInstanceUID\": \"$1\", \"Modality\": \"SR\"}}" \
        | python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin) else 1)'
}

test_compose() {
    local uid series instance
    export BASE_IMAGE OFFLINE_WHEELS=1 DICOM_AI_CONFIG=$WORK/dicom-ai.toml \
        ORTHANC_CONFIG=$WORK/orthanc.json DICOM_AI_PORT=$AI_PORT
    COMPOSE=(docker-compose -p "dicomai-test-$$" -f deploy/docker-compose.yml)
    log "compose build (Orthanc from Debian's package; dicom-ai from the build cache)"
    local start=$(date +%s)
    timeout 1800 nice -n 10 "${COMPOSE[@]}" build >"$WORK/compose-build.log" 2>&1 \
        || { tail -40 "$WORK/compose-build.log" >&2; fail "compose build"; }
    log "compose build took $(($(date +%s) - start))s"
    timeout 180 "${COMPOSE[@]}" up -d >"$WORK/compose-up.log" 2>&1 \
        || { cat "$WORK/compose-up.log" >&2; fail "compose up"; }
    wait_for 60 "Orthanc's REST API" orthanc_api /system
    wait_for 120 "C-ECHO to dicom-ai in compose" echo_ok "$AI_PORT"
    store_ok "$AI_PORT" "$SAMPLE" || fail "C-STORE into dicom-ai (compose)"
    uid=$(study_uid "$SAMPLE")
    start=$(date +%s)
    log "stored study $uid; waiting for its SR in Orthanc"
    wait_for 300 "the SR of study $uid in Orthanc" sr_in_orthanc "$uid"
    series=$(orthanc_api /tools/find -d "{\"Level\": \"Series\", \"Query\": {\"StudyInstanceUID\": \"$uid\", \"Modality\": \"SR\"}}" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)[0])')
    instance=$(orthanc_api "/series/$series" | python3 -c 'import json, sys; print(json.load(sys.stdin)["Instances"][0])')
    orthanc_api "/instances/$instance/simplified-tags" | python3 -c '
import json, sys
tags = json.load(sys.stdin)
assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34", tags["SOPClassUID"]  # Comprehensive 3D SR
assert "not for diagnostic use" in json.dumps(tags).lower(), "no disclaimer in the SR"
' || fail "the SR in Orthanc is not our Comprehensive 3D SR with the disclaimer"
    log "SR in Orthanc $(($(date +%s) - start))s after the store"
    wait_for 120 "health check of dicom-ai in compose" \
        health_is "$("${COMPOSE[@]}" ps -q dicom-ai)" healthy
    log "compose: dicom-ai healthy"
}

cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        [ -n "${RUN_CONTAINER:-}" ] && docker logs --tail 30 "$RUN_CONTAINER" >&2 2>&1
        [ -n "${COMPOSE+x}" ] && timeout 60 "${COMPOSE[@]}" logs --tail 30 >&2 2>&1
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        log "KEEP=1: left $WORK, container ${RUN_CONTAINER:-} and compose project dicomai-test-$$"
    else
        [ -n "${COMPOSE+x}" ] && timeout 120 "${COMPOSE[@]}" down -v >/dev/null 2>&1
        [ -n "${RUN_CONTAINER:-}" ] && docker rm -f -v "$RUN_CONTAINER" >/dev/null 2>&1 \
            && docker volume rm "$RUN_CONTAINER" >/dev/null 2>&1
        rm -rf "$WORK"
    fi
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2>/dev/null && timeout 30 tail --pid="$DOCKERD_PID" -f /dev/null
    fi
    exit "$rc"
}

WORK=$(mktemp -d)
trap cleanup EXIT
install_tools
start_daemon
base_image
wheelhouse
build_image
write_configs
test_run
test_compose
log "PASSED in $(($(date +%s) - T0))s"
