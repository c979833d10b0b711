"""One query, one answer: a query's vectors, hits and scores do not depend on the queries searched with it.

A short query padded into a batch beside longer ones used to get vectors a
few ulps off its own (bf16 most of all), so `search "q"`, `search --queries`
and `eval` could score and rank it differently. Queries are now encoded one
at a time, unpadded (Encoder.encode_queries); these tests pin that down for
the vectors, the CLI's hits and scores, and eval's runs, in fp32 and bf16.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import REPO, SAMPLE_CORPUS, invoke, ok, write_jsonl

from bge_index.model.encoder import load_encoder
from bge_index.search.evaluation import read_run
from bge_index.search.local_index import encode_queries

QUERY = "moon orbit"
# Seven longer queries, so QUERY is padded in any batched encoding of all eight.
LONGER = [
    "How fast is the Moon moving away from Earth every single year, measured by lasers?",
    "Wie lang ist der längste Eisenbahntunnel der Welt und wann wurde er eröffnet?",
    "¿Por qué la sangre del pulpo es azul y no roja como la de los humanos?",
    "What keeps a sourdough starter alive for decades in a cold kitchen cupboard?",
    "Which metals conduct heat better than copper, and why does silver cost so much more?",
    "Explain how tides depend on both the Moon and the Sun over a full lunar month.",
    "Pourquoi le ciel est-il bleu pendant la journée et rouge au coucher du soleil ?",
]


def _runnable_dtypes() -> list[str]:
    dtypes = ["fp32", "bf16"]  # CPU bf16 works in every torch this project supports
    try:  # fp16 matmuls on CPU need a recent torch; test them where they run
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        dtypes.append("fp16")
    except RuntimeError:
        pass
    return dtypes


@pytest.mark.parametrize("dtype", _runnable_dtypes())
def test_query_vectors_are_the_same_alone_and_among_longer_queries(tiny_model, dtype):
    encoder = load_encoder(str(tiny_model), device="cpu", dtype=dtype)
    [alone] = encode_queries(encoder, [QUERY], colbert=True)
    for position in (0, 3, 7):
        batch = LONGER[:position] + [QUERY] + LONGER[position:]
        among = encode_queries(encoder, batch, colbert=True)[position]
        assert alone.dense.tobytes() == among.dense.tobytes()
        assert np.array_equal(alone.sparse_ids, among.sparse_ids)
        assert alone.sparse_weights.tobytes() == among.sparse_weights.tobytes()
        assert alone.colbert.tobytes() == among.colbert.tobytes()


# Dense scores of one query must not depend on how many queries share the sgemm: search.dense_scores_many
# multiplies queries in zero-padded blocks of a fixed width (torch.mv for one and torch.mm for several summed in
# different orders and flipped near-tied ranks).


@pytest.fixture(scope="module")
def bf16_index(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("indexes") / "bf16"
    ok("index", SAMPLE_CORPUS, "--out", out, "--model", tiny_model, "--dtype", "bf16")
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_search_alone_and_in_a_query_file_give_the_same_hits(bf16_index, tmp_path, dtype, mode):
    queries = tmp_path / "queries.jsonl"
    write_jsonl(queries, [{"_id": f"long{i}", "text": text} for i, text in enumerate(LONGER[:4])]
                + [{"_id": "q", "text": QUERY}]
                + [{"_id": f"long{i}", "text": text} for i, text in enumerate(LONGER[4:], start=4)])
    env = {"BGE_INDEX_DTYPE": dtype}
    alone = json.loads(ok("search", bf16_index, QUERY, "--mode", mode, "-k", "20", "--format", "json",
                          env=env).stdout)
    batch = json.loads(ok("search", bf16_index, "--queries", queries, "--mode", mode, "-k", "20",
                          "--format", "json", env=env).stdout)
    [in_batch] = [result for result in batch if result["query_id"] == "q"]
    assert alone[0]["hits"] == in_batch["hits"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_eval_runs_equal_each_query_searched_alone(bf16_index, tmp_path, dtype):
    env = {"BGE_INDEX_DTYPE": dtype}
    queries = [json.loads(line) for line in (REPO / "sample_data" / "queries.jsonl").read_text().splitlines()]
    result = invoke("eval", bf16_index, "--queries", REPO / "sample_data" / "queries.jsonl",
                    "--qrels", REPO / "sample_data" / "qrels.tsv", "--modes", "dense,hybrid", "--depth", "10",
                    "--runs", tmp_path / "runs", "--format", "json", env=env)
    assert result.exit_code == 0, result.output
    for mode in ("dense", "hybrid"):
        run = read_run(tmp_path / "runs" / f"{mode}.trec")
        for query in queries[:3]:
            [alone] = json.loads(ok("search", bf16_index, query["text"], "--mode", mode, "-k", "10",
                                    "--format", "json", env=env).stdout)
            assert {hit["id"]: hit["score"] for hit in alone["hits"]} == pytest.approx(run[query["_id"]], abs=1e-6)


def test_dense_scores_of_a_query_do_not_depend_on_its_place_among_many(bf16_index):
    from bge_index.search.local_index import LocalIndex
    from bge_index.search.scoring import _DENSE_QUERY_BLOCK

    searcher = LocalIndex(bf16_index, dtype="fp32").searcher
    rng = np.random.default_rng(0)
    others = rng.standard_normal((3 * _DENSE_QUERY_BLOCK, searcher.shards[0].dense.shape[1])).astype(np.float32)
    query = others[0] / np.linalg.norm(others[0])
    alone = searcher.dense_scores_many(query[None, :])[0]
    for position in (0, 5, _DENSE_QUERY_BLOCK - 1, _DENSE_QUERY_BLOCK, 2 * _DENSE_QUERY_BLOCK + 3):
        batch = np.insert(others[1:position + 6], position, query, axis=0)
        assert searcher.dense_scores_many(batch)[position].tobytes() == alone.tobytes(), position
