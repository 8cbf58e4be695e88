#!/usr/bin/env bash
# `make run`: start AIOS, run the four-agent demo through the kernel, stop everything.
set -u
cd "$(dirname "$0")/.."
export AIOS_HOME="${AIOS_HOME:-$PWD/.aios}"
AIOS=.venv/bin/aios
if [ -f "$AIOS_HOME/endpoints.json" ]; then
  echo "aios: a previous run left $AIOS_HOME/endpoints.json; stopping it first"
  "$AIOS" down
fi
"$AIOS" up --detach || exit 1
trap '"$AIOS" down' EXIT
.venv/bin/python sdk/examples/demo_agents.py
status=$?
"$AIOS" status
exit $status
