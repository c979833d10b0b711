"""Exit codes a cron job can act on (issue 18, point 5 and the smaller items)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest

from bge_index.errors import InvalidOptionError
from bge_index.input.types import SkipReason
from bge_index.run.index_run import parse_max_remove
from bge_index.store.lock import IndexLock
from helpers import module_command, write_jsonl


@pytest.mark.parametrize("value", ["1_0", "１０", "1e2", "٣", "50 %", "-1", "101%", "1.5"])
def test_max_remove_takes_plain_ascii_numbers_only(value):
    with pytest.raises(InvalidOptionError, match="--max-remove"):
        parse_max_remove(value)


def test_max_remove_accepts_the_documented_forms():
    assert parse_max_remove("50%") == ("share", 0.5) and parse_max_remove("0.5") == ("share", 0.5)
    assert parse_max_remove("100") == ("count", 100) and parse_max_remove(" 0 ") == ("count", 0)


@pytest.mark.slow
def test_sigterm_while_waiting_for_the_lock_exits_143(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, [{"id": "a", "text": "moon"}])
    with IndexLock(out):
        process = subprocess.Popen(module_command("index", corpus, "--out", out, "--model", tiny_model, "--wait"),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("waiting for" in line for line in lines):
            assert process.poll() is None, "".join(lines)
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        reader.join(10)
    assert process.returncode == 143, "".join(lines)


def test_a_qrels_file_beside_the_documents_holds_nothing_back(tiny_model, tmp_path):
    from helpers import index, invoke, live_texts

    folder, out = tmp_path / "in", tmp_path / "ix"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"id": "a1", "text": "moon"}, {"id": "a2", "text": "tides"}])
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\ta1\t1\n")
    first = invoke("index", folder, "--out", out, "--model", tiny_model)
    assert first.exit_code == 0 and "not a document file" in first.stderr, first.output
    write_jsonl(folder / "a.jsonl", [{"id": "a1", "text": "moon"}])  # a2 is gone: removed, not held back
    second = invoke("index", folder, "--out", out, "--model", tiny_model, "--max-remove", "100%")
    assert second.exit_code == 0, second.output
    assert set(live_texts(out)) == {"a1"}
    index(folder, out, tiny_model)


def test_a_document_table_that_lost_its_text_column_keeps_its_documents(tmp_path):
    from bge_index.input.documents import iter_documents
    (tmp_path / "d.csv").write_text("id,body\n1,moon\n")
    [skip] = list(iter_documents([str(tmp_path / "d.csv")]))
    assert skip.code is SkipReason.NO_TEXT_COLUMN and skip.hides_documents
