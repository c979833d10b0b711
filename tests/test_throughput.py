"""Encoding under pressure: out-of-memory splits, several devices, the precision `auto` picks, the GPU benchmark script."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, SAMPLE_CORPUS, invoke, load_vectors, run_process

from bge_index.model.encoder import load_encoder
from bge_index.errors import ModelError
from bge_index.model.identity import cpu_has_native_bf16
from bge_index.run.local import build_index
from bge_index.run.index_run import IndexOptions
from bge_index.store.manifest import read_manifest

TEXTS = ["a short one", "the moon drifts away from the earth by a few centimetres a year " * 3,
         "sourdough needs a starter", "tides", "octopuses have three hearts and blue blood " * 2,
         "trains in the alps climb steep grades", "compost", "x"]


def vectors_by_id(index_dir: Path) -> dict[str, tuple[np.ndarray, dict[int, float]]]:
    vectors = load_vectors(index_dir, read_manifest(index_dir))
    return {str(doc_id): (vectors.dense[row].astype(np.float32),
                          dict(zip(*(a.tolist() for a in vectors.sparse_row(row)))))
            for row, doc_id in enumerate(vectors.ids)}


@pytest.fixture()
def fresh_encoder(tiny_model):
    return load_encoder(str(tiny_model), device="cpu", dtype="fp32")


def fail_batches_over(encoder, rows: int) -> list[int]:
    """Make the encoder's forward pass run out of memory on batches of more than `rows` texts."""
    attempted: list[int] = []
    real_forward = encoder._forward

    def forward(batch, colbert):
        attempted.append(len(batch))
        if len(batch) > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(batch, colbert)

    encoder._forward = forward
    return attempted


# ---------------------------------------------------------------------------
# Out of memory


def test_out_of_memory_splits_the_batch_and_keeps_every_text_in_order(encoder, fresh_encoder):
    batch = [t.ids for t in encoder.tokenize(TEXTS, 512)]
    expected = encoder.encode_ids(batch, colbert=True)
    attempted = fail_batches_over(fresh_encoder, 3)
    got = fresh_encoder.encode_ids(batch, colbert=True)
    assert attempted[0] == len(TEXTS)  # tried whole first: no probe, no pre-emptive split
    assert sum(rows for rows in attempted if rows <= 3) == len(TEXTS)  # the passes that fit cover every text once
    assert fresh_encoder.out_of_memory_splits >= 1
    np.testing.assert_allclose(got.dense, expected.dense, atol=1e-5)
    assert len(got.sparse) == len(TEXTS)
    for (got_ids, got_weights), (ids, weights) in zip(got.sparse, expected.sparse):
        assert got_ids.tolist() == ids.tolist()
        np.testing.assert_allclose(got_weights, weights, atol=1e-5)
    for got_colbert, colbert in zip(got.colbert, expected.colbert):
        np.testing.assert_allclose(got_colbert, colbert, atol=1e-5)


def test_after_out_of_memory_later_batches_are_split_before_they_are_tried(encoder, fresh_encoder):
    batch = [t.ids for t in encoder.tokenize(TEXTS, 512)]
    attempted = fail_batches_over(fresh_encoder, 4)
    fresh_encoder.encode_ids(batch)
    attempted.clear()
    fresh_encoder.encode_ids(batch)
    assert max(attempted) <= 4  # the size that failed is not tried again


def test_a_single_text_that_does_not_fit_is_an_error_naming_the_fix(encoder, fresh_encoder):
    fail_batches_over(fresh_encoder, 0)
    with pytest.raises(ModelError, match="--chunk-tokens"):
        fresh_encoder.encode_ids([encoder.tokenize(["too long"], 512)[0].ids])


@pytest.mark.parametrize("message", ["[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory",
                                     "MPS backend out of memory (MPS allocated: 8.00 GB)"])
def test_cpu_and_mps_allocation_failures_split_too(encoder, fresh_encoder, message):
    real_forward = fresh_encoder._forward

    def forward(batch, colbert):
        if len(batch) > 2:
            raise RuntimeError(message)
        return real_forward(batch, colbert)

    fresh_encoder._forward = forward
    batch = [t.ids for t in encoder.tokenize(TEXTS, 512)]
    np.testing.assert_allclose(fresh_encoder.encode_ids(batch).dense, encoder.encode_ids(batch).dense, atol=1e-5)
    assert fresh_encoder.out_of_memory_splits >= 1


def test_other_runtime_errors_are_not_taken_for_out_of_memory(fresh_encoder, encoder):
    def forward(batch, colbert):
        raise RuntimeError("shape mismatch")
    fresh_encoder._forward = forward
    with pytest.raises(RuntimeError, match="shape mismatch"):
        fresh_encoder.encode_ids([t.ids for t in encoder.tokenize(TEXTS, 512)])


def test_index_run_with_out_of_memory_loses_and_reorders_nothing(tiny_model, fresh_encoder, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": text}) + "\n" for i, text in enumerate(TEXTS)))
    options = IndexOptions(model=str(tiny_model), dtype="fp32")
    build_index([str(corpus)], tmp_path / "plain", options)
    fail_batches_over(fresh_encoder, 2)
    summary = build_index([str(corpus)], tmp_path / "split", options, encoder=fresh_encoder)
    assert summary.added == len(TEXTS) and fresh_encoder.out_of_memory_splits >= 1
    plain, split = load_vectors(tmp_path / "plain", read_manifest(tmp_path / "plain")), \
        load_vectors(tmp_path / "split", read_manifest(tmp_path / "split"))
    assert list(split.ids) == list(plain.ids) == [f"d{i}" for i in range(len(TEXTS))]
    np.testing.assert_allclose(split.dense.astype(np.float32), plain.dense.astype(np.float32), atol=2e-3)


# ---------------------------------------------------------------------------
# Several devices


@pytest.mark.slow  # two whole sample-corpus runs, one on two encoder threads
def test_devices_list_gives_the_same_index_as_one_device(tiny_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert invoke("index", SAMPLE_CORPUS, "--out", one, "--model", tiny_model, "--batch-tokens", "256",
                  "--quiet").exit_code == 0
    result = invoke("index", SAMPLE_CORPUS, "--out", two, "--model", tiny_model, "--batch-tokens", "256",
                    "--devices", "cpu,cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert list(load_vectors(one, read_manifest(one)).ids) == list(load_vectors(two, read_manifest(two)).ids)
    expected, got = vectors_by_id(one), vectors_by_id(two)
    for doc_id, (dense, sparse) in expected.items():
        np.testing.assert_allclose(got[doc_id][0], dense, atol=2e-3)
        assert got[doc_id][1].keys() == sparse.keys()


@pytest.mark.parametrize("devices, message", [("cuda:7", "CUDA"), ("gpu0", "cuda:0,cuda:1"), ("auto,cpu", "all")])
def test_bad_devices_are_usage_or_model_errors(tiny_model, tmp_path, devices, message):
    result = invoke("index", SAMPLE_CORPUS, "--out", tmp_path / "x", "--model", tiny_model, "--devices", devices)
    assert result.exit_code in (1, 2) and message in result.output
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_devices_all_without_a_gpu_says_so(tiny_model, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA devices")
    result = invoke("index", SAMPLE_CORPUS, "--out", tmp_path / "x", "--model", tiny_model, "--devices", "all")
    assert result.exit_code == 1 and "no CUDA device" in result.output


# ---------------------------------------------------------------------------
# Precision chosen by auto


@pytest.mark.slow
def test_auto_precision_is_native_bf16_or_fp32_and_later_runs_keep_the_index_own(tiny_model, tmp_path):
    auto_env = {"BGE_INDEX_DTYPE": "auto"}
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    new = tmp_path / "new"
    assert invoke("index", corpus, "--out", new, "--model", tiny_model, env=auto_env).exit_code == 0
    assert read_manifest(new).model["dtype"] == ("bf16" if cpu_has_native_bf16() else "fp32")

    pinned = tmp_path / "pinned"
    assert invoke("index", corpus, "--out", pinned, "--model", tiny_model, "--dtype", "fp32").exit_code == 0
    corpus.write_text(corpus.read_text() + json.dumps({"id": "late", "text": "added later"}) + "\n")
    result = invoke("index", corpus, "--out", pinned, "--model", tiny_model, env=auto_env)
    assert result.exit_code == 0, result.output  # auto extends an fp32 index in fp32, not a mismatch
    assert read_manifest(pinned).model["dtype"] == "fp32"
    other = "bf16" if read_manifest(pinned).model["dtype"] == "fp32" else "fp32"
    assert invoke("index", corpus, "--out", pinned, "--model", tiny_model, "--dtype", other).exit_code == 1


# ---------------------------------------------------------------------------
# The GPU benchmark script runs anywhere


@pytest.mark.slow
def test_gpu_bench_script_runs_on_cpu_with_a_tiny_checkpoint(tiny_model, tmp_path):
    # Everything the script needs is given, so it runs without ../shared (a clean clone has none).
    env = {**os.environ, "BENCH_MODEL": str(tiny_model), "BENCH_CORPUS": str(SAMPLE_CORPUS), "BENCH_DOCUMENTS": "40",
           "BENCH_DEVICE": "cpu", "BENCH_NO_REFERENCE": "1", "BENCH_WORK": str(tmp_path), "PYTHON": sys.executable,
           "BENCH_SHARED": str(tmp_path / "no-shared")}
    env.pop("BGE_INDEX_DTYPE")
    result = run_process(["bash", str(REPO / "benchmarks" / "gpu_bench.sh")], env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout
    assert "bge-index" in table and "docs/s" in table and "MFU" in table
    row = next(line for line in table.splitlines() if line.startswith("bge-index"))
    assert " 40 " in row  # every document encoded
