#!/usr/bin/env bash
# Soak: CALLS echo-agent callers (Twilio, talking on a loop) for MINUTES, each call
# hanging up after CALL_S seconds and replaced at once; then checks what an operator
# would: RSS flat after warm-up (growth over the last 40 minutes, or the last two
# thirds of a shorter run, under 5 %), file descriptors and the active-calls gauge back
# to idle once the callers are gone, and no failed call. Samples, per-call rows and a
# plot land in bench/out/soak-<timestamp>/.
#
#   bash bench/soak.sh                         # 100 calls, 60 minutes, 60 s calls
#   CALLS=50 MINUTES=5 CALL_S=20 bash bench/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/parley/target}"
CALLS="${CALLS:-100}"
MINUTES="${MINUTES:-60}"
CALL_S="${CALL_S:-60}"
OUT="${OUT:-bench/out/soak-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

cargo build --release --quiet --bin parley
cargo build --release --quiet -p parley-load
PARLEY="$CARGO_TARGET_DIR/release/parley"
LOAD="$CARGO_TARGET_DIR/release/parley-load"
source bench/lib.sh
work="$OUT"
echo_caller_files "$OUT"
ulimit -n 65536 2>/dev/null || true
start_server soak --config "$OUT/parley.toml" --agent-mode echo --max-calls $((CALLS * 2))
trap 'kill $server_pid 2>/dev/null || true' EXIT
fds() { ls "/proc/$server_pid/fd" | wc -l; }
gauge() { curl -s "http://$addr/metrics" | sed -n 's/^parley_calls_active \([0-9]*\).*/\1/p'; }
IDLE_FDS=$(fds)
echo "soak: $CALLS calls x ${MINUTES} min, ${CALL_S} s each, server pid $server_pid on $addr; idle fds $IDLE_FDS; load $(cut -d' ' -f1-3 /proc/loadavg)"

"$LOAD" --addr "$addr" --pid "$server_pid" --calls "$CALLS" --transport twilio --ramp-s 30 \
  --duration-s $((MINUTES * 60 - 30)) --call-s "$CALL_S" --wav "$OUT/clip.wav" --out "$OUT/run" | tee "$OUT/run.txt"

# Calls end on the server once their sockets close; give it a moment.
for _ in $(seq 30); do [ "$(gauge)" = "0" ] && [ "$(fds)" -le $((IDLE_FDS + 2)) ] && break; sleep 1; done
END_FDS=$(fds); END_GAUGE=$(gauge)

python3 - "$OUT/run/samples.csv" "$MINUTES" "$IDLE_FDS" "$END_FDS" "$END_GAUGE" "$OUT/run.txt" <<'PY'
import csv, re, sys
path, minutes, idle_fds, end_fds, end_gauge, summary = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
rows = [r for r in csv.DictReader(open(path)) if float(r["rss_mb"]) > 0]
end = float(rows[-1]["t_s"])
window = min(40 * 60, end * 2 / 3)
start = end - window
def rss_near(t):
    near = [float(r["rss_mb"]) for r in rows if abs(float(r["t_s"]) - t) <= 30]
    return sum(near) / len(near)
first, last = rss_near(start + 30), rss_near(end - 30)
growth = (last - first) / first * 100
line = open(summary).read().strip().splitlines()[-1]
failed = int(re.search(r"failed=(\d+)", line).group(1))
attempts = int(re.search(r"attempts=(\d+)", line).group(1))
print(f"RSS over the last {window/60:.0f} min: {first:.1f} MB -> {last:.1f} MB ({growth:+.2f} %), peak {max(float(r['rss_mb']) for r in rows):.1f} MB")
print(f"calls: {attempts} started, {failed} failed")
print(f"after the callers left: fds {end_fds} (idle before: {idle_fds}), parley_calls_active {end_gauge}")
ok = growth < 5 and failed == 0 and end_gauge == "0" and end_fds <= idle_fds + 2
print("soak: PASS" if ok else "soak: FAIL")
sys.exit(0 if ok else 1)
PY
