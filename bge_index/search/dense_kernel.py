"""The one exact dense kernel: every exact dense score of a search is computed here, and only here.

A score is the float32 dot product of a row's stored float16 vector (widened
to float32, which is exact) with the float32 query, computed by one sgemm of
fixed shape: a [CHUNK_ROWS, D] block of rows (zero-padded when fewer) times a
[D, QUERY_BLOCK] block of queries (zero-padded). Full scans and the rescoring
of candidates after pruning both go through `_multiply`, with the same buffer
and the same shapes, so a row's score has the same bits whichever rows share
its block, whichever way it was found (scan or pruning), and, a query keeping
its column in the block, whichever queries share it. Those properties rest on
the BLAS computing each output of a fixed-shape sgemm by the same operations
(measured: rows permuted within a block, and a query in any column of its
block, give the same bits; tests/test_pruning.py checks both). The row's
height within the block is what changes bits when the block's shape changes
(a 100-row sgemm sums in another order than a 1,024-row one), which is why
every block is padded to CHUNK_ROWS.

Whatever order the sgemm sums in, the computed score is within
`GAMMA * |x| * |q|` of the real dot product (the classic bound for any
summation order, fused or not: gamma_D = D u / (1 - D u), u = 2**-24); the
pruning bounds add this (dense_prune.py).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

# Queries per sgemm. Measured per million 1024-dim rows on this project's 2-core machine (MKL sgemm, chunks of
# 1,024 rows): width 1 (mv) 0.66 s, 8: 1.10 s, 16: 0.81 s, 32: 1.30 s. 16 is the fastest width that still lets
# queries share the pass (BENCHMARKS.md, issue 12).
QUERY_BLOCK = 16
# Rows widened to float32 at a time: 1,024 x 1,024 x 4 B = 4 MiB stays in cache between the widening and the
# multiplication (BENCHMARKS.md, issue 12). Every block has exactly this many rows (zero-padded).
CHUNK_ROWS = 1024


def summation_gamma(terms: int) -> float:
    """gamma_n = n u / (1 - n u) with u = 2**-24: a float32 sum of n products, in any order, is within gamma_n of
    the sum of the absolute products of the real value (Higham, Accuracy and Stability, 3.1)."""
    u = 2.0 ** -24
    return terms * u / (1 - terms * u)


def exact_kernel_usable() -> bool:
    """Whether float32 matmuls are really float32: torch's 'highest' precision, and no reduced precision asked of
    oneDNN (torch.backends.mkldnn.matmul.fp32_precision 'bf16' or 'tf32'). Otherwise the CPU may multiply in
    bf16, the bounds of dense_prune.py do not hold, and searches scan (the same scores, then, for every row)."""
    try:
        for backend in (torch.backends, getattr(torch.backends, "mkldnn", None),
                        getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)):
            if getattr(backend, "fp32_precision", "none") not in ("none", "ieee"):
                return False
        return torch.get_float32_matmul_precision() == "highest"
    except (RuntimeError, AttributeError):  # torch refuses to answer when both of its APIs were used
        return False


class DenseKernel:
    """Exact dense scores of float16 rows against float32 queries, in fixed-shape blocks (see the module)."""

    def __init__(self) -> None:
        # The widened rows, one buffer per thread: searches may run in several threads at once.
        self._local = threading.local()

    @staticmethod
    def query_blocks(queries: np.ndarray) -> list[torch.Tensor]:
        """[Q, D] float32 queries -> [D, QUERY_BLOCK] float32 blocks, query i in column i % 16 of block i // 16."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        blocks = -(-q.shape[0] // QUERY_BLOCK)
        columns = np.zeros((q.shape[1], blocks * QUERY_BLOCK), dtype=np.float32)  # [D, Q padded]
        columns[:, :q.shape[0]] = q.T
        columns = torch.from_numpy(columns)
        return [columns[:, b * QUERY_BLOCK:(b + 1) * QUERY_BLOCK].contiguous() for b in range(blocks)]

    def _rows_buffer(self, dim: int) -> torch.Tensor:
        """This thread's [CHUNK_ROWS, dim] float32 buffer (its `filled` rows may hold something other than zeros)."""
        local = self._local
        if getattr(local, "buffer", None) is None or local.buffer.shape != (CHUNK_ROWS, dim):
            local.buffer = torch.zeros(CHUNK_ROWS, dim, dtype=torch.float32)
            local.filled = 0
        return local.buffer

    def _load(self, rows: np.ndarray) -> int:
        """Widen [n <= CHUNK_ROWS, D] float16 rows into this thread's buffer, zeros below them; returns n."""
        n = rows.shape[0]
        buffer = self._rows_buffer(rows.shape[1])
        buffer[:n].copy_(torch.from_numpy(np.ascontiguousarray(rows)))
        if n < self._local.filled:
            buffer[n:self._local.filled].zero_()  # only what an earlier, longer block left
        self._local.filled = n
        return n

    def _multiply(self, block: torch.Tensor) -> np.ndarray:
        """[CHUNK_ROWS, QUERY_BLOCK] float32 scores of the loaded rows with one query block: the only sgemm."""
        return torch.mm(self._local.buffer, block).numpy()

    def scan(self, dense: np.ndarray, blocks: Sequence[torch.Tensor], queries: int,
             out: np.ndarray, first: int = 0) -> None:
        """Every row of one shard's [rows, D] float16 matrix: out[q, first + row] for queries 0..queries-1."""
        for start in range(0, dense.shape[0], CHUNK_ROWS):
            n = self._load(dense[start:start + CHUNK_ROWS])
            for b, block in enumerate(blocks):
                scores = self._multiply(block)  # [CHUNK_ROWS, QUERY_BLOCK]
                here = min(QUERY_BLOCK, queries - b * QUERY_BLOCK)
                out[b * QUERY_BLOCK:b * QUERY_BLOCK + here, first + start:first + start + n] = scores[:n, :here].T

    def rows(self, dense: np.ndarray, local_rows: np.ndarray, block: torch.Tensor, column: int) -> np.ndarray:
        """[len(local_rows)] float32 scores of some rows of one shard with the query in `column` of `block`."""
        return self.pieces([(dense, local_rows)], block)[0][:, column]

    def pieces(self, pieces: Sequence[tuple[np.ndarray, np.ndarray]], block: torch.Tensor) -> list[np.ndarray]:
        """Scores of rows of several shards with a query block: for each (dense [rows, D] float16, local rows)
        a [len(rows), QUERY_BLOCK] float32 array. Rows of different shards share sgemm blocks (a row's bits do
        not depend on its company), so a few rows from each of many shards cost one block, not one each."""
        outs = [np.empty((len(rows), QUERY_BLOCK), dtype=np.float32) for _, rows in pieces]
        # Every wanted row in order, as (piece, position in the piece), cut into blocks of CHUNK_ROWS.
        owner = np.concatenate([np.full(len(rows), p) for p, (_, rows) in enumerate(pieces)] or [np.zeros(0, int)])
        place = np.concatenate([np.arange(len(rows)) for _, rows in pieces] or [np.zeros(0, int)])
        for start in range(0, len(owner), CHUNK_ROWS):
            chunk_owner, chunk_place = owner[start:start + CHUNK_ROWS], place[start:start + CHUNK_ROWS]
            cuts = np.flatnonzero(np.diff(chunk_owner)) + 1
            runs = list(zip(np.r_[0, cuts], np.r_[cuts, len(chunk_owner)]))
            dense0 = pieces[int(chunk_owner[0])][0]
            buffer = self._rows_buffer(dense0.shape[1])
            for a, b in runs:
                dense, rows = pieces[int(chunk_owner[a])]
                picked = rows[chunk_place[a]:chunk_place[b - 1] + 1]  # [b - a] local rows
                buffer[a:b].copy_(torch.from_numpy(np.ascontiguousarray(dense[picked])))
            n = len(chunk_owner)
            if n < self._local.filled:
                buffer[n:self._local.filled].zero_()  # only what an earlier, longer block left
            self._local.filled = n
            scores = self._multiply(block)  # [CHUNK_ROWS, QUERY_BLOCK]
            for a, b in runs:
                piece = int(chunk_owner[a])
                outs[piece][chunk_place[a]:chunk_place[b - 1] + 1] = scores[a:b]
        return outs
