"""A model folder cannot make bge-index run its code, allocate without bound or produce non-numbers (issue 18).

Each fault is one line, exit 1, before any weight is loaded where the fault can be seen without loading.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from bge_index.errors import ModelError
from bge_index.model.encoder import load_encoder
from bge_index.model.identity import identify_model
from helpers import invoke


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _index_cli(folder: Path, tmp_path: Path, input_text: str = "") -> object:
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "a.txt").write_text("the moon recedes")
    return invoke("index", docs, "--out", tmp_path / "idx", "--model", folder, stdin=input_text)


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("bge-index: error:"), result.stderr
    return lines[0]


def test_auto_map_code_is_never_run_even_when_answered_yes(model_copy, tmp_path):
    marker = tmp_path / "ran"
    (model_copy / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                       "from transformers import XLMRobertaModel as EvilModel\n")
    _edit_config(model_copy, auto_map={"AutoModel": "evil.EvilModel"})
    result = _index_cli(model_copy, tmp_path, input_text="y\ny\n")
    line = _one_error_line(result)
    assert "auto_map" in line and "config.json" in line
    assert not marker.exists()


def test_auto_map_in_tokenizer_config_is_refused(model_copy):
    path = model_copy / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["auto_map"] = {"AutoTokenizer": ["evil.Tok", None]}
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="tokenizer_config.json.*auto_map"):
        identify_model(str(model_copy))


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "32"), ("hidden_size", 64.7), ("hidden_size", True), ("num_attention_heads", 0),
    ("num_hidden_layers", 10 ** 6), ("vocab_size", -1), ("max_position_embeddings", None),
    ("num_attention_heads", 3),  # 32 is not a multiple of 3
])
def test_config_values_checked_before_anything_is_allocated(model_copy, tmp_path, key, value):
    _edit_config(model_copy, **{key: value})
    with pytest.raises(ModelError, match=key):
        identify_model(str(model_copy))
    assert "config.json" in _one_error_line(_index_cli(model_copy, tmp_path))


def test_config_larger_than_its_weights_is_refused(model_copy):
    _edit_config(model_copy, num_hidden_layers=200, intermediate_size=1 << 17)
    with pytest.raises(ModelError, match="do not match"):
        identify_model(str(model_copy))


def test_huge_config_file_is_refused_unread(model_copy):
    (model_copy / "config.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(ModelError, match="over .* bytes"):
        identify_model(str(model_copy))


def test_zip_bomb_head_is_refused_before_it_is_unpacked(model_copy):
    head = model_copy / "sparse_linear.pt"
    with zipfile.ZipFile(head, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data/bomb", "w", force_zip64=True) as entry:
            block = bytes(1 << 20)
            for _ in range(300):  # 300 MB of zeros, a few hundred KB packed
                entry.write(block)
    assert head.stat().st_size < 5 << 20
    with pytest.raises(ModelError, match="unpacks to"):
        identify_model(str(model_copy))


def test_tokenizer_with_ids_past_the_embedding_table_is_refused(model_copy):
    path = model_copy / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = json.loads((model_copy / "config.json").read_text())["vocab_size"]
    data["added_tokens"].append({"id": vocab + 50, "content": "<evil>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="embedding table"):
        load_encoder(str(model_copy), device="cpu", dtype="fp32")


def test_weights_outside_float32_range_are_refused(model_copy, tmp_path):
    from safetensors.torch import load_file, save_file
    weights = load_file(model_copy / "model.safetensors")
    name = next(k for k in weights if k.endswith("embeddings.word_embeddings.weight"))
    weights[name] = torch.full_like(weights[name], float("inf"))
    save_file(weights, model_copy / "model.safetensors")
    line = _one_error_line(_index_cli(model_copy, tmp_path))
    assert "not finite" in line


def test_non_finite_head_is_refused(model_copy):
    state = torch.load(model_copy / "sparse_linear.pt", weights_only=True)
    state["weight"] = torch.full_like(state["weight"], float("nan"))
    torch.save(state, model_copy / "sparse_linear.pt")
    with pytest.raises(ModelError, match="not finite"):
        load_encoder(str(model_copy), device="cpu", dtype="fp32")


def test_identity_covers_the_special_token_files(model_copy):
    before = identify_model(str(model_copy)).identity
    assert "tokenizer_config.json" in before.files  # special_tokens_map.json too, where the folder has one
    path = model_copy / "special_tokens_map.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["unk_token"] = "<pad>"
    path.write_text(json.dumps(data))
    after = identify_model(str(model_copy)).identity
    assert not after.same_model(before)


def test_an_index_recorded_before_the_wider_identity_still_matches(model_copy):
    from bge_index.model.identity import ModelIdentity, _hash_files, model_identity
    current = identify_model(str(model_copy)).identity
    old_files = {k: v for k, v in current.files.items()
                 if k not in ("tokenizer_config.json", "special_tokens_map.json")}
    recorded = ModelIdentity(current.name, None, _hash_files(model_copy, sorted(old_files)), old_files)
    assert model_identity(model_copy, current.name, None, known=recorded).same_model(recorded)
