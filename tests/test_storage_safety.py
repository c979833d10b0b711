"""The index folder is a boundary: no write through a symlink, no manifest name outside it, files that follow the
umask, no folder left holding only `.lock`, unwritable --out as a one-line error; small runs do not grow the index."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading

import numpy as np
import pytest
from test_shards import make_rows, new_manifest, write_index

from bge_index.errors import IndexFormatError, OutputFolderError
from bge_index.store.lock import LOCK_FILE, IndexLock
from bge_index.store.names import MANIFEST_FILE
from bge_index.store.shard_reader import RowLocation
from bge_index.store.manifest import read_manifest
from bge_index.store.shard_reader import verify_index
from bge_index.store.shard_writer import IndexWriter

PRECIOUS = b"someone else's file\n"


def precious_file(tmp_path):
    target = tmp_path / "outside" / "precious.txt"
    target.parent.mkdir()
    target.write_bytes(PRECIOUS)
    return target


# ---------------------------------------------------------------------------
# No write through a symlink


def test_symlink_planted_as_the_lock_is_never_followed(tmp_path):
    target = precious_file(tmp_path)
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    (index_dir / LOCK_FILE).symlink_to(target)
    with IndexLock(index_dir):
        lock = index_dir / LOCK_FILE
        assert stat.S_ISREG(os.lstat(lock).st_mode)  # the link was replaced by a real file
    assert target.read_bytes() == PRECIOUS


def test_symlink_planted_at_the_next_temporary_shard_name_is_never_followed(tmp_path):
    target = precious_file(tmp_path)
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    (index_dir / ".shard-000001-00000.parquet.tmp").symlink_to(target)
    manifest = write_index(index_dir, [make_rows(0, 5)], shard_rows=10)
    assert target.read_bytes() == PRECIOUS
    assert verify_index(index_dir) == []
    shard = index_dir / manifest.shards[0].file
    assert stat.S_ISREG(os.lstat(shard).st_mode)
    assert not (index_dir / ".shard-000001-00000.parquet.tmp").exists()


def test_a_symlink_is_never_adopted_as_a_shard(tmp_path):
    index_dir = tmp_path / "index"
    write_index(tmp_path / "other", [make_rows(0, 5)], shard_rows=10)
    index_dir.mkdir()
    staged = index_dir / ".staged.parquet.tmp"
    staged.symlink_to(tmp_path / "other" / "shard-000001-00000.parquet")
    writer = IndexWriter(index_dir, new_manifest(), 10)
    with pytest.raises(IndexFormatError, match="not a regular file"):
        writer.adopt(staged)


# ---------------------------------------------------------------------------
# Manifest names stay inside the folder


@pytest.mark.parametrize("key, name", [
    ("file", "../x.parquet"),
    ("file", "/etc/passwd"),
    ("file", "sub/shard-000001-00000.parquet"),
    ("file", "notes.txt"),
    ("deleted_file", "../shard-000001-00000.deleted-000002.npy"),
    ("deleted_file", "shard-000009-00000.deleted-000002.npy"),  # another shard's deletion set
])
def test_manifest_naming_a_file_outside_the_index_is_refused(tmp_path, key, name):
    write_index(tmp_path, [make_rows(0, 5)], shard_rows=10)
    path = tmp_path / MANIFEST_FILE
    data = json.loads(path.read_text())
    data["shards"][0][key] = name
    path.write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match="names the file"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("name", ["../x.npy", "/tmp/shard-000001-00000.dense.npy", "sub/shard-000001-00000.dense.npy",
                                  None])
def test_manifest_naming_a_search_file_outside_the_search_folder_is_refused(tmp_path, name):
    write_index(tmp_path, [make_rows(0, 5)], shard_rows=10)
    path = tmp_path / MANIFEST_FILE
    data = json.loads(path.read_text())
    data["shards"][0]["search"] = [{"kind": "dense", "file": name, "bytes": 1, "crc32": 0}]
    path.write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match="names the file"):
        read_manifest(tmp_path)


def test_failed_first_run_leaves_no_empty_search_folder(tmp_path):
    index_dir = tmp_path / "index"
    with pytest.raises(RuntimeError):
        with IndexLock(index_dir):
            (index_dir / "search").mkdir()  # what an aborted writer leaves once its search files are removed
            raise RuntimeError("the run failed")
    assert not index_dir.exists()


def test_manifest_read_through_a_symlink_is_refused(tmp_path):
    write_index(tmp_path / "real", [make_rows(0, 5)], shard_rows=10)
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    (index_dir / MANIFEST_FILE).symlink_to(tmp_path / "real" / MANIFEST_FILE)
    with pytest.raises(IndexFormatError):
        read_manifest(index_dir)


# ---------------------------------------------------------------------------
# Permissions follow the umask


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        base = write_index(tmp_path, [make_rows(0, 10)], shard_rows=10)
        writer = IndexWriter(tmp_path, new_manifest(generation=2), 10, base=base)
        writer.delete(RowLocation(base.shards[0].file, 3))
        manifest = writer.commit()
    finally:
        os.umask(old)
    names = [MANIFEST_FILE, manifest.shards[0].file, manifest.shards[0].deleted_file]
    assert {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in names} == dict.fromkeys(names, mode)


# ---------------------------------------------------------------------------
# No folder left holding only the lock


def test_failed_first_run_leaves_no_folder_behind(tmp_path):
    index_dir = tmp_path / "new" / "index"
    with pytest.raises(RuntimeError):
        with IndexLock(index_dir):
            raise RuntimeError("the run failed")
    assert not index_dir.exists()


def test_failed_first_run_in_an_existing_folder_removes_only_the_lock(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexLock(tmp_path):
            raise RuntimeError("the run failed")
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []


def test_lock_of_a_written_index_stays(tmp_path):
    with IndexLock(tmp_path):
        write_index(tmp_path, [make_rows(0, 3)])
    assert (tmp_path / LOCK_FILE).is_file()


def test_a_waiter_never_holds_a_lock_on_an_unlinked_file(tmp_path):
    """The first holder leaves no index, so it unlinks the lock file (and its folder) as it leaves; the run that
    waited for it must end up holding the lock on the file the path names, not on the unlinked one."""
    index_dir = tmp_path / "index"
    waiting = threading.Event()
    seen = {}

    def second():
        with IndexLock(index_dir, wait=True, on_wait=lambda message: waiting.set(), poll_seconds=0.01) as lock:
            named = os.stat(lock.path, follow_symlinks=False)
            opened = os.fstat(lock._fd)
            seen["same"] = (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)
            seen["locked"] = _is_locked_by_others(lock.path)

    with IndexLock(index_dir):
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(60)
    thread.join(60)
    assert seen == {"same": True, "locked": True}


def _is_locked_by_others(path) -> bool:
    """Whether a fresh open file description of `path` cannot take the flock (flock locks are per description)."""
    import fcntl
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# ---------------------------------------------------------------------------
# Unwritable --out


def test_out_below_a_file_is_an_output_folder_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="cannot create"):
        with IndexLock(tmp_path / "file" / "index"):
            pass


def test_unwritable_out_is_an_output_folder_error(tmp_path, monkeypatch):
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    with pytest.raises(OutputFolderError, match="cannot write there"):
        with IndexLock(tmp_path):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_an_output_folder_error(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OutputFolderError):
            with IndexLock(tmp_path / "index"):
                pass
    finally:
        tmp_path.chmod(0o755)


def test_read_only_out_in_the_cli_is_one_line(tiny_model, tmp_path, monkeypatch):
    from helpers import invoke, write_jsonl

    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [{"id": "a", "text": "hello"}])
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    result = invoke("index", corpus, "--out", tmp_path / "index", "--model", tiny_model)
    assert result.exit_code != 0
    assert "Traceback" not in result.output and "cannot write there" in result.output


# ---------------------------------------------------------------------------
# No growth from small runs

REAL_DIM, REAL_VOCAB = 1024, 250_002  # BGE-M3's: per-shard overheads matter relative to rows of this size


def real_sized_rows(doc_ids: list[int], version: dict[int, int]):
    from bge_index.store.shard_writer import RowBatch

    dense, sparse, texts = [], [], []
    for doc in doc_ids:
        rng = np.random.default_rng([doc, version.get(doc, 0)])
        vector = rng.normal(size=REAL_DIM).astype(np.float32)
        dense.append(vector / np.linalg.norm(vector))
        tokens = np.sort(rng.choice(REAL_VOCAB, size=40, replace=False)).astype(np.uint32)
        sparse.append((tokens, rng.random(40).astype(np.float32) + 0.01))
        texts.append(" ".join(f"w{w}" for w in rng.integers(0, 5000, size=60)))
    return RowBatch([f"d{doc}" for doc in doc_ids], [f"h{doc}-{version.get(doc, 0)}" for doc in doc_ids], texts,
                    np.stack(dense), sparse)


def real_sized_manifest(generation: int):
    from bge_index.store.manifest import Manifest

    return Manifest(model={"name": "test-model", "revision": None, "sha256": "ab" * 32, "files": {}},
                    dense_dim=REAL_DIM, colbert_dim=None, vocab_size=REAL_VOCAB, store_text=True,
                    generation=generation)


def index_bytes(index_dir, manifest) -> tuple[int, int]:
    """(manifest + shards + deletion sets, search files) in bytes: only the files this manifest names."""
    from bge_index.store.names import DERIVED_PATTERN

    data = (index_dir / MANIFEST_FILE).stat().st_size + sum(s.bytes for s in manifest.shards)
    data += sum((index_dir / s.deleted_file).stat().st_size for s in manifest.shards if s.deleted_file)
    search = 0
    for shard in manifest.shards:
        records = getattr(shard, "search", None)
        if records:  # recorded in the manifest, files in INDEX/search/
            search += sum((index_dir / "search" / record["file"]).stat().st_size for record in records)
        else:  # format version 1: next to the shard
            stem = shard.file.removesuffix(".parquet")
            search += sum(p.stat().st_size for p in index_dir.iterdir()
                          if (m := DERIVED_PATTERN.match(p.name)) and m.group(1) == stem)
    return data, search


@pytest.mark.slow
def test_fifty_one_document_runs_stay_within_one_and_a_half_times_a_fresh_build(tmp_path):
    from bge_index.store.shard_reader import iter_live_keys

    docs, runs = 1000, 50
    edited, fresh = tmp_path / "edited", tmp_path / "fresh"
    version: dict[int, int] = {}
    writer = IndexWriter(edited, real_sized_manifest(1), 100_000)
    writer.write(real_sized_rows(list(range(docs)), version))
    manifest = writer.commit()
    for run in range(runs):
        doc = (run * 37) % docs
        version[doc] = version.get(doc, 0) + 1
        [location] = [loc for key, _, loc in iter_live_keys(edited, manifest) if key == f"d{doc}"]
        writer = IndexWriter(edited, real_sized_manifest(manifest.generation + 1), 100_000, base=manifest)
        writer.delete(location)
        writer.write(real_sized_rows([doc], version))
        manifest = writer.commit()
    writer = IndexWriter(fresh, real_sized_manifest(1), 100_000)
    writer.write(real_sized_rows(list(range(docs)), version))
    fresh_manifest = writer.commit()

    live = {key: content for key, content, _ in iter_live_keys(edited, read_manifest(edited))}
    assert live == {f"d{doc}": f"h{doc}-{version.get(doc, 0)}" for doc in range(docs)}
    edited_data, edited_search = index_bytes(edited, manifest)
    fresh_data, fresh_search = index_bytes(fresh, fresh_manifest)
    print(f"\nafter {runs} one-document runs: data {edited_data} search {edited_search}; "
          f"fresh build: data {fresh_data} search {fresh_search}; shards {len(manifest.shards)}")
    assert edited_data <= 1.5 * fresh_data
    assert edited_data + edited_search <= 1.5 * (fresh_data + fresh_search)
    # Search visits every shard: a bounded count (at most MERGE_FACTOR - 1 small shards per size tier).
    assert len(manifest.shards) <= 1 + 3 * 5


def test_small_shards_merge_tier_by_tier_with_their_deletions_applied(tmp_path):
    from bge_index.store.shard_reader import iter_live_keys
    from bge_index.store.shard_writer import MERGE_FACTOR

    manifest = write_index(tmp_path, [make_rows(0, 50)], shard_rows=100)
    for run in range(1, 21):  # each run adds one row and retires the previous run's copy of doc-0 or a base row
        writer = IndexWriter(tmp_path, new_manifest(generation=manifest.generation + 1), 100, base=manifest)
        [location] = [loc for key, _, loc in iter_live_keys(tmp_path, manifest) if key == f"doc-{run}"]
        writer.delete(location)
        writer.write(make_rows(run, 1, seed=run * 1000))
        manifest = writer.commit()
        small = [s for s in manifest.shards if s.live_rows < 100]
        assert len(small) <= (MERGE_FACTOR - 1) * 3 + 1, [s.live_rows for s in manifest.shards]
    assert verify_index(tmp_path) == []
    assert sorted(key for key, _, _ in iter_live_keys(tmp_path, manifest)) == sorted(f"doc-{i}" for i in range(50))
    assert manifest.documents == 50
    assert len(manifest.shards) < 20  # 21 without merging


def test_dry_run_of_a_first_build_leaves_no_folder(tiny_model, tmp_path):
    from helpers import invoke, write_jsonl

    corpus, out = tmp_path / "corpus.jsonl", tmp_path / "index"
    write_jsonl(corpus, [{"id": "a", "text": "hello"}])
    result = invoke("index", corpus, "--out", out, "--model", tiny_model, "--dry-run")
    assert result.exit_code == 0, result.output
    assert not out.exists()


def test_a_failed_first_cli_run_leaves_no_folder(tiny_model, tmp_path):
    from helpers import invoke, write_jsonl

    corpus, out = tmp_path / "corpus.jsonl", tmp_path / "index"
    write_jsonl(corpus, [{"id": "a", "text": "hello"}, {"id": "b"}])  # b has no text: fails under --strict
    result = invoke("index", corpus, "--out", out, "--model", tiny_model, "--strict")
    assert result.exit_code != 0
    assert not out.exists()


@pytest.mark.parametrize("which", ["shard", "deletion set"])
def test_verify_reports_a_file_replaced_by_a_symlink(tmp_path, which):
    base = write_index(tmp_path / "index", [make_rows(0, 10)], shard_rows=10)
    writer = IndexWriter(tmp_path / "index", new_manifest(generation=2), 10, base=base)
    writer.delete(RowLocation(base.shards[0].file, 3))
    manifest = writer.commit()
    shard = manifest.shards[0]
    path = tmp_path / "index" / (shard.file if which == "shard" else shard.deleted_file)
    copy = tmp_path / "elsewhere"
    copy.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(copy)
    assert any("symbolic link" in problem for problem in verify_index(tmp_path / "index"))
