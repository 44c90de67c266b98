#!/usr/bin/env bash
# Calls carried at once over HTTP/2 (`POST /v1/stream`, h2c): all on ONE connection
# versus one connection per call, with per-call server memory and CPU. For each call
# count it runs parley-load's `stream` transport twice against the echo agent (no
# models; each caller turn is played back): `--h2-connections 1` (every call a stream
# of one shared connection) and `--h2-connections 0` (a connection per call), and prints
#   calls | connections | p99 pacing error | RSS per call | CPU per call | failed | fds peak | turn p50
#
# Honest per-call memory: every run gets a FRESH server (started before, stopped
# after), and parley-load reads that server's idle RSS before its first call; RSS per
# call = (mean RSS in steady state, after the ramp - that idle RSS) / mean connected
# calls. CPU per call = mean server CPU in steady state (% of one core) / mean
# connected calls. The load generator runs on the same machine and shares its cores.
#
# Both runs use the same config file, which raises `server.http.h2_max_concurrent_streams`
# (64 by default) above the call count so that one connection may carry every call.
# Figures and plots land in bench/out/h2-<timestamp>/<run>/.
#
#   bench/h2_calls.sh                                   # 50 and 200 calls, 30 s each
#   CALLS="50" DURATION=20 RAMP=5 bench/h2_calls.sh
#   PARLEY=/path/to/parley bench/h2_calls.sh              # a prebuilt server binary
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/parley/target}"
CALLS="${CALLS:-50 200}"
DURATION="${DURATION:-30}"
RAMP="${RAMP:-10}"
OUT="${OUT:-bench/out/h2-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
work="$OUT"

if [ -z "${PARLEY:-}" ]; then
  cargo build --release --quiet --bin parley
  PARLEY="$CARGO_TARGET_DIR/release/parley"
fi
cargo build --release --quiet -p parley-load
LOAD="$CARGO_TARGET_DIR/release/parley-load"
source bench/lib.sh

# A caller's turn: about 1.5 s of speech, echoed back after each turn.
CLIP="$OUT/clip.wav"
espeak-ng -v en-us -s 150 -w "$CLIP" "Hello, I am calling about my order." 2>/dev/null

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
server_pid=
trap 'if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi' EXIT
echo "load on this machine before the runs: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"

run() { # name calls h2-connections
  local name=$1 calls=$2 conns=$3
  local config="$OUT/$name.toml"
  printf '[server.http]\nh2_max_concurrent_streams = %d\n' $(( calls + 16 )) >"$config"
  start_server "$name" --agent-mode echo --max-calls $(( calls + 16 )) --config "$config"
  echo "$name: server pid $server_pid on $addr"
  "$LOAD" --addr "$addr" --pid "$server_pid" --calls "$calls" --transport stream --h2-connections "$conns" \
    --ramp-s "$RAMP" --duration-s "$DURATION" --wav "$CLIP" --out "$OUT/$name" | tee "$OUT/$name.txt"
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}
field() { sed -n "s/^\(.* \)\{0,1\}$2=\([^ ]*\).*/\2/p" "$OUT/$1.txt"; }

for n in $CALLS; do
  run "one-conn-$n" "$n" 1
  run "conn-per-call-$n" "$n" 0
done

echo
printf '%8s %12s %16s %14s %16s %8s %9s %10s\n' calls connections "p99 pacing (ms)" "RSS/call (MB)" "CPU/call (%core)" failed "fds peak" "turn p50"
for n in $CALLS; do
  for name in "one-conn-$n" "conn-per-call-$n"; do
    conns=1; [ "${name#conn-per-call}" != "$name" ] && conns=$n
    printf '%8s %12s %16s %14s %16s %8s %9s %10s\n' "$(field "$name" calls)" "$conns" "$(field "$name" pacing_p99_ms)" "$(field "$name" rss_per_call_mb)" \
      "$(field "$name" cpu_per_call_pct)" "$(field "$name" failed)" "$(field "$name" fds_peak)" "$(field "$name" turn_p50_ms)"
  done
done
echo "load on this machine after the runs: $(cut -d' ' -f1-3 /proc/loadavg); outputs in $OUT"
