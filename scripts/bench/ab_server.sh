#!/usr/bin/env bash
# Two clipdex binaries under the server benchmark, alternated in the order
# before, after, after, before, before, after (so that neither is always the
# first after a quiet or a busy minute: this host drifts 10 to 30% between
# minutes), each put in turn at target/release/clipdex, where the benchmark
# starts it. Prints every run's text queries/s and the ratio of the means,
# then puts back the binary that was there.
#   scripts/bench/ab_server.sh BEFORE AFTER [server benchmark arguments]
# For a change against its parent commit: build the parent, copy its
# target/release/clipdex to /tmp/before, build the change, then
#   scripts/bench/ab_server.sh /tmp/before target/release/clipdex \
#     --photos 10000 --seconds 20 --precision fast --queries mixed
# Set ROUNDS for more than three of each.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 2 ]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
BEFORE=$1 AFTER=$2
shift 2
ROUNDS=${ROUNDS:-3}
SERVED=target/release/clipdex
KEEP=$(mktemp -d)
trap 'cp "$KEEP/kept" "$SERVED" 2>/dev/null; rm -rf "$KEEP"' EXIT
cp "$SERVED" "$KEEP/kept"
cp "$BEFORE" "$KEEP/before"
cp "$AFTER" "$KEEP/after"
cargo bench -j2 --bench server --no-run 2>/dev/null
BENCH=$(ls -t target/release/deps/server-* | grep -v '\.d$' | head -1)
RESULTS="$KEEP/results"
for round in $(seq 1 "$ROUNDS"); do
  case $((round % 2)) in
    1) order="before after" ;;
    0) order="after before" ;;
  esac
  for which in $order; do
    cp "$KEEP/$which" "$SERVED"
    line=$("$BENCH" "$@" | grep '^text query')
    # The label, then req/s, p50, p99 and errors.
    rate=$(awk '{print $(NF-3)}' <<<"$line")
    echo "$(date +%T) $which: $line"
    echo "$which $rate" >>"$RESULTS"
  done
done
awk '
  { sum[$1] += $2; n[$1]++; runs[$1] = runs[$1] " " $2 }
  END {
    b = sum["before"] / n["before"]; a = sum["after"] / n["after"]
    printf "before:%s (mean %.1f)\nafter:%s (mean %.1f)\nratio of means: %.2fx\n",
      runs["before"], b, runs["after"], a, a / b
  }' "$RESULTS"
