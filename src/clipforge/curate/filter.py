"""Filter expressions over score columns, parsed by a small recursive-descent parser (never ``eval``).

Grammar (keywords case-insensitive)::

    expr    := and ("or" and)*
    and     := not ("and" not)*
    not     := "not"* atom
    atom    := "(" expr ")"
             | NAME ("top" | "bottom") NUMBER "%"          -- DataComp-style percentile over the pool
             | NAME "is" ["not"] "null"
             | NAME "in" "(" value ("," value)* ")"        -- values of one type
             | operand (">"|">="|"<"|"<="|"=="|"!=") operand  -- at least one side a column
             | NAME (">"|">="|"<"|"<=") "auto"             -- mixture cut per caption length
             | NAME                                        -- a boolean column
    operand := NAME | NUMBER | STRING | "true" | "false"

Examples: ``clip_score > 0.28 and caption_words >= 3``, ``clip_score top 30%``,
``not is_duplicate and lang == 'en'``, ``aspect < 3 and not is_blank``, ``clip_score > auto`` (the cut
of a two-component Gaussian mixture fitted per caption-length bucket, no labels needed:
:mod:`clipforge.curate.threshold`; ``auto`` is reserved on the right of a comparison). Several expressions given to
``curate filter`` are intersected. A comparison with a null value is False (the row is dropped), so a
sample without a score never passes a score threshold by accident (SQL semantics, ``not`` and ``in``
included). A NaN is a null here (as in ``is null``): a failed score never passes ``not x > t`` or
``x != t``. Such rows are counted per expression (``dropped_null`` of :func:`apply_filters`). A column
compares only with values of its kind (text with quoted strings, numbers with numbers, booleans with
true/false): ``n in ('1')`` or ``lang in (1)`` is an error, not a silent cast.
Evaluation is vectorized with pyarrow.compute on the whole table.

Expressions come from users and scripts, so the language is bounded: at most :data:`MAX_CHARS`
characters and :data:`MAX_DEPTH` levels of parentheses plus stacked ``not``; ``and``/``or`` chains are
flat lists (no recursion per term). Every failure (syntax, a missing or mistyped column, values Arrow
cannot compare) is one :class:`FilterError` line; nothing else escapes (see the seeded fuzz test).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|-?\.\d+(?:[eE][-+]?\d+)?)
      | (?P<str>'[^']*'|"[^"]*")
      | (?P<op>>=|<=|==|!=|>|<|\(|\)|,|%)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "top", "bottom", "is", "null", "in", "true", "false"}
_CMP = {
    ">": pc.greater,
    ">=": pc.greater_equal,
    "<": pc.less,
    "<=": pc.less_equal,
    "==": pc.equal,
    "!=": pc.not_equal,
}


MAX_CHARS = 10_000  # an expression longer than this is refused (bounds time and the error line)
MAX_DEPTH = 100  # nested parentheses + stacked 'not': bounds recursion far below Python's limit


class FilterError(ValueError):
    """A filter expression that does not parse, names a missing column, or cannot be evaluated."""


def _quote(text: str, pos: int | None = None, width: int = 60) -> str:
    """The expression (or a window of it around ``pos``) as a one-line repr, for error messages."""
    if len(text) <= width:
        return repr(text)
    a = 0 if pos is None else max(0, min(pos - width // 2, len(text) - width))
    return ("..." if a else "") + repr(text[a : a + width]) + ("..." if a + width < len(text) else "")


@dataclass
class Tok:
    kind: str  # num | str | op | name | kw | end
    value: Any
    pos: int


_SPACE_RE = re.compile(r"\s*")


def tokenize(text: str) -> list[Tok]:
    out, pos = [], _SPACE_RE.match(text).end()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(
                f"unexpected character at {pos}: {text[pos : pos + 10]!r} in {_quote(text, pos)}"
            )
        kind = m.lastgroup
        start = m.start(kind)
        val: Any = m.group(kind)
        if kind == "num":
            val = float(val)
        elif kind == "str":
            val = val[1:-1]
        elif kind == "name" and val.lower() in _KEYWORDS:
            kind, val = "kw", val.lower()
        out.append(Tok(kind, val, start))
        pos = _SPACE_RE.match(text, m.end()).end()
    out.append(Tok("end", None, len(text)))
    return out


# AST nodes are tuples: ("and", [a, b, ...]) ("or", [a, b, ...]) ("not", a) ("cmp", op, left, right)
# ("pct", col, dir, p) ("null", col, negate) ("in", col, values) ("col", name) ("lit", value).
# and/or are n-ary, so a long chain is a flat list (no deep recursion when it is evaluated).


class Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> Tok:
        return self.toks[self.i]

    def is_kw(self, *words: str) -> bool:
        t = self.toks[self.i]
        return t.kind == "kw" and t.value in words

    def fail(self, msg: str, pos: int) -> FilterError:
        return FilterError(f"{msg} at {pos} in {_quote(self.text, pos)}")

    def take(self, kind: str | None = None, value: Any = None) -> Tok:
        t = self.toks[self.i]
        if (kind and t.kind != kind) or (value is not None and t.value != value):
            want = value if value is not None else {"num": "a number"}.get(kind or "", kind)
            got = "end of expression" if t.kind == "end" else _short(t.value)
            raise self.fail(f"expected {want}, got {got}", t.pos)
        self.i += 1
        return t

    def nest(self, n: int, pos: int) -> None:
        self.depth += n
        if self.depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH} levels (parentheses and 'not')", pos)

    def parse(self) -> tuple:
        node = self.expr()
        self.take("end")
        return node

    def expr(self) -> tuple:
        parts = [self.conj()]
        while self.is_kw("or"):
            self.take()
            parts.append(self.conj())
        return parts[0] if len(parts) == 1 else ("or", parts)

    def conj(self) -> tuple:
        parts = [self.neg()]
        while self.is_kw("and"):
            self.take()
            parts.append(self.neg())
        return parts[0] if len(parts) == 1 else ("and", parts)

    def neg(self) -> tuple:
        n, pos = 0, self.peek().pos
        while self.is_kw("not"):  # a loop, not recursion; not(not(x)) is x, also for null
            self.take()
            n += 1
        self.nest(n, pos)
        node = self.atom()
        self.depth -= n
        return ("not", node) if n % 2 else node

    def operand(self) -> tuple:
        t = self.peek()
        if t.kind == "name":
            self.take()
            return ("col", t.value)
        if t.kind in ("num", "str"):
            self.take()
            return ("lit", t.value)
        if t.kind == "kw" and t.value in ("true", "false"):
            self.take()
            return ("lit", t.value == "true")
        got = "end of expression" if t.kind == "end" else _short(t.value)
        raise self.fail(f"expected a column name or a value, got {got}", t.pos)

    def atom(self) -> tuple:
        t = self.peek()
        if t.kind == "op" and t.value == "(":
            self.take()
            self.nest(1, t.pos)
            node = self.expr()
            self.take("op", ")")
            self.depth -= 1
            return node
        left = self.operand()
        nxt = self.peek()
        if left[0] == "col" and self.is_kw("top", "bottom"):
            self.take()
            p = self.take("num").value
            self.take("op", "%")
            if not 0 < p <= 100:
                raise self.fail(f"percentile must be in (0, 100], got {p:g}", nxt.pos)
            return ("pct", left[1], nxt.value, p)
        if left[0] == "col" and self.is_kw("is"):
            self.take()
            negate = self.is_kw("not")
            if negate:
                self.take()
            self.take("kw", "null")
            return ("null", left[1], negate)
        if left[0] == "col" and self.is_kw("in"):
            return self.in_list(left[1])
        if nxt.kind == "op" and nxt.value in _CMP:
            self.take()
            right = self.operand()
            if right == ("col", "auto") and left[0] == "col":
                if nxt.value not in (">", ">=", "<", "<="):
                    raise self.fail(f"'auto' is a cut: use >, >=, < or <=, not {nxt.value}", nxt.pos)
                return ("auto", nxt.value, left[1])
            if left[0] == "lit" and right[0] == "lit":
                raise self.fail("a comparison needs a column on one side (both sides are values)", nxt.pos)
            return ("cmp", nxt.value, left, right)
        if left[0] == "col":
            return ("col", left[1])
        raise self.fail(f"a bare value {_short(left[1])} is not a condition", t.pos)

    def in_list(self, column: str) -> tuple:
        self.take()
        self.take("op", "(")
        vals = [self.operand()]
        while self.peek().kind == "op" and self.peek().value == ",":
            self.take()
            vals.append(self.operand())
        end = self.take("op", ")")
        if any(v[0] != "lit" for v in vals):
            raise self.fail("'in' takes literal values only", end.pos)
        kinds = {
            "string" if isinstance(v[1], str) else "bool" if isinstance(v[1], bool) else "number"
            for v in vals
        }
        if len(kinds) > 1:
            raise self.fail(f"'in' values must be of one type, got {' and '.join(sorted(kinds))}", end.pos)
        return ("in", column, [v[1] for v in vals])


def parse(text: str) -> tuple:
    """Parse a filter expression into a small AST (tuples); raises FilterError with the position."""
    if not isinstance(text, str):
        raise FilterError(f"a filter expression is text, got {type(text).__name__}")
    if not text.strip():
        raise FilterError("empty filter expression")
    if len(text) > MAX_CHARS:
        raise FilterError(
            f"filter expression is {len(text)} characters long (max {MAX_CHARS}): {_quote(text)}"
        )
    return Parser(text).parse()


def columns_of(node: tuple) -> set[str]:
    kind = node[0]
    if kind in ("col", "pct", "null", "in"):
        return {node[1]}
    if kind == "auto":
        return {node[2]}
    if kind == "cmp":
        return columns_of(node[2]) | columns_of(node[3])
    if kind == "lit":
        return set()
    if kind == "not":
        return columns_of(node[1])
    return set().union(*(columns_of(c) for c in node[1]))


def percentile_threshold(values: pa.ChunkedArray, direction: str, p: float) -> tuple[Any, int]:
    """Threshold keeping the top/bottom ``p`` percent of non-null values (ties at the edge all kept)."""
    arr = values.drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
    arr = arr[~np.isnan(arr)]
    if len(arr) == 0:
        return None, 0
    k = max(1, math.ceil(len(arr) * p / 100.0))
    s = np.sort(arr)
    return (s[-k] if direction == "top" else s[k - 1]), k


def _kind(t: pa.DataType | None = None, value: Any = None) -> str | None:
    """'string', 'number' or 'bool' of an Arrow type (or of a literal); None for other types (lists...)."""
    if t is None:
        return "bool" if isinstance(value, bool) else "string" if isinstance(value, str) else "number"
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    return "bool" if pa.types.is_boolean(t) else None


_NAME = {"string": "text", "number": "numeric", "bool": "boolean"}
_HOW = {"string": "a quoted string (lang == 'en')", "number": "a number (x > 0.5)", "bool": "true/false"}


def evaluate(node: tuple, table: pa.Table, text: str | None = None) -> pa.Array:
    """Boolean mask (nulls already False) of ``node`` over ``table``.

    Every failure is a :class:`FilterError` (one line): a missing or mistyped column, or values Arrow
    cannot compare with the column (``lang > 0.5``, ``n in (1e30)`` on an int64 column).
    """
    return pc.fill_null(evaluate_kleene(node, table, text), False)


def evaluate_kleene(node: tuple, table: pa.Table, text: str | None = None) -> pa.Array:
    """:func:`evaluate` before nulls become False: null where a null/NaN value left the row undecided."""
    where = f" in {_quote(text)}" if text else ""
    cache: dict[str, pa.ChunkedArray] = {}

    def col(name: str) -> pa.ChunkedArray:
        """The column, dictionary-decoded and with NaN as null (so every comparison drops it)."""
        if name in cache:
            return cache[name]
        if name not in table.column_names:
            near = difflib.get_close_matches(name, table.column_names, n=3)
            hint = f"; did you mean {' or '.join(map(_short, near))}?" if near else ""
            raise FilterError(
                f"no column {_short(name)}{where}{hint} (available: "
                f"{_short(', '.join(table.column_names), 500)})"
            )
        c = table.column(name)
        if pa.types.is_dictionary(c.type):
            c = c.cast(c.type.value_type)
        if pa.types.is_floating(c.type) and len(c) and pc.any(pc.is_nan(c)).as_py():
            c = pc.if_else(pc.is_nan(c), pa.scalar(None, c.type), c)
        cache[name] = c
        return c

    def check_kinds(what: str, *sides: tuple) -> None:
        """A string column against a number (or bool) is the user's mistake: say so, not Arrow's words."""
        kinds = [(node, _kind(col(v).type) if node == "col" else _kind(value=v), v) for node, v in sides]
        if len({kind for _, kind, _ in kinds if kind}) > 1:
            name, kind = next((v, kind) for node, kind, v in kinds if node == "col" and kind)
            raise FilterError(
                f"cannot {what}{where}: {_short(name)} is a {_NAME[kind]} column, compare it with {_HOW[kind]}"
            )

    def value(op: tuple) -> Any:
        return col(op[1]) if op[0] == "col" else pa.scalar(op[1])

    def ev(n: tuple) -> Any:
        kind = n[0]
        if kind in ("and", "or"):
            combine = pc.and_kleene if kind == "and" else pc.or_kleene
            out = ev(n[1][0])
            for child in n[1][1:]:
                out = combine(out, ev(child))
            return out
        if kind == "not":
            return pc.invert(ev(n[1]))  # SQL semantics: not(null) is null -> dropped
        if kind == "col":
            c = col(n[1])
            if not pa.types.is_boolean(c.type):
                how = _HOW.get(_kind(c.type) or "", "a value")
                raise FilterError(f"column {_short(n[1])} is {c.type}, not boolean: compare it with {how}")
            return c
        if kind == "null":
            m = pc.is_null(col(n[1]), nan_is_null=True)
            return pc.invert(m) if n[2] else m
        if kind == "in":
            c = col(n[1])
            check_kinds(f"test {_short(n[1])} in {_short(n[2])}", ("col", n[1]), ("lit", n[2][0]))
            try:
                values = pa.array(n[2]).cast(c.type)
                found = pc.is_in(c, value_set=values)
            except (pa.ArrowException, OverflowError) as e:
                raise FilterError(
                    f"{_short(n[1])} ({c.type}) cannot hold the values {_short(n[2])}{where}: {_short(e)}"
                ) from None
            return pc.if_else(pc.is_valid(c), found, pa.scalar(None, pa.bool_()))  # null in (...) is null
        if kind == "pct":
            c = col(n[1])
            if not (pa.types.is_integer(c.type) or pa.types.is_floating(c.type)):
                raise FilterError(f"percentile needs a numeric column, {_short(n[1])} is {c.type}")
            thr, _ = percentile_threshold(c, n[2], n[3])
            if thr is None:  # no finite value: every row dropped, the null ones counted as such
                return pc.if_else(pc.is_valid(c), pa.scalar(False), pa.scalar(None, pa.bool_()))
            return pc.greater_equal(c, thr) if n[2] == "top" else pc.less_equal(c, thr)
        if kind == "auto":
            return auto_compare(table, n[2], n[1], col(n[2]))
        if kind == "cmp":
            check_kinds(f"compare {_short(n[2][1])} {n[1]} {_short(n[3][1])}", n[2], n[3])
            try:
                return _CMP[n[1]](value(n[2]), value(n[3]))
            except (pa.ArrowException, OverflowError, TypeError) as e:
                raise FilterError(
                    f"cannot compare {_short(n[2][1])} {n[1]} {_short(n[3][1])}{where}: {_short(e)}"
                ) from None
        raise FilterError(f"not a condition: {_short(n)}")

    out = ev(node)
    if isinstance(out, pa.ChunkedArray):
        out = out.combine_chunks()
    if not isinstance(out, pa.Array) or not pa.types.is_boolean(out.type):
        raise FilterError(f"not a condition over the rows{where}")
    return out


def auto_compare(table: pa.Table, name: str, op: str, c: pa.ChunkedArray) -> pa.Array:
    """``name OP auto``: compare each row with its caption-length bucket's mixture cut."""
    from clipforge.curate.threshold import table_auto_threshold

    if not (pa.types.is_integer(c.type) or pa.types.is_floating(c.type)):
        raise FilterError(f"'auto' needs a numeric column, {_short(name)} is {c.type}")
    try:
        cuts = table_auto_threshold(table, name)["cuts"]
    except ValueError as e:
        raise FilterError(f"{_short(name)} {op} auto: {_short(e)}") from None
    return _CMP[op](c, pa.array(cuts, mask=np.isnan(cuts)))


def _short(v: Any, n: int = 80) -> str:
    """A one-line, bounded rendering of a value or an error, for messages."""
    s = repr(v) if not isinstance(v, BaseException) else str(v)
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def apply_filters(table: pa.Table, expressions: list[str]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(intersection mask, per-expression counts). Percentiles are over the whole table, per DataComp.

    ``dropped_null`` counts the rows an expression dropped only because a value it needs is null or NaN
    (a failed score): dropped silently, they would look like low-quality samples."""
    if not expressions:
        raise FilterError("give at least one filter expression")
    total = np.ones(table.num_rows, dtype=bool)
    counts = []
    for e in expressions:
        k = evaluate_kleene(parse(e), table, e)
        m = pc.fill_null(k, False).to_numpy(zero_copy_only=False).astype(bool)
        total &= m
        counts.append(
            {
                "filter": e,
                "kept": int(m.sum()),
                "kept_frac": float(m.mean()) if len(m) else 0.0,
                "dropped_null": k.null_count,
            }
        )
    return total, counts
