"""Every failure bge-index anticipates, as one family of exceptions that carry their exit code.

The CLI catches `BgeIndexError` once and prints its message as one line:

    >>> try:
    ...     raise IndexLockedError("index is being written by pid 42")
    ... except BgeIndexError as error:
    ...     (error.exit_code, str(error))
    (75, 'index is being written by pid 42')

Subclasses exist where a caller needs to tell cases apart; the exit code
follows the kind: 1 a failure, 2 a usage error, 75 busy (EX_TEMPFAIL). The
library raises nothing else on purpose: a `ValueError` or `OSError` that
escapes is a bug.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 75


class BgeIndexError(Exception):
    """Base of every anticipated failure; `exit_code` is what the command exits with."""

    exit_code = EXIT_FAILURE


class UsageError(BgeIndexError):
    """Options or arguments that cannot work (together): exit 2."""

    exit_code = EXIT_USAGE


class BusyError(BgeIndexError):
    """Someone else holds what this command needs; trying again later may work: exit 75."""

    exit_code = EXIT_BUSY


# -- usage -------------------------------------------------------------------


class InvalidOptionError(UsageError):
    """Options that cannot work together, or a value out of range."""


class EmptyQueryError(UsageError):
    """A query with no text (an empty or whitespace-only query argument or query-file record)."""


class InputError(UsageError):
    """An input argument that names nothing (no such file, a glob with no match)."""


# -- busy --------------------------------------------------------------------


class IndexLockedError(BusyError):
    """Another live process is writing this index."""


# -- failures ----------------------------------------------------------------


class QueryFileError(BgeIndexError):
    """A query file that cannot be read as a whole (queries are few: one bad line fails them all)."""


class EvaluationInputError(BgeIndexError):
    """Qrels, a run or a metric list that cannot be used; the message says where and why."""


class ModelError(BgeIndexError):
    """The model cannot be found, is incomplete, or cannot run where asked."""


class ModelMismatchError(ModelError):
    """The model found is not the one an index was built with."""


class ModelOptionError(InvalidOptionError, ModelError):
    """A --device, --devices or --dtype value that names nothing usable.

    A usage error (exit 2), and also a ModelError, so code that catches
    ModelError around loading a model catches it too.
    """


class IndexFormatError(BgeIndexError):
    """A folder that is not an index, or an index this version cannot read, or a damaged file."""


class NoColbertVectors(IndexFormatError):
    """ColBERT mode on an index built without --colbert."""


class OutputFolderError(BgeIndexError):
    """--out names a folder that holds something other than an index, or one that cannot be written."""


class IndexMismatchError(BgeIndexError):
    """The index was built with other settings than this run asks for."""


class StrictModeError(BgeIndexError):
    """--strict and a document had to be skipped; nothing was written."""

    def __init__(self, skipped):
        super().__init__(f"{skipped.location}: {skipped.reason} (--strict: nothing written)")
        self.skipped = skipped


class ExtraUnavailableError(BgeIndexError):
    """An optional extra is not installed, or the service it talks to cannot be reached."""


class MilvusError(BgeIndexError):
    """Milvus refused something (data, a collection, a search), or a collection does not fit the index."""


class OutputError(BgeIndexError):
    """A file the command was asked to write (a report, a run) cannot be written."""


class WriteError(BgeIndexError):
    """A file of the index cannot be written (disk full, I/O error, read-only file system, no permission).

    Raised before the manifest switch, so nothing was committed: the index is still its previous generation.
    The message names the file and the operating system's error:

        >>> import errno, os
        >>> str(WriteError.from_os_error("ix/manifest.json", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
        "ix/manifest.json: cannot write it (No space left on device); nothing was committed, the index's previous state is intact"
    """

    @classmethod
    def from_os_error(cls, path, error: OSError) -> "WriteError":
        """The error for `path` failing with `error` (its strerror, or the error itself when it has none)."""
        return cls(f"{path}: cannot write it ({error.strerror or error}); nothing was committed, "
                   "the index's previous state is intact")


class NotInIndexError(BgeIndexError):
    """`get`: some ids asked for are not in the index (exit 1; the others are printed)."""
