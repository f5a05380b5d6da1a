#!/usr/bin/env bash
# Starts the two local sinks of config/poolrelay.toml, then the relay in the
# foreground. Ctrl-C stops the relay; the sinks are stopped by PID on exit.
set -euo pipefail
bin=${POOLRELAY_BIN:-target/debug/poolrelay}
config=${POOLRELAY_CONFIG:-config/poolrelay.toml}
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
"$bin" sink --listen 127.0.0.1:2601 --hostname bulk-sink | sed -u 's/^/[sink 2601 bulk A,-] /' &
pids+=($!)
"$bin" sink --listen 127.0.0.1:2602 --hostname emergency-sink | sed -u 's/^/[sink 2602 emergency B] /' &
pids+=($!)
"$bin" check -c "$config" --print
"$bin" run -c "$config"
