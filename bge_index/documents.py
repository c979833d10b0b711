"""Input documents: paths, folders, globs and stdin -> a stream of `Document`s.

Owns the input formats (.txt/.md one document per file; .jsonl/.ndjson;
.csv/.tsv with a header row; .parquet; each also gzip-compressed as `.gz`),
the rules for ids, titles and text fields, and what counts as bad input.

A bad record never stops the stream: it becomes a `Skipped` item, in order,
in the same stream, so callers can count it, report it as `file:line: reason`
and carry on (or stop, under `--strict`). Everything is read lazily, one file
and one record at a time, so memory does not grow with the corpus.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Union

STDIN = "-"
STDIN_NAME = "<stdin>"


@dataclass(frozen=True, slots=True)
class Document:
    """One document to index. `line` is the 1-based line/row in `source`, None for whole files."""

    id: str
    text: str
    source: str
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Skipped:
    """A record that could not become a Document, with where it was and why."""

    source: str
    line: int | None
    reason: str
    # True when documents may have been lost unseen (an unreadable or cut-off file, a file skipped whole):
    # an incremental run must not take their absence as removal.
    hides_documents: bool = False

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source

    @property
    def category(self) -> str:
        """The reason without its particulars, for counting ("invalid UTF-8 at byte N")."""
        general = re.split(r" \(|;", self.reason, maxsplit=1)[0]
        return re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'…'", general))


DocumentOrSkipped = Union[Document, Skipped]


class InputError(Exception):
    """An input argument that names nothing (no such file, a glob with no match)."""


@dataclass(frozen=True)
class FieldNames:
    """Which record fields hold the id, the text and the optional title (first present wins)."""

    id_fields: tuple[str, ...] = ("id", "_id", "docid")
    text_fields: tuple[str, ...] = ("text", "contents")
    title_field: str = "title"

    @classmethod
    def from_options(cls, id_field: str | None, text_field: str | None) -> "FieldNames":
        default = cls()
        return cls(
            id_fields=(id_field,) if id_field else default.id_fields,
            text_fields=(text_field,) if text_field else default.text_fields,
        )


@dataclass(frozen=True, slots=True)
class InputFile:
    """A file to read. Whole-file documents get `doc_id` as their id."""

    path: Path | None  # None means stdin
    doc_id: str

    @property
    def display(self) -> str:
        return STDIN_NAME if self.path is None else str(self.path)


WHOLE_FILE_FORMATS = {".txt", ".md", ".markdown"}
JSON_LINES_FORMATS = {".jsonl", ".ndjson"}
TABLE_FORMATS = {".csv", ".tsv"}
PARQUET_FORMATS = {".parquet"}
SUPPORTED_FORMATS = WHOLE_FILE_FORMATS | JSON_LINES_FORMATS | TABLE_FORMATS | PARQUET_FORMATS
_GLOB_CHARS = set("*?[")


def format_of(path: Path) -> str:
    """The format suffix of a path, looking through a trailing `.gz` (`a.jsonl.gz` -> `.jsonl`)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def iter_documents(
    inputs: Sequence[str],
    fields: FieldNames = FieldNames(),
    stdin: BinaryIO | None = None,
) -> Iterator[DocumentOrSkipped]:
    """Stream documents (and skipped records) from `inputs`, in input order.

    Every input is checked up front, so a typo fails before any work is done
    (InputError); folders are walked lazily.
    """
    files = resolve_inputs(inputs)
    return _iter_all(files, fields, stdin if stdin is not None else sys.stdin.buffer)


def resolve_inputs(inputs: Sequence[str]) -> Iterator[InputFile]:
    """Check that every input names something, then expand them lazily into files."""
    if not inputs:
        raise InputError("no inputs given")
    expanded: list[Callable[[], Iterable[InputFile]]] = []
    for arg in inputs:
        expanded.append(_expander(arg))
    return (f for expand in expanded for f in expand())


def _expander(arg: str) -> Callable[[], Iterable[InputFile]]:
    if arg == STDIN:
        return lambda: [InputFile(None, STDIN_NAME)]
    path = Path(arg)
    if path.is_dir():
        return lambda: _walk_folder(path)
    if path.is_file():
        return lambda: [InputFile(path, path.as_posix())]
    if _GLOB_CHARS & set(arg):
        matches = _glob(arg)
        if not matches:
            raise InputError(f"no files match {arg!r}")
        return lambda: _expand_matches(matches)
    if path.exists():
        raise InputError(f"not a regular file or folder: {arg}")
    raise InputError(f"no such file or folder: {arg}")


def _glob(pattern: str) -> list[Path]:
    """Paths matching `pattern` (`*`, `?`, `[...]`, and `**` across folders), sorted.

    Unlike glob.glob, symlinked folders are not followed, as in folder walks,
    so a symlink loop cannot repeat files or trap the search.
    """
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    matcher = _glob_regex(parts[fixed:])
    if not base.is_dir():
        return []
    matches = []
    for root, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in [*dirs, *sorted(f for f in files if not f.startswith("."))]:
            path = Path(root) / name
            if matcher.fullmatch(path.relative_to(base).as_posix()):
                matches.append(path)
    return sorted(matches)


def _glob_regex(parts: Sequence[str]) -> re.Pattern:
    """A regex over '/'-joined relative paths: `**` spans folders, `*`, `?`, `[...]` stay within one."""
    pieces = []
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**":
            pieces.append(".*" if last else "(?:[^/]+/)*")
        else:
            pieces.append(_segment_regex(part) + ("" if last else "/"))
    return re.compile("".join(pieces))


def _segment_regex(segment: str) -> str:
    out, i = [], 0
    while i < len(segment):
        char = segment[i]
        close = segment.find("]", i + 2) if char == "[" else -1
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif close != -1:
            body = segment[i + 1:close]
            negate = body.startswith("!")
            body = re.sub(r"([\\^\]])", r"\\\1", body[1:] if negate else body)
            out.append(f"[{'^/' if negate else ''}{body}]")
            i = close
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _expand_matches(matches: list[Path]) -> Iterator[InputFile]:
    seen: set[Path] = set()
    for path in matches:
        found = _walk_folder(path) if path.is_dir() else [InputFile(path, path.as_posix())] if path.is_file() else []
        for input_file in found:
            # `dir/**` matches a folder and the files inside it: read each file once.
            if input_file.path not in seen:
                seen.add(input_file.path)
                yield input_file


def _walk_folder(folder: Path) -> Iterator[InputFile]:
    """Supported files under `folder`, recursively, in a stable (sorted) order.

    Hidden files and folders are passed over; symlinked folders are not followed
    (os.walk's default), so a symlink loop cannot trap the walk.
    """
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or format_of(path) not in SUPPORTED_FORMATS:
                continue
            yield InputFile(path, path.relative_to(folder).as_posix())


def read_input_file(input_file: InputFile, fields: FieldNames = FieldNames()) -> Iterator[DocumentOrSkipped]:
    """Documents (and skipped records) of one file, in order: what a distributed reader runs per file."""
    if input_file.path is None:
        raise ValueError("read_input_file reads files, not stdin")
    return _read_file(input_file, fields)


def _iter_all(files: Iterable[InputFile], fields: FieldNames, stdin: BinaryIO) -> Iterator[DocumentOrSkipped]:
    for input_file in files:
        if input_file.path is None:
            yield from _read_json_lines(stdin, STDIN_NAME, fields)
        else:
            yield from _read_file(input_file, fields)


def _read_file(input_file: InputFile, fields: FieldNames) -> Iterator[DocumentOrSkipped]:
    path = input_file.path
    assert path is not None
    source = input_file.display
    fmt = format_of(path)
    if fmt not in SUPPORTED_FORMATS:
        supported = " ".join(sorted(SUPPORTED_FORMATS))
        yield Skipped(source, None, f"unsupported file type {fmt or '(none)'!r} (supported: {supported}, each also .gz)")
        return
    try:
        if fmt in WHOLE_FILE_FORMATS:
            yield from _read_whole_file(path, input_file.doc_id, source)
        elif fmt in PARQUET_FORMATS:
            yield from _read_parquet(path, source, fields)
        else:
            with _open_binary(path) as stream:
                if fmt in JSON_LINES_FORMATS:
                    yield from _read_json_lines(stream, source, fields)
                else:
                    yield from _read_table(stream, source, fields, delimiter="\t" if fmt == ".tsv" else ",")
    except _READ_ERRORS as error:  # unreadable, vanished, or a corrupt/truncated gzip stream
        yield Skipped(source, None, f"cannot read file: {_describe_read_error(error)}", hides_documents=True)


# OSError: unreadable or vanished files and bad gzip headers; EOFError and
# zlib.error: gzip streams cut short or damaged inside.
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _describe_read_error(error: BaseException) -> str:
    if isinstance(error, (gzip.BadGzipFile, EOFError, zlib.error)):
        return f"corrupt or truncated gzip data ({error})"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def _open_binary(path: Path) -> BinaryIO:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _read_whole_file(path: Path, doc_id: str, source: str) -> Iterator[DocumentOrSkipped]:
    try:
        with _open_binary(path) as stream:
            data = stream.read()
    except (EOFError, zlib.error) as error:
        yield Skipped(source, None, f"corrupt or truncated gzip data ({error})", hides_documents=True)
        return
    if b"\x00" in data:
        yield Skipped(source, None, "binary file (contains NUL bytes)")
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        yield Skipped(source, None, f"invalid UTF-8 at byte {error.start}")
        return
    if not text.strip():
        yield Skipped(source, None, "empty text")
        return
    yield Document(doc_id, text, source)


def _read_json_lines(stream: BinaryIO, source: str, fields: FieldNames) -> Iterator[DocumentOrSkipped]:
    line_number = 0
    lines = iter(stream)
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except _READ_ERRORS as error:
            yield Skipped(source, line_number + 1,
                          f"cannot read further, rest of file skipped: {_describe_read_error(error)}",
                          hides_documents=True)
            return
        line_number += 1
        if not raw.strip():
            continue
        yield _json_line_to_document(raw, source, line_number, fields)


def _json_line_to_document(raw: bytes, source: str, line: int, fields: FieldNames) -> DocumentOrSkipped:
    try:
        decoded = raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as error:
        return Skipped(source, line, f"invalid UTF-8 at byte {error.start}")
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as error:
        return Skipped(source, line, f"malformed JSON ({error.msg} at column {error.colno})")
    if not isinstance(record, dict):
        return Skipped(source, line, f"JSON line is not an object (got {type(record).__name__})")
    return record_to_document(record, source, line, fields)


def record_to_document(record: Mapping[str, object], source: str, line: int, fields: FieldNames) -> DocumentOrSkipped:
    """Pick id, text and optional title out of one record; the title is prepended to the text."""
    id_field = next((f for f in fields.id_fields if record.get(f) is not None), None)
    if id_field is None:
        return Skipped(source, line, f"no id field (looked for {', '.join(fields.id_fields)})")
    doc_id = record[id_field]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return Skipped(source, line, f"id field {id_field!r} is a {type(doc_id).__name__}, not a string or integer")
    doc_id = str(doc_id)
    if not doc_id.strip():
        return Skipped(source, line, "empty id")
    text_field = next((f for f in fields.text_fields if record.get(f) is not None), None)
    if text_field is None:
        return Skipped(source, line, f"no text field (looked for {', '.join(fields.text_fields)})")
    text = record[text_field]
    if not isinstance(text, str):
        return Skipped(source, line, f"text field {text_field!r} is a {type(text).__name__}, not a string")
    title = record.get(fields.title_field)
    if title is not None and not isinstance(title, str):
        return Skipped(source, line, f"title field {fields.title_field!r} is a {type(title).__name__}, not a string")
    if not text.strip():
        return Skipped(source, line, "empty text")
    if title and title.strip():
        # BEIR's convention (and FlagEmbedding's evaluation): "title text".
        text = f"{title.strip()} {text}"
    return Document(doc_id, text, source, line)


def _read_table(stream: BinaryIO, source: str, fields: FieldNames, delimiter: str) -> Iterator[DocumentOrSkipped]:
    # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file.
    text_stream = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    # TSV is taken literally (BEIR style: no quoting); CSV follows RFC 4180 quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB would reject long documents
    reader = csv.reader(text_stream, delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as error:
        yield Skipped(source, 1, f"unreadable header row ({error})", hides_documents=True)
        return
    header = [name.strip() for name in header]
    missing = _missing_columns(header, fields)
    if missing:
        yield Skipped(source, 1, f"{missing}; whole file skipped (header: {', '.join(header)})", hides_documents=True)
        return
    row_start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield Skipped(source, row_start, f"malformed row ({error})")
            row_start = reader.line_num + 1
            continue
        line, row_start = row_start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield Skipped(source, line, f"expected {len(header)} columns, found {len(row)}")
            continue
        if any(_has_surrogates(cell) for cell in row):
            yield Skipped(source, line, "invalid UTF-8")
            continue
        yield record_to_document(dict(zip(header, row)), source, line, fields)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _missing_columns(columns: Sequence[str], fields: FieldNames) -> str | None:
    if not any(f in columns for f in fields.id_fields):
        return f"no id column (looked for {', '.join(fields.id_fields)})"
    if not any(f in columns for f in fields.text_fields):
        return f"no text column (looked for {', '.join(fields.text_fields)})"
    return None


def _read_parquet(path: Path, source: str, fields: FieldNames) -> Iterator[DocumentOrSkipped]:
    # Parquet decoding lives in shards.py, the one module that speaks pyarrow.
    from bge_index import shards

    try:
        columns = shards.parquet_column_names(path)
    except shards.UnreadableParquet as error:
        yield Skipped(source, None, str(error), hides_documents=True)
        return
    missing = _missing_columns(columns, fields)
    if missing:
        yield Skipped(source, None, f"{missing}; whole file skipped", hides_documents=True)
        return
    wanted = [c for c in (*fields.id_fields, *fields.text_fields, fields.title_field) if c in columns]
    try:
        for row_number, record in enumerate(shards.iter_parquet_records(path, wanted), start=1):
            yield record_to_document(record, source, row_number, fields)
    except shards.UnreadableParquet as error:
        yield Skipped(source, None, str(error), hides_documents=True)


# ---------------------------------------------------------------------------
# Query files


class QueryFileError(Exception):
    """A query file that cannot be read as a whole (queries are few: one bad line fails them all)."""


def read_queries(path: str, stdin: BinaryIO | None = None) -> list[Document]:
    """Queries from JSONL (`_id`/`id` + `text`) or TSV (`id<TAB>text`, no header); `-` reads stdin."""
    fields = FieldNames(id_fields=("_id", "id", "query_id", "qid"), text_fields=("text", "query"))
    if path == STDIN:
        stream: BinaryIO = stdin if stdin is not None else sys.stdin.buffer
        source = STDIN_NAME
    else:
        try:
            stream = _open_binary(Path(path))
        except OSError as error:
            raise QueryFileError(f"--queries {path}: {_describe_read_error(error)}") from error
        source = path
    tsv = path != STDIN and format_of(Path(path)) in (".tsv", ".txt")
    with stream:
        records = _read_tsv_queries(stream, source) if tsv else _read_json_lines(stream, source, fields)
        queries = []
        try:
            for item in records:
                if isinstance(item, Skipped):
                    raise QueryFileError(f"{item.location}: {item.reason}")
                queries.append(item)
        except _READ_ERRORS as error:
            raise QueryFileError(f"--queries {path}: {_describe_read_error(error)}") from error
    if not queries:
        raise QueryFileError(f"--queries {path}: no queries found")
    return queries


def _read_tsv_queries(stream: BinaryIO, source: str) -> Iterator[DocumentOrSkipped]:
    for line_number, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            yield Skipped(source, line_number, f"invalid UTF-8 at byte {error.start}")
            continue
        query_id, tab, text = line.partition("\t")
        if not tab or not query_id.strip() or not text.strip():
            yield Skipped(source, line_number, "expected 'id<TAB>text' with a non-empty id and text")
            continue
        yield Document(query_id, text, source, line_number)
