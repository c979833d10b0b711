"""One writer per index: an advisory lock on INDEX_DIR/.lock.

The lock is a `flock` on an open file, so the kernel releases it the moment
its holder dies, SIGKILL included: a lock left by a dead process is simply
taken over by the next run. The file also records who holds it (pid, host,
start time, command) so that a refused run can say whom it waited for.
flock is local to one machine (it is not reliable on NFS).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from bge_index.errors import IndexLockedError

LOCK_FILE = ".lock"


class IndexLock:
    """Exclusive write lock on an index folder; use as a context manager."""

    def __init__(self, index_dir: Path, wait: bool = False, on_wait: Callable[[str], None] | None = None,
                 poll_seconds: float = 0.5, should_stop: Callable[[], bool] | None = None):
        self.path = index_dir / LOCK_FILE
        self.wait = wait
        self.on_wait = on_wait
        self.poll_seconds = poll_seconds
        self.should_stop = should_stop
        self._fd: int | None = None

    def __enter__(self) -> "IndexLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = describe_holder(self.path)
                if not self.wait:
                    os.close(fd)
                    raise IndexLockedError(f"{self.path.parent} is being written by {holder}; "
                                           "try again later, or pass --wait to wait for it") from None
                if not announced and self.on_wait is not None:
                    self.on_wait(f"waiting for {holder} to finish writing {self.path.parent}")
                    announced = True
                if self.should_stop is not None and self.should_stop():
                    os.close(fd)
                    raise KeyboardInterrupt  # asked to stop before the run even began
                time.sleep(self.poll_seconds)
        # We hold the lock: whatever the file said was written by a process that is gone.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_record()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:300]}


def describe_holder(path: Path) -> str:
    """Who holds the lock, from the lock file's record ("pid P on HOST (started T: COMMAND)"), or "another process"."""
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        record = {}
    if not record:
        return "another process"
    return (f"pid {record.get('pid')} on {record.get('host')} (started {record.get('started')}: "
            f"{record.get('command')})")
