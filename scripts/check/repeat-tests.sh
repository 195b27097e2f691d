#!/usr/bin/env bash
# Runs the whole test suite N times in a row (default 10) while another full
# release build of the crate loads the machine, to show the tests do not
# depend on timing. Builds the test binaries first, then starts the other
# build in its own target folder, then runs the built binaries (no second
# cargo build at the same time as the first).
#
#     scripts/check/repeat-tests.sh [N]
set -euo pipefail
cd "$(dirname "$0")/../.."
runs="${1:-10}"
cargo test --release --no-run -j2 2>/dev/null
bins=$(cargo test --release --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])')
other="$(mktemp -d)"
CARGO_TARGET_DIR="$other" cargo build --release -j1 >/dev/null 2>&1 &
load=$!
trap 'kill $load 2>/dev/null; pkill -f "$other" 2>/dev/null; rm -rf "$other"' EXIT
sleep 20
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  for b in $bins; do
    "$b" -q >"$other/run-$i-$(basename "$b").log" 2>&1 || { echo "run $i: $b FAILED"; tail -30 "$other/run-$i-$(basename "$b").log"; exit 1; }
  done
  echo "run $i: passed in $(($(date +%s) - start)) s; other build running: $(kill -0 $load 2>/dev/null && echo yes || echo no)"
done
