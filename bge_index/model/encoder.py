"""Loading BGE-M3 and running it: texts in, dense, sparse and ColBERT vectors out.

The only module that loads the model (search.py imports torch too, for its
scoring kernels, but never the model). Finding the model, its identity and
sizes, device-name syntax and the choice of precision are model.py's, which
needs neither torch nor transformers; this module adds what does:
- loading tokenizer, encoder and both heads (`sparse_linear.pt`,
  `colbert_linear.pt`: required, never randomly initialised; read with
  torch.load(weights_only=True)) on a device present here, in a torch dtype;
- tokenisation with explicit, counted truncation, and passages for chunking;
- the forward pass and the three outputs, with FlagEmbedding's BGEM3FlagModel
  semantics: dense = L2-normalised CLS state; sparse = relu(sparse_linear(H))
  per token, special tokens and weights <= 0 dropped, max weight per token id;
  ColBERT = L2-normalised colbert_linear(H[:, 1:]), first n_tokens - 1 kept;
- out-of-memory recovery: a batch that does not fit is halved and retried.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# oneDNN keeps a compiled kernel for every matmul shape it meets (1,024 by default). Token-budget batches
# give a new shape almost every batch, so a large cache brings no hits, only memory that grows with the
# corpus (measured: about 100 MB over 100,000 short documents in bf16). Read when oneDNN first runs.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModel  # noqa: E402

from bge_index.errors import ModelError, ModelMismatchError  # noqa: E402
from bge_index.timings import stage_timer  # noqa: E402
from bge_index.model.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from bge_index.model.identity import (COLBERT_HEAD_FILE, DEFAULT_MODEL, QUERY_MAX_LENGTH, SPARSE_HEAD_FILE,  # noqa: E402
                                      ModelIdentity, check_chunk_overlap, check_device, check_head, choose_precision,
                                      effective_max_length, identify_model, parse_devices, usable_positions)

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one text, already truncated to the encoder's max length."""

    ids: list[int]
    truncated: bool


@dataclass(frozen=True)
class Passage:
    """One chunk of a long text: its token ids (with <s> and </s>) and its character span [start, end)."""

    ids: list[int]
    start: int
    end: int


@dataclass
class EncodedBatch:
    """Vectors for a batch, in the order the batch was given.

    dense:   [B, D] float32, unit length.
    sparse:  B pairs (token ids uint32 ascending, weights float32 > 0).
    colbert: B arrays [n_tokens - 1, D_colbert] float32 of unit rows, or None.
    """

    dense: np.ndarray
    sparse: list[tuple[np.ndarray, np.ndarray]]
    colbert: list[np.ndarray] | None

    @classmethod
    def concatenate(cls, parts: Sequence["EncodedBatch"]) -> "EncodedBatch":
        """Batches encoded one after another, as one batch in the same order."""
        colbert = None if parts[0].colbert is None else [vectors for part in parts for vectors in part.colbert]
        return cls(np.concatenate([part.dense for part in parts]), [pair for part in parts for pair in part.sparse],
                   colbert)


# ---------------------------------------------------------------------------
# Device and dtype


def resolve_device(device: str) -> torch.device:
    """A device name (model.check_device's syntax) -> a torch.device present on this machine; auto picks the best."""
    device = check_device(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"--device {device}: MPS is not available on this machine")
    return resolved


def resolve_devices(devices: str) -> list[str]:
    """`cuda:0,cuda:1` or `all` (every CUDA device) -> device names present here, one encoder each."""
    names = parse_devices(devices)
    if names == "all":
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            raise ModelError("--devices all: no CUDA device on this machine (use --device for a single device)")
        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    for name in names:
        resolve_device(name)  # fails with a clear message for an absent device
    return names


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype for model.choose_precision's choice (auto: fp16 on CUDA, bf16 on CPUs with native bf16, fp32 elsewhere).

    `device` may be a device type ("cuda") for a device that is not on this machine (a Ray worker's).
    """
    device_type = device if isinstance(device, str) else device.type
    return _TORCH_DTYPES[choose_precision(dtype, device_type)]


def dtype_name(dtype: torch.dtype) -> str:
    """'fp32', 'fp16' or 'bf16' for a torch dtype."""
    return next(name for name, value in _TORCH_DTYPES.items() if value == dtype)


# ---------------------------------------------------------------------------
# The encoder


def load_encoder(model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
                 expected: ModelIdentity | None = None) -> "Encoder":
    """Load tokenizer, encoder and both heads; fail with ModelError on anything missing.

    With `expected` (an index's recorded model), a different model is refused
    before its weights are loaded.
    """
    info = identify_model(model, known=expected)
    folder, identity = info.folder, info.identity
    if expected is not None and not identity.same_model(expected):
        raise ModelMismatchError(
            f"the index was built with {expected.describe()}, but --model gives {identity.describe()}; "
            "use the index's own model (leave out --model), or build a new index with this one")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    with stage_timer("tokenizer"):
        tokenizer = load_tokenizer(folder)  # tokenizer.json straight into Rust (tokenizer.py)
    with _quiet_transformers():
        try:
            with stage_timer("weights"):
                # No pooler: BGE-M3 never uses it, and skipping it saves a matmul per batch. Loaded in its
                # dtype directly: no float32 copy to convert.
                network = AutoModel.from_pretrained(folder, dtype=torch_dtype, add_pooling_layer=False,
                                                    attn_implementation="sdpa", trust_remote_code=False,
                                                    local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelError(f"cannot load the model in {folder}: {error}") from error
    hidden = network.config.hidden_size
    token_count = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    if token_count > network.config.vocab_size:
        raise ModelError(f"{folder / 'tokenizer.json'} has {token_count} tokens but the model's embedding table "
                         f"only {network.config.vocab_size} (config.json vocab_size): tokenizer and model do not match")
    with stage_timer("heads"):
        sparse_head = _load_head(folder / SPARSE_HEAD_FILE, hidden, out_features=1)
        colbert_head = _load_head(folder / COLBERT_HEAD_FILE, hidden, out_features=None)
    network.eval()
    if torch_device.type != "cpu":  # from_pretrained loads on the CPU; elsewhere one move is needed
        network.to(torch_device)
    return Encoder(tokenizer, network, sparse_head.to(torch_device, torch_dtype),
                   colbert_head.to(torch_device, torch_dtype), torch_device, torch_dtype, identity)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Loading chatter (unused pooler weights, etc.) is not for our users' terminals."""
    level = transformers.logging.get_verbosity()
    bars_were_enabled = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars_were_enabled:
            transformers.logging.enable_progress_bar()


def _load_head(path: Path, hidden: int, out_features: int | None) -> torch.nn.Linear:
    """A head file as a float32 Linear layer, its shapes checked as model.identify_model checks them."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelError(f"cannot read head {path}: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"head {path} holds a {type(state).__name__}; expected a state dict with weight (and bias)")
    check_head(path, {str(k): tuple(v.shape) for k, v in state.items()}, hidden, out_features)
    if not all(bool(torch.isfinite(v.float()).all()) for v in state.values()):
        raise ModelError(f"head {path} holds weights that are not finite float32 numbers (inf or NaN)")
    weight = state["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state)
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval()


class Encoder:
    """A loaded BGE-M3: tokenise texts, encode batches of token ids into vectors."""

    def __init__(self, tokenizer: Tokenizer, network, sparse_head: torch.nn.Linear, colbert_head: torch.nn.Linear,
                 device: torch.device, dtype: torch.dtype, identity: ModelIdentity):
        self.tokenizer = tokenizer
        self.network = network
        self.sparse_head = sparse_head
        self.colbert_head = colbert_head
        self.device = device
        self.dtype = dtype
        self.identity = identity
        self.dense_dim = int(network.config.hidden_size)
        self.colbert_dim = int(colbert_head.out_features)
        self.model_max_length = usable_positions(network.config.max_position_embeddings)
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_id = tokenizer.eos_token_id
        # FlagEmbedding drops exactly these ids from sparse vectors.
        special = {tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
        self.special_ids = torch.tensor(sorted(i for i in special if i is not None), device=device)
        self.vocab_size = int(network.config.vocab_size)
        # Rows x padded length above which a batch is split before it is tried; lowered by out-of-memory errors.
        self.max_padded_tokens = 1 << 62
        self.out_of_memory_splits = 0

    # -- tokenisation ------------------------------------------------------

    def effective_max_length(self, requested: int) -> int:
        """Token budget per text: `requested` within this model's usable positions (model.py)."""
        return effective_max_length(requested, self.model_max_length)

    def tokenize(self, texts: Sequence[str], max_length: int) -> list[Tokenized]:
        """Token ids with <s> ... </s>; longer texts keep their head and the closing </s>.

        Same ids as `tokenizer(text, truncation=True, max_length=max_length)`,
        but the truncation is reported instead of silent.
        """
        max_length = self.effective_max_length(max_length)
        return [self._truncate(ids, max_length) for ids in self.tokenizer.encode_batch(texts)]

    def _truncate(self, ids: list[int], max_length: int) -> Tokenized:
        if len(ids) <= max_length:
            return Tokenized(ids, False)
        if ids[-1] == self.eos_id:
            return Tokenized(ids[: max_length - 1] + ids[-1:], True)
        return Tokenized(ids[:max_length], True)

    def passages(self, text: str, chunk_tokens: int, overlap: int) -> list[Passage]:
        """Split a text on token boundaries into passages of at most `chunk_tokens` tokens (with <s>, </s>).

        Consecutive passages share `overlap` tokens; each keeps the character
        span of its tokens in `text`, so the passage is `text[start:end]`.
        """
        chunk_tokens = self.effective_max_length(chunk_tokens)
        check_chunk_overlap(chunk_tokens, overlap)
        body = chunk_tokens - 2  # room left by <s> and </s>
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        cls_id, eos_id = self.tokenizer.cls_token_id, self.eos_id
        passages = []
        start = 0
        while True:
            end = min(start + body, len(ids))
            char_start = offsets[start][0] if ids else 0
            char_end = offsets[end - 1][1] if ids else len(text)
            passages.append(Passage([cls_id, *ids[start:end], eos_id], char_start, char_end))
            if end >= len(ids):
                return passages
            start = end - overlap

    def decode_token(self, token_id: int) -> str:
        """The vocabulary entry of one token id (a SentencePiece piece: '▁' marks a word start)."""
        return self.tokenizer.id_to_token(token_id)

    # -- encoding ----------------------------------------------------------

    def encode_queries(self, texts: Sequence[str], max_length: int = QUERY_MAX_LENGTH,
                       colbert: bool = False) -> EncodedBatch:
        """Encode queries one at a time, unpadded, so a query's vectors never depend on its neighbours.

        In a padded batch a short query shares its matmuls with longer ones, and
        in bf16/fp16 (and, through kernel choice, even fp32) its vectors come out
        a few ulps different from the same query encoded alone: `search "q"`,
        `search --queries` and `eval` could rank differently. Alone, each
        forward is [1, n_tokens] with no padding: the same bits wherever the
        query comes from. Measured on CPU (BENCHMARKS.md) this costs nothing:
        queries are short, and padding wasted as much as batching saved.
        """
        with stage_timer("encode queries"):
            tokenized = self.tokenize(texts, max_length)  # one call: the Rust tokenizer batches well
            return EncodedBatch.concatenate([self.encode_ids([t.ids], colbert=colbert) for t in tokenized])

    def encode_ids(self, batch: Sequence[Sequence[int]], colbert: bool = False) -> EncodedBatch:
        """Vectors for a batch of token id lists, in the batch's order.

        A batch that runs out of device memory is halved and both halves are
        retried (recursively), so no text is lost or reordered; later batches
        are kept under the size that failed. Only a single text too long for
        the device is an error.
        """
        if len(batch) > 1 and _padded_size(batch) > self.max_padded_tokens:
            return self._encode_halves(batch, colbert)
        try:
            return self._forward(batch, colbert)
        except RuntimeError as error:  # CUDA's OutOfMemoryError is one
            if not _is_out_of_memory(error):
                raise
            if len(batch) == 1:
                raise ModelError(f"a single {len(batch[0])}-token text does not fit in {self.device} memory; "
                                 "lower --max-length or split long texts with --chunk-tokens") from None
        # Outside the except block, so the failed attempt's tensors are freed before the retry.
        self.out_of_memory_splits += 1
        self.max_padded_tokens = min(self.max_padded_tokens, _padded_size(batch) // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self._encode_halves(batch, colbert)

    def _encode_halves(self, batch: Sequence[Sequence[int]], colbert: bool) -> EncodedBatch:
        middle = len(batch) // 2
        return EncodedBatch.concatenate([self.encode_ids(batch[:middle], colbert),
                                         self.encode_ids(batch[middle:], colbert)])

    def _forward(self, batch: Sequence[Sequence[int]], colbert: bool) -> EncodedBatch:
        """One forward pass over a padded batch."""
        input_ids, attention_mask = self._pad(batch)
        with torch.inference_mode():
            hidden = self.network(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, D]
            if not bool(torch.isfinite(hidden).all()):  # one pass over [B, L, D]: little beside the forward
                # inf/NaN would become `inf` scores, hits in index order and JSON that is not JSON
                raise ModelError("the model's outputs are not finite numbers: its weights are damaged or outside "
                                 f"the range of {str(self.dtype).removeprefix('torch.')}; refusing to index or "
                                 "search with them")
            dense = F.normalize(hidden[:, 0].float(), dim=-1)  # [B, D]
            sparse = self._sparse(hidden, input_ids, attention_mask)
            colbert_vectors = self._colbert(hidden, attention_mask) if colbert else None
            return EncodedBatch(dense.cpu().numpy(), sparse, colbert_vectors)

    def _pad(self, batch: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = [len(ids) for ids in batch]
        input_ids = np.full((len(batch), max(lengths)), self.pad_id, dtype=np.int64)  # [B, L]
        attention_mask = np.zeros_like(input_ids)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        as_tensors = [torch.from_numpy(a) for a in (input_ids, attention_mask)]
        if self.device.type == "cuda":
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in as_tensors)  # type: ignore[return-value]
        return tuple(t.to(self.device) for t in as_tensors)  # type: ignore[return-value]

    def _sparse(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Max-pooled ReLU token weights per distinct token id, computed for the whole batch at once."""
        batch_size = input_ids.shape[0]
        weights = torch.relu(self.sparse_head(hidden)).squeeze(-1)  # [B, L], model dtype
        keep = (weights > 0) & attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)  # [B, L]
        rows, positions = keep.nonzero(as_tuple=True)  # [K] each
        token_ids = input_ids[rows, positions]  # [K]
        token_weights = weights[rows, positions].float()  # [K]
        # One key per (row, token id); sorted unique keys come out grouped by row, ids ascending.
        keys = rows * self.vocab_size + token_ids  # [K] int64
        unique_keys, slot = torch.unique(keys, sorted=True, return_inverse=True)  # [U], [K]
        pooled = torch.zeros(unique_keys.shape[0], dtype=torch.float32, device=keys.device)
        pooled.scatter_reduce_(0, slot, token_weights, reduce="amax", include_self=False)  # [U]
        per_row = torch.bincount(unique_keys // self.vocab_size, minlength=batch_size).tolist()  # [B]
        ids = (unique_keys % self.vocab_size).to(torch.int32).cpu().numpy().astype(np.uint32)
        values = pooled.cpu().numpy()
        bounds = np.cumsum([0, *per_row])
        return [(ids[bounds[i]:bounds[i + 1]], values[bounds[i]:bounds[i + 1]]) for i in range(batch_size)]

    def _colbert(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> list[np.ndarray]:
        vectors = self.colbert_head(hidden[:, 1:])  # [B, L-1, Dc]: every token but <s>
        vectors = vectors * attention_mask[:, 1:, None].to(vectors.dtype)
        vectors = F.normalize(vectors.float(), dim=-1).cpu().numpy()
        lengths = attention_mask.sum(dim=1).tolist()  # [B]
        return [vectors[row, : lengths[row] - 1] for row in range(len(lengths))]


def _padded_size(batch: Sequence[Sequence[int]]) -> int:
    return len(batch) * max(len(ids) for ids in batch)


# torch.OutOfMemoryError is new in torch 2.4; torch.cuda's name for it is older.
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _is_out_of_memory(error: BaseException) -> bool:
    # CUDA raises OutOfMemoryError; MPS says "out of memory"; the CPU allocator "can't allocate memory".
    message = str(error).lower()
    return isinstance(error, _OUT_OF_MEMORY) or "out of memory" in message or "can't allocate memory" in message
