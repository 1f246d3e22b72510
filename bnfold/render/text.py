"""Model- and file-controlled strings made inert before they reach a terminal, a log or Markdown.

Paths, node/tensor/graph names, doc strings and error text from onnx, ONNX Runtime or torch are
data. A file named ``x\\n::error::m\\n.onnx`` must not start a GitHub Actions workflow command, a
node name holding ``ESC ] 8 ;; ...`` must not become a hyperlink, ``[/]`` must not crash rich and
``[green]PASSED[/]`` must not print a green PASSED. Every renderer passes such strings through one
of these helpers:

- :func:`inert`: control characters (C0, DEL, C1, which start every CSI/OSC/DCS sequence) and
  Unicode bidirectional overrides shown as visible escapes (``\\x1b``, ``\\n``, ``\\u202e``), so
  the text stays on one line and the terminal interprets none of it;
- :func:`inert_text`: the same as a ``rich.text.Text``, which rich never parses as markup;
- :func:`inert_markup`: the same escaped for a rich markup string, where one is unavoidable;
- :func:`md_inert`: the same, plus Markdown/HTML escaping, for ``--markdown`` and
  ``$GITHUB_STEP_SUMMARY`` (safe inside a table cell).
"""

from __future__ import annotations

__all__ = ["inert", "inert_markup", "inert_text", "md_inert"]

import re
from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0 controls, DEL, C1 controls (0x9b is a one-byte CSI), line/paragraph separators, and the
# Unicode bidi embeddings/overrides/isolates that reorder what a reader sees.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def inert(value: Any) -> str:
    """``str(value)`` with every control character shown as a visible escape, on one line."""
    return _UNSAFE.sub(_escape_char, str(value))


def inert_text(value: Any, style: str = "") -> Any:
    """:func:`inert` as a ``rich.text.Text`` (never parsed as markup)."""
    from rich.text import Text

    return Text(inert(value), style=style)


def inert_markup(value: Any) -> str:
    """:func:`inert`, escaped for inclusion in a rich markup string (``[`` cannot open a tag)."""
    from rich.markup import escape

    return escape(inert(value))


# Markdown punctuation that can open emphasis, code, links, tables or strikethrough is
# backslash-escaped; HTML is neutralised with entities; what would start a heading, list, quote or
# rule at the start of a line is escaped there.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
_MD_LINE_START = re.compile(r"^(\s*)([#+=-]|\d+(?=[.)]))")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def md_inert(value: Any, *, line_start: bool = False) -> str:
    """:func:`inert`, then Markdown and HTML escaped: safe as text and inside a table cell.

    With ``line_start`` (text that begins a line of its own), what would open a heading, list or
    rule there is escaped too."""
    text = _MD_SPECIAL.sub(r"\\\1", inert(value))
    text = "".join(_HTML.get(ch, ch) for ch in text)
    return _MD_LINE_START.sub(_escape_line_start, text) if line_start else text


def _escape_line_start(match: re.Match[str]) -> str:
    lead, mark = match.groups()
    # "1." / "1)" would start an ordered list: escape the punctuation after the number.
    return lead + mark + "\\" if mark[0].isdigit() else lead + "\\" + mark
