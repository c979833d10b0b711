"""One huge document never stops a run nor takes unbounded memory (issue 18, point 4)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from bge_index.input.documents import iter_documents
from bge_index.input.types import Document, Skipped, SkipReason
from helpers import invoke, ok


def _read(*inputs, **options):
    items = list(iter_documents([str(i) for i in inputs], **options))
    return ({d.id: d.text for d in items if isinstance(d, Document)}, [s for s in items if isinstance(s, Skipped)])


def _gzip_of_zero_text(path: Path, megabytes: int) -> None:
    """A .gz of `megabytes` MiB of 'a's, a few hundred KB on disk."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"a" * (1 << 20)
    with open(path, "wb") as out:
        for _ in range(megabytes):
            out.write(packer.compress(block))
        out.write(packer.flush())


def test_a_gzip_bomb_is_skipped_and_the_good_file_indexed(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    _gzip_of_zero_text(docs / "bomb.txt.gz", 40)
    (docs / "good.txt").write_text("a good document")
    texts, skips = _read(docs, max_document_bytes=8 << 20)
    assert texts == {"good.txt": "a good document"}
    assert [(s.code, s.doc_id) for s in skips] == [(SkipReason.DOCUMENT_TOO_LARGE, "bomb.txt.gz")]
    assert "--max-document-bytes" in skips[0].reason


def test_a_long_json_line_is_skipped_and_the_next_line_read(tmp_path):
    path = tmp_path / "d.jsonl"
    with open(path, "w") as out:
        out.write(json.dumps({"id": "a", "text": "first"}) + "\n")
        out.write(json.dumps({"id": "big", "text": "x" * 5000}) + "\n")
        out.write(json.dumps({"id": "c", "text": "third"}) + "\n")
    texts, skips = _read(path, max_document_bytes=1000)
    assert texts == {"a": "first", "c": "third"}
    assert [(s.line, s.code, s.hides_documents) for s in skips] == [(2, SkipReason.DOCUMENT_TOO_LARGE, True)]
    texts, skips = _read(path)  # the default bound is far above 5 KB
    assert set(texts) == {"a", "big", "c"} and skips == []


def test_a_huge_csv_field_stops_the_file_not_the_run(tmp_path):
    (tmp_path / "d.csv").write_text('id,text\na,first\nb,"' + "y" * 5000 + '"\nc,third\n')
    (tmp_path / "e.txt").write_text("another file")
    texts, skips = _read(tmp_path / "d.csv", tmp_path / "e.txt", max_document_bytes=1000)
    assert texts == {"a": "first", str(tmp_path / "e.txt"): "another file"}
    assert [(s.line, s.code, s.hides_documents) for s in skips] == [(3, SkipReason.DOCUMENT_TOO_LARGE, True)]


def test_a_long_tsv_line_is_never_held_whole(tmp_path):
    (tmp_path / "d.tsv").write_text("id\ttext\na\tfirst\nb\t" + "z" * 5000 + "\n")
    texts, skips = _read(tmp_path / "d.tsv", max_document_bytes=1000)
    assert texts == {"a": "first"} and [s.code for s in skips] == [SkipReason.DOCUMENT_TOO_LARGE]


def test_a_large_parquet_cell_is_skipped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["small", "w" * 5000]}), tmp_path / "d.parquet")
    texts, skips = _read(tmp_path / "d.parquet", max_document_bytes=1000)
    assert texts == {"a": "small"} and [(s.code, s.doc_id) for s in skips] == [(SkipReason.DOCUMENT_TOO_LARGE, "b")]


def test_cli_run_with_a_bomb_indexes_the_rest(tmp_path, tiny_model):
    docs = tmp_path / "docs"
    docs.mkdir()
    _gzip_of_zero_text(docs / "bomb.txt.gz", 12)
    (docs / "good.txt").write_text("the moon recedes")
    result = invoke("index", docs, "--out", tmp_path / "idx", "--model", tiny_model, "--max-document-bytes", 1 << 20)
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output and "--max-document-bytes" in result.output
    hits = ok("search", tmp_path / "idx", "moon", "--format", "json").stdout
    assert "good.txt" in hits


@pytest.mark.slow
def test_peak_memory_of_a_gzip_bomb_and_a_huge_field_stays_bounded(tmp_path):
    # 512 MiB unpacked and a 512 MiB CSV field, read with the default 64 MiB bound: the reading process's peak
    # RSS stays under 700 MB (imports included), where reading them whole took 6-7 GB.
    _gzip_of_zero_text(tmp_path / "bomb.txt.gz", 512)
    with open(tmp_path / "d.csv", "w") as out:
        out.write('id,text\na,"')
        chunk = "q" * (1 << 20)
        for _ in range(512):
            out.write(chunk)
        out.write('"\n')
    script = textwrap.dedent(f"""
        from bge_index.input.documents import iter_documents
        items = list(iter_documents([{str(tmp_path / 'bomb.txt.gz')!r}, {str(tmp_path / 'd.csv')!r}]))
        assert [type(i).__name__ for i in items] == ["Skipped", "Skipped"], items
        # VmHWM: this program's own peak (ru_maxrss starts at the parent pytest process's across fork and exec)
        with open("/proc/self/status") as status:
            print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) // 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) < 700, f"peak RSS {done.stdout.strip()} MB"
