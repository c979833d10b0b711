"""The on-disk format: schema, shard splitting, atomic publish, readers and their errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import load_vectors

from bge_index.errors import IndexFormatError
from bge_index.store.manifest import FORMAT_VERSION, Manifest, read_manifest
from bge_index.store.names import MANIFEST_FILE
from bge_index.store.shard_reader import RowLocation
from bge_index.store.files import file_sha256
from bge_index.store.shard_reader import read_rows, verify_index
from bge_index.store.shard_writer import IndexWriter, RowBatch

DIM, COLBERT_DIM = 8, 4


def make_rows(start: int, count: int, colbert: bool = False, seed: int = 0) -> RowBatch:
    rng = np.random.default_rng(seed + start)
    dense = rng.normal(size=(count, DIM)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    sparse = []
    for i in range(count):
        ids = np.sort(rng.choice(1000, size=i % 5, replace=False)).astype(np.uint32)  # row 0 has no tokens
        sparse.append((ids, rng.random(len(ids)).astype(np.float32) + 0.01))
    colbert_vectors = [rng.normal(size=(1 + i % 3, COLBERT_DIM)).astype(np.float32) for i in range(count)] \
        if colbert else None
    return RowBatch([f"doc-{start + i}" for i in range(count)], [f"hash-{start + i}" for i in range(count)],
                    [f"text {start + i}" for i in range(count)], dense, sparse, colbert_vectors)


def new_manifest(colbert: bool = False, store_text: bool = True, generation: int = 1) -> Manifest:
    return Manifest(model={"name": "test-model", "revision": None, "sha256": "ab" * 32, "files": {}},
                    dense_dim=DIM, colbert_dim=COLBERT_DIM if colbert else None, vocab_size=1000,
                    store_text=store_text, generation=generation)


def write_index(index_dir, batches, shard_rows=100, **manifest_options) -> Manifest:
    writer = IndexWriter(index_dir, new_manifest(**manifest_options), shard_rows)
    for batch in batches:
        writer.write(batch)
    return writer.commit()


def test_round_trip_splits_shards_and_keeps_every_row(tmp_path):
    batches = [make_rows(0, 7), make_rows(7, 10), make_rows(17, 6)]
    manifest = write_index(tmp_path, batches, shard_rows=5)
    assert [s.rows for s in manifest.shards] == [5, 5, 5, 5, 3]
    assert manifest.documents == 23
    vectors = load_vectors(tmp_path, read_manifest(tmp_path))
    assert list(vectors.ids) == [f"doc-{i}" for i in range(23)]
    expected_dense = np.concatenate([b.dense for b in batches]).astype(np.float16)
    assert vectors.dense.dtype == np.float16
    np.testing.assert_array_equal(vectors.dense, expected_dense)
    expected_sparse = [pair for b in batches for pair in b.sparse]
    for row, (ids, weights) in enumerate(expected_sparse):
        got_ids, got_weights = vectors.sparse_row(row)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_weights, weights)


def test_schema_is_the_documented_one(tmp_path):
    manifest = write_index(tmp_path, [make_rows(0, 3, colbert=True)], colbert=True)
    schema = pq.read_schema(tmp_path / manifest.shards[0].file)
    assert schema.names == ["id", "content_hash", "text", "dense", "sparse", "colbert", "source", "source_line", "metadata"]
    assert str(schema.field("dense").type) == f"fixed_size_list<element: halffloat>[{DIM}]"
    assert str(schema.field("sparse").type) == "struct<indices: list<element: uint32> not null, values: list<element: float> not null>"
    assert str(schema.field("colbert").type) == f"list<element: fixed_size_list<element: halffloat>[{COLBERT_DIM}]>"
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert data["format"] == "bge-index" and data["format_version"] == FORMAT_VERSION
    assert data["shards"][0]["sha256"] == file_sha256(tmp_path / manifest.shards[0].file)


def test_no_text_column_when_text_not_stored(tmp_path):
    manifest = write_index(tmp_path, [make_rows(0, 3)], store_text=False)
    assert "text" not in pq.read_schema(tmp_path / manifest.shards[0].file).names


def test_read_rows_fetches_text_and_colbert_across_shards(tmp_path):
    batches = [make_rows(0, 9, colbert=True)]
    write_index(tmp_path, batches, shard_rows=4, colbert=True)
    manifest = read_manifest(tmp_path)
    # (shard number, row in shard) with 4 rows a shard: rows 8, 0 and 5 of the input.
    assert read_rows(tmp_path, manifest, [(2, 0), (0, 0), (1, 1)], "text") == ["text 8", "text 0", "text 5"]
    matrices = read_rows(tmp_path, manifest, [(1, 1), (0, 1)], "colbert")
    for got, row in zip(matrices, [5, 1]):
        np.testing.assert_allclose(got, batches[0].colbert[row].astype(np.float16).astype(np.float32))


def replacing_writer(index_dir, base, generation, rows, shard_rows):
    """A writer for the next generation that adds `rows` and retires every row of `base`."""
    writer = IndexWriter(index_dir, new_manifest(generation=generation), shard_rows=shard_rows, base=base)
    writer.write(rows)
    for shard in base.shards:
        for row in range(shard.rows):
            writer.delete(RowLocation(shard.file, row))
    return writer


def test_readers_see_old_index_until_commit(tmp_path):
    base = write_index(tmp_path, [make_rows(0, 4)], generation=1)
    writer = replacing_writer(tmp_path, base, 2, make_rows(100, 6), shard_rows=2)
    # New shards exist on disk but the manifest still describes the old index.
    assert read_manifest(tmp_path).documents == 4
    assert list(load_vectors(tmp_path, read_manifest(tmp_path)).ids) == [f"doc-{i}" for i in range(4)]
    writer.commit()
    assert list(load_vectors(tmp_path, read_manifest(tmp_path)).ids) == [f"doc-{i}" for i in range(100, 106)]
    assert not list(tmp_path.glob(".*.tmp"))


def test_files_of_two_generations_ago_are_removed(tmp_path):
    first = write_index(tmp_path, [make_rows(0, 4)], generation=1)
    second = replacing_writer(tmp_path, first, 2, make_rows(10, 2), shard_rows=10).commit()
    # The previous state's files stay for readers that just read the old manifest, in retired/: out of the
    # documented glob `INDEX/shard-*.parquet` (issue 20: other tools saw merged-away shards)...
    assert not (tmp_path / first.shards[0].file).exists()
    assert (tmp_path / "retired" / first.shards[0].file).exists()
    assert sorted(p.name for p in tmp_path.glob("shard-*.parquet")) == [s.file for s in second.shards]
    third_writer = IndexWriter(tmp_path, new_manifest(generation=3), shard_rows=10, base=second)
    third_writer.write(make_rows(20, 1))
    third_writer.commit()
    # ...and go once a newer state replaces that one.
    assert not (tmp_path / "retired" / first.shards[0].file).exists()
    assert (tmp_path / second.shards[0].file).exists()


def test_deletion_sets_mask_rows_and_compaction_rewrites_mostly_dead_shards(tmp_path):
    base = write_index(tmp_path, [make_rows(0, 10)], shard_rows=5)  # two shards of 5
    writer = IndexWriter(tmp_path, new_manifest(generation=2), shard_rows=5, base=base)
    writer.delete(RowLocation(base.shards[0].file, 1))  # 1 of 5 dead: a deletion set
    for row in (0, 2, 3):
        writer.delete(RowLocation(base.shards[1].file, row))  # 3 of 5 dead: compacted
    manifest = writer.commit()
    assert manifest.documents == 6
    first = manifest.shards[0]
    assert first.file == base.shards[0].file and first.deleted_rows == 1
    assert first.deleted_sha256 == file_sha256(tmp_path / first.deleted_file)
    assert base.shards[1].file not in {s.file for s in manifest.shards}
    ids = list(load_vectors(tmp_path, read_manifest(tmp_path)).ids)
    assert ids == ["doc-0", "doc-2", "doc-3", "doc-4", "doc-6", "doc-9"]
    assert verify_index(tmp_path) == []


def test_verify_names_the_damaged_file(tmp_path):
    manifest = write_index(tmp_path, [make_rows(0, 6)], shard_rows=3)
    assert verify_index(tmp_path) == []
    damaged = tmp_path / manifest.shards[1].file
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    problems = verify_index(tmp_path)
    assert len(problems) == 1 and manifest.shards[1].file in problems[0] and "SHA-256" in problems[0]
    damaged.unlink()
    assert "missing shard" in verify_index(tmp_path)[0]


def test_abort_leaves_previous_index_untouched(tmp_path):
    write_index(tmp_path, [make_rows(0, 4)], generation=1)
    before = sorted(p.name for p in tmp_path.iterdir())
    writer = IndexWriter(tmp_path, new_manifest(generation=2), shard_rows=2)
    writer.write(make_rows(100, 5))
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert read_manifest(tmp_path).documents == 4


def test_not_an_index_and_damaged_index_are_clear_errors(tmp_path):
    with pytest.raises(IndexFormatError, match="no such index folder"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(IndexFormatError, match="not a bge-index index"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(IndexFormatError, match="unreadable manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(IndexFormatError, match="not a bge-index manifest"):
        read_manifest(tmp_path)


def test_future_format_version_is_refused(tmp_path):
    write_index(tmp_path, [make_rows(0, 2)])
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match=f"format version {FORMAT_VERSION + 1}"):
        read_manifest(tmp_path)


def test_truncated_shard_is_named_in_the_error(tmp_path):
    manifest = write_index(tmp_path, [make_rows(0, 6)], shard_rows=3)
    damaged = tmp_path / manifest.shards[1].file
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(IndexFormatError, match=manifest.shards[1].file):
        load_vectors(tmp_path, read_manifest(tmp_path))


def test_empty_index_loads(tmp_path):
    manifest = write_index(tmp_path, [])
    assert manifest.documents == 0 and manifest.shards == []
    vectors = load_vectors(tmp_path, read_manifest(tmp_path))
    assert len(vectors) == 0 and vectors.dense.shape == (0, DIM)


def test_abort_after_the_switch_keeps_the_published_index(tmp_path):
    writer = IndexWriter(tmp_path, new_manifest(), shard_rows=3)
    writer.write(make_rows(0, 5))
    writer.commit()
    writer.abort()  # e.g. a second Ctrl-C landing during cleanup after the switch
    assert verify_index(tmp_path) == []
    assert read_manifest(tmp_path).documents == 5


def test_damaged_deletion_set_is_a_clear_error(tmp_path):
    base = write_index(tmp_path, [make_rows(0, 6)], shard_rows=6)
    writer = IndexWriter(tmp_path, new_manifest(generation=2), shard_rows=6, base=base)
    writer.delete(RowLocation(base.shards[0].file, 2))
    manifest = writer.commit()
    (tmp_path / manifest.shards[0].deleted_file).write_bytes(b"")
    with pytest.raises(IndexFormatError, match="deletion set"):
        load_vectors(tmp_path, read_manifest(tmp_path))
    assert "deletion set" in verify_index(tmp_path)[0]
