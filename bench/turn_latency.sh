#!/usr/bin/env bash
# Per-turn latency, CPU per call and peak memory of spoken calls (plain and tool
# questions, streamed in real time by `parley call`), this tree's release build against
# another build side by side in one run (see bench/turn_latency.py).
#   bash bench/turn_latency.sh                          # this build only
#   BASE=/path/to/old/parley bash bench/turn_latency.sh # old vs this build
#   BASE_REV=main bash bench/turn_latency.sh            # builds that git revision first
#   ROUNDS=3 bash bench/turn_latency.sh                 # each question three times (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/parley/target}
make -s build models >/dev/null
PARLEY=$CARGO_TARGET_DIR/release/parley
builds=()
if [ -n "${BASE_REV:-}" ] && [ -z "${BASE:-}" ]; then
  # A worktree of that revision, built in its own target folder (cached across runs).
  rev=$(git rev-parse --short "$BASE_REV")
  dir=$HOME/.cache/parley/base-$rev
  [ -d "$dir/src" ] || git worktree add --detach "$dir/src" "$rev" >/dev/null
  (cd "$dir/src" && CARGO_TARGET_DIR=$dir/target cargo build --release --quiet --bin parley)
  BASE=$dir/target/release/parley
fi
[ -n "${BASE:-}" ] && builds+=("base=$BASE")
builds+=("new=$PARLEY")
python3 bench/turn_latency.py "$PARLEY" "${builds[@]}"
