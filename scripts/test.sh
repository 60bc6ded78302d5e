#!/usr/bin/env bash
# Bootstrap this machine, then run pytest in .venv. Arguments go to pytest (default: -q -ra tests).
# Real services (Mosquitto, registry, Docker Engine) are started by the test fixtures themselves.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/bootstrap.sh

if (($# == 0)); then
    set -- -q -ra tests
fi
echo "[test] .venv/bin/python -m pytest $*"
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if ((rc == 5)); then
    echo "[test] ERROR: pytest collected no tests from '$*': nothing was tested; failing." >&2
fi
exit "$rc"
