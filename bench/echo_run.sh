#!/usr/bin/env bash
# One echo-agent load run against a given parley binary, as a whole process for
# farm-bench: starts `PARLEY serve --agent-mode echo`, drives CALLS talking Twilio
# callers for SECONDS with parley-load, stops the server, prints parley-load's summary
# line (server CPU, RSS, pacing per call). For before/after comparisons:
#
#   farm-bench -n 3 --timeout 600 --vs 'bash bench/echo_run.sh /tmp/parley-before' \
#       -- bash bench/echo_run.sh /tmp/parley-after
#   CALLS=300 SECONDS_RUN=30 bash bench/echo_run.sh "$CARGO_TARGET_DIR/release/parley"
set -euo pipefail
cd "$(dirname "$0")/.."
PARLEY=${1:?usage: echo_run.sh PARLEY_BINARY}
CALLS=${CALLS:-100}
SECONDS_RUN=${SECONDS_RUN:-20}
TARGET=${CARGO_TARGET_DIR:-$HOME/.cache/parley/target}
LOAD=${PARLEY_LOAD:-$TARGET/release/parley-load}
work=$(mktemp -d)
server_pid=
trap 'kill $server_pid 2>/dev/null || true; rm -rf "$work"' EXIT
# The server is stopped and reaped below, so farm-bench counts its CPU with the load
# client's (the same for both binaries).
source bench/lib.sh
echo_caller_files "$work"
ulimit -n 65536 2>/dev/null || true
start_server echo --config "$work/parley.toml" --agent-mode echo --max-calls $((CALLS + 16))
"$LOAD" --addr "$addr" --pid "$server_pid" --calls "$CALLS" --transport twilio --ramp-s 5 --duration-s "$SECONDS_RUN" --wav "$work/clip.wav" --out "$work/out" | tail -1
kill -TERM "$server_pid"
wait "$server_pid" || true
