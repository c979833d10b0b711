"""What `info` reports of an index: its manifest, where it is and how many bytes it takes."""

from __future__ import annotations

from pathlib import Path

from bge_index.store.manifest import Manifest
from bge_index.store.names import MANIFEST_FILE


def index_size_bytes(index_dir: Path, manifest: Manifest) -> int:
    """Bytes of manifest.json and of the shards and deletion sets it names (search files not counted)."""
    deletion_sets = sum((index_dir / s.deleted_file).stat().st_size for s in manifest.shards if s.deleted_file)
    return sum(s.bytes for s in manifest.shards) + deletion_sets + (index_dir / MANIFEST_FILE).stat().st_size


def index_info(index_dir: Path, manifest: Manifest) -> dict:
    """The manifest as JSON plus where the index is and its size: what `info --format json` prints."""
    data = manifest.to_json()
    data["index_dir"] = str(index_dir)
    data["bytes"] = index_size_bytes(index_dir, manifest)
    return data
