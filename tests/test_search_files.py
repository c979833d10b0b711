"""Search files (vector_store.py): derived, in INDEX/search/, built before the commit, checksummed, never written
by readers; and readers that finish on the generation they started on, whatever writers commit meanwhile."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
import threading
import zlib

import numpy as np
import pytest
from helpers import index, invoke, write_jsonl

import bge_index.store.vector_store as vector_store
from bge_index.store.checked_files import CACHE_ENV, CheckedFiles
from bge_index.errors import IndexFormatError
from bge_index.search.local_index import LocalIndex
from bge_index.store.manifest import FORMAT_VERSION, read_manifest
from bge_index.store.names import SEARCH_DIR, SEARCH_KINDS
from bge_index.search.query import Query, SearchRequest
from bge_index.store.shard_reader import verify_index
from bge_index.store.vector_store import OpenIndex


def corpus(path, n, edit=(), drop=()):
    """n small documents; `edit` changes some texts, `drop` leaves some out."""
    write_jsonl(path, [{"id": f"d{i}", "text": f"document {i} about the moon and {'tides' if i in edit else 'stars'} "
                        f"number {i * 7}"} for i in range(n) if i not in drop])


def listing(folder):
    """{relative path: (size, mtime_ns)} of everything under `folder`."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def search_ids(out, query="moon", *options):
    result = invoke("search", out, query, "--format", "json", *options)
    assert result.exit_code == 0, result.output
    return [h["id"] for h in json.loads(result.stdout)[0]["hits"]]


def test_search_files_live_in_search_folder_named_by_the_manifest(ix):
    manifest = read_manifest(ix)
    assert manifest.format_version == FORMAT_VERSION == 2
    assert not [p for p in ix.iterdir() if p.name.endswith(".npy") and ".deleted-" not in p.name]
    for shard in manifest.shards:
        records = {r["kind"]: r for r in shard.search}
        assert set(records) == set(SEARCH_KINDS)
        for record in records.values():
            path = ix / SEARCH_DIR / record["file"]
            assert path.stat().st_size == record["bytes"]
            assert zlib.crc32(path.read_bytes()) == record["crc32"]
        # Postings proportional to the shard's tokens, not to the vocabulary (250k x 8 bytes for BGE-M3).
        token_ids = np.load(ix / SEARCH_DIR / records["token-ids"]["file"])
        token_ptr = np.load(ix / SEARCH_DIR / records["token-ptr"]["file"])
        assert len(token_ptr) == len(token_ids) + 1 < manifest.vocab_size
        assert np.all(np.diff(token_ids.astype(np.int64)) > 0)
    assert verify_index(ix) == []


def test_files_follow_the_umask(tiny_model, tmp_path):
    out, docs = tmp_path / "ix", tmp_path / "docs.jsonl"
    old = os.umask(0o022)
    try:
        corpus(docs, 30)
        index(docs, out, tiny_model, "--shard-rows", "10")
        corpus(docs, 30, edit={1}, drop={2})  # a deletion set too
        index(docs, out, tiny_model, "--shard-rows", "10")
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file() and p.name != ".lock"]
    assert any(".deleted-" in p.name for p in files) and any(p.parent.name == SEARCH_DIR for p in files)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}


def test_search_writes_nothing_and_builds_missing_files_in_memory(ix):
    expected = search_ids(ix)
    shutil.rmtree(ix / SEARCH_DIR)  # the README's advice: search files may be deleted
    before = listing(ix)
    assert search_ids(ix) == expected
    assert listing(ix) == before  # nothing rebuilt on disk, no stamp touched: works on a read-only mount
    assert invoke("verify", ix).exit_code == 1  # but verify says they are missing


def _flip_byte(path, offset_from_end=3):
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["dense", "token-ptr", "posting-weights"])
def test_a_damaged_search_file_is_named_never_searched(ix, kind):
    record = next(r for r in read_manifest(ix).shards[1].search if r["kind"] == kind)
    path = ix / SEARCH_DIR / record["file"]
    _flip_byte(path)
    result = invoke("search", ix, "moon")
    assert result.exit_code == 1 and path.name in result.stderr and "damaged" in result.stderr
    assert "bge-index verify --repair" in result.stderr and "Traceback" not in result.output
    result = invoke("verify", ix)
    assert result.exit_code == 1 and path.name in result.stderr


def test_bounds_are_checked_even_when_the_checksum_agrees(ix):
    """A search file whose checksum matches the manifest but whose content is out of bounds (a writer bug)."""
    manifest_path = ix / "manifest.json"
    data = json.loads(manifest_path.read_text())
    record = next(r for r in data["shards"][0]["search"] if r["kind"] == "posting-rows")
    path = ix / SEARCH_DIR / record["file"]
    rows = np.load(path)
    rows[-1] = 10_000  # past the shard's rows
    np.save(path, rows)
    record["bytes"], record["crc32"] = path.stat().st_size, zlib.crc32(path.read_bytes())
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match="posting-rows.*row number past"):
        OpenIndex.open(ix)


def test_symlinked_search_file_is_refused(ix, tmp_path):
    record = read_manifest(ix).shards[0].search[0]
    path = ix / SEARCH_DIR / record["file"]
    outside = tmp_path / "elsewhere.npy"
    shutil.move(path, outside)
    path.symlink_to(outside)
    with pytest.raises(IndexFormatError, match="symbolic link"):
        OpenIndex.open(ix)
    assert any("symbolic link" in p for p in verify_index(ix))


@pytest.mark.slow
def test_disk_full_while_building_search_files_keeps_the_previous_generation(tiny_model, tmp_path, monkeypatch):
    out, docs = tmp_path / "ix", tmp_path / "docs.jsonl"
    corpus(docs, 30)
    index(docs, out, tiny_model, "--shard-rows", "10")
    before = read_manifest(out)
    expected = search_ids(out)
    real_header, calls = vector_store._npy_header, []

    def full(*args):
        calls.append(args)
        if len(calls) == 4:  # dense, token-ids, token-ptr written; the disk fills up on posting-rows
            raise OSError(28, "No space left on device")
        return real_header(*args)

    monkeypatch.setattr(vector_store, "_npy_header", full)
    corpus(docs, 40, edit={3}, drop={4})
    result = invoke("index", docs, "--out", out, "--model", tiny_model, "--shard-rows", "10")
    assert result.exit_code != 0 and "No space left" in result.output and "Traceback" not in result.output
    monkeypatch.undo()
    assert read_manifest(out) == before  # not committed
    assert search_ids(out) == expected and verify_index(out) == []
    named = {r["file"] for s in before.shards for r in s.search}
    assert {p.name for p in (out / SEARCH_DIR).iterdir()} == named  # the failed run's files are gone
    assert {p.name for p in out.glob("shard-*.parquet")} == {s.file for s in before.shards}


@pytest.mark.slow
def test_an_open_index_finishes_on_its_generation_through_later_commits(tiny_model, encoder, tmp_path):
    out, docs = tmp_path / "ix", tmp_path / "docs.jsonl"
    corpus(docs, 30)
    index(docs, out, tiny_model, "--shard-rows", "10")
    opened = LocalIndex(out, encoder=encoder)
    request = SearchRequest(k=40, with_text=True)
    [first] = opened.search([Query("q", "moon stars")], request)
    # Two commits: the first generation's shards and deletion sets are removed by the second one's clean-up.
    corpus(docs, 30, edit=set(range(0, 30, 2)), drop={1, 3})
    index(docs, out, tiny_model, "--shard-rows", "10")
    corpus(docs, 30, edit=set(range(30)), drop={5})
    index(docs, out, tiny_model, "--shard-rows", "10")
    gone = {s.file for s in opened.manifest.shards} - {p.name for p in out.iterdir()}
    assert gone  # files the open generation uses are unlinked now
    [again] = opened.search([Query("q", "moon stars")], SearchRequest(k=40, with_text=True, group_by_doc=True))
    assert sorted(h.id for h in again.hits) == sorted(h.id for h in first.hits)  # still the first generation
    assert {h.text for h in again.hits} == {h.text for h in first.hits}
    newer = opened.reopen()
    assert newer is not opened and newer.encoder is opened.encoder
    assert newer.manifest.generation == read_manifest(out).generation > opened.manifest.generation
    assert newer.reopen() is newer
    [latest] = newer.search([Query("q", "moon stars")], request)
    assert sorted(h.id for h in latest.hits) == sorted(f"d{i}" for i in range(30) if i != 5)


@pytest.mark.slow
def test_open_retries_when_the_generation_moves_under_it(tiny_model, tmp_path):
    out, docs = tmp_path / "ix", tmp_path / "docs.jsonl"
    corpus(docs, 20)
    index(docs, out, tiny_model, "--shard-rows", "10")
    stale = read_manifest(out)  # a reader read the manifest, then two writers committed before it opened files
    for edit in ({1, 2, 3, 4, 5, 6}, set(range(20))):
        corpus(docs, 20, edit=edit)
        index(docs, out, tiny_model, "--shard-rows", "10")
    assert not (out / stale.shards[0].file).exists()
    opened = OpenIndex.open(out, stale)
    assert opened.manifest.generation == read_manifest(out).generation


@pytest.mark.slow
def test_a_version_1_index_is_searched_and_upgraded_by_the_next_write(tiny_model, tmp_path):
    out, docs = tmp_path / "ix", tmp_path / "docs.jsonl"
    corpus(docs, 25)
    index(docs, out, tiny_model, "--shard-rows", "10")
    expected = search_ids(out)
    data = json.loads((out / "manifest.json").read_text())
    data["format_version"] = 1
    for shard in data["shards"]:
        shard.pop("search"), shard.pop("mtime_ns")
    (out / "manifest.json").write_text(json.dumps(data))
    shutil.rmtree(out / SEARCH_DIR)
    (out / "shard-000001-00000.dense.npy").write_bytes(b"old layout: ignored")
    before = listing(out)
    assert search_ids(out) == expected and listing(out) == before
    assert invoke("verify", out).exit_code == 0
    corpus(docs, 26)
    index(docs, out, tiny_model, "--shard-rows", "10")
    manifest = read_manifest(out)
    assert manifest.format_version == 2 and all(s.search for s in manifest.shards)
    assert verify_index(out) == []
    assert search_ids(out, "moon", "-k", "30") == search_ids(out, "moon", "-k", "30")


@pytest.mark.slow
def test_clean_up_keeps_only_the_search_files_of_named_shards(tiny_model, tmp_path):
    out, docs = tmp_path / "ix", tmp_path / "docs.jsonl"
    for n, edit in ((20, set()), (20, set(range(12))), (22, set(range(20)))):
        corpus(docs, n, edit=edit)
        index(docs, out, tiny_model, "--shard-rows", "10")
    (out / SEARCH_DIR / ".shard-000009-00000.dense.npy.tmp").write_bytes(b"crashed run")
    corpus(docs, 22, drop={0})
    index(docs, out, tiny_model, "--shard-rows", "10")
    current = read_manifest(out)
    named = {r["file"] for s in current.shards for r in s.search}
    present = {p.name for p in (out / SEARCH_DIR).iterdir()}
    # the previous generation's dropped shards wait in retired/, their search files in search/ (its readers)
    shards = {p.name.removesuffix(".parquet") for p in [*out.glob("shard-*.parquet"), *out.glob("retired/shard-*.parquet")]}
    assert named <= present and {p.split(".")[0] for p in present} <= shards


def _count_crc32(monkeypatch) -> list[int]:
    """Count the CRC-32 computations of search files (vector_store's zlib.crc32)."""
    calls: list[int] = []
    real = zlib.crc32

    def counting(data, value=0):
        calls.append(len(data))
        return real(data, value)

    monkeypatch.setattr(vector_store.zlib, "crc32", counting)
    return calls


def _new_process(monkeypatch, cache) -> None:
    """What a new process sees: no checks remembered in memory, only the user's record in `cache`."""
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.setattr(CheckedFiles, "_default", None)


def test_a_file_checked_once_is_not_read_again_by_the_next_search(ix, tmp_path, monkeypatch):
    _new_process(monkeypatch, tmp_path / "cache")
    calls = _count_crc32(monkeypatch)
    OpenIndex.open(ix)
    assert len(calls) == len(SEARCH_KINDS) * len(read_manifest(ix).shards)  # every search file, once
    _new_process(monkeypatch, tmp_path / "cache")
    calls.clear()
    OpenIndex.open(ix)
    assert calls == []  # a cold search on an untouched index reads no file whole
    assert (tmp_path / "cache" / "checked-files").stat().st_mode & 0o077 == 0  # the user's own


def test_a_file_changed_after_its_check_is_checked_again_even_with_its_mtime_put_back(ix, tmp_path, monkeypatch):
    _new_process(monkeypatch, tmp_path / "cache")
    OpenIndex.open(ix)
    record = next(r for r in read_manifest(ix).shards[0].search if r["kind"] == "dense")
    path = ix / SEARCH_DIR / record["file"]
    before = path.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity
    _flip_byte(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime: only ctime moved
    _new_process(monkeypatch, tmp_path / "cache")
    with pytest.raises(IndexFormatError, match="CRC-32 differs"):
        OpenIndex.open(ix)


def test_an_unusable_cache_folder_only_means_every_check_runs(ix, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _new_process(monkeypatch, blocker / "cache")
    calls = _count_crc32(monkeypatch)
    assert search_ids(ix)
    first = len(calls)
    _new_process(monkeypatch, blocker / "cache")
    assert search_ids(ix)
    assert first > 0 and len(calls) == 2 * first


def test_a_record_others_can_write_is_not_believed(ix, tmp_path, monkeypatch):
    _new_process(monkeypatch, tmp_path / "cache")
    OpenIndex.open(ix)
    record = tmp_path / "cache" / "checked-files"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600 and stat.S_IMODE(record.parent.stat().st_mode) == 0o700
    record.chmod(0o666)  # anyone could have added lines: every check runs
    _new_process(monkeypatch, tmp_path / "cache")
    calls = _count_crc32(monkeypatch)
    OpenIndex.open(ix)
    assert len(calls) == len(SEARCH_KINDS) * len(read_manifest(ix).shards)


def test_a_check_older_than_a_week_is_done_again(ix, tmp_path, monkeypatch):
    from bge_index.store import checked_files

    _new_process(monkeypatch, tmp_path / "cache")
    OpenIndex.open(ix)
    record = tmp_path / "cache" / "checked-files"
    old = int(time.time()) - checked_files.MAX_AGE_DAYS * 86_400 - 60
    record.write_text("".join(f"{line.split(' ')[0]} {old}\n" for line in record.read_text().splitlines()))
    _new_process(monkeypatch, tmp_path / "cache")
    calls = _count_crc32(monkeypatch)
    OpenIndex.open(ix)
    assert len(calls) == len(SEARCH_KINDS) * len(read_manifest(ix).shards)


def test_the_record_is_cut_to_its_newest_half(tmp_path, monkeypatch):
    from bge_index.store import checked_files

    monkeypatch.setattr(checked_files, "MAX_LINES", 10)
    checked = CheckedFiles(tmp_path / "c" / "checked-files")
    keys = [f"1:{n}:3:4:5:crc32={n}" for n in range(12)]
    for key in keys:
        checked.remember(key)
    lines = (tmp_path / "c" / "checked-files").read_text().splitlines()
    assert len(lines) <= 10 and lines[-1].startswith(keys[-1] + " ")
    assert stat.S_IMODE((tmp_path / "c" / "checked-files").stat().st_mode) == 0o600
    fresh = CheckedFiles(tmp_path / "c" / "checked-files")
    assert fresh.known(keys[-1]) and not fresh.known(keys[0])


# -- the record's place (issue 18) ---------------------------------------------


def test_a_fifo_at_the_record_path_never_hangs_a_search(ix, tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir(mode=0o700)
    os.mkfifo(tmp_path / "cache" / "checked-files", 0o600)
    _new_process(monkeypatch, tmp_path / "cache")
    done = []
    worker = threading.Thread(target=lambda: done.append(search_ids(ix)), daemon=True)
    worker.start()
    worker.join(20)
    assert done and done[0], "a search waited on a FIFO at the checksum record's path"


def test_a_missing_home_is_never_created(tmp_path, monkeypatch):
    home = tmp_path / "nonexistent"
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    checked = CheckedFiles.default()
    checked.remember("1:2:3:4:5:crc32=6")
    assert not home.exists() and checked.known("1:2:3:4:5:crc32=6")  # remembered in this process only


def test_a_cache_folder_inside_the_index_is_not_written(ix, monkeypatch):
    _new_process(monkeypatch, ix / "cache")
    assert search_ids(ix)
    assert not (ix / "cache").exists()


def test_remembered_checks_expire_in_a_long_lived_process(tmp_path, monkeypatch):
    from bge_index.store import checked_files

    checked = CheckedFiles(tmp_path / "c" / "checked-files")
    checked.remember("1:2:3:4:5:crc32=6")
    assert checked.known("1:2:3:4:5:crc32=6")
    later = time.time() + checked_files.MAX_AGE_DAYS * 86_400 + 60
    monkeypatch.setattr(checked_files.time, "time", lambda: later)
    assert not checked.known("1:2:3:4:5:crc32=6")  # a serve process running for over a week checks again
