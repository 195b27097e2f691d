#!/usr/bin/env python3
"""One-off clipdex commands under several binaries, alternated command by
command, round by round (this host drifts 10 to 30% between minutes, so
runs that follow each other are compared): the median wall time of each
binary, its ratio to the first binary's, and the largest peak resident set
(`/usr/bin/time -f %M`).

    python3 scripts/bench/ab_command.py BIN1,BIN2[,...] [--rounds 9] \\
        [--command 'search "a dog on a beach" --index I -k 3' ...]

Without `--command`, the loading benchmark of BENCHMARKS.md ("Loading:
the image tower left for later"): a one-off search on the 10,000-photo
`fast` index of `cargo bench --bench server -- --precision fast`, and
`embed --text` in each precision on the random ViT-B/32 of the model
bench. For a change against its parent commit: build the parent, copy
its target/release/clipdex to /tmp/before, build the change, then

    python3 scripts/bench/ab_command.py /tmp/before,target/release/clipdex

Every run must succeed; a failing one stops the script with its output.
"""

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
MODEL = os.path.join(ROOT, "target/bench/vit-b-32")
INDEX = os.path.join(ROOT, "target/bench/index-10000-fast")
TEXT = "a dog on a beach"


def default_commands():
    commands = [["search", TEXT, "--index", INDEX, "-k", "3"]]
    for precision in ["fast", "exact", "int8"]:
        commands.append(
            ["embed", "--model", MODEL, "--precision", precision, "--text", TEXT]
        )
    return commands


def run(binary, args):
    """Wall seconds and peak resident KiB of one run."""
    start = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%M", binary, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{binary} {shlex.join(args)} failed:\n{done.stderr}")
    return wall, int(done.stderr.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("binaries", help="comma-separated clipdex binaries")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--command",
        action="append",
        help="a clipdex command line (repeatable); the loading benchmark by default",
    )
    opts = parser.parse_args()
    binaries = opts.binaries.split(",")
    for binary in binaries:
        if not os.access(binary, os.X_OK):
            sys.exit(f"not an executable: {binary}")
    commands = [shlex.split(c) for c in opts.command] if opts.command else default_commands()
    for args in commands:
        walls = {b: [] for b in binaries}
        peaks = {b: [] for b in binaries}
        for _ in range(opts.rounds):
            for binary in binaries:
                wall, peak = run(binary, args)
                walls[binary].append(wall)
                peaks[binary].append(peak)
        base = statistics.median(walls[binaries[0]])
        print(f"clipdex {shlex.join(args)}")
        for binary in binaries:
            median = statistics.median(walls[binary])
            print(
                f"  {binary}: {median * 1000:.0f} ms ({median / base:.2f}x), "
                f"peak {max(peaks[binary]) / 1024:.0f} MiB"
            )


if __name__ == "__main__":
    main()
