"""Input resolution: paths, folders, globs and stdin -> a stream of `Document`s (`iter_documents`).

Owns which files an input argument names (`resolve_inputs`: a file, a folder walked
recursively, a glob, `-` for stdin) and the order they are read in; the readers of
each format live in formats.py, the item types in document_types.py. This module
re-exports both, so the rest of bge-index imports the documents stage from here.

A bad record never stops the stream: it becomes a `Skipped` item, in order,
in the same stream, so callers can count it (by `Skipped.category`, its stable
`SkipReason` code), report it as `file:line: reason` and carry on (or stop, under
`--strict`). Everything is read lazily, one file and one record at a time, so
memory does not grow with the corpus.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Callable

from bge_index.input.types import (
    STDIN,
    STDIN_NAME,
    DEFAULT_MAX_DOCUMENT_BYTES,
    Document,
    DocumentOrSkipped,
    FieldNames,
    InputFile,
    SkipReason,
    Skipped,
)
from bge_index.errors import InputError, QueryFileError
from bge_index.store.names import FORMAT_NAME, MANIFEST_FILE
from bge_index.input.formats import (
    SUPPORTED_FORMATS,
    format_of,
    open_regular_file,
    read_input_file,
    read_json_lines,
    read_queries,
    record_to_document,
)

__all__ = [
    "STDIN", "STDIN_NAME", "SUPPORTED_FORMATS", "Document", "DocumentOrSkipped", "FieldNames", "InputError",
    "InputFile", "QueryFileError", "SkipReason", "Skipped", "format_of", "iter_documents", "read_input_file",
    "read_queries", "record_to_document", "resolve_inputs",
]

_GLOB_CHARS = set("*?[")
# How an index folder is recognised: its manifest names FORMAT_NAME as its first key.
_INDEX_FORMAT = re.compile(rb'"format"\s*:\s*"' + re.escape(FORMAT_NAME.encode()) + rb'"')
_MANIFEST_HEAD_BYTES = 65536


def iter_documents(
    inputs: Sequence[str],
    fields: FieldNames = FieldNames(),
    stdin: BinaryIO | None = None,
    exclude: Sequence[Path] = (),
    follow_links: bool = False,
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    id_from: str = "path",
) -> Iterator[DocumentOrSkipped]:
    """Stream documents (and skipped records) from `inputs`, in input order.

    Every input is checked up front, so a typo fails before any work is done
    (InputError); folders are walked lazily. Nothing inside the `exclude` folders
    (the index being written) or inside any other bge-index index is read. A file in an input folder
    whose real path leaves that folder (a symbolic link to /etc/shadow) is skipped, not read, unless
    `follow_links`; a file named directly is read wherever it is.
    """
    files = resolve_inputs(inputs, exclude, follow_links, id_from)
    return _iter_all(files, fields, stdin if stdin is not None else sys.stdin.buffer, max_document_bytes)


def resolve_inputs(inputs: Sequence[str], exclude: Sequence[Path] = (), follow_links: bool = False,
                   id_from: str = "path") -> Iterator[InputFile]:
    """Check that every input names something, then expand them lazily into files.

    Ids of whole-file documents: a file given directly keeps its path as typed; a file found in a
    folder given is named relative to that folder; a file found through a glob is named relative to
    the glob's fixed leading folder (the part before the first `*`, `?` or `[`), so `docs/*` and
    `docs/` give the same, unique ids. A folder that cannot be listed comes out as an InputFile with
    its `problem` set, which reads as a Skipped that hides documents. Folders in `exclude` (compared
    by real path) and folders holding a bge-index manifest are passed over, with what is inside
    them, silently: they are not inputs, so passing them over loses nothing.
    """
    if not inputs:
        raise InputError("no inputs given")
    passed_over = _PassedOver(exclude, follow_links)
    if id_from not in ID_FROM:
        raise InputError(f"--id-from {id_from}: expected one of {', '.join(ID_FROM)}")
    expanded: list[Callable[[], Iterable[InputFile]]] = []
    for arg in inputs:
        expanded.append(_expander(arg, passed_over))
    files = (f for expand in expanded for f in expand())
    if id_from == "path":
        return files
    return (dataclasses.replace(f, doc_id=file_id(f.doc_id, id_from)) if f.path is not None else f for f in files)


ID_FROM = ("path", "stem", "name")


def file_id(path_id: str, id_from: str) -> str:
    """A whole-file document's id under `--id-from`: its path as named, its file name, or its stem.

    The stem drops every suffix bge-index reads (`.txt`, `.md`, and `.gz` after them), so BEIR-style ids
    (`1`) match a folder of `1.txt` files:

        >>> file_id("notes/1.txt.gz", "stem"), file_id("notes/1.txt.gz", "name"), file_id("notes/a.b.md", "stem")
        ('1', '1.txt.gz', 'a.b')
    """
    name = path_id.rsplit("/", 1)[-1]
    if id_from == "name":
        return name
    if id_from == "stem":
        base = name[:-3] if name.lower().endswith(".gz") else name
        stem, dot, suffix = base.rpartition(".")
        return stem if dot and stem else base
    return path_id


class _PassedOver:
    """The folders never read: those excluded (by real path) and any holding a bge-index manifest."""

    def __init__(self, exclude: Sequence[Path], follow_links: bool = False):
        self.real = {os.path.realpath(folder) for folder in exclude}
        self.follow_links = follow_links

    def root(self, folder: Path) -> str | None:
        """The real path files found under `folder` must stay inside (None: --follow-links, no bound)."""
        return None if self.follow_links else os.path.realpath(folder)

    def excluded(self, real: str) -> bool:
        """Whether the real path `real` is an excluded folder or inside one."""
        return any(real == folder or real.startswith(folder.rstrip(os.sep) + os.sep) for folder in self.real)

    def folder(self, folder: Path) -> bool:
        """A folder argument: excluded, inside an excluded folder, or an index itself."""
        return self.excluded(os.path.realpath(folder)) or _holds_index(folder)

    def file(self, path: Path) -> bool:
        """A file argument: inside an excluded folder, or one of an index's own files."""
        real = os.path.realpath(path)
        return self.excluded(real) or _holds_index(Path(real).parent)


def _holds_index(folder: Path) -> bool:
    """Whether `folder` holds a bge-index manifest.json: then it is an index, never input (its shards are Parquet)."""
    try:
        with open_regular_file(folder / MANIFEST_FILE) as manifest:
            head = manifest.read(_MANIFEST_HEAD_BYTES)
    except OSError:  # none there, or unreadable (not an index we could recognise)
        return False
    return bool(_INDEX_FORMAT.search(head))


def _expander(arg: str, passed_over: _PassedOver) -> Callable[[], Iterable[InputFile]]:
    if arg == STDIN:
        return lambda: [InputFile(None, STDIN_NAME)]
    path = Path(arg)
    try:
        info: os.stat_result | None = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        info = None
    except OSError:
        # It is there but cannot be looked at (a symlink loop, an I/O error, a share gone away): reading it
        # gives the Skipped that says so and keeps its documents. Not an InputError: the name is no typo.
        return lambda: [InputFile(path, path.as_posix())]
    if info is not None and stat.S_ISDIR(info.st_mode):
        return lambda: [] if passed_over.folder(path) else _walk_folder(path, path, passed_over)
    if info is not None:
        # A regular file, or a FIFO, socket or device: reading the latter skips it without opening it.
        return lambda: [] if passed_over.file(path) else [InputFile(path, path.as_posix())]
    if os.path.lexists(path):
        return lambda: [InputFile(path, path.as_posix())]  # a dangling symlink: read as a skip, not a typo
    if _GLOB_CHARS & set(arg):
        base, matches = _glob(arg, passed_over)
        if not matches:
            raise InputError(f"no files match {arg!r}")
        return lambda: _expand_matches(matches, base, passed_over)
    raise InputError(f"no such file or folder: {arg}")


def _glob(pattern: str, passed_over: _PassedOver) -> tuple[Path, list[tuple[Path, str] | InputFile]]:
    """The fixed leading folder of `pattern`, and the paths matching it (`*`, `?`, `[...]`, `**` across folders), sorted.

    Unlike glob.glob, symlinked folders are not followed, as in folder walks,
    so a symlink loop cannot trap the search; only folders that may hold a match
    are listed, and one that cannot be listed comes back as an InputFile with its
    `problem` (what it held may have matched).
    """
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    rest = parts[fixed:]
    matcher = _glob_regex(rest)
    segments = [None if part == "**" else re.compile(_segment_regex(part)) for part in rest]
    try:
        info = os.stat(base)
    except (FileNotFoundError, NotADirectoryError):
        return base, []
    except OSError as error:
        return base, [InputFile(base, ".", problem=_describe_os_error(error))]
    if not stat.S_ISDIR(info.st_mode) or passed_over.folder(base):
        return base, []
    matches: list[tuple[Path, str]] = []
    problems: list[InputFile] = []
    for event in _scan(base, lambda rel: _may_hold_match(segments, rel), passed_over):
        if isinstance(event, InputFile):
            problems.append(event)
        elif matcher.fullmatch(event[0].relative_to(base).as_posix()):
            matches.append(event)
    return base, [*sorted(matches), *problems]


def _may_hold_match(segments: Sequence[re.Pattern | None], rel: tuple[str, ...]) -> bool:
    """Whether a folder at `rel` (its components under the glob's base) may hold a match: worth listing.

    Follows the pattern's segments over the folder's components (`None` is `**`: any number of
    components); the folder may hold a match if some way through leaves segments to match below it.
    """
    def closure(states: set[int]) -> set[int]:
        out = set(states)
        for i in sorted(states):
            while i < len(segments) and segments[i] is None:  # `**` may match no component at all
                i += 1
                out.add(i)
        return out

    states = closure({0})
    for component in rel:
        following = set()
        for i in states:
            if i >= len(segments):
                continue
            segment = segments[i]
            if segment is None:
                following.add(i)  # `**` takes this component and may take more
            elif segment.fullmatch(component):
                following.add(i + 1)
        states = closure(following)
        if not states:
            return False
    return any(i < len(segments) for i in states)


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


def _expand_matches(matches: list[tuple[Path, str] | InputFile], base: Path,
                    passed_over: _PassedOver) -> Iterator[InputFile]:
    seen: set[Path] = set()
    for match in matches:
        if isinstance(match, InputFile):
            yield match  # a folder the glob could not list: what it holds may have matched
            continue
        path, kind = match
        found: Iterable[InputFile]
        if kind == _FOLDER:
            found = _walk_folder(path, base, passed_over)
        elif kind == _LINKED_FOLDER:
            # A symlinked folder matched by name is walked, as a folder given would be (the walk below does not
            # follow links), unless it leads into an excluded folder or an index.
            found = [] if passed_over.folder(path) else _walk_folder(path, base, passed_over)
        else:
            # Files, and what only looks like one (a FIFO, a dangling link): reading says why it is skipped.
            found = [] if kind == _LINKED_FILE and passed_over.file(path) else [
                InputFile(path, path.relative_to(base).as_posix(), root=passed_over.root(base))]
        for input_file in found:
            # `dir/**` matches a folder and the files inside it: read each file once.
            if input_file.path not in seen:
                seen.add(input_file.path)  # type: ignore[arg-type]
                yield input_file


def _walk_folder(folder: Path, id_base: Path, passed_over: _PassedOver) -> Iterator[InputFile]:
    """Supported files under `folder`, recursively, in a stable (sorted) order; ids relative to `id_base`.

    Hidden files and folders are passed over; symlinked folders are not followed,
    so a symlink loop cannot trap the walk. A folder that cannot be listed, the
    top one or one inside, comes out as an InputFile with its `problem` set: read,
    it is a Skipped that hides documents, so an unreadable folder is never taken
    for an empty one (whose documents a run would remove).
    """
    root = passed_over.root(folder)
    for event in _scan(folder, lambda rel: True, passed_over):
        if isinstance(event, InputFile):
            assert event.path is not None
            yield InputFile(event.path, event.path.relative_to(id_base).as_posix(), event.problem)
            continue
        path, kind = event
        if kind == _LINKED_FILE and passed_over.file(path):
            continue  # a link to an index's own file (another index's manifest, say): never input
        if kind in (_FILE, _LINKED_FILE) and format_of(path) in SUPPORTED_FORMATS:
            yield InputFile(path, path.relative_to(id_base).as_posix(), root=root)


_FILE, _LINKED_FILE, _FOLDER, _LINKED_FOLDER = "file", "linked file", "folder", "linked folder"


def _scan(top: Path, descend: Callable[[tuple[str, ...]], bool],
          passed_over: _PassedOver) -> Iterator[tuple[Path, str] | InputFile]:
    """Everything under `top` that is not hidden, as (path, kind), depth first, each folder's entries sorted by name.

    A folder's own entry comes before what it holds, and its files before its subfolders' contents.
    Kinds: `_FILE` (anything not a folder: reading decides), `_LINKED_FILE` (a symbolic link to one: reading
    checks it stays inside the input folder), `_FOLDER`, `_LINKED_FOLDER` (a symlink to a
    folder: never followed, so a symlink loop cannot trap the walk). A folder that cannot be listed comes
    as an InputFile naming it, with `problem` set. `descend(components under top)` says whether a folder
    is worth listing; folders that are excluded or hold an index are passed over with their contents.
    Walked with a stack, not recursion, so a tree deeper than the recursion limit is no crash.
    """
    stack: list[tuple[Path, tuple[str, ...], str]] = [(top, (), os.path.realpath(top))]
    while stack:
        folder, rel, real = stack.pop()
        if passed_over.excluded(real):
            continue
        try:
            entries = _list_folder(folder)
        except OSError as error:
            yield InputFile(folder, folder.as_posix(), problem=_describe_os_error(error))
            continue
        if any(name == MANIFEST_FILE for name, _ in entries) and _holds_index(folder):
            continue  # another bge-index index inside the corpus: its shards are no documents
        subfolders = []
        for name, kind in entries:
            yield folder / name, kind
            if kind == _FOLDER and descend((*rel, name)):
                subfolders.append(name)
        # Pushed in reverse, so the first subfolder by name is walked next.
        for name in reversed(subfolders):
            stack.append((folder / name, (*rel, name), os.path.join(real, name)))


def _list_folder(folder: Path) -> list[tuple[str, str]]:
    """(name, kind) of the entries of `folder` that are not hidden, sorted by name.

    OSError when the folder cannot be listed, also part-way through: a listing cut short is no listing.
    """
    entries = []
    with os.scandir(folder) as listing:
        for entry in listing:
            if entry.name.startswith("."):
                continue
            try:
                is_folder = entry.is_dir()  # follows symlinks: a link to a folder is a folder, not followed
            except OSError:
                is_folder = False  # cannot tell (a symlink loop...): as a file, reading it says what is wrong
            if not is_folder:
                kind = _LINKED_FILE if entry.is_symlink() else _FILE
            else:
                kind = _LINKED_FOLDER if entry.is_symlink() else _FOLDER
            entries.append((entry.name, kind))
    return sorted(entries)


def _describe_os_error(error: OSError) -> str:
    return error.strerror or str(error)


def _iter_all(files: Iterable[InputFile], fields: FieldNames, stdin: BinaryIO,
              max_bytes: int) -> Iterator[DocumentOrSkipped]:
    for input_file in files:
        if input_file.path is None:
            yield from read_json_lines(stdin, STDIN_NAME, fields, max_bytes)
        else:
            yield from read_input_file(input_file, fields, max_bytes)
