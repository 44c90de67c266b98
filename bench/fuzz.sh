#!/usr/bin/env bash
# Long fuzz runs (issue 13, item 3): every target in bench/fuzz/ under libFuzzer for
# SECONDS each (default 600), one job per core (JOBS=1 on a shared machine), corpus
# kept in bench/fuzz/corpus/ and started from the seeds in bench/fuzz/seeds/<target>/.
# Prints the executions per target; a crash leaves its input in
# bench/fuzz/artifacts/<target>/ (turn it into a regression unit test next to the
# parser), and the script exits non-zero.
#
#   bench/fuzz.sh                 # all targets, 10 minutes each
#   SECONDS_PER_TARGET=60 bench/fuzz.sh twilio_messages
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ=(--fuzz-dir bench/fuzz)
OUT=bench/fuzz
SECS="${SECONDS_PER_TARGET:-600}"
JOBS="${JOBS:-$(nproc)}"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || mapfile -t TARGETS < <(cargo +nightly fuzz list "${FUZZ[@]}")
# Coverage-guided, no sanitizer: the code under test is safe Rust (plus libopus),
# and the builds stay small and fast.
cargo +nightly fuzz build "${FUZZ[@]}" --release --sanitizer none >/dev/null
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "$OUT/corpus/$t" "$OUT/logs"
  # The committed seeds (the corpus itself is not committed) start every run.
  if [ -d "$OUT/seeds/$t" ]; then cp -n "$OUT/seeds/$t"/* "$OUT/corpus/$t"/ 2>/dev/null || true; fi
  log="$OUT/logs/$t.log"
  if cargo +nightly fuzz run "${FUZZ[@]}" --release --sanitizer none "$t" "$OUT/corpus/$t" -- \
      -max_total_time="$SECS" -fork="$JOBS" -ignore_crashes=0 -rss_limit_mb=2048 -max_len=65536 >"$log" 2>&1; then
    result=ok
  else
    result=CRASH; status=1
  fi
  # libFuzzer's last stats line carries the total executions.
  execs=$(grep -oE '(#[0-9]+|execs: [0-9]+)' "$log" | tail -1 | tr -dc '0-9')
  printf '%-18s %-6s executions=%s seconds=%s\n' "$t" "$result" "${execs:-?}" "$SECS"
done
exit $status
