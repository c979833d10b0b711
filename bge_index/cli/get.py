"""`bge-index get INDEX ID...`: the stored documents of some ids, as JSON (no model loaded)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from bge_index.cli.options import IndexDir
from bge_index.errors import NotInIndexError
from bge_index.store.lookup import stored_documents
from bge_index.store.manifest import read_manifest


def get(
    index_dir: IndexDir,
    ids: Annotated[list[str], typer.Argument(help="Document ids (a chunked index: the documents' ids).",
                                             show_default=False)],
) -> None:
    """Print the stored documents of these ids as a JSON list: id, text (and passage spans when chunked)."""
    manifest = read_manifest(index_dir)
    records, missing = stored_documents(index_dir, manifest, ids)
    sys.stdout.write(json.dumps(records, ensure_ascii=False, indent=2) + "\n")
    if missing:
        raise NotInIndexError(f"not in the index: {', '.join(repr(i) for i in missing)}")
