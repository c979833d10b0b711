"""Real processes end cleanly: usage errors are one line (exit 2), and no run aborts at exit (issue 18)."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import index, module_command, run_process


@pytest.mark.parametrize("args, fragment", [
    (["index", "docs", "--out", "x", "--dtype", "fp64"], "'fp64' is not one of"),
    (["serch", "idx", "q"], "No such command 'serch'"),
    (["search", "idx", "q", "--mode", "lexical"], "--mode"),
    (["index", "--bogus"], "No such option: --bogus"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, args, fragment):
    result = run_process(module_command(*args))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("bge-index: error:") and fragment in lines[0], result.stderr
    assert "Value error" not in lines[0] and "Traceback" not in result.stderr


@pytest.mark.slow
def test_no_command_aborts_at_exit_under_load(tmp_path, tiny_model):
    # `verify` printed OK and then died of SIGABRT ("terminate called without an active exception") in
    # 1-5 of 100 runs: a native thread still running while the interpreter tore down. 200 runs, 4 at once.
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the moon recedes 3.8 cm a year")
    out = tmp_path / "idx"
    index(corpus, out, tiny_model)
    commands = [["verify", out], ["info", out], ["index", corpus, "--out", out, "--model", tiny_model, "--dry-run"],
                ["--version"]]

    def run(i: int) -> tuple[int, str]:
        done = subprocess.run(module_command(*commands[i % len(commands)]), capture_output=True, text=True,
                              timeout=120)
        return done.returncode, done.stderr[-300:]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(200)))
    bad = [r for r in results if r[0] != 0]
    assert bad == [], f"{len(bad)} of 200 runs failed: {bad[:3]}"
