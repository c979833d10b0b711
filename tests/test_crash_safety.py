"""Real processes killed mid-run: SIGKILL at exact points and at random times, SIGINT/SIGTERM at a batch boundary.

After any kill the index is the previous complete state or the new one,
never a mix; the next run completes the work; no row is lost and no id
appears twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from helpers import REPO, live_rows, module_command, run_process

from bge_index.store.names import SEARCH_DIR, is_index
from bge_index.store.manifest import read_manifest
from bge_index.store.shard_reader import verify_index

pytestmark = pytest.mark.slow  # every test starts several real indexing processes


def write_corpus(path, n, edit=(), drop=(), extra=0):
    with path.open("w", encoding="utf-8") as out:
        for i in range(n + extra):
            if i in drop:
                continue
            text = f"document {i} about the moon, the tides and train number {i % 17}" + (" (edited)" if i in edit else "")
            out.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")


def expected_state(n, edit=(), drop=(), extra=0):
    return {f"d{i}": f"document {i} about the moon, the tides and train number {i % 17}" + (" (edited)" if i in edit else "")
            for i in range(n + extra) if i not in drop}


def index_command(corpus, out, model, *extra):
    return module_command("index", corpus, "--out", out, "--model", model, "--shard-rows", "10", *extra)


def run(command, fault=None, **kwargs):
    env = dict(os.environ)
    env.pop("BGE_INDEX_FAULT_AT", None)
    if fault:
        env["BGE_INDEX_FAULT_AT"] = fault
    return run_process(command, env=env, **kwargs)


def state(out):
    """{id: text} of the index's live rows, after checking the files against the manifest."""
    if not is_index(out):
        return None
    assert verify_index(out) == []
    ids, texts = live_rows(out)
    assert len(ids) == len(set(ids)), "an id appears twice"
    return dict(zip(ids, texts))


POINTS = ["row-group-written", "shard-written", "before-manifest", "after-manifest"]


@pytest.mark.parametrize("point", ["shard-written", "before-manifest"])
def test_sigkill_during_a_first_build(tiny_model, tmp_path, point):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_corpus(corpus, 35)
    killed = run(index_command(corpus, out, tiny_model), fault=point)
    assert killed.returncode == -signal.SIGKILL
    assert state(out) is None  # nothing published yet: no index, not half of one
    finished = run(index_command(corpus, out, tiny_model))
    assert finished.returncode == 0, finished.stderr
    assert state(out) == expected_state(35)
    manifest = read_manifest(out)
    kept = manifest.files()  # shards, deletion sets and the deletes file
    # retired/ holds the previous generation's dropped files for one generation (readers that opened it)
    leftovers = {p.name for p in out.iterdir()} - kept - {"manifest.json", ".lock", SEARCH_DIR, "retired"}
    assert leftovers == set()
    # Search files (format 2) live in search/, exactly those the manifest names.
    named = {record["file"] for s in manifest.shards for record in s.search or []}
    assert {p.name for p in (out / SEARCH_DIR).iterdir()} == named


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_during_an_update(tiny_model, tmp_path, point):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_corpus(corpus, 35)
    assert run(index_command(corpus, out, tiny_model)).returncode == 0
    old = expected_state(35)
    assert state(out) == old
    change = dict(edit={3, 14, 30}, drop={5, 6}, extra=4)
    write_corpus(corpus, 35, **change)
    killed = run(index_command(corpus, out, tiny_model), fault=point)
    assert killed.returncode == -signal.SIGKILL
    new = expected_state(35, **change)
    assert state(out) in (old, new)
    if point == "after-manifest":
        assert state(out) == new
    finished = run(index_command(corpus, out, tiny_model))
    assert finished.returncode == 0, finished.stderr
    assert state(out) == new


def run_and_kill(command, delay):
    """Start `command`, SIGKILL it `delay` seconds later; True if the kill ended it, False if it had finished."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    time.sleep(delay)
    process.kill()  # a no-op on a process that has already exited
    process.wait()
    if process.returncode == -signal.SIGKILL:
        return True
    assert process.returncode == 0, f"the run failed by itself (exit code {process.returncode})"
    return False


def test_sigkill_at_random_moments(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_corpus(corpus, 3000)
    command = index_command(corpus, out, tiny_model, "--batch-tokens", "48")
    command[command.index("--shard-rows") + 1] = "250"
    for delay in (2.5, 4.0, 5.5):
        # Each kill must land mid-run: a run that finished first tested nothing. On a machine fast enough
        # for that, the index is removed and the moment tried again, earlier (a run takes seconds to start).
        while not run_and_kill(command, delay):
            assert delay > 0.2, "the run keeps finishing before it can be killed"
            shutil.rmtree(out)
            delay /= 2
        current = state(out)
        assert current is None or current == expected_state(3000)
    finished = run(command)
    assert finished.returncode == 0, finished.stderr
    assert state(out) == expected_state(3000)


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_progress_and_the_next_run_resumes(tiny_model, tmp_path, signal_number, exit_code):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_corpus(corpus, 6000)
    command = index_command(corpus, out, tiny_model, "--batch-tokens", "48", "--progress-every", "0.1")
    command[command.index("--shard-rows") + 1] = "1000"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    for line in process.stderr:
        if "encoded" in line and not line.split("documents read, ")[1].startswith("0 encoded"):
            break
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == exit_code, stderr
    assert "stopped early" in stdout
    saved = state(out)
    assert saved is not None and 0 < len(saved) < 6000
    everything = expected_state(6000)
    assert all(everything[d] == t for d, t in saved.items())
    assert read_manifest(out).state == "partial"
    resumed_command = index_command(corpus, out, tiny_model, "--batch-tokens", "4096")
    resumed_command[resumed_command.index("--shard-rows") + 1] = "1000"
    resumed = run(resumed_command)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{6000 - len(saved):,} added, 0 updated, {len(saved):,} unchanged, 0 removed" in resumed.stdout
    assert state(out) == everything
    assert read_manifest(out).state == "complete"


@pytest.mark.slow
def test_sigkill_keeps_the_committed_shards_and_the_next_run_goes_on(tiny_model, tmp_path):
    # Issue 18: one commit at the end lost a whole run to SIGKILL. Shards are committed as they complete
    # (state partial), so a kill after the first window lands keeps its 2,048 documents, readers see whole
    # documents only, and the next run encodes just the rest.
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_corpus(corpus, 3000)
    command = module_command("index", corpus, "--out", out, "--model", tiny_model, "--shard-rows", "500",
                             "--report", tmp_path / "r.json")
    killed = run(command, fault="checkpoint:1")
    assert killed.returncode == -signal.SIGKILL
    manifest = read_manifest(out)
    assert manifest.state == "partial"
    kept = state(out)  # verifies, and no id twice
    assert len(kept) == 2048 and all(expected_state(3000)[i] == text for i, text in kept.items())
    finished = run(command)
    assert finished.returncode == 0, finished.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["encoded"]["rows"] == 3000 - 2048  # the committed documents were not encoded again
    assert report["documents"]["unchanged"] == 2048
    assert state(out) == expected_state(3000) and read_manifest(out).state == "complete"
