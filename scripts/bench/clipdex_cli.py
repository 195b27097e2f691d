"""What the benchmark scripts share: the project's paths and running the
built `clipdex` binary."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIPDEX = ROOT / "target" / "release" / "clipdex"


def run(*args):
    """`clipdex ARGS`' standard output; exits with its message when it fails."""
    out = subprocess.run([str(CLIPDEX), *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"clipdex {' '.join(map(str, args[:2]))} failed: {out.stderr.strip()}")
    return out.stdout


def json_lines(text):
    """The objects of JSON-lines output (`--json` searches)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]
