"""What a safe sample key is: shards are extracted with ``tar -x`` and keys become file paths downstream.

A key (a member name up to its first dot) must be a relative path without ``..`` or ``.`` components,
empty components, a leading ``/``, backslashes, or control characters. The reader reports any other key
as ``unsafe_key`` (the sample is skipped) and the writer refuses to store one, so a shard clipforge
writes can always be extracted in place.
"""

from __future__ import annotations

import unicodedata

MAX_KEY_CHARS = 1024


def unsafe_key_reason(key: str) -> str | None:
    """None for a safe key, else a short description of what is wrong with it."""
    if not key:
        return "empty key"
    if len(key) > MAX_KEY_CHARS:
        return f"key longer than {MAX_KEY_CHARS} characters"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in key):
        return "control character in key"
    if key.startswith("/"):
        return "absolute key (leading '/')"
    if "\\" in key:
        return "backslash in key"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "'..', '.' or empty path component in key"
    return None


def printable(text: str, limit: int = 200) -> str:
    """``text`` with control characters escaped, cut to ``limit`` chars: safe in reports and terminals."""
    out = "".join(
        c if unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp") else ascii(c)[1:-1] for c in text[:limit]
    )
    return out + ("..." if len(text) > limit else "")
