"""Input formats: one reader per format, each turning one file into `Document`s and `Skipped` records.

Owns every input format: .txt/.md (one document per file), .jsonl/.ndjson, .csv/.tsv
with a header row, and .parquet, each also gzip-compressed as `.gz`; the rules for
ids, titles and text fields (`record_to_document`); what counts as bad input and
the `SkipReason` code of each kind; and query files (`read_queries`).

A bad record never stops a reader: it becomes a `Skipped` item, in order, in the
same stream. A skip whose record's id is not known (a malformed line, a bad row)
hides documents: the line may have held any indexed id, whose good copy must stay;
one whose id is known carries it (`Skipped.doc_id`). Hostile input is a skip too:
JSON nested past the recursion limit, lone surrogates (not valid Unicode: UTF-8
cannot store them), control characters in ids (ids are keys, printed in TSV and
TREC), FIFOs, sockets and devices (never opened: a FIFO blocks), broken symlinks.
Control characters in a text are kept, NUL included: the text is stored and
tokenised as it is (a .txt/.md with NUL bytes is still skipped as binary). Files are read lazily, one record (Parquet: one record batch) at a
time, so memory does not grow with the file (Parquet: batches sized by the page headers, read first). Parquet input is read here with
pyarrow directly; the index's own Parquet shards are another module's business.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import gzip
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import zlib
from datetime import datetime, timezone
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from bge_index.input.types import (
    STDIN,
    STDIN_NAME,
    Document,
    DEFAULT_MAX_DOCUMENT_BYTES,
    METADATA_MAX_BYTES,
    METADATA_MAX_DEPTH,
    METADATA_MAX_FIELDS,
    DocumentOrSkipped,
    FieldNames,
    InputFile,
    SkipReason,
    Skipped,
)
from bge_index.errors import QueryFileError
from bge_index.input.parquet_pages import PARQUET_VALUE_BYTES, DamagedPage, FileWalk, GroupPages, largest_pages

WHOLE_FILE_FORMATS = {".txt", ".md", ".markdown"}
JSON_LINES_FORMATS = {".jsonl", ".ndjson"}
TABLE_FORMATS = {".csv", ".tsv"}
PARQUET_FORMATS = {".parquet"}
SUPPORTED_FORMATS = WHOLE_FILE_FORMATS | JSON_LINES_FORMATS | TABLE_FORMATS | PARQUET_FORMATS
PARQUET_BATCH_ROWS = 1024  # rows of a Parquet input decoded at a time, at most
PARQUET_BATCH_BYTES = 64 << 20  # ...and fewer when the pages say a batch could hold more bytes (one row at least)
# No Parquet page larger than this many times --max-document-bytes (and never less than the floor) is unpacked:
# pyarrow puts up to 1024 values in a page, so a page of ordinary long documents is far over one document's bound.
PARQUET_PAGE_DOCUMENTS = 2
PARQUET_PAGE_FLOOR = 64 << 20
PARQUET_READ_BUFFER = 1 << 20  # compressed bytes of a column read at a time


def format_of(path: Path) -> str:
    """The format suffix of a path, looking through a trailing `.gz` (`a.jsonl.gz` -> `.jsonl`)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def is_inside(real: str, folder: str) -> bool:
    """Whether the real path `real` is the real folder `folder` or under it.

        >>> is_inside("/srv/docs/a.txt", "/srv/docs"), is_inside("/srv/docs2/a.txt", "/srv/docs")
        (True, False)
    """
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


def read_input_file(input_file: InputFile, fields: FieldNames = FieldNames(),
                    max_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> Iterator[DocumentOrSkipped]:
    """Documents (and skipped records) of one file, in order: what a distributed reader runs per file.

    A document over `max_bytes` (the file's text, a JSON line, a CSV/TSV field) is skipped with the code
    `DOCUMENT_TOO_LARGE`, having read no more than `max_bytes` of it at a time (a Parquet cell: no page over
    `parquet_page_bound(max_bytes)` is unpacked; a row group holding one has each of its rows skipped).
    """
    if input_file.path is None:
        raise ValueError("read_input_file reads files, not stdin")
    return _read_file(input_file, fields, max_bytes)


def _read_file(input_file: InputFile, fields: FieldNames, max_bytes: int) -> Iterator[DocumentOrSkipped]:
    path = input_file.path
    assert path is not None
    source = input_file.display
    if input_file.problem is not None:  # a folder the walk could not list
        yield _unlistable(source, input_file.problem)
        return
    if input_file.root is not None and not is_inside(os.path.realpath(path), input_file.root):
        yield _link_outside(source, os.path.realpath(path))
        return
    # Looked at before anything opens it: a FIFO would block the run for ever, a device may do anything.
    try:
        info = os.stat(path)
    except OSError as error:  # vanished since it was listed, a dangling or looping symlink, unreadable
        yield _unreachable(path, source, error)
        return
    if stat.S_ISDIR(info.st_mode):
        # A folder that could not be listed (an engine that rebuilds InputFiles loses `problem`), or one put
        # where a file was listed. Either way what it holds was not read: its documents are kept.
        yield _folder_in_place_of_a_file(path, source)
        return
    if not stat.S_ISREG(info.st_mode):
        yield _not_regular(source, info.st_mode)
        return
    identity = None
    if input_file.root is not None:
        # The check above read the path; what is read is a file descriptor. A path component swapped for a link
        # between the two (a folder others can write to) must not make it read another file: the opened file's
        # own path is checked, and every later opening must be that same file.
        try:
            identity, outside = _opened_inside(path, input_file.root)
        except _READ_ERRORS as error:  # unreadable, or gone since it was looked at: its documents are kept
            yield Skipped(source, None, f"cannot read file: {_describe_read_error(error)}", hides_documents=True,
                          code=SkipReason.UNREADABLE_FILE)
            return
        if outside is not None:
            yield _link_outside(source, outside)
            return
    fmt = format_of(path)
    if fmt not in SUPPORTED_FORMATS:
        supported = " ".join(sorted(SUPPORTED_FORMATS))
        yield Skipped(source, None, f"unsupported file type {fmt or '(none)'!r} (supported: {supported}, each also .gz)",
                      code=SkipReason.UNSUPPORTED_FORMAT)
        return
    try:
        if fmt in WHOLE_FILE_FORMATS:
            yield from _read_whole_file(path, input_file.doc_id, source, max_bytes, info, identity)
        elif fmt in PARQUET_FORMATS:
            yield from _read_parquet(path, source, fields, max_bytes, identity)
        else:
            with _open_input(path, identity) as stream:
                if fmt in JSON_LINES_FORMATS:
                    yield from read_json_lines(stream, source, fields, max_bytes)
                else:
                    yield from _read_table(stream, source, fields, "\t" if fmt == ".tsv" else ",", max_bytes)
    except NotRegularFileError as error:  # turned into a FIFO or device between the look and the opening
        yield _not_regular(source, error.mode)
    except _READ_ERRORS as error:  # unreadable, vanished, or a corrupt/truncated gzip stream
        code = SkipReason.UNREADABLE_GZIP if _is_gzip_error(error) else SkipReason.UNREADABLE_FILE
        yield Skipped(source, None, f"cannot read file: {_describe_read_error(error)}", hides_documents=True, code=code)


def _link_outside(source: str, real: str) -> Skipped:
    """A file whose real path `real` is outside its input folder: not read. Its documents go (it is no input)."""
    return Skipped(source, None, f"symbolic link out of the input folder (to {real}); not read (--follow-links reads it)",
                   code=SkipReason.LINK_OUTSIDE_INPUTS)


def _unlistable(source: str, why: str) -> Skipped:
    """A folder that could not be listed: every document under it is unseen, not gone."""
    return Skipped(source, None, f"cannot list folder: {why}", hides_documents=True, code=SkipReason.UNLISTABLE_FOLDER)


def _folder_in_place_of_a_file(folder: Path, source: str) -> Skipped:
    try:
        with os.scandir(folder):
            pass
    except OSError as error:
        return _unlistable(source, error.strerror or str(error))
    return Skipped(source, None, f"cannot read file: {os.strerror(errno.EISDIR)}", hides_documents=True,
                   code=SkipReason.UNREADABLE_FILE)


def _unreachable(path: Path, source: str, error: OSError) -> Skipped:
    """A path that cannot be looked at: a broken symlink, or a file gone or unreadable. Its documents are kept."""
    if os.path.islink(path):
        return Skipped(source, None, f"broken symbolic link ({_describe_read_error(error)})", hides_documents=True,
                       code=SkipReason.BROKEN_LINK)
    return Skipped(source, None, f"cannot read file: {_describe_read_error(error)}", hides_documents=True,
                   code=SkipReason.UNREADABLE_FILE)


_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"))


def _not_regular(source: str, mode: int) -> Skipped:
    """A FIFO, socket or device given or found as an input: never opened. It hides documents (it was to be read)."""
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "not a file")
    return Skipped(source, None, f"not a regular file ({kind}); not opened", hides_documents=True,
                   code=SkipReason.NOT_A_REGULAR_FILE)


class NotRegularFileError(OSError):
    """`open_regular_file` found a FIFO, socket or device (`mode`) where a file was expected."""

    def __init__(self, path: Path, mode: int):
        super().__init__(f"{path}: not a regular file")
        self.mode = mode


class ReplacedFileError(OSError):
    """`open_regular_file` opened another file than the one checked at that path (replaced in between)."""

    def __init__(self, path: Path):
        super().__init__(errno.ESTALE, "replaced while it was being read (not the file that was checked)", str(path))


FileIdentity = tuple  # (st_dev, st_ino) of a file checked once, which every later opening must be
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def open_regular_file(path: Path, expected: FileIdentity | None = None) -> BinaryIO:
    """`path` opened for reading in binary, if it is a regular file; NotRegularFileError if not; with `expected`,
    ReplacedFileError if it is not that file (st_dev, st_ino).

    Opened non-blocking and checked on the open descriptor, so a FIFO put in the file's place after it
    was looked at cannot block the run (opening a FIFO waits for a writer; with O_NONBLOCK it does not).
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        info = os.fstat(fd)
        mode = info.st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(path, mode)
        if expected is not None and (info.st_dev, info.st_ino) != tuple(expected):
            raise ReplacedFileError(path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _opened_inside(path: Path, root: str) -> tuple[FileIdentity, str | None]:
    """Open `path` and find where the opened file really is: (its identity, None) when inside the real folder
    `root`, else (identity, where it is). On Linux the kernel's own path of the descriptor (/proc/self/fd);
    elsewhere the real path, which must then be that same file."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        info = os.fstat(fd)
        identity = (info.st_dev, info.st_ino)
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            real = os.path.realpath(path)
            try:
                again = os.stat(real)
            except OSError:
                return identity, real
            if (again.st_dev, again.st_ino) != identity:
                return identity, real
    finally:
        os.close(fd)
    return identity, None if real.startswith(os.sep) and is_inside(real, root) else real


@contextlib.contextmanager
def _open_input(path: Path, expected: FileIdentity | None = None) -> Iterator[BinaryIO]:
    """An input file, opened as `open_regular_file` does (`expected`: the file it must be) and gunzipped when it
    ends in `.gz`."""
    with open_regular_file(path, expected) as raw:
        if path.suffix.lower() == ".gz":
            with gzip.GzipFile(fileobj=raw, mode="rb") as unpacked:
                yield unpacked  # type: ignore[misc]
        else:
            yield raw


# OSError: unreadable or vanished files and bad gzip headers; EOFError and
# zlib.error: gzip streams cut short or damaged inside.
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _is_gzip_error(error: BaseException) -> bool:
    return isinstance(error, (gzip.BadGzipFile, EOFError, zlib.error))


def _describe_read_error(error: BaseException) -> str:
    if _is_gzip_error(error):
        return f"corrupt or truncated gzip data ({error})"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def _open_binary(path: Path) -> BinaryIO:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


# ---------------------------------------------------------------------------
# .txt / .md: one document per file


def _too_large(source: str, line: int | None, max_bytes: int, what: str, doc_id: str | None = None,
               hides_documents: bool = False, skipped: str = "skipped") -> Skipped:
    """The skip of a document over the size bound (its indexed copy, if its id is known, is kept)."""
    return Skipped(source, line, f"{what} over {max_bytes:,} bytes (--max-document-bytes); {skipped}",
                   hides_documents=hides_documents, code=SkipReason.DOCUMENT_TOO_LARGE, doc_id=doc_id)


def _read_whole_file(path: Path, doc_id: str, source: str, max_bytes: int,
                     info: os.stat_result | None = None, expected: FileIdentity | None = None
                     ) -> Iterator[DocumentOrSkipped]:
    # The id is the file's path: one that is no valid id (a name in another encoding, a newline in it) is
    # skipped before the file is read. A lone surrogate cannot have been indexed: no good copy to keep.
    bad_id = _id_problem(doc_id)
    if bad_id is not None:
        code, message = bad_id
        yield Skipped(source, None, message, code=code,
                      doc_id=doc_id if code is SkipReason.CONTROL_CHARACTER_IN_ID else None)
        return
    try:
        with _open_input(path, expected) as stream:
            data = stream.read(max_bytes + 1)  # a gzip bomb stops here: never more than the bound unpacked
    except (EOFError, zlib.error) as error:
        yield Skipped(source, None, f"corrupt or truncated gzip data ({error})", hides_documents=True,
                      code=SkipReason.TRUNCATED_GZIP, doc_id=doc_id)
        return
    # Skips of a file whose id is known carry it: the index keeps that id's good copy.
    if len(data) > max_bytes:
        yield _too_large(source, None, max_bytes, "text", doc_id=doc_id)
        return
    if b"\x00" in data:
        yield Skipped(source, None, "binary file (contains NUL bytes)", code=SkipReason.BINARY_FILE, doc_id=doc_id)
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        yield Skipped(source, None, f"invalid UTF-8 at byte {error.start}", code=SkipReason.INVALID_UTF8_AT,
                      doc_id=doc_id)
        return
    if not text.strip():
        yield Skipped(source, None, "empty text", code=SkipReason.EMPTY_TEXT, doc_id=doc_id)
        return
    yield Document(doc_id, text, source, metadata=file_metadata(path, info or os.stat(path), source))


# ---------------------------------------------------------------------------
# .jsonl / .ndjson (and stdin)


def read_json_lines(stream: BinaryIO, source: str, fields: FieldNames,
                    max_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> Iterator[DocumentOrSkipped]:
    """Documents (and skipped lines) of a JSON Lines stream, one object per line; blank lines are passed over.

    A stream that fails part-way (a damaged gzip) ends with one Skipped for the rest of it. A line over
    `max_bytes` is skipped (its id unknown: it hides documents) without ever being held whole.
    """
    line_number = 0
    lines = _bounded_lines(stream, max_bytes)
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except _READ_ERRORS as error:
            code = SkipReason.READ_CUT_SHORT_GZIP if _is_gzip_error(error) else SkipReason.READ_CUT_SHORT
            yield Skipped(source, line_number + 1,
                          f"cannot read further, rest of file skipped: {_describe_read_error(error)}",
                          hides_documents=True, code=code)
            return
        line_number += 1
        if raw is None:
            yield _too_large(source, line_number, max_bytes, "line", hides_documents=True)
            continue
        if not raw.strip():
            continue
        yield _json_line_to_document(raw, source, line_number, fields)


def _bounded_lines(stream: BinaryIO, max_bytes: int) -> Iterator[bytes | None]:
    """The stream's lines, each read `max_bytes` at most at a time; None stands for a longer line (passed over)."""
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        if len(line) <= max_bytes or line.endswith(b"\n"):  # within the bound (its newline may be the byte over)
            yield line
            continue
        while line and not line.endswith(b"\n"):  # the rest of the long line, a bounded piece at a time
            line = stream.readline(1 << 20)
        yield None


def _json_line_to_document(raw: bytes, source: str, line: int, fields: FieldNames) -> DocumentOrSkipped:
    # Until the record is parsed its id is unknown: these skips hide documents (the line may have held any id).
    try:
        decoded = raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as error:
        return Skipped(source, line, f"invalid UTF-8 at byte {error.start}", hides_documents=True,
                       code=SkipReason.INVALID_UTF8_AT)
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as error:
        return Skipped(source, line, f"malformed JSON ({error.msg} at column {error.colno})", hides_documents=True,
                       code=SkipReason.MALFORMED_JSON)
    except RecursionError:  # nesting deeper than the recursion limit: the parser gives up, the run must not
        return Skipped(source, line, "JSON nested too deeply", hides_documents=True, code=SkipReason.JSON_TOO_DEEP)
    except ValueError as error:  # valid JSON Python will not take: an integer of more than 4300 digits
        return Skipped(source, line, f"malformed JSON ({error})", hides_documents=True,
                       code=SkipReason.MALFORMED_JSON)
    if not isinstance(record, dict):
        return Skipped(source, line, f"JSON line is not an object (got {type(record).__name__})",
                       hides_documents=True, code=SkipReason.NOT_AN_OBJECT)
    return record_to_document(record, source, line, fields)


def record_to_document(record: Mapping[str, object], source: str, line: int, fields: FieldNames) -> DocumentOrSkipped:
    """Pick id, text and optional title out of one record; the title is prepended to the text.

    A record skipped before its id is known hides documents; one skipped after carries its id (`doc_id`).
    """
    id_field = _id_field(record, fields)
    if id_field is None:
        return Skipped(source, line, f"no id field (looked for {', '.join(fields.id_fields)})", hides_documents=True,
                       code=SkipReason.NO_ID_FIELD)
    doc_id = record[id_field]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return Skipped(source, line, f"id field {id_field!r} is a {type(doc_id).__name__}, not a string or integer",
                       hides_documents=True, code=SkipReason.BAD_ID_TYPE)
    doc_id = str(doc_id)
    if not doc_id.strip():
        return Skipped(source, line, "empty id", hides_documents=True, code=SkipReason.EMPTY_ID)
    bad_id = _id_problem(doc_id, id_field)
    if bad_id is not None:
        code, message = bad_id
        if code is SkipReason.LONE_SURROGATE:
            # No index can hold this id (UTF-8 cannot encode it): a damaged copy of some other id, perhaps.
            return Skipped(source, line, message, hides_documents=True, code=code)
        return Skipped(source, line, message, code=code, doc_id=doc_id)  # an older index may hold it: kept
    text_field = next((f for f in fields.text_fields if record.get(f) is not None), None)
    if text_field is None:
        return Skipped(source, line, f"no text field (looked for {', '.join(fields.text_fields)})",
                       code=SkipReason.NO_TEXT_FIELD, doc_id=doc_id)
    text = record[text_field]
    if not isinstance(text, str):
        return Skipped(source, line, f"text field {text_field!r} is a {type(text).__name__}, not a string",
                       code=SkipReason.BAD_TEXT_TYPE, doc_id=doc_id)
    title = record.get(fields.title_field)
    if title is not None and not isinstance(title, str):
        return Skipped(source, line, f"title field {fields.title_field!r} is a {type(title).__name__}, not a string",
                       code=SkipReason.BAD_TITLE_TYPE, doc_id=doc_id)
    for name, value in ((text_field, text), (fields.title_field, title)):
        surrogate = _lone_surrogate(value) if value else None
        if surrogate is not None:
            return Skipped(source, line, _surrogate_message(name, value, surrogate),  # type: ignore[arg-type]
                           code=SkipReason.LONE_SURROGATE, doc_id=doc_id)
    if not text.strip():
        return Skipped(source, line, "empty text", code=SkipReason.EMPTY_TEXT, doc_id=doc_id)
    metadata, problem = record_metadata(record, {id_field, text_field, fields.title_field})
    if problem is not None:
        return Skipped(source, line, problem, code=SkipReason.METADATA_TOO_LARGE, doc_id=doc_id)
    if title and title.strip():
        # BEIR's convention (and FlagEmbedding's evaluation): "title text".
        text = f"{title.strip()} {text}"
    return Document(doc_id, text, source, line, metadata)


def record_metadata(record: Mapping[str, object], taken: set[str]) -> tuple[dict[str, str] | None, str | None]:
    """A record's other fields as strings (a string as is, null left out, anything else as JSON), or why not.

        >>> record_metadata({"id": 1, "text": "t", "lang": "de", "year": 2024, "tags": ["a"]}, {"id", "text"})
        ({'lang': 'de', 'tags': '["a"]', 'year': '2024'}, None)
    """
    metadata: dict[str, str] = {}
    size = 0
    for key, value in record.items():
        if key in taken or value is None or value is _UNDECODABLE:
            continue
        if len(metadata) >= METADATA_MAX_FIELDS:
            return None, f"metadata: more than {METADATA_MAX_FIELDS} fields besides id and text"
        if _depth(value) > METADATA_MAX_DEPTH:
            return None, f"metadata field {key!r} nested deeper than {METADATA_MAX_DEPTH} levels"
        encoded = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        if _lone_surrogate(str(key)) is not None or _lone_surrogate(encoded) is not None:
            return None, f"metadata field {key!r} is not valid Unicode"
        size += len(str(key).encode("utf-8")) + len(encoded.encode("utf-8"))
        if size > METADATA_MAX_BYTES:
            return None, f"metadata over {METADATA_MAX_BYTES:,} bytes"
        metadata[str(key)] = encoded
    return (dict(sorted(metadata.items())) or None), None


def _depth(value: object, level: int = 0) -> int:
    """How deeply lists and objects nest in `value` (0 for a scalar); stops counting past the bound."""
    if level > METADATA_MAX_DEPTH or not isinstance(value, (list, tuple, dict)):
        return level
    children = value.values() if isinstance(value, dict) else value
    return max((_depth(child, level + 1) for child in children), default=level + 1)


def file_metadata(path: Path, info: os.stat_result, source: str) -> dict[str, str]:
    """What a whole-file document keeps of its file: the path as found, its size and modification time."""
    mtime = datetime.fromtimestamp(info.st_mtime, timezone.utc).isoformat(timespec="seconds")
    return {"mtime": mtime, "path": source, "size": str(info.st_size)}


def _lone_surrogate(text: str) -> int | None:
    """The position of the first lone surrogate in `text` (U+D800-U+DFFF: not valid Unicode), None if none.

    Python strings hold them (a JSON "\\ud800" escape, an undecodable file name); UTF-8 cannot encode them, so
    a text or id holding one would fail later, when it is written. The encode attempt is the fast check.
    """
    if text.isascii():  # a flag of the string, no scan: the common case costs nothing
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def _surrogate_message(field_name: str, value: str, position: int) -> str:
    return f"lone surrogate in field {field_name!r} (U+{ord(value[position]):04X} at character {position})"


def _id_field(record: Mapping, fields: FieldNames) -> str | None:
    """The first of the id fields the record holds with a value, or None: one choice for reading and for skips."""
    return next((f for f in fields.id_fields if record.get(f) is not None), None)


def _id_problem(doc_id: str, field_name: str = "id") -> tuple[SkipReason, str] | None:
    """Why `doc_id` cannot be an id, or None: a lone surrogate, or a control character (NUL, tab, newline...).

    Ids are keys and are printed as fields of TSV and TREC lines, where a tab or line break would
    shift or split the line; U+2028/U+2029 break lines too.
    """
    surrogate = _lone_surrogate(doc_id)
    if surrogate is not None:
        return SkipReason.LONE_SURROGATE, _surrogate_message(field_name, doc_id, surrogate)
    control = _ID_CONTROL.search(doc_id)
    if control is not None:
        return (SkipReason.CONTROL_CHARACTER_IN_ID,
                f"control character in id (U+{ord(control.group()):04X} at character {control.start()})")
    return None


# Unicode's control characters (category Cc: C0, DEL, C1) and the line and paragraph separators.
_ID_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _known_id(record: Mapping[str, object], fields: FieldNames) -> str | None:
    """The record's id if it holds a valid one: what a skip of the record carries, so its indexed copy stays."""
    id_field = _id_field(record, fields)
    doc_id = record.get(id_field) if id_field is not None else None
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return None
    doc_id = str(doc_id)
    return doc_id if doc_id.strip() and _id_problem(doc_id) is None else None


# ---------------------------------------------------------------------------
# .csv / .tsv with a header row


# Fed to the CSV reader after the file's last line. A quote still open at the end of the file takes it into
# its field; otherwise it is a row of its own. So a field holding it is a quote that never closed: the row
# would have swallowed the rest of the file as its text, and the rows in it would be lost. (Noncharacters:
# no text holds them; if one did, the file would be skipped safely, its documents kept.)
_END_OF_INPUT = "\ufdd0bge-index: end of input\ufdd1"


def _lines_then_end_mark(lines: Iterator[str]) -> Iterator[str]:
    yield from lines
    yield _END_OF_INPUT


def _read_table(stream: BinaryIO, source: str, fields: FieldNames, delimiter: str,
                max_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> Iterator[DocumentOrSkipped]:
    # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file.
    text_stream = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    # TSV is taken literally (BEIR style: no quoting); CSV follows RFC 4180 quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # A field (and a physical line) is bounded by max_bytes characters: a 1 GiB field is never held whole.
    # The csv module's limit is process-wide; every reader sets its own before reading.
    csv.field_size_limit(max(max_bytes, 1))
    lines = _bounded_text_lines(text_stream, max_bytes)
    reader = csv.reader(_lines_then_end_mark(lines), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as error:
        yield Skipped(source, 1, f"unreadable header row ({error})", hides_documents=True,
                      code=SkipReason.UNREADABLE_HEADER)
        return
    if header == [_END_OF_INPUT]:
        return  # an empty file
    if any(_END_OF_INPUT in name for name in header):
        yield _unterminated_quote(source, 1)
        return
    header = [name.strip() for name in header]
    missing = _missing_columns(header, fields)
    if missing:
        code, message = missing
        yield Skipped(source, 1, f"{message}; whole file skipped (header: {', '.join(header)})",
                      hides_documents=code is not SkipReason.NOT_DOCUMENTS, code=code)
        return
    row_start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except _LineTooLong:
            yield _too_large(source, row_start, max_bytes, "line", hides_documents=True,
                             skipped="rest of file skipped")
            return
        except csv.Error as error:
            # After a parse error the reader starts again on the next line, quote state lost: later rows
            # could be cut out of the middle of a field. The rest of the file is skipped, its documents kept.
            if "field larger than field limit" in str(error):
                yield _too_large(source, row_start, max_bytes, "field", hides_documents=True,
                                 skipped="rest of file skipped")
                return
            yield Skipped(source, row_start, f"malformed row ({error}); rest of file skipped", hides_documents=True,
                          code=SkipReason.MALFORMED_ROW)
            return
        line, row_start = row_start, reader.line_num + 1
        if row == [_END_OF_INPUT]:
            return
        if any(_END_OF_INPUT in cell for cell in row):
            yield _unterminated_quote(source, line)
            return
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            # Which cell holds the id is not known when the columns do not line up: the row may be any id's.
            yield Skipped(source, line, f"expected {len(header)} columns, found {len(row)}", hides_documents=True,
                          code=SkipReason.WRONG_COLUMN_COUNT)
            continue
        record = dict(zip(header, row))
        if any(_lone_surrogate(cell) is not None for cell in row):
            # Undecodable bytes (kept as surrogates by surrogateescape): the row's id, if it is intact, is kept.
            doc_id = _known_id(record, fields)
            yield Skipped(source, line, "invalid UTF-8", hides_documents=doc_id is None, code=SkipReason.INVALID_UTF8,
                          doc_id=doc_id)
            continue
        yield record_to_document(record, source, line, fields)


class _LineTooLong(Exception):
    """A physical CSV/TSV line over the bound: the reader cannot go on (it would hold the line whole)."""


def _bounded_text_lines(stream: io.TextIOWrapper, max_chars: int) -> Iterator[str]:
    """The text stream's lines, read at most `max_chars` + 1 characters at a time; _LineTooLong past that."""
    while True:
        line = stream.readline(max_chars + 1)
        if not line:
            return
        if len(line) > max_chars and not line.endswith(("\n", "\r")):
            raise _LineTooLong
        yield line


def _unterminated_quote(source: str, line: int) -> Skipped:
    """A CSV quote that never closed: that row and the rest of the file are skipped, and nothing in them removed."""
    return Skipped(source, line, f"cannot parse to the end: unterminated quote starting at line {line}",
                   hides_documents=True, code=SkipReason.UNTERMINATED_QUOTE)


def _missing_columns(columns: Sequence[str], fields: FieldNames) -> tuple[SkipReason, str] | None:
    """The code and message for a table without an id or a text column, None when both are there.

    A table with neither (a qrels.tsv beside the documents) is no document file at all: NOT_DOCUMENTS, whose
    skip hides nothing, so it holds no removal back run after run. One with just one of them is a document
    file that lost a column: its documents are kept.
    """
    has_id = any(f in columns for f in fields.id_fields)
    has_text = any(f in columns for f in fields.text_fields)
    if not has_id and not has_text:
        return SkipReason.NOT_DOCUMENTS, (f"not a document file (no id column: {', '.join(fields.id_fields)}; "
                                          f"no text column: {', '.join(fields.text_fields)})")
    if not has_id:
        return SkipReason.NO_ID_COLUMN, f"no id column (looked for {', '.join(fields.id_fields)})"
    if not any(f in columns for f in fields.text_fields):
        return SkipReason.NO_TEXT_COLUMN, f"no text column (looked for {', '.join(fields.text_fields)})"
    return None


# ---------------------------------------------------------------------------
# .parquet


def _read_parquet(path: Path, source: str, fields: FieldNames,
                  max_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES, expected: FileIdentity | None = None
                  ) -> Iterator[DocumentOrSkipped]:
    """Documents (and skipped rows) of a Parquet file, read in batches whose memory is bounded before they are read.

    Every page header is read first (`largest_pages`): no page over `parquet_page_bound(max_bytes)` is ever
    unpacked, and no row group whose list and map columns could decode to more than that bound (one row may hold
    all their values: each counted as its dictionary's longest value, or its page, plus PARQUET_VALUE_BYTES) is
    read. Such a whole row group is not read (Arrow cannot skip a page): each of its rows is skipped as
    DOCUMENT_TOO_LARGE, with its id where the id column can be read. The other row groups are read `_batch_rows`
    rows at a time, fewer when their pages are large: a cell of a column without lists is never larger than the
    largest page of its column (a dictionary's included), so a batch holds at most PARQUET_BATCH_BYTES (or one
    row) of those, and the list values of row groups decoding to the page bound at most. Cells over `max_bytes`
    are counted in bytes by Arrow and never become Python objects. A footer or page header that cannot be true
    (chunks outside the file or claiming more bytes than it holds, pages past their chunk) damages the file from
    that row group on: the rows before it are read (`FileWalk` bounds the headers walked by the file's size).
    """
    import pyarrow as pa  # only Parquet inputs need pyarrow

    # OSError/EOFError/zlib.error: unreadable files and damaged .parquet.gz; ArrowException: not Parquet, or cut off.
    unreadable = (OSError, EOFError, zlib.error, pa.ArrowException)

    def skip_whole_file(error: BaseException) -> Skipped:
        """The Skipped record for a Parquet file that cannot be read: it hides documents, so no removals follow."""
        return Skipped(source, None, f"not a readable Parquet file ({error})", hides_documents=True,
                       code=SkipReason.UNREADABLE_PARQUET)

    with contextlib.ExitStack() as cleanup:
        try:
            parquet, stream = _open_parquet(path, cleanup, expected)
            columns = list(parquet.schema_arrow.names)
        except unreadable as error:
            yield skip_whole_file(error)
            return
        missing = _missing_columns(columns, fields)
        if missing:
            code, message = missing
            yield Skipped(source, None, f"{message}; whole file skipped",
                          hides_documents=code is not SkipReason.NOT_DOCUMENTS, code=code)
            return
        page_bound = parquet_page_bound(max_bytes)
        groups = parquet.metadata.num_row_groups
        try:
            # Before any data is read: a large page is refused before Arrow would unpack it whole.
            walk = FileWalk(stream.seek(0, os.SEEK_END), page_bound)
            pages: list[GroupPages | DamagedPage] = []
            for group in range(groups):
                pages.append(largest_pages(stream, parquet.metadata.row_group(group), parquet.schema, walk))
                if isinstance(pages[-1], DamagedPage):
                    break  # the row groups after it are not read
        except unreadable as error:
            yield skip_whole_file(error)
            return
        # Every column: those besides id, text and title are the rows' metadata.
        wanted = columns
        row_number = 0
        group = 0
        while group < groups:
            found = pages[group]
            if isinstance(found, DamagedPage):  # where Arrow would fail too: the rows before it are kept
                yield skip_whole_file(found)
                return
            refusal = _refusal(parquet.schema, group, found, page_bound)
            if refusal is not None:
                try:
                    yield from _refused_row_group(parquet, group, found.largest, row_number, source, fields,
                                                  page_bound, refusal)
                except unreadable as error:
                    yield skip_whole_file(error)
                    return
                row_number += parquet.metadata.row_group(group).num_rows
                group += 1
                continue
            # The next row groups read with the same batch size share one reader (the whole file, usually), as
            # long as their list values together stay within the bound (a batch may span them all).
            batch_rows, run, repeated = _batch_rows(found.largest), [group], sum(found.repeated)
            group += 1
            while group < len(pages):
                following = pages[group]
                if (isinstance(following, DamagedPage) or _refusal(parquet.schema, group, following, page_bound)
                        or _batch_rows(following.largest) != batch_rows
                        or repeated + sum(following.repeated) > page_bound):
                    break
                repeated += sum(following.repeated)
                run.append(group)
                group += 1
            chosen = {} if len(run) == groups else {"row_groups": run}
            batches = parquet.iter_batches(batch_size=batch_rows, columns=wanted, **chosen)
            while True:
                try:
                    batch = next(batches, None)
                    if batch is None:
                        break
                    oversized = _oversized_cells(batch, max_bytes)
                    records = _batch_records(batch, oversized)
                    over = set().union(*oversized.values())
                except unreadable as error:
                    yield skip_whole_file(error)
                    return
                for index, record in enumerate(records):
                    row_number += 1
                    bad = [name for name, value in record.items() if value is _UNDECODABLE]
                    if bad:
                        doc_id = _known_id(record, fields)
                        yield Skipped(source, row_number, f"invalid UTF-8 in field {bad[0]!r}",
                                      hides_documents=doc_id is None, code=SkipReason.INVALID_UTF8, doc_id=doc_id)
                        continue
                    # In bytes where Arrow counts them (string and binary columns), else in characters
                    if index in over or any(isinstance(value, str) and len(value) > max_bytes
                                            for value in record.values()):
                        yield _too_large(source, row_number, max_bytes, "field", doc_id=_known_id(record, fields))
                        continue
                    yield record_to_document(record, source, row_number, fields)


def parquet_page_bound(max_bytes: int) -> int:
    """The largest Parquet page (compressed or not) a reader with this --max-document-bytes unpacks."""
    return max(PARQUET_PAGE_FLOOR, PARQUET_PAGE_DOCUMENTS * max_bytes)


def _batch_rows(pages: list[int]) -> int:
    """Rows per batch of a row group whose columns' largest pages are `pages` bytes (after decompression).

    A row holds at most the sum, and PARQUET_VALUE_BYTES a column: a cell is never larger than the largest page
    of its column, the dictionary page included (a cell of a list column may hold many values: those are bounded
    by the row group, `GroupPages.repeated`).
    """
    row_bytes = max(sum(pages) + len(pages) * PARQUET_VALUE_BYTES, 1)
    return max(1, min(PARQUET_BATCH_ROWS, PARQUET_BATCH_BYTES // row_bytes))


def _refusal(schema, group: int, pages: GroupPages, page_bound: int) -> str | None:
    """Why row group `group` is not read (a page, or its list values, over `page_bound`); None if it is read."""
    bound = (f"{page_bound:,} bytes a page may unpack to ({PARQUET_PAGE_DOCUMENTS} x --max-document-bytes, "
             f"at least {PARQUET_PAGE_FLOOR >> 20} MiB); row not read")
    largest = max(range(len(pages.largest)), key=pages.largest.__getitem__, default=None)
    if largest is not None and pages.largest[largest] > page_bound:
        return (f"row group {group} holds a page of {pages.largest[largest]:,} bytes in column "
                f"{schema.column(largest).path!r}, over the {bound}")
    if sum(pages.repeated) > page_bound:
        largest = max(range(len(pages.repeated)), key=pages.repeated.__getitem__)
        return (f"row group {group}'s list values could decode to {sum(pages.repeated):,} bytes (one row may hold "
                f"them all; {pages.repeated[largest]:,} in column {schema.column(largest).path!r}), over the {bound}")
    return None


def _refused_row_group(parquet, group: int, pages: list[int], first_row: int, source: str, fields: FieldNames,
                       page_bound: int, reason: str) -> Iterator[Skipped]:
    """A skip for each row of a row group `_refusal` refused, for `reason`: its rows are never unpacked.

    Each carries its id when the id column can be read within the bound (then the index keeps that id's
    copy); else it hides documents. An error reading the ids is the caller's: the file cannot be read.
    """
    schema = parquet.schema
    rows = parquet.metadata.row_group(group).num_rows
    id_names = [name for name in fields.id_fields if name in parquet.schema_arrow.names]
    # Only plain (unnested) id columns are read, and only when their own pages are within the bound.
    leaves = {schema.column(j).path: j for j in range(len(pages))}
    readable = bool(id_names) and all(name in leaves and pages[leaves[name]] <= page_bound for name in id_names)
    row = first_row
    if readable:
        id_pages = [pages[leaves[name]] for name in id_names]
        for batch in parquet.iter_batches(batch_size=_batch_rows(id_pages), columns=id_names, row_groups=[group]):
            for record in _batch_records(batch):
                row += 1
                doc_id = _known_id(record, fields)
                yield Skipped(source, row, reason, hides_documents=doc_id is None,
                              code=SkipReason.DOCUMENT_TOO_LARGE, doc_id=doc_id)
    while row < first_row + rows:  # ids that could not be read: the rows may have been any ids
        row += 1
        yield Skipped(source, row, reason, hides_documents=True, code=SkipReason.DOCUMENT_TOO_LARGE)


def _oversized_cells(batch, max_bytes: int) -> dict[int, set[int]]:
    """The string and binary cells of a record batch over `max_bytes` bytes (UTF-8 bytes, not characters), as
    {column index: rows}: counted by Arrow on the batch's buffers, so that no such cell becomes a Python object.
    """
    if batch.nbytes <= max_bytes:  # no cell can be over (the usual batch): no Arrow computation per batch
        return {}
    import pyarrow as pa
    import pyarrow.compute as pc

    oversized = {}
    for index, column in enumerate(batch.columns):
        kind = column.type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
                or pa.types.is_large_binary(kind)):
            continue  # dictionaries, views and nested types: the per-cell check after conversion sees their strings
        longer = pc.fill_null(pc.greater(pc.binary_length(column), max_bytes), False)
        rows = pc.indices_nonzero(longer).to_pylist()
        if rows:
            oversized[index] = set(rows)
    return oversized


# Stands for a Parquet string cell that is not valid UTF-8 (other writers do not all check).
_UNDECODABLE = object()


def _batch_records(batch, oversized: Mapping[int, set[int]] | None = None) -> list[dict]:
    """A record batch as dicts; a string cell that is not valid UTF-8 becomes `_UNDECODABLE`, its row skipped.

    pyarrow fails the whole batch on one such cell (UnicodeDecodeError), which would stop the run:
    then the batch is converted again, a column at a time and, in a failing column, a cell at a time.
    The cells in `oversized` ({column index: rows}, from `_oversized_cells`) are left None, never converted.
    """
    if not oversized:
        try:
            return batch.to_pylist()
        except UnicodeDecodeError:
            pass
    columns = {}
    for index, (name, column) in enumerate(zip(batch.schema.names, batch.columns)):
        left_out = oversized.get(index) if oversized else None
        if left_out:
            columns[name] = [None if i in left_out else _cell(column, i) for i in range(len(column))]
            continue
        try:
            columns[name] = column.to_pylist()
        except UnicodeDecodeError:
            columns[name] = [_cell(column, i) for i in range(len(column))]
    return [{name: values[i] for name, values in columns.items()} for i in range(batch.num_rows)]


def _cell(column, index: int) -> object:
    try:
        return column[index].as_py()
    except UnicodeDecodeError:
        return _UNDECODABLE


def _open_parquet(path: Path, cleanup: contextlib.ExitStack, expected: FileIdentity | None = None):
    """The file as a pyarrow ParquetFile and the stream it reads, both closed by `cleanup`.

    Parquet needs random access, so a `.parquet.gz` is first unpacked to a temporary file. Column chunks are
    read PARQUET_READ_BUFFER bytes at a time, not whole (pre_buffer would read a row group's chunks at once).
    """
    import pyarrow.parquet as pq

    def parquet_file(stream: BinaryIO):
        return cleanup.enter_context(pq.ParquetFile(stream, pre_buffer=False, buffer_size=PARQUET_READ_BUFFER))

    if path.suffix.lower() != ".gz":
        # Opened here, not by path: open_regular_file makes sure it is no FIFO put in its place.
        stream = cleanup.enter_context(open_regular_file(path, expected))
        return parquet_file(stream), stream
    unpacked = cleanup.enter_context(tempfile.TemporaryFile())
    with _open_input(path, expected) as packed:
        shutil.copyfileobj(packed, unpacked)
    unpacked.seek(0)
    return parquet_file(unpacked), unpacked  # type: ignore[arg-type]


QUERY_FIELDS = FieldNames(id_fields=("_id", "id", "query_id", "qid"), text_fields=("text", "query"))


def read_queries(path: str, stdin: BinaryIO | None = None) -> list[Document]:
    """Queries from JSONL (`_id`/`id` + `text`) or TSV (`id<TAB>text`, no header); `-` reads stdin."""
    fields = QUERY_FIELDS
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
        records = _read_tsv_queries(stream, source) if tsv else read_json_lines(stream, source, fields)
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
            yield Skipped(source, line_number, f"invalid UTF-8 at byte {error.start}", code=SkipReason.INVALID_UTF8_AT)
            continue
        query_id, tab, text = line.partition("\t")
        if not tab or not query_id.strip() or not text.strip():
            yield Skipped(source, line_number, "expected 'id<TAB>text' with a non-empty id and text",
                          code=SkipReason.BAD_QUERY_LINE)
            continue
        yield Document(query_id, text, source, line_number)
