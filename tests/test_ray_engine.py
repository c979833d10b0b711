"""`--engine ray` on a local Ray instance: same ids and vectors as the local engine, a valid index, incremental
runs across engines, and a local Ray that listens on loopback only. One Ray instance serves the whole module."""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import (REPO, SAMPLE_CORPUS, SAMPLE_QUERIES, index, invoke, live_texts, load_vectors, module_command, ok,
                     write_jsonl)

from bge_index.extras import ExtraUnavailableError
from bge_index.run.ray import RayOptions, import_ray, plan_reservations, start_local_ray
from bge_index.store.names import MANIFEST_FILE
from bge_index.store.manifest import read_manifest
from bge_index.store.shard_reader import read_rows

CPUS = 2  # the development machine's count: the reservation scheme must not deadlock here
FP32 = ("--dtype", "fp32", "--device", "cpu")  # explicit: "auto" may pick bf16 on some CPUs


def _listening_sockets() -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket on this machine (IPv4 and IPv6), from /proc."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, _, state = line.split()[1:4]
            if state == "0A":  # LISTEN
                address, port = local.split(":")
                found.add((_decode_address(address), int(port, 16)))
    return found


def _decode_address(hex_address: str) -> str:
    """/proc writes addresses as 32-bit words in host (little-endian) order."""
    words = bytes.fromhex(hex_address)
    raw = b"".join(words[i:i + 4][::-1] for i in range(0, len(words), 4))
    address = ipaddress.ip_address(raw)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (each run reuses it instead of starting its own)."""
    before = _listening_sockets()
    try:
        ray = import_ray(local=True)  # first: it sets the loopback-only switch before Ray is imported
    except ExtraUnavailableError:
        pytest.skip("the 'ray' extra is not installed (pip install -e '.[test,ray,milvus]')")
    start_local_ray(ray, num_cpus=CPUS)
    opened = _listening_sockets() - before
    yield ray, opened
    ray.shutdown()


def vectors_by_id(out: Path) -> dict[str, tuple]:
    manifest = read_manifest(out)
    vectors = load_vectors(out, manifest)
    hashes = read_rows(out, manifest, list(zip(vectors.row_shard, vectors.row_local)), "content_hash")
    texts = read_rows(out, manifest, list(zip(vectors.row_shard, vectors.row_local)), "text")
    return {row_id: (vectors.dense[row].astype(np.float32), *vectors.sparse_row(row), hashes[row], texts[row])
            for row, row_id in enumerate(vectors.ids)}


# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(local_ray):
    ray, opened = local_ray
    assert opened, "starting Ray opened no listening socket: the check below would prove nothing"
    assert all(ipaddress.ip_address(address).is_loopback for address, _ in opened), opened
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


@pytest.mark.slow
def test_ray_engine_matches_the_local_engine_and_searches_like_it(local_ray, tiny_model, tmp_path):
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    index(SAMPLE_CORPUS, local_out, tiny_model, *FP32, "--shard-rows", 16)
    # Two actors on 2 CPUs: with 1-CPU actors this would starve the read task and hang.
    result = index(SAMPLE_CORPUS, ray_out, tiny_model, *FP32, "--shard-rows", 16,
                   "--engine", "ray", "--workers", 2, "--report", tmp_path / "ray.json")
    assert "44 added, 0 updated, 0 unchanged, 0 removed" in result.stdout
    report = json.loads((tmp_path / "ray.json").read_text())
    assert report["encoded"]["rows"] == 44 and report["encoded"]["tokens"] > 0

    local, distributed = vectors_by_id(local_out), vectors_by_id(ray_out)
    assert sorted(distributed) == sorted(local) and len(local) == 44
    for doc_id, (dense, tokens, weights, hash_, text) in local.items():
        r_dense, r_tokens, r_weights, r_hash, r_text = distributed[doc_id]
        cosine = float(dense @ r_dense / (np.linalg.norm(dense) * np.linalg.norm(r_dense)))
        assert cosine >= 0.9999, (doc_id, cosine)
        assert r_tokens.tolist() == tokens.tolist(), doc_id  # identical sparse token sets (ascending)
        np.testing.assert_allclose(r_weights, weights, rtol=1e-4, atol=1e-6)
        assert (r_hash, r_text) == (hash_, text)

    # Same file naming, shard size limit, schema and manifest settings as the local engine.
    manifest, local_manifest = read_manifest(ray_out), read_manifest(local_out)
    names = [s.file for s in manifest.shards]
    assert all(re.fullmatch(r"shard-000001-\d{5}\.parquet", n) for n in names) and len(set(names)) == len(names)
    assert len(names) >= 3 and all(s.rows <= 16 for s in manifest.shards)
    assert not [p.name for p in ray_out.iterdir() if p.name.endswith(".tmp")]
    assert not (ray_out / ".staging").exists()  # the actors' staged files: all adopted, the folder removed
    local_schema = pq.ParquetFile(local_out / local_manifest.shards[0].file).schema_arrow
    for name in names:
        schema = pq.ParquetFile(ray_out / name).schema_arrow
        assert schema.equals(local_schema) and schema.metadata == local_schema.metadata
    assert manifest.model == local_manifest.model and manifest.documents == 44

    verified = invoke("verify", ray_out)
    assert verified.exit_code == 0 and "OK (44 rows" in verified.stdout, verified.output
    searches = [invoke("search", out, "--queries", SAMPLE_QUERIES, "--format", "json", *FP32)
                for out in (local_out, ray_out)]
    assert all(s.exit_code == 0 for s in searches), [s.output for s in searches]
    local_hits, ray_hits = (json.loads(s.stdout) for s in searches)
    assert [[h["id"] for h in q["hits"]] for q in ray_hits] == [[h["id"] for h in q["hits"]] for q in local_hits]


@pytest.mark.slow
def test_incremental_runs_work_across_engines(local_ray, tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    records = [{"id": f"d{i}", "text": f"the moon and the train, document number {i}"} for i in range(12)]
    write_jsonl(corpus, records)
    index(corpus, out, tiny_model, *FP32, "--engine", "ray")

    # Built by Ray, re-run locally: nothing to do, nothing written.
    manifest_before = (out / MANIFEST_FILE).read_bytes()
    result = index(corpus, out, tiny_model, *FP32)
    assert "0 added, 0 updated, 12 unchanged, 0 removed" in result.stdout
    assert (out / MANIFEST_FILE).read_bytes() == manifest_before

    # Edited, removed, added and duplicated documents and a bad line, re-run on Ray.
    edited = [dict(r, text=r["text"] + " edited") if r["id"] == "d3" else r for r in records if r["id"] != "d5"]
    write_jsonl(corpus, edited + [{"id": "new", "text": "a brand new moon"},
                                  {"id": "d7", "text": "the later d7 wins"}])
    with corpus.open("a") as stream:
        stream.write("{not json\n")
    result = invoke("index", corpus, "--out", out, "--model", tiny_model, *FP32, "--engine", "ray",
                    "--report", tmp_path / "r.json")
    # The malformed line could have held any id (d5 among them), so this run removes nothing, names the
    # input and exits 1; the good work is committed.
    assert result.exit_code == 1 and "1 input could not be read whole" in result.stderr, result.output
    assert "1 added, 2 updated, 9 unchanged, 0 removed" in result.stdout, result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["documents"]["duplicates"] == 1 and report["documents"]["skipped"] == 1
    assert report["encoded"]["rows"] == 3
    assert invoke("verify", out).exit_code == 0
    live = {row_id: value[4] for row_id, value in vectors_by_id(out).items()}
    assert len(live) == 13 and "d5" in live
    assert live["d3"].endswith(" edited") and live["d7"] == "the later d7 wins" and live["new"] == "a brand new moon"
    assert read_manifest(out).generation == 2

    # The local engine takes over: the bad line is gone, so d5 is seen gone and removed; nothing else changed.
    write_jsonl(corpus, edited + [{"id": "new", "text": "a brand new moon"},
                                  {"id": "d7", "text": "the later d7 wins"}])
    result = index(corpus, out, tiny_model, *FP32)
    assert "0 added, 0 updated, 12 unchanged, 1 removed" in result.stdout
    assert "d5" not in vectors_by_id(out)
    # ...and the Ray engine after a local edit re-encodes just that document.
    write_jsonl(corpus, [dict(r, text="changed again") if r["id"] == "d0" else r
                         for r in edited + [{"id": "new", "text": "a brand new moon"},
                                            {"id": "d7", "text": "the later d7 wins"}]])
    result = index(corpus, out, tiny_model, *FP32, "--engine", "ray")
    assert "0 added, 1 updated, 11 unchanged, 0 removed" in result.stdout
    assert invoke("verify", out).exit_code == 0


@pytest.mark.slow
def test_chunked_index_on_ray_matches_local(local_ray, tiny_model, tmp_path):
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, [{"id": f"long{i}", "text": " ".join(["the moon orbits the earth and trains leave"] * (i + 2))}
                         for i in range(4)])
    options = ("--model", tiny_model, *FP32, "--chunk-tokens", 24, "--chunk-overlap", 4)
    ok("index", corpus, "--out", tmp_path / "local", *options)
    ok("index", corpus, "--out", tmp_path / "ray", *options, "--engine", "ray")
    local, distributed = vectors_by_id(tmp_path / "local"), vectors_by_id(tmp_path / "ray")
    assert sorted(distributed) == sorted(local) and len(local) > 4
    for row_id, (dense, tokens, _, hash_, text) in local.items():
        assert distributed[row_id][1].tolist() == tokens.tolist()
        assert float(dense @ distributed[row_id][0]) / float(dense @ dense) == pytest.approx(1.0, abs=1e-3)
        assert distributed[row_id][3:] == (hash_, text)


# ---------------------------------------------------------------------------
# No Ray needed


@pytest.mark.parametrize("cpus,workers", [(1, 1), (2, 1), (2, 2), (2, 3), (16, 4)])
def test_local_reservations_leave_room_for_reading_and_writing(cpus, workers):
    plan = plan_reservations(RayOptions(workers=workers), float(cpus), local=True)
    assert plan.io_cpus > 0 and workers * plan.actor_cpus + plan.io_cpus <= cpus + 1e-9
    assert plan.threads >= 1 and plan.actor_gpus == 0


def test_gpu_workers_reserve_gpus():
    plan = plan_reservations(RayOptions(address="auto", workers=4, gpus_per_worker=1), 64.0, local=False)
    assert (plan.actor_gpus, plan.actor_cpus, plan.threads) == (1, 1.0, None)


@pytest.mark.parametrize("args,message", [
    (["-", "--engine", "ray"], "needs the local engine"),
    (["IN", "--workers", "2"], "need --engine ray"),
    (["IN", "--ray-address", "auto"], "need --engine ray"),
])
def test_ray_usage_errors_exit_2(tiny_model, tmp_path, args, message):
    args = [str(SAMPLE_QUERIES) if a == "IN" else a for a in args]
    result = invoke("index", *args, "--out", tmp_path / "ix", "--model", tiny_model, stdin='{"id": "a", "text": "b"}\n')
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_killed_ray_runs_staged_files_are_no_foreign_folder_and_are_removed(tiny_model, tmp_path):
    # A Ray run killed before its first commit leaves the lock and its staging folder (half-written files):
    # the next run, of either engine, accepts the folder and removes them.
    out, corpus = tmp_path / "ix", tmp_path / "c.jsonl"
    (out / ".staging").mkdir(parents=True)
    (out / ".staging" / "0123456789ab-cdef01234567-0.parquet.tmp").write_bytes(b"PAR1 half a shard")
    (out / ".lock").touch()
    write_jsonl(corpus, [{"id": "a", "text": "the moon"}])
    index(corpus, out, tiny_model, *FP32)
    assert not (out / ".staging").exists() and set(live_texts(out)) == {"a"}


def test_missing_ray_extra_is_a_clear_failure(tiny_model, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = invoke("index", SAMPLE_QUERIES, "--out", tmp_path / "ix", "--model", tiny_model, "--engine", "ray")
    assert result.exit_code == 1, result.output
    assert "pip install 'bge-index[ray]'" in result.output
    assert not (tmp_path / "ix" / MANIFEST_FILE).exists()


@pytest.mark.slow  # a Ray instance of its own in a subprocess, and a model load
@pytest.mark.parametrize("second_signal", [False, True])
def test_sigterm_stops_a_ray_run_cleanly(tiny_model, tmp_path, second_signal):
    """ray.init replaced the CLI's SIGTERM handler (Python: sys.exit(15); native: a crash handler that dumps a
    stack, exit 15 or 134), losing the run. Now: one SIGTERM stops at a batch boundary, saves, exits 143;
    a second one aborts at once, keeping the previous state (none here), also 143."""
    pytest.importorskip("ray")
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, [{"id": f"d{i}", "text": f"the moon and the train, document number {i} " * 5}
                         for i in range(3000)])
    # With a second signal, shards larger than the corpus: no checkpoint commits before the abort, so the state
    # it keeps is "no index" whatever the timing (the run commits each time --shard-rows rows are adopted).
    command = module_command("index", corpus, "--out", out, "--model", tiny_model, *FP32, "--engine", "ray",
                             "--batch-tokens", "64", "--progress-every", "0.1",
                             "--shard-rows", "5000" if second_signal else "500")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    for line in process.stderr:  # the first batch is written: a stop now has work to save
        if "documents read, " in line and not line.split("documents read, ")[1].startswith("0 encoded"):
            break
    process.send_signal(signal.SIGTERM)
    if second_signal:
        for line in process.stderr:
            if "SIGTERM received" in line:
                break
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert "Fatal Python error" not in stderr and "*** SIGTERM received" not in stderr
    if second_signal:
        assert not (out / MANIFEST_FILE).exists()  # aborted: the previous state (no index) stays
        return
    assert "stopped early" in stdout
    assert read_manifest(out).state == "partial" and 0 < len(live_texts(out)) < 3000
    resumed = index(corpus, out, tiny_model, *FP32)  # the next run finishes the work
    assert len(live_texts(out)) == 3000 and read_manifest(out).state == "complete", resumed.stdout


@pytest.mark.slow
def test_ray_engine_keeps_what_it_did_not_see_gone(local_ray, tiny_model, tmp_path):
    """The rules of run.py on Ray too: --out inside the input folder is not read, --max-remove holds back a
    mass removal (exit 1, additions committed), a bad record with a known id keeps that id's rows."""
    folder = tmp_path / "notes"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"id": f"d{i}", "text": f"the moon and the train {i}"} for i in range(6)])
    out = folder / "index"
    ray = ("--engine", "ray", *FP32)
    assert "6 added" in index(folder, out, tiny_model, *ray).stdout
    again = index(folder, out, tiny_model, *ray)
    assert "0 added, 0 updated, 6 unchanged, 0 removed" in again.stdout  # the index folder was not read
    # d1 is now a bad record (empty text) with its id known; d2..d5 are gone (4 of 6: more than half); one is new.
    write_jsonl(folder / "a.jsonl", [{"id": "d0", "text": "the moon and the train 0"}, {"id": "d1", "text": ""},
                                     {"id": "new", "text": "a new moon"}])
    guarded = invoke("index", folder, "--out", out, "--model", tiny_model, *ray)
    assert guarded.exit_code == 1 and "--max-remove" in guarded.stderr, guarded.output
    assert "1 added" in guarded.stdout and "0 removed" in guarded.stdout
    assert set(live_texts(out)) == {f"d{i}" for i in range(6)} | {"new"}
    allowed = index(folder, out, tiny_model, *ray, "--max-remove", "100%")
    assert "4 removed" in allowed.stdout and set(live_texts(out)) == {"d0", "d1", "new"}  # d1 kept
