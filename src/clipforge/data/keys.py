"""What a safe sample key is: shards are extracted with ``tar -x`` and keys become file paths downstream.

A key (a member name up to its first dot) must be a relative path without ``..`` or ``.`` components,
empty components, a leading ``/``, backslashes, or control characters, and must be valid UTF-8. The
reader reports any other key as ``unsafe_key`` (the sample is skipped) and the writer refuses to store
one, so a shard clipforge writes can always be extracted in place.

UTF-8: ``tarfile`` decodes a member name with non-UTF-8 bytes into a ``str`` holding surrogate escapes
(``b"\\xff"`` -> ``"\\udcff"``). Such a key passes everything else, then crashes the run with a
``UnicodeEncodeError`` when a Parquet table, index or report is written - after the work was done -
so it is refused at the reader, like any other key no output can hold.
"""

from __future__ import annotations

import unicodedata

MAX_KEY_CHARS = 1024
# Unicode categories never allowed in a key and escaped by printable(): control, format, line/paragraph
# separators, and surrogates (undecodable bytes of a member name; not encodable as UTF-8).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def unsafe_key_reason(key: str) -> str | None:
    """None for a safe key, else a short description of what is wrong with it."""
    if not key:
        return "empty key"
    if len(key) > MAX_KEY_CHARS:
        return f"key longer than {MAX_KEY_CHARS} characters"
    if not is_utf8(key):
        return "key is not valid UTF-8 (undecodable bytes in the member name)"
    if any(unicodedata.category(c) in _UNSAFE_CATEGORIES for c in key):
        return "control character in key"
    if key.startswith("/"):
        return "absolute key (leading '/')"
    if "\\" in key:
        return "backslash in key"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "'..', '.' or empty path component in key"
    return None


def is_utf8(text: str) -> bool:
    """True when ``text`` can be written as UTF-8 (no surrogate escapes of undecodable bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str, limit: int = 200) -> str:
    """``text`` with control characters and surrogates escaped, cut to ``limit`` chars: safe in reports,
    terminals and UTF-8 files (a surrogate left in would make ``print`` or a UTF-8 write raise)."""
    out = "".join(
        c if unicodedata.category(c) not in _UNSAFE_CATEGORIES else ascii(c)[1:-1] for c in text[:limit]
    )
    return out + ("..." if len(text) > limit else "")
