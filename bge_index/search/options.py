"""How a search option is declared: once, as a field of the request that holds it.

Each option of a search (k, mode, the weights, fusion, ...) is a dataclass
field of `query.SearchRequest` (or of a dataclass field of it, such as
`ScoreWeights`) made with `option()`: its Python type is the field's
annotation, its default the field's default, and `option()` adds its names,
help text and range. `declared_options(SearchRequest)` reads them back as
`SearchOption` records, in field order (`query.SEARCH_OPTIONS`), and every
surface takes them from there:

- the `search` and `eval` flags (cli/options.py `with_search_flags`):
  one flag per name, `-k` for a one-letter name, `--top-k` otherwise;
- the parameters of `serve`'s GET and POST /search (serve/http_api.py);
- the request's own checks (`check_options`, from `__post_init__`):
  choices (an Enum type; plain strings are accepted and stored as the enum)
  and ranges;
- what a backend that cannot do everything refuses (milvus.py).

So a new option is one `option()` field, plus the code that acts on it:

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Request:
    ...     k: int = option(10, "k", "top-k", minimum=1, help="Results per query.")
    ...     with_text: bool = True  # not an option: no option()
    >>> [(o.name, o.flags, o.default) for o in declared_options(Request)]
    [('k', ('-k', '--top-k'), 10)]
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from bge_index.errors import InvalidOptionError

_KEY = "bge_index.search_option"  # where option() keeps its part of the declaration, in the field's metadata


@dataclass(frozen=True)
class SearchOption:
    """One search option as every surface knows it: names, where the request holds it, type, default, help, range."""

    name: str  # `dense-weight`: the flag --dense-weight and the HTTP parameter dense-weight
    field: str  # where the request holds it: `k`, or `weights.dense` inside a dataclass field
    type: type  # int, float, bool, str (an optional text: default None), or an Enum whose values are the choices
    default: Any
    help: str
    aliases: tuple[str, ...] = ()  # further names, each a flag and an HTTP parameter too (`top-k`)
    minimum: float | None = None
    maximum: float | None = None
    envvar: str | None = None  # the CLI's `search` also reads it from this environment variable
    metavar: str | None = None  # how --help names its value (`EXPR`); None: the type's name

    @property
    def names(self) -> tuple[str, ...]:
        """Every name it goes by, the main one first."""
        return (self.name, *self.aliases)

    @property
    def flags(self) -> tuple[str, ...]:
        """Its command-line flags: `-k` for a one-letter name, `--top-k` for a longer one."""
        return tuple(f"-{n}" if len(n) == 1 else f"--{n}" for n in self.names)

    @property
    def flag(self) -> str:
        """The flag messages name it by: its first long one (`--top-k`, `--mode`)."""
        return next((f for f in self.flags if f.startswith("--")), self.flags[0])

    @property
    def parameter(self) -> str:
        """Its name as a Python identifier (`dense_weight`): the CLI command's parameter."""
        return self.name.replace("-", "_")

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The values an Enum option takes, in declaration order; None for another type."""
        return tuple(m.value for m in self.type) if _is_enum(self.type) else None

    def value_in(self, request: Any) -> Any:
        """Its value in `request` (following `weights.dense`)."""
        for part in self.field.split("."):
            request = getattr(request, part)
        return request

    def as_flag(self, value: Any) -> str:
        """`value` as it would be asked on the command line: `--mode colbert`, `--explain`."""
        if self.type is bool and value is True:
            return self.flag
        return f"{self.flag} {value.value if isinstance(value, Enum) else value}"


@dataclass(frozen=True)
class _Declared:
    names: tuple[str, ...]
    help: str
    minimum: float | None
    maximum: float | None
    envvar: str | None
    metavar: str | None


def option(default: Any, *names: str, help: str, minimum: float | None = None, maximum: float | None = None,
           envvar: str | None = None, metavar: str | None = None) -> Any:
    """A dataclass field that is a search option (its type: the field's annotation); `names` default to the
    field's name with `-` for `_`. Use it as the field's default: `k: int = option(10, "k", "top-k", ...)`."""
    if not help.strip():
        raise ValueError("a search option needs its help text")
    return dataclasses.field(default=default,
                             metadata={_KEY: _Declared(tuple(names), help, minimum, maximum, envvar, metavar)})


def declared_options(cls: type) -> tuple[SearchOption, ...]:
    """The search options of dataclass `cls`, in field order; a field whose type is itself a dataclass
    contributes its own (as `weights.dense`). Fields not made with `option()` are not options."""
    return tuple(_declared(cls, ""))


def _declared(cls: type, prefix: str):
    for field, kind, declared in _fields(cls):
        if declared is not None:
            names = declared.names or (field.name.replace("_", "-"),)
            yield SearchOption(names[0], prefix + field.name, kind, field.default, declared.help, names[1:],
                               declared.minimum, declared.maximum, declared.envvar, declared.metavar)
        elif dataclasses.is_dataclass(kind):
            yield from _declared(kind, f"{prefix}{field.name}.")


@functools.cache
def _fields(cls: type) -> tuple[tuple[dataclasses.Field, Any, _Declared | None], ...]:
    """(field, resolved type, its option() declaration or None) for each field of dataclass `cls`; an optional
    text (`str | None`) is of type str."""
    hints = typing.get_type_hints(cls)
    return tuple((f, _plain(hints[f.name]), f.metadata.get(_KEY)) for f in dataclasses.fields(cls))


def _plain(kind: Any) -> Any:
    """`str | None` -> str: an option that may be left out is its type with the default None."""
    members = set(typing.get_args(kind)) if typing.get_origin(kind) in (typing.Union, types.UnionType) else set()
    return str if members == {str, type(None)} else kind


def check_options(instance: Any) -> None:
    """Check the option fields of a frozen dataclass instance (call it from `__post_init__`): an Enum option
    given as a plain string is stored as the enum, an unknown choice or a value out of range is an
    InvalidOptionError naming the field."""
    for field, kind, declared in _fields(type(instance)):
        if declared is None:
            continue
        name, value = field.name, getattr(instance, field.name)
        if _is_enum(kind):
            try:
                object.__setattr__(instance, name, kind(value))
            except ValueError:
                choices = ", ".join(m.value for m in kind)
                raise InvalidOptionError(f"unknown {name} {value!r} (use {choices})") from None
            continue
        low, high = declared.minimum, declared.maximum
        if kind is float and not math.isfinite(value):
            raise InvalidOptionError(f"{name} must be a finite number (got {value})")
        if kind is str:
            if value is not None and not isinstance(value, str):
                raise InvalidOptionError(f"{name} must be a string (got {value!r})")
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            raise InvalidOptionError(f"{name} must be {describe_range(low, high)} (got {value})")


def describe_range(low: float | None, high: float | None) -> str:
    """`from 1 to 10,000`, `at least 1`, `at most 5`: the words of a range check's message."""
    if low is not None and high is not None:
        return f"from {low:,} to {high:,}"
    return f"at least {low:,}" if low is not None else f"at most {high:,}"


def build(cls: type, options: tuple[SearchOption, ...], values: Mapping[str, Any], **fields: Any) -> Any:
    """An instance of `cls` from option values keyed by option name (`dense-weight`), nested fields
    (`weights`) built from theirs; `fields` are given as they are. What neither names keeps its default."""
    by_name = {o.name: o for o in options}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        if name not in by_name:
            raise InvalidOptionError(f"unknown search option {name!r} (search options: {', '.join(by_name)})")
        group, _, attribute = by_name[name].field.rpartition(".")
        if group:
            nested.setdefault(group, {})[attribute] = value
        else:
            fields[attribute] = value
    hints = {f.name: kind for f, kind, _ in _fields(cls)}
    for group, group_values in nested.items():
        fields[group] = hints[group](**group_values)  # one level deep: `weights.dense`
    return cls(**fields)


def _is_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Enum)
