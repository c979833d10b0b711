"""Input documents: formats, ids, order, bad input as `Skipped`, query files.

Every input is built inside tmp_path; nothing here touches the model or the network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bge_index.input.documents import (
    STDIN_NAME,
    Document,
    FieldNames,
    InputError,
    InputFile,
    QueryFileError,
    SkipReason,
    Skipped,
    format_of,
    iter_documents,
    read_input_file,
    read_queries,
)


def write_parquet_records(path: Path, records: list[dict]) -> None:
    """Write plain records as a Parquet input file (pyarrow directly: inputs are not index shards)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


# ---------------------------------------------------------------------------
# helpers


def read_all(inputs, **kwargs) -> list:
    return list(iter_documents([str(i) for i in inputs], **kwargs))


def docs_of(items) -> list[Document]:
    return [item for item in items if isinstance(item, Document)]


def skips_of(items) -> list[Skipped]:
    return [item for item in items if isinstance(item, Skipped)]


def pairs(items) -> list[tuple[str, str]]:
    return [(d.id, d.text) for d in docs_of(items)]


def jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")


def _noise(i: int) -> str:
    """Deterministic, poorly compressible text, so damaged gzip streams fail the same way every run."""
    return hashlib.sha256(str(i).encode()).hexdigest()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def gzip_file(path: Path) -> Path:
    """path -> path.gz (the plain file is removed)."""
    packed = path.with_name(path.name + ".gz")
    packed.write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    return packed


# ---------------------------------------------------------------------------
# format_of / FieldNames


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.txt", ".txt"),
        ("a.md", ".md"),
        ("a.jsonl", ".jsonl"),
        ("a.jsonl.gz", ".jsonl"),
        ("A.NDJSON.GZ", ".ndjson"),
        ("data.parquet.gz", ".parquet"),
        ("notes.v2.txt", ".txt"),
        ("table.CSV", ".csv"),
        ("README", ""),
        ("plain.gz", ""),
        ("folder.d/file", ""),
    ],
)
def test_format_of_looks_through_gz(name, expected):
    assert format_of(Path(name)) == expected


def test_field_names_from_options():
    default = FieldNames()
    assert FieldNames.from_options(None, None) == default
    assert FieldNames.from_options("", "") == default
    custom = FieldNames.from_options("doc_no", "body")
    assert custom.id_fields == ("doc_no",)
    assert custom.text_fields == ("body",)
    assert custom.title_field == default.title_field == "title"
    only_text = FieldNames.from_options(None, "body")
    assert only_text.id_fields == default.id_fields
    assert only_text.text_fields == ("body",)


# ---------------------------------------------------------------------------
# formats


def test_txt_and_md_in_folder_ids_are_relative_posix_paths(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "alpha text\n")
    write(corpus / "sub" / "deeper" / "b.md", "# Bee\n\nbody")
    write(corpus / "sub" / "c.markdown", "see")
    write(corpus / "bom.txt", b"\xef\xbb\xbfwith bom")
    items = read_all([corpus])
    assert not skips_of(items)
    got = {d.id: d for d in docs_of(items)}
    assert set(got) == {"a.txt", "bom.txt", "sub/c.markdown", "sub/deeper/b.md"}
    assert got["a.txt"].text == "alpha text\n"
    assert got["sub/deeper/b.md"].text == "# Bee\n\nbody"
    assert got["bom.txt"].text == "with bom"  # BOM stripped
    assert got["a.txt"].line is None
    assert got["sub/deeper/b.md"].source == str(corpus / "sub" / "deeper" / "b.md")


def test_file_given_directly_keeps_its_path_as_id(tmp_path, monkeypatch):
    write(tmp_path / "notes" / "x.txt", "direct")
    monkeypatch.chdir(tmp_path)
    items = read_all(["notes/x.txt"])
    assert items == [Document("notes/x.txt", "direct", "notes/x.txt", None)]
    absolute = (tmp_path / "notes" / "x.txt").as_posix()
    [doc] = read_all([absolute])
    assert doc.id == absolute


def test_jsonl_fields_title_and_integer_ids(tmp_path):
    path = write(
        tmp_path / "docs.jsonl",
        jsonl_bytes(
            [
                {"id": "a", "text": "plain"},
                {"_id": "b", "title": "Head", "text": "body"},
                {"docid": 7, "contents": "from contents"},
                {"id": 12, "title": "  Spaced  ", "text": "t"},
                {"id": "e", "title": "", "text": "no title"},
                {"id": None, "_id": "f", "text": None, "contents": "fallbacks"},
            ]
        ),
    )
    items = read_all([path])
    assert items == [
        Document("a", "plain", str(path), 1),
        Document("b", "Head body", str(path), 2),
        Document("7", "from contents", str(path), 3),
        Document("12", "Spaced t", str(path), 4),
        Document("e", "no title", str(path), 5),
        Document("f", "fallbacks", str(path), 6),
    ]
    assert all(isinstance(d.id, str) for d in items)


def test_ndjson_is_json_lines(tmp_path):
    path = write(tmp_path / "x.ndjson", jsonl_bytes([{"id": "n1", "text": "one"}, {"id": "n2", "text": "two"}]))
    assert pairs(read_all([path])) == [("n1", "one"), ("n2", "two")]


def test_custom_id_and_text_fields(tmp_path):
    path = write(
        tmp_path / "c.jsonl",
        jsonl_bytes(
            [
                {"doc_no": "D1", "body": "custom body", "id": "ignored", "text": "ignored text"},
                {"id": "only-default", "text": "no custom fields"},
            ]
        ),
    )
    items = read_all([path], fields=FieldNames.from_options("doc_no", "body"))
    assert items[0] == Document("D1", "custom body", str(path), 1)
    assert isinstance(items[1], Skipped)
    assert "no id field" in items[1].reason and "doc_no" in items[1].reason
    # The same file with the default fields reads the default ones.
    assert pairs(read_all([path])) == [("ignored", "ignored text"), ("only-default", "no custom fields")]


def test_custom_fields_in_csv(tmp_path):
    path = write(tmp_path / "c.csv", "key,body,text\nk1,the body,the text\n")
    items = read_all([path], fields=FieldNames.from_options("key", "body"))
    assert items == [Document("k1", "the body", str(path), 2)]


def test_csv_rfc_quoting_and_line_numbers(tmp_path):
    content = (
        "id,title,text\n"
        '1,Greeting,"Hello, world"\n'
        '2,,"line one\nline two, with comma"\n'
        "\n"
        '3,Quote,"She said ""hi"""\n'
    )
    path = write(tmp_path / "t.csv", content)
    items = read_all([path])
    assert items == [
        Document("1", "Greeting Hello, world", str(path), 2),
        Document("2", "line one\nline two, with comma", str(path), 3),
        Document("3", 'Quote She said "hi"', str(path), 6),
    ]


def test_tsv_header_and_literal_quotes(tmp_path):
    content = 'id\ttitle\ttext\na\t"T"\t"quoted" text, with comma\nb\t\t"unbalanced quote\nc\t\tlast\n'
    path = write(tmp_path / "t.tsv", content)
    items = read_all([path])
    assert items == [
        Document("a", '"T" "quoted" text, with comma', str(path), 2),
        Document("b", '"unbalanced quote', str(path), 3),
        Document("c", "last", str(path), 4),
    ]


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    write_parquet_records(
        path,
        [
            {"id": 1, "title": "T", "text": "first"},
            {"id": 2, "title": None, "text": "second"},
            {"id": 3, "title": None, "text": None},
        ],
    )
    items = read_all([path])
    assert items[:2] == [Document("1", "T first", str(path), 1), Document("2", "second", str(path), 2)]
    assert isinstance(items[2], Skipped)
    assert items[2].location == f"{path}:3"
    assert "no text field" in items[2].reason


def _format_samples(folder: Path) -> dict[str, tuple[Path, list[tuple[str, str]]]]:
    """One small file per format, with the (id, text) pairs it should give when its folder is read."""
    samples = {
        "txt": (write(folder / "txt" / "doc.txt", "whole file text"), [("doc.txt", "whole file text")]),
        "md": (write(folder / "md" / "doc.md", "# md text"), [("doc.md", "# md text")]),
        "jsonl": (
            write(folder / "jsonl" / "d.jsonl", jsonl_bytes([{"id": "j1", "text": "one"}, {"id": 2, "text": "two"}])),
            [("j1", "one"), ("2", "two")],
        ),
        "ndjson": (write(folder / "ndjson" / "d.ndjson", jsonl_bytes([{"_id": "n", "text": "nd"}])), [("n", "nd")]),
        "csv": (write(folder / "csv" / "d.csv", 'id,text\nc1,"a, b"\nc2,plain\n'), [("c1", "a, b"), ("c2", "plain")]),
        "tsv": (write(folder / "tsv" / "d.tsv", 'id\ttext\nt1\t"q" x\n'), [("t1", '"q" x')]),
    }
    parquet = folder / "parquet" / "d.parquet"
    parquet.parent.mkdir(parents=True)
    write_parquet_records(parquet, [{"id": "p1", "text": "pq one"}, {"id": "p2", "text": "pq two"}])
    samples["parquet"] = (parquet, [("p1", "pq one"), ("p2", "pq two")])
    return samples


@pytest.mark.parametrize("fmt", ["txt", "md", "jsonl", "ndjson", "csv", "tsv", "parquet"])
def test_each_format_plain_and_gzipped(tmp_path, fmt):
    path, expected = _format_samples(tmp_path)[fmt]
    plain = read_all([path.parent])
    assert not skips_of(plain), skips_of(plain)
    assert pairs(plain) == expected
    packed = gzip_file(path)
    assert not path.exists()
    gz_items = read_all([path.parent])
    assert not skips_of(gz_items), skips_of(gz_items)
    if fmt in ("txt", "md"):
        expected = [(doc_id + ".gz", text) for doc_id, text in expected]
    assert pairs(gz_items) == expected
    # The gzipped file named directly reads the same.
    direct = read_all([packed])
    assert [d.text for d in docs_of(direct)] == [text for _, text in expected]
    assert all(d.source == str(packed) for d in docs_of(direct))


def test_stdin_jsonl(tmp_path):
    stdin = io.BytesIO(jsonl_bytes([{"id": "s1", "text": "from stdin"}, {"id": "s2", "text": "again"}]))
    items = read_all(["-"], stdin=stdin)
    assert items == [Document("s1", "from stdin", STDIN_NAME, 1), Document("s2", "again", STDIN_NAME, 2)]


def test_stdin_takes_its_place_among_inputs(tmp_path):
    before = write(tmp_path / "before.txt", "before")
    after = write(tmp_path / "after.jsonl", jsonl_bytes([{"id": "after", "text": "x"}]))
    stdin = io.BytesIO(b'{"id": "middle", "text": "m"}\nnot json\n')
    items = read_all([before, "-", after], stdin=stdin)
    assert [getattr(i, "id", None) for i in items] == [before.as_posix(), "middle", None, "after"]
    assert items[2].location == f"{STDIN_NAME}:2"


# ---------------------------------------------------------------------------
# order


def test_documents_come_in_input_order(tmp_path):
    b = write(tmp_path / "b.jsonl", jsonl_bytes([{"id": "b1", "text": "x"}, {"id": "b2", "text": "y"}]))
    a = write(tmp_path / "a.txt", "a")
    c = write(tmp_path / "c.csv", "id,text\nc1,z\n")
    assert [d.id for d in docs_of(read_all([b, a, c]))] == ["b1", "b2", a.as_posix(), "c1"]
    assert [d.id for d in docs_of(read_all([c, a, b]))] == ["c1", a.as_posix(), "b1", "b2"]


def test_folder_walk_is_sorted_and_recursive(tmp_path):
    corpus = tmp_path / "corpus"
    # Created in reverse order so a directory listing in creation order would differ.
    for rel in ["d/z.txt", "d/a.md", "c/e/f.txt", "c/a.txt", "b.md", "a.txt"]:
        write(corpus / rel, rel)
    items = read_all([corpus])
    assert [d.id for d in docs_of(items)] == ["a.txt", "b.md", "c/a.txt", "c/e/f.txt", "d/a.md", "d/z.txt"]
    assert [d.text for d in docs_of(items)] == ["a.txt", "b.md", "c/a.txt", "c/e/f.txt", "d/a.md", "d/z.txt"]


def test_folder_ignores_hidden_and_unsupported_files(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "keep.txt", "keep")
    write(corpus / ".hidden.txt", "hidden file")
    write(corpus / ".git" / "inside.txt", "hidden dir")
    write(corpus / "sub" / ".cache" / "deep.jsonl", jsonl_bytes([{"id": "h", "text": "hidden"}]))
    write(corpus / "image.png", b"\x89PNG\x00\x00")
    write(corpus / "data.json", '{"id": "j", "text": "json is not jsonl"}')
    write(corpus / "README", "no extension")
    write(corpus / "archive.tar.gz", b"\x1f\x8b garbage")
    write(corpus / "sub" / "keep2.md", "keep2")
    items = read_all([corpus])
    assert items == [
        Document("keep.txt", "keep", str(corpus / "keep.txt")),
        Document("sub/keep2.md", "keep2", str(corpus / "sub" / "keep2.md")),
    ]


def test_glob_expands_sorted(tmp_path):
    g = tmp_path / "g"
    write(g / "b.jsonl", jsonl_bytes([{"id": "b", "text": "b"}]))
    write(g / "a.jsonl", jsonl_bytes([{"id": "a", "text": "a"}]))
    write(g / "c.jsonl", jsonl_bytes([{"id": "c", "text": "c"}]))
    write(g / "a.txt", "not matched")
    items = read_all([str(g / "*.jsonl")])
    assert [d.id for d in docs_of(items)] == ["a", "b", "c"]
    assert [d.source for d in docs_of(items)] == [str(g / n) for n in ("a.jsonl", "b.jsonl", "c.jsonl")]


def test_recursive_glob(tmp_path):
    g = tmp_path / "g"
    for rel in ["z.txt", "m/y.txt", "m/n/x.txt", "a/w.txt", "a/skip.md"]:
        write(g / rel, rel)
    items = read_all([str(g / "**" / "*.txt")])
    expected = sorted(str(g / rel) for rel in ["z.txt", "m/y.txt", "m/n/x.txt", "a/w.txt"])
    assert [d.source for d in docs_of(items)] == expected
    # Whole files found through a glob are named relative to the glob's fixed leading folder, as in `g/`.
    assert [d.id for d in docs_of(items)] == [Path(p).relative_to(g).as_posix() for p in expected]
    assert [d.text for d in docs_of(items)] == [str(Path(p).relative_to(g)) for p in expected]


def test_symlink_loop_in_folder_does_not_hang(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "a")
    write(corpus / "sub" / "b.txt", "b")
    os.symlink(corpus, corpus / "sub" / "loop")
    os.symlink(corpus / "sub", corpus / "sub" / "loop2")
    items = read_all([corpus])
    assert [d.id for d in docs_of(items)] == ["a.txt", "sub/b.txt"]
    assert not skips_of(items)


def test_recursive_glob_with_symlink_loop_reads_each_file_once(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "a")
    write(corpus / "sub" / "b.txt", "b")
    os.symlink(corpus, corpus / "sub" / "loop")
    items = read_all([str(corpus / "**" / "*.txt")])
    texts = [d.text for d in docs_of(items)]
    assert sorted(texts) == ["a", "b"]


# ---------------------------------------------------------------------------
# bad input becomes Skipped, in order, and the stream goes on


def test_invalid_utf8_txt(tmp_path):
    bad = write(tmp_path / "bad.txt", b"abc\xffdef")
    good = write(tmp_path / "good.txt", "fine")
    items = read_all([bad, good])
    assert items[0] == Skipped(str(bad), None, "invalid UTF-8 at byte 3")
    assert items[0].location == str(bad)
    assert items[1] == Document(good.as_posix(), "fine", str(good))


def test_invalid_utf8_jsonl_line_between_good_lines(tmp_path):
    bad_line = b'{"id": "x", "text": "caf\xe9"}\n'
    data = b'{"id": "1", "text": "good one"}\n' + bad_line + b"\n" + b'{"id": "3", "text": "good three"}\n'
    path = write(tmp_path / "u.jsonl", data)
    items = read_all([path])
    assert items[0] == Document("1", "good one", str(path), 1)
    assert isinstance(items[1], Skipped)
    assert items[1].location == f"{path}:2"
    bad_byte = bad_line.index(b"\xe9")
    assert items[1].reason == f"invalid UTF-8 at byte {bad_byte}"
    assert items[2] == Document("3", "good three", str(path), 4)  # blank line 3 still counted
    assert len(items) == 3


@pytest.mark.parametrize(
    ("line", "reason_part"),
    [
        ('{"id": "1", "text": }', "malformed JSON"),
        ('{"id": "1", "text": "unterminated', "malformed JSON"),
        ("[1, 2, 3]", "not an object (got list)"),
        ('"just a string"', "not an object (got str)"),
        ('{"id": "1"}', "no text field"),
        ('{"id": "1", "text": null}', "no text field"),
        ('{"text": "no id here"}', "no id field"),
        ('{"id": "1", "text": 5}', "text field 'text' is a int"),
        ('{"id": [1], "text": "x"}', "id field 'id' is a list"),
        ('{"id": true, "text": "x"}', "id field 'id' is a bool"),
        ('{"id": 1.5, "text": "x"}', "id field 'id' is a float"),
        ('{"id": "1", "text": "x", "title": 3}', "title field 'title' is a int"),
        ('{"id": "1", "text": ""}', "empty text"),
        ('{"id": "1", "text": "  \\n\\t "}', "empty text"),
        ('{"id": "  ", "text": "x"}', "empty id"),
    ],
)
def test_bad_json_lines_are_skipped_and_the_stream_goes_on(tmp_path, line, reason_part):
    data = '{"id": "before", "text": "b"}\n\n' + line + '\n{"id": "after", "text": "a"}\n'
    path = write(tmp_path / "bad.jsonl", data)
    items = read_all([path])
    assert len(items) == 3
    assert items[0] == Document("before", "b", str(path), 1)
    assert isinstance(items[1], Skipped)
    assert items[1].location == f"{path}:3"
    assert reason_part in items[1].reason
    assert items[2] == Document("after", "a", str(path), 4)


def test_empty_and_whitespace_txt_files(tmp_path):
    empty = write(tmp_path / "empty.txt", "")
    blank = write(tmp_path / "blank.md", " \n\t\n")
    items = read_all([empty, blank])
    assert items == [Skipped(str(empty), None, "empty text"), Skipped(str(blank), None, "empty text")]


def test_binary_txt_with_nul_bytes(tmp_path):
    binary = write(tmp_path / "image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    after = write(tmp_path / "after.txt", "after")
    items = read_all([binary, after])
    assert isinstance(items[0], Skipped)
    assert items[0].location == str(binary)
    assert "binary" in items[0].reason and "NUL" in items[0].reason
    assert items[1].id == after.as_posix()


def test_truncated_jsonl_gz_keeps_lines_before_the_damage(tmp_path):
    n = 400
    records = [{"id": str(i), "text": f"record {i} " + _noise(i)} for i in range(n)]
    packed = gzip.compress(jsonl_bytes(records))
    path = write(tmp_path / "cut.jsonl.gz", packed[: len(packed) * 6 // 10])
    after = write(tmp_path / "after.txt", "after")
    items = read_all([path, after])
    assert items[-1] == Document(after.as_posix(), "after", str(after))
    from_cut = items[:-1]
    docs, skips = docs_of(from_cut), skips_of(from_cut)
    assert 0 < len(docs) < n
    assert [d.id for d in docs] == [str(i) for i in range(len(docs))]
    assert [d.text for d in docs] == [r["text"] for r in records[: len(docs)]]
    assert len(skips) == 1 and from_cut[-1] is skips[0]
    assert skips[0].line == len(docs) + 1
    assert "corrupt or truncated gzip" in skips[0].reason


def test_truncated_txt_gz_is_skipped(tmp_path):
    packed = gzip.compress(b"hello world " * 200)
    path = write(tmp_path / "cut.txt.gz", packed[: len(packed) // 2])
    not_gzip = write(tmp_path / "fake.md.gz", b"plain text, not gzip")
    after = write(tmp_path / "after.txt", "after")
    items = read_all([path, not_gzip, after])
    assert len(items) == 3
    assert isinstance(items[0], Skipped) and items[0].location == str(path)
    assert "gzip" in items[0].reason
    assert isinstance(items[1], Skipped) and items[1].location == str(not_gzip)
    assert "gzip" in items[1].reason
    assert items[2].id == after.as_posix()


def test_truncated_csv_gz_is_skipped_and_the_stream_goes_on(tmp_path):
    rows = "id,text\n" + "".join(f"{i},row {i} {_noise(i)}\n" for i in range(400))
    packed = gzip.compress(rows.encode())
    path = write(tmp_path / "cut.csv.gz", packed[: len(packed) // 2])
    after = write(tmp_path / "after.txt", "after")
    items = read_all([path, after])
    assert items[-1] == Document(after.as_posix(), "after", str(after))
    assert any(isinstance(i, Skipped) and "gzip" in i.reason for i in items)


def test_corrupt_tsv_gz_is_skipped_and_the_stream_goes_on(tmp_path):
    rows = "id\ttext\n" + "".join(f"{i}\trow {i} {_noise(i)}\n" for i in range(400))
    packed = bytearray(gzip.compress(rows.encode(), mtime=0))
    for j in range(len(packed) // 2, len(packed) // 2 + 64):
        packed[j] ^= 0xFF
    path = write(tmp_path / "bad.tsv.gz", bytes(packed))
    after = write(tmp_path / "after.txt", "after")
    items = read_all([path, after])
    assert items[-1] == Document(after.as_posix(), "after", str(after))
    assert any(isinstance(i, Skipped) and "gzip" in i.reason for i in items)


def test_csv_row_with_wrong_column_count(tmp_path):
    path = write(tmp_path / "t.csv", "id,text\n1,one\n2,two,extra\n3\n4,four\n")
    items = read_all([path])
    assert items[0] == Document("1", "one", str(path), 2)
    # Which cell is the id is not known: the row may have held any id, whose indexed copy must stay.
    assert items[1] == Skipped(str(path), 3, "expected 2 columns, found 3", hides_documents=True)
    assert items[2] == Skipped(str(path), 4, "expected 2 columns, found 1", hides_documents=True)
    assert items[3] == Document("4", "four", str(path), 5)
    assert len(items) == 4


def test_csv_empty_text_and_invalid_utf8_rows(tmp_path):
    path = write(tmp_path / "t.csv", b"id,text\n1,\n2,caf\xe9\n3,ok\n")
    items = read_all([path])
    assert items[0] == Skipped(str(path), 2, "empty text")
    assert isinstance(items[1], Skipped) and items[1].location == f"{path}:3"
    assert "invalid UTF-8" in items[1].reason
    assert items[2] == Document("3", "ok", str(path), 4)


@pytest.mark.parametrize(
    ("name", "content", "reason_part"),
    [
        ("no_text.csv", "id,body\n1,x\n2,y\n", "no text column"),
        ("no_id.csv", "key,text\n1,x\n2,y\n", "no id column"),
        ("no_text.tsv", "id\tbody\n1\tx\n", "no text column"),
        ("no_id.tsv", "key\ttext\n1\tx\n", "no id column"),
    ],
)
def test_table_without_id_or_text_column_is_skipped_whole(tmp_path, name, content, reason_part):
    path = write(tmp_path / name, content)
    after = write(tmp_path / "after.jsonl", jsonl_bytes([{"id": "after", "text": "a"}]))
    items = read_all([path, after])
    assert len(items) == 2
    assert isinstance(items[0], Skipped)
    assert items[0].location == f"{path}:1"
    assert reason_part in items[0].reason
    assert "whole file skipped" in items[0].reason
    assert items[1] == Document("after", "a", str(after), 1)


def test_parquet_without_text_column_is_skipped_whole(tmp_path):
    path = tmp_path / "p.parquet"
    write_parquet_records(path, [{"id": "1", "body": "x"}, {"id": "2", "body": "y"}])
    items = read_all([path])
    assert len(items) == 1
    assert items[0].location == str(path)
    assert "no text column" in items[0].reason


def test_explicit_unsupported_file_is_skipped(tmp_path):
    json_file = write(tmp_path / "data.json", '{"id": "1", "text": "x"}')
    no_ext = write(tmp_path / "README", "text")
    gz_json = write(tmp_path / "data.json.gz", gzip.compress(b"{}"))
    good = write(tmp_path / "ok.txt", "ok")
    items = read_all([json_file, no_ext, gz_json, good])
    assert len(items) == 4
    assert [i.location for i in items[:3]] == [str(json_file), str(no_ext), str(gz_json)]
    assert all(isinstance(i, Skipped) and "unsupported file type" in i.reason for i in items[:3])
    assert "'.json'" in items[0].reason and "(none)" in items[1].reason and "'.json'" in items[2].reason
    assert items[3].id == good.as_posix()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_parquet_is_skipped(tmp_path, damage):
    path = tmp_path / "bad.parquet"
    if damage == "garbage":
        path.write_bytes(b"PAR1 this is not really parquet PAR1")
    else:
        write_parquet_records(path, [{"id": str(i), "text": f"t{i}"} for i in range(50)])
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    after = write(tmp_path / "after.txt", "after")
    items = read_all([path, after])
    assert len(items) == 2
    assert isinstance(items[0], Skipped)
    assert items[0].location == str(path)
    assert "not a readable Parquet file" in items[0].reason
    assert items[1].id == after.as_posix()


def test_skipped_category_groups_particulars():
    a = Skipped("a.txt", None, "invalid UTF-8 at byte 3")
    b = Skipped("b.jsonl", 9, "invalid UTF-8 at byte 17")
    assert a.category == b.category
    assert a.category != Skipped("c", 1, "empty text").category
    m1 = Skipped("x", 1, "malformed JSON (Expecting value at column 5)")
    m2 = Skipped("y", 2, "malformed JSON (Unterminated string at column 9)")
    assert m1.category == m2.category == "malformed_json"
    t1 = Skipped("x", 1, "text field 'text' is a int, not a string")
    t2 = Skipped("x", 1, "text field 'body' is a int, not a string")
    assert t1.category == t2.category
    assert t1.category != Skipped("x", 1, "text field 'text' is a list, not a string").category


def test_skipped_location():
    assert Skipped("dir/f.jsonl", 12, "r").location == "dir/f.jsonl:12"
    assert Skipped("dir/f.txt", None, "r").location == "dir/f.txt"


@pytest.mark.parametrize("code", list(SkipReason))
def test_skip_report_key_is_its_code_not_its_message(code):
    worded = Skipped("a.jsonl", 3, "one wording (with particulars 12)", code=code)
    reworded = Skipped("b.jsonl", 9, "a wholly different wording; 'x' 7", hides_documents=True, code=code)
    assert worded.category == reworded.category == code.code
    # A plan row carries the code as its string value.
    assert Skipped("c", None, "whatever", False, code.value).code is code
    assert Skipped("c", None, "whatever", code=code.value).category == code.code


def test_skip_code_is_not_part_of_equality():
    assert Skipped("a", 1, "empty text", code=SkipReason.EMPTY_TEXT) == Skipped("a", 1, "empty text")
    with pytest.raises(ValueError):
        Skipped("a", 1, "r", code="no such code")


def _one_skip_per_kind(folder: Path) -> list[tuple[object, SkipReason]]:
    """(input, the code its one skip should carry), for every kind the readers can produce from a file."""
    packed_noise = gzip.compress("".join(_noise(i) for i in range(300)).encode())
    jsonl_lines = {
        SkipReason.MALFORMED_JSON: '{"id": "1", "text": ',
        SkipReason.NOT_AN_OBJECT: '["a list"]',
        SkipReason.NO_ID_FIELD: '{"text": "t"}',
        SkipReason.BAD_ID_TYPE: '{"id": 1.5, "text": "t"}',
        SkipReason.EMPTY_ID: '{"id": " ", "text": "t"}',
        SkipReason.NO_TEXT_FIELD: '{"id": "1"}',
        SkipReason.BAD_TEXT_TYPE: '{"id": "1", "text": 5}',
        SkipReason.BAD_TITLE_TYPE: '{"id": "1", "title": [], "text": "t"}',
        SkipReason.EMPTY_TEXT: '{"id": "1", "text": "  "}',
    }
    cases: list[tuple[object, SkipReason]] = [
        (write(folder / f"{code.name}.jsonl", line + "\n"), code) for code, line in jsonl_lines.items()
    ]
    garbage_parquet = write(folder / "bad.parquet", b"PAR1 this is not really parquet PAR1")
    no_text_parquet = folder / "no_text.parquet"
    write_parquet_records(no_text_parquet, [{"id": "1", "body": "x"}])
    cases += [
        (write(folder / "data.json", "{}"), SkipReason.UNSUPPORTED_FORMAT),
        (write(folder / "nul.txt", b"a\x00b"), SkipReason.BINARY_FILE),
        (write(folder / "latin1.txt", b"caf\xe9"), SkipReason.INVALID_UTF8_AT),
        (write(folder / "latin1.jsonl", b'{"id": "caf\xe9"}\n'), SkipReason.INVALID_UTF8_AT),
        (write(folder / "latin1.csv", b"id,text\n1,caf\xe9\n"), SkipReason.INVALID_UTF8),
        (write(folder / "blank.md", "  \n"), SkipReason.EMPTY_TEXT),
        (write(folder / "cut.txt.gz", packed_noise[: len(packed_noise) // 2]), SkipReason.TRUNCATED_GZIP),
        (write(folder / "notgzip.txt.gz", b"plain text, no gzip header"), SkipReason.UNREADABLE_GZIP),
        (write(folder / "cut.jsonl.gz", packed_noise[: len(packed_noise) // 2]), SkipReason.READ_CUT_SHORT_GZIP),
        (write(folder / "columns.csv", "id,text\n1,a,b\n"), SkipReason.WRONG_COLUMN_COUNT),
        (write(folder / "no_id.csv", "key,text\n1,a\n"), SkipReason.NO_ID_COLUMN),
        (write(folder / "no_text.tsv", "id\tbody\n1\ta\n"), SkipReason.NO_TEXT_COLUMN),
        (garbage_parquet, SkipReason.UNREADABLE_PARQUET),
        (no_text_parquet, SkipReason.NO_TEXT_COLUMN),
        (InputFile(folder / "vanished.txt", "vanished.txt"), SkipReason.UNREADABLE_FILE),
    ]
    return cases


# Kinds whose report key is now one code where the message-derived key varied with the data
# (the value's type, the operating system's error text).
_GENERALISED = {SkipReason.BAD_ID_TYPE, SkipReason.BAD_TEXT_TYPE, SkipReason.BAD_TITLE_TYPE, SkipReason.UNREADABLE_FILE}


def test_each_skip_kind_carries_its_code(tmp_path):
    for source, code in _one_skip_per_kind(tmp_path):
        if isinstance(source, InputFile):
            items = list(read_input_file(source))
        else:
            items = read_all([source])
        skips = skips_of(items)
        assert len(skips) == 1, (source, items)
        skip = skips[0]
        assert skip.code is code, (source, skip)
        assert skip.category == code.code
        if code not in _GENERALISED:
            # The same report key as the one once parsed out of the message.
            assert Skipped(skip.source, skip.line, skip.reason).category == code.code, skip


def test_query_file_skips_carry_codes(tmp_path):
    from bge_index.input.formats import _read_tsv_queries

    items = list(_read_tsv_queries(io.BytesIO(b"q1\tok\nno tab\n\xff\tx\n"), "q.tsv"))
    assert [getattr(i, "code", None) for i in items] == [None, SkipReason.BAD_QUERY_LINE, SkipReason.INVALID_UTF8_AT]


def test_documents_stage_imports_nothing_from_shards(tmp_path):
    path = tmp_path / "p.parquet"
    write_parquet_records(path, [{"id": "p1", "text": "pq one"}])
    packed = tmp_path / "q.parquet.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    script = (
        "import sys\n"
        "import bge_index.input.documents, bge_index.input.formats, bge_index.input.types\n"
        "from bge_index.input.documents import iter_documents, Document\n"
        f"items = list(iter_documents([{str(path)!r}, {str(packed)!r}]))\n"
        "assert [type(i) for i in items] == [Document, Document], items\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('bge_index'))\n"
        "assert 'bge_index.shards' not in loaded, loaded\n"
        "print(loaded)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "bge_index.input.documents" in result.stdout


def test_parquet_is_read_in_bounded_batches(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from bge_index.input import formats

    path = tmp_path / "many.parquet"
    write_parquet_records(path, [{"id": str(i), "text": f"t{i}", "extra": "x" * 10} for i in range(50)])
    seen = []
    real = pq.ParquetFile.iter_batches

    def recording(self, *args, **kwargs):
        seen.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    monkeypatch.setattr(formats, "PARQUET_BATCH_ROWS", 7)
    items = read_all([path])
    assert [d.id for d in docs_of(items)] == [str(i) for i in range(50)]
    assert [d.line for d in docs_of(items)] == list(range(1, 51))
    # every column is read: those besides id and text are the rows' metadata (issue 20)
    assert seen == [{"batch_size": 7, "columns": ["id", "text", "extra"]}]
    assert docs_of(items)[0].metadata == {"extra": "x" * 10}


# ---------------------------------------------------------------------------
# InputError at call time


def test_missing_path_fails_before_iterating(tmp_path):
    good = write(tmp_path / "good.txt", "good")
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match="nope.jsonl"):
        iter_documents([str(good), str(missing)])  # no list(): it must fail at call time
    with pytest.raises(InputError, match="nope.jsonl"):
        iter_documents([str(missing), str(good)])


def test_glob_matching_nothing_fails_before_iterating(tmp_path):
    good = write(tmp_path / "good.txt", "good")
    pattern = str(tmp_path / "*.nothing")
    with pytest.raises(InputError, match=r"\*\.nothing"):
        iter_documents([str(good), pattern])


def test_no_inputs_is_an_input_error():
    with pytest.raises(InputError):
        iter_documents([])


# ---------------------------------------------------------------------------
# read_queries


def test_read_queries_jsonl(tmp_path):
    path = write(
        tmp_path / "q.jsonl",
        jsonl_bytes([{"_id": "q1", "text": "first query"}, {"id": 2, "text": "second"}, {"qid": "q3", "query": "third"}]),
    )
    queries = read_queries(str(path))
    assert [(q.id, q.text) for q in queries] == [("q1", "first query"), ("2", "second"), ("q3", "third")]
    assert [q.line for q in queries] == [1, 2, 3]


def test_read_queries_tsv_without_header(tmp_path):
    path = write(tmp_path / "q.tsv", "id\ttext\nq2\tsecond query\n\nq3\twith \"quotes\"\r\n")
    queries = read_queries(str(path))
    # No header: the first line is a query like any other.
    assert [(q.id, q.text) for q in queries] == [("id", "text"), ("q2", "second query"), ("q3", 'with "quotes"')]
    assert [q.line for q in queries] == [1, 2, 4]


def test_read_queries_gzipped_tsv(tmp_path):
    path = gzip_file(write(tmp_path / "q.tsv", "q1\tzipped query\n"))
    assert [(q.id, q.text) for q in read_queries(str(path))] == [("q1", "zipped query")]


def test_read_queries_stdin():
    stdin = io.BytesIO(b'{"_id": "s1", "text": "from stdin"}\n{"id": "s2", "text": "two"}\n')
    queries = read_queries("-", stdin=stdin)
    assert [(q.id, q.text, q.source) for q in queries] == [("s1", "from stdin", STDIN_NAME), ("s2", "two", STDIN_NAME)]


def test_read_queries_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "q.jsonl", '{"_id": "q1", "text": "ok"}\n\n{"_id": "q2", "text": \n')
    with pytest.raises(QueryFileError) as raised:
        read_queries(str(path))
    assert f"{path}:3" in str(raised.value)
    assert "malformed JSON" in str(raised.value)


def test_read_queries_malformed_tsv_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "q.tsv", "q1\tfine\nno tab on this line\n")
    with pytest.raises(QueryFileError, match=re.escape(f"{path}:2")):
        read_queries(str(path))


@pytest.mark.parametrize(("name", "content"), [("q.jsonl", ""), ("q.tsv", ""), ("blank.jsonl", "\n  \n")])
def test_read_queries_empty_file(tmp_path, name, content):
    path = write(tmp_path / name, content)
    with pytest.raises(QueryFileError) as raised:
        read_queries(str(path))
    assert str(path) in str(raised.value)
    assert "no queries" in str(raised.value)


def test_read_queries_missing_file(tmp_path):
    with pytest.raises(QueryFileError, match="missing.jsonl"):
        read_queries(str(tmp_path / "missing.jsonl"))


def test_read_queries_truncated_jsonl_gz(tmp_path):
    packed = gzip.compress(jsonl_bytes([{"_id": f"q{i}", "text": _noise(i)} for i in range(300)]))
    path = write(tmp_path / "q.jsonl.gz", packed[: len(packed) // 2])
    with pytest.raises(QueryFileError, match="gzip"):
        read_queries(str(path))


def test_read_queries_truncated_tsv_gz(tmp_path):
    packed = gzip.compress("".join(f"q{i}\t{_noise(i)}\n" for i in range(300)).encode())
    path = write(tmp_path / "q.tsv.gz", packed[: len(packed) // 2])
    with pytest.raises(QueryFileError):
        read_queries(str(path))


def test_read_queries_tsv_empty_id_is_rejected(tmp_path):
    path = write(tmp_path / "q.tsv", "q1\tfine\n\tno id\n")
    with pytest.raises(QueryFileError, match=re.escape(f"{path}:2")):
        read_queries(str(path))
