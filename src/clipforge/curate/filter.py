"""Filter expressions over score columns, parsed by a small recursive-descent parser (never ``eval``).

Grammar (keywords case-insensitive)::

    expr    := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | atom
    atom    := "(" expr ")"
             | NAME ("top" | "bottom") NUMBER "%"          -- DataComp-style percentile over the pool
             | NAME "is" ["not"] "null"
             | NAME "in" "(" value ("," value)* ")"
             | operand (">"|">="|"<"|"<="|"=="|"!=") operand
             | NAME                                        -- a boolean column
    operand := NAME | NUMBER | STRING | "true" | "false"

Examples: ``clip_score > 0.28 and caption_words >= 3``, ``clip_score top 30%``,
``not is_duplicate and lang == 'en'``, ``aspect < 3 and not is_blank``. Several expressions given to
``curate filter`` are intersected. A comparison with a null value is False (the row is dropped), so a
sample without a score never passes a score threshold by accident (SQL semantics, ``not`` included). Evaluation is vectorized with
pyarrow.compute on the whole table.
"""

from __future__ import annotations

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


class FilterError(ValueError):
    """A filter expression that does not parse or names a missing column."""


@dataclass
class Tok:
    kind: str  # num | str | op | name | kw | end
    value: Any
    pos: int


def tokenize(text: str) -> list[Tok]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"unexpected character at {pos}: {text[pos : pos + 10]!r} in {text!r}")
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
        pos = m.end()
    out.append(Tok("end", None, len(text)))
    return out


# AST nodes are tuples: ("and", a, b) ("or", a, b) ("not", a) ("cmp", op, left, right) ("pct", col, dir, p)
# ("null", col, negate) ("in", col, values) ("col", name) ("lit", value)


class Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = tokenize(text)
        self.i = 0

    def peek(self) -> Tok:
        return self.toks[self.i]

    def take(self, kind: str | None = None, value: Any = None) -> Tok:
        t = self.toks[self.i]
        if (kind and t.kind != kind) or (value is not None and t.value != value):
            want = value if value is not None else kind
            got = "end of expression" if t.kind == "end" else repr(t.value)
            raise FilterError(f"expected {want} at {t.pos}, got {got} in {self.text!r}")
        self.i += 1
        return t

    def parse(self) -> tuple:
        node = self.expr()
        self.take("end")
        return node

    def expr(self) -> tuple:
        node = self.conj()
        while self.peek().kind == "kw" and self.peek().value == "or":
            self.take()
            node = ("or", node, self.conj())
        return node

    def conj(self) -> tuple:
        node = self.neg()
        while self.peek().kind == "kw" and self.peek().value == "and":
            self.take()
            node = ("and", node, self.neg())
        return node

    def neg(self) -> tuple:
        if self.peek().kind == "kw" and self.peek().value == "not":
            self.take()
            return ("not", self.neg())
        return self.atom()

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
        got = "end of expression" if t.kind == "end" else repr(t.value)
        raise FilterError(f"expected a column name or a value at {t.pos}, got {got} in {self.text!r}")

    def atom(self) -> tuple:
        t = self.peek()
        if t.kind == "op" and t.value == "(":
            self.take()
            node = self.expr()
            self.take("op", ")")
            return node
        left = self.operand()
        nxt = self.peek()
        if left[0] == "col" and nxt.kind == "kw" and nxt.value in ("top", "bottom"):
            self.take()
            p = self.take("num").value
            self.take("op", "%")
            if not 0 < p <= 100:
                raise FilterError(f"percentile must be in (0, 100], got {p} in {self.text!r}")
            return ("pct", left[1], nxt.value, p)
        if left[0] == "col" and nxt.kind == "kw" and nxt.value == "is":
            self.take()
            negate = self.peek().kind == "kw" and self.peek().value == "not"
            if negate:
                self.take()
            self.take("kw", "null")
            return ("null", left[1], negate)
        if left[0] == "col" and nxt.kind == "kw" and nxt.value == "in":
            self.take()
            self.take("op", "(")
            vals = [self.operand()]
            while self.peek().kind == "op" and self.peek().value == ",":
                self.take()
                vals.append(self.operand())
            self.take("op", ")")
            if any(v[0] != "lit" for v in vals):
                raise FilterError(f"'in' takes literal values only in {self.text!r}")
            return ("in", left[1], [v[1] for v in vals])
        if nxt.kind == "op" and nxt.value in _CMP:
            self.take()
            return ("cmp", nxt.value, left, self.operand())
        if left[0] == "col":
            return ("col", left[1])
        raise FilterError(f"a bare value {left[1]!r} is not a condition in {self.text!r}")


def parse(text: str) -> tuple:
    """Parse a filter expression into a small AST (tuples); raises FilterError with the position."""
    if not text or not text.strip():
        raise FilterError("empty filter expression")
    return Parser(text).parse()


def columns_of(node: tuple) -> set[str]:
    kind = node[0]
    if kind == "col":
        return {node[1]}
    if kind in ("pct", "null", "in"):
        return {node[1]}
    if kind == "cmp":
        return columns_of(node[2]) | columns_of(node[3])
    if kind == "lit":
        return set()
    return set().union(*(columns_of(c) for c in node[1:] if isinstance(c, tuple)))


def percentile_threshold(values: pa.ChunkedArray, direction: str, p: float) -> tuple[Any, int]:
    """Threshold keeping the top/bottom ``p`` percent of non-null values (ties at the edge all kept)."""
    arr = values.drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
    arr = arr[~np.isnan(arr)]
    if len(arr) == 0:
        return None, 0
    k = max(1, math.ceil(len(arr) * p / 100.0))
    s = np.sort(arr)
    return (s[-k] if direction == "top" else s[k - 1]), k


def evaluate(node: tuple, table: pa.Table) -> pa.Array:
    """Boolean mask (nulls already False) of ``node`` over ``table``."""

    def col(name: str) -> pa.ChunkedArray:
        if name not in table.column_names:
            raise FilterError(f"no column {name!r}; available: {', '.join(table.column_names)}")
        return table.column(name)

    def value(op: tuple) -> Any:
        return col(op[1]) if op[0] == "col" else pa.scalar(op[1])

    def ev(n: tuple) -> Any:
        kind = n[0]
        if kind == "and":
            return pc.and_kleene(ev(n[1]), ev(n[2]))
        if kind == "or":
            return pc.or_kleene(ev(n[1]), ev(n[2]))
        if kind == "not":
            return pc.invert(ev(n[1]))  # SQL semantics: not(null) is null -> dropped
        if kind == "col":
            c = col(n[1])
            if not pa.types.is_boolean(c.type):
                raise FilterError(f"column {n[1]!r} is {c.type}, not boolean: compare it (e.g. {n[1]} > 0)")
            return c
        if kind == "null":
            m = pc.is_null(col(n[1]), nan_is_null=True)
            return pc.invert(m) if n[2] else m
        if kind == "in":
            return pc.is_in(col(n[1]), value_set=pa.array(n[2]).cast(col(n[1]).type))
        if kind == "pct":
            c = col(n[1])
            if not (pa.types.is_integer(c.type) or pa.types.is_floating(c.type)):
                raise FilterError(f"percentile needs a numeric column, {n[1]!r} is {c.type}")
            thr, _ = percentile_threshold(c, n[2], n[3])
            if thr is None:
                return pa.array(np.zeros(len(c), dtype=bool))
            return pc.greater_equal(c, thr) if n[2] == "top" else pc.less_equal(c, thr)
        if kind == "cmp":
            try:
                return _CMP[n[1]](value(n[2]), value(n[3]))
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise FilterError(f"cannot compare {n[2][1]!r} {n[1]} {n[3][1]!r}: {e}") from None
        raise FilterError(f"not a condition: {n!r}")

    out = ev(node)
    if isinstance(out, pa.ChunkedArray):
        out = out.combine_chunks()
    return pc.fill_null(out, False)


def apply_filters(table: pa.Table, expressions: list[str]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(intersection mask, per-expression counts). Percentiles are over the whole table, per DataComp."""
    if not expressions:
        raise FilterError("give at least one filter expression")
    total = np.ones(table.num_rows, dtype=bool)
    counts = []
    for e in expressions:
        m = evaluate(parse(e), table).to_numpy(zero_copy_only=False).astype(bool)
        total &= m
        counts.append({"filter": e, "kept": int(m.sum()), "kept_frac": float(m.mean()) if len(m) else 0.0})
    return total, counts
