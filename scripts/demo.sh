#!/usr/bin/env bash
# The edgedeploy demo, on a fresh machine, in one command:
#   1. bootstrap (Debian packages, .venv, dockerd) — idempotent, quick on a second run;
#   2. `edgectl demo`: an image registry and Mosquitto on 127.0.0.1, the cpu base image (built
#      once, then cached), the digits model trained, registered and packaged, one real device
#      (edge-agent + Docker Engine) and 50 simulated ones, a deployment in waves, a test digit
#      scored over HTTP, the fleet table, then a second model version rolled out (only the model
#      layer moves). Arguments are passed to `edgectl demo` (e.g. --simulated 200).
# Ctrl-C stops everything the demo started. Exits non-zero when a step fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '\n\033[1m[demo] %s\033[0m\n' "$*"; }
fail() {
    printf '[demo] FAILED: %s\n' "$*" >&2
    exit 1
}

DEMO_PID=""
on_exit() {
    local code=$?
    # A signal reached this script: `edgectl demo` (a background job, so it ignores SIGINT) stops
    # its own services on SIGTERM; wait until it has.
    if [[ -n "$DEMO_PID" ]] && kill -0 "$DEMO_PID" 2>/dev/null; then
        kill -TERM "$DEMO_PID" 2>/dev/null || true
        wait "$DEMO_PID" 2>/dev/null || true
    fi
    if ((code != 0)); then
        printf '[demo] exit status %d (logs: .work/demo/logs)\n' "$code" >&2
    fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "bootstrap: packages, .venv, Docker Engine"
bash scripts/bootstrap.sh
EDGECTL="$ROOT/.venv/bin/edgectl"
[[ -x "$EDGECTL" ]] || fail "bootstrap did not install $EDGECTL"
"$ROOT/.venv/bin/python" -c 'import docker; docker.from_env(timeout=20).ping()' 2>/dev/null ||
    fail "Docker Engine is not answering (see the bootstrap warnings above and .work/dockerd.log)"

say "edgectl demo $*"
"$EDGECTL" demo "$@" &
DEMO_PID=$!
wait "$DEMO_PID"
