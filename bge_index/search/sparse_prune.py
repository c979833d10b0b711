"""Sparse rank-safe pruning over a shard's postings (MaxScore, with the longest lists skipped): which rows can
reach a score, and their exact scores.

A row's exact sparse score is defined once, for scans and pruning alike: the
float32 sum, in query-token order, of the float32 products q_w * d_w of the
tokens it shares with the query (`exact_sums`; scoring.Searcher's scan
multiplies and then adds, never a fused multiply-add, so both give the same
bits). Each token's largest |weight| in the shard (the `token-max` search
file, or computed from its postings when the file is missing) bounds what it
can add to any row: |q_w| * max|d_w|.

MaxScore (Turtle and Flood, 1995): if the bounds of some of the query's
tokens sum (with the rounding slack) below a threshold, a row holding none of
the other tokens cannot reach it. So only the rows in the other tokens'
postings are candidates. Which tokens to leave out is free as long as their
bounds stay below the threshold; leaving out the longest postings (the
common tokens, in most rows) reads the least, so `split` takes tokens by
posting length. The candidates' scores are then completed token by token,
each left-out token's exact contribution replacing its bound, largest bound
first, and a candidate is dropped as soon as its sum plus the bounds still
left is below the threshold. Float32 rounding is covered: the computed sum of
n products is within gamma_(n+1) of the real sum of the absolute products
(Higham 3.1), at most gamma times the sum of all the tokens' bounds, which
is added to every bound (`slack`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bge_index.search.dense_kernel import summation_gamma
from bge_index.store.vector_store import ShardVectors

_SLACK = 2.0 ** -40  # relative slack on float64 sums of bounds and products (their rounding is below 2**-50)
_DENSE_UNION = 8  # a token set with more than rows / 8 postings is gathered over all rows (bincount), not sorted


@dataclass
class ShardToken:
    """One query token in one shard: its index among the tokens the shard holds (query order), weight (float32),
    postings slot, posting count, bound |q_w| * max |d_w|, heavy column (or None)."""

    index: int
    weight: np.float32
    slot: int
    count: int
    bound: float
    column: np.ndarray | None


@dataclass
class Candidates:
    """Rows of one shard being scored: local rows ascending, the products of each held query token
    ([tokens, n] float32, query order, 0 where absent or not read yet), which tokens are read, and the float64
    sums of the products read."""

    rows: np.ndarray  # [n] int64
    products: np.ndarray  # [tokens, n] float32
    read: np.ndarray  # [tokens] bool
    partial: np.ndarray  # [n] float64

    def keep(self, mask: np.ndarray) -> "Candidates":
        """The rows where `mask` holds."""
        if mask.all():
            return self
        return Candidates(self.rows[mask], self.products[:, mask], self.read, self.partial[mask])


class SparseShardQuery:
    """One query's tokens as one shard holds them: exact scores of rows, bounds, candidates."""

    def __init__(self, shard: ShardVectors, ids: np.ndarray, weights: np.ndarray, token_max):
        """`token_max(slot) -> float`: the token's largest |weight| in this shard (file or cache)."""
        self.shard = shard
        self.tokens: list[ShardToken] = []  # the query's tokens the shard holds, in query order
        weights = np.asarray(weights, dtype=np.float32)
        total = 0.0
        for token, weight in zip(ids.tolist(), weights):
            at = shard.token_slot(token)
            if at >= 0:
                count = int(shard.token_ptr[at + 1] - shard.token_ptr[at])
                bound = abs(float(weight)) * float(token_max(at))
                total += bound
                self.tokens.append(ShardToken(len(self.tokens), np.float32(weight), at, count, bound,
                                              shard.heavy_column(token)))
        # What float32 rounding of the exact sum (and float64 rounding of ours) may add to any row's real score:
        # gamma_(n+1) over every query token (tokens the shard lacks add exact zeros), and below float32's normal
        # range (2**-126) what each of its n products and n sums may lose absolutely.
        self.slack = (summation_gamma(len(ids) + 1) * total * (1 + _SLACK) + _SLACK * total
                      + (2 * len(ids) + 2) * 2.0 ** -126)

    def postings(self, token: ShardToken) -> tuple[np.ndarray, np.ndarray]:
        """(rows ascending uint32, weights float32) of a token."""
        start, end = self.shard.token_ptr[token.slot], self.shard.token_ptr[token.slot + 1]
        return self.shard.posting_rows[start:end], self.shard.posting_weights[start:end]

    def contributions(self, token: ShardToken, rows: np.ndarray) -> np.ndarray:
        """[n] float32 products q_w * d_w of one token for local rows (ascending), 0 where absent."""
        if token.column is not None:
            return token.column[rows] * token.weight  # zeros where absent
        token_rows, token_weights = self.postings(token)
        out = np.zeros(len(rows), dtype=np.float32)
        local = rows.astype(np.uint32)
        at = np.minimum(np.searchsorted(token_rows, local), len(token_rows) - 1)
        found = token_rows[at] == local
        out[found] = token_weights[at[found]] * token.weight
        return out

    def exact(self, rows: np.ndarray) -> np.ndarray:
        """[n] float32 exact scores of local rows (ascending): products summed in query-token order."""
        if not len(rows) or not self.tokens:
            return np.zeros(len(rows), dtype=np.float32)
        return exact_sums(np.stack([self.contributions(t, rows) for t in self.tokens]))

    def bound_of(self, tokens) -> float:
        """What `tokens` can add to any row's exact score, at most, rounding slack included."""
        return sum(t.bound for t in tokens) * (1 + _SLACK) + self.slack

    def split(self, threshold: float, tokens: list[ShardToken] | None = None
              ) -> tuple[list[ShardToken], list[ShardToken]] | None:
        """(kept, left out) of `tokens` (all by default): the longest postings left out while their bounds' sum,
        with the slack, stays below `threshold`, so a row holding none of the kept ones (and no other token)
        cannot reach it; None when even no token at all does not (rows sharing nothing could reach it)."""
        if not self.slack < threshold:
            return None
        kept, left_out, total = [], [], 0.0
        for token in sorted(self.tokens if tokens is None else tokens, key=lambda t: (-t.count, t.bound)):
            if (total + token.bound) * (1 + _SLACK) + self.slack < threshold:
                left_out.append(token)
                total += token.bound
            else:
                kept.append(token)
        return kept, left_out

    def lower(self, candidates: Candidates) -> np.ndarray:
        """[n] float64 lower bounds of the candidates' exact scores: what is read, less what unread tokens of
        negative weight may take away, less the rounding slack."""
        taken = sum(t.bound for t in self.tokens if not candidates.read[t.index] and t.weight < 0)
        return candidates.partial - taken * (1 + _SLACK) - self.slack

    def gather(self, tokens: list[ShardToken]) -> Candidates:
        """The rows holding one of `tokens` (live ones), with those tokens' products read."""
        read = np.zeros(len(self.tokens), dtype=bool)
        if not tokens:
            return Candidates(np.zeros(0, dtype=np.int64), np.zeros((len(self.tokens), 0), np.float32), read,
                              np.zeros(0))
        pieces = [(t, *self.postings(t)) for t in tokens]
        total = sum(len(r) for _, r, _ in pieces)
        if total * _DENSE_UNION > self.shard.rows:
            held = np.zeros(self.shard.rows, dtype=bool)
            for _, token_rows, _ in pieces:
                held[token_rows] = True
            rows = np.flatnonzero(held)
        else:
            rows = np.unique(np.concatenate([r for _, r, _ in pieces])).astype(np.int64)
        products = np.zeros((len(self.tokens), len(rows)), dtype=np.float32)
        for token, token_rows, token_weights in pieces:
            products[token.index, np.searchsorted(rows, token_rows)] = token_weights * token.weight
            read[token.index] = True
        found = Candidates(rows, products, read, products.sum(axis=0, dtype=np.float64))
        return found if self.shard.live is None else found.keep(self.shard.live[rows])

    def read_columns(self, found: Candidates) -> Candidates:
        """The candidates with the products of the unread tokens that have heavy columns (a gather each)."""
        heavy = [t for t in self.tokens if t.column is not None and not found.read[t.index]]
        if not heavy:
            return found
        found = Candidates(found.rows, found.products.copy(), found.read.copy(), found.partial.copy())
        for token in heavy:
            found.products[token.index] = self.contributions(token, found.rows)
            found.partial += found.products[token.index]
            found.read[token.index] = True
        return found

    def complete(self, found: Candidates, threshold: float, scale: float = 1.0,
                 offset: np.ndarray | None = None) -> Candidates:
        """Candidates completed with every unread token's products, largest bound first; a row is dropped as
        soon as `offset + scale * (its products so far + the bounds still unread)` is below `threshold` (offset:
        [n] float64, e.g. a weighted dense bound; scale >= 0). Every survivor has every token read."""
        extra = np.zeros(len(found.rows)) if offset is None else offset
        unread = sorted((t for t in self.tokens if not found.read[t.index]), key=lambda t: -t.bound)
        found = Candidates(found.rows, found.products.copy(), found.read.copy(), found.partial.copy())
        for done in range(len(unread) + 1):
            keep = extra + scale * (found.partial + self.bound_of(unread[done:])) >= threshold
            if not keep.all():
                found, extra = found.keep(keep), extra[keep]
            if done == len(unread) or not len(found.rows):
                break
            token = unread[done]
            found.products[token.index] = self.contributions(token, found.rows)
            found.partial += found.products[token.index]
            found.read[token.index] = True
        found.read[:] = True  # (an empty set: nothing left to read)
        return found

    def reaching(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(live local rows ascending, their float32 exact scores) of every row that can reach `threshold` (above
        the slack; see `split`): the rows holding a kept token, cut by what those tokens give them plus the
        left-out bounds, then completed token by token."""
        kept, left_out = self.split(threshold)
        rows, partial = self.sums(kept)
        if self.shard.live is not None:
            live = self.shard.live[rows]
            rows, partial = rows[live], partial[live]
        keep = partial + self.bound_of(left_out) >= threshold
        rows, partial = rows[keep], partial[keep]
        # The kept tokens are in `partial` already; their products are looked up for the survivors only.
        read = np.zeros(len(self.tokens), dtype=bool)
        read[[t.index for t in kept]] = True
        found = self.complete(Candidates(rows, np.zeros((len(self.tokens), len(rows)), np.float32), read, partial),
                              threshold)
        for token in kept:
            found.products[token.index] = self.contributions(token, found.rows)
        return found.rows, exact_sums(found.products)

    def sums(self, tokens: list[ShardToken]) -> tuple[np.ndarray, np.ndarray]:
        """(local rows ascending, float64 sums of their exact products q_w * d_w over `tokens`) of every row
        holding one of `tokens` (deleted ones too): one pass over those postings."""
        pieces = [self.postings(t) for t in tokens]
        total = sum(len(r) for r, _ in pieces)
        if not total:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        rows = np.concatenate([r for r, _ in pieces])
        values = np.concatenate([w.astype(np.float64) * float(t.weight) for t, (_, w) in zip(tokens, pieces)])
        if total * _DENSE_UNION > self.shard.rows:
            sums = np.bincount(rows, weights=values, minlength=self.shard.rows)  # [rows]
            held = np.zeros(self.shard.rows, dtype=bool)
            held[rows] = True
            union = np.flatnonzero(held)
            return union, sums[union]
        union, inverse = np.unique(rows, return_inverse=True)
        return union.astype(np.int64), np.bincount(inverse, weights=values, minlength=len(union))

    def short_tokens(self, fraction: int) -> list[ShardToken]:
        """The tokens with at most rows / fraction postings: cheap to read for every row that holds them."""
        return [t for t in self.tokens if t.count * fraction <= self.shard.rows]


def exact_sums(products: np.ndarray) -> np.ndarray:
    """[n] float32: each row's products ([tokens, n] float32 in query order, 0 where the row lacks the token)
    summed in query-token order, one float32 addition at a time: the exact sparse score."""
    totals = np.zeros(products.shape[1], dtype=np.float32)
    for values in products:
        totals += values
    return totals


def token_max_of(shard: ShardVectors, cache: dict[int, float]):
    """`slot -> max |weight|` for one shard: from its token-max file, else computed once per token and cached."""
    if shard.token_max is not None:
        return lambda slot: float(shard.token_max[slot])

    def computed(slot: int) -> float:
        if slot not in cache:
            start, end = shard.token_ptr[slot], shard.token_ptr[slot + 1]
            cache[slot] = float(np.abs(shard.posting_weights[start:end]).max()) if end > start else 0.0
        return cache[slot]

    return computed
