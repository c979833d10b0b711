"""Milvus as a search backend: export an index into a collection, and search it with the same scoring.

Export streams the index's live rows shard by shard, `batch` rows at a time
(shard_reader.iter_live_rows: one batch in memory, whatever the index size), into
a collection with

    id      VARCHAR primary key
    dense   FLOAT_VECTOR[D] (Milvus Lite, which has no float16 vectors) or
            FLOAT16_VECTOR[D] (a server): the float16 values the shards hold,
            so Milvus scores exactly the vectors local search scores
    sparse  SPARSE_FLOAT_VECTOR, SPARSE_INVERTED_INDEX, inner product
    text    VARCHAR, with --with-text (cut to Milvus's 65,535 bytes, counted)
    fields  JSON: {"source", "source_line", "metadata": {key: string},
            "numbers": {key: number}} (a metadata value that reads as a number
            is in both), what `--where` filters are translated to (`milvus_filter`)

and the index's identity (model, dimensions, generation) in the collection's
properties, so a search can refuse a collection made by another model.

Milvus rejects a row whose sparse vector is empty (a text of only special or
unknown tokens has one). Such a row is stored with one placeholder entry,
token id = the vocabulary size, which no query can contain: its sparse score
stays 0 for every query, as in local search, and the row still takes part in
dense and hybrid search. The export counts these rows.

Re-export is idempotent: rows are upserted by id, then rows of ids no longer
live in the index are deleted; `drop_existing` starts from an empty
collection instead. An interrupted export is finished by running it again.

Search encodes queries exactly as local search does (local_index.encode_queries)
and asks Milvus for the same fusion: `hybrid_search` with
`WeightedRanker(dense_w, sparse_w, norm_score=False)` (Milvus's default
norm_score=True would pass each score through arctan and change the
ranking), or `RRFRanker(60)`. Each route (dense, sparse) returns its best
`route_limit` rows (with rrf, at least RRF_DEPTH); a row outside one route's
list gets nothing from that route, so the weighted top-k equals local
search's when every true top-k row is in both lists (always when the collection holds at most `route_limit`
rows; by default 16,384, the most Milvus allows): the caveat the README explains. Credentials in a URI
(`http://user:password@host`) or a token never appear in a message (`mask_secrets`).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bge_index.errors import BgeIndexError, ExtraUnavailableError, IndexFormatError, InvalidOptionError, MilvusError
from bge_index.extras import require
from bge_index.store.manifest import Manifest, read_manifest
from bge_index.model.identity import ModelIdentity
from bge_index.search import filters
from bge_index.search.query import (RRF_DEPTH, RRF_K, SEARCH_OPTIONS, Hit, Mode, Normalize, Query, QueryResult, QueryVectors,
                                    RankedDocument, ScoreWeights, SearchRequest)
from bge_index.store.shard_reader import LiveRows, iter_live_rows

MAX_VARCHAR_BYTES = 65_535
FIELDS = "fields"  # the JSON field holding what --where filters read (row_fields)
MAX_JSON_BYTES = 65_536  # Milvus's largest JSON value
PROPERTY = "bge_index"  # collection property holding the exported index's identity (JSON)
INDEX_TYPES = ("flat", "hnsw")
DENSE_TYPES = ("auto", "float", "float16")
_HNSW_BUILD = {"M": 16, "efConstruction": 200}

# What Milvus search does of the declared search options (query.SEARCH_OPTIONS): these at any value
# (colbert-weight: only colbert mode reads it, refused below), ...
MILVUS_OPTIONS = frozenset({"k", "dense-weight", "sparse-weight", "colbert-weight", "fusion", "where"})
# ... these at these values only (a refusal names them in this order), and any other, one declared after
# this was written included, only at its default: what Milvus cannot do is refused, never ignored.
MILVUS_OPTIONS_AT = {"mode": (Mode.HYBRID, Mode.DENSE, Mode.SPARSE), "explain": (False,), "group-by-doc": (False,),
                     "normalize": (Normalize.NONE,)}


_URL_PASSWORD = re.compile(r"(\w+://[^\s:/@]*:)[^\s@/]*@")
MASK = "***"


def mask_secrets(text: str, uri: str | None = None, token: str | None = None) -> str:
    """`text` without credentials: the password of any `scheme://user:password@` URL, and the token (and the
    password part of a `user:password` token) wherever they occur, become `***`. Every message, warning and
    error that may quote a --uri or a server's answer passes through here."""
    text = _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text)
    secrets = []
    if token:
        secrets += [token, token.partition(":")[2]]
    if uri and _URL_PASSWORD.search(uri):
        secrets.append(_URL_PASSWORD.search(uri).group(0).rsplit(":", 1)[1][:-1])  # the URI's password
    for secret in sorted(filter(None, secrets), key=len, reverse=True):  # the longest first: a token holds its password
        text = text.replace(secret, MASK)
    return text


def public_uri(uri: str) -> str:
    """`uri` as it may be shown: `http://user:***@host:19530` (no password)."""
    return mask_secrets(uri)


@contextlib.contextmanager
def _milvus_errors(doing: str, uri: str | None = None, token: str | None = None) -> Iterator[None]:
    """pymilvus's exceptions (only importable with the extra) as MilvusError, naming what was being done.

    Messages are masked (`mask_secrets`): a server's answer may quote the URI or the token.
    """
    try:
        yield
    except BgeIndexError as error:
        # Ours, built from the URI (a missing collection...): masked too.
        error.args = (mask_secrets(str(error), uri, token),)
        raise
    except Exception as error:
        if type(error).__module__.startswith(("pymilvus", "grpc", "milvus_lite")):
            raise MilvusError(mask_secrets(f"Milvus: {doing}: {error}", uri, token)) from None  # no credentials
        raise


def is_lite_uri(uri: str) -> bool:
    """A local file (Milvus Lite, embedded) rather than a server URL."""
    return "://" not in uri and not uri.startswith("unix:")


def connect(uri: str, token: str | None = None):
    """A pymilvus MilvusClient for `uri` (a Milvus Lite file or a server URL).

    ExtraUnavailableError without the milvus extra, or when it cannot connect.
    """
    pymilvus = require("pymilvus", "milvus", "Milvus export and search")
    if is_lite_uri(uri):
        require("milvus_lite", "milvus", "a Milvus Lite file URI")
    try:
        return pymilvus.MilvusClient(uri=uri, token=token or "")
    except Exception as error:  # pymilvus raises its own and gRPC's errors alike
        raise ExtraUnavailableError(mask_secrets(f"--uri {uri}: cannot connect to Milvus ({error})", uri, token)) \
            from None  # the chained error would carry the credentials into a traceback


# ---------------------------------------------------------------------------
# Export


@dataclass
class ExportSummary:
    """What `export_index` did: rows written, placeholder sparse vectors, cut texts, stale rows removed, time."""

    uri: str
    collection: str
    rows: int = 0
    empty_sparse: int = 0  # stored with the placeholder token (see the module docstring)
    texts_cut: int = 0  # texts cut to MAX_VARCHAR_BYTES
    fields_cut: int = 0  # rows whose metadata did not fit MAX_JSON_BYTES: stored with their source only
    stale_removed: int = 0  # rows of ids no longer live in the index
    created: bool = False
    dense_type: str = "float"
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        """Rows exported per second of the export's wall time (0.0 while `seconds` is 0)."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        """The summary as a JSON-ready dict (seconds rounded to milliseconds)."""
        return {"uri": self.uri, "collection": self.collection, "rows": self.rows, "empty_sparse": self.empty_sparse,
                "texts_cut": self.texts_cut, "fields_cut": self.fields_cut, "stale_removed": self.stale_removed, "created": self.created,
                "dense_type": self.dense_type, "seconds": round(self.seconds, 3),
                "rows_per_second": round(self.rows_per_second, 1)}


def export_index(index_dir: Path, uri: str, collection: str, batch: int = 1000, index_type: str = "flat",
                 with_text: bool = False, drop_existing: bool = False, dense_type: str = "auto",
                 token: str | None = None, progress: Callable[[int], None] | None = None) -> ExportSummary:
    """Copy the live rows of the index in `index_dir` into a Milvus collection (created if needed)."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type {index_type!r}: use one of {', '.join(INDEX_TYPES)}")
    if dense_type not in DENSE_TYPES:
        raise ValueError(f"dense type {dense_type!r}: use one of {', '.join(DENSE_TYPES)}")
    manifest = read_manifest(index_dir)
    started = time.perf_counter()
    client = connect(uri, token)
    with _milvus_errors(f"export of {index_dir} into {collection!r}", uri, token):
        summary = _export(client, manifest, index_dir, uri, collection, batch, index_type, with_text, drop_existing,
                          dense_type, progress)
    summary.uri = public_uri(uri)  # the summary is printed and written to --report
    summary.seconds = time.perf_counter() - started
    return summary


def _export(client, manifest: Manifest, index_dir: Path, uri: str, collection: str, batch: int, index_type: str,
            with_text: bool, drop_existing: bool, dense_type: str, progress: Callable[[int], None] | None
            ) -> ExportSummary:
    summary = ExportSummary(uri, collection)
    if dense_type == "auto":
        dense_type = "float" if is_lite_uri(uri) else "float16"
    if drop_existing and client.has_collection(collection):
        client.drop_collection(collection)
    if client.has_collection(collection):
        dense_type = _check_collection(client, collection, manifest)
    else:
        _create_collection(client, collection, manifest, dense_type, index_type, with_text and manifest.store_text)
        summary.created = True
    summary.dense_type = dense_type
    field_types = _field_types(client, collection)
    has_text, has_fields = "text" in field_types, FIELDS in field_types
    identity = _identity(manifest, dense_type)
    client.alter_collection_properties(collection, properties={PROPERTY: json.dumps({**identity, "state": "partial"})})
    live_ids: set[str] | None = None if summary.created else set()
    dense_numpy = np.float16 if dense_type == "float16" else np.float32
    for rows in iter_live_rows(index_dir, manifest, batch_rows=batch, with_text=has_text, with_fields=has_fields):
        records = _records(rows, manifest.vocab_size, dense_numpy, summary)
        # A new collection holds none of these ids: insert. Otherwise upsert, which replaces rows by id.
        (client.insert if summary.created else client.upsert)(collection, records)
        if live_ids is not None:
            live_ids.update(rows.ids)
        summary.rows += len(records)
        if progress is not None:
            progress(summary.rows)
    if live_ids is not None:
        summary.stale_removed = _delete_stale(client, collection, live_ids, batch)
    client.flush(collection)
    client.alter_collection_properties(collection, properties={PROPERTY: json.dumps({**identity, "state": "complete"})})
    return summary


def _identity(manifest: Manifest, dense_type: str) -> dict:
    return {"model": manifest.model, "dense_dim": manifest.dense_dim, "vocab_size": manifest.vocab_size,
            "generation": manifest.generation, "rows": manifest.documents, "dense_type": dense_type,
            "empty_sparse_token": manifest.vocab_size}


def _create_collection(client, collection: str, manifest: Manifest, dense_type: str, index_type: str,
                       with_text: bool) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_VARCHAR_BYTES)
    schema.add_field("dense", DataType.FLOAT16_VECTOR if dense_type == "float16" else DataType.FLOAT_VECTOR,
                     dim=manifest.dense_dim)
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    if with_text:
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_VARCHAR_BYTES)
    schema.add_field(FIELDS, DataType.JSON)
    indexes = client.prepare_index_params()
    if index_type == "hnsw":
        indexes.add_index("dense", index_type="HNSW", metric_type="IP", params=_HNSW_BUILD)
    else:
        indexes.add_index("dense", index_type="FLAT", metric_type="IP")
    indexes.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
    hint = " (Milvus Lite has no FLOAT16_VECTOR: use --dense-type float)" if dense_type == "float16" else ""
    with _milvus_errors(f"creating collection {collection!r}{hint}"):
        client.create_collection(collection, schema=schema, index_params=indexes)


def _field_types(client, collection: str) -> dict[str, object]:
    return {f["name"]: f for f in client.describe_collection(collection)["fields"]}


def _check_collection(client, collection: str, manifest: Manifest) -> str:
    """An existing collection must have been made from an index of the same model: returns its dense type."""
    from pymilvus import DataType

    fields = _field_types(client, collection)
    if not {"id", "dense", "sparse"} <= set(fields):
        raise MilvusError(f"collection {collection!r} was not made by bge-index (fields: {', '.join(fields)}); "
                                "use another name or --drop-existing")
    dim = int(fields["dense"]["params"]["dim"])
    stored = stored_identity(client, collection)
    recorded = stored.get("model", {}) if stored else {}

    same_model = bool(recorded) and ModelIdentity.from_json(recorded).same_model(
        ModelIdentity.from_json(manifest.model))
    if dim != manifest.dense_dim or not same_model:
        raise MilvusError(f"collection {collection!r} holds vectors of another model or size "
                                f"(dense dim {dim}); use another name or --drop-existing")
    return "float16" if fields["dense"]["type"] == DataType.FLOAT16_VECTOR else "float"


def stored_identity(client, collection: str) -> dict | None:
    """The index identity an export recorded in the collection's properties (model, generation, state...), or None."""
    raw = client.describe_collection(collection).get("properties", {}).get(PROPERTY)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _records(rows: LiveRows, vocab_size: int, dense_numpy, summary: ExportSummary) -> list[dict]:
    dense = rows.dense.astype(dense_numpy)  # [B, D], the stored float16 values (widening is exact)
    records = []
    for row, row_id in enumerate(rows.ids):
        start, end = rows.sparse_indptr[row], rows.sparse_indptr[row + 1]
        if end > start:
            sparse = dict(zip(rows.sparse_indices[start:end].tolist(), rows.sparse_values[start:end].tolist()))
        else:
            sparse = {vocab_size: 1.0}  # placeholder: no query has this token, so the sparse score stays 0
            summary.empty_sparse += 1
        record = {"id": row_id, "dense": dense[row], "sparse": sparse}
        if rows.texts is not None:
            record["text"] = _fit_varchar(rows.texts[row] or "", summary)
        if rows.sources is not None:
            fields = row_fields(rows.sources[row], rows.source_lines[row], rows.metadata[row])
            if len(json.dumps(fields, ensure_ascii=False).encode("utf-8")) > MAX_JSON_BYTES:
                # Milvus refuses a larger JSON value; a filter on this row's metadata then finds nothing in Milvus
                # (counted, and said by the export).
                fields = row_fields(rows.sources[row], rows.source_lines[row], None)
                summary.fields_cut += 1
            record[FIELDS] = fields
        records.append(record)
    return records


def row_fields(source: str | None, source_line: int | None, metadata: dict[str, str] | None) -> dict:
    """A row's `fields` JSON: what a --where filter reads, with each metadata value that reads as a number (as
    filters.RowColumns reads it) also under "numbers", so that Milvus compares it as a number.

        >>> row_fields("/c.jsonl", 3, {"lang": "de", "year": "2024"})
        {'source': '/c.jsonl', 'source_line': 3, 'metadata': {'lang': 'de', 'year': '2024'}, 'numbers': {'year': 2024.0}}
    """
    out: dict = {}
    if source is not None:
        out["source"] = source
    if source_line is not None:
        out["source_line"] = source_line
    metadata = metadata or {}
    out["metadata"] = dict(metadata)
    numbers = {key: filters.number_of(value) for key, value in metadata.items()}
    out["numbers"] = {key: number for key, number in numbers.items() if number is not None}
    return out


def milvus_filter(expression: filters.Expression) -> str:
    """A parsed --where filter as a Milvus boolean expression over the exported `id` and `fields`, with the
    same meaning (a comparison of a field a row lacks is false, `not` the complement).

        >>> milvus_filter(filters.parse_where('lang in ["de", "fr"] and not year >= 2020'))
        '((exists fields["metadata"]["lang"] and (fields["metadata"]["lang"] == "de" or \
fields["metadata"]["lang"] == "fr")) and not (exists fields["numbers"]["year"] and fields["numbers"]["year"] >= 2020.0))'
    """
    node = expression
    if isinstance(node, (filters.And, filters.Or)):
        joiner = " and " if isinstance(node, filters.And) else " or "
        return "(" + joiner.join(milvus_filter(part) for part in node.parts) + ")"
    if isinstance(node, filters.Not):
        return f"not {milvus_filter(node.part)}"
    numeric = isinstance(node, (filters.Compare, filters.Member)) and node.numeric
    path = _milvus_path(node.field, numeric)
    if isinstance(node, filters.Has):
        return "(id == id)" if path == "id" else f"(exists {path})"
    if isinstance(node, filters.Prefix):
        if "%" in node.prefix or "_" in node.prefix or "\\" in node.prefix:
            raise InvalidOptionError(f"--backend milvus: a startswith() prefix holding %, _ or \\ has no Milvus "
                                     f"form ({node.prefix!r})")
        test = f"{path} like {_milvus_literal(node.prefix + '%')}"
    elif isinstance(node, filters.Member):
        # Equalities, not `in`: Milvus takes `in` on a field, not on a path inside a JSON field.
        test = "(" + " or ".join(f"{path} == {_milvus_literal(v)}" for v in node.values) + ")"
        test = f"not {test}" if node.negated else test
    else:
        test = f"{path} {node.op} {_milvus_literal(node.value)}"
    # A row without the field matches no comparison (filters.RowColumns), `!=` and `not in` included.
    return f"({test})" if path == "id" else f"(exists {path} and {test})"


def _milvus_path(field: filters.Field, numeric: bool) -> str:
    if field.column == "id":
        if numeric:
            raise InvalidOptionError("--backend milvus: id compares only with strings")
        return "id"
    if field.column is not None:
        return f"{FIELDS}[{_milvus_literal(field.column)}]"
    return f"{FIELDS}[\"{'numbers' if numeric else 'metadata'}\"][{_milvus_literal(field.key)}]"


def _milvus_literal(value: str | float) -> str:
    """A string or number as a Milvus expression literal: a string in double quotes, \\ and \" escaped."""
    if isinstance(value, str):
        if any(ord(c) < 32 for c in value):
            raise InvalidOptionError(f"--backend milvus: a control character in {value!r} has no Milvus form")
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(float(value))


def _fit_varchar(text: str, summary: ExportSummary) -> str:
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_VARCHAR_BYTES:
        return text
    summary.texts_cut += 1
    return encoded[:MAX_VARCHAR_BYTES].decode("utf-8", "ignore")  # never half a character


def _delete_stale(client, collection: str, live_ids: set[str], batch: int) -> int:
    """Delete rows whose ids are not live in the index any more (removed or renamed documents)."""
    stale = [row_id for row_id in iter_collection_ids(client, collection, batch) if row_id not in live_ids]
    for start in range(0, len(stale), batch):
        client.delete(collection, ids=stale[start:start + batch])
    return len(stale)


# ---------------------------------------------------------------------------
# Search


MAX_ROUTE_LIMIT = 16_384  # Milvus's largest `limit` (topk) for one search


def default_route_limit(k: int) -> int:
    """Rows each route returns when --route-limit is not given: as many as Milvus allows (16,384).

    So a hybrid search equals local search on any collection up to that size; shallower defaults (5k) agreed
    with local search on only 21% of top-10 ranks on a 310-row collection. `k` never exceeds it.
    """
    return max(MAX_ROUTE_LIMIT, k)


class MilvusBackend:
    """A collection exported from an index, with the index's model to encode queries (a `SearchBackend`).

    `route_limit`: rows each route (dense, sparse) of a hybrid search returns before fusion (see the README).
    """

    def __init__(self, index_dir: Path, uri: str, collection: str, model: str | None = None, device: str = "auto",
                 dtype: str = "auto", token: str | None = None, route_limit: int | None = None):
        from bge_index.search.local_index import load_index_encoder

        if route_limit is not None and route_limit < 1:
            raise InvalidOptionError("--route-limit must be at least 1")
        self.manifest = read_manifest(index_dir)
        self.route_limit = route_limit
        self.client = connect(uri, token)
        self.collection = collection
        self.secrets = (uri, token)
        with _milvus_errors(f"opening collection {collection!r}", uri, token):
            self._open(index_dir, public_uri(uri), collection)
        self.encoder = load_index_encoder(self.manifest, model, device, dtype)

    def close(self) -> None:
        """Release the connection and the model."""
        self.client.close()
        self.encoder = None

    def _open(self, index_dir: Path, uri: str, collection: str) -> None:
        if not self.client.has_collection(collection):
            raise IndexFormatError(f"Milvus {uri}: no collection {collection!r} (bge-index export milvus makes it)")
        self.identity = stored_identity(self.client, collection) or {}
        recorded = ModelIdentity.from_json(self.manifest.model)
        if not self.identity or not ModelIdentity.from_json(self.identity["model"]).same_model(recorded):
            raise IndexFormatError(f"collection {collection!r} was not exported from an index of "
                                   f"{recorded.describe()}; export {index_dir} into it first")
        self.notes: list[str] = []
        if self.identity.get("state") != "complete":
            self.notes.append(f"collection {collection!r}: its last export did not finish; run it again")
        elif self.identity.get("generation") != self.manifest.generation:
            self.notes.append(f"collection {collection!r} holds generation {self.identity.get('generation')} of "
                              f"{index_dir}, which is now at generation {self.manifest.generation}: export it again")
        fields = _field_types(self.client, collection)
        self.has_text = "text" in fields
        self.has_fields = FIELDS in fields
        self.dense_numpy = np.float16 if self.identity.get("dense_type") == "float16" else np.float32
        self.client.load_collection(collection)

    @staticmethod
    def check_request(request: SearchRequest) -> None:
        """Refuse (InvalidOptionError) what only local search does: callers can ask before the model loads."""
        declared = {o.name: o for o in SEARCH_OPTIONS}
        allowed = {name: values for name, values in MILVUS_OPTIONS_AT.items() if name in declared}
        allowed.update((name, (o.default,)) for name, o in declared.items() if name not in MILVUS_OPTIONS | allowed.keys())
        unsupported = [declared[name].as_flag(value) for name, values in allowed.items()
                       if (value := declared[name].value_in(request)) not in values]
        if unsupported:
            raise InvalidOptionError(f"--backend milvus does not support {', '.join(unsupported)}")

    def encode_queries(self, texts: Sequence[str]) -> list[QueryVectors]:
        """Query texts -> vectors, exactly as local search encodes them."""
        from bge_index.search.local_index import encode_queries

        return encode_queries(self.encoder, texts)

    def search(self, queries: Sequence[Query], request: SearchRequest = SearchRequest()) -> list[QueryResult]:
        """Top-k per query: hybrid (weighted or rrf), dense or sparse, as local search scores them."""
        self.check_request(request)
        where = ""
        if request.where is not None:
            if not self.has_fields:
                raise InvalidOptionError(f"--where: collection {self.collection!r} was exported without the rows' "
                                         "fields; export it again with --drop-existing")
            where = milvus_filter(filters.parse_where(request.where))
        with _milvus_errors(f"searching collection {self.collection!r}", *self.secrets):
            found = self._search([q.text for q in queries], request.k, request.mode.value, request.weights,
                                 request.fusion.value, self.route_limit, request.with_text, where)
        return [QueryResult(query, [RankedDocument(rank, hit_id, hit, text)
                                    for rank, (hit_id, hit, text) in enumerate(hits, start=1)])
                for query, hits in zip(queries, found)]

    def _search(self, texts: Sequence[str], k: int, mode: str, weights: ScoreWeights, fusion: str,
                route_limit: int | None, with_text: bool, where: str = ""
                ) -> list[list[tuple[str, Hit, str | None]]]:
        from pymilvus import AnnSearchRequest, RRFRanker, WeightedRanker

        limit = route_limit or default_route_limit(k)
        output = ["id"] + (["text"] if with_text and self.has_text else [])
        results = []
        for query in self.encode_queries(texts):
            dense_request = {"data": [query.dense.astype(self.dense_numpy)], "anns_field": "dense",
                             "param": {"metric_type": "IP", "params": {"ef": max(limit, 64)}}}
            sparse_request = {"data": [_sparse_dict(query)], "anns_field": "sparse",
                              "param": {"metric_type": "IP", "params": {"drop_ratio_search": 0.0}}}
            if mode == "hybrid":
                # RRF as local search does it: each list's top RRF_DEPTH ranks count.
                depth = max(limit, RRF_DEPTH) if fusion == "rrf" else limit
                ranker = RRFRanker(RRF_K) if fusion == "rrf" else \
                    WeightedRanker(weights.dense, weights.sparse, norm_score=False)
                found = self.client.hybrid_search(
                    self.collection, [AnnSearchRequest(**dense_request, limit=depth, expr=where or None),
                                      AnnSearchRequest(**sparse_request, limit=depth, expr=where or None)],
                    ranker, limit=k, output_fields=output)[0]
            else:
                request = dense_request if mode == "dense" else sparse_request
                found = self.client.search(self.collection, data=request["data"], anns_field=request["anns_field"],
                                           search_params=request["param"], limit=k, output_fields=output,
                                           filter=where)[0]
            results.append(self._hits(query, found))
        return results

    def _hits(self, query: QueryVectors, found: list[dict]) -> list[tuple[str, Hit, str | None]]:
        """Milvus's ranking and scores, with the dense and sparse components recomputed from the rows' vectors."""
        ids = [r["id"] for r in found]
        vectors = {r["id"]: r for r in self.client.get(self.collection, ids=ids, output_fields=["dense", "sparse"])} \
            if ids else {}
        hits = []
        for rank, record in enumerate(found):
            stored = vectors[record["id"]]
            dense = float(np.asarray(stored["dense"], dtype=np.float32) @ query.dense.astype(np.float32))
            sparse = _sparse_dot(query, stored["sparse"])
            text = record.get("entity", {}).get("text")
            # A collection has no index row numbers: `row` is the rank (0-based).
            hits.append((record["id"], Hit(rank, float(record["distance"]), dense, sparse), text))
        return hits


def _sparse_dict(query: QueryVectors) -> dict[int, float]:
    return dict(zip(query.sparse_ids.tolist(), query.sparse_weights.tolist()))


def _sparse_dot(query: QueryVectors, stored: dict) -> float:
    """Σ q_w·d_w over shared token ids, in float32 and query-token order, as search.py sums it."""
    total = np.float32(0.0)
    for token, weight in zip(query.sparse_ids.tolist(), query.sparse_weights.tolist()):
        value = stored.get(token)
        if value is not None:
            total += np.float32(value) * np.float32(weight)
    return float(total)


def iter_collection_ids(client, collection: str, batch: int = 1000) -> Iterator[str]:
    """Every id stored in the collection, read `batch` at a time through a query iterator."""
    iterator = client.query_iterator(collection, batch_size=batch, output_fields=["id"])
    try:
        while page := iterator.next():
            yield from (r["id"] for r in page)
    finally:
        iterator.close()
