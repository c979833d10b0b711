"""Names are printed escaped: a file, folder or document id holding a newline or an escape sequence can neither
forge a line of bge-index's output nor drive the terminal (cli/display.py's `shown`), and ordinary Unicode
names are printed unchanged."""

from __future__ import annotations

import json
import re

import pytest
from helpers import invoke, write_jsonl

from bge_index.cli.display import print_results, shown
from bge_index.cli.options import ResultFormat
from bge_index.search.query import Hit, Query, QueryResult, RankedDocument

FORGED = "x\nbge-index: error: forged"
RED = "\x1b[31mred"
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # any control character but \t and \n


def assert_clean(text: str) -> None:
    """No control character from a name, and no line that a name forged."""
    assert not RAW_CONTROL.search(text), repr(text)
    assert not any(line.startswith(("bge-index: error: forged", "forged")) for line in text.splitlines()), text


def test_shown_escapes_what_acts_on_a_terminal_and_nothing_else():
    assert shown(FORGED) == "x\\nbge-index: error: forged"
    assert shown(RED) == "\\x1b[31mred"
    assert shown("a\rb\tc\x7f\x9b\u2028\u202e\udcff") == "a\\rb\\tc\\x7f\\x9b\\u2028\\u202e\\udcff"
    for ordinary in ("café.txt", "日本語/ドキュメント.md", "emoji 🎉 ✓", "a [b] :smile: c\\d"):
        assert shown(ordinary) == ordinary


@pytest.fixture
def hostile_folder(tmp_path):
    """A folder to index whose files are named to forge output (the input side skips names with control
    characters, so each gets a `PATH: skipped: REASON` line), and one ordinary Unicode name that is indexed."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / f"{FORGED}.txt").write_text("the moon and the tides, a document named to forge a line")
    (folder / f"{RED}.md").write_text("the moon is red tonight, a document named with an escape code")
    (folder / "café ✓.txt").write_text("the moon over a café")
    return folder


def test_index_prints_skipped_files_escaped_and_never_forges_a_line(tiny_model, hostile_folder, tmp_path):
    result = invoke("index", hostile_folder, "--out", tmp_path / "ix", "--model", tiny_model)
    assert result.exit_code == 0, result.output
    assert_clean(result.stderr)
    assert_clean(result.stdout)
    skipped = [line for line in result.stderr.splitlines() if ": skipped: " in line]
    assert len(skipped) == 2 and all(line.count(": skipped: ") == 1 for line in skipped)
    assert any("x\\nbge-index: error: forged.txt: skipped: " in line for line in skipped)
    assert any("\\x1b[31mred.md: skipped: " in line for line in skipped)
    assert not [line for line in result.stderr.splitlines() if line.startswith("bge-index: error:")]
    result = invoke("search", tmp_path / "ix", "moon", "-k", "5")
    assert result.exit_code == 0 and "café ✓.txt" in result.stdout  # ordinary Unicode unchanged


def hostile_results() -> list[QueryResult]:
    hits = [RankedDocument(1, f"{FORGED}.txt", Hit(0, 0.9, 0.8, 0.1), text=f"text with {RED} in it\x07",
                           top_tokens=((RED, 0.5),)),
            RankedDocument(2, f"{RED}.md", Hit(1, 0.5, 0.4, 0.1), text="plain"),
            RankedDocument(3, "csi\x9b2J.txt", Hit(2, 0.2, 0.1, 0.1), text="an 8-bit escape (CSI) in the id"),
            RankedDocument(4, "café ✓.txt", Hit(3, 0.1, 0.1, 0.0), text="the moon over a café")]
    return [QueryResult(Query(f"q{RED}", f"moon{RED}\u202e"), hits)]


@pytest.mark.parametrize("output_format", list(ResultFormat))
def test_search_results_show_ids_and_texts_escaped(output_format, capsys):
    print_results(hostile_results(), output_format, "hybrid", "run")
    printed = capsys.readouterr().out
    assert_clean(printed)
    assert "\x1b" not in printed and "\u202e" not in printed
    if output_format in (ResultFormat.json, ResultFormat.jsonl):  # the same JSON values: ids come back whole
        if output_format is ResultFormat.json:
            ids = [hit["id"] for answer in json.loads(printed) for hit in answer["hits"]]
        else:
            ids = [json.loads(line)["id"] for line in printed.splitlines()]
        assert ids == [f"{FORGED}.txt", f"{RED}.md", "csi\x9b2J.txt", "café ✓.txt"]
    else:
        assert "\\x1b[31mred" in printed
    assert ("café_✓.txt" if output_format is ResultFormat.trec else "café ✓.txt") in printed  # TREC: no spaces


def test_an_error_naming_a_forged_folder_is_one_escaped_line(tiny_model, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    write_jsonl(corpus, [{"id": "a", "text": "the moon"}])
    out = tmp_path / f"{FORGED}\x1b[2J"
    out.mkdir()
    (out / "someone's file").write_text("not an index")
    result = invoke("index", corpus, "--out", out, "--model", tiny_model)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bge-index: error: ") and "x\\nbge-index: error: forged" in lines[0]
    assert_clean(result.stderr)


def test_verify_prints_a_forged_index_folder_escaped(tiny_model, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    write_jsonl(corpus, [{"id": "a", "text": "the moon"}])
    out = tmp_path / f"{FORGED}\x1b[31m"
    assert invoke("index", corpus, "--out", out, "--model", tiny_model).exit_code == 0
    result = invoke("verify", out)
    assert result.exit_code == 0 and "\\x1b[31m: OK" in result.stdout
    assert_clean(result.stdout)
    next((out / "search").iterdir()).unlink()
    result = invoke("verify", out)
    assert result.exit_code == 1
    assert result.stderr.splitlines() and all(line.startswith("bge-index: damaged: ")
                                              for line in result.stderr.splitlines())
    assert_clean(result.stderr)


def test_info_escapes_a_model_path_with_control_characters(tiny_model, tmp_path):
    import shutil

    from helpers import index, invoke
    model = tmp_path / "model\nbge-index: error: forged\x1b[2J"
    shutil.copytree(tiny_model, model)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("moon")
    index(docs, tmp_path / "ix", model)
    result = invoke("info", tmp_path / "ix")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\nbge-index: error: forged" not in result.stdout
    assert "\\x1b" in result.stdout
