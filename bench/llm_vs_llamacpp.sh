#!/usr/bin/env bash
# Parley's embedded LLM engine against llama.cpp's llama-server on the same GGUF, the
# same token ids and the same thread count, in one run: prefill tok/s at ~150 and ~650
# prompt tokens, decode tok/s over 128 greedy tokens (end tokens ignored), and resident
# memory. Rounds alternate the two engines so a drifting machine hits both alike.
#   bash bench/llm_vs_llamacpp.sh                 # 3 rounds, 2 threads
#   ROUNDS=5 THREADS=1 bash bench/llm_vs_llamacpp.sh
#   EXTRA="--dequantize" bash bench/llm_vs_llamacpp.sh   # Parley's old f32 path
# Needs llama-server (built once by `make llama-server`, ~20 min) and the models.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/parley/target}
export PARLEY_MODELS_DIR=${PARLEY_MODELS_DIR:-$HOME/.cache/parley/models}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
DECODE=${DECODE:-128}
EXTRA=${EXTRA:-}
GGUF=${GGUF:-$PARLEY_MODELS_DIR/llm/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}

make -s models >/dev/null
LLAMA=$(bash scripts/llama-server.sh)
cargo build --release --quiet -p parley-llm --example llm_speed
SPEED=$CARGO_TARGET_DIR/release/examples/llm_speed

work=$(mktemp -d)
llama_pid=
trap 'kill $llama_pid 2>/dev/null || true; rm -rf "$work"' EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$LLAMA" -m "$GGUF" -t "$THREADS" -tb "$THREADS" -c 4096 -np 1 --host 127.0.0.1 --port "$port" \
  >"$work/llama.log" 2>&1 &
llama_pid=$!
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { tail -20 "$work/llama.log"; exit 1; }

# The prompts' token ids come from Parley's tokenizer; llama-server gets the same ids.
PARLEY_MODEL_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS "$SPEED" --gguf "$GGUF" $EXTRA \
  --prompt-tokens 150 --prompt-tokens 650 --decode 8 --ids-out "$work/ids.jsonl" >/dev/null

llama_once() { # prints one key=value line per prompt
  while read -r ids; do
    curl -sf "http://127.0.0.1:$port/completion" -H 'content-type: application/json' \
      -d "{\"prompt\": $ids, \"n_predict\": $DECODE, \"ignore_eos\": true, \"cache_prompt\": false,
           \"temperature\": 0, \"top_k\": 1}" |
      python3 -c 'import json,sys; t=json.load(sys.stdin)["timings"]
print("engine=llama.cpp prompt_tokens=%d prefill_ms=%.0f prefill_tok_s=%.1f decode_tokens=%d decode_ms=%.0f decode_tok_s=%.2f" % (t["prompt_n"], t["prompt_ms"], t["prompt_per_second"], t["predicted_n"], t["predicted_ms"], t["predicted_per_second"]))'
  done <"$work/ids.jsonl"
}

llama_once >/dev/null # warm-up
for r in $(seq "$ROUNDS"); do
  PARLEY_MODEL_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS "$SPEED" --gguf "$GGUF" $EXTRA \
    --prompt-tokens 150 --prompt-tokens 650 --decode "$DECODE" | grep prompt_tokens >>"$work/results.txt"
  llama_once >>"$work/results.txt"
done
llama_rss=$(awk '/VmHWM/ {print $2/1024}' "/proc/$llama_pid/status")
parley_rss=$(sed -n 's/.*peak_rss_mb=\([0-9.]*\).*/\1/p' "$work/results.txt" | sort -n | tail -1)

python3 - "$work/results.txt" "$llama_rss" "$parley_rss" "$THREADS" "$ROUNDS" <<'PY'
import sys, statistics as st
rows = [dict(kv.split("=", 1) for kv in line.split()) for line in open(sys.argv[1])]
llama_rss, parley_rss, threads, rounds = float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
def med(engine, size_pred, key):
    vals = [float(r[key]) for r in rows if r["engine"] == engine and size_pred(int(r["prompt_tokens"]))]
    return st.median(vals), min(vals), max(vals)
small, large = (lambda n: n < 400), (lambda n: n >= 400)
print(f"\nParley engine vs llama.cpp llama-server, same GGUF and token ids, {threads} threads, "
      f"{rounds} rounds (median, min-max)\n")
print(f"{'measure':34} {'parley':>20} {'llama.cpp':>20} {'parley/llama':>13}")
for label, pred, key in [("prefill tok/s, ~150-token prompt", small, "prefill_tok_s"),
                         ("prefill tok/s, ~650-token prompt", large, "prefill_tok_s"),
                         ("decode tok/s (after ~150)", small, "decode_tok_s"),
                         ("decode tok/s (after ~650)", large, "decode_tok_s")]:
    p, l = med("parley", pred, key), med("llama.cpp", pred, key)
    print(f"{label:34} {p[0]:8.1f} ({p[1]:.1f}-{p[2]:.1f}) {l[0]:8.1f} ({l[1]:.1f}-{l[2]:.1f}) {p[0]/l[0]:12.2f}x")
print(f"{'peak RSS MB':34} {parley_rss:20.0f} {llama_rss:20.0f} {parley_rss/llama_rss:12.2f}x")
PY
