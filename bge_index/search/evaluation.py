"""Retrieval evaluation against relevance judgments, with trec_eval's definitions.

Owns the judgment and run file formats (BEIR `qrels.tsv` with its
`query-id<TAB>corpus-id<TAB>score` header, classic TREC qrels
`qid iter docid rel`, TREC run files `qid Q0 docid rank score tag`; each may be
gzip-compressed as `.gz`), the metric names (`ndcg@10`, `recall@100`,
`precision@5`, `mrr@10`, `map`, `map@100`) and their computation, per query and
averaged. Nothing here prints; bad input raises `EvaluationInputError` whose
message says where (`file:line: reason`).

Definitions are trec_eval 9.x's (so also pytrec_eval's and BEIR's, which run it):

- A run's order is trec_eval's, not the file's: score descending, ties broken
  by document id descending (byte-wise, like `strcmp`); the rank column of a
  run file is ignored.
- Relevant means a judgment > 0 (trec_eval's default `-l 1`; labels are
  integers). Judgments <= 0 and unjudged documents are non-relevant.
- ndcg@k = ndcg_cut_k: DCG = sum over the top k of rel / log2(rank + 1) for
  rel > 0 (graded gain = the label), divided by the DCG of the ideal ranking
  built from all the query's positive labels. `ndcg` without k uses the whole
  ranking (trec_eval `ndcg`).
- precision@k = P_k: relevant in the top k / k (k even when fewer retrieved).
- recall@k = recall_k: relevant in the top k / relevant judged for the query.
- mrr@k: trec_eval's recip_rank (1 / rank of the first relevant document)
  counting only the top k, 0 if none; `mrr` without k = recip_rank.
- map@k = map_cut_k, map = map: sum of precision at each relevant retrieved
  document (in the top k) divided by the number of relevant documents in the
  qrels, not the number retrieved.

Which queries are averaged (the choice, and how it relates to the tools):

- trec_eval by default averages over queries in both the qrels and the run;
  with `-c` every qrels query counts and one missing from the run scores 0.
  pytrec_eval (and so BEIR) evaluates the queries present in both, like the
  default; a query present with an empty ranking scores 0.
- Here, as in pytrec_eval/BEIR, a query is evaluated when it is in the run
  (even with an empty ranking) and in the qrels; `missing_as_zero=True` gives
  trec_eval `-c` instead (qrels queries absent from the run score 0).
- One deliberate difference from all three: a qrels query with no relevant
  judgment (all labels <= 0) is left out of the average, where they would count
  it as 0 on every metric. Its metrics are undefined (nothing can be found),
  and counting it would only lower every mode's numbers alike.
  `query_coverage` reports such queries so a caller can say so.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO, Union

import numpy as np
from bge_index.errors import EvaluationInputError

Qrels = dict[str, dict[str, int]]
# A query's retrieved documents: {docid: score} (as read_run returns) or [(docid, score), ...] (as search returns).
Ranking = Union[Mapping[str, float], Iterable[tuple[str, float]]]
Run = Mapping[str, Ranking]
PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------
# Reading and writing files


def _numbered_lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text without line ending) for each non-blank line; `.gz` is decompressed."""
    name = os.fspath(path)
    opener = gzip.open if name.lower().endswith(".gz") else open
    try:
        with opener(name, "rb") as stream:
            for number, raw in enumerate(stream, start=1):
                try:
                    # utf-8-sig on the first line only: a BOM there is an editor's, not part of an id.
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    raise EvaluationInputError(f"{name}:{number}: invalid UTF-8 at byte {error.start}") from None
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line
    # OSError: missing/unreadable files and bad gzip headers; EOFError, zlib.error: damaged gzip streams.
    except (OSError, EOFError, zlib.error) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        if isinstance(error, (gzip.BadGzipFile, EOFError, zlib.error)):
            reason = f"corrupt or truncated gzip data ({error})"
        raise EvaluationInputError(f"{name}: cannot read: {reason}") from error


def _parse_label(text: str, where: str) -> int:
    """A relevance label: an integer; "1.0" is accepted (some exports write floats), "0.5" is not."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():  # NaN and inf are not integers either
        raise EvaluationInputError(f"{where}: relevance '{text}' is not an integer")
    return int(value)


def _is_label(text: str) -> bool:
    try:
        _parse_label(text, "")
    except EvaluationInputError:
        return False
    return True


def _beir_judgment(line: str, where: str) -> tuple[str, str, int]:
    # Tabs only: BEIR ids may contain spaces.
    fields = [field.strip() for field in line.split("\t")]
    if len(fields) != 3 or not fields[0] or not fields[1]:
        raise EvaluationInputError(
            f"{where}: expected 3 tab-separated fields 'query-id<TAB>corpus-id<TAB>score', found {len(fields)}")
    return fields[0], fields[1], _parse_label(fields[2], where)


def _trec_judgment(line: str, where: str) -> tuple[str, str, int]:
    fields = line.split()
    if len(fields) != 4:
        raise EvaluationInputError(
            f"{where}: expected 4 whitespace-separated fields 'qid iter docid rel', found {len(fields)}")
    return fields[0], fields[2], _parse_label(fields[3], where)


def _qrels_format(first_line: str, where: str):
    """From the first non-blank line: (line parser, whether that line is a header to skip)."""
    tab_fields = first_line.split("\t")
    if len(tab_fields) == 3:
        # BEIR: a header names its columns, so a non-integer third field means a header line.
        return _beir_judgment, not _is_label(tab_fields[2].strip())
    if len(first_line.split()) == 4:
        return _trec_judgment, False
    raise EvaluationInputError(
        f"{where}: not a qrels line: expected a BEIR header 'query-id<TAB>corpus-id<TAB>score' "
        "or a TREC judgment 'qid iter docid rel'")


def read_qrels(path: PathLike) -> Qrels:
    """Judgments {query id: {document id: label}} from BEIR qrels.tsv or TREC qrels (format detected).

    A repeated (query, document) pair with the same label is accepted (BEIR
    files have some); with a different label it is an error, as trec_eval
    refuses any repeat and silently keeping one would change the scores.
    """
    name = os.fspath(path)
    qrels: Qrels = {}
    first_seen: dict[tuple[str, str], int] = {}
    parse = None
    for number, line in _numbered_lines(path):
        where = f"{name}:{number}"
        if parse is None:
            parse, is_header = _qrels_format(line, where)
            if is_header:
                continue
        qid, docid, label = parse(line, where)
        judgments = qrels.setdefault(qid, {})
        if docid in judgments and judgments[docid] != label:
            raise EvaluationInputError(
                f"{where}: query '{qid}' document '{docid}' judged {label} here but "
                f"{judgments[docid]} at line {first_seen[qid, docid]}")
        judgments[docid] = label
        first_seen.setdefault((qid, docid), number)
    if not qrels:
        raise EvaluationInputError(f"{name}: no relevance judgments")
    return qrels


def read_run(path: PathLike) -> dict[str, dict[str, float]]:
    """A TREC run file `qid Q0 docid rank score tag` as {query id: {document id: score}}.

    The rank column is ignored, as trec_eval ignores it: order comes from the
    scores (see `rank_documents`). A document listed twice for a query is an
    error, as in trec_eval.
    """
    name = os.fspath(path)
    run: dict[str, dict[str, float]] = {}
    for number, line in _numbered_lines(path):
        where = f"{name}:{number}"
        fields = line.split()
        if len(fields) != 6:
            raise EvaluationInputError(
                f"{where}: expected 6 whitespace-separated fields 'qid Q0 docid rank score tag', found {len(fields)}")
        qid, _, docid, _, score_text, _ = fields
        try:
            score = float(score_text)
        except ValueError:
            raise EvaluationInputError(f"{where}: score '{score_text}' is not a number") from None
        if math.isnan(score):  # NaN has no place in a descending sort
            raise EvaluationInputError(f"{where}: score is NaN")
        scores = run.setdefault(qid, {})
        if docid in scores:
            raise EvaluationInputError(f"{where}: document '{docid}' listed twice for query '{qid}'")
        scores[docid] = score
    if not run:
        raise EvaluationInputError(f"{name}: no results")
    return run


_WHITESPACE = re.compile(r"\s")


def _check_field(value: str, what: str) -> None:
    # A run file is split on whitespace: an id holding any could not be read back.
    if not value or _WHITESPACE.search(value):
        raise EvaluationInputError(f"{what} '{value}' is empty or contains whitespace; a TREC run file cannot hold it")


def write_trec_run(stream: TextIO, run: Run, tag: str) -> None:
    """Write `run` as TREC run lines `qid Q0 docid rank score tag`, queries in the run's order.

    Each query's documents are written in trec_eval's order with ranks 1..n,
    so the rank column agrees with how trec_eval (and `read_run`) will order
    them. Scores are written with `repr`, which reads back to the same float.
    """
    _check_field(tag, "run tag")
    for qid, ranking in run.items():
        _check_field(qid, "query id")
        for rank, (docid, score) in enumerate(rank_documents(ranking, qid), start=1):
            _check_field(docid, "document id")
            stream.write(f"{qid} Q0 {docid} {rank} {score!r} {tag}\n")


# ---------------------------------------------------------------------------
# Ranking


def _scored_documents(ranking: Ranking, qid: str) -> list[tuple[str, float]]:
    if isinstance(ranking, Mapping):
        pairs = [(str(docid), float(score)) for docid, score in ranking.items()]
    else:
        pairs = [(str(docid), float(score)) for docid, score in ranking]
        if len({docid for docid, _ in pairs}) != len(pairs):
            # trec_eval refuses duplicates; two scores for one document have no single rank.
            raise EvaluationInputError(f"query '{qid}': a document is ranked more than once")
    if any(math.isnan(score) for _, score in pairs):
        raise EvaluationInputError(f"query '{qid}': a score is NaN")
    return pairs


def rank_documents(ranking: Ranking, qid: str = "") -> list[tuple[str, float]]:
    """(docid, score) pairs in trec_eval's order: score descending, ties by document id descending.

    trec_eval sorts with `strcmp` on the ids' UTF-8 bytes; comparing Python
    strings by code point gives the same order, since UTF-8 preserves it.
    Any order or rank the caller had is ignored, as trec_eval ignores it.
    """
    # -0.0 == 0.0 in the tuple comparison, as in trec_eval's double comparison.
    return sorted(_scored_documents(ranking, qid), key=lambda pair: (pair[1], pair[0]), reverse=True)


# ---------------------------------------------------------------------------
# Metric names


@dataclass(frozen=True)
class Metric:
    """One metric: `measure` is ndcg, recall, precision, mrr or map; `k` the cutoff (None: whole ranking)."""

    measure: str
    k: int | None = None

    @property
    def name(self) -> str:
        """The canonical name, the key in results: "ndcg@10", "map"."""
        return self.measure if self.k is None else f"{self.measure}@{self.k}"


# Whether "@k" is required. recall and precision without a cutoff would be
# trec_eval's set measures, a different thing; they are left out on purpose.
_MEASURES = {"ndcg": False, "mrr": False, "map": False, "recall": True, "precision": True}
_ALIASES = {"p": "precision"}
_METRIC_PATTERN = re.compile(r"([a-z]+)(?:@(\S*))?")
_KNOWN = "ndcg@k, recall@k, precision@k, mrr@k, map, map@k (and ndcg, mrr without @k)"


def parse_metric(text: str) -> Metric:
    """One metric name (case-insensitive) -> `Metric`; "P@5" is taken as precision@5."""
    match = _METRIC_PATTERN.fullmatch(text.strip().lower())
    measure = match and _ALIASES.get(match.group(1), match.group(1))
    if measure not in _MEASURES:
        raise EvaluationInputError(f"unknown metric '{text.strip()}'; known: {_KNOWN}")
    cutoff = match.group(2)
    if cutoff is None:
        if _MEASURES[measure]:
            raise EvaluationInputError(f"metric '{text.strip()}' needs a cutoff, e.g. {measure}@10")
        return Metric(measure)
    if not (cutoff.isascii() and cutoff.isdigit()) or int(cutoff) == 0:
        raise EvaluationInputError(f"metric '{text.strip()}': the cutoff must be a positive integer")
    return Metric(measure, int(cutoff))


def parse_metrics(text: str) -> list[Metric]:
    """A comma-separated list ("ndcg@10,recall@100,map") -> Metrics, in order, repeats dropped."""
    metrics: dict[str, Metric] = {}
    for item in text.split(","):
        if item.strip():  # tolerate "a,,b" and a trailing comma
            metric = parse_metric(item)
            metrics.setdefault(metric.name, metric)
    if not metrics:
        raise EvaluationInputError(f"no metrics given; known: {_KNOWN}")
    return list(metrics.values())


def _metric_list(metrics: str | Sequence[Metric | str]) -> list[Metric]:
    if isinstance(metrics, str):
        return parse_metrics(metrics)
    parsed = [metric if isinstance(metric, Metric) else parse_metric(metric) for metric in metrics]
    if not parsed:
        raise EvaluationInputError(f"no metrics given; known: {_KNOWN}")
    return parsed


# ---------------------------------------------------------------------------
# Per-query metrics. `labels` holds the judgment of each ranked document in
# rank order (0 when unjudged); `relevant` is labels > 0.


def _precision(relevant: np.ndarray, k: int) -> float:
    return float(relevant[:k].sum()) / k


def _recall(relevant: np.ndarray, k: int, num_relevant: int) -> float:
    return float(relevant[:k].sum()) / num_relevant


def _reciprocal_rank(relevant: np.ndarray, k: int | None) -> float:
    found = np.flatnonzero(relevant[:k])
    return 1.0 / (found[0] + 1) if found.size else 0.0


def _average_precision(relevant: np.ndarray, k: int | None, num_relevant: int) -> float:
    ranks = np.flatnonzero(relevant[:k]) + 1  # 1-based ranks of the relevant documents retrieved
    precisions = np.arange(1, ranks.size + 1) / ranks
    # Divided by all relevant documents, so relevant ones not retrieved count as precision 0.
    return float(precisions.sum()) / num_relevant


def _dcg(gains: np.ndarray) -> float:
    return float((gains / np.log2(np.arange(2, gains.size + 2))).sum())


def _ndcg(labels: np.ndarray, ideal: np.ndarray, k: int | None) -> float:
    # Only positive labels are gains: trec_eval treats negative labels as unjudged, not as penalties.
    dcg = _dcg(np.maximum(labels[:k], 0))
    ideal_dcg = _dcg(ideal[:k])
    return dcg / ideal_dcg if ideal_dcg > 0 else 0.0


def _query_values(ranking: Ranking, judgments: Mapping[str, int], metrics: Sequence[Metric],
                  qid: str) -> dict[str, float]:
    """One query's value for each metric."""
    ranked = rank_documents(ranking, qid)
    labels = np.array([judgments.get(docid, 0) for docid, _ in ranked], dtype=np.float64)
    relevant = labels > 0
    ideal = np.sort(np.array([label for label in judgments.values() if label > 0], dtype=np.float64))[::-1]
    num_relevant = ideal.size
    values = {}
    for metric in metrics:
        if metric.measure == "ndcg":
            value = _ndcg(labels, ideal, metric.k)
        elif metric.measure == "map":
            value = _average_precision(relevant, metric.k, num_relevant)
        elif metric.measure == "mrr":
            value = _reciprocal_rank(relevant, metric.k)
        elif metric.measure == "recall":
            value = _recall(relevant, metric.k, num_relevant)
        else:
            value = _precision(relevant, metric.k)
        values[metric.name] = value
    return values


def _has_relevant(judgments: Mapping[str, int]) -> bool:
    return any(label > 0 for label in judgments.values())


# ---------------------------------------------------------------------------
# Evaluation


def evaluate_per_query(run: Run, qrels: Mapping[str, Mapping[str, int]], metrics: str | Sequence[Metric | str],
                       *, missing_as_zero: bool = False) -> dict[str, dict[str, float]]:
    """{query id: {metric name: value}} for the evaluated queries, in qrels order.

    Evaluated: qrels queries with at least one relevant judgment that are in
    the run (an empty ranking counts as present and scores 0). With
    `missing_as_zero`, those absent from the run are evaluated too, scoring 0
    (trec_eval -c). See the module docstring for why.
    """
    metric_list = _metric_list(metrics)
    results = {}
    for qid, judgments in qrels.items():
        if not _has_relevant(judgments):
            continue
        if qid in run:
            results[qid] = _query_values(run[qid], judgments, metric_list, qid)
        elif missing_as_zero:
            results[qid] = _query_values([], judgments, metric_list, qid)
    return results


def evaluate(run: Run, qrels: Mapping[str, Mapping[str, int]], metrics: str | Sequence[Metric | str],
             *, missing_as_zero: bool = False) -> dict[str, float]:
    """{metric name: mean over the evaluated queries}, metrics in the order given.

    The queries are those of `evaluate_per_query`. Raises
    EvaluationInputError when there are none (usually ids that do not match).
    """
    metric_list = _metric_list(metrics)
    per_query = evaluate_per_query(run, qrels, metric_list, missing_as_zero=missing_as_zero)
    if not per_query:
        raise EvaluationInputError(
            "no query to evaluate: no query of the run has a relevant judgment in the qrels (do the query ids match?)")
    # fsum: the mean must not depend on query order beyond the last bit.
    return {metric.name: math.fsum(values[metric.name] for values in per_query.values()) / len(per_query)
            for metric in metric_list}


@dataclass(frozen=True)
class QueryCoverage:
    """Which queries an evaluation uses, and which it leaves out and why."""

    evaluated: tuple[str, ...]
    missing_from_run: tuple[str, ...]  # judged with a relevant document, absent from the run
    without_relevant: tuple[str, ...]  # in the qrels with no label > 0: never evaluated
    not_in_qrels: tuple[str, ...]  # in the run, unknown to the qrels


def query_coverage(run: Run, qrels: Mapping[str, Mapping[str, int]], *, missing_as_zero: bool = False) -> QueryCoverage:
    """The split of queries behind `evaluate`, so a caller can report what was left out."""
    judged = [qid for qid, judgments in qrels.items() if _has_relevant(judgments)]
    missing = tuple(qid for qid in judged if qid not in run)
    return QueryCoverage(
        evaluated=tuple(qid for qid in judged if missing_as_zero or qid in run),
        missing_from_run=missing,
        without_relevant=tuple(qid for qid, judgments in qrels.items() if not _has_relevant(judgments)),
        not_in_qrels=tuple(qid for qid in run if qid not in qrels),
    )


@dataclass(frozen=True)
class DocumentCoverage:
    """How many of the relevant documents the judgments name the index holds (ids as the index has them)."""

    relevant: int  # distinct documents judged relevant (label > 0) for some query
    in_index: int
    missing_examples: tuple[str, ...]  # a few relevant ids the index does not hold

    @property
    def none_in_index(self) -> bool:
        """No relevant document is in the index: every metric would be 0, whatever the ranking."""
        return self.relevant > 0 and self.in_index == 0


def document_coverage(qrels: Mapping[str, Mapping[str, int]], index_ids: set[str] | frozenset[str],
                      examples: int = 3) -> DocumentCoverage:
    """Which relevant documents of `qrels` are among `index_ids`.

    An index of files whose ids are paths (`notes/1.md`) judged by BEIR qrels (`1`) matches none: that is
    an error to report (`index --id-from stem`), not a score of 0.

        >>> document_coverage({"q1": {"1": 1, "2": 0}, "q2": {"3": 2}}, {"notes/1.md", "3"})
        DocumentCoverage(relevant=2, in_index=1, missing_examples=('1',))
    """
    relevant = sorted({doc for judgments in qrels.values() for doc, label in judgments.items() if label > 0})
    missing = [doc for doc in relevant if doc not in index_ids]
    return DocumentCoverage(len(relevant), len(relevant) - len(missing), tuple(missing[:examples]))
