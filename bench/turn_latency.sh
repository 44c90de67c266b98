#!/usr/bin/env bash
# Per-turn latency of spoken questions against a release build on the CPU models.
# Starts a server, asks each question with `parley call` (audio streamed in real time),
# and prints a table of each stage's latency from the end of the caller's speech.
#   bash bench/turn_latency.sh            # the five default questions
#   ROUNDS=3 bash bench/turn_latency.sh   # each question three times
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/parley/target}
make -s build models >/dev/null
PARLEY=$CARGO_TARGET_DIR/release/parley
ROUNDS=${ROUNDS:-1}
work=$(mktemp -d)
trap 'kill $server_pid 2>/dev/null || true; rm -rf "$work"' EXIT

source bench/lib.sh
start_server main

questions=(
  "What is the capital of France?"
  "How many days are there in a week?"
  "What color is the sky on a clear day?"
  "Can you recommend a good book to read?"
  "What is the tallest mountain in the world?"
)
for r in $(seq "$ROUNDS"); do
  for i in "${!questions[@]}"; do
    espeak-ng -v en-us -s 150 -w "$work/q$i.wav" "${questions[$i]}"
    $PARLEY call "$work/q$i.wav" --url "ws://$addr/v1/realtime" --out "$work/a$i.wav" \
      --metrics-out "$work/metrics.jsonl" >"$work/call$i.out"
    sed -n 's/^you: /  heard: /p; s/^agent: /  said:  /p' "$work/call$i.out"
  done
done
python3 - "$work/metrics.jsonl" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
cols = [("endpoint_ms", "endpoint"), ("asr_ms", "asr"), ("transcript_ms", "transcript"),
        ("prefill_ms", "prefill"), ("first_token_ms", "1st token"), ("first_tts_ms", "1st tts"),
        ("first_audio_ms", "1st audio"), ("client_first_audio_ms", "client 1st audio")]
print("\nms from end of caller speech (endpoint = VAD silence window; asr, prefill, 1st tts = stage durations)")
print(f"{'turn':>4} {'prompt':>6} " + " ".join(f"{h:>16}" for _, h in cols))
for i, r in enumerate(rows, 1):
    print(f"{i:>4} {r['prompt_tokens']:>6} " + " ".join(f"{(r.get(k) or float('nan')):>16.0f}" for k, _ in cols))
print(f"{'med':>4} {'':>6} " + " ".join(f"{st.median([r.get(k) or 0 for r in rows]):>16.0f}" for k, _ in cols))
PY
