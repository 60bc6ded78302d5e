#!/usr/bin/env bash
# Prepare this machine for the edgedeploy demo and tests. Idempotent; a second run only checks.
#   1. Debian packages the real parts need (apt-get only when something is missing).
#   2. A virtualenv at .venv with edgedeploy installed editable (pip only when pyproject.toml changed).
#   3. Docker Engine: starts dockerd in the background when `docker info` fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
EXTRAS="agent,cloud,openvino,dev"
STAMP="$VENV/.edgedeploy-install.sha256"
WORK="$ROOT/.work"
DOCKERD_LOG="$WORK/dockerd.log"
APT_PACKAGES=(docker.io mosquitto mosquitto-clients docker-registry wrk debootstrap postgresql iproute2 chromium rabbitmq-server)
PYTHON="${PYTHON:-python3}"

log() { printf '[bootstrap] %s\n' "$*"; }
die() {
    printf '[bootstrap] ERROR: %s\n' "$*" >&2
    exit 1
}
warn_loud() {
    local rule='################################################################'
    {
        printf '[bootstrap] %s\n' "$rule"
        printf '%s\n' "$@" | sed 's/^/[bootstrap] WARNING: /'
        printf '[bootstrap] %s\n' "$rule"
    } >&2
}

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

python_usable() {
    command -v "$PYTHON" >/dev/null 2>&1 &&
        "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null
}

install_packages() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    if ! python_usable; then
        missing+=(python3 python3-venv)
    fi
    if ((${#missing[@]} == 0)); then
        log "debian packages: all present"
        return
    fi
    [[ "$(id -u)" == 0 ]] || die "missing debian packages (${missing[*]}); run as root or: sudo apt-get install ${missing[*]}"
    log "debian packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
}

venv_stamp() {
    {
        sha256sum pyproject.toml
        printf 'extras=%s\n' "$EXTRAS"
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

setup_venv() {
    python_usable || die "$PYTHON >= 3.10 with the venv module is required (apt-get install python3 python3-venv)"
    if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        log "virtualenv: creating .venv with $("$PYTHON" --version)"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local want
    want="$(venv_stamp)"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
        log "virtualenv: .venv up to date (pyproject.toml unchanged)"
        return
    fi
    log "virtualenv: pip install -e \".[$EXTRAS]\" (a few minutes the first time)"
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
    printf '%s\n' "$want" >"$STAMP"
    log "virtualenv: installed"
}

docker_ok() {
    timeout 20 docker info >/dev/null 2>&1
}

start_dockerd() {
    if ! command -v docker >/dev/null 2>&1; then
        warn_loud "the docker CLI is not installed; tests that need Docker Engine will be SKIPPED"
        return
    fi
    if docker_ok; then
        log "docker: engine is running"
        return
    fi
    if [[ "$(id -u)" != 0 ]] || ! command -v dockerd >/dev/null 2>&1; then
        warn_loud "Docker Engine is not running and this script cannot start it (needs root and dockerd)" \
            "tests that need Docker Engine will be SKIPPED"
        return
    fi
    mkdir -p "$WORK"
    log "docker: starting dockerd in the background (log: ${DOCKERD_LOG#"$ROOT"/})"
    setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    local pid=$! started=$SECONDS
    while ((SECONDS - started < 60)) && kill -0 "$pid" 2>/dev/null; do
        if docker_ok; then
            log "docker: engine is running (after $((SECONDS - started)) s)"
            return
        fi
        sleep 1
    done
    docker_ok && log "docker: engine is running" && return
    warn_loud "dockerd (pid $pid) exited or did not answer 'docker info' within 60 s; tests that need Docker Engine will be SKIPPED" \
        "last lines of $DOCKERD_LOG:" "$(tail -n 15 "$DOCKERD_LOG" 2>/dev/null || true)"
}

install_packages
setup_venv
start_dockerd
log "done"
