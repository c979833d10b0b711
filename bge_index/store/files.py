"""Files written safely: atomic replacement, folder fsync, checksums, and the crash-test hook.

Every writer of an index goes through `write_atomically` (temporary file,
fsync, rename, fsync of the folder), so a crash leaves the old file or the
new one, never half of either. The OSErrors these raise (disk full, EIO,
read-only, no permission) are the caller's to turn into a WriteError naming
what it was writing (shard_writer.py does, for everything an index run writes).
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import tempfile
import zlib
from pathlib import Path


def fault_point(name: str) -> None:
    """Crash-test hook: die by SIGKILL here when BGE_INDEX_FAULT_AT names this point (`NAME`, or `NAME:N` for
    its N-th passage in this process).

    The crash-safety tests use it to kill a real run at exact places (mid
    shard, after a shard, after the third checkpoint, before and after the manifest switch).
    """
    wanted = os.environ.get("BGE_INDEX_FAULT_AT")
    if not wanted or wanted.partition(":")[0] != name:
        return
    _FAULT_PASSES[name] = _FAULT_PASSES.get(name, 0) + 1
    count = wanted.partition(":")[2]
    if not count or (count.isdigit() and int(count) == _FAULT_PASSES[name]):
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_PASSES: dict[str, int] = {}


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows (changing it races other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write) -> None:
    """Write through `write(stream)` to a temporary file, fsync it, rename it over `path`.

    The temporary file is mkstemp's (O_CREAT|O_EXCL|O_NOFOLLOW: never through a link) and the rename replaces
    whatever `path` names, a link included, without following it. Permissions follow the umask (0644 under 022),
    not mkstemp's 0600: an index written by a cron job must be readable by the services that search it.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(fd, 0o666 & ~current_umask())
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            Path(tmp).unlink(missing_ok=True)
        except OSError:
            pass  # the failure that got us here is the one to report
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path, strict: bool = False) -> None:
    """fsync a folder so the renames in it survive a crash.

    Best effort by default (skipped where that is not possible). With `strict`, an I/O error or a full disk
    is an OSError naming the folder: the barrier before a manifest switch, which must not publish names that
    may not be on disk. A folder that cannot be opened for reading (no read permission) and a file system
    that cannot fsync folders at all (EINVAL, ENOTSUP, EROFS) pass either way.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        if strict and error.errno == errno.EIO:
            raise OSError(error.errno, error.strerror, str(folder)) from error
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if strict and error.errno not in _NO_FOLDER_FSYNC:
            raise OSError(error.errno, error.strerror, str(folder)) from error
    finally:
        os.close(fd)


_NO_FOLDER_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS, errno.EBADF}


def file_crc32(path: Path) -> int:
    """CRC-32 (zlib) of a file, read 4 MiB at a time: the search files' checksum (about 1 GB/s)."""
    crc = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read 4 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
