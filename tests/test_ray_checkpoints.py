"""`--engine ray` killed mid-run (SIGKILL of the driver): the shards committed so far stay, readable, and the
next run (either engine) encodes only the rest.

The Ray engine commits through the same IndexRun checkpoints as the local engine (tests/test_crash_safety.py
has the local engine's version of this test): a partial generation each time a shard's worth of rows is
adopted, so a kill loses at most the shard in progress. Each run here starts a Ray instance of its own, in
a process of its own that the test kills.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from helpers import REPO, live_rows, module_command, run_process

from bge_index.store.manifest import read_manifest
from bge_index.store.names import MANIFEST_FILE, SEARCH_DIR
from bge_index.store.shard_reader import verify_index

pytestmark = pytest.mark.slow  # real processes, each with a Ray instance and a model load

FP32 = ("--dtype", "fp32", "--device", "cpu")
DOCUMENTS = 3000
SHARD_ROWS = 750  # four shards' worth: a checkpoint every ~768 documents (three encoding calls of 256)


def _text(i: int) -> str:
    return f"document {i} about the moon, the tides and train number {i % 17}"


def _state(out) -> dict[str, str]:
    """{id: text} of the index's live rows, after checking its files against the manifest (no id twice)."""
    assert verify_index(out) == []
    ids, texts = live_rows(out)
    assert len(ids) == len(set(ids)), "an id appears twice"
    return dict(zip(ids, texts))


def _killed_run(command: list[str], fault: str) -> subprocess.CompletedProcess:
    """Run `command` with the fault point `fault` armed (BGE_INDEX_FAULT_AT: the driver SIGKILLs itself there).

    The driver runs in a session of its own, so whatever of its local Ray instance outlives it (Ray's
    processes share the driver's fate, but not always at once) is killed with it afterwards.
    """
    env = dict(os.environ, BGE_INDEX_FAULT_AT=fault)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=400)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the session's leftovers (the driver itself is gone or going)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize("fault, resume_engine", [
    ("checkpoint:3", "local"),  # killed right after its third partial commit (~75% of the documents)
    ("shard-written:7", "ray"),  # killed mid-run with a shard renamed into place but not yet committed
])
def test_sigkill_of_a_ray_run_keeps_the_committed_shards_and_the_next_run_goes_on(tiny_model, tmp_path, fault,
                                                                                   resume_engine):
    # One commit at the end lost a whole Ray run to SIGKILL: at 75% the index held nothing. Now completed
    # shards are committed as the run goes (state partial); readers see whole generations only.
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": _text(i)}) + "\n" for i in range(DOCUMENTS)),
                      encoding="utf-8")
    everything = {f"d{i}": _text(i) for i in range(DOCUMENTS)}
    base = ("index", corpus, "--out", out, "--model", tiny_model, *FP32, "--shard-rows", SHARD_ROWS)

    killed = _killed_run(module_command(*base, "--engine", "ray"), fault)
    assert killed.returncode == -signal.SIGKILL, (
        f"the Ray run was not killed at {fault} (exit {killed.returncode}): did it commit before its end?\n"
        + killed.stderr[-3000:])
    assert (out / MANIFEST_FILE).is_file(), "nothing committed before the kill"
    manifest = read_manifest(out)
    assert manifest.state == "partial"
    kept = _state(out)
    assert 0 < len(kept) < DOCUMENTS
    assert all(everything[doc_id] == text for doc_id, text in kept.items())
    # Only whole shards are named: every one within --shard-rows, none of them a staged (temporary) file.
    assert all(shard.file.startswith("shard-") and 0 < shard.rows <= SHARD_ROWS for shard in manifest.shards)

    resume = [*base, "--report", tmp_path / "r.json"] + (["--engine", "ray"] if resume_engine == "ray" else [])
    finished = run_process(module_command(*resume))
    assert finished.returncode == 0, finished.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["encoded"]["rows"] == DOCUMENTS - len(kept)  # the committed documents were not encoded again
    assert report["documents"]["unchanged"] == len(kept)
    assert report["documents"]["added"] == DOCUMENTS - len(kept)
    assert _state(out) == everything and read_manifest(out).state == "complete"
    # What the killed run staged or renamed but never committed is gone: only the manifest's files remain.
    leftovers = {p.name for p in out.iterdir()} - read_manifest(out).files()
    assert leftovers <= {MANIFEST_FILE, ".lock", SEARCH_DIR, "retired"}, leftovers
