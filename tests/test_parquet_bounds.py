"""A Parquet input's documents are bounded like every other input's ("runs that fail safe", point 2): a cell over
--max-document-bytes is skipped with its reason, and a page too large to unpack is never unpacked, so one huge
cell (or a row group of many large ones) cannot take the memory a whole row group would."""

from __future__ import annotations

import gzip
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bge_index.input import formats, parquet_pages
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
    fields, end = parquet_pages._thrift_struct(header, 0)
    assert (fields[2], fields[3], end) == (300, 200, len(header))
    with pytest.raises(IndexError):
        parquet_pages._thrift_struct(header[:-3], 0)


def _first_page(path: Path, group: int = 0, column: int = 0) -> int:
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(column)
    return min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o)


def test_a_page_header_claiming_endless_booleans_is_damaged_not_walked(tmp_path):
    # A page header whose first field is a list of about 2**62 booleans (a byte each, in a list): the reader
    # stepped over them without reading a byte, for ever. Now a size over the bytes left is a damaged header.
    path = tmp_path / "d.parquet"
    _write_row_groups(path, {"id": ["a", "b"], "text": ["hello world", "second doc"]})
    evil = bytes([0x19, 0xF1]) + bytes([0xFF] * 8 + [0x3F])
    data = bytearray(path.read_bytes())
    start = _first_page(path)
    data[start:start + len(evil)] = evil
    path.write_bytes(bytes(data))
    script = textwrap.dedent(f"""
        from bge_index.input.documents import iter_documents
        items = list(iter_documents([{str(path)!r}], max_document_bytes={MAX}))
        print([(type(i).__name__, getattr(i, "code", None)) for i in items])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([("Skipped", SkipReason.UNREADABLE_PARQUET)])


@pytest.mark.parametrize("element", [0x01, 0x02, 0x03, 0x07, 0x05, 0x0C])
def test_a_container_claiming_more_elements_than_bytes_left_is_cut_short(element):
    # bool, bool, i8, double, i32, struct elements: each takes a byte at least; a map's entries two
    def too_slow(*_):
        raise TimeoutError("still stepping over the claimed elements")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(5)
    try:
        for header in (bytes([0x19, 0xF0 | element]) + bytes([0xFF] * 8 + [0x3F]),
                       bytes([0x1B]) + bytes([0xFF] * 8 + [0x3F]) + bytes([(element << 4) | element])):
            with pytest.raises(IndexError):
                parquet_pages._thrift_struct(header + bytes(64), 0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class _Chunk:
    """A column chunk as a footer may claim it: the footer is written by whoever wrote the file."""

    def __init__(self, start: int, length: int, values: int = 10 ** 9):
        self.data_page_offset, self.total_compressed_size, self.num_values = start, length, values
        self.has_dictionary_page, self.dictionary_page_offset = False, None
        self.path_in_schema, self.compression = "text", "UNCOMPRESSED"


class _Leaf:
    max_repetition_level, physical_type, length = 0, "BYTE_ARRAY", 0


class _Group:
    def __init__(self, *chunks: _Chunk):
        self.chunks = chunks
        self.num_columns = len(chunks)

    def column(self, index: int) -> _Chunk:
        return self.chunks[index]


class _Schema:
    def column(self, index: int) -> _Leaf:
        return _Leaf()


def _tiny_pages(path: Path, pages: int) -> int:
    """A file of `pages` back-to-back empty data pages (a 17-byte header each) after the magic; their length."""
    header = bytes([0x15, 0x00, 0x15, 0x00, 0x15, 0x00, 0x2C, 0x15, 0x00, 0x15, 0x00, 0x15, 0x00, 0x15, 0x00,
                    0x00, 0x00])
    path.write_bytes(b"PAR1" + header * pages + b"PAR1")
    return len(header) * pages


def test_column_chunks_sharing_their_bytes_are_damaged_not_walked_again(tmp_path):
    # The footer may point any number of column chunks at the same pages: walking each took 0.25 s a MB of
    # headers, for ever more chunks. The chunks of a file are disjoint: together no longer than the file.
    path = tmp_path / "d.parquet"
    length = _tiny_pages(path, 60_000)  # about 1 MB of page headers
    size = path.stat().st_size
    with path.open("rb") as stream:
        walk = parquet_pages.FileWalk(size, formats.parquet_page_bound(MAX))
        assert parquet_pages.largest_pages(stream, _Group(_Chunk(4, length)), _Schema(), walk).largest == [0]
        walk = parquet_pages.FileWalk(size, formats.parquet_page_bound(MAX))
        started = time.monotonic()
        pages = parquet_pages.largest_pages(stream, _Group(*[_Chunk(4, length)] * 1000), _Schema(), walk)
        assert isinstance(pages, parquet_pages.DamagedPage) and "more bytes than the file" in str(pages)
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("start, length", [(-4, 20), (4, 10 ** 9), (10 ** 9, 17)])
def test_a_column_chunk_outside_the_file_is_damaged(tmp_path, start, length):
    path = tmp_path / "d.parquet"
    _tiny_pages(path, 10)
    with path.open("rb") as stream:
        walk = parquet_pages.FileWalk(path.stat().st_size, formats.parquet_page_bound(MAX))
        pages = parquet_pages.largest_pages(stream, _Group(_Chunk(start, length)), _Schema(), walk)
    assert isinstance(pages, parquet_pages.DamagedPage) and "outside the file" in str(pages)


def _one_row_of_repeated_tags(path: Path, copies: int) -> None:
    """One row whose `tags` list holds `copies` times one 1,000-byte string: a dictionary of one value and an
    RLE run of indices, a few kB on disk however many the copies."""
    indices = pa.array([0] * copies, pa.int32())
    tags = pa.ListArray.from_arrays(pa.array([0, copies], pa.int32()),
                                    pa.DictionaryArray.from_arrays(indices, pa.array(["x" * 1000])))
    pq.write_table(pa.table({"id": ["a"], "text": ["hello"], "tags": tags}), path, store_schema=False)


def test_a_list_column_that_would_decode_past_the_bound_is_not_read(tmp_path):
    path = tmp_path / "d.parquet"
    _one_row_of_repeated_tags(path, 300_000)  # 300 MB decoded
    assert path.stat().st_size < 10_000
    texts, skips = _read(path, max_document_bytes=MAX)
    assert texts == {}
    assert [(s.line, s.code, s.doc_id, s.hides_documents) for s in skips] == [
        (1, SkipReason.DOCUMENT_TOO_LARGE, "a", False)]
    assert "row group 0" in skips[0].reason and "'tags.list.element'" in skips[0].reason
    assert "row not read" in skips[0].reason


def test_reading_a_list_bomb_stays_small(tmp_path):
    # It raised the reader's peak by 1,442 MiB before the row was skipped for its metadata.
    path = tmp_path / "d.parquet"
    _one_row_of_repeated_tags(path, 300_000)
    small = tmp_path / "small.parquet"
    _one_row_of_repeated_tags(small, 1)
    script = textwrap.dedent(f"""
        from bge_index.input.documents import iter_documents

        def peak_kb():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

        list(iter_documents([{str(small)!r}], max_document_bytes={MAX}))
        before = peak_kb()
        items = list(iter_documents([{str(path)!r}], max_document_bytes={MAX}))
        assert [type(i).__name__ for i in items] == ["Skipped"], items
        print((peak_kb() - before) // 1024)
    """)
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) < 64


@pytest.mark.parametrize("compression", ["none", "snappy", "gzip", "zstd", "brotli", "lz4"])
def test_list_columns_of_a_small_vocabulary_are_read(tmp_path, compression):
    # 100,000 tags from a dictionary of 200 values of up to 60 bytes (about 10 kB): bounded by the dictionary
    # page's size, each tag could be 10 kB, 1 GB in all; by its longest value, 19 MB. They are read.
    path = tmp_path / "d.parquet"
    vocabulary = [f"{i:03d}" + "t" * (i % 58) for i in range(200)]
    rows = 20_000
    tags = [[vocabulary[(i * 7 + j) % 200] for j in range(5)] for i in range(rows)]
    pq.write_table(pa.table({"id": [str(i) for i in range(rows)], "text": ["t"] * rows, "tags": tags}), path,
                   compression=compression)
    items = list(iter_documents([str(path)], max_document_bytes=MAX))
    assert all(isinstance(i, Document) for i in items) and len(items) == rows
    assert items[7].metadata == {"tags": '["' + '", "'.join(tags[7]) + '"]'}


def test_a_flat_row_group_still_reads_in_large_batches(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(5000)], "text": ["t"] * 5000}), path)
    with formats.contextlib.ExitStack() as cleanup:
        parquet, stream = formats._open_parquet(path, cleanup)
        walk = parquet_pages.FileWalk(path.stat().st_size, formats.parquet_page_bound(MAX))
        pages = parquet_pages.largest_pages(stream, parquet.metadata.row_group(0), parquet.schema, walk)
    assert pages.repeated == [0, 0] and formats._batch_rows(pages.largest) == formats.PARQUET_BATCH_ROWS
