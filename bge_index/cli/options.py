"""The options several commands share, and the checks on them that need no work done first.

This module owns
- the CLI's own choices (output formats, engine, backend, Milvus index and
  vector types); the library's choices are used as they are (query.Mode,
  Fusion, Normalize as option types; model.DTYPE_CHOICES for --dtype);
- the option declarations shared by commands (index folder, model, device,
  dtype, quiet), with their BGE_INDEX_* environment fallbacks;
- the search options' flags (`with_search_flags`), made from the library's
  declaration (query.SEARCH_OPTIONS) for `search` and `eval`, never written
  out by hand: a new search option is a flag of both without a change here;
- the syntax checks of --device/--devices, done by the library's
  `check_device`/`parse_devices` (the CLI only reports them as click does);
- pre-flight checks of the files and folders a command will write at its end
  (`check_output_file`, `check_output_folder`): a path that cannot work fails
  at once, exit 2, before an index run or a model load.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Collection, Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bge_index.errors import InvalidOptionError
from bge_index.model.identity import DTYPE_CHOICES, check_device, parse_devices
from bge_index.search.query import SEARCH_OPTIONS


class ResultFormat(str, Enum):
    """`search --format`."""

    table = "table"
    json = "json"
    jsonl = "jsonl"
    tsv = "tsv"
    trec = "trec"


class ReportFormat(str, Enum):
    """`info --format`, `eval --format`."""

    table = "table"
    json = "json"


class IdFrom(str, Enum):
    """`index --id-from`."""

    path = "path"
    stem = "stem"
    name = "name"


class Engine(str, Enum):
    """`index --engine`."""

    local = "local"
    ray = "ray"


class Backend(str, Enum):
    """`search --backend`."""

    local = "local"
    milvus = "milvus"


class MilvusIndexType(str, Enum):
    """`export milvus --index`."""

    flat = "flat"
    hnsw = "hnsw"


class DenseType(str, Enum):
    """`export milvus --dense-type`."""

    auto = "auto"
    float = "float"
    float16 = "float16"


# --dtype's choices are the library's (model.DTYPE_CHOICES), as an Enum so --help lists them.
Dtype = Enum("Dtype", [(name, name) for name in DTYPE_CHOICES], type=str)


def _library_check(check, value: str, param: typer.CallbackParam) -> str:
    try:
        return check(value, option=param.opts[0])
    except InvalidOptionError as error:
        raise typer.BadParameter(str(error).removeprefix(f"{param.opts[0]} ")) from None


def _device(param: typer.CallbackParam, value: str) -> str:
    return _library_check(check_device, value, param)


def _devices(param: typer.CallbackParam, value: Optional[str]) -> Optional[str]:
    if value is not None:
        _library_check(parse_devices, value, param)
    return value


IndexDir = Annotated[Path, typer.Argument(help="Index folder.", show_default=False)]
Device = Annotated[str, typer.Option(envvar="BGE_INDEX_DEVICE", callback=_device,
                                     help="auto, cpu, cuda, cuda:N or mps.")]
Devices = Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_DEVICES", callback=_devices,
                                                help="cuda:0,cuda:1 or all: one encoder per device "
                                                     "(instead of --device).")]
QueryModel = Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_MODEL",
                                                   help="Model to encode queries (must be the index's own).")]
QueryDtype = Annotated[Dtype, typer.Option(envvar="BGE_INDEX_DTYPE",
                                           help="Query encoding precision; auto: the index's own.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]


def with_search_flags(*, before: str, leave_out: Collection[str] = (), help: Mapping[str, str] | None = None,
                      environment: bool = True) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A command decorator: one flag per declared search option (query.SEARCH_OPTIONS, in its order) but those
    named in `leave_out`, placed before the command's parameter `before`, with the declared names, type,
    default, range, help (or `help[name]`) and, with `environment`, environment variable.

    The command declares its own flags as usual and one more parameter, `search_options`: it gets the search
    flags' values there, keyed by option name (`dense-weight`), for `query.request_from_options`.
    """
    help = dict(help or {})
    known = {o.name for o in SEARCH_OPTIONS}
    if not known.issuperset(leave_out) or not known.issuperset(help):
        raise ValueError(f"not search options: {sorted((set(leave_out) | set(help)) - known)}")
    declared = [o for o in SEARCH_OPTIONS if o.name not in leave_out]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)  # all by keyword, as typer passes them
               for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "search_options"]
        names = [p.name for p in own]
        if clash := {o.parameter for o in declared} & set(names):
            raise ValueError(f"{command.__name__}: parameters named as search options: {sorted(clash)}")
        flags = [inspect.Parameter(o.parameter, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                                   annotation=Annotated[Optional[o.type] if o.default is None else o.type, typer.Option(
                                       *o.flags, min=o.minimum, max=o.maximum, help=help.get(o.name, o.help),
                                       envvar=o.envvar if environment else None, metavar=o.metavar)])
                 for o in declared]
        at = names.index(before)
        parameters = own[:at] + flags + own[at:]

        @functools.wraps(command)
        def with_flags(**kwargs: Any) -> None:
            values = {o.name: kwargs.pop(o.parameter) for o in declared}
            return command(**kwargs, search_options=values)

        with_flags.__signature__ = inspect.Signature(parameters)
        with_flags.__annotations__ = {p.name: p.annotation for p in parameters}
        return with_flags

    return decorate


def check_output_file(path: Path | None, option: str) -> None:
    """A file to be written at the end (`--report`): its folder must exist and be writable now (else exit 2)."""
    if path is None:
        return
    if path.is_dir():
        raise InvalidOptionError(f"{option} {path}: is a folder; name a file")
    folder = path.parent
    if not folder.is_dir():
        raise InvalidOptionError(f"{option} {path}: no such folder: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidOptionError(f"{option} {path}: not writable")


def check_output_folder(path: Path | None, option: str) -> None:
    """A folder to be written into (`eval --runs`), created if need be: it must be possible now (else exit 2)."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise InvalidOptionError(f"{option} {path}: exists and is not a folder")
    existing = path
    while not existing.exists():  # the nearest existing ancestor is where the folder would be made
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidOptionError(f"{option} {path}: cannot create it: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidOptionError(f"{option} {path}: cannot create or write it: {existing} is not writable")
