"""Inputs stay inside the inputs: a symbolic link out of an input folder is skipped, never read (issue 18)."""

from __future__ import annotations

import os
from pathlib import Path

from bge_index.input.documents import iter_documents
from bge_index.input.types import Document, Skipped, SkipReason


def _read(*inputs, **options):
    items = list(iter_documents([str(i) for i in inputs], **options))
    return ({d.id: d.text for d in items if isinstance(d, Document)}, [s for s in items if isinstance(s, Skipped)])


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    secret = tmp_path / "outside" / "shadow.txt"
    secret.parent.mkdir()
    secret.write_text("root:$6$secret-hash")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "good.txt").write_text("a good document")
    os.symlink(secret, docs / "x.txt")
    os.symlink(secret, docs / "sub" / "y.txt")
    os.symlink(docs / "good.txt", docs / "inside-link.txt")  # stays inside: read
    return docs, secret


def test_link_out_of_a_walked_folder_is_skipped_with_a_reason(tmp_path):
    docs, _ = _tree(tmp_path)
    texts, skips = _read(docs)
    assert texts == {"good.txt": "a good document", "inside-link.txt": "a good document"}
    assert sorted(s.code for s in skips) == [SkipReason.LINK_OUTSIDE_INPUTS] * 2
    assert all(not s.hides_documents for s in skips)  # a document it once gave is removed, not kept
    assert not any("secret" in s.reason for s in skips)


def test_link_out_of_a_glob_base_is_skipped(tmp_path):
    docs, _ = _tree(tmp_path)
    texts, skips = _read(f"{docs}/**/*.txt")
    assert "x.txt" not in texts and "sub/y.txt" not in texts and texts["good.txt"] == "a good document"
    assert {s.code for s in skips} == {SkipReason.LINK_OUTSIDE_INPUTS}


def test_follow_links_reads_them(tmp_path):
    docs, _ = _tree(tmp_path)
    texts, skips = _read(docs, follow_links=True)
    assert texts["x.txt"] == "root:$6$secret-hash" and texts["sub/y.txt"] == "root:$6$secret-hash"
    assert skips == []


def test_a_file_named_directly_is_read_where_it_is(tmp_path):
    _, secret = _tree(tmp_path)
    link = tmp_path / "named.txt"
    os.symlink(secret, link)
    texts, _ = _read(link)
    assert list(texts.values()) == ["root:$6$secret-hash"]


def test_link_to_another_index_file_is_never_read(tmp_path, tiny_model):
    from helpers import index
    other = tmp_path / "other-index"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("moon")
    index(corpus, other, tiny_model)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ok.json").write_text("{}")
    os.symlink(other / "manifest.json", docs / "manifest-link.jsonl")
    shard = next(other.glob("*.parquet"))
    (docs / "inner").mkdir()
    os.symlink(shard, docs / "inner" / "shard.parquet")
    texts, skips = _read(docs, follow_links=True)  # even when following links
    assert texts == {} and all(s.source.endswith("ok.json") for s in skips)


def test_cli_index_skips_the_link_and_search_cannot_return_it(tmp_path, tiny_model):
    from helpers import invoke, ok
    docs, _ = _tree(tmp_path)
    out = tmp_path / "idx"
    result = invoke("index", docs, "--out", out, "--model", tiny_model)
    assert result.exit_code in (0, 1), result.output
    assert "symbolic link out of the input folder" in result.output
    hits = ok("search", out, "secret hash", "--format", "json", "-k", "10").stdout
    assert "secret-hash" not in hits and "x.txt" not in hits


def _swap_after_the_path_check(monkeypatch, swap):
    """Run `swap()` right after the path-based link check passed once: an attacker racing the run."""
    from bge_index.input import formats

    checked = formats.is_inside
    done = []

    def racing(real, folder):
        inside = checked(real, folder)
        if inside and not done:
            done.append(True)
            swap()
        return inside

    monkeypatch.setattr(formats, "is_inside", racing)


def _secret_beside_a_document(tmp_path: Path) -> tuple[Path, Path]:
    """A secret outside the input folder, and the folder `docs` holding one innocent document, a.txt."""
    secret = tmp_path / "outside" / "shadow.txt"
    secret.parent.mkdir()
    secret.write_text("root:$6$secret-hash")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("an innocent document")
    return secret, docs


def test_a_file_swapped_for_a_link_after_the_check_is_not_read(tmp_path, monkeypatch):
    secret, docs = _secret_beside_a_document(tmp_path)

    def swap():
        (docs / "a.txt").unlink()
        os.symlink(secret, docs / "a.txt")

    _swap_after_the_path_check(monkeypatch, swap)
    texts, skips = _read(docs)
    assert "secret" not in repr(texts) and texts == {}
    assert [s.code for s in skips] == [SkipReason.LINK_OUTSIDE_INPUTS]


def test_a_folder_swapped_for_a_link_after_the_check_is_not_read(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.jsonl").write_text('{"id": "stolen", "text": "root:$6$secret-hash"}\n')
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "sub" / "notes.jsonl").write_text('{"id": "n1", "text": "a note"}\n')

    def swap():
        (docs / "sub").rename(tmp_path / "moved")
        os.symlink(outside, docs / "sub")

    _swap_after_the_path_check(monkeypatch, swap)
    texts, skips = _read(docs)
    assert texts == {} and [s.code for s in skips] == [SkipReason.LINK_OUTSIDE_INPUTS]


def test_a_file_replaced_between_the_check_and_the_reading_is_not_read(tmp_path, monkeypatch):
    """The descriptor checked is closed before the format reader opens the path again: that opening must be the
    same file, or the file is skipped (its documents kept, as for any file that could not be read)."""
    from bge_index.input import formats

    secret, docs = _secret_beside_a_document(tmp_path)
    checked = formats._opened_inside

    def then_swap(path, root):
        result = checked(path, root)
        Path(path).unlink()
        os.symlink(secret, path)
        return result

    monkeypatch.setattr(formats, "_opened_inside", then_swap)
    texts, skips = _read(docs)
    assert texts == {} and len(skips) == 1
    assert skips[0].hides_documents and "replaced while it was being read" in skips[0].reason


def test_a_file_that_cannot_be_opened_in_a_walked_folder_is_a_skip_not_a_crash(tmp_path, monkeypatch):
    """Found by review: the opened-file check ran outside the reading's error handling (EACCES, a file gone)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("readable")
    (docs / "b.txt").write_text("locked")
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if str(path).endswith("b.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    texts, skips = _read(docs)
    assert texts == {"a.txt": "readable"}
    assert [s.code for s in skips] == [SkipReason.UNREADABLE_FILE] and skips[0].hides_documents
    assert "Permission denied" in skips[0].reason
