"""Nothing lost, nobody in: inputs that cannot be read whole keep their documents, hostile ones never stop a run.

Folders that cannot be listed, CSV quotes that never close, malformed lines, ids that clash through globs,
index folders inside a corpus, JSON nested past the recursion limit, lone surrogates, control characters in
ids, FIFOs, sockets and devices, broken symlinks, and texts too long to tokenise whole. Tests run as root,
where permissions stop nothing, so unreadable folders are simulated by making os.scandir fail for one path.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
from pathlib import Path

import pytest

from bge_index.model import batching
from bge_index.input.documents import (
    Document,
    InputError,
    InputFile,
    SkipReason,
    Skipped,
    iter_documents,
    read_input_file,
)
from bge_index.errors import StrictModeError

# ---------------------------------------------------------------------------
# helpers


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def read_all(inputs, **kwargs) -> list:
    return list(iter_documents([str(i) for i in inputs], **kwargs))


def docs_of(items) -> list[Document]:
    return [i for i in items if isinstance(i, Document)]


def skips_of(items) -> list[Skipped]:
    return [i for i in items if isinstance(i, Skipped)]


def fail_listing(monkeypatch, *failing: Path, error: OSError | None = None) -> None:
    """Make os.scandir raise for these folders (as a permission problem, an I/O error or a dead share would)."""
    real_scandir = os.scandir
    failing_paths = {os.path.realpath(p) for p in failing}

    def scandir(path="."):
        if os.path.realpath(path) in failing_paths:
            raise error or PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


@contextlib.contextmanager
def within(seconds: int):
    """Fail instead of hanging: an open() blocked on a FIFO is interrupted by the alarm."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s (a FIFO opened?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------
# 1. Folders that cannot be listed keep their documents


def test_unlistable_top_folder_is_a_skip_that_hides_documents(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "alpha")
    fail_listing(monkeypatch, corpus)
    items = read_all([corpus])
    assert items == [Skipped(str(corpus), None, "cannot list folder: Permission denied", hides_documents=True)]
    assert items[0].code is SkipReason.UNLISTABLE_FOLDER


def test_unlistable_nested_folder_is_skipped_and_the_rest_read(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "alpha")
    write(corpus / "locked" / "b.txt", "beta")
    write(corpus / "z" / "c.txt", "gamma")
    fail_listing(monkeypatch, corpus / "locked", error=OSError(5, "Input/output error"))
    items = read_all([corpus])
    assert [d.id for d in docs_of(items)] == ["a.txt", "z/c.txt"]
    [skip] = skips_of(items)
    assert skip.location == str(corpus / "locked") and skip.hides_documents
    assert skip.reason == "cannot list folder: Input/output error" and skip.code is SkipReason.UNLISTABLE_FOLDER


def test_listing_cut_short_counts_as_unlistable(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    for name in "abc":
        write(corpus / f"{name}.txt", name)
    real_scandir = os.scandir

    class Failing:
        def __init__(self, path):
            self.inner = real_scandir(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

        def __iter__(self):
            yield next(iter(self.inner))
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "scandir", lambda path=".": Failing(path) if Path(path) == corpus else real_scandir(path))
    items = read_all([corpus])
    assert [(type(i), i.hides_documents) for i in items] == [(Skipped, True)]


def test_folder_vanishing_between_listing_and_walking_is_a_skip(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "alpha")
    write(corpus / "sub" / "b.txt", "beta")
    stream = iter_documents([str(corpus)])
    first = next(stream)
    assert first.id == "a.txt"
    (corpus / "sub" / "b.txt").unlink()
    (corpus / "sub").rmdir()
    [skip] = list(stream)
    assert skip.code is SkipReason.UNLISTABLE_FOLDER and skip.hides_documents


def test_file_vanishing_between_listing_and_reading_is_a_skip(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "alpha")
    write(corpus / "b.jsonl", jsonl([{"id": "b", "text": "beta"}]))
    stream = iter_documents([str(corpus)])
    assert next(stream).id == "a.txt"
    (corpus / "b.jsonl").unlink()
    [skip] = list(stream)
    assert skip.code is SkipReason.UNREADABLE_FILE and skip.hides_documents


def test_unlistable_folder_under_a_glob_is_a_skip(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    write(corpus / "a" / "x.txt", "in a")
    write(corpus / "b" / "x.txt", "in b")
    fail_listing(monkeypatch, corpus / "b")
    for pattern in (corpus / "*", corpus / "**" / "*.txt", corpus / "*" / "x.txt"):
        items = read_all([pattern])
        assert [d.id for d in docs_of(items)] == ["a/x.txt"], pattern
        assert [(s.location, s.code, s.hides_documents) for s in skips_of(items)] == [
            (str(corpus / "b"), SkipReason.UNLISTABLE_FOLDER, True)], pattern


def test_glob_does_not_list_folders_that_cannot_match(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    write(corpus / "a.jsonl", jsonl([{"id": "a", "text": "alpha"}]))
    write(corpus / "deep" / "er" / "b.jsonl", jsonl([{"id": "b", "text": "beta"}]))
    fail_listing(monkeypatch, corpus / "deep" / "er")
    assert [d.id for d in docs_of(read_all([corpus / "*.jsonl"]))] == ["a"]
    assert not skips_of(read_all([corpus / "*.jsonl"]))  # `*.jsonl` cannot match inside deep/er


def test_unlistable_folder_rebuilt_from_path_and_id_still_reads_as_a_skip(tmp_path, monkeypatch):
    # The Ray engine rebuilds InputFiles from path and id alone: the walk's `problem` is lost on the way.
    folder = tmp_path / "locked"
    write(folder / "a.txt", "alpha")
    fail_listing(monkeypatch, folder)
    [skip] = list(read_input_file(InputFile(folder, "locked")))
    assert skip.code is SkipReason.UNLISTABLE_FOLDER and skip.hides_documents
    assert skip.reason == "cannot list folder: Permission denied"


def test_input_that_cannot_be_looked_at_is_a_skip_not_a_crash(tmp_path, monkeypatch):
    corpus = tmp_path / "share"
    write(corpus / "a.txt", "alpha")
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if Path(path) == corpus:
            raise OSError(107, "Transport endpoint is not connected")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    [skip] = read_all([corpus])
    assert skip.hides_documents and "Transport endpoint is not connected" in skip.reason


# ---------------------------------------------------------------------------
# 2. A CSV quote that never closes


def test_stray_quote_does_not_swallow_the_rest_of_the_file(tmp_path):
    path = write(tmp_path / "t.csv", 'id,text\n1,one\n2,"two\n3,three\n4,four\n')
    items = read_all([path])
    assert items == [
        Document("1", "one", str(path), 2),
        Skipped(str(path), 3, "cannot parse to the end: unterminated quote starting at line 3", hides_documents=True),
    ]
    assert items[1].code is SkipReason.UNTERMINATED_QUOTE


def test_stray_quote_on_the_last_line_without_newline(tmp_path):
    path = write(tmp_path / "t.csv", 'id,text\n1,one\n2,"two')
    items = read_all([path])
    assert items[0] == Document("1", "one", str(path), 2)
    assert items[1].code is SkipReason.UNTERMINATED_QUOTE and items[1].location == f"{path}:3"


def test_stray_quote_in_the_header(tmp_path):
    path = write(tmp_path / "t.csv", 'id,"text\n1,one\n')
    [skip] = read_all([path])
    assert skip.code is SkipReason.UNTERMINATED_QUOTE and skip.line == 1 and skip.hides_documents


@pytest.mark.parametrize("ending", ["\n", "", "\r\n"])
def test_multiline_quoted_fields_still_work(tmp_path, ending):
    content = f'id,text\n1,"first\nline, and ""quoted"""\n2,"last\nrow"{ending}'
    path = write(tmp_path / "t.csv", content)
    assert read_all([path]) == [
        Document("1", 'first\nline, and "quoted"', str(path), 2),
        Document("2", "last\nrow", str(path), 4),
    ]


def test_tsv_quotes_stay_literal(tmp_path):
    path = write(tmp_path / "t.tsv", 'id\ttext\n1\t"open\n2\ttwo\n')
    assert [d.text for d in docs_of(read_all([path]))] == ['"open', "two"]


def test_csv_parse_error_ends_the_file_and_hides_documents(tmp_path, monkeypatch):
    import csv

    path = write(tmp_path / "t.csv", "id,text\n1,one\n2," + "x" * 200 + "\n3,three\n")
    real_limit = csv.field_size_limit
    monkeypatch.setattr(csv, "field_size_limit", lambda *args: real_limit(100))  # restored below
    try:
        items = read_all([path])
    finally:
        real_limit(2**31 - 1)
    assert items[0] == Document("1", "one", str(path), 2)
    # A field over the csv module's limit is now named as what it is (issue 18: --max-document-bytes)
    assert items[1].code is SkipReason.DOCUMENT_TOO_LARGE and items[1].hides_documents and len(items) == 2


def test_other_csv_parse_errors_end_the_file_as_malformed(tmp_path, monkeypatch):
    import csv

    from bge_index.input import formats

    path = write(tmp_path / "t.csv", "id,text\n1,one\n2,two\n3,three\n")
    real_reader = csv.reader

    def failing_reader(*args, **kwargs):
        rows = real_reader(*args, **kwargs)

        class Reader:
            line_num = 0

            def __iter__(self):
                return self

            def __next__(self):
                row = next(rows)
                self.line_num = rows.line_num
                if row and row[0] == "2":
                    raise csv.Error("some parse error")
                return row
        return Reader()

    monkeypatch.setattr(formats.csv, "reader", failing_reader)
    items = read_all([path])
    assert items[0] == Document("1", "one", str(path), 2)
    assert items[1].code is SkipReason.MALFORMED_ROW and items[1].hides_documents and len(items) == 2


# ---------------------------------------------------------------------------
# 3. A bad record must not remove the good copy of its id


@pytest.mark.parametrize("line", [
    '{"id": "1", "text": ',          # malformed
    '["a", "list"]',                 # not an object
    '{"text": "no id"}',             # no id
    '{"id": 1.5, "text": "t"}',      # id of another type
    '{"id": "  ", "text": "t"}',     # empty id
])
def test_record_whose_id_is_unknown_hides_documents(tmp_path, line):
    path = write(tmp_path / "d.jsonl", line + "\n")
    [skip] = read_all([path])
    assert skip.hides_documents and skip.doc_id is None


def test_invalid_utf8_line_hides_documents(tmp_path):
    path = write(tmp_path / "d.jsonl", b'{"id": "caf\xe9", "text": "t"}\n')
    [skip] = read_all([path])
    assert skip.code is SkipReason.INVALID_UTF8_AT and skip.hides_documents


@pytest.mark.parametrize(("record", "code"), [
    ({"id": "k", "text": "  "}, SkipReason.EMPTY_TEXT),
    ({"id": "k", "text": 5}, SkipReason.BAD_TEXT_TYPE),
    ({"id": "k"}, SkipReason.NO_TEXT_FIELD),
    ({"id": "k", "title": [], "text": "t"}, SkipReason.BAD_TITLE_TYPE),
    ({"id": "k", "text": "bad \ud800 text"}, SkipReason.LONE_SURROGATE),
])
def test_record_whose_id_is_known_carries_it(tmp_path, record, code):
    path = write(tmp_path / "d.jsonl", json.dumps(record) + "\n")
    [skip] = read_all([path])
    assert (skip.code, skip.doc_id, skip.hides_documents) == (code, "k", False)


def test_csv_row_with_invalid_utf8_carries_its_intact_id(tmp_path):
    path = write(tmp_path / "t.csv", b"id,text\nk,caf\xe9\nca\xfe,text\n")
    first, second = read_all([path])
    assert (first.code, first.doc_id, first.hides_documents) == (SkipReason.INVALID_UTF8, "k", False)
    assert (second.code, second.doc_id, second.hides_documents) == (SkipReason.INVALID_UTF8, None, True)


def test_whole_file_skips_carry_the_file_id(tmp_path):
    corpus = tmp_path / "c"
    write(corpus / "bin.txt", b"a\x00b")
    write(corpus / "latin.txt", b"caf\xe9")
    write(corpus / "blank.md", "  ")
    assert [(s.doc_id, s.code) for s in read_all([corpus])] == [
        ("bin.txt", SkipReason.BINARY_FILE), ("blank.md", SkipReason.EMPTY_TEXT),
        ("latin.txt", SkipReason.INVALID_UTF8_AT)]


def test_doc_id_is_keyword_only_and_not_part_of_equality():
    assert Skipped("a", 1, "empty text", doc_id="x") == Skipped("a", 1, "empty text")
    assert Skipped("a", 1, "r").doc_id is None
    with pytest.raises(TypeError):
        Skipped("a", 1, "r", False, None, "x")  # type: ignore[misc]


# ---------------------------------------------------------------------------
# 4. Ids unique and stable whatever the globs


def test_glob_matching_folders_gives_unique_ids(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    write(docs / "a" / "readme.md", "about a")
    write(docs / "b" / "readme.md", "about b")
    write(docs / "top.md", "top")
    monkeypatch.chdir(tmp_path)
    expected = ["a/readme.md", "b/readme.md", "top.md"]
    for pattern in ("docs/*", "docs/**", "docs/**/*.md", str(docs / "*")):
        assert sorted(d.id for d in docs_of(read_all([pattern]))) == expected, pattern
    # The same ids as the folder given: switching between the two forms changes no id.
    assert sorted(d.id for d in docs_of(read_all(["docs"]))) == expected
    assert [d.id for d in docs_of(read_all(["docs/a/readme.md"]))] == ["docs/a/readme.md"]  # a file: as typed


def test_glob_in_the_current_folder(tmp_path, monkeypatch):
    write(tmp_path / "x.txt", "x")
    write(tmp_path / "sub" / "y.txt", "y")
    monkeypatch.chdir(tmp_path)
    assert [d.id for d in docs_of(read_all(["*"]))] == ["sub/y.txt", "x.txt"]
    assert [d.id for d in docs_of(read_all(["*.txt"]))] == ["x.txt"]


# ---------------------------------------------------------------------------
# 5. Index folders are never read as input


def index_folder(path: Path, shard_records=({"id": "shard-row", "text": "a row of an index shard"},)) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True)
    write(path / "manifest.json", json.dumps({"format": "bge-index", "format_version": 1, "shards": []}, indent=2))
    pq.write_table(pa.Table.from_pylist(list(shard_records)), path / "shard-000001-00000.parquet")
    return path


def test_excluded_folder_is_not_walked_nor_read(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "alpha")
    out = tmp_path / "corpus" / "out"
    write(out / "notes.jsonl", jsonl([{"id": "n", "text": "not input"}]))
    items = read_all([corpus], exclude=[out])
    assert [d.id for d in items] == ["a.txt"]
    # Compared by real path, however it is spelled; explicit files inside are passed over too, without a skip.
    assert read_all([out / "notes.jsonl"], exclude=[Path(str(corpus) + "/./out")]) == []
    with pytest.raises(InputError, match="no files match"):  # the glob's only match is in the excluded folder
        read_all([corpus / "*" / "*.jsonl"], exclude=[out])
    assert [d.id for d in read_all([corpus, out / "notes.jsonl"], exclude=[out])] == ["a.txt"]


def test_symlinked_exclude_is_compared_by_real_path(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "alpha")
    write(corpus / "out" / "x.txt", "index output")
    os.symlink(corpus / "out", tmp_path / "link-to-out")
    assert [d.id for d in read_all([corpus], exclude=[tmp_path / "link-to-out"])] == ["a.txt"]


def test_folder_holding_an_index_is_never_read(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "alpha")
    index_folder(corpus / "other-index")
    for inputs in ([corpus], [corpus / "**" / "*.parquet"], [corpus / "other-index"],
                   [corpus / "other-index" / "shard-000001-00000.parquet"]):
        try:
            items = read_all(inputs)
        except InputError:  # the glob matched nothing: the index was passed over
            items = []
        assert all(d.id != "shard-row" for d in docs_of(items)), inputs
        assert not skips_of(items), inputs


def test_a_manifest_of_another_kind_does_not_stop_the_walk(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "web" / "manifest.json", json.dumps({"name": "my web app", "format": "webapp"}))
    write(corpus / "web" / "page.md", "a page")
    assert [d.id for d in read_all([corpus])] == ["web/page.md"]


# ---------------------------------------------------------------------------
# 6. Hostile documents never stop a run


def test_json_nested_past_the_recursion_limit_is_a_skip(tmp_path):
    deep = '{"id": "deep", "text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = write(tmp_path / "d.jsonl", deep + "\n" + json.dumps({"id": "ok", "text": "fine"}) + "\n")
    items = read_all([path])
    assert items[0].code is SkipReason.JSON_TOO_DEEP and items[0].location == f"{path}:1"
    assert items[0].hides_documents
    assert items[1] == Document("ok", "fine", str(path), 2)


def test_integer_too_long_for_python_is_a_skip(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"id": 1' + "0" * 5000 + ', "text": "t"}\n{"id": "ok", "text": "fine"}\n')
    first, second = read_all([path])
    assert first.code is SkipReason.MALFORMED_JSON and second.id == "ok"


@pytest.mark.parametrize(("line", "hides", "doc_id"), [
    (r'{"id": "a\ud800", "text": "t"}', True, None),        # no index can hold this id
    (r'{"id": "k", "text": "x \udfff y"}', False, "k"),
    (r'{"id": "k", "title": "\ud83d", "text": "t"}', False, "k"),
])
def test_lone_surrogates_are_skipped_at_read_time(tmp_path, line, hides, doc_id):
    path = write(tmp_path / "d.jsonl", line + "\n" + r'{"id": "pair", "text": "emoji \ud83d\ude00"}' + "\n")
    skip, good = read_all([path])
    assert (skip.code, skip.hides_documents, skip.doc_id) == (SkipReason.LONE_SURROGATE, hides, doc_id)
    assert good.text == "emoji \U0001F600"  # a surrogate pair is one character: fine
    good.text.encode("utf-8")


@pytest.mark.parametrize("bad_id", ["a\tb", "a\nb", "a\x00b", "a\rb", "a\x85b", "a\u2028b", "\x7f"])
def test_control_characters_in_ids_are_skipped(tmp_path, bad_id):
    path = write(tmp_path / "d.jsonl", jsonl([{"id": bad_id, "text": "t"}, {"id": "ok", "text": "fine"}]))
    skip, good = read_all([path])
    assert skip.code is SkipReason.CONTROL_CHARACTER_IN_ID and skip.doc_id == bad_id and not skip.hides_documents
    assert good.id == "ok"


def test_control_characters_in_texts_are_kept(tmp_path):
    text = "tab\there\nnew line\x00nul\x1bescape"
    path = write(tmp_path / "d.jsonl", jsonl([{"id": "k", "text": text}]))
    assert read_all([path]) == [Document("k", text, str(path), 1)]


def test_parquet_with_invalid_utf8_strings_skips_those_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = pa.array([b"good one", b"bad \xff", b"good two"], pa.binary()).view(pa.string())
    ids = pa.array([b"a", b"b", b"c\xed\xa0\x80"], pa.binary()).view(pa.string())
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": pa.array(["a", "b", "c"]), "text": texts}), path)
    items = read_all([path])
    assert [type(i) for i in items] == [Document, Skipped, Document]
    assert (items[1].code, items[1].doc_id, items[1].line) == (SkipReason.INVALID_UTF8, "b", 2)
    bad_ids = tmp_path / "q.parquet"
    pq.write_table(pa.table({"id": ids, "text": pa.array(["x", "y", "z"])}), bad_ids)
    items = read_all([bad_ids])
    assert [type(i) for i in items] == [Document, Document, Skipped] and items[2].hides_documents


def test_file_names_that_are_no_valid_id_are_skipped(tmp_path):
    corpus = tmp_path / "c"
    write(corpus / "good.txt", "good")
    write(corpus / "line\nbreak.txt", "newline in the name")
    write(Path(os.fsdecode(bytes(corpus) + b"/caf\xe9.txt")), "latin-1 name")
    items = read_all([corpus])
    assert [d.id for d in docs_of(items)] == ["good.txt"]
    codes = sorted((s.code.name, s.doc_id) for s in skips_of(items))
    assert codes == [("CONTROL_CHARACTER_IN_ID", "line\nbreak.txt"), ("LONE_SURROGATE", None)]


def test_fifo_met_while_walking_is_skipped_never_opened(tmp_path):
    corpus = tmp_path / "c"
    write(corpus / "a.txt", "alpha")
    os.mkfifo(corpus / "pipe.jsonl")
    os.mkfifo(corpus / "pipe.txt")
    with within(20):
        items = read_all([corpus])
    assert [d.id for d in docs_of(items)] == ["a.txt"]
    assert [(s.location, s.code, s.hides_documents) for s in skips_of(items)] == [
        (str(corpus / "pipe.jsonl"), SkipReason.NOT_A_REGULAR_FILE, True),
        (str(corpus / "pipe.txt"), SkipReason.NOT_A_REGULAR_FILE, True)]
    assert "FIFO" in skips_of(items)[0].reason


def test_fifo_named_as_input_or_matched_by_a_glob_is_skipped(tmp_path):
    fifo = tmp_path / "named.jsonl"
    os.mkfifo(fifo)
    write(tmp_path / "x.jsonl", jsonl([{"id": "x", "text": "x"}]))
    with within(20):
        named = read_all([fifo])
        globbed = read_all([tmp_path / "*.jsonl"])
    assert [(s.code, s.hides_documents) for s in named] == [(SkipReason.NOT_A_REGULAR_FILE, True)]
    assert [type(i) for i in globbed] == [Skipped, Document]


def test_fifo_swapped_in_after_the_look_is_not_blocking(tmp_path, monkeypatch):
    # The race: a regular file when looked at, a FIFO when opened. Opened non-blocking, then checked.
    fifo = tmp_path / "late.jsonl"
    os.mkfifo(fifo)
    real_stat = os.stat
    regular = real_stat(__file__)
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: regular if Path(p) == fifo else real_stat(p, *a, **k))
    with within(20):
        [skip] = list(read_input_file(InputFile(fifo, "late.jsonl")))
    assert skip.code is SkipReason.NOT_A_REGULAR_FILE


def test_socket_and_device_are_skipped(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(corpus / "sock.txt"))
        items = read_all([corpus, "/dev/null"])
    finally:
        server.close()
    assert [(s.code, s.reason) for s in items] == [
        (SkipReason.NOT_A_REGULAR_FILE, "not a regular file (a socket); not opened"),
        (SkipReason.NOT_A_REGULAR_FILE, "not a regular file (a character device); not opened")]


def test_symlinks_followed_to_files_and_broken_ones_skipped(tmp_path):
    # With --follow-links (issue 18: without it, a link out of the input folder is not read; test_input_links.py).
    corpus = tmp_path / "c"
    target = write(tmp_path / "elsewhere" / "t.txt", "target text")
    corpus.mkdir()
    os.symlink(target, corpus / "link.txt")
    os.symlink(tmp_path / "nowhere.txt", corpus / "dangling.txt")
    os.symlink(corpus / "loop-b.txt", corpus / "loop-a.txt")
    os.symlink(corpus / "loop-a.txt", corpus / "loop-b.txt")
    assert [(Path(s.source).name, s.code, s.hides_documents) for s in skips_of(read_all([corpus]))] == [
        ("dangling.txt", SkipReason.LINK_OUTSIDE_INPUTS, False), ("link.txt", SkipReason.LINK_OUTSIDE_INPUTS, False),
        ("loop-a.txt", SkipReason.BROKEN_LINK, True), ("loop-b.txt", SkipReason.BROKEN_LINK, True)]
    items = read_all([corpus], follow_links=True)
    assert docs_of(items) == [Document("link.txt", "target text", str(corpus / "link.txt"))]
    assert [(Path(s.source).name, s.code, s.hides_documents) for s in skips_of(items)] == [
        ("dangling.txt", SkipReason.BROKEN_LINK, True), ("loop-a.txt", SkipReason.BROKEN_LINK, True),
        ("loop-b.txt", SkipReason.BROKEN_LINK, True)]
    # Named directly: a skip, not "no such file" (the name is there; what it stands for may come back).
    assert [s.code for s in read_all([corpus / "dangling.txt", corpus / "loop-a.txt"])] == [
        SkipReason.BROKEN_LINK, SkipReason.BROKEN_LINK]


def test_folder_tree_deeper_than_the_recursion_limit(tmp_path):
    folder = tmp_path / "deep"
    depth = 1100
    path = folder
    path.mkdir()
    for _ in range(depth):  # one level at a time: Path.mkdir(parents=True) recurses
        path = path / "d"
        os.mkdir(path)
    write(path / "bottom.txt", "at the bottom")
    try:
        [doc] = read_all([folder])
        assert doc.id == "d/" * depth + "bottom.txt"
    finally:
        # Removed here, bottom up: pytest's own clean-up (shutil.rmtree) recurses and would fail on this tree
        # in a later session, for whoever runs pytest next.
        (path / "bottom.txt").unlink()
        while path != folder.parent:
            os.rmdir(path)
            path = path.parent


def test_new_codes_name_their_own_report_keys():
    for code in (SkipReason.UNLISTABLE_FOLDER, SkipReason.BROKEN_LINK, SkipReason.NOT_A_REGULAR_FILE,
                 SkipReason.UNTERMINATED_QUOTE, SkipReason.JSON_TOO_DEEP, SkipReason.LONE_SURROGATE,
                 SkipReason.CONTROL_CHARACTER_IN_ID):
        assert Skipped("a", 1, "whatever", code=code).category == code.code


# ---------------------------------------------------------------------------
# A run keeps the documents of inputs it could not read whole


def live_ids(index_dir: Path) -> set[str]:
    from bge_index.store.manifest import read_manifest
    from bge_index.store.shard_reader import iter_live_keys

    return {doc_id for doc_id, _, _ in iter_live_keys(index_dir, read_manifest(index_dir))}


def run_index(inputs, out: Path, tiny_model, encoder, **options):
    from bge_index.run.local import build_index
    from bge_index.run.index_run import IndexOptions

    return build_index([str(i) for i in inputs], out, IndexOptions(model=str(tiny_model), device="cpu",
                                                                   dtype="fp32", **options), encoder=encoder)


def test_run_keeps_documents_of_an_unlistable_folder(tiny_model, encoder, tmp_path, monkeypatch):
    corpus, out = tmp_path / "corpus", tmp_path / "ix"
    write(corpus / "a" / "one.txt", "the moon orbits the earth")
    write(corpus / "b" / "two.txt", "bread rises with yeast")
    run_index([corpus], out, tiny_model, encoder)
    assert live_ids(out) == {"a/one.txt", "b/two.txt"}
    fail_listing(monkeypatch, corpus / "b")
    summary = run_index([corpus], out, tiny_model, encoder)
    assert summary.removed == 0 and live_ids(out) == {"a/one.txt", "b/two.txt"}
    assert summary.skipped == {SkipReason.UNLISTABLE_FOLDER.code: 1}
    with pytest.raises(StrictModeError):
        run_index([corpus], out, tiny_model, encoder, strict=True)


def test_run_keeps_documents_after_a_stray_quote(tiny_model, encoder, tmp_path):
    corpus, out = tmp_path / "t.csv", tmp_path / "ix"
    write(corpus, "id,text\n1,the moon\n2,the train\n3,the garden\n")
    run_index([corpus], out, tiny_model, encoder)
    write(corpus, 'id,text\n1,the moon\n2,"the train\n3,the garden\n')
    summary = run_index([corpus], out, tiny_model, encoder)
    assert summary.removed == 0 and live_ids(out) == {"1", "2", "3"}
    with pytest.raises(StrictModeError):
        run_index([corpus], out, tiny_model, encoder, strict=True)


def test_run_survives_hostile_documents(tiny_model, encoder, tmp_path):
    corpus, out = tmp_path / "c", tmp_path / "ix"
    write(corpus / "d.jsonl", "\n".join([
        '{"id": "deep", "text": ' + "[" * 50_000 + "]" * 50_000 + "}",
        r'{"id": "sur", "text": "a \ud800 b"}',
        r'{"id": "tab\there", "text": "t"}',
        json.dumps({"id": "good", "text": "the moon and the tides"}),
    ]) + "\n")
    os.mkfifo(corpus / "pipe.jsonl")
    with within(120):
        summary = run_index([corpus], out, tiny_model, encoder)
    assert live_ids(out) == {"good"}
    assert summary.skipped == {SkipReason.JSON_TOO_DEEP.code: 1, SkipReason.LONE_SURROGATE.code: 1,
                               SkipReason.CONTROL_CHARACTER_IN_ID.code: 1, SkipReason.NOT_A_REGULAR_FILE.code: 1}


def test_run_does_not_index_the_index_inside_the_corpus(tiny_model, encoder, tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "the moon orbits the earth")
    index_folder(corpus / "old-index")
    run_index([corpus], tmp_path / "ix", tiny_model, encoder)
    assert live_ids(tmp_path / "ix") == {"a.txt"}


# ---------------------------------------------------------------------------
# 7. Long texts tokenised in bounded memory


def realistic_text(characters: int, seed: int = 0) -> str:
    from tiny_checkpoint import TRAINING_TEXT

    rng = random.Random(seed)
    parts, size = [], 0
    while size < characters:
        line = rng.choice(TRAINING_TEXT)
        parts.append(line + rng.choice([" ", "\n", "  ", "\n\n"]))
        size += len(parts[-1])
    return "".join(parts)[:characters]


def spy_tokenize(encoder, monkeypatch) -> list[int]:
    """Record the longest text each encoder.tokenize call is given."""
    lengths: list[int] = []
    real = encoder.tokenize

    def tokenize(texts, max_length):
        lengths.append(max((len(t) for t in texts), default=0))
        return real(texts, max_length)

    monkeypatch.setattr(encoder, "tokenize", tokenize)
    return lengths


@pytest.mark.parametrize("chars_per_token", [32, 1])  # 1: the first prefix is too short and doubles
@pytest.mark.parametrize("max_length", [40, 512])
def test_long_text_from_a_prefix_tokenises_as_the_whole_text(encoder, monkeypatch, chars_per_token, max_length):
    texts = [realistic_text(200_000, seed) for seed in range(3)] + ["short text", realistic_text(max_length * 3)]
    whole = encoder.tokenize(texts, max_length)
    monkeypatch.setattr(batching, "PREFIX_CHARS_PER_TOKEN", chars_per_token)
    lengths = spy_tokenize(encoder, monkeypatch)
    rows = batching.WindowRows(encoder, [str(i) for i in range(len(texts))], texts, ["h"] * len(texts),
                               colbert=False, store_text=True, max_length=max_length, chunking=None)
    assert rows.token_ids == [t.ids for t in whole]
    assert rows.truncated == sum(t.truncated for t in whole) == 4
    assert rows.texts == texts  # the stored text is still the whole text
    assert max(lengths) < 200_000  # no call saw a whole long text


def test_text_just_over_the_prefix_but_not_truncated(encoder, monkeypatch):
    # A text longer than the prefix but with few tokens: the prefix cannot decide, the whole text does.
    monkeypatch.setattr(batching, "PREFIX_CHARS_PER_TOKEN", 2)
    text = "moon " * 30
    rows = batching.WindowRows(encoder, ["a"], [text], ["h"], colbert=False, store_text=True, max_length=512,
                               chunking=None)
    [whole] = encoder.tokenize([text], 512)
    assert rows.token_ids == [whole.ids] and rows.truncated == 0 and not whole.truncated


def test_chunking_a_long_text_tokenises_it_in_slices(encoder, monkeypatch):
    text = realistic_text(60_000)
    whole = encoder.passages(text, 64, 0)
    monkeypatch.setattr(batching, "CHUNK_SLICE_CHARS", 5000)
    lengths: list[int] = []
    real = encoder.passages
    monkeypatch.setattr(encoder, "passages", lambda t, *a: lengths.append(len(t)) or real(t, *a))
    rows = batching.WindowRows(encoder, ["a"], [text], ["h"], colbert=False, store_text=True, max_length=512,
                               chunking={"tokens": 64, "overlap": 0})
    assert max(lengths) <= 5000
    # Cut at whitespace, the slices hold exactly the whole text's tokens, in order...
    assert [i for ids in rows.token_ids for i in ids[1:-1]] == [i for p in whole for i in p.ids[1:-1]]
    # ...and every passage's span is its place in the text, in order (a span may share its first character with
    # the one before, as whole-text passages do: a word's leading space belongs to the word's token).
    for (start, end), passage_text in zip(rows.spans, rows.texts):
        assert text[start:end] == passage_text
    assert all(a[0] < b[0] and a[1] <= b[0] + 1 for a, b in zip(rows.spans, rows.spans[1:]))
    assert all(len(ids) <= 64 for ids in rows.token_ids)


def test_slices_cut_before_whitespace_and_cover_the_text():
    text = "word " * 1000 + "x" * 3000 + " tail"
    spans = batching._slices(text, 700)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(end - start <= 700 for start, end in spans)
    for start, end in spans[:-1]:
        # Each cut sits before whitespace (or, in the run of x's without any, hard at the slice size).
        assert text[end].isspace() or (text[end - 1] == "x" and end - start == 700)
