"""`bge-index verify --repair` (store/repair.py): missing or damaged search files are rebuilt from their shards and
named by a new manifest, under the writer's lock; shards are never rewritten, a damaged one fails the repair."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
from helpers import invoke

import bge_index.store.vector_store as vector_store
from bge_index.store.lock import IndexLock
from bge_index.store.manifest import read_manifest
from bge_index.store.names import SEARCH_DIR
from bge_index.store.shard_reader import repair_advice, verify_index


def answers(out, *queries):
    """Every query's hits as (id, score) pairs, as `search --format json` gives them."""
    hits = []
    for query in queries or ("moon", "bread recipe", "train station"):
        result = invoke("search", out, query, "--format", "json", "-k", "10")
        assert result.exit_code == 0, result.output
        hits.append([(h["id"], h["score"]) for h in json.loads(result.stdout)[0]["hits"]])
    return hits


def search_file(out, kind="posting-weights", shard=1):
    record = next(r for r in read_manifest(out).shards[shard].search if r["kind"] == kind)
    return out / SEARCH_DIR / record["file"]


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x5A
    path.write_bytes(bytes(data))


DAMAGE = {
    "flip a byte": lambda out: flip_byte(search_file(out)),
    "truncate": lambda out: os.truncate(search_file(out, "dense"), search_file(out, "dense").stat().st_size // 2),
    "delete one": lambda out: search_file(out, "token-ids", shard=0).unlink(),
    "delete search/": lambda out: shutil.rmtree(out / SEARCH_DIR),
}


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in out.glob("shard-*")}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_repair_rebuilds_damaged_search_files_and_search_answers_as_before(ix, damage):
    expected, before = answers(ix), read_manifest(ix)
    shards = shard_bytes(ix)
    DAMAGE[damage](ix)
    result = invoke("verify", ix)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"bge-index verify --repair {ix}" in result.stderr

    result = invoke("verify", "--repair", ix)
    assert result.exit_code == 0, result.output
    assert "bge-index: repaired:" in result.stderr and f"{ix}: OK" in result.stdout

    assert invoke("verify", ix).exit_code == 0 and verify_index(ix) == []
    after = read_manifest(ix)
    assert after.generation == before.generation + 1  # readers of the old generation retry on the new one
    assert [s.search for s in after.shards] == [s.search for s in before.shards]  # the same bytes rebuilt
    assert shard_bytes(ix) == shards  # shards are never rewritten
    assert answers(ix) == expected


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_search_on_a_damaged_search_file_gives_the_repair_command(ix, damage):
    DAMAGE[damage](ix)
    result = invoke("search", ix, "moon")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "bge-index verify --repair" in result.stderr
    assert "delete" not in result.stderr and "bge-index index" not in result.stderr


def test_the_advice_is_the_command_for_this_index(tmp_path):
    assert repair_advice(tmp_path / "my index") == (f"run `bge-index verify --repair '{tmp_path}/my index'` to "
                                                   "rebuild it from its shard")


def test_repair_of_a_sound_index_writes_nothing(ix):
    before = read_manifest(ix)
    manifest_bytes = (ix / "manifest.json").read_bytes()
    result = invoke("verify", "--repair", ix)
    assert result.exit_code == 0 and f"{ix}: OK" in result.stdout and "repaired" not in result.stderr
    assert read_manifest(ix).generation == before.generation
    assert (ix / "manifest.json").read_bytes() == manifest_bytes


def test_a_damaged_shard_is_not_repairable_and_is_never_rewritten(ix):
    shards = read_manifest(ix).shards
    damaged = ix / shards[0].file
    flip_byte(damaged)
    flip_byte(search_file(ix, shard=1))  # a search file of a sound shard: still repaired
    shard_data = shard_bytes(ix)
    result = invoke("verify", "--repair", ix)
    assert result.exit_code == 1 and "Traceback" not in result.output
    damaged_lines = [line for line in result.stderr.splitlines() if line.startswith("bge-index: damaged:")]
    assert len(damaged_lines) == 1 and damaged.name in damaged_lines[0] and "not repairable" in damaged_lines[0]
    assert shards[1].file in result.stderr and "repaired" in result.stderr
    assert shard_bytes(ix) == shard_data
    problems = verify_index(ix)  # the shard's damage, and nothing else
    assert len(problems) == 1 and damaged.name in problems[0]


def test_repair_while_a_run_writes_the_index_is_busy(ix):
    flip_byte(search_file(ix))
    with IndexLock(ix):
        result = invoke("verify", "--repair", ix)
    assert result.exit_code == 75
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bge-index: error:") and "is being written by" in lines[0]
    assert verify_index(ix) != []  # nothing written
    assert invoke("verify", "--repair", ix).exit_code == 0  # once the writer is gone


def test_wait_is_for_repair(ix):
    result = invoke("verify", "--wait", ix)
    assert result.exit_code == 2 and "--repair" in result.stderr


def test_repair_of_a_folder_that_is_not_an_index_creates_nothing(tmp_path):
    result = invoke("verify", "--repair", tmp_path / "nothing")
    assert result.exit_code == 1 and "no such index folder" in result.stderr
    assert not (tmp_path / "nothing").exists()


def test_a_repair_that_cannot_write_commits_nothing(ix, monkeypatch):
    flip_byte(search_file(ix))
    before = (ix / "manifest.json").read_bytes()
    real_header = vector_store._npy_header

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(vector_store, "_npy_header", full)
    result = invoke("verify", "--repair", ix)
    monkeypatch.setattr(vector_store, "_npy_header", real_header)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bge-index: error:") and "No space left on device" in lines[0]
    assert (ix / "manifest.json").read_bytes() == before
    assert invoke("verify", "--repair", ix).exit_code == 0 and verify_index(ix) == []


def test_repair_adds_the_pruning_files_to_an_older_index(ix):
    from bge_index.store.names import BASE_SEARCH_KINDS, PRUNE_SEARCH_KINDS
    # An index written before the pruning files existed: its manifest names the base kinds only.
    manifest = read_manifest(ix)
    for shard in manifest.shards:
        for record in [r for r in shard.search if r["kind"] in PRUNE_SEARCH_KINDS]:
            (ix / SEARCH_DIR / record["file"]).unlink()
        shard.search[:] = [r for r in shard.search if r["kind"] in BASE_SEARCH_KINDS]
    from bge_index.store.shard_writer import publish_manifest
    publish_manifest(ix, manifest)
    assert invoke("verify", ix).exit_code == 0  # an older index is sound
    before = answers(ix)
    result = invoke("verify", ix, "--repair")
    assert result.exit_code == 0, result.output
    kinds = {r["kind"] for s in read_manifest(ix).shards for r in s.search}
    assert set(PRUNE_SEARCH_KINDS) <= kinds and answers(ix) == before
