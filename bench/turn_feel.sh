#!/usr/bin/env bash
# How a conversation feels, over many trials (not a test): barge-in reaction,
# false interruptions on noise bursts, premature cut-offs on digit strings read with
# pauses, and end-of-turn delay. Real server, real models, audio in real time.
#   bash bench/turn_feel.sh             # 5 trials of each
#   TRIALS=10 bash bench/turn_feel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/parley/target}
make -s build models >/dev/null
cargo run --release --quiet -p parley-tests --example turn_feel
