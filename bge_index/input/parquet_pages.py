"""Parquet page headers, read before Arrow reads a row group: what each column chunk would unpack.

A column chunk's size in the footer cannot tell one huge cell from many small
rows, and Arrow cannot skip a page: it unpacks a row group's pages whole. So
an input's row groups are first walked page header by page header (Thrift's
compact protocol, a few hundred bytes each), and `largest_pages` says the
largest page of each chunk and, for list and map columns, what all their
values could decode to; `input/formats.py` refuses a row group over its
bound before Arrow touches it.

Everything here distrusts the file: chunks must lie inside it and not share
bytes (`FileWalk`), every claimed size or count must fit in the bytes left,
and the walk costs at most the file's own size; anything else is a
`DamagedPage`, never a hang, a traceback or an allocation the file asks for.
"""

from __future__ import annotations

from typing import BinaryIO

# What a value of a list or map column may take once decoded besides its own bytes (Arrow's offsets and levels, a
# Python object, its share of the list or dict holding it): a row group of these is bounded by its values' count.
PARQUET_VALUE_BYTES = 128
# Bytes of dictionary pages (after decompression) whose longest value is looked up, a file: this plus 4 x its size
PARQUET_DICTIONARY_PARSE = 16 << 20


class DamagedPage(Exception):
    """A page header or column chunk that cannot be read: Arrow could not read that row group either."""


class GroupPages:
    """What the page headers of a row group tell, a number per column."""

    __slots__ = ("largest", "repeated")

    def __init__(self, largest: list[int], repeated: list[int]):
        self.largest = largest  # its largest page, compressed or not
        self.repeated = repeated  # a column with lists or maps: what all its values could decode to; 0 for others


class FileWalk:
    """What reading one file's page headers may still cost: its footer is written by whoever wrote the file.

    Column chunks lie inside the file and do not share bytes, so together they are no longer than the file, and
    each page header lies inside its chunk: the headers walked are no more bytes than the file (and no more
    pages than a fifth of them), whatever the footer claims. Dictionaries whose longest value is looked up are
    no more than PARQUET_DICTIONARY_PARSE and four times the file, unpacked.
    """

    def __init__(self, size: int, page_bound: int):
        self.size = size
        self.page_bound = page_bound
        self.chunk_bytes = size  # left to the column chunks not yet walked
        self.dictionary_bytes = PARQUET_DICTIONARY_PARSE + 4 * size


# Arrow reads a chunk up to 100 bytes past its claimed end (PARQUET-816: old parquet-mr left a header out)
_CHUNK_SLACK = 100
_FIXED_WIDTHS = {"BOOLEAN": 1, "INT32": 4, "FLOAT": 4, "INT64": 8, "DOUBLE": 8, "INT96": 12}
_DICTIONARY_ENCODINGS = {2, 8}  # PLAIN_DICTIONARY, RLE_DICTIONARY: each value one of the dictionary's
_PAGE_LONG_ENCODINGS = {0, 6}  # PLAIN, DELTA_LENGTH_BYTE_ARRAY: a page's values together no longer than the page


def largest_pages(stream: BinaryIO, row_group, schema, walk: FileWalk) -> GroupPages | DamagedPage:
    """The largest page of each column chunk of a row group, in bytes, compressed or not (from the page headers),
    and what the values of each column with lists or maps could decode to.

    Read from the headers alone (a few hundred bytes each), walking the chunk from page to page, so that a
    page is known before Arrow unpacks it: a chunk's total size does not tell one large cell from many rows.
    One row may hold all of a list column's values: they are counted from the data pages' headers, each value
    as long as the dictionary's longest (looked up in the dictionary page), or its type's width, or its page
    (PLAIN: the page's values together), plus PARQUET_VALUE_BYTES.
    A header or chunk that cannot be read (outside the file, sharing bytes with another: `FileWalk`) is returned
    as a DamagedPage (the rows before that row group are still read).
    """
    largest, repeated = [], []
    for column in range(row_group.num_columns):
        chunk = row_group.column(column)
        name = chunk.path_in_schema
        position = chunk.data_page_offset
        if chunk.has_dictionary_page and chunk.dictionary_page_offset and chunk.dictionary_page_offset < position:
            position = chunk.dictionary_page_offset
        end = position + chunk.total_compressed_size
        if position < 0 or chunk.total_compressed_size < 0 or end > walk.size:
            return DamagedPage(f"column chunk {name!r} (bytes {position:,} to {end:,}) lies outside the file "
                                f"of {walk.size:,} bytes")
        walk.chunk_bytes -= chunk.total_compressed_size
        if walk.chunk_bytes < 0:
            return DamagedPage(f"column chunks claim more bytes than the file holds (at {name!r}): they would "
                                "share them")
        limit = min(end + _CHUNK_SLACK, walk.size)
        leaf = schema.column(column)
        lists = leaf.max_repetition_level > 0
        fixed = leaf.physical_type == "FIXED_LEN_BYTE_ARRAY"
        width = max(leaf.length, 0) if fixed else _FIXED_WIDTHS.get(leaf.physical_type)
        longest: int | None = None  # of a list column's dictionary
        biggest, pages, decoded = 0, 0, 0
        while position < end:
            pages += 1
            if pages > chunk.num_values + 2:  # more pages than values (and a dictionary): no writer makes those
                return DamagedPage(f"row group column {name!r}: more pages than values")
            header = _page_header(stream, position, limit)
            if header is None:
                return DamagedPage(f"page header of column {name!r} at byte {position} is damaged")
            length, fields = header
            uncompressed, compressed = fields[2], fields[3]
            biggest = max(biggest, uncompressed, compressed)
            data = position + length
            if data + compressed > limit:
                return DamagedPage(f"page of column {name!r} at byte {position} runs past its column chunk")
            if lists and fields.get(1) == 2:  # a dictionary page
                found = width if width is not None else _longest_value(stream, data, fields, chunk.compression, walk)
                longest = max(longest or 0, found)
            elif lists and fields.get(1) in (0, 3):  # a data page, version 1 or 2
                values = _decoded_values(fields, width, longest)
                if values is None:
                    return DamagedPage(f"data page header of column {name!r} at byte {position} is damaged")
                decoded += values
            position = data + compressed
        largest.append(biggest)
        repeated.append(decoded)
    return GroupPages(largest, repeated)


def _decoded_values(fields: dict, width: int | None, longest: int | None) -> int | None:
    """What the values of the data page with these header fields could decode to; None if it has no count."""
    version_1 = fields.get(1) == 0
    header = fields.get(5 if version_1 else 8)  # DataPageHeader, DataPageHeaderV2
    if not isinstance(header, dict):
        return None
    values, encoding = header.get(1), header.get(2 if version_1 else 4)  # num_values (nulls included), encoding
    if not isinstance(values, int) or values < 0:
        return None
    page = fields[2]
    if width is not None:
        each = width
    elif encoding in _DICTIONARY_ENCODINGS and longest is not None:
        each = longest
    elif encoding in _PAGE_LONG_ENCODINGS:
        return page + values * PARQUET_VALUE_BYTES
    else:  # DELTA_BYTE_ARRAY (a value may repeat the one before), or a dictionary never given: the page, each
        each = page
    return values * (each + PARQUET_VALUE_BYTES)


# Parquet's codecs as pyarrow names them, and as its Codec does (Arrow's "LZ4" is Parquet's LZ4_RAW; Parquet's
# LZ4, Hadoop's framing, is "UNKNOWN" to pyarrow and not looked into)
_CODECS = {"UNCOMPRESSED": None, "SNAPPY": "snappy", "GZIP": "gzip", "BROTLI": "brotli", "ZSTD": "zstd",
           "LZ4": "lz4_raw"}


def _longest_value(stream: BinaryIO, position: int, fields: dict, compression: str, walk: FileWalk) -> int:
    """The longest value in bytes of the (BYTE_ARRAY, PLAIN) dictionary page whose data is at `position`.

    Where it is not looked up (a codec not handled, a page over the page bound or the walk's dictionary bytes,
    a page not as its header says: Arrow fails on it too), what its header allows: each value takes 4 bytes
    besides its own.
    """
    import pyarrow as pa

    uncompressed, compressed = fields[2], fields[3]
    header = fields.get(7)  # DictionaryPageHeader
    entries = header.get(1) if isinstance(header, dict) else None
    if not isinstance(entries, int) or entries < 1:
        return uncompressed
    allowed = max(0, uncompressed - 4 * entries)
    if (compression not in _CODECS or max(uncompressed, compressed) > walk.page_bound
            or uncompressed > walk.dictionary_bytes):
        return allowed
    walk.dictionary_bytes -= uncompressed
    stream.seek(position)
    data = stream.read(compressed)
    if _CODECS[compression] is not None:
        try:
            data = pa.Codec(_CODECS[compression]).decompress(data, decompressed_size=uncompressed, asbytes=True)
        except (pa.ArrowException, ValueError, OSError):
            return allowed
    if len(data) != uncompressed:
        return allowed
    longest = at = 0
    for _ in range(entries):
        if at + 4 > len(data):
            return allowed
        size = int.from_bytes(data[at:at + 4], "little")
        longest = max(longest, size)
        at += 4 + size
    return longest if at <= len(data) else allowed


_PAGE_HEADER_MAX = 16 << 20  # Arrow's own bound on a page header (statistics may make one long)


def _page_header(stream: BinaryIO, position: int, limit: int) -> tuple[int, dict] | None:
    """(header length, fields) of the page at `position`, read no further than `limit`; None if it is not one.

    Its fields 2 and 3, the uncompressed and compressed sizes, are non-negative integers.
    """
    if position < 0 or position >= limit:
        return None
    window = min(limit - position, _PAGE_HEADER_MAX)
    want = min(1024, window)
    while True:
        stream.seek(position)
        data = stream.read(want)
        try:
            fields, length = _thrift_struct(data, 0)
        except IndexError:  # the header goes on past what was read
            if len(data) < want or want >= window:
                return None
            want = min(want * 4, window)
            continue
        except ValueError:
            return None
        uncompressed, compressed = fields.get(2), fields.get(3)  # PageHeader's uncompressed/compressed_page_size
        if not isinstance(uncompressed, int) or not isinstance(compressed, int) or uncompressed < 0 or compressed < 0:
            return None
        return length, fields


# Thrift's compact protocol, read just far enough for a Parquet PageHeader: a struct's integer fields by their
# ids; strings, doubles and containers are stepped over (statistics, encodings). pyarrow does not expose pages.
# Every value takes a byte at least (a boolean in a list or map too), so no count claimed is over the bytes left:
# stepping over a header is bounded by its bytes, whatever it claims.
def _thrift_struct(data: bytes, position: int, depth: int = 0) -> tuple[dict[int, object], int]:
    """The fields of the struct at `position` (integers and nested structs; others None) and where it ends.

    IndexError when `data` ends inside it (or it claims more elements than bytes left); ValueError when it is
    no valid struct.
    """
    if depth > 16:
        raise ValueError("nested too deeply")
    fields: dict[int, object] = {}
    field_id = 0
    while True:
        byte = data[position]
        position += 1
        if byte == 0:  # STOP
            return fields, position
        kind, delta = byte & 0x0F, byte >> 4
        if delta:
            field_id += delta
        else:
            raw, position = _thrift_varint(data, position)
            field_id = (raw >> 1) ^ -(raw & 1)
        fields[field_id], position = _thrift_value(data, position, kind, depth)


# Elements of a list that take a fixed number of bytes: booleans (a byte each, in a list), i8, double
_THRIFT_WIDTHS = {1: 1, 2: 1, 3: 1, 7: 8}


def _thrift_value(data: bytes, position: int, kind: int, depth: int, in_container: bool = False) -> tuple[object, int]:
    if depth > 16:  # lists of lists...: never Python's recursion limit
        raise ValueError("nested too deeply")
    if kind in (1, 2):  # booleans: in the field header, or a byte of their own in a list or map
        if in_container:
            return data[position] == 1, position + 1
        return kind == 1, position
    if kind == 3:  # i8
        return data[position], position + 1
    if kind in (4, 5, 6):  # i16, i32, i64: zigzag varints
        raw, position = _thrift_varint(data, position)
        return (raw >> 1) ^ -(raw & 1), position
    if kind == 7:  # double
        if position + 8 > len(data):
            raise IndexError
        return None, position + 8
    if kind == 8:  # binary
        size, position = _thrift_varint(data, position)
        if position + size > len(data):
            raise IndexError
        return None, position + size
    if kind in (9, 10):  # list, set
        header = data[position]
        position += 1
        size, element = header >> 4, header & 0x0F
        if size == 15:
            size, position = _thrift_varint(data, position)
        if size > len(data) - position:  # each element takes a byte at least
            raise IndexError
        if element in _THRIFT_WIDTHS:
            position += size * _THRIFT_WIDTHS[element]
            if position > len(data):
                raise IndexError
            return None, position
        for _ in range(size):
            _, position = _thrift_value(data, position, element, depth + 1, in_container=True)
        return None, position
    if kind == 11:  # map
        size, position = _thrift_varint(data, position)
        if size:
            if 1 + 2 * size > len(data) - position:  # the types' byte, then a byte at least a key and a value
                raise IndexError
            types = data[position]
            position += 1
            for _ in range(size):
                _, position = _thrift_value(data, position, types >> 4, depth + 1, in_container=True)
                _, position = _thrift_value(data, position, types & 0x0F, depth + 1, in_container=True)
        return None, position
    if kind == 12:  # struct
        return _thrift_struct(data, position, depth + 1)
    raise ValueError(f"no Thrift type {kind}")


def _thrift_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


# ---------------------------------------------------------------------------
# Query files


# The fields of a query record (a --queries JSONL line, a POST /search query): BEIR's, and common others.
