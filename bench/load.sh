#!/usr/bin/env bash
# The echo agent under load: builds release, starts `parley serve --agent-mode echo`,
# runs parley-load at each call count (talking callers: a spoken clip on a loop, each
# turn echoed back) and once with idle callers (silence, VAD running), and prints
#   calls | p99 pacing error | RSS per call | CPU per call | failed
# Figures and plots land in bench/out/load-<timestamp>/<run>/.
#
#   bench/load.sh                       # 100 500 1000 2000 calls, 60 s each
#   CALLS="100 500" DURATION=30 RAMP=10 TRANSPORT=mixed IDLE_CALLS=500 bench/load.sh
#   PARLEY=/path/to/other/parley bench/load.sh   # another build's server
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/parley/target}"
CALLS="${CALLS:-100 500 1000 2000}"
DURATION="${DURATION:-60}"
RAMP="${RAMP:-20}"
TRANSPORT="${TRANSPORT:-twilio}"
IDLE_CALLS="${IDLE_CALLS:-500}"
OUT="${OUT:-bench/out/load-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

cargo build --release --quiet --bin parley
cargo build --release --quiet -p parley-load
PARLEY="${PARLEY:-$CARGO_TARGET_DIR/release/parley}"
LOAD="$CARGO_TARGET_DIR/release/parley-load"

# A caller's turn: about 1.5 s of speech.
CLIP="$OUT/clip.wav"
source bench/lib.sh
echo_caller_files "$OUT"

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
MAX=$(( $(echo "$CALLS $IDLE_CALLS" | tr ' ' '\n' | sort -n | tail -1) + 16 ))
"$PARLEY" serve --config "$OUT/parley.toml" --agent-mode echo --listen 127.0.0.1:0 --max-calls "$MAX" >"$OUT/server.out" 2>"$OUT/server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening on" "$OUT/server.out" 2>/dev/null && break; sleep 0.1; done
ADDR=$(sed -n 's#^parley listening on http://##p' "$OUT/server.out")
echo "echo server pid $SERVER on $ADDR; load on this machine before the runs: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"

run() { # name calls extra-args...
  local name=$1 calls=$2; shift 2
  "$LOAD" --addr "$ADDR" --pid "$SERVER" --calls "$calls" --transport "$TRANSPORT" --ramp-s "$RAMP" --duration-s "$DURATION" --out "$OUT/$name" "$@" | tee "$OUT/$name.txt"
  # Let the server wind the calls down to idle before the next run.
  for _ in $(seq 60); do [ "$(ls /proc/$SERVER/fd | wc -l)" -lt 64 ] && break; sleep 1; done
}
field() { sed -n "s/^\(.* \)\{0,1\}$2=\([^ ]*\).*/\2/p" "$OUT/$1.txt"; }

for n in $CALLS; do run "talk-$n" "$n" --wav "$CLIP"; done
run "idle-$IDLE_CALLS" "$IDLE_CALLS"

echo
printf '%-14s %8s %16s %14s %16s %8s %10s %12s\n' run calls "p99 pacing (ms)" "RSS/call (MB)" "CPU/call (%core)" failed "turn p50" "load avg"
for n in $CALLS "idle"; do
  name="talk-$n"; [ "$n" = idle ] && name="idle-$IDLE_CALLS"
  printf '%-14s %8s %16s %14s %16s %8s %10s %12s\n' "$name" "$(field "$name" calls)" "$(field "$name" pacing_p99_ms)" "$(field "$name" rss_per_call_mb)" \
    "$(field "$name" cpu_per_call_pct)" "$(field "$name" failed)" "$(field "$name" turn_p50_ms)" ""
done
echo "load on this machine after the runs: $(cut -d' ' -f1-3 /proc/loadavg); outputs in $OUT"
