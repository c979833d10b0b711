"""The tokenizer is read straight from tokenizer.json (no AutoTokenizer on the way) and gives AutoTokenizer's ids."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from bge_index.model.encoder import load_encoder
from bge_index.errors import ModelError
from bge_index.model.tokenizer import load_tokenizer

TEXTS = [
    "The Moon moves 3.8 cm away from Earth every year.",
    "a  b   c\t\td\n\ne",  # runs of whitespace of every kind
    "   leading and trailing   ",
    "Der längste Eisenbahntunnel der Welt ist der Gotthard-Basistunnel.",
    "El pulpo tiene tres corazones y sangre azul. " * 3,
    "ｆｕｌｌ　width ﬁ ① ⚓",
    "x",
    "",
]


def test_ids_and_special_tokens_equal_autotokenizer(tiny_model):
    ours = load_tokenizer(tiny_model)
    reference = AutoTokenizer.from_pretrained(tiny_model)
    assert ours.encode_batch(TEXTS) == [reference(t)["input_ids"] for t in TEXTS]
    assert (ours.cls_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (
        reference.cls_token_id, reference.eos_token_id, reference.pad_token_id, reference.unk_token_id)
    token_id = ours.encode_batch(["garden"])[0][1]
    assert ours.id_to_token(token_id) == reference.convert_ids_to_tokens(token_id)


def test_loading_the_encoder_never_builds_an_autotokenizer(tiny_model, monkeypatch):
    # AutoTokenizer rebuilds XLM-R's 250k-entry vocabulary in Python: 3 s of a cold search with the real one.
    def refuse(*args, **kwargs):
        raise AssertionError("AutoTokenizer.from_pretrained was called")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    encoder = load_encoder(str(tiny_model), device="cpu", dtype="fp32")
    assert encoder.tokenize(["moon"], 512)[0].ids[0] == encoder.tokenizer.cls_token_id


def test_special_tokens_are_read_from_the_folder_in_either_layout(tiny_model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    # BGE-M3's published special_tokens_map.json has objects ({"content": ...}), not strings; it wins over
    # tokenizer_config.json
    data = {"cls_token": {"content": "<s>", "lstrip": False}, "eos_token": {"content": "</s>"},
            "unk_token": {"content": "<pad>"}}  # a folder that says so is believed
    (folder / "special_tokens_map.json").write_text(json.dumps(data))
    tokenizer = load_tokenizer(folder)
    assert (tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 2, 1)


def test_a_damaged_tokenizer_is_a_model_error(tiny_model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read the tokenizer"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").unlink()
    shutil.copy(tiny_model / "tokenizer.json", folder / "tokenizer.json")
    (folder / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<nowhere>"}))
    with pytest.raises(ModelError, match="no unk token '<nowhere>'"):
        load_tokenizer(folder)
