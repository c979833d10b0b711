"""Dense rank-safe pruning: one int8 pass bounds every row's exact dense score, above and below.

A shard's pruning files (store/vector_store.py) hold each row x as
`x = c + s * k + e`: the shard's center c, per-dimension steps s, int8 codes
k, and an error e; per row, rounded up: |k|, |e|, |x| and |e.u|, u being the
center's direction. For a float32 query q, let w = s * q (exact in float64),
t = max|w| / L, wc = round(w / t) (integers up to L), f = w - t * wc,
alpha = q.u and q_perp = q - alpha * u. Then, in real arithmetic,

    x.q = c.q + t * (k . wc) + k.f + alpha * e.u + e.q_perp

where I = k . wc is an integer computed exactly: int8 products summed in
int32 by torch._int_mm (at most D * 127 * 127 < 2**31 per product). On
shards whose rows crowd in a cone (|c| >= 0.5, as real embeddings do) the
query takes two int8 digits, wc = 128 * hi + lo (L = 127 * 128), so its own
rounding f is 128 times smaller, and I = 128 * (k . hi) + k . lo. By
Cauchy-Schwarz |k.f| <= |k| |f| and |e.q_perp| <= |e| |q_perp|; in a cone
q_perp is short, which is what makes the bound tight there. The exact
kernel's float32 result is within gamma_D |x| |q| of x.q (dense_kernel.py).
So a row's computed exact score lies within

    m + t * I  +-  (|k| |f| + |alpha| |e.u| + |e| |q_perp| + gamma_D |x| |q| + tiny + slack)

with m = c.q, and `tiny` what float32 may lose below its normal range
(2**-126 per product and sum, and per query component flushed to zero:
nothing at real scores). Every quantity is evaluated in float64; `slack`
(2**-40 of the terms' magnitude) covers that evaluation's rounding many
times over, and |f|, |q_perp| are computed with slack too. A row whose
upper bound is below the k-th best exact score found so far cannot be in the
top-k nor tie with it: it is never rescored.

The pass reads half the bytes of the float16 matrix and serves a block of
queries at once (one `_int_mm` per shard); its integer results are exact, so
a query's bounds, like its exact scores, do not depend on the queries beside
it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from bge_index.search.dense_kernel import summation_gamma
from bge_index.store.vector_store import CODE_LEVELS, ShardVectors

INT8_QUERY_BLOCK = 32  # queries per int8 pass (their [32, rows] int32 products are held for the whole batch)
DIGIT = 128  # the high digit's weight when a query takes two int8 digits
CONE = 0.5  # a shard whose center is at least this long (rows in a cone) gives queries two digits
_INT8_CHUNK_ROWS = 65536  # rows per _int_mm call (bounds the kernel's own packing buffers; a multiple of BLOCK_ROWS)
_SLACK = 2.0 ** -40  # relative slack on float64 evaluations of a bound (their rounding is below 2**-50)
_FLOAT32_TINY = 2.0 ** -126  # float32's smallest normal number: what an underflow may lose, at most
_OUTLIER = 4.0  # rows whose error bound is this many times the median get their own bound, always
BLOCK_ROWS = 64  # rows per block whose largest product is kept: cuts skip whole blocks, seeds are block maxima
_SLAB_PAIRS = 8192  # (query, block) pairs whose rows the hybrid cut tests at once: about 20 MB of temporaries
_MISSING = np.iinfo(np.int32).min  # the product given to deleted rows, so they never rank among the best
_int_mm_checked: bool | None = None
_simsimd_checked = None  # the simsimd module once checked exact, False when not usable
_packed_checked: bool | None = None  # whether oneDNN's int8 linear on packed codes is exact here
_packed_lock = threading.Lock()
# The packed kernel sums (q + 128) * k in int32 and hands the sum to float32 before taking 128 * sum(k) back off:
# exact while 255 * sum |k| < 2**24, i.e. while no row's codes sum to PACK_MAX_L1 in absolute value or more.
PACK_MAX_L1 = (2 ** 24 - 1) // 255
PACK_CHECK_WIDTHS = (1, 2, 4, 5, 16, 33, 2 * INT8_QUERY_BLOCK)  # pass widths (queries x digits) checked exact


def _int_mm_is_exact() -> bool:
    """Whether torch._int_mm exists here and sums int8 products exactly in int32 (checked once per process, with
    the extreme codes a saturating int16 kernel would get wrong, and random ones)."""
    global _int_mm_checked
    if _int_mm_checked is None:
        try:
            rng = np.random.default_rng(0)
            a = rng.integers(-CODE_LEVELS, CODE_LEVELS + 1, (64, 256), dtype=np.int8)
            b = rng.integers(-CODE_LEVELS, CODE_LEVELS + 1, (256, 8), dtype=np.int8)
            a[0], a[1], b[:, 0], b[:, 1] = CODE_LEVELS, -CODE_LEVELS, CODE_LEVELS, -CODE_LEVELS
            got = torch._int_mm(torch.from_numpy(a), torch.from_numpy(b)).numpy()
            _int_mm_checked = bool(np.array_equal(got, a.astype(np.int64) @ b.astype(np.int64)))
        except (AttributeError, RuntimeError, NotImplementedError):
            _int_mm_checked = False
    return _int_mm_checked


def _simsimd_dot():
    """SimSIMD's int8 `cdist` when it is installed and sums int8 products exactly here (checked once per
    process, like _int_mm), else None."""
    global _simsimd_checked
    if _simsimd_checked is None:
        _simsimd_checked = False
        try:
            import simsimd

            rng = np.random.default_rng(1)
            a = rng.integers(-CODE_LEVELS, CODE_LEVELS + 1, (64, 256), dtype=np.int8)
            b = rng.integers(-CODE_LEVELS, CODE_LEVELS + 1, (1, 256), dtype=np.int8)
            a[0], a[1], b[0, :128] = CODE_LEVELS, -CODE_LEVELS, CODE_LEVELS
            # threads: torch's own count, never another: SimSIMD sets it as OpenMP's, and when torch was loaded
            # first that is torch's OpenMP runtime (threads=1 here left every later sgemm on one core).
            got = np.asarray(simsimd.cdist(a, b, metric="dot", threads=torch.get_num_threads()),
                             dtype=np.float64)[:, 0]
            if np.array_equal(got, (a.astype(np.int64) @ b[0].astype(np.int64)).astype(np.float64)):
                _simsimd_checked = simsimd
        except (ImportError, AttributeError, TypeError, ValueError, RuntimeError):
            pass
    return _simsimd_checked or None


def int8_products(codes: np.ndarray, query_codes: np.ndarray, on_chunk=None) -> np.ndarray:
    """[rows, Q] int32 exact products of a shard's [rows, D] int8 codes with [D, Q] int8 query codes.

    `on_chunk(start, products)`, when given, sees each chunk of rows' [c, Q] int32 products (a torch view of the
    result, writable) as soon as it is made, while it is still in the cache (ShardPass's block maxima); chunks
    start at multiples of _INT8_CHUNK_ROWS.

    One query column: SimSIMD's int8 dot products (VNNI), which stream the codes at about twice the speed of
    a one-column _int_mm here (BENCHMARKS.md, issue 17). Several: torch._int_mm (oneDNN: VNNI / AMX), whose
    cost hardly grows with the columns. Each only when checked exact here; else float64 matmuls, exact too
    (every partial sum is an integer below 2**53).
    """
    rows = codes.shape[0]
    if query_codes.shape[1] == 1 and rows and (simsimd := _simsimd_dot()) is not None:
        query = np.ascontiguousarray(query_codes.T, dtype=np.int8)  # [1, D]
        dots = np.asarray(simsimd.cdist(codes, query, metric="dot", threads=torch.get_num_threads()))  # see above
        products = dots.reshape(rows, 1).astype(np.int32)  # exact integers below 2**31
        if on_chunk is not None:
            on_chunk(0, torch.from_numpy(products))
        return products
    out = torch.empty(rows, query_codes.shape[1], dtype=torch.int32)  # [rows, Q]
    # A fresh tensor with plain strides: a numpy [D, 1] view may carry a 0 stride that oneDNN misreads.
    right = torch.empty(query_codes.shape, dtype=torch.int8)
    right.copy_(torch.from_numpy(np.asarray(query_codes, dtype=np.int8)))
    exact_int8 = _int_mm_is_exact()
    for start in range(0, rows, _INT8_CHUNK_ROWS):
        left = torch.from_numpy(codes[start:start + _INT8_CHUNK_ROWS])  # [c, D] int8, a view of the map
        chunk = out[start:start + left.shape[0]]  # [c, Q], contiguous
        if exact_int8:
            torch._int_mm(left, right, out=chunk)  # written in place: no copy of the [rows, Q] result
        else:
            chunk.copy_(torch.mm(left.double(), right.double()).to(torch.int32))
        if on_chunk is not None:
            on_chunk(start, chunk)
    return out.numpy()  # [rows, Q]: queries side by side (the passes below work on all of them at once)


def _qlinear(packed: torch.Tensor, rows: int, query_codes: np.ndarray) -> torch.Tensor:
    """[Q, rows] float32 products of packed codes with [D, Q] int8 query codes: oneDNN's u8 x s8 linear, the
    queries shifted by 128 into uint8 and the shift taken back as a zero point, every scale 1."""
    shifted = torch.from_numpy((query_codes.T.astype(np.int16) + 128).astype(np.uint8))  # [Q, D]
    return torch.ops.onednn.qlinear_pointwise(shifted, 1.0, 128, packed, torch.ones(rows),
                                              torch.zeros(rows, dtype=torch.long), None, 1.0, 0, torch.float32,
                                              "none", [], "")


def _packed_exact(packed: torch.Tensor, codes: np.ndarray, rows: np.ndarray, seed: int,
                  widths: tuple[int, ...] = PACK_CHECK_WIDTHS) -> bool:
    """Whether the packed kernel gives the exact products of `rows` of `codes` for queries of each of `widths`,
    extreme query codes included (columns of +127 and -127)."""
    rng = np.random.default_rng(seed)
    for width in widths:
        query_codes = rng.integers(-CODE_LEVELS, CODE_LEVELS + 1, (codes.shape[1], width), dtype=np.int8)
        query_codes[:, 0] = CODE_LEVELS  # the kernel's largest sum: 255 * sum |k|
        if width > 1:
            query_codes[:, 1] = -CODE_LEVELS
        got = _qlinear(packed, len(codes), query_codes).numpy()[:, rows].astype(np.float64)
        if not np.array_equal(got, (np.asarray(codes[rows], dtype=np.int64) @ query_codes.astype(np.int64)).T):
            return False
    return True


def _kernel_is_exact() -> bool:
    """Whether oneDNN's packed int8 linear is here and exact up to the PACK_MAX_L1 limit: checked once per
    process on codes at that limit (every code +-127) and random ones, for every width of PACK_CHECK_WIDTHS."""
    global _packed_checked
    with _packed_lock:  # one check, whichever thread asks first; the others wait for its answer
        if _packed_checked is None:
            try:
                rng = np.random.default_rng(2)
                dim = PACK_MAX_L1 // CODE_LEVELS  # 518: a row of +-127 codes sums to just under the limit
                codes = rng.integers(-CODE_LEVELS, CODE_LEVELS + 1, (96, dim), dtype=np.int8)
                codes[0], codes[1] = CODE_LEVELS, -CODE_LEVELS
                codes[2] = np.where(rng.random(dim) < 0.5, CODE_LEVELS, -CODE_LEVELS)
                packed = torch.ops.onednn.qlinear_prepack(torch.from_numpy(codes), [INT8_QUERY_BLOCK, dim])
                _packed_checked = _packed_exact(packed, codes, np.arange(len(codes)), 2)
            except (AttributeError, RuntimeError, NotImplementedError, ValueError):
                _packed_checked = False
        return _packed_checked


def _largest_l1(codes: np.ndarray) -> tuple[int, np.ndarray]:
    """(the largest sum |k| of a row of `codes`, the rows of the 64 largest sums), one pass, chunk by chunk."""
    sums = torch.empty(len(codes), dtype=torch.int32)
    for start in range(0, len(codes), 8192):  # int32 copies of 32 MiB at 1,024 dimensions
        chunk = torch.from_numpy(codes[start:start + 8192]).to(torch.int32)  # widened first: |-128| is 128
        torch.sum(chunk.abs_(), dim=1, out=sums[start:start + len(chunk)])
    top = torch.topk(sums, min(64, len(codes))).indices.numpy()
    return int(sums.max()), top


def pack_codes(codes: np.ndarray, code_norms: np.ndarray | None = None) -> torch.Tensor | None:
    """oneDNN's packed copy of a shard's [rows, D] int8 codes, for every pass (shard_pass): a pass then reads
    codes laid out for its int8 kernel (VNNI / AMX) instead of re-packing them on every call (_int_mm). It holds
    a copy of the codes in memory (their size; the mapped codes are no longer read).

    None (the shard keeps _int_mm) where oneDNN's int8 linear is missing or not exact here (checked once per
    process), where a row's codes sum to PACK_MAX_L1 or more in absolute value (the kernel's float32 sum would
    round; BGE-M3's codes sum to about a third of it), or where the packed copy fails its own check (this shard's
    first and last rows and the rows of largest sum, a lone query's widths and the widest) or oneDNN refuses it.
    `code_norms`: the rows' |k| rounded up (the dense-bounds file's first column): sum |k| <= sqrt(D) |k| spares
    a pass over the codes when that bound is below the limit.
    """
    if not len(codes) or not codes.shape[1] or not _kernel_is_exact():
        return None
    try:
        if code_norms is not None and len(code_norms) == len(codes) and \
                float(np.max(code_norms)) * np.sqrt(codes.shape[1]) * (1 + 2 ** -20) < PACK_MAX_L1:
            heavy_rows = np.argpartition(-np.asarray(code_norms), min(63, len(codes) - 1))[:64]
        else:
            largest, heavy_rows = _largest_l1(codes)
            if largest >= PACK_MAX_L1:
                return None
        packed = torch.ops.onednn.qlinear_prepack(torch.from_numpy(codes), [INT8_QUERY_BLOCK, codes.shape[1]])
        sample = np.unique(np.concatenate([np.arange(min(128, len(codes))),
                                           np.arange(max(0, len(codes) - 128), len(codes)), heavy_rows]))
        # (each check is a pass over the whole shard: a lone query's widths and the widest only, the kernel's
        # exactness at PACK_CHECK_WIDTHS and at the limit having been checked once per process)
        if not _packed_exact(packed, codes, sample, 3, (1, 2, 2 * INT8_QUERY_BLOCK)):
            return None
    except (RuntimeError, ValueError, MemoryError):  # oneDNN refused this shard (or memory ran out): _int_mm
        return None
    return packed


@dataclass
class ShardPruneInfo:
    """What one shard's bounds need beyond its files, computed once: the per-row bounds' maxima over all but the
    outlier rows (whose bounds are always evaluated one by one), the center's length, gamma_D, the digits."""

    code_max: float
    error_max: float
    norm_max: float
    along_max: float
    outliers: np.ndarray  # local rows, ascending
    center_norm: float
    gamma: float
    digits: int
    packed: torch.Tensor | None = None  # pack_codes' copy, made when asked (PrunedSearch.pack), set once
    pack_tried: bool = False

    @classmethod
    def of(cls, shard: ShardVectors) -> "ShardPruneInfo":
        """From the shard's dense-bounds and dense-frame (deleted rows included: their bounds are true too)."""
        bounds = shard.row_bounds.astype(np.float64)  # [rows, 4]: |k|, |e|, |x|, |e.u|
        if len(bounds):
            typical = np.median(bounds, axis=0)
            outlying = (bounds[:, 1] > _OUTLIER * typical[1]) | (bounds[:, 3] > 2 * _OUTLIER * typical[3])
            top = bounds[~outlying].max(axis=0) if not outlying.all() else np.zeros(4)
            outliers = np.flatnonzero(outlying)
        else:
            top, outliers = np.zeros(4), np.zeros(0, dtype=np.int64)
        center_norm = float(np.linalg.norm(shard.frame[0].astype(np.float64)))
        return cls(float(top[0]), float(top[1]), float(top[2]), float(top[3]), outliers, center_norm,
                   summation_gamma(shard.frame.shape[1]), 2 if center_norm >= CONE else 1)


@dataclass
class QueryFrame:
    """One float32 query seen in one shard's frame (see the module): m = c.q, the step t, the int8 digits,
    and bounds on |f|, |q|, |q_perp| and |alpha|."""

    center_dot: float
    step: float
    digits: np.ndarray  # [D, 1 or 2] int8: wc, or (hi, lo) with wc = 128 * hi + lo
    rest_norm: float  # >= |f|
    query_norm: float  # >= |q|
    across_norm: float  # >= |q_perp|
    along: float  # |alpha|

    @classmethod
    def many(cls, queries: np.ndarray, frame: np.ndarray, digits: int) -> list["QueryFrame"]:
        """The frames of [Q, D] float32 queries in a shard's `frame` ([3, D] float32: center, steps, direction),
        computed for all of them at once."""
        q = queries.astype(np.float64)  # [Q, D]
        weighted = frame[1].astype(np.float64) * q  # [Q, D], exact: two float32 factors
        levels = CODE_LEVELS * (DIGIT if digits == 2 else 1)
        top = np.abs(weighted).max(axis=1) if weighted.shape[1] else np.zeros(len(q))  # [Q]
        usable = (top > 0) & np.isfinite(top)
        step = np.where(usable, top, 0.0) / levels  # [Q]; 0: no step (codes 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            codes = np.where(usable[:, None], np.clip(np.rint(weighted / step[:, None]), -levels, levels), 0.0)
        rest = weighted - step[:, None] * codes  # float64: within 2**-52 of |step * codes| + |rest| per component
        rest_norm = np.linalg.norm(rest, axis=1) * (1 + _SLACK) + _SLACK * np.linalg.norm(weighted, axis=1)
        if digits == 2:
            high = np.rint(codes / DIGIT)
            low = codes - DIGIT * high  # [Q, D] in [-64, 64]
            columns = np.stack([high, low], axis=2)  # [Q, D, 2]
        else:
            columns = codes[:, :, None]  # [Q, D, 1]
        direction = frame[2].astype(np.float64)
        length = float(direction @ direction)
        alpha = (q @ direction) / length if length > 0 else np.zeros(len(q))  # [Q]
        across = q - alpha[:, None] * direction  # float64, within 2**-52 of |q| + |alpha u| per component
        query_norm = np.linalg.norm(q, axis=1)
        across_norm = (np.linalg.norm(across, axis=1) * (1 + _SLACK)
                       + _SLACK * (query_norm + np.abs(alpha) * np.sqrt(length)))
        center_dot = q @ frame[0].astype(np.float64)
        return [cls(float(center_dot[i]), float(step[i]), columns[i].astype(np.int8), float(rest_norm[i]),
                    float(query_norm[i]) * (1 + _SLACK), float(across_norm[i]), abs(float(alpha[i])))
                for i in range(len(q))]


class DenseShardBound:
    """Bounds on one query's exact dense scores over one shard's rows, from its int8 products."""

    def __init__(self, shard: ShardVectors, info: ShardPruneInfo, frame: QueryFrame, high: np.ndarray,
                 low: np.ndarray | None = None):
        """`high`, `low`: [rows] int32, this query's columns of int8_products (the one digit, or the two);
        deleted rows' `high` set to the int32 minimum."""
        self.shard, self.info, self.frame = shard, info, frame
        self._high, self._low = high, low
        dim = shard.frame.shape[1]
        self.gamma = info.gamma
        # Below float32's normal range the kernel's products and sums lose absolutely, not relatively (or are
        # flushed to zero, inputs too): at most 2**-126 for each of its D products and D sums, and for each
        # query component read as 0 (|x_i| 2**-126 each, sqrt(D) |x| 2**-126 in all). Nothing, at real scores.
        self._tiny_terms, self._tiny_norm = (2 * dim + 2) * _FLOAT32_TINY, np.sqrt(dim) * _FLOAT32_TINY
        # The largest error term of a row that is not an outlier, and the float64 evaluation slack.
        self.error_max = self._error(info.code_max, info.error_max, info.norm_max, info.along_max)
        integers = dim * CODE_LEVELS * CODE_LEVELS * (DIGIT + 1)
        magnitude = (abs(frame.center_dot) + info.center_norm * frame.query_norm + frame.step * integers
                     + self.error_max + info.norm_max * frame.query_norm)
        self.slack = _SLACK * magnitude

    def _error(self, code, error, norm, along):
        f = self.frame
        return (code * f.rest_norm + f.along * along + error * f.across_norm + self.gamma * norm * f.query_norm
                + self._tiny_terms + self._tiny_norm * norm)

    def integers(self, rows: np.ndarray) -> np.ndarray:
        """[n] float64 exact I = k . wc of some rows (128 * hi + lo with two digits; below 2**53: exact)."""
        high = self._high[rows].astype(np.float64)
        return high if self._low is None else DIGIT * high + self._low[rows]

    def abs_max(self) -> float:
        """An upper bound of |exact score| over the shard's rows: max |x| |q| (1 + gamma), with room."""
        norm = max(self.info.norm_max, float(self.shard.row_bounds[self.info.outliers, 2].max())
                   if len(self.info.outliers) else 0.0)
        return norm * self.frame.query_norm * (1 + 2 * self.gamma) + self.slack

    def approx(self, rows: np.ndarray) -> np.ndarray:
        """[n] float64 estimates m + t * I of some rows' scores."""
        return self.frame.center_dot + self.frame.step * self.integers(rows)

    def error(self, rows: np.ndarray) -> np.ndarray:
        """[n] float64: how far each row's exact score may be from `approx`, at most."""
        bounds = self.shard.row_bounds[rows].astype(np.float64)  # [n, 4]: |k|, |e|, |x|, |e.u|
        return self._error(bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3]) + self.slack

    def upper(self, rows: np.ndarray) -> np.ndarray:
        """[n] float64 upper bounds of some rows' exact scores."""
        return self.approx(rows) + self.error(rows)

    def lower(self, rows: np.ndarray) -> np.ndarray:
        """[n] float64 lower bounds of some rows' exact scores."""
        return self.approx(rows) - self.error(rows)

    def _pass(self) -> "ShardPass":
        """A ShardPass over this query alone."""
        return ShardPass(self.shard, [self], self._high[:, None], low=None if self._low is None else self._low[:, None])

    def best(self, count: int) -> np.ndarray:
        """Local rows of about the `count` highest estimates among live rows (by the high digit; fewer when
        fewer are live). Any rows would be correct seeds: these make the first threshold tight."""
        return self._pass().best(count)[0]

    def cut(self, threshold: float) -> float:
        """The integer I = k . wc (both digits: 128 * hi + lo) below which a row that is not an outlier cannot
        reach `threshold`: it would need t * I >= threshold - m - error_max. -inf: every row may; +inf: none;
        NaN (a NaN threshold): none."""
        offset, step = self.cut_terms()
        need = threshold - offset
        if not step > 0:
            return -np.inf if need <= 0 else (np.inf if need > 0 else np.nan)
        with np.errstate(invalid="ignore"):
            return float(np.floor(need / step) - 1)  # the division's rounding is far below 1

    def cut_terms(self) -> tuple[float, float]:
        """(m + error_max + slack: the most a row that is not an outlier scores above t * I; the step t): a row's
        upper bound is at most offset + t * I."""
        return self.frame.center_dot + self.error_max + self.slack, self.frame.step

    def reaching(self, threshold: float) -> np.ndarray:
        """Live local rows (ascending) whose upper bound reaches `threshold`."""
        return self._pass().reaching([threshold])[0]


class ShardPass:
    """One int8 pass over a shard for a block of queries: each query's DenseShardBound, and what is done for
    all of them over the shard's rows. Both use the maxima of blocks of BLOCK_ROWS rows: the best estimates
    are the best blocks' best rows, and the integer cut looks into a block only when its maximum passes."""

    def __init__(self, shard: ShardVectors, bounds: list[DenseShardBound], high: np.ndarray,
                 block_max: np.ndarray | None = None, low: np.ndarray | None = None,
                 low_block_max: np.ndarray | None = None):
        """`high`: [rows, Q] int32, each query's high digit (deleted rows at the int32 minimum); `block_max`:
        its [blocks, Q] maxima when already made (block_maxima), else computed here. With two digits, `low` and
        `low_block_max` the same for the low digit (None with one)."""
        self.shard, self.bounds, self.high, self.low = shard, bounds, high, low
        self.block_max = _block_maxima_of(high) if block_max is None else block_max  # [blocks, Q]
        self.low_block_max = None if low is None else (_block_maxima_of(low) if low_block_max is None
                                                        else low_block_max)

    def block_integers(self) -> np.ndarray:
        """[blocks, Q] float64, at least each block's largest I for each query (128 * its largest high digit +
        its largest low digit, with two digits)."""
        high = self.block_max.astype(np.float64)
        return high if self.low is None else DIGIT * high + self.low_block_max

    def _rows_of(self, blocks: np.ndarray) -> np.ndarray:
        """The local rows (ascending) of some blocks (ascending)."""
        rows = (blocks[:, None] * BLOCK_ROWS + np.arange(BLOCK_ROWS)).reshape(-1)
        return rows[rows < self.shard.rows]

    def best(self, count: int) -> list[np.ndarray]:
        """Per query, local rows of about the `count` highest estimates among live rows: the best row of each of
        the `count` blocks with the highest maxima (fewer when fewer rows are live)."""
        live = self.shard.rows if self.shard.live is None else int(self.shard.live.sum())
        if count * 4 > len(self.block_max):  # about as many rows wanted as there are blocks: the rows' own top
            count = min(count, live)
            if count <= 0:
                return [np.zeros(0, dtype=np.int64) for _ in self.bounds]
            top = torch.topk(torch.from_numpy(self.high), count, dim=0, sorted=False).indices.numpy()  # [count, Q]
            return [top[:, i].astype(np.int64) for i in range(len(self.bounds))]
        if min(count, live) <= 0:
            return [np.zeros(0, dtype=np.int64) for _ in self.bounds]
        # Every query at once: its `count` best blocks ([count, Q]), then each block's best row.
        blocks = torch.topk(torch.from_numpy(np.ascontiguousarray(self.block_max)), count, dim=0,
                            sorted=False).indices.numpy()  # [count, Q]
        queries = np.arange(len(self.bounds))
        rows = block_rows(blocks, self.shard.rows)  # [c, Q, 64]
        best = np.take_along_axis(rows, self.high[rows, queries[None, :, None]].argmax(axis=2)[:, :, None], 2)[:, :, 0]
        # A block of deleted rows only (its maximum the int32 minimum) gives no seed.
        return [np.sort(column[self.high[column, i] > _MISSING]) for i, column in enumerate(best.T)]

    def reaching(self, thresholds: list[float]) -> list[np.ndarray]:
        """Per query, the live local rows (ascending) whose upper bound reaches its threshold: the integer cut
        (over the blocks whose maximum passes it), then each passing row (and every outlier) gets its own bound."""
        outliers = self.bounds[0].info.outliers
        block_integers = self.block_integers()  # [blocks, Q]
        out = []
        for i, (bound, threshold) in enumerate(zip(self.bounds, thresholds)):
            cut = bound.cut(threshold)
            rows = self._rows_of(np.flatnonzero(block_integers[:, i] >= cut))
            # (a deleted row's high digit is the int32 minimum, but with two digits a cut far below every live
            # row may still let it through: the live mask below is what keeps deleted rows out)
            rows = rows[bound.integers(rows) >= cut]
            if len(outliers):
                rows = np.union1d(rows, outliers)
            if self.shard.live is not None:
                rows = rows[self.shard.live[rows]]
            out.append(rows[bound.upper(rows) >= threshold])
        return out

    def reaching_with(self, thresholds: np.ndarray, weight: float, extra: np.ndarray, extra_weight: float,
                      extra_max: np.ndarray | None = None) -> list[np.ndarray]:
        """Per query i, the live local rows (ascending) where weight * (its dense upper bound) + extra_weight *
        extra[row, i] reaches thresholds[i] (weight > 0; `extra`: [rows, Q] float32, any strides, another
        part's exact score or bound per row, e.g. sparse, -inf on deleted rows; `extra_max`: its [blocks, Q]
        block maxima (value_block_maxima) when already made; the arithmetic is float64).

        A linear test in the integer I (both digits) and `extra`, first on each block's maxima, then on the rows
        of the blocks that pass, then each passing row's own bound; every query at once."""
        count = len(self.bounds)
        thresholds = np.asarray(thresholds, dtype=np.float64)
        if extra_max is None:
            extra_max = value_block_maxima(extra)
        # A row that is not an outlier has dense upper bound <= offset + step * I (see cut_terms), so it can
        # reach only if a * I + extra_weight * extra + c >= 0, a and c below (per query, float64; c holds room
        # for that sum's rounding, |I| <= D * 127 * (127 * 128 + 64) < 2**39 as int32 products bound D). The
        # test rises with I and with extra, so a block whose maxima (block_integers) fail it holds no row that
        # passes; deleted rows fail it by their extra, -inf.
        terms = [bound.cut_terms() for bound in self.bounds]
        offset, step = np.array([t[0] for t in terms]), np.array([t[1] for t in terms])  # [Q]
        a = weight * step  # [Q]
        c = weight * offset - thresholds
        with np.errstate(invalid="ignore"):  # (a threshold of -inf: every row passes but deleted ones, NaN)
            c = c + _SLACK * (np.abs(a) * 2.0 ** 39 + np.abs(c) + np.abs(thresholds))
            passing = a * self.block_integers() + extra_weight * extra_max.astype(np.float64) + c >= 0  # [blocks, Q]
        queries, blocks = np.nonzero(passing.T)  # query-major: each query's blocks ascending
        # The rows of each passing (query, block) pair, 64 at a time: [pairs, 64] slabs of the digits and of
        # `extra` (a shorter last block's missing rows read as deleted), at most _SLAB_PAIRS pairs at once (where
        # little is pruned, all of them would take about 60 bytes per row and query).
        full = self.shard.rows // BLOCK_ROWS
        pieces: list[list[np.ndarray]] = [[] for _ in range(count)]  # per query, its rows ascending
        for start in range(0, len(blocks), _SLAB_PAIRS):
            some_blocks, some_queries = blocks[start:start + _SLAB_PAIRS], queries[start:start + _SLAB_PAIRS]
            integers = _block_slabs(self.high, full, some_blocks, some_queries, _MISSING).astype(np.float64)
            if self.low is not None:
                integers = DIGIT * integers + _block_slabs(self.low, full, some_blocks, some_queries, 0)
            extras = _block_slabs(extra, full, some_blocks, some_queries, -np.inf)
            with np.errstate(invalid="ignore"):  # deleted rows: extra -inf, never passing
                keep = (a[some_queries, None] * integers + extra_weight * extras.astype(np.float64)
                        + c[some_queries, None] >= 0)
            pairs, places = np.nonzero(keep)  # pair-major, rows ascending within a pair
            rows, owners = some_blocks[pairs] * BLOCK_ROWS + places, some_queries[pairs]
            ends = np.searchsorted(owners, np.arange(count + 1))
            for i in np.unique(owners):
                pieces[i].append(rows[ends[i]:ends[i + 1]])
        out = []
        for i, bound in enumerate(self.bounds):
            found = np.concatenate(pieces[i]) if pieces[i] else np.zeros(0, dtype=np.int64)
            if len(bound.info.outliers):
                found = np.union1d(found, bound.info.outliers)
            if self.shard.live is not None:
                found = found[self.shard.live[found]]
            with np.errstate(invalid="ignore"):  # (0 * -inf: NaN, never reaching)
                reach = weight * bound.upper(found) + extra_weight * extra[found, i].astype(np.float64) >= thresholds[i]
            out.append(found[reach])
        return out


class ExactShardBound:
    """A shard without pruning files: its exact dense scores, scanned, stand in for bounds (error 0)."""

    def __init__(self, shard: ShardVectors, scores: np.ndarray):
        """`scores`: [rows] float32 exact scores from the dense kernel's scan (deleted rows -inf)."""
        self.shard, self.scores = shard, scores

    def approx(self, rows: np.ndarray) -> np.ndarray:
        """[n] float64 exact scores."""
        return self.scores[rows].astype(np.float64)

    upper = lower = approx

    def abs_max(self) -> float:
        """The largest |exact score| of a live row (0 when none is live)."""
        finite = self.scores[np.isfinite(self.scores)]
        return float(np.abs(finite).max()) if len(finite) else 0.0

    def best(self, count: int) -> np.ndarray:
        """Local rows of the `count` highest live scores."""
        finite = np.flatnonzero(np.isfinite(self.scores))
        if len(finite) <= count:
            return finite
        return finite[np.argpartition(-self.scores[finite], count - 1)[:count]]

    def reaching(self, threshold: float) -> np.ndarray:
        """Live local rows (ascending) whose exact score reaches `threshold`."""
        return np.flatnonzero(self.scores >= threshold)

    def exact(self, rows: np.ndarray) -> np.ndarray:
        """[n] float32 exact scores (already computed)."""
        return self.scores[rows]


class ExactPass:
    """A shard without pruning files, scanned: its exact scores stand in for bounds, query by query."""

    def __init__(self, bounds: list[ExactShardBound]):
        self.bounds = bounds

    def best(self, count: int) -> list[np.ndarray]:
        """Per query, local rows of the `count` highest live scores."""
        return [b.best(count) for b in self.bounds]

    def reaching(self, thresholds: list[float]) -> list[np.ndarray]:
        """Per query, live local rows (ascending) whose exact score reaches its threshold."""
        return [b.reaching(t) for b, t in zip(self.bounds, thresholds)]

    def reaching_with(self, thresholds: np.ndarray, weight: float, extra: np.ndarray, extra_weight: float,
                      extra_max: np.ndarray | None = None) -> list[np.ndarray]:
        """Per query i, the live local rows (ascending) where weight * exact + extra_weight * extra[row, i]
        reaches thresholds[i] (`extra_max` is not needed here)."""
        out = []
        for i, (bound, threshold) in enumerate(zip(self.bounds, thresholds)):
            scores = bound.scores.astype(np.float64)
            with np.errstate(invalid="ignore"):  # deleted rows: -inf, and NaN never passes
                reach = weight * scores + extra_weight * extra[:, i].astype(np.float64) >= threshold
            out.append(np.flatnonzero(np.isfinite(scores) & reach))
        return out


def _block_slabs(values: np.ndarray, full: int, blocks: np.ndarray, queries: np.ndarray, missing) -> np.ndarray:
    """[pairs, BLOCK_ROWS]: values[block * 64 : block * 64 + 64, query] of each (block, query) pair from a
    [rows, Q] array (any strides), `full` of whose blocks have 64 rows; the last block's missing rows hold
    `missing`."""
    out = np.empty((len(blocks), BLOCK_ROWS), dtype=values.dtype)
    whole = blocks < full
    if whole.any():  # a [full, 64, Q] view: each pair's 64 values in one strided copy
        out[whole] = values[:full * BLOCK_ROWS].reshape(full, BLOCK_ROWS, values.shape[1])[blocks[whole], :,
                                                                                           queries[whole]]
    if not whole.all():
        tail = values[full * BLOCK_ROWS:]  # [rows - 64 * full, Q]
        out[~whole] = missing
        out[~whole, :len(tail)] = tail[:, queries[~whole]].T
    return out


def _block_maxima_of(values: np.ndarray) -> np.ndarray:
    """[ceil(rows / BLOCK_ROWS), Q] maxima of a [rows, Q] array's blocks of rows, its dtype (block_maxima)."""
    out = np.empty((-(-values.shape[0] // BLOCK_ROWS), values.shape[1]), dtype=values.dtype)
    block_maxima(torch.from_numpy(values), torch.from_numpy(out))
    return out


def block_maxima(products: torch.Tensor, out: torch.Tensor) -> None:
    """out[b] = the maxima of products' rows b * BLOCK_ROWS ... (b + 1) * BLOCK_ROWS - 1 (the last block may be
    shorter): [rows, Q] -> [ceil(rows / BLOCK_ROWS), Q] of the same dtype, torch's amax (all cores). Any strides:
    _int_mm's chunks are [rows, Q], the packed pass's products a transposed view of [Q, rows]."""
    rows = products.shape[0]
    full = rows // BLOCK_ROWS
    if full:  # [full, Q, BLOCK_ROWS] view, reduced over its blocks
        torch.amax(products[:full * BLOCK_ROWS].unfold(0, BLOCK_ROWS, BLOCK_ROWS), dim=2, out=out[:full])
    if rows > full * BLOCK_ROWS:
        torch.amax(products[full * BLOCK_ROWS:], dim=0, keepdim=True, out=out[full:full + 1])


def block_rows(blocks: np.ndarray, rows: int) -> np.ndarray:
    """[..., BLOCK_ROWS] int64: the rows of each of `blocks` (any shape) in an array of `rows` rows; the last,
    shorter block repeats its last row."""
    return np.minimum(np.asarray(blocks, dtype=np.int64)[..., None] * BLOCK_ROWS + np.arange(BLOCK_ROWS), rows - 1)


def value_block_maxima(values: np.ndarray) -> np.ndarray:
    """The maxima of the blocks of BLOCK_ROWS rows of float32 values (a NaN makes its block's maximum NaN):
    [rows] -> [ceil(rows / BLOCK_ROWS)], or [rows, Q] (any strides) -> [ceil(rows / BLOCK_ROWS), Q]."""
    values = np.asarray(values)
    if values.dtype != np.float32 or any(stride < 0 for stride in values.strides):
        values = np.array(values, dtype=np.float32)  # (torch takes no negative strides)
    columns = values[:, None] if values.ndim == 1 else values
    out = torch.empty(-(-len(values) // BLOCK_ROWS), columns.shape[1], dtype=torch.float32)
    block_maxima(torch.from_numpy(columns), out)
    return out.numpy()[:, 0] if values.ndim == 1 else out.numpy()


def best_of_blocks(values: np.ndarray, maxima: np.ndarray, count: int) -> np.ndarray:
    """Local rows (ascending) of the best value in each of the `count` blocks with the highest `maxima`
    (value_block_maxima of `values`), blocks whose maximum is -inf (deleted rows only) left out: rows with some
    of the highest values, chosen without a pass over all of them."""
    count = min(count, len(maxima))
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    blocks = torch.topk(torch.from_numpy(np.ascontiguousarray(maxima)), count, sorted=False).indices.numpy()
    blocks = np.sort(blocks[maxima[blocks] > -np.inf])
    rows = block_rows(blocks, len(values))  # [c, 64]
    return np.take_along_axis(rows, values[rows].argmax(axis=1)[:, None], 1)[:, 0]


def shard_pass(shard: ShardVectors, info: ShardPruneInfo, dense_queries: np.ndarray) -> ShardPass:
    """One int8 pass over a shard for a block of [Q, D] float32 queries.

    Packed codes (info.packed), when the shard has them, serve every pass, a lone query's too: measured here,
    a one- or two-column pass over them is faster than SimSIMD's over the mapped codes (BENCHMARKS.md), and the
    mapped codes' pages can then leave memory (PrunedSearch). Over mapped codes a lone query takes one digit
    even in a cone: the one-column pass is the fastest there is, and costs the looser bound a few more rows
    rescored; in a block, or on packed codes, the second digit is almost free. Each chunk of products gets its
    deleted rows marked and its block maxima taken as soon as it is made (in the cache).
    """
    packed_codes = info.packed  # (read once)
    packed = packed_codes is not None
    d = info.digits if packed or len(dense_queries) > 1 else 1
    frames = QueryFrame.many(dense_queries, shard.frame, d)
    block_max = torch.empty(-(-shard.rows // BLOCK_ROWS), len(frames) * d,  # [blocks, Q * d], the products' dtype
                            dtype=torch.float32 if packed else torch.int32)
    dead = None if shard.live is None else torch.from_numpy(~shard.live)

    def finish(start: int, chunk: torch.Tensor) -> None:  # chunk: [c, Q * d], start a multiple of 64
        if dead is not None:
            # Deleted rows get the smallest product, so they never rank among the best.
            chunk[:, ::d].masked_fill_(dead[start:start + chunk.shape[0], None], _MISSING)
        block_maxima(chunk, block_max[start // BLOCK_ROWS:])

    query_codes = np.concatenate([f.digits for f in frames], axis=1)  # [D, Q * d]
    if packed:
        by_query = _qlinear(packed_codes, shard.rows, query_codes)  # [Q * d, rows] float32, exact integers
        finish(0, by_query.T)  # (one chunk: the whole shard)
        products = by_query.numpy().T  # [rows, Q * d], a view: each query's column is contiguous
    else:
        products = int8_products(shard.codes, query_codes, finish)
    bounds = [DenseShardBound(shard, info, f, products[:, i * d], products[:, i * d + 1] if d == 2 else None)
              for i, f in enumerate(frames)]
    maxima = block_max.numpy()
    if d == 1:
        return ShardPass(shard, bounds, products, maxima)
    return ShardPass(shard, bounds, products[:, ::2], maxima[:, ::2], low=products[:, 1::2],
                     low_block_max=maxima[:, 1::2])


def shard_bounds(shard: ShardVectors, info: ShardPruneInfo, dense_queries: np.ndarray) -> list[DenseShardBound]:
    """One int8 pass over a shard for a block of [Q, D] float32 queries: each query's DenseShardBound."""
    return shard_pass(shard, info, dense_queries).bounds
