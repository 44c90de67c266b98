#!/usr/bin/env bash
# What reusing each call's KV cache between turns saves, on a release build with the
# CPU models. Plays one scripted six-turn pharmacy conversation (text turns, the
# built-in pharmacy tools on) against a server with `llm.kv_reuse = true` (the
# default), then against one with it off, and prints per turn, side by side: prompt
# tokens, cached tokens, prefill ms, and the client's time from sending the turn to
# the first agent audio; then the off/on ratios of total prefill and median time to
# first audio.
#
# Per turn means what the server's `parley.turn.metrics` event reports: prompt,
# cached and prefill are those of the turn's first generation; when the model calls
# a tool, the generations after the tool results are not in them (but are in the time
# to first audio). The server's own first-token time is only measured from the end of
# speech, so text turns have none: the client's time to first audio (which includes
# synthesizing the first phrase, the same work in both runs) stands in for it.
#   bash bench/kv_reuse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/parley/target}
make -s build models >/dev/null
PARLEY=$CARGO_TARGET_DIR/release/parley
work=$(mktemp -d)
source bench/lib.sh
server_pid=
trap 'if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi; rm -rf "$work"' EXIT

turns=(
  "Hi, my member ID is 1001. What is the status of my order?"
  "Which medication is in that order?"
  "What quantity am I getting?"
  "How many refills do I have left on that prescription?"
  "When can I pick up the order?"
  "Please request a refill for that prescription."
)
text_args=()
for t in "${turns[@]}"; do text_args+=(--text "$t"); done

# run MODE KV_REUSE: one server with that setting (and a fresh pharmacy database),
# the whole conversation in one call, metrics to $work/MODE.jsonl.
run() {
  local mode=$1 reuse=$2
  printf '[llm]\nkv_reuse = %s\n\n[tools]\npharmacy_db = "%s"\n' "$reuse" "$work/pharmacy-$mode.sqlite" >"$work/$mode.toml"
  start_server "$mode" --config "$work/$mode.toml"
  echo "kv_reuse = $reuse:"
  $PARLEY call "${text_args[@]}" --url "ws://$addr/v1/realtime" --out "$work/$mode.wav" \
    --timeout 1800 --metrics-out "$work/$mode.jsonl" >"$work/call-$mode.out"
  sed -n 's/^you: /  caller: /p; s/^agent: /  agent:  /p' "$work/call-$mode.out"
  kill "$server_pid"
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}
run on true
run off false

python3 - "$work/on.jsonl" "$work/off.jsonl" <<'PY'
import json, sys, statistics as st
on, off = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
if len(on) != len(off):
    sys.exit(f"turn counts differ: {len(on)} with reuse, {len(off)} without")
ttfa = "client_sent_to_first_audio_ms"
def ms(v):
    return f"{v:.0f}" if isinstance(v, (int, float)) else "-"
print("\nper turn (prompt, cached, prefill: the turn's first generation; 1st audio: client, from sending the turn)")
print(f"{'':4} | {'reuse on':^33} | {'reuse off':^33}")
head = f"{'prompt':>6} {'cached':>6} {'prefill':>8} {'1st audio':>9}"
print(f"{'turn':>4} | {head} | {head}")
for i, (a, b) in enumerate(zip(on, off), 1):
    cells = [f"{r['prompt_tokens']:>6} {r['cached_tokens']:>6} {ms(r['prefill_ms']):>8} {ms(r.get(ttfa)):>9}" for r in (a, b)]
    print(f"{i:>4} | {cells[0]} | {cells[1]}")
total_on, total_off = (sum(r["prefill_ms"] for r in rows) for rows in (on, off))
def median(rows):
    vals = [r[ttfa] for r in rows if isinstance(r.get(ttfa), (int, float))]
    return st.median(vals) if vals else float("nan")
med_on, med_off = median(on), median(off)
print(f"\ntotal prefill: on {total_on:.0f} ms, off {total_off:.0f} ms, off/on {total_off / max(total_on, 1e-9):.2f}x")
print(f"median time to first audio: on {med_on:.0f} ms, off {med_off:.0f} ms, off/on {med_off / med_on:.2f}x")
PY
