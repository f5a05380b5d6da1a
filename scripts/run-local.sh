#!/usr/bin/env bash
# Starts the two local sinks of config/poolrelay.toml, then the relay. The
# sinks live exactly as long as this script: however it ends (the relay
# exits, Ctrl-C, SIGTERM, SIGHUP of a closed terminal), it stops the relay
# and then both sinks by their own PIDs and waits for them, so their ports
# are free for the next `make run`. Only SIGKILL of the script itself
# cannot be handled.
set -euo pipefail
bin=${POOLRELAY_BIN:-target/debug/poolrelay}
config=${POOLRELAY_CONFIG:-config/poolrelay.toml}
sinks=()
relay=

stop() {
	trap - EXIT INT TERM HUP
	if [[ -n $relay ]]; then
		# One signal only: a second one makes the relay skip its grace period.
		kill -TERM "$relay" 2>/dev/null || true
		wait "$relay" 2>/dev/null || true
	fi
	for pid in "${sinks[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
	for pid in "${sinks[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop EXIT
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap 'stop; exit 129' HUP

# `cmd > >(sed ...) &` makes $! the sink's own PID (with `cmd | sed &` it
# would be sed's, and killing sed leaves the sink running). sed ends when
# the sink closes its stdout.
sink() {
	local port=$1 name=$2 label=$3
	"$bin" sink --listen "127.0.0.1:$port" --hostname "$name" > >(sed -u "s/^/[sink $port $label] /") &
	sinks+=($!)
}
sink 2601 bulk-sink 'bulk A,-'
sink 2602 emergency-sink 'emergency B'

"$bin" check -c "$config" --print
# The relay runs in its own process group (set -m), so Ctrl-C in the terminal
# reaches this script only, which then stops the relay with a single SIGTERM.
# It runs in the background so that `wait` returns as soon as a signal
# arrives, instead of the trap waiting for the relay to exit by itself.
set -m
"$bin" run -c "$config" &
relay=$!
set +m
status=0
wait "$relay" || status=$?
relay=
exit "$status"
