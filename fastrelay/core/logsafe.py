"""Client-supplied text made safe for one log line: `safe`.

Ids and error messages come from the network (or from an embedding program
that got them from there). Logged raw, a newline forges a second record, an
ESC sequence recolours or hides a terminal, and a 60 KiB id floods the log.
`safe` escapes every such character and bounds the length, so one logged
value stays one short, unambiguous token.
"""

from __future__ import annotations

import re

DEFAULT_LIMIT = 128

# What gets escaped, and why:
# - C0, DEL and C1 controls: line breaks (\n \r \x0b \x0c \x1c-\x1e \x85)
#   and terminal escapes (ESC, CSI \x9b);
# - U+2028/U+2029: line/paragraph separators some viewers break lines on;
# - U+202A-U+202E, U+2066-U+2069: bidi overrides that make a line read
#   differently from what it holds ("Trojan Source");
# - lone surrogates: they cannot be encoded to UTF-8, so a log handler
#   writing them would fail;
# - the backslash itself, so "\x0a" in the output always means an escaped
#   newline and never a client who typed a backslash.
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape_char(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` as text with no control or line-breaking character, at most
    ``limit`` characters plus a ``…(+N chars)`` marker that says how many
    characters of the original were cut. An escape is never split."""
    limit = max(limit, 0)
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:  # a broken __str__ must not break the log call
        text = f"<unprintable {type(value).__name__}>"
    if len(text) <= limit and _UNSAFE.search(text) is None:
        return text  # the common case: nothing to do
    out: list[str] = []
    used = 0  # output characters so far
    taken = 0  # input characters consumed
    # Each input character yields at least one output character, so looking
    # at ``limit`` input characters is enough: a huge value costs O(limit).
    for ch in text[:limit]:
        piece = _escape_char(ch) if _UNSAFE.match(ch) else ch
        if used + len(piece) > limit:
            break
        out.append(piece)
        used += len(piece)
        taken += 1
    rest = len(text) - taken
    if rest:
        out.append(f"…(+{rest} chars)")
    return "".join(out)
