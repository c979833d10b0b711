"""BGE-M3's tokenizer, loaded once and straight from `tokenizer.json` with the Rust `tokenizers` library.

transformers' `AutoTokenizer.from_pretrained` builds the same Rust
tokenizer but first rebuilds XLM-R's 250k-entry vocabulary in Python: 2.8 s
of every cold search with the real tokenizer, against 0.8 s for reading
`tokenizer.json` directly (BENCHMARKS.md). This module owns that direct
load, the four special-token ids BGE-M3 drops from sparse vectors (from
`special_tokens_map.json` / `tokenizer_config.json`, XLM-R's names when
neither says), and the fallback: a folder without `tokenizer.json` (only
`sentencepiece.bpe.model`) goes through AutoTokenizer, whose Rust backend
is then used the same way. The ids equal AutoTokenizer's (tests check it).

    tokenizer = load_tokenizer(Path("/models/bge-m3"))
    tokenizer.encode_batch(["The Moon"])  # [[0, ..., 2]]: <s> ... </s>

No torch here (the `tokenizers` package comes with transformers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import tokenizers

from bge_index.errors import ModelError

TOKENIZER_FILE = "tokenizer.json"
# XLM-R's special tokens, used where the folder's files do not name them.
DEFAULT_SPECIAL = {"cls_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


class Tokenizer:
    """A Rust tokenizer with no padding or truncation of its own, and the ids of BGE-M3's special tokens."""

    def __init__(self, backend: tokenizers.Tokenizer, special: dict[str, str]):
        self.backend = backend
        ids = {}
        for role, token in special.items():
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ModelError(f"the tokenizer has no {role.removesuffix('_token')} token {token!r}")
            ids[role] = token_id
        self.cls_token_id, self.eos_token_id = ids["cls_token"], ids["eos_token"]
        self.pad_token_id, self.unk_token_id = ids["pad_token"], ids["unk_token"]

    def _plain(self) -> tokenizers.Tokenizer:
        # Padding and truncation are ours (counted, reported): never the backend's. Two attribute reads when clear.
        if self.backend.padding is not None:
            self.backend.no_padding()
        if self.backend.truncation is not None:
            self.backend.no_truncation()
        return self.backend

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, with <s> and </s>, untruncated."""
        return [encoding.ids for encoding in self._plain().encode_batch(list(texts), add_special_tokens=True)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of a text without special tokens, and each token's [start, end) characters in it."""
        encoding = self._plain().encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of a token id (a SentencePiece piece: '▁' marks a word start)."""
        return self.backend.id_to_token(int(token_id)) or ""


def load_tokenizer(folder: Path) -> Tokenizer:
    """The folder's tokenizer: `tokenizer.json` read directly, else transformers' AutoTokenizer (ModelError if neither)."""
    path = folder / TOKENIZER_FILE
    if path.is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises plain Exceptions for unreadable or unknown JSON
            raise ModelError(f"cannot read the tokenizer {path}: {error}") from error
        return Tokenizer(backend, _special_tokens(folder))
    from transformers import AutoTokenizer  # only folders with just sentencepiece.bpe.model come here

    try:
        slow_path = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load the tokenizer in {folder}: {error}") from error
    backend = getattr(slow_path, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"the tokenizer in {folder} has no fast (Rust) form; install a recent transformers")
    return Tokenizer(backend, {role: str(getattr(slow_path, role)) for role in DEFAULT_SPECIAL})


def _special_tokens(folder: Path) -> dict[str, str]:
    """cls/eos/pad/unk token strings: special_tokens_map.json, then tokenizer_config.json, then XLM-R's."""
    special = dict(DEFAULT_SPECIAL)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the later file wins
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot read {folder / name}: {error}") from error
        if not isinstance(data, dict):
            raise ModelError(f"{folder / name}: expected a JSON object")
        for role in DEFAULT_SPECIAL:
            value = data.get(role)
            if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
                value = value.get("content")
            if isinstance(value, str) and value:
                special[role] = value
    return special
