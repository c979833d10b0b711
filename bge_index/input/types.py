"""The items of the documents stage: `Document`, `Skipped` and its `SkipReason` codes, `FieldNames`, `InputFile`.

Owns only these small types, so that input resolution (documents.py) and the
format readers (formats.py) can share them without importing each other in a
cycle. Import them from `bge_index.input.documents`, which re-exports them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Union

STDIN = "-"
STDIN_NAME = "<stdin>"


@dataclass(frozen=True, slots=True)
class Document:
    """One document to index. `line` is the 1-based line/row in `source`, None for whole files."""

    id: str
    text: str
    source: str
    line: int | None = None
    # The record's other fields (JSONL, CSV/TSV, Parquet), or a file's path, size and mtime: stored with its rows
    # as a map of strings (a string as is, any other value as its JSON). Not part of equality.
    metadata: dict[str, str] | None = field(default=None, compare=False)


class SkipReason(str, Enum):
    """Why a record or file was skipped, as a stable code: the key a report counts skips under.

    The values are the report keys (`skipped_by_reason`), so they must not change when
    a message is reworded; the particulars (byte offsets, field names, types, error
    texts) live in `Skipped.reason` only.
    """

    # whole files
    UNSUPPORTED_FORMAT = "unsupported file type '…'"
    UNREADABLE_FILE = "cannot read file"
    # A folder whose listing failed (permissions, I/O error, a share gone away): its documents are unseen, not gone.
    UNLISTABLE_FOLDER = "cannot list folder"
    BROKEN_LINK = "broken symbolic link"  # dangling, or a loop: what it stood for may come back
    # A link found in an input folder that leads out of it (`ln -s /etc/shadow docs/x.txt`): never read unless
    # --follow-links. It hides nothing: a document it once gave is removed, not kept.
    LINK_OUTSIDE_INPUTS = "symbolic link out of the input folder"
    # A document (a file's text, a JSON line, a CSV field) over --max-document-bytes: skipped, never the run.
    DOCUMENT_TOO_LARGE = "document over --max-document-bytes"
    # A record's other fields over the metadata bounds (METADATA_MAX_*): too many, too large, or nested too deeply.
    METADATA_TOO_LARGE = "metadata over its bounds"
    NOT_A_REGULAR_FILE = "not a regular file"  # a FIFO, socket or device: never opened (a FIFO would block)
    UNREADABLE_GZIP = "cannot read file: corrupt or truncated gzip data"
    TRUNCATED_GZIP = "corrupt or truncated gzip data"  # a whole-file (.txt/.md) gzip damaged inside
    BINARY_FILE = "binary file"
    UNREADABLE_PARQUET = "not a readable Parquet file"
    UNREADABLE_HEADER = "unreadable header row"
    NOT_DOCUMENTS = "not a document file"  # a table with neither an id nor a text column (qrels.tsv): hides nothing
    NO_ID_COLUMN = "no id column"
    NO_TEXT_COLUMN = "no text column"
    # the rest of a file, after some records were read
    READ_CUT_SHORT = "cannot read further, rest of file skipped"
    READ_CUT_SHORT_GZIP = "cannot read further, rest of file skipped: corrupt or truncated gzip data"
    # A CSV quote left open: the row would swallow the rest of the file as its text.
    UNTERMINATED_QUOTE = "cannot parse to the end: unterminated quote starting at line N"
    # one line, row or record
    # "UTF-N": the key the message-derived category always gave (every digit became N); kept so reports match.
    INVALID_UTF8_AT = "invalid UTF-N at byte N"
    INVALID_UTF8 = "invalid UTF-N"  # a CSV/TSV row (its byte offset is not known)
    MALFORMED_JSON = "malformed JSON"
    JSON_TOO_DEEP = "JSON nested too deeply"  # deeper than Python's recursion limit
    NOT_AN_OBJECT = "JSON line is not an object"
    MALFORMED_ROW = "malformed row"
    WRONG_COLUMN_COUNT = "expected N columns, found N"
    NO_ID_FIELD = "no id field"
    BAD_ID_TYPE = "id field '…' is not a string or integer"
    EMPTY_ID = "empty id"
    NO_TEXT_FIELD = "no text field"
    BAD_TEXT_TYPE = "text field '…' is not a string"
    BAD_TITLE_TYPE = "title field '…' is not a string"
    EMPTY_TEXT = "empty text"
    # Not valid Unicode (a JSON "\\ud800" escape, an undecodable file name): UTF-8 cannot encode it.
    LONE_SURROGATE = "lone surrogate in field '…'"
    CONTROL_CHARACTER_IN_ID = "control character in id"  # ids are keys, and printed as TSV and TREC fields
    BAD_QUERY_LINE = "expected '…' with a non-empty id and text"  # a query TSV line

    def __str__(self) -> str:
        return self.value

    @property
    def code(self) -> str:
        """The stable snake_case code reports count by: `malformed_json` for MALFORMED_JSON.

            >>> SkipReason.MALFORMED_JSON.code, SkipReason.MALFORMED_JSON.value
            ('malformed_json', 'malformed JSON')
        """
        return self.name.lower()

    @classmethod
    def label_of(cls, code: str) -> str:
        """The words for people of a snake_case code (`malformed JSON`), or the code itself if it is no code."""
        member = cls.__members__.get(code.upper())
        return member.value if member is not None and member.code == code else code


@dataclass(frozen=True, slots=True)
class Skipped:
    """A record that could not become a Document, with where it was and why.

    `reason` is the message for people (`file:line: reason`); `code` is the stable kind
    reports count by (`category`). A code given as its string value is turned into the
    `SkipReason`, so rows that carry it as text (the Ray plan) can pass it straight on.
    Equality ignores `code`: two skips with the same place and message are the same skip.
    """

    source: str
    line: int | None
    reason: str
    # True when documents may have been lost unseen (an unreadable or cut-off file, a file skipped whole):
    # an incremental run must not take their absence as removal.
    hides_documents: bool = False
    code: SkipReason | None = field(default=None, compare=False)
    # The id of the record, when it was read but the record is bad (empty text, a text that is not a string...):
    # the index's good copy of that id must be kept rather than removed. None when the id is not known (then
    # `hides_documents` is set: the record may have held any id). Derived from the place: not part of equality.
    doc_id: str | None = field(default=None, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        if self.code is not None and not isinstance(self.code, SkipReason):
            object.__setattr__(self, "code", SkipReason(self.code))

    @property
    def location(self) -> str:
        """`source:line`, or just `source` for a whole file."""
        return f"{self.source}:{self.line}" if self.line is not None else self.source

    @property
    def category(self) -> str:
        """The kind of skip, for counting: the code's stable snake_case name (`malformed_json`), independent of
        the message's wording.

        A Skipped made without a code (by code outside this stage) falls back to the
        message without its particulars (quoted names as `'…'`, digits as N), as its code where that names one.
        """
        if self.code is not None:
            return self.code.code
        general = re.split(r" \(|;", self.reason, maxsplit=1)[0]
        general = re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'…'", general))
        try:
            return SkipReason(general).code
        except ValueError:
            return general


DocumentOrSkipped = Union[Document, Skipped]


@dataclass(frozen=True)
class FieldNames:
    """Which record fields hold the id, the text and the optional title (first present wins)."""

    id_fields: tuple[str, ...] = ("id", "_id", "docid")
    text_fields: tuple[str, ...] = ("text", "contents")
    title_field: str = "title"

    @classmethod
    def from_options(cls, id_field: str | None, text_field: str | None) -> "FieldNames":
        """The fields for `--id-field`/`--text-field`: the given name alone, else the defaults."""
        default = cls()
        return cls(
            id_fields=(id_field,) if id_field else default.id_fields,
            text_fields=(text_field,) if text_field else default.text_fields,
        )


# The largest document read, in bytes (a whole file, a JSON line, a CSV/TSV field or Parquet cell): a 64 MiB
# text encodes with about 1 GB of peak memory; a gzip bomb or a 1 GiB field stops at this many bytes read.
DEFAULT_MAX_DOCUMENT_BYTES = 64 << 20
# A record's metadata (its fields other than id, text and title) is kept up to these bounds; beyond, the record is
# skipped with METADATA_TOO_LARGE (its indexed copy kept): metadata is for filtering, not a second document.
METADATA_MAX_FIELDS = 256
METADATA_MAX_BYTES = 64 << 10  # all keys and values, encoded
METADATA_MAX_DEPTH = 8  # lists and objects inside a value


@dataclass(frozen=True, slots=True)
class InputFile:
    """A file to read. Whole-file documents get `doc_id` as their id."""

    path: Path | None  # None means stdin
    doc_id: str
    # Set when walking met this path but could not list it (a folder): why. Reading it gives the Skipped that
    # hides its documents. (An engine that rebuilds InputFiles from path and id alone loses this text, and
    # read_input_file lists the folder again to say why.)
    problem: str | None = None
    # The real path of the input folder (or glob base) this file was found in: a file whose real path leaves it
    # (through a symbolic link) is not read. None for a file named directly, stdin, and with --follow-links.
    root: str | None = None

    @property
    def display(self) -> str:
        """The name to show and report the file by (`<stdin>` for stdin)."""
        return STDIN_NAME if self.path is None else str(self.path)
