#!/usr/bin/env bash
# Runs the whole test suite N times in a row (default 10) while another full
# release build of the crate loads the machine the whole time (a clean build
# in its own target folder, started again each time it ends), to show the
# tests do not depend on timing. Builds the test binaries first, then starts
# the other build, then runs the built binaries.
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
(
  while [ ! -f "$other/stop" ]; do
    rm -rf "$other/target"
    CARGO_TARGET_DIR="$other/target" cargo build --release -j2 >/dev/null 2>&1 || true
  done
) &
load=$!
trap 'touch "$other/stop"; pkill -P $load 2>/dev/null; kill $load 2>/dev/null; pkill -f "$other" 2>/dev/null; rm -rf "$other"' EXIT
sleep 20
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  for b in $bins; do
    "$b" -q >"$other/run-$i-$(basename "$b").log" 2>&1 || { echo "run $i: $b FAILED"; tail -30 "$other/run-$i-$(basename "$b").log"; exit 1; }
  done
  echo "run $i: passed in $(($(date +%s) - start)) s; other build running: $(pgrep -f "$other/target" >/dev/null && echo yes || echo no); load average $(cut -d' ' -f1 /proc/loadavg)"
done
