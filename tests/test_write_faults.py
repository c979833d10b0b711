"""A write that fails (disk full, I/O error, read-only file system, no permission) anywhere an index is written is
one `bge-index: error:` line naming the file and the OS error, exit 1, and the previous generation stays intact;
and every rename is followed by an fsync of its folder before the manifest that names the file.

Faults are made in process at the lowest call that writes: a file opened (os.fdopen) for one of the index's
temporary names gets a stream whose writes fail, or os.fsync fails for it, as a full or failing disk would.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from helpers import invoke, write_jsonl
from test_shards import make_rows, new_manifest, write_index

from bge_index.errors import BgeIndexError, WriteError
from bge_index.store.manifest import read_manifest
from bge_index.store.names import SEARCH_DIR
from bge_index.store.shard_reader import RowLocation, verify_index
from bge_index.store.shard_writer import IndexWriter

# the temporary names each kind of file is written under, before its rename
TARGETS = {
    "shard": r"^\.shard-\d+-\d+\.parquet\.tmp$",
    "search file": r"^\.shard-\d+-\d+\.posting-rows\.npy\.tmp$",
    "deletion set": r"^\.shard-\d+-\d+\.deleted-\d+\.npy\..*\.tmp$",
    "manifest": r"^\.manifest\.json\..*\.tmp$",
}
ERRNOS = [errno.ENOSPC, errno.EIO, errno.EROFS, errno.EACCES]


def fd_name(fd: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return ""


class FailingStream:
    """A file opened for writing whose writes fail with `number`, as they would on a full or failing disk."""

    def __init__(self, inner, number: int):
        self._inner, self._errno = inner, number

    def write(self, data):
        raise OSError(self._errno, os.strerror(self._errno))

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._inner.close()


def fail_writes(monkeypatch, target: str, number: int, at: str = "write") -> list[str]:
    """Make writes (at="write") or fsyncs (at="fsync") of files named like TARGETS[target] fail with `number`;
    returns the names that failed."""
    pattern, failed = re.compile(TARGETS[target]), []
    if at == "write":
        real_fdopen = os.fdopen

        def fdopen(fd, *args, **kwargs):
            stream = real_fdopen(fd, *args, **kwargs)
            name = fd_name(fd)
            if pattern.match(name):
                failed.append(name)
                return FailingStream(stream, number)
            return stream

        monkeypatch.setattr(os, "fdopen", fdopen)
    else:
        real_fsync = os.fsync

        def fsync(fd):
            name = fd_name(fd if isinstance(fd, int) else fd.fileno())
            if pattern.match(name):
                failed.append(name)
                raise OSError(number, os.strerror(number))
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    return failed


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".lock"}


# ---------------------------------------------------------------------------
# The writer: every kind of file, every error


def next_generation(index_dir, base) -> IndexWriter:
    """A writer for generation 2 that adds rows (a shard, its search files) and retires a row (a deletion set)."""
    writer = IndexWriter(index_dir, new_manifest(generation=2), shard_rows=5, base=base)
    writer.write(make_rows(100, 3))
    writer.delete(RowLocation(base.shards[0].file, 1))
    return writer


@pytest.mark.parametrize("at", ["write", "fsync"])
@pytest.mark.parametrize("number", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("target", list(TARGETS))
def test_a_failed_write_is_one_error_naming_the_file_and_the_previous_generation_stays(tmp_path, monkeypatch,
                                                                                      target, number, at):
    base = write_index(tmp_path, [make_rows(0, 10)], shard_rows=5)
    before = listing(tmp_path)
    failed = fail_writes(monkeypatch, target, number, at)
    writer = None
    with pytest.raises(BgeIndexError) as caught:
        writer = next_generation(tmp_path, base)
        writer.commit()
    monkeypatch.undo()
    assert failed, "the fault was never hit"
    message = str(caught.value)
    assert caught.value.exit_code == 1 and "\n" not in message
    assert os.strerror(number) in message and "nothing was committed" in message
    if target != "search file":  # search files: vector_store's OutputError, which names the file too
        assert isinstance(caught.value, WriteError)
    kind = {"shard": ".parquet", "search file": ".posting-rows.npy", "deletion set": ".deleted-000002.npy",
            "manifest": "manifest.json"}[target]
    assert re.search(rf"{re.escape(str(tmp_path))}/(search/)?[^ ]*{re.escape(kind)}: ", message), message
    if writer is not None:
        writer.abort()
    assert read_manifest(tmp_path) == base and verify_index(tmp_path) == []
    assert listing(tmp_path) == before  # nothing of the failed write is left behind


def test_every_rename_is_followed_by_an_fsync_of_its_folder_before_the_manifest(tmp_path, monkeypatch):
    events = []
    real_replace, real_fsync, real_mkdir = os.replace, os.fsync, os.mkdir

    def replace(source, destination, *args, **kwargs):
        real_replace(source, destination, *args, **kwargs)
        events.append(("rename", Path(destination)))

    def fsync(fd):
        real_fsync(fd)
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if target.is_dir():
            events.append(("fsync", target))

    def mkdir(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        events.append(("mkdir", Path(path)))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "mkdir", mkdir)
    out = tmp_path / "ix"
    write_index(out, [make_rows(0, 12)], shard_rows=5)  # a first build: shards and search files, no deletion set
    manifest_at = next(i for i, (what, path) in enumerate(events) if what == "rename" and path.name == "manifest.json")
    shards = read_manifest(out).shards
    # shards, their search files, and the generation's deletes file (for other tools)
    assert sum(what == "rename" for what, _ in events[:manifest_at]) == len(shards) + sum(len(s.search) for s in shards) + 1
    for i, (what, path) in enumerate(events[:manifest_at]):
        if what in ("rename", "mkdir"):
            assert ("fsync", path.parent) in events[i + 1:manifest_at], f"{what} {path}: its folder is not synced"


def test_a_folder_that_cannot_be_synced_is_never_named_by_a_manifest(tmp_path, monkeypatch):
    base = write_index(tmp_path, [make_rows(0, 10)], shard_rows=5)
    before = listing(tmp_path)
    real_fsync, failed = os.fsync, []

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path):
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    writer = next_generation(tmp_path, base)
    with pytest.raises(WriteError, match=f"{re.escape(str(tmp_path))}: cannot write it \\(Input/output error\\)"):
        writer.commit()
    monkeypatch.undo()
    assert failed
    writer.abort()
    assert read_manifest(tmp_path) == base and verify_index(tmp_path) == [] and listing(tmp_path) == before


# ---------------------------------------------------------------------------
# The command line: one line, exit 1, the previous generation searchable as it was


def corpus(path, n, edit=(), drop=()):
    write_jsonl(path, [{"id": f"d{i}", "text": f"document {i} about the moon and {'tides' if i in edit else 'stars'} "
                        f"number {i * 7}"} for i in range(n) if i not in drop])


@pytest.fixture(scope="module")
def pristine(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    corpus(folder / "docs.jsonl", 30)
    result = invoke("index", folder / "docs.jsonl", "--out", folder / "ix", "--model", tiny_model,
                    "--shard-rows", "10")
    assert result.exit_code == 0, result.output
    return folder / "ix"


def answers(out):
    result = invoke("search", out, "moon tides", "--format", "json", "-k", "10")
    assert result.exit_code == 0, result.output
    return [(h["id"], h["score"]) for h in json.loads(result.stdout)[0]["hits"]]


@pytest.mark.parametrize("target, number, at", [
    ("shard", errno.ENOSPC, "write"), ("shard", errno.EIO, "fsync"), ("search file", errno.ENOSPC, "write"),
    ("deletion set", errno.EROFS, "write"), ("manifest", errno.ENOSPC, "write"), ("manifest", errno.EACCES, "fsync")])
def test_index_that_cannot_write_is_one_line_exit_1_and_the_index_stays(pristine, tiny_model, tmp_path, monkeypatch,
                                                                        target, number, at):
    out = tmp_path / "ix"
    shutil.copytree(pristine, out, copy_function=shutil.copy2)
    before, expected = read_manifest(out), answers(out)
    corpus(tmp_path / "docs.jsonl", 40, edit={3}, drop={4})  # new shards, and deletion sets on the old ones
    failed = fail_writes(monkeypatch, target, number, at)
    result = invoke("index", tmp_path / "docs.jsonl", "--out", out, "--model", tiny_model, "--shard-rows", "10",
                    "--quiet")
    monkeypatch.undo()
    assert failed, "the fault was never hit"
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bge-index: error: "), result.stderr
    assert os.strerror(number) in lines[0] and str(out) in lines[0]
    assert read_manifest(out) == before and verify_index(out) == []
    assert answers(out) == expected
    named = {r["file"] for s in before.shards for r in s.search}
    assert {p.name for p in (out / SEARCH_DIR).iterdir()} == named  # the failed run's files are gone


# ---------------------------------------------------------------------------
# A real fault from the kernel: a file size limit (RLIMIT_FSIZE) makes write(2) fail with EFBIG, as a full disk
# fails it with ENOSPC (Python ignores SIGXFSZ, so the write fails instead of killing the process)


@pytest.mark.parametrize("limit, what", [
    (None, "manifest.json"),  # shards and search files fit (the limit is measured below); the manifest does not
    pytest.param(1000, ".parquet", marks=pytest.mark.slow),  # the first new shard does not fit
])
def test_a_real_write_failure_in_a_real_process_is_one_line(pristine, tiny_model, tmp_path, limit, what):
    import resource

    from helpers import module_command, run_process

    out = tmp_path / "ix"
    shutil.copytree(pristine, out, copy_function=shutil.copy2)
    before, expected = read_manifest(out), answers(out)
    corpus(tmp_path / "docs.jsonl", 40, edit={3}, drop={4})
    if limit is None:  # just above the largest data file of an index like this one, below its manifest
        data = [p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"]
        limit = max(data) + 1024
        assert (out / "manifest.json").stat().st_size > limit

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    finished = run_process(module_command("index", tmp_path / "docs.jsonl", "--out", out, "--model", tiny_model,
                                          "--shard-rows", "10", "--quiet"), preexec_fn=small_files)
    assert finished.returncode == 1, finished.stderr
    lines = finished.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bge-index: error: "), finished.stderr
    assert os.strerror(errno.EFBIG) in lines[0] and what in lines[0]
    assert read_manifest(out) == before and verify_index(out) == [] and answers(out) == expected
