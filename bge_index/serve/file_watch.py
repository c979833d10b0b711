"""The files a served generation maps, held open and leased, so that a change to one is seen before it can do harm.

A generation's shards and search files are memory-mapped (vector_store.py).
A file replaced by a rename (as every run does) or deleted leaves the
mapping intact. A file changed in place is another matter: its new bytes
show through the mapping (a wrong score), and a file cut short makes the
next read past its new end a SIGBUS, which kills the process.

`WatchedFiles.open(index_dir, manifest)` opens every such file read-only and
checks it is a regular file of the manifest's size, then, on Linux, takes a
read lease on it (fcntl F_SETLEASE): a process that opens the file for
writing or truncates it then waits (up to /proc/sys/fs/lease-break-time,
45 s by default) until the lease is given back. `changed()` tells whether
any file's lease was broken or its size or mtime moved (not its ctime,
which a run moves when it retires or removes an old generation's file: no
change to its bytes). The service calls it before each batch and from its
watcher a few times a second, stops serving the generation (holding the
lock its batches hold), then `close()` gives the leases back, so the writer
goes on only once no search can read the file. Where a lease cannot be had (another user's files without
CAP_LEASE, a file system without leases, no fcntl), a change is still seen
between batches (fstat), but one made during a batch is not held off.

The break is announced by a signal; SIGURG (ignored by default) is asked for
instead of SIGIO, whose default would end the process.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

from bge_index.errors import IndexFormatError
from bge_index.store.manifest import Manifest
from bge_index.store.names import SEARCH_DIR

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

log = logging.getLogger("bge_index.serve")

F_SETSIG = 10  # Linux's values (asm-generic/fcntl.h); the fcntl module does not name them all
F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)
LEASE_SIGNAL = getattr(signal, "SIGURG", None)
_leases_refused_logged = False


@dataclass
class _Watched:
    path: Path
    fd: int
    info: os.stat_result
    leased: bool


def index_files(index_dir: Path, manifest: Manifest) -> list[tuple[Path, object]]:
    """(path, size the manifest gives) of every file a generation maps: shards and their search files."""
    files = []
    for shard in manifest.shards:
        files.append((index_dir / shard.file, shard.bytes))
        for record in shard.search or ():
            if isinstance(record, dict) and isinstance(record.get("file"), str):
                files.append((index_dir / SEARCH_DIR / record["file"], record.get("bytes")))
    return files


class WatchedFiles:
    """One generation's mapped files, open and (where possible) leased; see the module docstring."""

    def __init__(self, files: list[_Watched]):
        self._files = files

    @classmethod
    def open(cls, index_dir: Path, manifest: Manifest) -> "WatchedFiles":
        """Open and lease every file `manifest` maps; an IndexFormatError when one is not the manifest's size.

        A search file the manifest names but that does not exist is left out: the reader builds its vectors in
        memory, and nothing maps it.
        """
        opened: list[_Watched] = []
        try:
            for path, size in index_files(index_dir, manifest):
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                except FileNotFoundError:
                    if path.parent.name == SEARCH_DIR:
                        continue
                    raise IndexFormatError(f"{path}: missing (named by generation {manifest.generation})") from None
                except OSError as error:
                    raise IndexFormatError(f"{path}: cannot be opened ({error.strerror})") from None
                info = os.fstat(fd)
                try:
                    leased = _lease(fd, path)
                except BlockingIOError:  # open for writing by someone, or being truncated: not now
                    os.close(fd)
                    raise IndexFormatError(f"{path} is being written to") from None
                opened.append(_Watched(path, fd, info, leased))
                if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                    raise IndexFormatError(f"{path}: {info.st_size} bytes, generation {manifest.generation}'s "
                                           f"manifest says {size}")
        except BaseException:
            cls(opened).close()
            raise
        return cls(opened)

    @property
    def leased(self) -> bool:
        """Whether every file is leased (a change in place then waits for `close`)."""
        return all(f.leased for f in self._files)

    def changed(self) -> str | None:
        """What changed since `open`, as `PATH (how)`: a file opened for writing or truncated, or its size or
        mtime moved; None when nothing did."""
        for watched in self._files:
            if watched.fd < 0:
                return f"{watched.path} (no longer watched)"
            if watched.leased:
                try:
                    held = fcntl.fcntl(watched.fd, F_GETLEASE)
                except OSError:
                    held = fcntl.F_UNLCK
                if held != fcntl.F_RDLCK:  # a writer or a truncation is waiting for the lease
                    return f"{watched.path} (opened for writing or truncated)"
            try:
                now = os.fstat(watched.fd)
            except OSError as error:
                return f"{watched.path} ({error.strerror})"
            before = watched.info
            if now.st_size != before.st_size:
                return f"{watched.path} ({before.st_size:,} -> {now.st_size:,} bytes)"
            # Not the ctime: a run moving or removing an old generation's file moves it, harmlessly.
            if now.st_mtime_ns != before.st_mtime_ns:
                return f"{watched.path} (written in place)"
        return None

    def replaced(self) -> str | None:
        """Which path no longer names the file opened there (replaced or removed since `open`), or None."""
        for watched in self._files:
            try:
                now = os.stat(watched.path, follow_symlinks=False)
            except OSError as error:
                return f"{watched.path}: {error.strerror}"
            if (now.st_dev, now.st_ino) != (watched.info.st_dev, watched.info.st_ino):
                return f"{watched.path} was replaced while the generation was being opened"
        return None

    def close(self) -> None:
        """Give the leases back (a waiting writer goes on) and close the files; idempotent."""
        for watched in self._files:
            if watched.fd >= 0:
                if watched.leased:
                    try:
                        fcntl.fcntl(watched.fd, F_SETLEASE, fcntl.F_UNLCK)
                    except OSError:
                        pass
                os.close(watched.fd)
                watched.fd = -1

    def __len__(self) -> int:
        return len(self._files)


def _lease(fd: int, path: Path) -> bool:
    """Take a read lease on `fd`, its break announced by LEASE_SIGNAL; False where leases are not to be had."""
    global _leases_refused_logged
    if fcntl is None or LEASE_SIGNAL is None or not hasattr(os, "O_CLOEXEC"):
        return False
    try:
        fcntl.fcntl(fd, F_SETSIG, LEASE_SIGNAL)  # first: a break must never raise SIGIO (whose default kills)
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        return True
    except BlockingIOError:
        raise  # EAGAIN: the file is open for writing, or a lease break is under way
    except OSError as error:
        if not _leases_refused_logged:
            _leases_refused_logged = True
            why = "not the files' owner" if error.errno in (errno.EACCES, errno.EPERM) else error.strerror
            log.warning("cannot lease %s (%s): a file changed in place is seen between batches, not held off "
                        "during one", path, why)
        return False
