"""The encoder's vectors against an independent computation with plain torch over the same weights.

The reference below follows FlagEmbedding's BGEM3FlagModel one text at a
time, with no padding and Python dicts for the sparse max-pooling, so that
batching, padding, ordering and the vectorised pooling are all checked.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from bge_index.model.encoder import load_encoder, resolve_device, resolve_dtype
from bge_index.errors import ModelError, ModelMismatchError
from bge_index.model.identity import ModelIdentity, cpu_has_native_bf16, model_identity
from helpers import encode_texts

TEXTS = [
    "The Moon orbits the Earth.",
    "the the the moon moon moon the",  # repeated ids: max pooling must keep the largest weight
    "Der Mond ist aufgegangen, die goldnen Sternlein prangen.",
    "El pulpo tiene tres corazones y sangre azul, y vive en el fondo del océano. " * 3,
    "x",
    "La lune éclaire la mer ⚓ et les bateaux rentrent au port avant la nuit.",  # ⚓ -> <unk>
]


class Reference:
    """Plain torch over the checkpoint's files, one unpadded text at a time."""

    def __init__(self, folder):
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.sparse = self._linear(torch.load(folder / "sparse_linear.pt"))
        self.colbert = self._linear(torch.load(folder / "colbert_linear.pt"))
        t = self.tokenizer
        self.unused = {t.cls_token_id, t.eos_token_id, t.pad_token_id, t.unk_token_id}

    @staticmethod
    def _linear(state):
        layer = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        layer.load_state_dict({k: v.float() for k, v in state.items()})
        return layer

    @torch.no_grad()
    def encode(self, text, max_length=512):
        ids = self.tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        hidden = self.model(input_ids=ids).last_hidden_state[0]  # [L, D]
        dense = torch.nn.functional.normalize(hidden[0], dim=-1).numpy()
        weights = torch.relu(self.sparse(hidden)).squeeze(-1).tolist()
        lexical: dict[int, float] = {}
        for token, weight in zip(ids[0].tolist(), weights):
            if token not in self.unused and weight > 0 and weight > lexical.get(token, 0.0):
                lexical[token] = weight
        colbert = torch.nn.functional.normalize(self.colbert(hidden[1:]), dim=-1).numpy()
        return ids[0].tolist(), dense, lexical, colbert[: len(ids[0]) - 1]


@pytest.fixture(scope="module")
def reference(tiny_model):
    return Reference(tiny_model)


def as_dict(sparse_pair):
    ids, weights = sparse_pair
    return dict(zip(ids.tolist(), weights.tolist()))


def assert_matches_reference(batch, reference, texts):
    for row, text in enumerate(texts):
        _, dense, lexical, colbert = reference.encode(text)
        np.testing.assert_allclose(batch.dense[row], dense, atol=1e-5)
        ours = as_dict(batch.sparse[row])
        assert set(ours) == set(lexical), text
        np.testing.assert_allclose([ours[t] for t in sorted(lexical)], [lexical[t] for t in sorted(lexical)], atol=1e-5)
        assert batch.colbert[row].shape == colbert.shape
        np.testing.assert_allclose(batch.colbert[row], colbert, atol=1e-5)


def test_vectors_equal_reference_computation(encoder, reference):
    batch = encoder.encode_ids([t.ids for t in encoder.tokenize(TEXTS, 512)], colbert=True)
    assert_matches_reference(batch, reference, TEXTS)


def test_dense_is_unit_length_and_sparse_is_sorted_positive(encoder):
    batch = encode_texts(encoder, TEXTS, colbert=True)
    np.testing.assert_allclose(np.linalg.norm(batch.dense, axis=1), 1.0, atol=1e-5)
    for ids, weights in batch.sparse:
        assert ids.dtype == np.uint32 and weights.dtype == np.float32
        assert np.all(np.diff(ids.astype(np.int64)) > 0)
        assert np.all(weights > 0)
    for vectors in batch.colbert:
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_special_tokens_never_in_sparse(encoder):
    t = encoder.tokenizer
    special = {t.cls_token_id, t.eos_token_id, t.pad_token_id, t.unk_token_id}
    tokenized = encoder.tokenize(TEXTS, 512)
    assert any(t.unk_token_id in tok.ids for tok in tokenized), "test texts must contain an unknown token"
    batch = encoder.encode_ids([tok.ids for tok in tokenized])
    for ids, _ in batch.sparse:
        assert not special & set(ids.tolist())


def test_repeated_token_keeps_max_weight(encoder, reference):
    text = TEXTS[1]
    ids, _, lexical, _ = reference.encode(text)
    hidden_weights = {}
    with torch.no_grad():
        hidden = reference.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        for token, weight in zip(ids, torch.relu(reference.sparse(hidden)).squeeze(-1).tolist()):
            hidden_weights.setdefault(token, []).append(weight)
    repeated = [tok for tok, ws in hidden_weights.items() if len(ws) > 1 and tok in lexical]
    assert repeated, "the text must repeat a token with a positive weight"
    ours = as_dict(encode_texts(encoder, [text]).sparse[0])
    for token in repeated:
        assert ours[token] == pytest.approx(max(hidden_weights[token]), abs=1e-5)
        assert len(set(round(w, 6) for w in hidden_weights[token])) > 1  # occurrences really differ


def test_batch_composition_and_order_do_not_change_vectors(encoder):
    together = encode_texts(encoder, TEXTS, colbert=True)
    reversed_batch = encode_texts(encoder, TEXTS[::-1], colbert=True)
    for row, text in enumerate(TEXTS):
        alone = encode_texts(encoder, [text], colbert=True)
        other = len(TEXTS) - 1 - row
        for batch, index in ((alone, 0), (reversed_batch, other)):
            np.testing.assert_allclose(batch.dense[index], together.dense[row], atol=1e-5)
            assert as_dict(batch.sparse[index]).keys() == as_dict(together.sparse[row]).keys()
            np.testing.assert_allclose(batch.sparse[index][1], together.sparse[row][1], atol=1e-5)
            np.testing.assert_allclose(batch.colbert[index], together.colbert[row], atol=1e-5)


def test_colbert_keeps_n_tokens_minus_one(encoder):
    tokenized = encoder.tokenize(TEXTS, 512)
    batch = encoder.encode_ids([t.ids for t in tokenized], colbert=True)
    for tok, vectors in zip(tokenized, batch.colbert):
        assert vectors.shape == (len(tok.ids) - 1, encoder.colbert_dim)


def test_truncation_matches_tokenizer_and_is_reported(encoder, tiny_model):
    reference = AutoTokenizer.from_pretrained(tiny_model)
    long_text = "The Moon orbits the Earth once every twenty-seven days. " * 40
    for max_length in (8, 33, 512):
        (ours,) = encoder.tokenize([long_text], max_length)
        expected = reference(long_text, truncation=True, max_length=max_length)["input_ids"]
        assert ours.ids == expected
        assert ours.truncated
    (short,) = encoder.tokenize(["short text"], 512)
    assert not short.truncated
    assert short.ids == reference("short text")["input_ids"]


def test_max_length_is_capped_by_model_positions(encoder):
    assert encoder.model_max_length == 512  # 514 positions, XLM-R offset of 2
    assert encoder.effective_max_length(8192) == 512
    assert encoder.effective_max_length(100) == 100


def test_missing_head_is_an_error_not_a_random_init(tiny_model, tmp_path):
    broken = tmp_path / "no-sparse-head"
    shutil.copytree(tiny_model, broken)
    (broken / "sparse_linear.pt").unlink()
    with pytest.raises(ModelError, match="sparse_linear.pt"):
        load_encoder(str(broken), device="cpu")


def test_wrong_head_shape_is_an_error(tiny_model, tmp_path):
    broken = tmp_path / "bad-head"
    shutil.copytree(tiny_model, broken)
    torch.save(torch.nn.Linear(7, 1).state_dict(), broken / "sparse_linear.pt")
    with pytest.raises(ModelError, match="shape"):
        load_encoder(str(broken), device="cpu")


def test_missing_folder_and_unreachable_hub_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        load_encoder(str(tmp_path / "nowhere" / "model"), device="cpu")
    # HF_HUB_OFFLINE=1 (conftest): a hub id that is not cached fails at once, naming it.
    with pytest.raises(ModelError, match="someone/not-a-cached-model"):
        load_encoder("someone/not-a-cached-model", device="cpu")


def test_identity_is_stable_and_detects_other_weights(tiny_model, tmp_path):
    first = model_identity(tiny_model, str(tiny_model), None)
    again = model_identity(tiny_model, str(tiny_model), None, known=first)
    assert first.sha256 == again.sha256 and first.same_model(again)
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    torch.save({k: v + 1 for k, v in torch.load(other / "sparse_linear.pt").items()}, other / "sparse_linear.pt")
    changed = model_identity(other, str(other), None)
    assert not changed.same_model(first)
    with pytest.raises(ModelMismatchError, match="built with"):
        load_encoder(str(other), device="cpu", expected=first)
    assert ModelIdentity.from_json(first.to_json()) == first


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    native_bf16 = cpu_has_native_bf16()
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native_bf16 else torch.float32)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(ModelError):
        resolve_device("tpu")


def test_bf16_vectors_stay_close_to_fp32(tiny_model, encoder):
    bf16 = load_encoder(str(tiny_model), device="cpu", dtype="bf16")
    ours, theirs = encode_texts(bf16, TEXTS), encode_texts(encoder, TEXTS)
    cosines = np.sum(ours.dense * theirs.dense, axis=1)
    assert np.all(cosines > 0.99)
