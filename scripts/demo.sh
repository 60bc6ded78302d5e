#!/usr/bin/env bash
# The edgedeploy demo: build the example modules and score them through the real scoring server.
#   1. bootstrap (Debian packages, .venv) — idempotent, quick on a second run;
#   2. build the examples from scikit-learn's bundled data into .work/examples;
#   3. for each example (digits: no-code ONNX; diabetes: Azure ML-style score.py), start
#      `python -m modules.scoring` on a free 127.0.0.1 port, wait until ready, POST the sample,
#      show the prediction next to the true value, the model metadata and a few /metrics lines;
#   4. stop the servers (also on Ctrl-C or failure). Exits non-zero when any step fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WORK="$ROOT/.work"
EXAMPLES="$WORK/examples"
LOGS="$WORK/demo"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-90}"
SERVER_PIDS=()

say() { printf '\n\033[1m[demo] %s\033[0m\n' "$*"; }
info() { printf '[demo] %s\n' "$*"; }
fail() {
    printf '[demo] FAILED: %s\n' "$*" >&2
    exit 1
}

stop_servers() {
    local pid
    for pid in "${SERVER_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    SERVER_PIDS=()
}
on_exit() {
    local code=$?
    stop_servers
    if ((code != 0)); then
        printf '[demo] exit status %d (server logs: %s)\n' "$code" "${LOGS#"$ROOT"/}" >&2
    fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "1/4 bootstrap: packages and .venv"
bash scripts/bootstrap.sh
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || fail "bootstrap did not create $PY"

say "2/4 build the example modules into ${EXAMPLES#"$ROOT"/}"
"$PY" -m modules.examples build "$EXAMPLES"
mkdir -p "$LOGS"

# http URL [BODY_FILE]: GET (or POST the JSON file) and print the body; fails on errors and non-2xx.
http() {
    "$PY" - "$@" <<'PYEOF'
import sys, urllib.request

url = sys.argv[1]
data = open(sys.argv[2], "rb").read() if len(sys.argv) > 2 else None
req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
try:
    with urllib.request.urlopen(req, timeout=30) as r:
        sys.stdout.write(r.read().decode())
except Exception as e:
    sys.exit(f"{url}: {e}")
PYEOF
}

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server NAME PORT [VAR=value ...]: the scoring server in the background, logging to $LOGS/NAME.log.
start_server() {
    local name="$1" port="$2"
    shift 2
    env HOST=127.0.0.1 PORT="$port" "$@" "$PY" -m modules.scoring >"$LOGS/$name.log" 2>&1 &
    SERVER_PIDS+=("$!")
    info "started $name server (pid $!) on 127.0.0.1:$port; log ${LOGS#"$ROOT"/}/$name.log"
}

wait_ready() {
    local name="$1" port="$2" pid="${SERVER_PIDS[-1]}" started=$SECONDS
    while ((SECONDS - started < READY_TIMEOUT_S)); do
        if http "http://127.0.0.1:$port/v2/health/ready" >/dev/null 2>&1; then
            info "$name is ready after $((SECONDS - started)) s"
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$LOGS/$name.log" >&2 || true
            fail "the $name server exited before becoming ready (log above)"
        fi
        sleep 0.3
    done
    tail -n 20 "$LOGS/$name.log" >&2 || true
    fail "the $name server was not ready within ${READY_TIMEOUT_S}s"
}

# Summarises GET /v2/models/<name> (stdin): platform, provider in use, tensors.
read -r -d '' MODEL_SUMMARY_PY <<'PYEOF' || true
import json, sys

m = json.load(sys.stdin)


def tensors(specs):
    return ", ".join(f"{t['name']} {t['datatype']} {t['shape']}" for t in specs) or "(not declared)"


print(f"    platform {m['platform']}; provider in use: {m.get('parameters', {}).get('execution_provider')}")
print(f"    inputs:  {tensors(m.get('inputs', []))}")
print(f"    outputs: {tensors(m.get('outputs', []))}")
PYEOF

# show NAME PORT: score the sample, compare with expected.json, show metadata and metrics.
show() {
    local name="$1" port="$2" dir="$EXAMPLES/$1" base="http://127.0.0.1:$2" reply
    reply="$(http "$base/score" "$dir/sample.json")" ||
        fail "POST /score to $name failed"
    info "POST /score  $(head -c 160 <<<"$reply")"
    REPLY_JSON="$reply" "$PY" - "$dir/expected.json" <<'PYEOF' || fail "$name answered something unexpected"
import json, os, sys

reply = json.loads(os.environ["REPLY_JSON"])
expected = json.load(open(sys.argv[1]))
if "label" in expected:  # digits: no-code ONNX, {"outputs": {"label": [...], "probabilities": [...]}}
    label = reply["outputs"]["label"][0]
    proba = max(reply["outputs"]["probabilities"][0])
    print(f"[demo] predicted digit {label} (p={proba:.3f}); true label {expected['label']}")
    sys.exit(0 if label == expected["label"] else 1)
predicted = reply[0]  # diabetes: score.py returns one prediction per row
print(f"[demo] predicted progression {predicted:.1f}; true value {expected['target']:.1f}; "
      f"in-process prediction {expected['prediction']:.1f}")
sys.exit(0 if abs(predicted - expected["prediction"]) < 1e-6 else 1)
PYEOF
    info "GET /v2/models/$name"
    http "$base/v2/models/$name" | "$PY" -c "$MODEL_SUMMARY_PY" || fail "GET /v2/models/$name failed"
    info "GET /metrics (a few lines)"
    http "$base/metrics" | grep -E '^scoring_(requests_total|inference|request_duration_seconds_(count|sum))' |
        head -n 8 | sed 's/^/    /' || true
}

say "3/4 digits: no-code ONNX (model.onnx served as is)"
port="$(free_port)"
start_server digits "$port" MODEL_DIR="$EXAMPLES/digits" MODEL_NAME=digits MODULE_JSON="$EXAMPLES/digits/module.json"
wait_ready digits "$port"
show digits "$port"
stop_servers

say "4/4 diabetes: Azure ML-style entry script (score.py with init()/run())"
port="$(free_port)"
start_server diabetes "$port" MODEL_DIR="$EXAMPLES/diabetes" ENTRY_SCRIPT="$EXAMPLES/diabetes/score.py" \
    MODULE_JSON="$EXAMPLES/diabetes/module.json"
wait_ready diabetes "$port"
show diabetes "$port"
stop_servers

say "demo finished: both modules answered correctly"
