#!/usr/bin/env bash
# How many talking calls the real models serve at once before turns slow down: a
# release `parley serve` on the default models, then parley-load with N Twilio callers
# that each ask a spoken question, listen to the answer and ask again, for each N.
# Prints per N the caller-seen turn latency (end of the question -> first answer audio)
# p50/p95, its ratio to one call's p95, server CPU and RSS, and failures; the figure
# is the largest N whose p95 stays under 2x one call's.
#
#   bash bench/talking_calls.sh                      # N = 1 2 3 4 6, 90 s each
#   CALLS="1 2 4" DURATION=60 bash bench/talking_calls.sh
#   PARLEY=~/old/parley CALLS="1 6" bash bench/talking_calls.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/parley/target}"
CALLS="${CALLS:-1 2 3 4 6}"
DURATION="${DURATION:-90}"
GAP_MS="${GAP_MS:-7000}"
OUT="${OUT:-bench/out/talking-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
work=$OUT

make -s build models >/dev/null
cargo build --release --quiet -p parley-load
# PARLEY=/path/to/another/parley measures that build instead (same models).
PARLEY="${PARLEY:-$CARGO_TARGET_DIR/release/parley}"
LOAD="$CARGO_TARGET_DIR/release/parley-load"
source bench/lib.sh

# The caller's question (about 2 s of espeak-ng speech); after it, GAP_MS of silence
# while the agent answers (a sentence or two), then the question again.
espeak-ng -v en-us -s 150 -w "$OUT/question.wav" "What is the capital of France?" 2>/dev/null
# espeak ends its file with silence; cut it, so that the end of the clip (where
# parley-load starts a turn's clock) is the end of speech.
python3 - "$OUT/question.wav" <<'PY'
import array, sys, wave
with wave.open(sys.argv[1]) as w:
    params, pcm = w.getparams(), array.array("h", w.readframes(w.getnframes()))
end = max((i for i, v in enumerate(pcm) if abs(v) > 300), default=len(pcm) - 1) + 1
with wave.open(sys.argv[1], "wb") as w:
    w.setparams(params)
    w.writeframes(pcm[:end].tobytes())
PY
printf '[server.limits]\nconnections_per_ip = 0\n' >"$OUT/parley.toml"
start_server talking --config "$OUT/parley.toml"
trap 'kill $server_pid 2>/dev/null || true' EXIT
echo "server pid $server_pid on $addr; load before the runs: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"

for n in $CALLS; do
  # Calls start one second apart, so their turns do not all fall on the same instant.
  "$LOAD" --addr "$addr" --pid "$server_pid" --calls "$n" --transport twilio --ramp-s "$n" \
    --duration-s "$DURATION" --wav "$OUT/question.wav" --gap-ms "$GAP_MS" --out "$OUT/calls-$n" | tee "$OUT/calls-$n.txt"
  sleep 3
done

python3 - "$OUT" $CALLS <<'PY'
import json, sys
out, ns = sys.argv[1], sys.argv[2:]
rows = [(int(n), json.load(open(f"{out}/calls-{n}/summary.json"))) for n in ns]
single = next((s["turn_p95_ms"] for n, s in rows if n == 1), None)
print("\nreal models, talking Twilio callers (question, answer, again); turn = end of the question -> first answer audio")
print(f"{'calls':>5} {'turns':>6} {'p50 ms':>8} {'p95 ms':>8} {'p95/1 call':>10} {'CPU %':>7} {'RSS MB':>8} {'failed':>6}")
best = None
for n, s in rows:
    ratio = s["turn_p95_ms"] / single if single else float("nan")
    if single and ratio < 2.0 and s["failed"] == 0 and s["turns"] > 0:
        best = n
    print(f"{n:>5} {s['turns']:>6} {s['turn_p50_ms']:>8.0f} {s['turn_p95_ms']:>8.0f} {ratio:>10.2f} {s['cpu_pct']:>7.0f} {s['rss_peak_mb']:>8.0f} {s['failed']:>6}")
print(f"\nconcurrent talking calls with turn p95 under 2x one call's: {best}")
PY
