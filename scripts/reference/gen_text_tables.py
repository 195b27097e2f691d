#!/usr/bin/env python3
"""Generates src/model/text_tables.rs, the data behind src/model/text_clean.rs.

open_clip's default text cleaning (`SimpleTokenizer(clean="lower")`) runs
`ftfy.fix_text`, Python's `html.unescape` twice, `str.strip`, `str.split` and
`str.lower`. The Rust port hand-writes the algorithms; every character set and
mapping they use is taken here from the Python that open_clip runs on, so the
two cannot drift apart by a typo:

  HTML5               html.entities.html5, the named references html.unescape knows
  INVALID_CHARREFS    html._invalid_charrefs (numeric references HTML5 remaps)
  INVALID_CODEPOINTS  html._invalid_codepoints (numeric references that vanish)
  FTFY_UPPERCASE      the upper-case spellings ftfy.chardata.HTML_ENTITIES adds to
                      the HTML5 names that end in ";" (ftfy's own unescape_html)
  C1_CONTROLS         what ftfy.fixes.fix_c1_controls makes of each character
  LIGATURES           what ftfy.fixes.fix_latin_ligatures makes of each character
  WIDTH_MAP           what ftfy.fixes.fix_character_width makes of each character
  CURLY_QUOTES        what ftfy.fixes.uncurl_quotes makes of each character
  LINE_BREAKS         characters ftfy.fixes.fix_line_breaks turns into "\\n"
  CONTROL_CHARS       characters ftfy.fixes.remove_control_chars deletes
  ANSI_PARAMS         characters ftfy.fixes.ANSI_RE accepts between "ESC [" and the
                      final letter ("\\d" is Unicode-aware in Python's re, and ";")
  ANSI_FINALS         characters ANSI_RE accepts as the final letter
  PY_WHITESPACE       characters for which str.isspace() is true (str.strip, str.split)

The character tables are found by running each fixer on every code point, and
checked against the dictionaries ftfy builds them from.

Usage (from the repository root, with the reference venv):

  .venv-ref/bin/python scripts/reference/gen_text_tables.py
"""

from __future__ import annotations

import html
import html.entities
import platform
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import ftfy
from ftfy import chardata, fixes

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "src" / "model" / "text_tables.rs"

# Every code point a Python str can hold, less the surrogates a Rust str cannot.
ALL_CHARS = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]


def rust_str(s: str) -> str:
    """A Rust string literal: printable ASCII as is, everything else as \\u{..}."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(f"\\u{{{ord(ch):x}}}")
    return '"' + "".join(out) + '"'


def rust_char(ch: str) -> str:
    assert len(ch) == 1
    if ch in "'\\":
        return "'\\" + ch + "'"
    if " " <= ch <= "~":
        return f"'{ch}'"
    return f"'\\u{{{ord(ch):x}}}'"


def ranges(chars: list[str]) -> list[tuple[str, str]]:
    """Sorted characters folded into inclusive (first, last) runs."""
    runs: list[tuple[str, str]] = []
    for ch in sorted(chars):
        if runs and ord(runs[-1][1]) + 1 == ord(ch):
            runs[-1] = (runs[-1][0], ch)
        else:
            runs.append((ch, ch))
    return runs


def char_map(fixer) -> dict[str, str]:
    """What a per-character fixer does to each code point it changes."""
    changed = {}
    for ch in ALL_CHARS:
        fixed = fixer(ch)
        if fixed != ch:
            changed[ch] = fixed
    return changed


def by_key(pairs: dict[str, str]) -> list[tuple[str, str]]:
    # Rust compares str by UTF-8 bytes; sort the same way so binary search works.
    return sorted(pairs.items(), key=lambda kv: kv[0].encode())


def main() -> None:
    html5 = html.entities.html5
    invalid_charrefs = html._invalid_charrefs  # type: ignore[attr-defined]
    invalid_codepoints = html._invalid_codepoints  # type: ignore[attr-defined]

    c1 = char_map(fixes.fix_c1_controls)
    assert all(chardata.C1_CONTROL_RE.fullmatch(ch) for ch in c1)
    assert all(len(v) == 1 for v in c1.values())

    ligatures = char_map(fixes.fix_latin_ligatures)
    assert ligatures == {chr(k): v for k, v in chardata.LIGATURES.items()}

    width = char_map(fixes.fix_character_width)
    assert width == {chr(k): v for k, v in chardata.WIDTH_MAP.items()}

    # ftfy's table is every HTML5 name that ends in ";", plus upper-case spellings.
    uppercase = {k[1:]: v for k, v in chardata.HTML_ENTITIES.items() if k[1:] not in html5}
    assert chardata.HTML_ENTITIES == {
        **{"&" + k: v for k, v in html5.items() if k.endswith(";")},
        **{"&" + k: v for k, v in uppercase.items()},
    }

    quotes = char_map(fixes.uncurl_quotes)
    assert all(v in ("'", '"') for v in quotes.values())

    line_breaks = [ch for ch, v in char_map(fixes.fix_line_breaks).items() if v == "\n"]
    assert fixes.fix_line_breaks("\r\n") == "\n"

    controls = [ch for ch, v in char_map(fixes.remove_control_chars).items() if v == ""]
    assert sorted(controls) == sorted(chr(k) for k in chardata.CONTROL_CHARS)

    ansi = fixes.ANSI_RE
    assert ansi.pattern == "\033\\[((?:\\d|;)*)([a-zA-Z])", "ftfy's ANSI_RE changed: update text_clean.rs"
    ansi_params = [ch for ch in ALL_CHARS if ansi.fullmatch("\033[" + ch + "m")]
    ansi_finals = [ch for ch in ALL_CHARS if ansi.fullmatch("\033[" + ch)]

    assert chardata.HTML_ENTITY_RE.pattern == r"&#?[0-9A-Za-z]{1,24};", "ftfy's HTML_ENTITY_RE changed"
    assert html._charref.pattern == (  # type: ignore[attr-defined]
        r"&(#[0-9]+;?" r"|#[xX][0-9a-fA-F]+;?" r"|[^\t\n\f <&#;]{1,32};?)"
    ), "html._charref changed: update text_clean.rs"

    whitespace = [ch for ch in ALL_CHARS if ch.isspace()]
    assert all("a b".replace(" ", ch).split() == ["a", "b"] for ch in whitespace)

    lines = [
        "//! Data tables for `text_clean`: generated, do not edit.",
        "//!",
        "//! Written by `scripts/reference/gen_text_tables.py` from Python "
        f"{platform.python_version()} (Unicode {unicodedata.unidata_version}) and ftfy {ftfy.__version__};",
        "//! regenerate with `.venv-ref/bin/python scripts/reference/gen_text_tables.py`.",
        "//! Sorted tables are searched with `binary_search_by`.",
        "",
        "/// `html.entities.html5`: named character references, without the `&`,",
        "/// with and without the `;` as the standard lists them, sorted by name.",
        "pub(super) static HTML5: &[(&str, &str)] = &[",
    ]
    lines += [f"    ({rust_str(k)}, {rust_str(v)})," for k, v in by_key(html5)]
    lines += [
        "];",
        "",
        "/// `html._invalid_charrefs`: numeric references that HTML5 reads as another character.",
        "pub(super) static INVALID_CHARREFS: &[(u32, char)] = &[",
    ]
    lines += [f"    (0x{k:x}, {rust_char(v)})," for k, v in sorted(invalid_charrefs.items())]
    lines += [
        "];",
        "",
        "/// `html._invalid_codepoints`: numeric references that decode to nothing.",
        "pub(super) static INVALID_CODEPOINTS: &[u32] = &[",
    ]
    lines += [f"    0x{k:x}," for k in sorted(invalid_codepoints)]
    lines += [
        "];",
        "",
        "/// The rest of `ftfy.chardata.HTML_ENTITIES`, the references ftfy's `unescape_html`",
        "/// decodes besides the `HTML5` names that end in `;`: upper-case spellings of",
        "/// lower-case names (`EACUTE;` for `eacute;`), without the `&`, sorted.",
        "pub(super) static FTFY_UPPERCASE: &[(&str, &str)] = &[",
    ]
    lines += [f"    ({rust_str(k)}, {rust_str(v)})," for k, v in by_key(uppercase)]
    lines += [
        "];",
        "",
        "/// `ftfy.fixes.fix_c1_controls`: each C1 control read as Windows-1252 (ftfy's",
        "/// sloppy codec keeps the five bytes Windows-1252 leaves undefined).",
        "pub(super) static C1_CONTROLS: &[(char, char)] = &[",
    ]
    lines += [f"    ({rust_char(k)}, {rust_char(v)})," for k, v in sorted(c1.items())]
    lines += [
        "];",
        "",
        "/// `ftfy.fixes.fix_latin_ligatures` (`ftfy.chardata.LIGATURES`).",
        "pub(super) static LIGATURES: &[(char, &str)] = &[",
    ]
    lines += [f"    ({rust_char(k)}, {rust_str(v)})," for k, v in sorted(ligatures.items())]
    lines += [
        "];",
        "",
        "/// `ftfy.fixes.fix_character_width` (`ftfy.chardata.WIDTH_MAP`: U+3000 and the",
        "/// NFKC forms of U+FF01..U+FFEF).",
        "pub(super) static WIDTH_MAP: &[(char, &str)] = &[",
    ]
    lines += [f"    ({rust_char(k)}, {rust_str(v)})," for k, v in sorted(width.items())]
    lines += [
        "];",
        "",
        "/// `ftfy.fixes.uncurl_quotes`: curly quotes and their straight replacements.",
        "pub(super) static CURLY_QUOTES: &[(char, char)] = &[",
    ]
    lines += [f"    ({rust_char(k)}, {rust_char(v)})," for k, v in sorted(quotes.items())]
    lines += [
        "];",
        "",
        "/// `ftfy.fixes.fix_line_breaks`: characters that become `\\n` (a `\\r\\n` pair",
        "/// becomes a single one).",
        "pub(super) static LINE_BREAKS: &[char] = &[",
    ]
    lines += [f"    {rust_char(k)}," for k in sorted(line_breaks)]
    lines += [
        "];",
        "",
        "/// `ftfy.fixes.remove_control_chars` (`ftfy.chardata.CONTROL_CHARS`): deleted characters.",
        "pub(super) static CONTROL_CHARS: &[char] = &[",
    ]
    lines += [f"    {rust_char(k)}," for k in sorted(controls)]
    lines += [
        "];",
        "",
        "/// `ftfy.fixes.ANSI_RE`'s `(?:\\d|;)*`: Python's Unicode decimal digits and `;`,",
        "/// as inclusive ranges.",
        "pub(super) static ANSI_PARAMS: &[(char, char)] = &[",
    ]
    lines += [f"    ({rust_char(a)}, {rust_char(b)})," for a, b in ranges(ansi_params)]
    lines += [
        "];",
        "",
        "/// `ftfy.fixes.ANSI_RE`'s final `[a-zA-Z]`, as inclusive ranges.",
        "pub(super) static ANSI_FINALS: &[(char, char)] = &[",
    ]
    lines += [f"    ({rust_char(a)}, {rust_char(b)})," for a, b in ranges(ansi_finals)]
    lines += [
        "];",
        "",
        "/// Characters for which Python's `str.isspace()` is true: what `str.strip()`",
        "/// and `str.split()` treat as whitespace.",
        "pub(super) static PY_WHITESPACE: &[char] = &[",
    ]
    lines += [f"    {rust_char(k)}," for k in sorted(whitespace)]
    lines += ["];", ""]

    OUT.write_text("\n".join(lines))
    # Lay the file out as `cargo fmt` would, so formatting checks pass on it.
    if shutil.which("rustfmt"):
        subprocess.run(["rustfmt", "--edition", "2024", str(OUT)], check=True)
    else:
        print("rustfmt not found: run `cargo fmt` before committing", file=sys.stderr)
    print(f"{OUT.relative_to(ROOT)}: {len(html5)} HTML5 names, {len(uppercase)} upper-case ftfy entities, "
          f"{len(width)} width forms, {len(ansi_params)} ANSI parameter characters, "
          f"{len(whitespace)} whitespace characters")


if __name__ == "__main__":
    main()
