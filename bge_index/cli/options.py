"""The options several commands share, and the checks on them that need no work done first.

This module owns
- the CLI's own choices (output formats, engine, backend, Milvus index and
  vector types); the library's choices are used as they are (query.Mode,
  Fusion, Normalize as option types; model.DTYPE_CHOICES for --dtype);
- the option declarations shared by commands (index folder, model, device,
  dtype, quiet), with their BGE_INDEX_* environment fallbacks;
- the syntax checks of --device/--devices, done by the library's
  `check_device`/`parse_devices` (the CLI only reports them as click does);
- pre-flight checks of the files and folders a command will write at its end
  (`check_output_file`, `check_output_folder`): a path that cannot work fails
  at once, exit 2, before an index run or a model load.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from bge_index.errors import InvalidOptionError
from bge_index.model.identity import DTYPE_CHOICES, check_device, parse_devices


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
