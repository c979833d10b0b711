"""A Parquet input's documents are bounded like every other input's ("runs that fail safe", point 2): a cell over
--max-document-bytes is skipped with its reason, and a page too large to unpack is never unpacked, so one huge
cell (or a row group of many large ones) cannot take the memory a whole row group would."""

from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bge_index.input import formats
from bge_index.input.documents import iter_documents
from bge_index.input.types import Document, Skipped, SkipReason

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

MAX = 1 << 20  # --max-document-bytes in these tests: pages may unpack to 64 MiB (the floor)
HUGE = 80 << 20  # one cell past the largest page a 1 MiB bound lets through


def _read(*inputs, **options):
    items = list(iter_documents([str(i) for i in inputs], **options))
    return ({d.id: d.text for d in items if isinstance(d, Document)}, [s for s in items if isinstance(s, Skipped)])


def _write_row_groups(path: Path, *groups: dict) -> None:
    """A Parquet file with one row group per dict of columns (as writers that cut row groups by size make them)."""
    schema = pa.schema([(name, pa.string()) for name in groups[0]])
    with pq.ParquetWriter(path, schema) as writer:
        for columns in groups:
            writer.write_table(pa.table(columns, schema=schema))


@pytest.fixture(scope="module")
def huge_cell(tmp_path_factory) -> Path:
    """Rows a, b; then the row `huge` with an 80 MiB text, alone in its row group; then rows c, d."""
    path = tmp_path_factory.mktemp("parquet") / "d.parquet"
    _write_row_groups(path, {"id": ["a", "b"], "text": ["first", "second"]}, {"id": ["huge"], "text": ["h" * HUGE]},
                      {"id": ["c", "d"], "text": ["third", "fourth"]})
    return path


def test_the_page_bound_follows_the_document_bound():
    assert formats.parquet_page_bound(MAX) == formats.PARQUET_PAGE_FLOOR == 64 << 20
    assert formats.parquet_page_bound(64 << 20) == formats.PARQUET_PAGE_DOCUMENTS * (64 << 20)
    assert formats.parquet_page_bound(MAX) < HUGE


@pytest.mark.parametrize("suffix", [".parquet", ".parquet.gz"])
def test_a_huge_cell_is_skipped_with_its_reason_and_the_other_rows_read(huge_cell, tmp_path, suffix):
    path = huge_cell
    if suffix == ".parquet.gz":
        path = tmp_path / "d.parquet.gz"
        path.write_bytes(gzip.compress(huge_cell.read_bytes(), compresslevel=1))
    texts, skips = _read(path, max_document_bytes=MAX)
    assert texts == {"a": "first", "b": "second", "c": "third", "d": "fourth"}
    assert [(s.location, s.code, s.doc_id, s.hides_documents) for s in skips] == [
        (f"{path}:3", SkipReason.DOCUMENT_TOO_LARGE, "huge", False)]  # its indexed copy, if any, is kept
    assert "--max-document-bytes" in skips[0].reason


def test_reading_a_huge_cell_never_unpacks_it(huge_cell, tmp_path):
    # The peak RSS of the reading process grows by less than half the cell; reading the row group whole
    # (as Arrow did before its page was looked at) grew it by about four times the cell (over 300 MB).
    small = tmp_path / "small.parquet"
    _write_row_groups(small, {"id": ["w"], "text": ["warm-up"]})
    script = textwrap.dedent(f"""
        import resource
        from bge_index.input.documents import iter_documents

        def peak_kb():
            # This process's own peak: getrusage's ru_maxrss starts at the parent's (this pytest process, which
            # built the huge cell) across fork and exec on Linux; /proc's VmHWM is the new program's alone.
            try:
                with open("/proc/self/status") as status:
                    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        # the first Parquet read starts Arrow's thread pools: paid before the measure
        list(iter_documents([{str(small)!r}], max_document_bytes={MAX}))
        before = peak_kb()
        items = list(iter_documents([{str(huge_cell)!r}], max_document_bytes={MAX}))
        after = peak_kb()
        assert [type(i).__name__ for i in items] == ["Document"] * 2 + ["Skipped"] + ["Document"] * 2, items
        print((after - before) // 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grown = int(done.stdout.strip())
    assert grown < (HUGE >> 20) // 2, f"peak RSS grew by {grown} MB reading an {HUGE >> 20} MiB cell"


def test_rows_sharing_a_row_group_with_a_huge_cell_are_skipped_with_their_ids(tmp_path):
    # Arrow cannot skip a page: the whole row group is not read, and each of its rows says why.
    path = tmp_path / "d.parquet"
    _write_row_groups(path, {"id": ["a", "huge", "c"], "text": ["first", "h" * HUGE, "third"]},
                      {"id": ["d"], "text": ["fourth"]})
    texts, skips = _read(path, max_document_bytes=MAX)
    assert texts == {"d": "fourth"}
    assert [(s.line, s.code, s.doc_id, s.hides_documents) for s in skips] == [
        (1, SkipReason.DOCUMENT_TOO_LARGE, "a", False), (2, SkipReason.DOCUMENT_TOO_LARGE, "huge", False),
        (3, SkipReason.DOCUMENT_TOO_LARGE, "c", False)]
    assert "row group 0" in skips[0].reason and "row not read" in skips[0].reason


def test_a_huge_id_cell_skips_its_rows_as_hiding_documents(tmp_path):
    path = tmp_path / "d.parquet"
    _write_row_groups(path, {"id": ["a"], "text": ["first"]}, {"id": ["i" * HUGE, "b"], "text": ["x", "y"]})
    texts, skips = _read(path, max_document_bytes=MAX)
    assert texts == {"a": "first"}
    assert [(s.line, s.code, s.doc_id, s.hides_documents) for s in skips] == [
        (2, SkipReason.DOCUMENT_TOO_LARGE, None, True), (3, SkipReason.DOCUMENT_TOO_LARGE, None, True)]


def test_large_pages_make_small_batches(tmp_path, monkeypatch):
    # 2,000 distinct 4 KiB texts: pyarrow writes about 4 MiB a page. With 8 MiB a batch, a batch holds two rows
    # at most, where 1,024 rows (4 MiB each, by the pages' bound) would have been read at once.
    path = tmp_path / "d.parquet"
    rows = 2000
    pq.write_table(pa.table({"id": [str(i) for i in range(rows)], "text": [f"{i:06d}" + "t" * 4090 for i in range(rows)]}),
                   path)
    monkeypatch.setattr(formats, "PARQUET_BATCH_BYTES", 8 << 20)
    sizes: list[int] = []
    real = pq.ParquetFile.iter_batches

    def recording(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            sizes.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    texts, skips = _read(path, max_document_bytes=MAX)
    assert len(texts) == rows and skips == []
    assert sum(sizes) == rows and max(sizes) <= 2


def test_a_cell_over_the_bound_in_bytes_is_skipped(tmp_path):
    # 600 characters, 1,200 bytes of UTF-8: the bound is in bytes, as for every other input
    path = tmp_path / "d.parquet"
    _write_row_groups(path, {"id": ["a", "b"], "text": ["small", "é" * 600]})
    texts, skips = _read(path, max_document_bytes=1000)
    assert texts == {"a": "small"}
    assert [(s.line, s.code, s.doc_id) for s in skips] == [(2, SkipReason.DOCUMENT_TOO_LARGE, "b")]


def test_a_damaged_page_header_skips_the_rest_of_the_file(tmp_path):
    path = tmp_path / "d.parquet"
    _write_row_groups(path, {"id": ["a"], "text": ["first"]}, {"id": ["b"], "text": ["second"]})
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(1)
    start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o)
    data = bytearray(path.read_bytes())
    data[start:start + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    items = list(iter_documents([str(path)], max_document_bytes=MAX))
    assert isinstance(items[0], Document) and items[0].id == "a"
    assert [(s.code, s.hides_documents) for s in items[1:]] == [(SkipReason.UNREADABLE_PARQUET, True)]


def test_the_page_header_reader_steps_over_what_it_does_not_need():
    # PageHeader{type=0, uncompressed=300, compressed=200, data_page_header{num_values=3, statistics{max=b"zz"}}}
    header = bytes([0x15, 0x00, 0x15, 0xD8, 0x04, 0x15, 0x90, 0x03, 0x2C, 0x15, 0x06, 0x15, 0x00, 0x15, 0x00, 0x15,
                    0x00, 0x1C, 0x18, 0x02]) + b"zz" + bytes([0x00, 0x00, 0x00])
    fields, end = formats._thrift_struct(header, 0)
    assert (fields[2], fields[3], end) == (300, 200, len(header))
    with pytest.raises(IndexError):
        formats._thrift_struct(header[:-3], 0)
