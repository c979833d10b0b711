"""Where the checksum record lives: the platform's user cache folder (platformdirs), never followed through a
link, never blocking, never in an index or the working folder, never creating a missing home ("runs that fail
safe", point 1). The searches that use it are tested in test_search_files.py."""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
import uuid
from pathlib import Path

import platformdirs
import pytest

from bge_index.store import checked_files
from bge_index.store.checked_files import CACHE_ENV, RECORD_FILE, CheckedFiles, cache_dir

posix_only = pytest.mark.skipif(not hasattr(os, "geteuid"), reason="owner and mode bits, FIFOs and O_NOFOLLOW are POSIX")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG folders are the Linux default")


def _key() -> str:
    """A key no other test remembered (the memory-only instance is shared by the whole process)."""
    return f"1:2:3:4:5:crc32={uuid.uuid4().int % 10**9}"


@pytest.fixture
def no_override(monkeypatch, tmp_path):
    """The platform decides: no BGE_INDEX_CACHE_DIR (conftest sets one for the session), no remembered instance,
    and a home of this test's (missing: nothing is created in it), so the user's own cache is never touched."""
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "no-home"))
    monkeypatch.setattr(CheckedFiles, "_default", None)


def _platform_says(monkeypatch, answer) -> list:
    """Make platformdirs answer `answer` (a path, or an exception to raise); the calls it got are returned."""
    calls = []

    def user_cache_dir(*args, **kwargs):
        calls.append((args, kwargs))
        if isinstance(answer, BaseException):
            raise answer
        return str(answer)

    monkeypatch.setattr(platformdirs, "user_cache_dir", user_cache_dir)
    return calls


# -- platformdirs decides the default -----------------------------------------------------------------------------


def test_platformdirs_decides_the_default_folder(tmp_path, monkeypatch, no_override):
    folder = tmp_path / "Library" / "Caches" / "bge-index"  # a macOS-shaped answer, say
    calls = _platform_says(monkeypatch, folder)
    assert cache_dir() == folder
    assert calls and calls[0][0] == ("bge-index",) and calls[0][1].get("appauthor") is False
    assert not calls[0][1].get("ensure_exists")  # platformdirs never creates anything for us
    (tmp_path / "Library").mkdir()
    checked = CheckedFiles.default()
    key = _key()
    checked.remember(key)
    assert checked.record == folder / RECORD_FILE
    assert (folder / RECORD_FILE).read_text().startswith(key + " ")
    assert stat.S_IMODE(folder.stat().st_mode) & 0o077 == 0 and stat.S_IMODE(
        (folder / RECORD_FILE).stat().st_mode) & 0o077 == 0


def test_the_override_wins_over_the_platform(tmp_path, monkeypatch):
    calls = _platform_says(monkeypatch, tmp_path / "platform")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" and calls == []


@linux_only
def test_xdg_cache_home_is_honoured_on_linux(tmp_path, monkeypatch, no_override):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "bge-index"
    assert cache_dir() == Path(platformdirs.user_cache_dir("bge-index", appauthor=False))


@linux_only
def test_without_xdg_the_linux_default_is_dot_cache(tmp_path, monkeypatch, no_override):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "bge-index"


# -- never the working folder ---------------------------------------------------------------------------------------


def test_a_relative_override_writes_nothing_in_the_working_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv(CACHE_ENV, "cache")
    monkeypatch.setattr(CheckedFiles, "_default", None)
    assert cache_dir() is None
    checked, key = CheckedFiles.default(), _key()
    checked.remember(key)
    assert checked.known(key) and checked.record is None  # remembered in this process only
    assert list(work.iterdir()) == []


@linux_only
def test_a_relative_xdg_cache_home_writes_nothing_in_the_working_folder(tmp_path, monkeypatch, no_override):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative-cache")  # invalid by the XDG spec: ignored
    monkeypatch.setenv("HOME", str(home))
    CheckedFiles.default().remember(_key())
    assert list(work.iterdir()) == []
    folder = cache_dir()
    assert folder is None or folder.is_absolute()


def test_no_home_to_be_found_means_memory_only(tmp_path, monkeypatch, no_override):
    _platform_says(monkeypatch, RuntimeError("could not determine the home directory"))
    assert cache_dir() is None
    checked, key = CheckedFiles.default(), _key()
    checked.remember(key)
    assert checked.record is None and checked.known(key)


# -- the old safety properties, with the platform's folder ---------------------------------------------------------


def test_a_missing_home_under_the_platform_folder_is_never_created(tmp_path, monkeypatch, no_override):
    home = tmp_path / "nonexistent"
    _platform_says(monkeypatch, home / "Library" / "Caches" / "bge-index")
    checked, key = CheckedFiles.default(), _key()
    checked.remember(key)
    assert not home.exists() and checked.known(key)


def test_the_platform_folder_inside_the_index_is_not_used(tmp_path, monkeypatch, no_override):
    index = tmp_path / "index"
    index.mkdir()
    _platform_says(monkeypatch, index / ".cache" / "bge-index")
    checked = CheckedFiles.default(outside=index)
    checked.remember(_key())
    assert checked.record is None and list(index.iterdir()) == []


@posix_only
def test_a_cache_folder_that_is_a_link_is_not_followed(tmp_path, monkeypatch):
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    (tmp_path / "cache").symlink_to(real)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(CheckedFiles, "_default", None)
    checked, key = CheckedFiles.default(), _key()
    checked.remember(key)
    assert checked.known(key) and list(real.iterdir()) == []  # remembered in this process only


@posix_only
def test_a_record_that_is_a_link_is_neither_read_nor_written(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    key = _key()
    target = tmp_path / "target"
    target.write_text(f"{key} {int(time.time())}\n")
    target.chmod(0o600)
    (folder / RECORD_FILE).symlink_to(target)
    checked = CheckedFiles(folder / RECORD_FILE)
    assert not checked.known(key)
    checked.remember(_key())
    assert target.read_text().count("\n") == 1


@posix_only
def test_a_folder_others_can_write_is_not_believed(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    key = _key()
    (folder / RECORD_FILE).write_text(f"{key} {int(time.time())}\n")
    (folder / RECORD_FILE).chmod(0o600)
    assert CheckedFiles(folder / RECORD_FILE).known(key)  # this user's own: believed
    folder.chmod(0o777)  # anyone could have put the record there
    try:
        assert not CheckedFiles(folder / RECORD_FILE).known(key)
    finally:
        folder.chmod(0o700)


@posix_only
def test_a_fifo_at_the_record_path_never_blocks(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    os.mkfifo(folder / RECORD_FILE, 0o600)
    checked, key, done = CheckedFiles(folder / RECORD_FILE), _key(), []

    def use():
        checked.remember(key)
        done.append(checked.known(key))

    worker = threading.Thread(target=use, daemon=True)
    worker.start()
    worker.join(20)
    assert done == [True], "the record's open waited on a FIFO"


def test_the_module_asks_platformdirs_at_call_time(monkeypatch, tmp_path, no_override):
    # Not a value computed at import: a changed environment (a test, a serve process's HOME) is seen.
    _platform_says(monkeypatch, tmp_path / "one")
    assert cache_dir() == tmp_path / "one"
    _platform_says(monkeypatch, tmp_path / "two")
    assert cache_dir() == tmp_path / "two" and checked_files.platformdirs is platformdirs
