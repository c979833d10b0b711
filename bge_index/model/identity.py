"""Where a BGE-M3 model comes from and what it is, without loading it: no torch, no transformers.

This module owns
- the published layout of a BGE-M3 folder (config.json, weights, tokenizer
  files, the `sparse_linear.pt` and `colbert_linear.pt` heads) and the check
  that a folder has all of it;
- finding a model: a local folder as is, or a hub id resolved through
  huggingface_hub and its cache (imported only when a hub id is given);
- the model's identity (hub revision, or a content hash of the files that
  define the vectors), which index manifests record;
- its sizes (dense and ColBERT dims, vocabulary, usable positions), read from
  config.json and from the heads' tensor shapes: the heads are read by a
  restricted unpickler that knows tensor shapes only, so nothing in a head
  file can run code and torch is not needed;
- the syntax of device names (`--device`, `--devices`) and the choice of
  precision for a device type.

Loading the weights and running them is encoder.py's job; it imports torch.
Code that only needs to know about the model (`--version`, `info`, `verify`,
`index --dry-run`, an `index` run with nothing to encode) needs only this
module, which imports in milliseconds.

    >>> check_device("cuda:1")
    'cuda:1'
    >>> parse_devices("cuda:0, cuda:1")
    ['cuda:0', 'cuda:1']
    >>> parse_devices("all")
    'all'
    >>> choose_precision("auto", "cuda"), choose_precision("fp32", "cuda"), choose_precision("auto", "mps")
    ('fp16', 'fp32', 'fp32')
    >>> info = identify_model("/path/to/bge-m3")              # doctest: +SKIP
    >>> info.dense_dim, info.colbert_dim, info.model_max_length  # doctest: +SKIP
    (1024, 1024, 8192)
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import os
import pickle
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bge_index.errors import InvalidOptionError, ModelError, ModelOptionError

DEFAULT_MODEL = "BAAI/bge-m3"
QUERY_MAX_LENGTH = 512
SPARSE_HEAD_FILE = "sparse_linear.pt"
COLBERT_HEAD_FILE = "colbert_linear.pt"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")
# Files whose bytes define the vectors; hashed for the model's identity.
# tokenizer_config.json and special_tokens_map.json name the special tokens, whose ids sparse vectors drop.
IDENTITY_FILES = ("config.json", *WEIGHT_FILES, SPARSE_HEAD_FILE, COLBERT_HEAD_FILE, "tokenizer.json",
                  "sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
PRECISIONS = ("fp32", "fp16", "bf16")


# ---------------------------------------------------------------------------
# What a model is


@dataclass(frozen=True)
class ModelIdentity:
    """What an index records about its model, so queries are encoded by the same one.

    `name` is what to load it by again (hub id, or the folder's absolute path);
    `revision` is the hub commit for hub models; `sha256` hashes the files
    that define the vectors (local folders); `files` maps those files to
    (size, mtime_ns) so an unchanged folder need not be hashed again.
    """

    name: str
    revision: str | None
    sha256: str | None
    files: dict[str, tuple[int, int]]

    def to_json(self) -> dict:
        """The manifest's form: plain JSON types."""
        return {"name": self.name, "revision": self.revision, "sha256": self.sha256,
                "files": {k: list(v) for k, v in self.files.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "ModelIdentity":
        """The identity a manifest recorded with `to_json`."""
        files = {k: (int(v[0]), int(v[1])) for k, v in (data.get("files") or {}).items()}
        return cls(data["name"], data.get("revision"), data.get("sha256"), files)

    def same_model(self, other: "ModelIdentity") -> bool:
        """Same vectors: same hub revision, else same content hash, else (neither known) same name."""
        if self.revision and other.revision:
            return self.revision == other.revision
        if self.sha256 and other.sha256:
            return self.sha256 == other.sha256
        return self.name == other.name

    def describe(self) -> str:
        """One line for messages: the name and a short revision or hash."""
        if self.revision:
            return f"{self.name} (revision {self.revision[:12]})"
        if self.sha256:
            return f"{self.name} (sha256 {self.sha256[:12]})"
        return self.name


@dataclass(frozen=True)
class ModelInfo:
    """What can be known of a model without loading its weights."""

    folder: Path
    identity: ModelIdentity
    model_max_length: int
    dense_dim: int
    colbert_dim: int
    vocab_size: int

    def effective_max_length(self, requested: int) -> int:
        """Token budget per text for this model (see the module-level function)."""
        return effective_max_length(requested, self.model_max_length)


def effective_max_length(requested: int, model_max_length: int) -> int:
    """Token budget per text: what was asked, within what the model's positions allow (at least <s></s>)."""
    return max(2, min(requested, model_max_length))


def usable_positions(max_position_embeddings: int) -> int:
    """Tokens a text may have: XLM-R position ids start after the padding index, so two positions are unusable.

        >>> usable_positions(8194)  # BGE-M3
        8192
    """
    return int(max_position_embeddings) - 2


def check_chunk_overlap(chunk_tokens: int, overlap: int) -> None:
    """InvalidOptionError unless `overlap` leaves each `chunk_tokens`-token passage (with <s>, </s>) new tokens.

        >>> check_chunk_overlap(512, 64)
        >>> check_chunk_overlap(5, 3)
        Traceback (most recent call last):
        ...
        bge_index.errors.InvalidOptionError: --chunk-overlap must be between 0 and 2 for 5-token chunks
    """
    if not 0 <= overlap < chunk_tokens - 2:
        raise InvalidOptionError(f"--chunk-overlap must be between 0 and {chunk_tokens - 3} "
                                 f"for {chunk_tokens}-token chunks")


# ---------------------------------------------------------------------------
# Finding the model


def resolve_model_folder(model: str, offline: bool = False) -> tuple[Path, str | None]:
    """A local folder as is, or a hub id through huggingface_hub's cache -> (folder, revision).

    `offline`: the hub is never asked (a dry run); a hub id must be in the local cache.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {model}: not a folder (expected config.json, weights, tokenizer, {SPARSE_HEAD_FILE})")
        return path.resolve(), None
    if not _looks_like_hub_id(model):
        raise ModelError(f"--model {model}: no such folder")
    return _download_from_hub(model, offline)


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~", os.sep))


def _download_from_hub(repo_id: str, offline: bool = False) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download

    if offline:
        try:
            folder = Path(snapshot_download(repo_id, local_files_only=True))
        except Exception as error:  # not cached: huggingface_hub's LocalEntryNotFoundError and kin
            raise ModelError(f"--model {repo_id}: not in the local Hugging Face cache, and a dry run never asks "
                             "the hub; give --model FOLDER, or run once without --dry-run") from error
        return folder, folder.name

    common = ["config.json", *TOKENIZER_FILES, SPARSE_HEAD_FILE, COLBERT_HEAD_FILE]
    try:
        # Prefer safetensors; fall back to the .bin only when the repo has no safetensors,
        # so a repo carrying both is not downloaded twice.
        folder = Path(snapshot_download(repo_id, allow_patterns=[*common, WEIGHT_FILES[0]]))
        if not (folder / WEIGHT_FILES[0]).exists():
            folder = Path(snapshot_download(repo_id, allow_patterns=[*common, WEIGHT_FILES[1]]))
    except Exception as error:  # network, auth, missing repo: all end the same way for the user
        raise ModelError(
            f"--model {repo_id}: not a local folder, and the hub (or its local cache) could not provide it: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    return folder, folder.name  # snapshot folders are named by commit hash


def check_model_folder(folder: Path) -> None:
    """Fail early, naming every missing piece, rather than deep inside transformers."""
    missing = []
    if not (folder / "config.json").exists():
        missing.append("config.json")
    if not any((folder / name).exists() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if not any((folder / name).exists() for name in ("tokenizer.json", "sentencepiece.bpe.model")):
        missing.append("tokenizer.json")
    for head in (SPARSE_HEAD_FILE, COLBERT_HEAD_FILE):
        if not (folder / head).exists():
            missing.append(head)
    if missing:
        raise ModelError(f"model folder {folder} is missing {', '.join(missing)} (a BGE-M3 folder needs all of them)")


def model_identity(folder: Path, name: str, revision: str | None, known: ModelIdentity | None = None) -> ModelIdentity:
    """Identity of a model folder. Files unchanged since `known` (size and mtime) are not re-hashed."""
    files = _identity_file_stats(folder)
    if revision is not None:
        return ModelIdentity(name, revision, None, files)
    if known is not None and known.sha256 and known.files == files:
        return ModelIdentity(name, None, known.sha256, files)
    if known is not None and known.sha256 and set(known.files) < set(files):
        # An index recorded before the identity covered more files: compare what it hashed, so that it
        # still searches with its own model; a new index records them all.
        legacy = {k: files[k] for k in known.files}
        return ModelIdentity(name, None, _hash_files(folder, sorted(legacy)), legacy)
    return ModelIdentity(name, None, _hash_files(folder, sorted(files)), files)


def _identity_file_stats(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of each identity file the folder has."""
    files = {}
    for file_name in IDENTITY_FILES:
        path = folder / file_name
        if path.exists():
            stat = path.stat()
            files[file_name] = (stat.st_size, stat.st_mtime_ns)
    return files


def _hash_files(folder: Path, names: list[str]) -> str:
    """sha256 over each file's name and bytes, in the order given."""
    digest = hashlib.sha256()
    for file_name in names:
        digest.update(file_name.encode() + b"\0")
        with open(folder / file_name, "rb") as stream:
            while chunk := stream.read(1 << 23):
                digest.update(chunk)
    return digest.hexdigest()


def identify_model(model: str, known: ModelIdentity | None = None, offline: bool = False) -> ModelInfo:
    """Find a model and describe it without loading its weights (nor torch).

    Checks the folder's layout, config.json and both heads' shapes.
    `known` (an index's recorded identity) spares re-hashing files whose size and mtime it already lists.
    """
    folder, revision = resolve_model_folder(model, offline)
    check_model_folder(folder)
    name = model if revision is not None else str(folder)
    identity = model_identity(folder, name, revision, known)
    config = read_model_config(folder)
    max_positions, hidden, vocab = (config[k] for k in ("max_position_embeddings", "hidden_size", "vocab_size"))
    head_outputs(folder / SPARSE_HEAD_FILE, hidden, out_features=1)
    colbert_dim = head_outputs(folder / COLBERT_HEAD_FILE, hidden, out_features=None)
    return ModelInfo(folder, identity, usable_positions(max_positions), hidden, colbert_dim, vocab)


# ---------------------------------------------------------------------------
# The model's config, checked before anything is allocated or run

CONFIG_MAX_BYTES = 1 << 20  # a real config.json is about 1 KB
# (key, smallest, largest): an XLM-R config's sizes. The upper bounds are far above any real BGE-M3-like model
# and far below what would exhaust memory before the weights are even read.
CONFIG_RANGES = (
    ("hidden_size", 1, 1 << 16),
    ("num_attention_heads", 1, 1 << 10),
    ("num_hidden_layers", 1, 1 << 8),
    ("intermediate_size", 1, 1 << 18),
    ("vocab_size", 5, 1 << 22),
    ("max_position_embeddings", 4, 1 << 20),
)
# Files whose JSON may carry `auto_map`: transformers would import Python code from the folder through it.
CODE_MAP_FILES = ("config.json", "tokenizer_config.json")


def read_json_file(path: Path, max_bytes: int = CONFIG_MAX_BYTES) -> dict | None:
    """A model folder's JSON object file (None if absent), read with a size bound; ModelError if unreadable."""
    try:
        with open(path, "rb") as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise ModelError(f"{path}: not a regular file")
            raw = stream.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ModelError(f"{path}: unreadable ({error.strerror or error})") from error
    if len(raw) > max_bytes:
        raise ModelError(f"{path}: over {max_bytes} bytes; not a model config")
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as error:
        raise ModelError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def refuse_custom_code(folder: Path) -> None:
    """ModelError if the folder asks for its own Python code: bge-index never runs code from a model folder."""
    for name in CODE_MAP_FILES:
        data = read_json_file(folder / name)
        if data and data.get("auto_map"):
            raise ModelError(f"{folder / name}: `auto_map` asks to run Python code from the model folder; "
                             "bge-index never runs code from a model folder (BGE-M3 needs none): remove `auto_map`")


def read_model_config(folder: Path) -> dict:
    """config.json with its sizes checked for type and range: no allocation is sized by an unchecked value.

        >>> import tempfile; folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "config.json").write_text('{"hidden_size": "1024"}')
        >>> read_model_config(folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        bge_index.errors.ModelError: ...config.json: hidden_size is '1024', expected a whole number from 1 to 65536
    """
    path = folder / "config.json"
    config = read_json_file(path)
    if config is None:
        raise ModelError(f"model folder {folder} is missing config.json")
    refuse_custom_code(folder)
    model_type = config.get("model_type")
    if model_type not in (None, "xlm-roberta"):
        raise ModelError(f"{path}: model_type {model_type!r}; BGE-M3 is an XLM-RoBERTa model ('xlm-roberta')")
    for key, low, high in CONFIG_RANGES:
        value = config.get(key)
        # bool is an int subclass, and 64.0 would pass int(): only true integers count
        if type(value) is not int or not low <= value <= high:
            raise ModelError(f"{path}: {key} is {value!r}, expected a whole number from {low} to {high}")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ModelError(f"{path}: hidden_size {config['hidden_size']} is not a multiple of "
                         f"num_attention_heads {config['num_attention_heads']}")
    _check_size_against_weights(folder, config)
    return config


def _check_size_against_weights(folder: Path, config: dict) -> None:
    """ModelError when the config describes far more parameters than the weight file can hold.

    A config claiming 10^6 layers would otherwise make transformers allocate them all before reading a byte.
    Weights take at least 2 bytes a parameter (fp16/bf16); a factor of 2 leaves room for tied or omitted ones.
    """
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        return
    hidden, layers, inner = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    embeddings = (config["vocab_size"] + config["max_position_embeddings"]) * hidden
    per_layer = 4 * hidden * hidden + 2 * hidden * inner
    parameters = embeddings + layers * per_layer
    if parameters * 2 > 2 * weights.stat().st_size + (1 << 20):
        raise ModelError(f"{folder / 'config.json'} describes about {parameters:,} parameters, but "
                         f"{weights.name} holds {weights.stat().st_size:,} bytes: config and weights do not match")


# ---------------------------------------------------------------------------
# The heads' shapes, without torch

HEAD_PICKLE_MAX_BYTES = 1 << 20  # a state dict's pickle: a few hundred bytes
HEAD_MAX_BYTES = 1 << 28  # BGE-M3's ColBERT head is 4 MB in fp32


def head_outputs(path: Path, hidden: int, out_features: int | None = None) -> int:
    """Output size of a head file (a Linear(hidden, out) state dict), read without torch; ModelError if wrong."""
    return check_head(path, read_head_shapes(path), hidden, out_features)


def check_head(path: Path, shapes: dict[str, tuple[int, ...]], hidden: int, out_features: int | None = None) -> int:
    """Check a head's {name: shape} is a Linear(hidden, out) state dict and return `out`.

    Shared by the torch-free reader here and encoder.py's real load, so both
    refuse the same files with the same message.
    """
    weight = shapes.get("weight")
    if weight is None or len(weight) != 2 or weight[1] != hidden:
        raise ModelError(f"head {path} has weight shape {weight}, expected [out, {hidden}]")
    out = weight[0]
    if out_features is not None and out != out_features:
        raise ModelError(f"head {path} has {out} outputs, expected {out_features}")
    if "bias" in shapes and shapes["bias"] != (out,):
        raise ModelError(f"head {path} has bias shape {shapes['bias']}, expected [{out}]")
    unexpected = sorted(set(shapes) - {"weight", "bias"})
    if unexpected:
        raise ModelError(f"head {path} holds {', '.join(unexpected)} besides weight and bias: not a Linear layer's state")
    return out


def read_head_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the tensors in a head file written by torch.save, without torch and without running code.

    A torch.save file is a zip whose `<folder>/data.pkl` pickles the object,
    with tensor data in separate entries. The pickle is read by an unpickler
    that knows only the few globals a state dict of tensors uses, each
    replaced by a stand-in that records the tensor's shape; any other global
    (a class, a function) is refused, so no code in the file runs.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                raise ModelError(f"cannot read head {path}: a torch.save zip has one <folder>/data.pkl, "
                                 f"this one has {len(pickles)}")
            # A zip can expand a few KB into gigabytes: the sizes its directory states are checked first.
            # (zipfile stops reading an entry at its stated size, so a lie cannot get past this either.)
            unpacked = sum(entry.file_size for entry in archive.infolist())
            if archive.getinfo(pickles[0]).file_size > HEAD_PICKLE_MAX_BYTES or unpacked > HEAD_MAX_BYTES:
                raise ModelError(f"cannot read head {path}: it unpacks to {unpacked:,} bytes; a BGE-M3 head is a "
                                 f"few MB (at most {HEAD_MAX_BYTES:,} bytes are read)")
            data = archive.read(pickles[0])
    except zipfile.BadZipFile:
        raise ModelError(f"cannot read head {path}: not a zip-format torch.save file (torch >= 1.6 writes one; "
                         "re-save the head with torch.save(layer.state_dict(), path))") from None
    except OSError as error:
        raise ModelError(f"cannot read head {path}: {error}") from error
    try:
        state = _ShapeUnpickler(data).load()
    except _RefusedGlobal as error:
        raise ModelError(f"cannot read head {path}: {error}") from None
    except Exception as error:  # a damaged or unexpected pickle; nothing but our stand-ins ran
        raise ModelError(f"cannot read head {path}: unreadable pickle ({type(error).__name__}: {error})") from None
    if isinstance(state, _Tensor):
        raise ModelError(f"head {path} holds a bare tensor of shape {state.shape}; expected a state dict "
                         "with weight (and bias)")
    if not isinstance(state, dict):
        raise ModelError(f"head {path} holds a {type(state).__name__}; expected a state dict with weight (and bias)")
    return {str(key): value.shape for key, value in state.items() if isinstance(value, _Tensor)}


class _RefusedGlobal(pickle.UnpicklingError):
    """A head file's pickle names a global that is not one of a tensor state dict's."""


@dataclass(frozen=True)
class _Storage:
    """Stand-in for a tensor's storage: the data stays in the zip, unread."""

    numel: int


@dataclass(frozen=True)
class _Tensor:
    """Stand-in for a tensor: its shape only."""

    shape: tuple[int, ...]


class _StorageType:
    """Stand-in for torch's storage classes (torch.HalfStorage, torch.UntypedStorage, ...)."""


def _shape(size) -> tuple[int, ...]:
    if not isinstance(size, tuple) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in size):
        raise pickle.UnpicklingError(f"tensor size {size!r} is not a tuple of sizes")
    return size


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest, **_metadata) -> _Tensor:
    """torch._utils._rebuild_tensor_v2 / _v3 (same leading arguments)."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    return _Tensor(_shape(size))


def _rebuild_parameter(data, *_rest) -> _Tensor:
    """torch._utils._rebuild_parameter / _rebuild_parameter_with_state: a Parameter is its tensor here."""
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError("a parameter without a tensor")
    return data


_DTYPE_NAMES = frozenset({"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                          "bool", "double", "float", "half", "long", "int", "short"})


class _ShapeUnpickler(pickle.Unpickler):
    """Unpickles a torch.save state dict into {name: _Tensor}, refusing every global it does not know."""

    _GLOBALS = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "UntypedStorage"): _StorageType,
        ("torch.storage", "TypedStorage"): _StorageType,
    }

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))

    def find_class(self, module: str, name: str):
        """The stand-in for a global a tensor state dict uses; _RefusedGlobal for any other."""
        known = self._GLOBALS.get((module, name))
        if known is not None:
            return known
        if module == "torch" and re.fullmatch(r"[A-Za-z0-9]*Storage", name):
            return _StorageType
        if module == "torch" and name in _DTYPE_NAMES:
            return name  # a dtype, as _rebuild_tensor_v3 takes it; only its name matters here
        raise _RefusedGlobal(f"refusing to unpickle {module}.{name} (a head file holds only tensors)")

    def persistent_load(self, pid):
        """A storage reference as torch.save writes it -> a _Storage of its element count; UnpicklingError otherwise."""
        # ('storage', storage type, key, location, numel), as torch.save writes it
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] is _StorageType
                and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return _Storage(pid[4])


# ---------------------------------------------------------------------------
# Devices and precision


_DEVICE_SYNTAX = re.compile(r"cpu|mps|cuda(:\d+)?")
_DEVICE_HELP = "use auto, cpu, cuda, cuda:N or mps"


def check_device(name: str, option: str = "--device") -> str:
    """A single device name (auto, cpu, mps, cuda, cuda:N), stripped; ModelOptionError (exit 2) otherwise.

    Syntax only: whether the device is present is encoder.resolve_device's question.
    """
    value = name.strip()
    if value != "auto" and not _DEVICE_SYNTAX.fullmatch(value):
        raise ModelOptionError(f"{option} {name!r}: not a device; {_DEVICE_HELP}")
    return value


def parse_devices(value: str, option: str = "--devices") -> list[str] | Literal["all"]:
    """`cuda:0,cuda:1` -> ['cuda:0', 'cuda:1'], or 'all' (every CUDA device); ModelOptionError (exit 2) otherwise.

    Names may repeat (cpu,cpu: two encoders on the CPU); `auto` is refused,
    since each encoder needs a device of its own. Syntax only, like check_device.
    """
    if value.strip() == "all":
        return "all"
    names = [name.strip() for name in value.split(",")]
    bad = [name for name in names if not _DEVICE_SYNTAX.fullmatch(name)]
    if bad:
        shown = ", ".join(repr(name) for name in bad)
        raise ModelOptionError(f"{option} {value!r}: {shown} not a device name; list devices separated by commas "
                               "(cuda:0,cuda:1, or cpu, mps), or use all")
    return names


def device_type(name: str) -> str | None:
    """'cuda' for cuda:1, 'cpu' for cpu...; None for auto, whose type depends on this machine (ask torch)."""
    value = check_device(name)
    return None if value == "auto" else value.partition(":")[0]


def choose_precision(dtype: str, device_type: str) -> str:
    """The precision ('fp32', 'fp16', 'bf16') to encode in on a device type ('cpu', 'cuda', 'mps'; 'cuda:1' too).

    An explicit dtype stays as asked. `auto`: fp16 on CUDA; bf16 on CPUs that
    multiply bf16 natively; fp32 elsewhere (MPS, and CPUs that would emulate bf16).
    `device_type` may name a device that is not on this machine (a Ray worker's).
    """
    if dtype == "auto":
        kind = device_type.partition(":")[0]
        if kind == "cuda":
            return "fp16"
        if kind == "cpu" and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if dtype not in PRECISIONS:
        raise ModelOptionError(f"--dtype {dtype}: use one of {', '.join(DTYPE_CHOICES)}")
    return dtype


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16, AMX, or Arm's BF16).

    Without them PyTorch emulates bf16 matmuls and they run slower than fp32,
    so `auto` only picks bf16 where the hardware does it.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False  # not Linux: stay with fp32 rather than guess
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
