"""bge-index: index documents into BGE-M3 sparse + dense (+ ColBERT) vectors in Parquet shards, and search them.

The library behind the `bge-index` command. The names below are imported
on first use, so `import bge_index` stays cheap (no torch until a model runs):

    from pathlib import Path
    import bge_index

    options = bge_index.IndexOptions(model="/models/bge-m3")
    bge_index.index_documents([bge_index.Document("a", "The Moon recedes 3.8 cm a year.", "<mine>")],
                              Path("moon-index"), options)
    index = bge_index.LocalIndex(Path("moon-index"))
    [result] = index.search([bge_index.Query("q1", "How fast is the Moon moving away?")],
                            bge_index.SearchRequest(k=3))
"""

from __future__ import annotations

import importlib
import os

# MKL may use fewer threads than asked when the machine is busy (MKL_DYNAMIC), and a different split of an
# sgemm's work changes the float32 sums' last bits: a query would then score differently alone and in a batch.
# Read by MKL at its first call, after this import (the CLI and the library import torch later); a user's own
# setting wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "Document": "bge_index.input.types",
    "Skipped": "bge_index.input.types",
    "FieldNames": "bge_index.input.types",
    "iter_documents": "bge_index.input.documents",
    "IndexOptions": "bge_index.run.index_run",
    "IndexEvents": "bge_index.run.index_run",
    "IndexSummary": "bge_index.run.index_run",
    "build_index": "bge_index.run.local",
    "index_documents": "bge_index.run.local",
    "Query": "bge_index.search.query",
    "SearchRequest": "bge_index.search.query",
    "Mode": "bge_index.search.query",
    "Fusion": "bge_index.search.query",
    "Normalize": "bge_index.search.query",
    "ScoreWeights": "bge_index.search.query",
    "QueryResult": "bge_index.search.query",
    "LocalIndex": "bge_index.search.local_index",
    "SearchService": "bge_index.serve.search_service",
    "results_json": "bge_index.search.query",
    "BgeIndexError": "bge_index.errors",
    "read_manifest": "bge_index.store.manifest",
    "verify_index": "bge_index.store.shard_reader",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import a public name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bge_index' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
