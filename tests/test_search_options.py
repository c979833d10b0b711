"""A search option is declared once (query.SearchRequest's option() fields) and every surface follows:
the `search` and `eval` flags, serve's HTTP parameters, the request's checks, what Milvus refuses."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from enum import Enum

import pytest
import typer.main

from helpers import REPO, invoke
from bge_index.cli import app
from bge_index.cli.eval import EVAL_HELP, NOT_EVAL_FLAGS
from bge_index.errors import InvalidOptionError
from bge_index.search.milvus import MILVUS_OPTIONS, MilvusBackend
from bge_index.search.query import (SEARCH_OPTIONS, QueryResult, ScoreWeights, SearchRequest,
                                    request_from_options)
from bge_index.serve.http_api import RequestError, search_request


def _command(name: str):
    return typer.main.get_command(app).commands[name]


def _other_value(option):
    """A valid value of `option` other than its default."""
    if option.type is bool:
        return not option.default
    if option.type is str:
        return 'lang == "de"'
    if issubclass(option.type, Enum):
        return next(m for m in reversed(list(option.type)) if m != option.default)
    low = option.minimum if option.minimum is not None else 0
    return option.type(low + 2 if option.type is int else low + 0.25)


def _as_text(value) -> str:
    return value.value if isinstance(value, Enum) else str(value).lower() if isinstance(value, bool) else str(value)


def test_the_declaration_is_the_request_s_fields():
    assert [o.name for o in SEARCH_OPTIONS] == ["k", "mode", "dense-weight", "sparse-weight", "colbert-weight",
                                                "fusion", "normalize", "explain", "group-by-doc", "where"]
    declared = {o.field for o in SEARCH_OPTIONS}
    fields = {f.name for f in dataclasses.fields(SearchRequest)} - {"weights", "with_text"}
    fields |= {f"weights.{f.name}" for f in dataclasses.fields(ScoreWeights)}
    assert declared == fields
    default = SearchRequest()
    assert all(o.value_in(default) == o.default for o in SEARCH_OPTIONS)
    assert all(o.help.strip() for o in SEARCH_OPTIONS)


def test_every_declared_option_is_a_search_flag_and_an_eval_flag_unless_left_out():
    search = {p.name: p for p in _command("search").params}
    evaluation = {p.name: p for p in _command("eval").params}
    for option in SEARCH_OPTIONS:
        flag = search[option.parameter]
        assert (tuple(flag.opts), flag.default, flag.help, flag.envvar) == \
               (option.flags, option.default, option.help, option.envvar)
        assert (flag.min, flag.max, flag.type_descriptor.annotation) == (option.minimum, option.maximum, option.type)
        if option.name in NOT_EVAL_FLAGS:
            assert option.parameter not in evaluation
        else:
            flag = evaluation[option.parameter]
            assert (tuple(flag.opts), flag.default, flag.envvar) == (option.flags, option.default, None)
            assert flag.help == EVAL_HELP.get(option.name, option.help)
    assert list(search)[2:2 + len(SEARCH_OPTIONS)] == [o.parameter for o in SEARCH_OPTIONS]  # one block, in order


def test_every_name_of_every_declared_option_is_an_http_parameter():
    for option in SEARCH_OPTIONS:
        for name in option.names:
            value = _other_value(option)
            assert option.value_in(search_request({name: _as_text(value)})) == value
            assert option.value_in(search_request({name: value})) == value  # as typed JSON
    with pytest.raises(RequestError) as unknown:
        search_request({"colour": "red"})
    assert str(unknown.value).endswith("(search options: k, top-k, mode, dense-weight, sparse-weight, colbert-weight, "
                                       "fusion, normalize, explain, group-by-doc, where)")


class _Recorder:
    """A backend that answers nothing and keeps the requests it was asked."""

    def __init__(self, asked: list):
        self.asked, self.notes = asked, []

    def search(self, queries, request):
        self.asked.append(request)
        return [QueryResult(q, []) for q in queries]

    def close(self):
        pass


def test_search_flags_and_http_parameters_make_the_same_request(monkeypatch, tmp_path):
    asked: list[SearchRequest] = []
    monkeypatch.setattr("bge_index.cli.search.open_backend", lambda *args, **kwargs: _Recorder(asked))
    values = {o.name: _other_value(o) for o in SEARCH_OPTIONS}
    args = []
    for option in SEARCH_OPTIONS:
        args += [option.flag] if option.type is bool else [option.flag, _as_text(values[option.name])]
    result = invoke("search", tmp_path, "moon", *args, "--format", "json")
    assert result.exit_code == 0, result.output
    expected = request_from_options(values, with_text=True)
    assert asked == [expected]
    assert search_request({name: _as_text(value) for name, value in values.items()}) == expected
    assert all(o.value_in(expected) != o.default for o in SEARCH_OPTIONS)
    # The defaults: no flag, no parameter, SearchRequest() alike.
    assert invoke("search", tmp_path, "moon", "--format", "json").exit_code == 0
    assert asked[-1] == search_request({}) == SearchRequest()


def test_eval_flags_make_the_request_of_each_mode(monkeypatch, tmp_path):
    asked: list[SearchRequest] = []
    fake = types.ModuleType("bge_index.search.local_index")
    fake.LocalIndex = lambda *args, **kwargs: _Recorder(asked)
    monkeypatch.setitem(sys.modules, "bge_index.search.local_index", fake)
    from bge_index.cli import eval as eval_command
    from bge_index.search.evaluation import DocumentCoverage
    # no index here: the stand-in backend answers; the judged-documents check (it reads an index) stands aside
    monkeypatch.setattr(eval_command, "judged_documents_in_index", lambda *args: DocumentCoverage(1, 1, ()))
    (tmp_path / "q.jsonl").write_text('{"_id": "q1", "text": "moon"}\n')
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    values = {o.name: _other_value(o) for o in SEARCH_OPTIONS if o.name not in NOT_EVAL_FLAGS}
    args = []
    for name, value in values.items():
        option = next(o for o in SEARCH_OPTIONS if o.name == name)
        args += [option.flag] if option.type is bool else [option.flag, _as_text(value)]
    result = invoke("eval", tmp_path, "--queries", tmp_path / "q.jsonl", "--qrels", tmp_path / "qrels.tsv",
                    "--modes", "dense,hybrid", "--depth", 7, *args)
    assert result.exit_code == 0, result.output
    assert asked == [request_from_options(values, k=7, mode=mode, with_text=False) for mode in ("dense", "hybrid")]


def test_milvus_refuses_every_option_it_does_not_follow():
    for option in SEARCH_OPTIONS:
        value = _other_value(option)
        request = request_from_options({option.name: value})
        if option.name in MILVUS_OPTIONS:
            MilvusBackend.check_request(request)
        else:
            with pytest.raises(InvalidOptionError, match=f"does not support {option.as_flag(value)}$"):
                MilvusBackend.check_request(request)


# A made-up change to the declaration, in a fresh interpreter (the surfaces are built at import): k gets a
# maximum and new help, and a new option, boost, appears. Nothing else is told.
MADE_UP = r'''
import json, sys
from dataclasses import dataclass

from bge_index.search import query
from bge_index.search.options import declared_options, option


@dataclass(frozen=True)
class MadeUp(query.SearchRequest):
    k: int = option(10, "k", "top-k", minimum=1, maximum=50, envvar="BGE_INDEX_K", help="Made-up help for k.")
    boost: float = option(2.0, minimum=0.5, maximum=4, help="Made up: a boost.")


query.SearchRequest, query.SEARCH_OPTIONS = MadeUp, declared_options(MadeUp)

import typer.main
from typer.testing import CliRunner

from bge_index.cli import app
from bge_index.cli import search as search_command
from bge_index.errors import InvalidOptionError
from bge_index.search.milvus import MilvusBackend
from bge_index.serve.http_api import RequestError, search_request

asked = []


class Recorder:
    notes = []

    def search(self, queries, request):
        asked.append(request)
        return []

    def close(self):
        pass


search_command.open_backend = lambda *args, **kwargs: Recorder()
commands = typer.main.get_command(app).commands
found = {"search": {p.name: [p.opts, p.default, p.help] for p in commands["search"].params},
         "eval": {p.name: [p.opts, p.default, p.help] for p in commands["eval"].params}}
runner = CliRunner()
ran = runner.invoke(app, ["search", sys.argv[1], "moon", "--boost", "3", "-k", "50"])
found["cli"] = [ran.exit_code, asked[0].boost if asked else None, asked[0].k if asked else None]
found["cli_refused"] = [runner.invoke(app, ["search", sys.argv[1], "moon", "--boost", "9"]).exit_code,
                        runner.invoke(app, ["search", sys.argv[1], "moon", "-k", "51"]).exit_code]
found["http"] = search_request({"boost": "3", "top-k": "50"}).boost
for case in ({"boost": "9"}, {"k": "51"}, {"colour": "red"}):
    try:
        search_request(case)
    except RequestError as error:
        found[f"http {case}"] = str(error)
try:
    MadeUp(boost=0.1)
except InvalidOptionError as error:
    found["request"] = str(error)
try:
    MilvusBackend.check_request(MadeUp(boost=3.0))
except InvalidOptionError as error:
    found["milvus"] = str(error)
MilvusBackend.check_request(MadeUp())  # boost at its default: nothing to refuse
print(json.dumps(found))
'''


@pytest.mark.slow  # a fresh interpreter
def test_a_made_up_declaration_change_reaches_every_surface(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("BGE_INDEX_")}
    done = subprocess.run([sys.executable, "-c", MADE_UP, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    for command in ("search", "eval"):
        assert found[command]["boost"] == [["--boost"], 2.0, "Made up: a boost."]
    assert found["search"]["k"] == [["-k", "--top-k"], 10, "Made-up help for k."]
    assert found["cli"] == [0, 3.0, 50]
    assert found["cli_refused"] == [2, 2]
    assert found["http"] == 3.0
    assert found["http {'boost': '9'}"] == "boost must be from 0.5 to 4 (got 9.0)"
    assert found["http {'k': '51'}"] == "k must be from 1 to 50 (got 51)"
    assert found["http {'colour': 'red'}"].endswith("explain, group-by-doc, where, boost)")
    assert found["request"] == "boost must be from 0.5 to 4 (got 0.1)"
    assert found["milvus"] == "--backend milvus does not support --boost 3.0"
