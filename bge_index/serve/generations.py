"""Which generation of one index the server answers from: the newest committed one, prepared off the search worker.

A `Generations` keeps the generation served and a watcher thread that looks
at the index a few times a second (and whenever a request needs it):

- **Identity, not just a number.** What was served is known by the
  manifest's content, not its generation number: an index deleted and
  rebuilt at the same path (generation 1 again) is another index. The
  manifest file's (device, inode, mtime, size) only says when to look again.
  The key is not trusted until the watcher has read the manifest it names,
  so a commit made between the first open and the start of serving (while
  the model loads) is seen, not missed.
- **Prepared off the worker.** A new generation is opened, its files leased
  (file_watch.py) and its longest texts measured (answer_size.py) on the
  watcher thread while the old one keeps answering; then it is published,
  and the old one is closed once no request still pinned to it runs.
- **Never stale.** Each request notes the manifest key it saw on arrival.
  One that saw the served generation's key is answered at once; one that
  arrived after a commit waits until the watcher has looked at the index
  after its arrival (and opened what it found, or failed to); only then is
  it answered from whatever is served, which is therefore never older than
  the newest generation that could be opened when it arrived.
- **Failures retried.** A generation that cannot be opened is logged (a line
  per distinct failure), and tried again with backoff (0.25 s doubling to
  10 s) while the old one answers.
- **Files changed under it.** Before each batch and at every look, the served
  generation's files are checked (leases, size, mtime). A change
  makes the server stop serving that generation (one error line), under the
  lock its batches hold, and only then gives its leases back; requests get
  503 until a generation opens again, which is retried as above.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bge_index.errors import BgeIndexError, IndexFormatError
from bge_index.search.local_index import LocalIndex
from bge_index.serve.answer_size import TextSizes
from bge_index.serve.file_watch import WatchedFiles
from bge_index.store.manifest import Manifest, read_manifest
from bge_index.store.names import MANIFEST_FILE
from bge_index.store.vector_store import OpenIndex

log = logging.getLogger("bge_index.serve")

ManifestKey = tuple[int, int, int, int]
POLL_SECONDS = 0.2  # how often the watcher looks at the manifest and the served files
FIRST_RETRY, LAST_RETRY = 0.25, 10.0  # backoff between tries at a generation that could not be opened


class Unavailable(BgeIndexError):
    """No generation can be served now (the served one's files changed, and none opens): a 503."""


def manifest_key(index_dir: Path) -> ManifestKey | None:
    """What changes when a run commits (the manifest is replaced by a rename), or None when there is none."""
    try:
        info = os.stat(index_dir / MANIFEST_FILE)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def same_index(a: Manifest, b: Manifest) -> bool:
    """Whether two manifests describe the same generation of the same index (every field, shards included)."""
    return a.to_json() == b.to_json()


class Generation:
    """One opened generation: its LocalIndex, the manifest key it was read under, its watched files, its text
    sizes. `lock` is held while it is searched; `broken` says why it may no longer be (its files changed)."""

    def __init__(self, index: LocalIndex, key: ManifestKey | None, files: WatchedFiles | None, sizes: TextSizes):
        self.index = index
        self.manifest: Manifest = index.manifest
        self.key = key
        self.files = files
        self.sizes = sizes
        self.lock = threading.Lock()
        self.broken: str | None = None
        self.users = 0  # requests pinned to it (their answers must all come from one generation)
        self.published = time.monotonic()

    @property
    def number(self) -> int:
        """The generation number."""
        return self.manifest.generation

    def check(self) -> str | None:
        """Why this generation may not be searched now (broken, or a file changed: then broken), else None.
        Call with `lock` held."""
        if self.broken is None and self.files is not None:
            changed = self.files.changed()
            if changed:
                self.stop(f"{changed} changed under the server")
        return self.broken

    def stop(self, reason: str) -> None:
        """Stop serving this generation for `reason` (logged once); its files are let go. Call with `lock` held."""
        if self.broken is not None:
            return
        self.broken = reason
        log.error("%s; no longer serving generation %d", reason, self.number)
        self._let_go()

    def retire(self) -> None:
        """Close a generation no request uses any more (its memory maps go with the last reference)."""
        with self.lock:
            self._let_go()

    def _let_go(self) -> None:
        if self.files is not None:
            self.files.close()  # leases given back: a writer held off by them goes on now
        close = getattr(self.index, "close", None)
        if close is not None:
            # Its memory maps go now, even while a caller keeps the LocalIndex; and a generation whose file
            # changed is never read again (a read past a file's new end is a SIGBUS).
            close()


def open_generation(index_dir: Path, manifest: Manifest, key: ManifestKey | None, encoder,
                    pack_request: int | None | bool = False) -> Generation:
    """Open `manifest`'s generation with `encoder`: its files leased first, then mapped and checked
    (OpenIndex.open), then measured; its int8 codes packed as the first generation's were asked to
    be (`pack_request`: Searcher.pack_request, False: not asked). A BgeIndexError when it cannot be served."""
    files = WatchedFiles.open(index_dir, manifest)
    try:
        opened = OpenIndex.open(index_dir, manifest)
        if opened.manifest.generation != manifest.generation:
            raise IndexFormatError(f"{index_dir}: generation {manifest.generation} was replaced while it was opened")
        moved = files.replaced() or files.changed()
        if moved:
            raise IndexFormatError(f"{moved} while generation {manifest.generation} was being opened")
        index = LocalIndex(index_dir, encoder=encoder, opened=opened)
        if pack_request is not False:
            index.searcher.pack_codes(pack_request)
        return Generation(index, key, files, TextSizes.of(index_dir, manifest))
    except BaseException:
        files.close()
        raise


def adopt(index: LocalIndex) -> Generation:
    """The generation of an index opened elsewhere (the command's own LocalIndex), its files leased now; its
    manifest key stays unknown until the watcher has read the manifest again."""
    sizes = TextSizes.of(index.index_dir, index.manifest)
    try:
        files = WatchedFiles.open(index.index_dir, index.manifest)
    except BgeIndexError as failure:
        generation = Generation(index, None, None, sizes)
        with generation.lock:
            generation.stop(f"{failure}: the index's files changed under the server")
        return generation
    return Generation(index, None, files, sizes)


class Generations:
    """The generation served, kept newest by a watcher thread (see the module docstring)."""

    def __init__(self, index: LocalIndex, on_change: Callable[[], None] | None = None,
                 poll: float = POLL_SECONDS):
        self.index_dir = Path(index.index_dir)
        self._encoder = getattr(index, "encoder", None)
        # Later generations' codes packed as the first one's were asked to be (with the same budget).
        self._pack_request = getattr(getattr(index, "searcher", None), "pack_request", False)
        self._on_change = on_change or (lambda: None)
        self._poll = poll
        self._cond = threading.Condition()
        self.served = adopt(index)
        self._retired: list[Generation] = []  # replaced, still pinned by a request in progress
        self._resolved_at = float("-inf")  # when the newest finished look at the index began
        self._failures: dict[ManifestKey | None, tuple[str, float, float]] = {}  # key -> message, retry at, delay
        self.last_failure: str | None = None
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._watch, name="bge-index-generations", daemon=True)
        self._thread.start()

    # -- what the search worker asks -----------------------------------------------------------------

    def generation_for(self, seen_key: ManifestKey | None, arrived: float) -> Generation | None:
        """The generation to answer a request from (pinned: call `unpin` when it is answered), None while it
        must wait for the watcher's look; Unavailable when none can be served.

        `seen_key` is the manifest key when it arrived, `arrived` its time.monotonic()."""
        with self._cond:
            served = self.served
            if served.broken is not None:
                if arrived > self._resolved_at:
                    self._wake.set()
                    return None  # a look after it arrived may open a good generation: wait for it
                reopening = f" ({self.last_failure})" if self.last_failure else ""
                raise Unavailable(f"{served.broken}; the index cannot be served now{reopening}; try again")
            if (seen_key is None or seen_key == served.key or arrived <= self._resolved_at
                    or served.published >= arrived):
                served.users += 1
                return served
            self._wake.set()
            return None

    def unpin(self, generation: Generation) -> None:
        """A request pinned to `generation` is done with it."""
        with self._cond:
            generation.users -= 1
            done = generation is not self.served and generation.users == 0
            if done and generation in self._retired:
                self._retired.remove(generation)
        if done:
            generation.retire()

    def wake(self) -> None:
        """Look at the index now rather than at the next poll."""
        self._wake.set()

    def close(self) -> None:
        """Stop the watcher and let every generation's files go."""
        self._stopped = True
        self._wake.set()
        self._thread.join(10)
        with self._cond:
            generations = [self.served, *self._retired]
        for generation in generations:
            if generation.files is not None:
                generation.files.close()

    # -- the watcher ---------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopped:
            started = time.monotonic()
            try:
                self._check_files()
                self._look()
            except Exception:  # noqa: BLE001 - the watcher must go on; a bug here is logged, not fatal
                log.exception("internal error while looking at the index")
            with self._cond:
                self._resolved_at = started
            self._on_change()
            self._wake.wait(self._poll)
            self._wake.clear()

    def _check_files(self) -> None:
        with self._cond:
            generations = [self.served, *self._retired]
        for generation in generations:
            if generation.broken is None and generation.files is not None and generation.files.changed():
                with generation.lock:  # wait for the batch searching it: the writer waits on the lease meanwhile
                    generation.check()

    def _look(self) -> None:
        key = manifest_key(self.index_dir)
        served = self.served
        if key is None or (key == served.key and served.broken is None):
            return
        failed = self._failures.get(key)
        if failed is not None and time.monotonic() < failed[1]:
            return  # backing off
        try:
            manifest = read_manifest(self.index_dir)
            if served.broken is None and same_index(manifest, served.manifest):
                served.key = key  # the key now known to name what is served
                return
            generation = open_generation(self.index_dir, manifest, key, self._encoder, self._pack_request)
        except BgeIndexError as failure:
            self._failed(key, str(failure))
            return
        self._publish(generation)

    def _failed(self, key: ManifestKey | None, message: str) -> None:
        previous = self._failures.get(key)
        delay = FIRST_RETRY if previous is None else min(previous[2] * 2, LAST_RETRY)
        self._failures[key] = (message, time.monotonic() + delay, delay)
        self.last_failure = message
        if previous is None or previous[0] != message:
            served = self.served
            still = (f"still serving generation {served.number}" if served.broken is None
                     else "no generation is served")
            log.error("cannot open the index's current generation (%s); %s; trying again with backoff",
                      message, still)

    def _publish(self, generation: Generation) -> None:
        with self._cond:
            old = self.served
            self.served = generation
            self._failures.clear()
            self.last_failure = None
            retire_now = old.users == 0
            if not retire_now:
                self._retired.append(old)
        if retire_now:
            old.retire()
        manifest = generation.manifest
        log.info("serving generation %d (%s rows)", manifest.generation, f"{manifest.documents:,}")
