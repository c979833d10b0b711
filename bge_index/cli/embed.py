"""`bge-index embed`: texts in, BGE-M3 vectors out, as JSON Lines: the vectors a pipeline needs without an index.

Input: a JSONL file (or `-` for stdin) of records with an id and a text field (as `index` reads them), or
any other file of text lines (each line a document, its id the line number). Output, one line per document:

    {"id": "d1", "dense": [0.0123, ...], "sparse": [[6, 0.1318], [4865, 0.2417]], "colbert": [[...], ...]}

`sparse` holds (token id, weight) pairs, ids ascending; `colbert` only with --colbert. The encoding is the
index's: the same truncation, heads and rounding (dense and ColBERT to float16 and back, as shards store
them). With --index, the model, precision and max length are the index's own.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from bge_index.cli.display import warning
from bge_index.cli.options import Device, Dtype
from bge_index.errors import UsageError
from bge_index.input.formats import open_regular_file, read_json_lines
from bge_index.input.types import Document, FieldNames, Skipped
from bge_index.model.embedding import (EMBED_BATCH_DOCUMENTS, EMBED_BATCH_TOKENS, EMBED_MAX_LENGTH, check_colbert,
                                       document_groups, embedding_json, index_max_length)

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")


def embed(
    source: Annotated[str, typer.Argument(help="JSONL (id + text) or a file of text lines; - for stdin (JSONL).",
                                          show_default=False)],
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="Use this index's model, precision and "
                                                      "max length (its vectors come out).")] = None,
    model: Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_MODEL",
                                                 help="Hub id or model folder (default: the index's, with --index, "
                                                      "else BAAI/bge-m3).")] = None,
    device: Device = "auto",
    dtype: Annotated[Dtype, typer.Option(envvar="BGE_INDEX_DTYPE", help="Encoding precision.")] = Dtype("auto"),
    max_length: Annotated[int, typer.Option(min=2, help="Tokens per text (longer ones are truncated).")
                          ] = EMBED_MAX_LENGTH,
    colbert: Annotated[bool, typer.Option("--colbert", help="Also give ColBERT vectors.")] = False,
    batch_tokens: Annotated[int, typer.Option(min=1, help="Tokens per forward pass.")] = EMBED_BATCH_TOKENS,
) -> None:
    """Encode texts and print their dense, sparse (and ColBERT) vectors as JSON Lines."""
    from bge_index.model.embedding import EmbeddingGroup
    from bge_index.model.encoder import load_encoder

    dtype_name = dtype.value
    if index_dir is not None:
        from bge_index.search.local_index import load_index_encoder
        from bge_index.store.manifest import read_manifest

        manifest = read_manifest(index_dir)
        if colbert:  # before the model loads: the index's vectors come out, and it has no ColBERT vectors
            check_colbert(manifest, index_dir, "leave out --colbert")
        encoder = load_index_encoder(manifest, model, device, dtype_name)
        max_length = index_max_length(manifest, max_length)
    else:
        from bge_index.model.identity import DEFAULT_MODEL

        encoder = load_encoder(model or DEFAULT_MODEL, device, dtype_name)
    for batch in document_groups(_documents(source), EMBED_BATCH_DOCUMENTS):
        rows = EmbeddingGroup(encoder, [d.id for d in batch], [d.text for d in batch], colbert=colbert,
                              max_length=max_length, batch_tokens=batch_tokens).encode(encoder)
        if rows is None:
            continue
        sys.stdout.write("".join(embedding_json(rows, i, colbert) + "\n" for i in range(len(rows))))
    sys.stdout.flush()


def _documents(source: str) -> Iterator[Document]:
    """The documents of `source`, skipped records warned about (not fatal)."""
    if source == "-":
        records = read_json_lines(sys.stdin.buffer, "<stdin>", _FIELDS)
    elif source.lower().endswith(JSON_LINES_SUFFIXES):
        records = _read_file(Path(source), lambda stream: read_json_lines(stream, source, _FIELDS))
    else:
        records = _read_file(Path(source), lambda stream: _text_lines(stream, source))
    for record in records:
        if isinstance(record, Skipped):
            warning(f"{record.location}: skipped: {record.reason}")
        else:
            yield record


_FIELDS = FieldNames()  # as `index` reads documents: id/_id/docid, text/contents (+ title)


def _read_file(path: Path, read) -> Iterator[Document | Skipped]:
    try:
        stream = open_regular_file(path)
    except OSError as error:
        raise UsageError(f"{path}: cannot read it ({error.strerror or error})") from error
    with stream:
        if path.suffix.lower() == ".gz":
            import gzip
            with gzip.GzipFile(fileobj=stream) as unpacked:
                yield from read(unpacked)
        else:
            yield from read(stream)


def _text_lines(stream, source: str) -> Iterator[Document | Skipped]:
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            yield Skipped(source, number, f"invalid UTF-8 at byte {error.start}")
            continue
        if text.strip():
            yield Document(str(number), text, source, number)
