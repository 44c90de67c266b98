#!/usr/bin/env bash
# Task success rate of the agent on the scripted pharmacy conversations
# (bench/eval/pharmacy.toml), run in-process through the real agent and models.
#   bash bench/eval.sh                          # the default model (Qwen2.5-Coder-0.5B)
#   bash bench/eval.sh --model qwen1.5b         # the optional 1.5B (installed on first use)
#   bash bench/eval.sh --only refill --verbose  # some conversations, every turn printed
# Any other `parley eval` option passes through. Prints one line per conversation,
# then the success rate and turns per second.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/parley/target}
make -s build models >/dev/null
PARLEY=$CARGO_TARGET_DIR/release/parley

# The 1.5B model is an optional install: fetch it when asked for.
for arg in "$@"; do
  case "$arg" in
    qwen1.5b|qwen2.5-coder-1.5b) $PARLEY models install --extra qwen1.5b ;;
  esac
done

exec $PARLEY eval "$@"
