"""Other tools see exactly the live rows: DuckDB and Polars over the documented globs (issue 20, point 1)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from helpers import index, invoke, live_texts, write_jsonl
from bge_index.store.shard_reader import verify_index

duckdb = pytest.importorskip("duckdb", reason="the test extra (duckdb) is not installed")
polars = pytest.importorskip("polars", reason="the test extra (polars) is not installed")

DUCKDB_LIVE_ROWS = """
    SELECT * EXCLUDE (filename, file_row_number)
    FROM read_parquet('{index}/shard-*.parquet', filename = true, file_row_number = true) AS s
    ANTI JOIN read_parquet('{index}/deletes-*.parquet') AS d
      ON parse_filename(s.filename) = d.shard AND s.file_row_number = d.pos
"""


def polars_live_rows(index_dir):
    """The README's Polars one-liner."""
    pl = polars
    shards = pl.scan_parquet(f"{index_dir}/shard-*.parquet", include_file_paths="path").with_columns(
        pl.col("path").str.extract(r"([^/]+)$").alias("shard"),
        pl.int_range(pl.len()).over("path").cast(pl.Int64).alias("pos"))
    deletes = pl.scan_parquet(f"{index_dir}/deletes-*.parquet")
    return shards.join(deletes, on=["shard", "pos"], how="anti").drop("path", "shard", "pos").collect()


def _records(n, edit=(), drop=(), extra=()):
    return ([{"id": f"d{i}", "text": f"document {i}" + (" edited" if i in edit else "")}
             for i in range(n) if i not in drop] + [{"id": f"new{i}", "text": f"new document {i}"} for i in extra])


def test_duckdb_and_polars_see_exactly_the_live_rows(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, _records(200))
    index(corpus, out, tiny_model, "--shard-rows", "64")
    # one edit, one deletion, one addition; then two small runs whose shards get merged
    write_jsonl(corpus, _records(200, edit={7}, drop={11}, extra=[0]))
    index(corpus, out, tiny_model, "--shard-rows", "64")
    for run in (1, 2, 3, 4):
        write_jsonl(corpus, _records(200, edit={7, 20 + run}, drop={11}, extra=range(run + 1)))
        index(corpus, out, tiny_model, "--shard-rows", "64")
    assert verify_index(out) == []
    expected = live_texts(out)
    assert len(expected) == 199 + 5
    # The naive glob over every Parquet file is what misled users: it holds dead rows and the deletes files.
    naive = duckdb.sql(f"select count(*) from read_parquet('{out}/shard-*.parquet')").fetchall()[0][0]
    assert naive > len(expected)
    rows = duckdb.sql(DUCKDB_LIVE_ROWS.format(index=out)).fetchall()
    columns = duckdb.sql(DUCKDB_LIVE_ROWS.format(index=out)).columns
    got = {row[columns.index("id")]: row[columns.index("text")] for row in rows}
    assert len(rows) == len(expected) and got == expected
    frame = polars_live_rows(out)
    assert dict(zip(frame["id"].to_list(), frame["text"].to_list())) == expected and frame.height == len(expected)
    # Merged-away shards wait in retired/ for one generation, out of the glob (they made the glob see 211 rows)
    from bge_index.store.manifest import read_manifest
    assert {p.name for p in out.glob("shard-*.parquet")} == {s.file for s in read_manifest(out).shards}
    assert (out / "retired").is_dir()


def test_export_parquet_writes_the_live_rows_as_one_table(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, _records(30))
    index(corpus, out, tiny_model)
    write_jsonl(corpus, _records(30, edit={3}, drop={4}))
    index(corpus, out, tiny_model)
    result = invoke("export", "parquet", out, tmp_path / "live.parquet")
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "live.parquet")
    assert dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist())) == live_texts(out)
    assert "dense" not in table.column_names and set(table.column("source").to_pylist()) == {str(corpus.resolve())}
    with_vectors = invoke("export", "parquet", out, tmp_path / "v.parquet", "--vectors")
    assert with_vectors.exit_code == 0 and "dense" in pq.read_schema(tmp_path / "v.parquet").names
    inside = invoke("export", "parquet", out, out / "x.parquet")
    assert inside.exit_code == 2 and "inside the index folder" in inside.stderr


def test_metadata_is_kept_and_readable_by_duckdb(tiny_model, tmp_path):
    corpus, out = tmp_path / "docs", tmp_path / "ix"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"id": "de1", "text": "der Mond", "lang": "de", "year": 2024, "tags": ["x"]},
                                     {"id": "en1", "text": "the moon", "lang": "en", "year": 2019}])
    (corpus / "b.csv").write_text("id,text,lang\ncsv1,la lune,fr\n")
    (corpus / "note.md").write_text("a note on tides")
    index(corpus, out, tiny_model)
    query = f"""
        SELECT s.id, s.metadata['lang'] AS lang, s.source_line, s.metadata['size'] AS size
        FROM read_parquet('{out}/shard-*.parquet', filename = true, file_row_number = true) AS s
        ANTI JOIN read_parquet('{out}/deletes-*.parquet') AS d
          ON parse_filename(s.filename) = d.shard AND s.file_row_number = d.pos
        ORDER BY s.id"""
    rows = {row[0]: row[1:] for row in duckdb.sql(query).fetchall()}
    assert rows["de1"][:2] == ("de", 1) and rows["en1"][:2] == ("en", 2) and rows["csv1"][:2] == ("fr", 2)
    assert rows["note.md"][2] == str(len("a note on tides"))
    german = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/shard-*.parquet') WHERE metadata['lang'] = 'de'")
    assert german.fetchall()[0][0] == 1
    years = duckdb.sql(f"SELECT id FROM read_parquet('{out}/shard-*.parquet') "
                       "WHERE TRY_CAST(metadata['year'] AS INTEGER) > 2020").fetchall()
    assert years == [("de1",)]
    # a metadata change is a change (re-stored), a touch of a file is not
    write_jsonl(corpus / "a.jsonl", [{"id": "de1", "text": "der Mond", "lang": "de", "year": 2025, "tags": ["x"]},
                                     {"id": "en1", "text": "the moon", "lang": "en", "year": 2019}])
    (corpus / "note.md").touch()
    result = invoke("index", corpus, "--out", out, "--model", tiny_model)
    assert "0 added, 1 updated, 3 unchanged" in result.stdout, result.stdout


def test_metadata_over_its_bounds_is_a_skip_with_a_reason(tmp_path):
    from bge_index.input.documents import iter_documents
    from bge_index.input.types import SkipReason
    deep: object = "leaf"
    for _ in range(20):
        deep = [deep]
    write_jsonl(tmp_path / "d.jsonl", [{"id": "ok", "text": "fine", "a": 1},
                                       {"id": "deep", "text": "t", "nest": deep},
                                       {"id": "big", "text": "t", "blob": "x" * 100_000},
                                       {"id": "many", "text": "t", **{f"f{i}": i for i in range(300)}}])
    items = list(iter_documents([str(tmp_path / "d.jsonl")]))
    assert items[0].metadata == {"a": "1"}
    assert [(s.doc_id, s.code) for s in items[1:]] == [(i, SkipReason.METADATA_TOO_LARGE) for i in ("deep", "big", "many")]
    assert "nested deeper than 8" in items[1].reason and "over 65,536 bytes" in items[2].reason
