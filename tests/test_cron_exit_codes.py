"""Exit codes a cron job can act on (issue 18, point 5 and the smaller items)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest

from bge_index.errors import InvalidOptionError
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
