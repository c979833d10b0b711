"""Files whose checksum this user has already checked, remembered across processes, so a check is never repeated
on bytes that cannot have changed.

A search checks each search file's CRC-32 (and a shard whose mtime moved, its
SHA-256) before trusting it: on a million-row index that is 1.2 s of
reading 3 GB, for every cold `bge-index search`. A check is remembered under
a key of what any change to the file would change: device, inode, size,
mtime, **ctime** (which every write and every `touch` moves, and which no
user can set back) and the checksum it was checked against. A file with the
same key has the bytes that passed.

    checked = CheckedFiles.default()
    key = file_key(os.fstat(fd), "crc32=1234")
    if not checked.known(key):
        ...check...
        checked.remember(key)

The record is one line per key and the time of its check, in
`$BGE_INDEX_CACHE_DIR`, else the platform's user cache folder as platformdirs
names it (Linux: `$XDG_CACHE_HOME/bge-index`, else `~/.cache/bge-index`;
macOS: `~/Library/Caches/bge-index`; Windows: `%LOCALAPPDATA%\\bge-index\\Cache`):
`checked-files`, appended with O_APPEND (lines of concurrent processes never
interleave) and cut to its newest half past MAX_LINES. A check is trusted for
MAX_AGE_DAYS, then done again: bytes that rot under unchanged metadata (a bad
sector, a copy that keeps inode and timestamps at a coarse clock) are caught
within a week. The record is only believed when it and its folder are this
user's own, no link, and no one else can write them (folder 0700, file 0600);
it is opened without following a link and without blocking (a FIFO put there
fails at once). Never inside an index folder: a search writes nothing there.
Never a relative path either (a relative override, a home that cannot be
found): that would be the working folder's. Only the cache folder and at most
its parent are ever created, never a missing home. A cache that cannot be
read or written just remembers nothing: every check then runs, as before.
`verify` never uses it.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
import time
from pathlib import Path

import platformdirs

CACHE_ENV = "BGE_INDEX_CACHE_DIR"
APP_NAME = "bge-index"  # the folder's name under the platform's cache folder
RECORD_FILE = "checked-files"
MAX_LINES = 20_000  # ~2 MB; a year of daily commits on a 20-shard index stays well under it
MAX_AGE_DAYS = 7


def cache_dir() -> Path | None:
    """Where bge-index keeps per-user state that may be lost at any time; None when there is no such place.

    `$BGE_INDEX_CACHE_DIR` when set, else the user cache folder platformdirs gives for this platform (on
    Linux it honours `$XDG_CACHE_HOME`). Nothing is created here. A relative path is no place: it would put
    the record in whatever folder the command runs in (a corpus, a repository).
    """
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        try:
            # appauthor=False: no vendor folder level on Windows; ensure_exists stays off (never creates a home)
            folder = platformdirs.user_cache_dir(APP_NAME, appauthor=False)
        except (RuntimeError, OSError, KeyError):  # no home to be found (recent platformdirs raise RuntimeError)
            return None
    path = Path(folder)
    return path if path.is_absolute() else None


def file_key(info: os.stat_result, checksum: str) -> str:
    """The key of a file's state (from os.stat/fstat) and the checksum it must have (`crc32=...`, no colon)."""
    return (f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:"
            f"{checksum}")


class CheckedFiles:
    """The keys checked in this process and, when the record can be read, by earlier ones."""

    _default: "CheckedFiles | None" = None
    _default_lock = threading.Lock()

    def __init__(self, record: Path | None):
        self.record = record
        self._keys: dict[str, float] | None = None  # key -> when it was checked; read on first use
        self._lines = 0  # lines in the record, as far as this process knows
        self._lock = threading.Lock()

    @classmethod
    def default(cls, outside: Path | None = None) -> "CheckedFiles":
        """The process-wide instance on this user's record (a new one if the cache directory setting changed).

        With `outside` (the index being read): a record whose folder lies inside it is not used (checks are
        remembered in this process only): a search never writes into an index folder. Nor is one when there
        is no cache folder (`cache_dir()` is None).
        """
        folder = cache_dir()
        if folder is None or (outside is not None and _is_inside(folder, outside)):
            return cls._memory_only
        record = folder / RECORD_FILE
        with cls._default_lock:
            if cls._default is None or cls._default.record != record:
                cls._default = cls(record)
            return cls._default

    def known(self, key: str) -> bool:
        """Whether a file in this state passed its check less than MAX_AGE_DAYS ago (in this process or another)."""
        with self._lock:
            checked_at = self._load().get(key)
            return checked_at is not None and time.time() - checked_at < _MAX_AGE

    def remember(self, key: str) -> None:
        """Record a passed check (in this process always; in the record when it can be written)."""
        with self._lock:
            keys = self._load()
            if key in keys and time.time() - keys[key] < _MAX_AGE:
                return
            keys[key] = time.time()
            if self.record is None:
                return
            try:
                _make_cache_folder(self.record.parent)
                if not _trusted_folder(self.record.parent):
                    return  # a link, or a folder others can write: they could swap the record under us
                # O_NONBLOCK: a FIFO put at the record's path fails at once (ENXIO) instead of waiting for a reader
                fd = os.open(self.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _NONBLOCK
                             | _CLOEXEC, 0o600)
                try:
                    if _trusted(os.fstat(fd)):
                        os.write(fd, f"{key} {int(time.time())}\n".encode("ascii"))
                        self._lines += 1
                finally:
                    os.close(fd)
                if self._lines > MAX_LINES:
                    self._cut()
            except OSError:
                pass  # read-only home, full disk: remembered in this process only

    def _load(self) -> set[str]:
        if self._keys is None:
            self._keys, self._lines = {}, 0
            for line in self._read_lines():
                key, _, checked_at = line.partition(" ")
                # a key has six fields; a line cut short by a crash lacks its time and is ignored
                if key.count(":") == 5 and checked_at.isdigit() and time.time() - int(checked_at) < _MAX_AGE:
                    self._keys[key] = max(self._keys.get(key, 0), int(checked_at))
        return self._keys

    def _read_lines(self) -> list[str]:
        """The record's lines, if it is this user's own and no one else can write it; else none."""
        if self.record is None or not _trusted_folder(self.record.parent):
            return []
        try:
            # Not through a link, and never blocking on a FIFO; what it is is checked on the open descriptor
            fd = os.open(self.record, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
        except OSError:
            return []
        with os.fdopen(fd, "rb") as stream:
            if not _trusted(os.fstat(stream.fileno())):
                return []
            try:
                lines = stream.read().decode("ascii", "replace").splitlines()
            except OSError:
                return []
        self._lines = len(lines)
        return lines

    def _cut(self) -> None:
        """Keep the newest half of the record (written to a private temporary file, renamed over it)."""
        assert self.record is not None
        lines = self._read_lines()[-MAX_LINES // 2:]
        try:
            fd, temporary = tempfile.mkstemp(prefix=f".{RECORD_FILE}.", dir=self.record.parent)  # 0600, O_EXCL
            try:
                with os.fdopen(fd, "w", encoding="ascii") as stream:
                    stream.write("".join(line + "\n" for line in lines))
                os.replace(temporary, self.record)
            except OSError:
                os.unlink(temporary)
                raise
            self._lines = len(lines)
        except OSError:
            pass


_MAX_AGE = MAX_AGE_DAYS * 86_400
CheckedFiles._memory_only = CheckedFiles(None)  # type: ignore[attr-defined]


def _is_inside(folder: Path, index_dir: Path) -> bool:
    real, index_real = os.path.realpath(folder), os.path.realpath(index_dir)
    return real == index_real or real.startswith(index_real.rstrip(os.sep) + os.sep)


def _make_cache_folder(folder: Path) -> None:
    """Create the cache folder (0700) and at most its parent (~/.cache, ~/Library/Caches): never a missing home
    (HOME=/nonexistent must not make root create /nonexistent). OSError when it cannot be made."""
    if folder.is_dir():
        return
    if not folder.parent.is_dir():
        if not folder.parent.parent.is_dir():
            raise FileNotFoundError(f"{folder.parent.parent}: no such folder; nothing remembered")
        folder.parent.mkdir(mode=0o700)
    folder.mkdir(mode=0o700, exist_ok=True)


def _trusted(info: os.stat_result) -> bool:
    """A record this user owns, a regular file, writable by no one else."""
    return stat.S_ISREG(info.st_mode) and _private(info)


def _trusted_folder(folder: Path) -> bool:
    """The record's folder itself (not followed if it is a link): a folder this user owns, writable by no one else."""
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and _private(info)


def _private(info: os.stat_result) -> bool:
    # Windows has no owner or mode bits to check here: its user cache folder (%LOCALAPPDATA%) is private by its ACL
    if not hasattr(os, "geteuid"):
        return True
    return info.st_uid == os.geteuid() and not info.st_mode & 0o022


# Windows lacks these flags (and FIFOs): 0 there leaves the open as it was
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
