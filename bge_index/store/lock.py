"""One writer per index: an advisory lock on INDEX_DIR/.lock.

The lock is a `flock` on an open file, so the kernel releases it the moment
its holder dies, SIGKILL included: a lock left by a dead process is simply
taken over by the next run. The file also records who holds it (pid, host,
start time, command) so that a refused run can say whom it waited for.
flock is local to one machine (it is not reliable on NFS).

The lock file is never followed through a symlink (O_NOFOLLOW): a link
planted at `.lock` is removed (which removes the link, not its target) and a
real file made in its place. A run that leaves no index behind (a failed
first run) removes the lock file, and the folder if it made it, so no folder
holding only `.lock` is left; a process that waited on that lock notices its
file was unlinked (the path no longer names the inode it locked) and retries.
An --out that cannot be created or written is an OutputFolderError.
`run_lock` is what both engines take: the lock, or nothing for a dry run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bge_index.errors import IndexLockedError, OutputFolderError
from bge_index.store.names import LOCK_FILE, MANIFEST_FILE, SEARCH_DIR



def run_lock(index_dir: Path, dry_run: bool, wait: bool = False, on_wait: Callable[[str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> contextlib.AbstractContextManager:
    """The lock an index run holds: IndexLock, or none for a dry run (it writes nothing, so it may run beside
    a writer, and it must not create the folder)."""
    if dry_run:
        return contextlib.nullcontext()
    return IndexLock(index_dir, wait=wait, on_wait=on_wait, should_stop=should_stop)


class IndexLock:
    """Exclusive write lock on an index folder; use as a context manager."""

    def __init__(self, index_dir: Path, wait: bool = False, on_wait: Callable[[str], None] | None = None,
                 poll_seconds: float = 0.5, should_stop: Callable[[], bool] | None = None, label: str = "--out "):
        self.path = index_dir / LOCK_FILE
        self.label = label  # what errors call the folder: `--out INDEX` for an index run, the bare path otherwise
        self.wait = wait
        self.on_wait = on_wait
        self.poll_seconds = poll_seconds
        self.should_stop = should_stop
        self._fd: int | None = None
        self._made_folder = False  # whether __enter__ created the index folder (removed again if left empty)

    def __enter__(self) -> "IndexLock":
        folder = self.path.parent
        announced = False
        while True:
            # Again on each round: a holder that left no index removed the folder it had made.
            if not folder.is_dir():
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as error:
                    raise OutputFolderError(f"{self.label}{folder}: cannot create the folder ({error.strerror})") from None
                self._made_folder = True
            fd = self._open()
            if fd is None:
                continue  # the folder vanished between mkdir and open: make it again
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = describe_holder(self.path)
                if not self.wait:
                    raise IndexLockedError(f"{folder} is being written by {holder}; "
                                           "try again later, or pass --wait to wait for it") from None
                if not announced and self.on_wait is not None:
                    self.on_wait(f"waiting for {holder} to finish writing {folder}")
                    announced = True
                if self.should_stop is not None and self.should_stop():
                    raise KeyboardInterrupt  # asked to stop before the run even began
                time.sleep(self.poll_seconds)
                continue
            # The holder we waited for may have unlinked the lock file (it left no index): a lock on an
            # unlinked inode excludes nobody, so start over on whatever the path names now.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        # We hold the lock: whatever the file said was written by a process that is gone.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder_record()).encode(), 0)
        except OSError as error:
            os.close(fd)
            raise OutputFolderError(f"{self.label}{folder}: cannot write there ({error.strerror})") from None
        self._fd = fd
        return self

    def _open(self) -> int | None:
        """The lock file's descriptor (None if the folder is gone): never through a symlink, only a regular file."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        for _ in range(100):  # each round removes one planted link; more rounds mean someone keeps planting
            try:
                fd = os.open(self.path, flags, 0o666)  # 0o666 & ~umask, like any tool
            except OSError as error:
                if error.errno == errno.ELOOP:  # a symlink: unlinking removes the link, never its target
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    except OSError as unlink_error:
                        raise OutputFolderError(f"{self.label}{self.path.parent}: {LOCK_FILE} is a symbolic link that "
                                                f"cannot be removed ({unlink_error.strerror})") from None
                    continue
                if error.errno == errno.ENOENT:
                    return None
                raise OutputFolderError(f"{self.label}{self.path.parent}: cannot write there ({error.strerror})") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OutputFolderError(f"{self.label}{self.path.parent}: {LOCK_FILE} is not a regular file; remove it")
            return fd
        raise OutputFolderError(f"{self.label}{self.path.parent}: {LOCK_FILE} keeps being replaced by a symbolic link")

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            folder = self.path.parent
            if not (folder / MANIFEST_FILE).exists():
                # No index here (a failed first run): leave no folder holding only `.lock`. Unlinked while we
                # still hold the flock, so a waiter finds the path gone or renewed and retries (see __enter__).
                for leftover in (self.path.unlink, (folder / SEARCH_DIR).rmdir):  # the rmdir only if empty
                    try:
                        leftover()
                    except OSError:
                        pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            if self._made_folder:
                try:
                    folder.rmdir()  # only if empty: a waiter may already have made a new lock file
                except OSError:
                    pass


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` (not followed) still names the file open as `fd`."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:300]}


def describe_holder(path: Path) -> str:
    """Who holds the lock, from the lock file's record ("pid P on HOST (started T: COMMAND)"), or "another process"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # never read through a link
        with os.fdopen(fd, "rb") as stream:
            record = json.loads(stream.read(4096) or b"{}")
        if not isinstance(record, dict):
            record = {}
    except (OSError, ValueError):
        record = {}
    if not record:
        return "another process"
    return (f"pid {record.get('pid')} on {record.get('host')} (started {record.get('started')}: "
            f"{record.get('command')})")
