"""`--where` filters: a small expression language over a row's id, source and metadata, and the rows it matches.

The language, parsed by Python's own parser (`ast`, mode "eval") and then
walked through a whitelist, so nothing in it is ever evaluated as Python:

    lang == "de"                       equality; also !=, <, <=, >, >=
    year >= 2020                       a number literal compares as numbers
    2020 <= year < 2024                chains: each pair must hold
    lang in ["de", "fr"]               membership; also `not in`
    startswith(path, "reports/")       prefix of a string
    has(lang)                          the field is present
    A and B, A or B, not A, (...)

Fields: `id`, `source` (the input file's real path), `source_line` (a
number), and any metadata key (a record's other fields; a whole file's
`path`, `size`, `mtime`), written `metadata["a key"]` when the key is not a
Python identifier or is one of those three names. Metadata values are
stored as strings: a string literal compares them as strings (by code
point, so ISO dates order as dates), a number literal as numbers (a value
that is not a number never matches), `True`/`False` as the JSON `true` and
`false`. A comparison of a field a row lacks is false, `!=` included; `not`
is the plain complement (`not lang == "de"` matches rows without `lang`).

    >>> where = parse_where('lang in ["de", "fr"] and year >= 2020')
    >>> where
    And(parts=(Member(field=Field(column=None, key='lang'), values=('de', 'fr'), negated=False), \
Compare(field=Field(column=None, key='year'), op='>=', value=2020.0)))
    >>> parse_where('lang = "de"')
    Traceback (most recent call last):
    ...
    bge_index.errors.InvalidOptionError: where: invalid syntax at column 6 (write == for equality): lang = "de"

`RowColumns` evaluates an expression over an index's rows with pyarrow
compute (deleted rows included: the caller combines the mask with the live
rows), reading each column once and each metadata key's values once.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bge_index.errors import InvalidOptionError

COLUMNS = ("id", "source", "source_line")  # fields that are shard columns; every other name is a metadata key
NUMERIC_COLUMNS = ("source_line",)
MAX_WHERE_CHARS = 4096
MAX_WHERE_NODES = 1000
_ORDER = ("==", "!=", "<", "<=", ">", ">=")
_AST_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_MIRROR = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
MAX_WHERE_FIELDS = 32  # distinct fields in one filter: each is a column of every row to look up
FIELD_CACHE = 16  # fields whose values a RowColumns keeps between filters
# A number as JSON or Python writes it (no inf, nan or hex), once surrounding whitespace is trimmed: what a
# numeric comparison reads a stored string as.
NUMBER = r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$"


def number_of(value: str) -> float | None:
    """A stored string as a numeric comparison reads it: a finite number, or None (never matches).

        >>> number_of(" 2024 "), number_of("1e400"), number_of("0x10"), number_of("1_000")
        (2024.0, None, None, None)
    """
    text = value.strip()
    if not re.match(NUMBER, text):
        return None
    number = float(text)
    return number if np.isfinite(number) else None


@dataclass(frozen=True)
class Field:
    """A shard column (`id`, `source`, `source_line`) or a metadata key."""

    column: str | None
    key: str | None = None

    def __str__(self) -> str:
        return self.column if self.column is not None else f"metadata[{self.key!r}]"


@dataclass(frozen=True)
class Compare:
    """field OP value: a string (compared as strings) or a float (compared as numbers)."""

    field: Field
    op: str  # one of _ORDER
    value: str | float

    @property
    def numeric(self) -> bool:
        """Whether it compares numbers (a number literal), not strings."""
        return not isinstance(self.value, str)


@dataclass(frozen=True)
class Member:
    """field in (values): all strings or all floats; negated: `not in`."""

    field: Field
    values: tuple
    negated: bool = False

    @property
    def numeric(self) -> bool:
        """Whether its values are numbers (they are all of one kind), not strings."""
        return not isinstance(self.values[0], str)


@dataclass(frozen=True)
class Prefix:
    """startswith(field, prefix)."""

    field: Field
    prefix: str


@dataclass(frozen=True)
class Has:
    """has(field): the row has a value for it."""

    field: Field


@dataclass(frozen=True)
class And:
    parts: tuple


@dataclass(frozen=True)
class Or:
    parts: tuple


@dataclass(frozen=True)
class Not:
    part: object


Expression = Compare | Member | Prefix | Has | And | Or | Not


def _fail(message: str, text: str) -> InvalidOptionError:
    """The refusal of filter `text`, one line: the message and the filter (cut at 200 characters) with every
    character that is not printable escaped."""
    shown = text if len(text) <= 200 else text[:200] + "..."
    return InvalidOptionError(_printable(f"where: {message}: {shown}"))


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@functools.lru_cache(maxsize=256)
def parse_where(text: str) -> Expression:
    """The expression `text` says (see the module), or InvalidOptionError naming what is wrong and where."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidOptionError("where: the filter is empty")
    if len(text) > MAX_WHERE_CHARS:
        raise InvalidOptionError(f"where: over {MAX_WHERE_CHARS:,} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        hint = " (write == for equality)" if re.search(r"(?<![=!<>])=(?!=)", text) else ""
        raise _fail(f"invalid syntax at column {error.offset or 0}{hint}", text) from None
    except (RecursionError, MemoryError):
        raise _fail("too deeply nested", text) from None
    except ValueError as error:  # a NUL character, a lone surrogate
        raise _fail(f"cannot be read ({error})", text) from None
    if sum(1 for _ in ast.walk(tree)) > MAX_WHERE_NODES:
        raise _fail(f"more than {MAX_WHERE_NODES:,} terms", text)
    try:
        expression = _expression(tree.body, text)
    except RecursionError:
        raise _fail("too deeply nested", text) from None
    if len(fields_of(expression)) > MAX_WHERE_FIELDS:
        raise _fail(f"more than {MAX_WHERE_FIELDS} different fields", text)
    return expression


def fields_of(expression: Expression) -> set[Field]:
    """The fields an expression reads."""
    if isinstance(expression, (And, Or)):
        return set().union(*(fields_of(part) for part in expression.parts))
    if isinstance(expression, Not):
        return fields_of(expression.part)
    return {expression.field}


def _expression(node: ast.AST, text: str) -> Expression:
    if isinstance(node, ast.BoolOp):
        parts = tuple(_expression(value, text) for value in node.values)
        return And(parts) if isinstance(node.op, ast.And) else Or(parts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return Not(_expression(node.operand, text))
    if isinstance(node, ast.Compare):
        return _comparison(node, text)
    if isinstance(node, ast.Call):
        return _call(node, text)
    raise _fail(f"expected a comparison, startswith(), has(), and, or, not; got {_shown(node, text)!r}", text)


def _comparison(node: ast.Compare, text: str) -> Expression:
    terms = [node.left, *node.comparators]
    parts = []
    for left, op, right in zip(terms, node.ops, terms[1:]):
        if isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(right, (ast.List, ast.Tuple, ast.Set)):
                raise _fail(f"`in` takes a list of values, as in lang in [\"de\", \"fr\"]; got "
                            f"{_shown(right, text)!r}", text)
            values = tuple(_literal(v, text) for v in right.elts)
            if not values:
                raise _fail("`in` needs at least one value", text)
            if len({isinstance(v, str) for v in values}) > 1:
                raise _fail("`in` takes values of one kind: all strings or all numbers", text)
            field = _field(left, text)
            _check_kind(field, values[0], text)
            parts.append(Member(field, values, isinstance(op, ast.NotIn)))
            continue
        if type(op) not in _AST_OPS:
            raise _fail(f"unknown comparison {type(op).__name__}", text)
        symbol = _AST_OPS[type(op)]
        if _is_field(left):
            field, value = _field(left, text), _literal(right, text)
        elif _is_field(right):
            field, value, symbol = _field(right, text), _literal(left, text), _MIRROR[symbol]
        else:
            raise _fail(f"a comparison needs a field on one side: {_shown(left, text)} {symbol} "
                        f"{_shown(right, text)}", text)
        _check_kind(field, value, text)
        parts.append(Compare(field, symbol, value))
    return parts[0] if len(parts) == 1 else And(tuple(parts))


def _call(node: ast.Call, text: str) -> Expression:
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if node.keywords or name not in ("startswith", "has"):
        raise _fail(f"unknown function {_shown(node.func, text)!r} (functions: startswith(field, \"prefix\"), "
                    "has(field))", text)
    wanted = 2 if name == "startswith" else 1
    if len(node.args) != wanted:
        raise _fail(f"{name}() takes {wanted} argument{'s' if wanted > 1 else ''}", text)
    field = _field(node.args[0], text)
    if name == "has":
        return Has(field)
    prefix = _literal(node.args[1], text)
    if not isinstance(prefix, str) or field.column in NUMERIC_COLUMNS:
        raise _fail("startswith() compares a text field with a string", text)
    return Prefix(field, prefix)


def _is_field(node: ast.AST) -> bool:
    return isinstance(node, (ast.Name, ast.Subscript, ast.Attribute))


def _field(node: ast.AST, text: str) -> Field:
    if isinstance(node, ast.Name) and node.id not in ("True", "False", "None"):
        return Field(node.id) if node.id in COLUMNS else Field(None, node.id)
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "metadata"
            and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
        return Field(None, _valid_text(node.slice.value, text))
    raise _fail(f"expected a field name or metadata[\"key\"]; got {_shown(node, text)!r}", text)


def _literal(node: ast.AST, text: str) -> str | float:
    sign = 1.0
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
        node = node.operand
        if not (isinstance(node, ast.Constant) and type(node.value) in (int, float)):
            raise _fail(f"expected a number after the sign; got {_shown(node, text)!r}", text)
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            return "true" if value else "false"  # metadata holds JSON's spelling of a boolean
        if isinstance(value, str):
            return _valid_text(value, text)
        if type(value) in (int, float):
            try:
                number = sign * float(value)
            except OverflowError:  # an integer literal past float's range
                raise _fail("a number is out of range", text) from None
            if not np.isfinite(number):
                raise _fail(f"the number {_shown(node, text)} is out of range", text)
            return number
    raise _fail(f"expected a string or a number; got {_shown(node, text)!r}", text)


def _valid_text(value: str, text: str) -> str:
    """A string of the filter (a literal, a metadata key), refused when it is not valid Unicode (a lone
    surrogate from an escape): no stored value can equal it, and Arrow cannot hold it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail("a string is not valid Unicode (a lone surrogate)", text) from None
    return value


def _check_kind(field: Field, value: str | float, text: str) -> None:
    if field.column in NUMERIC_COLUMNS and isinstance(value, str):
        raise _fail(f"{field} is a number: compare it with a number", text)


def _shown(node: ast.AST, text: str) -> str:
    return ast.get_source_segment(text.strip(), node) or type(node).__name__


# -- evaluation ----------------------------------------------------------------------------------------------


class RowColumns:
    """The columns a filter reads, over every row of an index (deleted rows included), each read once.

    `read(column)` gives one shard column over all rows in row order as a pyarrow ChunkedArray (or None when
    no shard has it: an index written before rows recorded sources and metadata); `rows` is the row count.
    """

    def __init__(self, rows: int, read: Callable[[str], pa.ChunkedArray | None]):
        self.rows = rows
        self._read = read
        self._columns: dict[str, pa.ChunkedArray | None] = {}
        # (field, "strings" or "numbers") -> values, the FIELD_CACHE latest: a client asking for ever new
        # metadata keys costs time, never memory without bound.
        self._values: OrderedDict[tuple[Field, str], pa.ChunkedArray] = OrderedDict()

    def matching(self, where: Expression) -> np.ndarray:
        """[rows] bool: whether each row matches `where`."""
        return self._mask(where)

    def _mask(self, node) -> np.ndarray:
        if isinstance(node, And):
            out = self._mask(node.parts[0])
            for part in node.parts[1:]:
                out &= self._mask(part)
            return out
        if isinstance(node, Or):
            out = self._mask(node.parts[0])
            for part in node.parts[1:]:
                out |= self._mask(part)
            return out
        if isinstance(node, Not):
            return ~self._mask(node.part)
        if isinstance(node, Has):
            return _as_mask(pc.is_valid(self.strings(node.field)), self.rows)
        if isinstance(node, Prefix):
            return _as_mask(pc.starts_with(self.strings(node.field), node.prefix), self.rows)
        if isinstance(node, Member):
            values = self.numbers(node.field) if node.numeric else self.strings(node.field)
            found = pc.is_in(values, value_set=pa.array(node.values, type=values.type))
            # A missing value is in no list, and not in every list: `not in` never matches it either.
            found = pc.invert(found) if node.negated else found
            return _as_mask(pc.and_kleene(found, pc.is_valid(values)), self.rows)
        values = self.numbers(node.field) if node.numeric else self.strings(node.field)
        compare = {"==": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal, ">": pc.greater,
                   ">=": pc.greater_equal}[node.op]
        return _as_mask(compare(values, pa.scalar(node.value, type=values.type)), self.rows)

    def _column(self, name: str) -> pa.ChunkedArray | None:
        if name not in self._columns:
            self._columns[name] = self._read(name)
        return self._columns[name]

    def _cached(self, key: tuple[Field, str], make) -> pa.ChunkedArray:
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        values = self._values[key] = make()
        while len(self._values) > FIELD_CACHE:
            self._values.popitem(last=False)
        return values

    def strings(self, field: Field) -> pa.ChunkedArray:
        """The field's value of each row as a string (null where the row has none)."""
        def make():
            if field.column is not None:
                values = self._column(field.column)
                if values is not None and field.column in NUMERIC_COLUMNS:
                    values = pc.cast(values, pa.string())
            else:
                metadata = self._column("metadata")
                values = None if metadata is None else pc.map_lookup(metadata, pa.scalar(field.key), "first")
            return _nulls(self.rows, pa.string()) if values is None else values

        return self._cached((field, "strings"), make)

    def numbers(self, field: Field) -> pa.ChunkedArray:
        """The field's value of each row as float64: null where it has none, or what it has is not a finite
        number (`number_of`)."""
        def make():
            if field.column in NUMERIC_COLUMNS:
                values = self._column(field.column)
                return _nulls(self.rows, pa.float64()) if values is None else pc.cast(values, pa.float64())
            strings = pc.utf8_trim_whitespace(self.strings(field))
            number = pc.match_substring_regex(strings, NUMBER)
            values = pc.cast(pc.if_else(number, strings, pa.scalar(None, pa.string())), pa.float64())
            return pc.if_else(pc.is_finite(values), values, pa.scalar(None, pa.float64()))  # 1e400: no number

        return self._cached((field, "numbers"), make)


def _nulls(rows: int, kind: pa.DataType) -> pa.ChunkedArray:
    return pa.chunked_array([pa.nulls(rows, kind)])


def _as_mask(values, rows: int) -> np.ndarray:
    """A boolean Arrow result as [rows] numpy bool, null (a missing value) as False."""
    out = pc.fill_null(values, False)
    out = out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out
    mask = out.to_numpy(zero_copy_only=False).astype(bool, copy=True)
    if mask.shape != (rows,):
        raise ValueError(f"a filter column has {mask.shape[0]} rows, the index {rows}")
    return mask
