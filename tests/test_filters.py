"""`--where` filters (issue 20, point 3): a small language parsed without evaluating anything, missing fields
that never match a comparison, and answers that are the exact top-k of the matching rows (the bits a full scan
of an index holding only those rows gives), found by gathering few rows and by the pruned pass for many, in
`search`, `--queries`, `eval`, `serve` and the Milvus backend."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from helpers import index, invoke, ok, write_jsonl
from test_pruning import hits_bits, query, random_parts, random_queries, searcher, sparse_rows, unit
from bge_index.errors import InvalidOptionError
from bge_index.search import dense_prune, scoring
from bge_index.search.dense_kernel import DenseKernel
from bge_index.search.filters import RowColumns, parse_where
from bge_index.search.query import ScoreWeights
from bge_index.search.scoring import fuse, top_k

DIM = 64


@pytest.fixture(autouse=True)
def small_gathers(monkeypatch):
    """Gather at most 1/16 of the rows (not 4,096 rows: these indexes are small): `many` takes the pruned pass."""
    monkeypatch.setattr(scoring, "GATHER_ROWS", 0)

# ---------------------------------------------------------------------------
# the language


@pytest.mark.parametrize("text", [
    'lang == "de"', "year >= 2020", '2020 <= year < 2024', 'lang in ["de", "fr"]', 'lang not in ("de",)',
    'startswith(path, "reports/")', "has(lang)", 'not (lang == "de" or lang == "fr") and has(year)',
    'metadata["a key"] != "x"', 'metadata["id"] == "shadowed"', "source_line > 3", "flag == True", "x > -1.5e3",
])
def test_the_documented_forms_parse(text):
    parse_where(text)


@pytest.mark.parametrize("text, message", [
    ('lang = "de"', "write == for equality"),
    ('__import__("os").system("id")', "unknown function"),
    ('open("/etc/passwd")', "unknown function"),
    ("lang == de", "expected a string or a number"),
    ('"de" == "de"', "a field on one side"),
    ("lang in []", "at least one value"),
    ('lang in ["de", 1]', "one kind"),
    ("lang in other", "takes a list"),
    ('source_line == "3"', "is a number"),
    ("x == 1e400", "out of range"),
    ("a.b == 1", "expected a field name"),
    ("lambda: 1", "expected a comparison"),
    ("[x for x in y]", "expected a comparison"),
    ('lang == "de"; import os', "invalid syntax"),
    ("a==1" + " and a==1" * 400, "terms"),
    ("(" * 300 + "x == 1" + ")" * 300, "where:"),
    ("x == 1 or " * 1000 + "x == 1", "characters"),
    ("   ", "empty"),
    ("a == 1" + "0" * 400, "out of range"),
    ('lang == "\\ud800"', "not valid Unicode"),
    ('metadata["\\udc00"] == "x"', "not valid Unicode"),
    ('lang == "\ud800"', "cannot be read"),
    ('"""x\nbge-index: error: forged\x1b[31m""" == "z"', "a field on one side"),
    ('lang == "de"\nbge-index: error: forged', "invalid syntax"),  # never a second line
    ("x == 1\x1b[2J", "\\x1b"),
    (" or ".join(f"k{i} == 1" for i in range(40)), "more than 32 different fields"),
])
def test_anything_else_is_refused_in_one_line_naming_the_problem(text, message):
    with pytest.raises(InvalidOptionError) as refused:
        parse_where(text)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def _columns():
    metadata = pa.array([[("lang", "de"), ("year", "2021"), ("flag", "true")], [("lang", "fr"), ("year", "1999.5")],
                         None, [("year", "unknown")], [("lang", "en"), ("a key", "x")]],
                        type=pa.map_(pa.string(), pa.string()))
    columns = {"metadata": pa.chunked_array([metadata]), "id": pa.chunked_array([pa.array(list("abcde"))]),
               "source": pa.chunked_array([pa.array(["/r/a.jsonl", "/r/a.jsonl", None, "/s/b.md", "/r/c.csv"])]),
               "source_line": pa.chunked_array([pa.array([1, 2, None, None, 7], pa.int64())])}
    return RowColumns(5, columns.get)


@pytest.mark.parametrize("text, expected", [
    ('lang == "de"', [1, 0, 0, 0, 0]),
    ('lang != "de"', [0, 1, 0, 0, 1]),  # a row without lang matches no comparison, != included
    ('not lang == "de"', [0, 1, 1, 1, 1]),  # not is the complement
    ("year >= 2000", [1, 0, 0, 0, 0]),  # as numbers: 1999.5 < 2000; "unknown" is no number
    ('year >= "2000"', [1, 0, 0, 1, 0]),  # as strings: "unknown" > "2000"
    ('year == "unknown"', [0, 0, 0, 1, 0]),
    ('lang in ["de", "fr"]', [1, 1, 0, 0, 0]),
    ('lang not in ["de"]', [0, 1, 0, 0, 1]),
    ("has(year)", [1, 1, 0, 1, 0]),
    ("not has(lang)", [0, 0, 1, 1, 0]),
    ('startswith(source, "/r/")', [1, 1, 0, 0, 1]),
    ('startswith(id, "c")', [0, 0, 1, 0, 0]),
    ("source_line >= 2", [0, 1, 0, 0, 1]),
    ("flag == True", [1, 0, 0, 0, 0]),
    ('metadata["a key"] == "x"', [0, 0, 0, 0, 1]),
    ('2000 < year < 2022 or lang == "en"', [1, 0, 0, 0, 1]),
    ('nothing == "x"', [0, 0, 0, 0, 0]),
])
def test_a_filter_matches_what_the_readme_says(text, expected):
    assert _columns().matching(parse_where(text)).tolist() == [bool(v) for v in expected]


def test_numbers_are_read_as_a_reader_of_the_json_would():
    metadata = pa.array([[("y", " 12 ")], [("y", "1e400")], [("y", "+3")], [("y", "1.")], [("y", "0x10")],
                         [("y", "nan")]], type=pa.map_(pa.string(), pa.string()))
    columns = RowColumns(6, {"metadata": pa.chunked_array([metadata])}.get)
    assert columns.matching(parse_where("y > 0")).tolist() == [True, False, True, True, False, False]
    assert columns.matching(parse_where("y in [12, 3]")).tolist() == [True, False, True, False, False, False]


def test_fields_read_are_bounded_in_memory(monkeypatch):
    from bge_index.search import filters

    keys = [f"k{i}" for i in range(40)]
    metadata = pa.array([[(k, "1") for k in keys]], type=pa.map_(pa.string(), pa.string()))
    columns = RowColumns(1, {"metadata": pa.chunked_array([metadata])}.get)
    for key in keys:
        assert columns.matching(parse_where(f"{key} == 1 and {key} == \"1\"")).tolist() == [True]
    assert len(columns._values) == filters.FIELD_CACHE


def test_an_index_without_source_or_metadata_columns_matches_nothing_but_ids():
    columns = RowColumns(3, {"id": pa.chunked_array([pa.array(["a", "b", "c"])])}.get)
    assert columns.matching(parse_where('lang == "de"')).tolist() == [False] * 3
    assert columns.matching(parse_where('not has(source) and id != "b"')).tolist() == [True, False, True]


# ---------------------------------------------------------------------------
# exact answers over the matching rows


def _reference(index, q, k, mode, allowed, weights=ScoreWeights(), fusion="weighted", normalize=None):
    """The definition: every row scored by the full scans, rows outside the filter (or deleted) at -inf."""
    dense, sparse = index.dense_scores(q).copy(), index.sparse_scores(q).copy()
    dense[~allowed], sparse[~allowed] = -np.inf, -np.inf
    ranking = dense if mode == "dense" else sparse if mode == "sparse" else fuse(dense, sparse, weights, fusion,
                                                                                   normalize)
    ranking[~allowed | ~np.isin(np.arange(index.rows), index.live_row_numbers())] = -np.inf  # whatever the weights
    rows = top_k(ranking, k)
    return [(int(r), np.float32(ranking[r]).tobytes(), np.float32(index.dense_score(q, int(r))).tobytes(),
             np.float32(index.sparse_score(q, int(r))).tobytes()) for r in rows]


def _index_and_filters(seed=3):
    rng = np.random.default_rng(seed)
    parts = random_parts(rng, [1500, 1000, 700], deleted_share=0.1)
    index = searcher(parts)
    rows = index.rows
    few = np.zeros(rows, dtype=bool)
    few[rng.choice(rows, 60, replace=False)] = True  # gathered: far below rows / 16
    many = rng.random(rows) < 0.6  # the pruned pass
    return rng, index, {"few": few, "many": many}


@pytest.mark.parametrize("which", ["few", "many"])
@pytest.mark.parametrize("k", [1, 10, 57])
def test_a_filtered_top_k_is_the_scan_of_the_matching_rows_bit_for_bit(which, k):
    rng, index, filters = _index_and_filters()
    allowed = filters[which]
    restricted = index.restricted(allowed)
    queries = random_queries(rng, 20, DIM)
    for mode in ("dense", "sparse", "hybrid"):
        batch = restricted.search_many(queries, k, mode)
        for q, batched in zip(queries, batch):
            expected = _reference(index, q, k, mode, allowed)
            assert hits_bits(batched) == expected, (which, mode)
            assert hits_bits(restricted.search(q, k, mode)) == expected
            live = index.live_row_numbers()
            assert all(allowed[h.row] and h.row in live for h in batched)


@pytest.mark.parametrize("which", ["few", "many"])
@pytest.mark.parametrize("fusion, normalize", [("rrf", None), ("weighted", "minmax")])
def test_rrf_and_minmax_fuse_over_the_matching_rows_only(which, fusion, normalize):
    rng, index, filters = _index_and_filters(4)
    allowed = filters[which]
    restricted = index.restricted(allowed)
    for q in random_queries(rng, 5, DIM):
        hits = restricted.search(q, 10, "hybrid", fusion=fusion, normalize=normalize)
        assert hits_bits(hits) == _reference(index, q, 10, "hybrid", allowed, fusion=fusion, normalize=normalize)


@pytest.mark.parametrize("which", ["few", "many"])
@pytest.mark.parametrize("weights, normalize", [(ScoreWeights(-1.0, -1.0), None), (ScoreWeights(-0.5, 0.3), "minmax"),
                                                (ScoreWeights(0.0, 1.0), None), (ScoreWeights(1.0, 0.0), "minmax")])
def test_no_weights_let_a_row_outside_the_filter_or_deleted_in(which, weights, normalize):
    """-inf (outside, deleted) times a negative weight is +inf, times 0 is NaN: such rows must stay out."""
    rng, index, filters = _index_and_filters(9)
    allowed = filters[which]
    restricted = index.restricted(allowed)
    live = set(index.live_row_numbers().tolist())
    for q in random_queries(rng, 4, DIM):
        hits = restricted.search(q, 10, "hybrid", weights, normalize=normalize)
        assert len(hits) == 10 and all(allowed[h.row] and h.row in live for h in hits)
        assert hits_bits(hits) == _reference(index, q, 10, "hybrid", allowed, weights, normalize=normalize)
        unfiltered = index.search(q, 10, "hybrid", weights, normalize=normalize)
        assert all(h.row in live for h in unfiltered) and all(np.isfinite(h.score) for h in unfiltered)


def test_a_zero_weight_keeps_documents_grouped_by_their_matching_passages():
    rng, index, filters = _index_and_filters(10)
    documents = np.arange(index.rows) // 4  # four passages per document
    grouped = scoring.Searcher(index.shards, index.vocab_size, doc_ids=lambda: documents)
    allowed = np.zeros(index.rows, dtype=bool)
    allowed[::4] = True  # one passage of every document matches
    q = random_queries(rng, 1, DIM)[0]
    hits = grouped.restricted(allowed).search(q, 10, "hybrid", ScoreWeights(1.0, 0.0), group_by_doc=True)
    assert len(hits) == 10 and all(h.row % 4 == 0 for h in hits)


def test_weights_that_are_not_finite_are_refused():
    for value in (float("nan"), float("inf")):
        with pytest.raises(InvalidOptionError, match="finite"):
            ScoreWeights(dense=value)


def test_ties_at_the_kth_score_keep_row_order_among_the_matching_rows():
    rng = np.random.default_rng(8)
    base = unit(rng.standard_normal((3000, DIM)))
    q = unit(rng.standard_normal(DIM))
    best = unit(q + 0.3 * unit(rng.standard_normal(DIM)))
    copies = np.sort(rng.choice(3000, 40, replace=False))
    base[copies] = best  # 40 identical rows at the top, some filtered out, some deleted
    sparse = sparse_rows(rng, 3000)
    live = np.ones(3000, dtype=bool)
    live[copies[::7]] = False
    index = searcher([(base[:1500], sparse[:1500], live[:1500]), (base[1500:], sparse[1500:], live[1500:])])
    for allowed_share in (0.02, 0.7):
        allowed = rng.random(3000) < allowed_share
        allowed[copies[::3]] = True
        restricted = index.restricted(allowed)
        vectors = query(q, {1: 0.5, 7: 0.2})
        for k in (1, 5, 12):
            for mode in ("dense", "hybrid"):
                hits = restricted.search(vectors, k, mode)
                assert hits_bits(hits) == _reference(index, vectors, k, mode, allowed)
        tied = [h.row for h in restricted.search(vectors, 40, "dense") if h.score == index.dense_score(vectors,
                                                                                                       int(copies[0]))]
        expected = [int(r) for r in copies if allowed[r] and live[r]]
        assert tied == expected  # every matching live copy, in row order


def test_a_selective_filter_never_passes_over_the_matrix(monkeypatch):
    rng, index, filters = _index_and_filters(5)
    restricted = index.restricted(filters["few"])

    def refuse(*args, **kwargs):
        raise AssertionError("a pass over the whole matrix for a filter matching 60 rows")

    monkeypatch.setattr(DenseKernel, "scan", refuse)
    monkeypatch.setattr(dense_prune, "int8_products", refuse)
    queries = random_queries(rng, 3, DIM)
    results = restricted.search_many(queries, 10, "hybrid")
    matching = int((filters["few"] & np.isin(np.arange(index.rows), index.live_row_numbers())).sum())
    assert restricted.last_rescored == [matching] * 3 and all(len(r) == 10 for r in results)


def test_a_broad_filter_is_pruned_not_scanned():
    rng, index, filters = _index_and_filters(6)
    restricted = index.restricted(filters["many"])
    restricted.search_many(random_queries(rng, 4, DIM), 10, "dense")
    assert 0 < max(restricted.last_rescored) < restricted.live_rows / 4


def test_a_filter_matching_nothing_or_only_deleted_rows_answers_no_hits():
    rng, index, _ = _index_and_filters(7)
    q = random_queries(rng, 1, DIM)[0]
    assert index.restricted(np.zeros(index.rows, dtype=bool)).search(q, 10, "hybrid") == []
    deleted = np.ones(index.rows, dtype=bool)
    deleted[index.live_row_numbers()] = False
    assert index.restricted(deleted).search(q, 10, "dense") == []
    one = np.zeros(index.rows, dtype=bool)
    one[index.live_row_numbers()[5]] = True
    assert [h.row for h in index.restricted(one).search(q, 10, "sparse")] == [int(index.live_row_numbers()[5])]


# ---------------------------------------------------------------------------
# every surface


def _records(count=240):
    langs = ["de", "fr", "en"]
    words = ["moon", "tide", "bread", "tunnel", "octopus", "copper", "laser", "river"]
    out = []
    for i in range(count):
        record = {"id": f"d{i}", "text": f"note {i}: " + " ".join(words[(i * j) % 8] for j in range(1, 7))}
        if i % 5:
            record["lang"] = langs[i % 3]
        record["year"] = 1990 + i % 40
        out.append(record)
    return out


@pytest.fixture(scope="module")
def metadata_index(spread_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("filters")
    corpus, out = root / "notes.jsonl", root / "ix"
    write_jsonl(corpus, _records())
    index(corpus, out, spread_model, "--shard-rows", "100")
    queries = root / "queries.tsv"
    queries.write_text("1\tmoon tide\n2\tbread tunnel\n3\tcopper laser river\n")
    return root, out, queries


def _matches(record, text):
    columns = RowColumns(1, {"id": pa.chunked_array([pa.array([record["id"]])]),
                             "metadata": pa.chunked_array([pa.array(
                                 [[(k, str(v)) for k, v in record.items() if k not in ("id", "text")]],
                                 pa.map_(pa.string(), pa.string()))])}.get)
    return bool(columns.matching(parse_where(text))[0])


@pytest.mark.parametrize("where", ['lang == "de" and year >= 2010', 'lang in ["fr", "en"]', "not has(lang)",
                                  'id == "d17"', "year < 1992 or year > 2027"])
def test_search_where_is_the_unfiltered_ranking_with_other_rows_left_out(metadata_index, where):
    root, out, queries = metadata_index
    everything = json.loads(ok("search", out, "--queries", queries, "-k", 1000, "--format", "json").stdout)
    filtered = json.loads(ok("search", out, "--queries", queries, "-k", 7, "--format", "json",
                             "--where", where).stdout)
    by_id = {r["id"]: r for r in _records()}
    for full, got in zip(everything, filtered):
        expected = [h for h in full["hits"] if _matches(by_id[h["id"]], where)][:7]
        assert got["hits"] == [dict(h, rank=i) for i, h in enumerate(expected, start=1)], where
        assert got["hits"], where
    # each query alone: the same answers as in the batch
    alone = json.loads(ok("search", out, "moon tide", "-k", 7, "--format", "json", "--where", where).stdout)
    assert alone[0]["hits"] == filtered[0]["hits"]


def test_a_bad_filter_is_one_usage_line_before_the_model_loads(metadata_index):
    _, out, _ = metadata_index
    result = invoke("search", out, "moon", "--where", 'lang = "de"')
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        'bge-index: error: where: invalid syntax at column 6 (write == for equality): lang = "de"']


def test_eval_takes_the_filter(metadata_index):
    root, out, _ = metadata_index
    queries, qrels = root / "q.jsonl", root / "qrels.tsv"
    write_jsonl(queries, [{"_id": "q1", "text": "moon tide"}])
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td5\t1\n")  # d5 has no lang
    plain = json.loads(ok("eval", out, "--queries", queries, "--qrels", qrels, "--format", "json",
                          "--modes", "dense").stdout)
    kept = json.loads(ok("eval", out, "--queries", queries, "--qrels", qrels, "--format", "json",
                         "--modes", "dense", "--where", "not has(lang)").stdout)
    assert plain != kept
    runs = root / "runs"
    ok("eval", out, "--queries", queries, "--qrels", qrels, "--modes", "dense", "--where", "not has(lang)",
       "--runs", runs)
    ranked = [line.split()[2] for line in next(runs.iterdir()).read_text().splitlines()]
    assert ranked and all(int(doc[1:]) % 5 == 0 for doc in ranked)


def test_serve_answers_a_filter_byte_for_byte_as_the_cli(metadata_index):
    pytest.importorskip("starlette")
    from test_serve import Client, serving
    from urllib.parse import quote

    _, out, _ = metadata_index
    where = 'lang == "de" and year >= 2010'
    cli = ok("search", out, "moon tide", "-k", 5, "--format", "json", "--where", where).stdout
    with serving(out) as (port, _service):
        client = Client(port)
        status, _, body = client.request("GET", f"/search?q={quote('moon tide')}&k=5&where={quote(where)}")
        assert status == 200 and body.decode() == cli
        status, _, body = client.request("POST", "/search", {"queries": [{"id": "1", "text": "moon tide"}],
                                                             "k": 5, "where": where})
        assert status == 200 and body.decode() == cli
        status, _, body = client.request("GET", f"/search?q=moon&where={quote('lang = 1')}")
        assert status == 400 and "write == for equality" in json.loads(body)["error"]
        status, _, body = client.request("POST", "/search", {"queries": [{"id": "1", "text": "moon"}], "where": 3})
        assert status == 400 and "where must be a string" in json.loads(body)["error"]
        client.close()


def test_milvus_translates_the_filter(metadata_index, tmp_path):
    pytest.importorskip("milvus_lite")
    _, out, queries = metadata_index
    uri = tmp_path / "m.db"
    ok("export", "milvus", out, "--uri", uri, "--collection", "notes")
    for where in ['lang == "de" and year >= 2010', 'lang not in ["de"]', "not year >= 2000", 'startswith(id, "d1")',
                  'lang != "de"', "has(lang) and not has(nothing)"]:
        local = json.loads(ok("search", out, "--queries", queries, "-k", 10, "--format", "json", "--mode", "sparse",
                              "--where", where).stdout)
        remote = json.loads(ok("search", out, "--queries", queries, "-k", 10, "--format", "json", "--mode", "sparse",
                               "--where", where, "--backend", "milvus", "--uri", uri, "--collection", "notes").stdout)
        for lq, mq in zip(local, remote):
            # Milvus returns only rows sharing a token with the query (the README's caveat): compare those
            expected = [h["id"] for h in lq["hits"] if h["score"] > 0]
            assert [h["id"] for h in mq["hits"]] == expected and expected, where
    result = invoke("search", out, "moon", "--where", 'startswith(id, "d_")', "--backend", "milvus", "--uri", uri,
                    "--collection", "notes")
    assert result.exit_code == 2 and "has no Milvus form" in result.output


def test_whole_files_filter_by_their_path_size_and_time(spread_model, tmp_path):
    for folder, word in (("reports", "moon"), ("notes", "moon bread")):
        (tmp_path / "docs" / folder).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "docs" / folder / f"{i}.txt").write_text(f"{word} {i} " + "x" * (10 * i))
    out = tmp_path / "ix"
    index(tmp_path / "docs", out, spread_model)
    hits = json.loads(ok("search", out, "moon", "--format", "json", "--where",
                         f'startswith(path, "{tmp_path / "docs" / "reports"}/") and size >= 15').stdout)[0]["hits"]
    assert sorted(h["id"] for h in hits) == ["reports/1.txt", "reports/2.txt"]
    assert all(h["source"].startswith(str(tmp_path / "docs" / "reports")) for h in hits)
    assert json.loads(ok("search", out, "moon", "--format", "json", "--where",
                         'mtime >= "2000-01-01" and startswith(id, "notes/")').stdout)[0]["hits"]


def test_metadata_over_milvus_json_limit_is_exported_without_it_and_counted(tiny_model, tmp_path):
    pytest.importorskip("milvus_lite")
    corpus, out, uri = tmp_path / "c.jsonl", tmp_path / "ix", tmp_path / "m.db"
    write_jsonl(corpus, [{"id": "big", "text": "moon", "quote": '"' * 60_000},  # 60 KB, 120 KB as JSON
                         {"id": "small", "text": "moon", "quote": "x"}])
    index(corpus, out, tiny_model)
    ok("export", "milvus", out, "--uri", uri, "--collection", "c", "--report", tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["fields_cut"] == 1
    remote = json.loads(ok("search", out, "moon", "--format", "json", "--where", "has(quote)", "--backend", "milvus",
                           "--uri", uri, "--collection", "c").stdout)
    assert [h["id"] for h in remote[0]["hits"]] == ["small"]
