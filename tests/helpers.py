"""Plain helpers shared by the test modules: paths, running the CLI (in process or as a process), corpora.

Fixtures live in conftest.py; this module holds functions, imported as `from helpers import ...`
(conftest.py puts this folder on sys.path).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from bge_index.cli import app
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from bge_index.store.manifest import Manifest, read_manifest
from bge_index.search.scoring import Searcher
from bge_index.store.shard_reader import live_mask, open_shard, read_rows
from bge_index.store.vector_store import ShardVectors, heavy_columns, invert

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CORPUS = REPO / "sample_data" / "corpus"
SAMPLE_QUERIES = REPO / "sample_data" / "queries.jsonl"

runner = CliRunner()


# ---------------------------------------------------------------------------
# The command line, in process


def invoke(*args, stdin: str | None = None, env: dict | None = None):
    """Run `bge-index ARGS...` in this process (arguments made strings); returns click's Result."""
    return runner.invoke(app, [str(a) for a in args], input=stdin, env=env)


def ok(*args, stdin: str | None = None, env: dict | None = None):
    """`invoke`, asserting exit code 0 (the output is the assertion message)."""
    result = invoke(*args, stdin=stdin, env=env)
    assert result.exit_code == 0, result.output
    return result


def index(corpus, out, model, *extra, env: dict | None = None):
    """`bge-index index CORPUS --out OUT --model MODEL EXTRA...`, asserting it succeeds."""
    return ok("index", corpus, "--out", out, "--model", model, *extra, env=env)


# ---------------------------------------------------------------------------
# The command line, as a real process


def module_command(*args) -> list[str]:
    """The argv of `python -m bge_index ARGS...` with this interpreter."""
    return [sys.executable, "-m", "bge_index", *(str(a) for a in args)]


def run_process(command: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run a command from the repository root, capturing text stdout and stderr."""
    return subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, **kwargs)


# ---------------------------------------------------------------------------
# Corpora and index contents


def write_jsonl(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def live_rows(out: Path) -> tuple[list[str], list]:
    """(ids, texts) of an index's live rows, in index order."""
    manifest = read_manifest(out)
    vectors = load_vectors(out, manifest)
    texts = read_rows(out, manifest, list(zip(vectors.row_shard, vectors.row_local)), "text")
    return list(vectors.ids), list(texts)


def live_texts(out: Path) -> dict:
    """{id: text} of an index's live rows."""
    return dict(zip(*live_rows(out)))


# ---------------------------------------------------------------------------
# All live vectors of an index in flat arrays (tests only: the package streams them)


@dataclass
class IndexVectors:
    """All live dense and sparse vectors of an index, row-aligned with `ids`.

    dense:          [N, D] float16
    sparse_indptr:  [N + 1] int64, CSR row pointers into the two arrays below
    sparse_indices: [nnz] uint32 token ids (ascending within a row)
    sparse_values:  [nnz] float32 weights
    row_shard:      [N] int32 shard number (in manifest order) of each row
    row_local:      [N] int64 row number inside that shard
    doc_ids:        [N] document id of each row when the index is chunked, else None
    """

    ids: np.ndarray
    dense: np.ndarray
    sparse_indptr: np.ndarray
    sparse_indices: np.ndarray
    sparse_values: np.ndarray
    row_shard: np.ndarray
    row_local: np.ndarray
    doc_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def sparse_row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, weights) of row `row`: its slices of `sparse_indices` and `sparse_values`."""
        start, end = self.sparse_indptr[row], self.sparse_indptr[row + 1]
        return self.sparse_indices[start:end], self.sparse_values[start:end]


def load_vectors(index_dir: Path, manifest: Manifest) -> IndexVectors:
    """Read ids, dense and sparse columns of every live row into flat arrays."""
    chunked = manifest.chunking is not None
    columns = ["id", "dense", "sparse"] + (["doc_id"] if chunked else [])
    ids, doc_ids, dense, indptr_parts, indices, values, row_shard, row_local = [], [], [], [], [], [], [], []
    nnz = 0
    for number, shard in enumerate(manifest.shards):
        table = read_shard_table(index_dir, shard, columns)
        mask = live_mask(index_dir, shard)
        if not mask.all():
            table = table.filter(pa.array(mask))
        ids.append(np.asarray(table.column("id").to_pylist(), dtype=object))
        if chunked:
            doc_ids.append(np.asarray(table.column("doc_id").to_pylist(), dtype=object))
        dense.append(table.column("dense").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                     .reshape(-1, manifest.dense_dim))
        sparse = table.column("sparse").combine_chunks()
        for name, out in (("indices", indices), ("values", values)):
            out.append(sparse.field(name).flatten().to_numpy(zero_copy_only=False))
        offsets = sparse.field("indices").offsets.to_numpy().astype(np.int64)
        indptr_parts.append(offsets[1:] - offsets[0] + nnz)
        nnz += int(offsets[-1] - offsets[0])
        row_shard.append(np.full(table.num_rows, number, dtype=np.int32))
        row_local.append(np.flatnonzero(mask).astype(np.int64))

    def joined(parts, empty):
        """The parts concatenated, or `empty` when there are none."""
        return np.concatenate(parts) if parts else empty

    return IndexVectors(
        ids=joined(ids, np.zeros(0, dtype=object)),
        dense=joined(dense, np.zeros((0, manifest.dense_dim), dtype=np.float16)),
        sparse_indptr=np.concatenate([np.zeros(1, dtype=np.int64), *indptr_parts]),
        sparse_indices=joined(indices, np.zeros(0, dtype=np.uint32)),
        sparse_values=joined(values, np.zeros(0, dtype=np.float32)),
        row_shard=joined(row_shard, np.zeros(0, dtype=np.int32)),
        row_local=joined(row_local, np.zeros(0, dtype=np.int64)),
        doc_ids=joined(doc_ids, np.zeros(0, dtype=object)) if chunked else None,
    )


def read_shard_table(index_dir: Path, shard, columns: list[str]):
    """Columns of one whole shard as an Arrow table (deleted rows included)."""
    return open_shard(index_dir, shard).read(columns=columns)


def shard_vectors_from_csr(dense: np.ndarray, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                           vocab_size: int, start: int = 0, live: np.ndarray | None = None) -> ShardVectors:
    """A shard's searchable vectors built in memory from its rows (what the search files hold, without files).

    dense [rows, D] float16; sparse as CSR: indptr [rows + 1], indices [nnz] uint32 token ids, values [nnz] float32.
    """
    token_ids, token_ptr, rows, weights = invert(indptr, indices, values, vocab_size)
    heavy, columns = heavy_columns(token_ids, token_ptr, rows, weights, dense.shape[0])
    return ShardVectors(start, dense, token_ids, token_ptr, rows, weights, heavy, columns, live=live)


def searcher_for(vectors: IndexVectors, vocab_size: int, doc_ids=None) -> Searcher:
    """A Searcher over vectors held in memory, as one shard."""
    shard = shard_vectors_from_csr(vectors.dense, vectors.sparse_indptr, vectors.sparse_indices, vectors.sparse_values,
                                   vocab_size)
    return Searcher([shard], vocab_size,
                    doc_ids=doc_ids or (lambda: vectors.doc_ids if vectors.doc_ids is not None else vectors.ids))


def encode_texts(encoder, texts, max_length: int = 512, colbert: bool = False):
    """Encode a few texts as one padded batch (what FlagEmbedding does), for comparisons in tests."""
    return encoder.encode_ids([t.ids for t in encoder.tokenize(texts, max_length)], colbert=colbert)


@contextlib.contextmanager
def serve_process(*arguments, log_path: Path, env: dict | None = None):
    """A `bge-index serve ARGUMENTS --port 0` process logging to `log_path`: yields (process, its port). Killed at
    the end if it still runs (a test that checks how it stops sends SIGTERM itself)."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(module_command("serve", *arguments, "--port", "0"), stderr=log,
                                   stdout=subprocess.DEVNULL, cwd=REPO, env=env)
        try:
            yield process, serve_port(process, log_path)
        finally:
            if process.poll() is None:
                process.kill()


def serve_port(process, log_path: Path, timeout: float = 120.0) -> int:
    """The port a `bge-index serve --port 0` process announced in its log ("... at http://127.0.0.1:PORT");
    fails with the log if the process dies or says nothing within `timeout` seconds."""
    import re
    import time

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        address = re.search(r"at http://127\.0\.0\.1:(\d+)", log_path.read_text())
        if address is not None:
            return int(address.group(1))
        time.sleep(0.1)


def packing_works() -> bool:
    """Whether this machine's oneDNN int8 linear is exact, so that int8 codes can be packed (dense_prune)."""
    from bge_index.search import dense_prune

    return dense_prune.pack_codes(np.zeros((64, 32), dtype=np.int8)) is not None
