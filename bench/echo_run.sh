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
WORK=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
# The server is stopped and reaped below, so farm-bench counts its CPU with the load
# client's (the same for both binaries).
espeak-ng -v en-us -s 150 -w "$WORK/clip.wav" "Hello, I am calling about my order." 2>/dev/null
printf '[server.limits]\nconnections_per_ip = 0\n' >"$WORK/parley.toml"
ulimit -n 65536 2>/dev/null || true
"$PARLEY" serve --config "$WORK/parley.toml" --agent-mode echo --listen 127.0.0.1:0 --max-calls $((CALLS + 16)) >"$WORK/server.out" 2>/dev/null &
SERVER=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/server.out" 2>/dev/null && break; sleep 0.1; done
ADDR=$(sed -n 's#^parley listening on http://##p' "$WORK/server.out")
"$LOAD" --addr "$ADDR" --pid "$SERVER" --calls "$CALLS" --transport twilio --ramp-s 5 --duration-s "$SECONDS_RUN" --wav "$WORK/clip.wav" --out "$WORK/out" | tail -1
kill -TERM "$SERVER"
wait "$SERVER" || true
