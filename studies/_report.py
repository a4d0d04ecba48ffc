"""Helpers for study scripts: write a generated section into a docs page, between markers.

A study owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in its page; the
rest of the page is hand-written. Re-running a study replaces only its own section.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"


def write_section(name: str, markdown: str, page: Path = RESULTS) -> None:
    """Replace (or append) the generated section ``name`` of ``page``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = page.read_text() if page.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)


def command_line() -> str:
    """The command that ran this study, for the docs."""
    script = Path(sys.argv[0]).resolve().relative_to(ROOT)
    return " ".join(["python", str(script), *sys.argv[1:]])


def processes(n: int) -> str:
    """``"1 process"``, ``"2 processes"``: for the generated-by line."""
    return f"{n} process" if n == 1 else f"{n} processes"


def pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.0f}%"
