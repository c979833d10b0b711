"""model.py: finding and identifying a model without torch, reading head shapes safely, device syntax."""

from __future__ import annotations

import doctest
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import bge_index.model.identity as model_module
from bge_index.model.encoder import load_encoder, resolve_device, resolve_devices, resolve_dtype
from bge_index.errors import EXIT_USAGE, InvalidOptionError, ModelError
from bge_index.model.identity import (ModelOptionError, check_device, check_head, choose_precision, device_type,
                             identify_model, model_identity, parse_devices, read_head_shapes)

REPO = Path(__file__).resolve().parent.parent


def test_module_docstring_example_holds():
    assert doctest.testmod(model_module).failed == 0


# -- identify_model ------------------------------------------------------------


def test_identify_model_reads_sizes_and_identity(tiny_model):
    info = identify_model(str(tiny_model))
    config = json.loads((tiny_model / "config.json").read_text())
    assert info.folder == tiny_model.resolve()
    assert (info.dense_dim, info.colbert_dim) == (32, 32)
    assert info.model_max_length == 512  # 514 positions, XLM-R offset of 2
    assert info.vocab_size == config["vocab_size"]
    assert info.identity == model_identity(tiny_model.resolve(), str(tiny_model.resolve()), None)
    assert info.effective_max_length(8192) == 512


def test_identify_model_agrees_with_the_loaded_encoder(tiny_model, encoder):
    info = identify_model(str(tiny_model))
    assert (info.dense_dim, info.colbert_dim, info.model_max_length, info.vocab_size) == (
        encoder.dense_dim, encoder.colbert_dim, encoder.model_max_length, encoder.vocab_size)
    assert info.identity.same_model(encoder.identity)


def test_identify_model_reads_a_colbert_head_of_another_width(tiny_model, tmp_path):
    folder = tmp_path / "colbert-24"
    shutil.copytree(tiny_model, folder)
    torch.save({k: v.half() for k, v in torch.nn.Linear(32, 24).state_dict().items()}, folder / "colbert_linear.pt")
    assert identify_model(str(folder)).colbert_dim == 24


def test_identify_model_checks_the_sparse_head_too(tiny_model, tmp_path):
    folder = tmp_path / "wide-sparse"
    shutil.copytree(tiny_model, folder)
    torch.save(torch.nn.Linear(32, 3).state_dict(), folder / "sparse_linear.pt")
    with pytest.raises(ModelError, match="3 outputs, expected 1"):
        identify_model(str(folder))


def test_identify_model_imports_neither_torch_nor_transformers(tiny_model):
    script = (
        "import json, sys\n"
        "from bge_index.model.identity import identify_model\n"
        f"info = identify_model({str(tiny_model)!r})\n"
        "print(json.dumps([info.dense_dim, info.colbert_dim, info.identity.sha256,"
        " [m for m in ('torch', 'transformers') if m in sys.modules]]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    dense, colbert, sha256, imported = json.loads(done.stdout.splitlines()[-1])
    assert (dense, colbert) == (32, 32) and sha256
    assert imported == []


# -- head shapes without torch ---------------------------------------------------


def _shapes_by_torch(path):
    return {k: tuple(v.shape) for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


@pytest.mark.parametrize("kind", ["fp16 dict", "state_dict", "keep_vars", "bf16 strided", "no bias", "fp32 dict"])
def test_head_shapes_match_torch_load(tmp_path, kind):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 5, bias=kind != "no bias")
    state = {
        # tests/tiny_checkpoint.py and shared/tools/make_m3_checkpoint.py both save this way
        "fp16 dict": lambda: {k: v.half() for k, v in layer.state_dict().items()},
        "state_dict": layer.state_dict,  # an OrderedDict with _metadata, as FlagEmbedding saves
        "keep_vars": lambda: layer.state_dict(keep_vars=True),  # Parameters
        "bf16 strided": lambda: {"weight": torch.randn(5, 32).bfloat16()[:, ::2], "bias": torch.zeros(5)},
        "no bias": layer.state_dict,
        "fp32 dict": lambda: dict(layer.state_dict()),
    }[kind]()
    path = tmp_path / "head.pt"
    torch.save(state, path)
    assert read_head_shapes(path) == _shapes_by_torch(path)
    assert model_module.head_outputs(path, 16) == 5


def test_tiny_checkpoint_heads_match_torch_load(tiny_model):
    for name in ("sparse_linear.pt", "colbert_linear.pt"):
        assert read_head_shapes(tiny_model / name) == _shapes_by_torch(tiny_model / name)


def test_head_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save(torch.zeros(3, 16), tmp_path / "bare.pt")
    with pytest.raises(ModelError, match="bare tensor of shape \\(3, 16\\)"):
        read_head_shapes(tmp_path / "bare.pt")
    torch.save([torch.zeros(3, 16)], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="holds a list"):
        read_head_shapes(tmp_path / "list.pt")


def test_head_not_in_zip_format_is_a_clear_error(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.nn.Linear(16, 5).state_dict(), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelError, match="not a zip-format torch.save file"):
        read_head_shapes(legacy)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="not a zip-format"):
        read_head_shapes(garbage)


def test_damaged_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "damaged.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("damaged/data.pkl", b"\x80\x02}q\x00(X")  # cut short
    with pytest.raises(ModelError, match="unreadable pickle"):
        read_head_shapes(path)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _zip_with_pickle(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{path.stem}/data.pkl", payload)
        archive.writestr(f"{path.stem}/version", "3\n")
    return path


def test_head_whose_pickle_names_another_global_runs_nothing(tmp_path, tiny_model):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"weight": _RunsCode(marker)}, protocol=2)
    path = _zip_with_pickle(tmp_path / "evil.pt", payload)
    with pytest.raises(ModelError, match="refusing to unpickle (os|posix).system"):
        read_head_shapes(path)
    # the same through torch.save's own pickler, and inside a model folder
    folder = tmp_path / "evil-model"
    shutil.copytree(tiny_model, folder)
    torch.save(_RunsCode(marker), folder / "colbert_linear.pt")
    with pytest.raises(ModelError, match="refusing to unpickle"):
        identify_model(str(folder))
    assert not marker.exists()


def test_head_pickle_cannot_reach_builtins_through_other_opcodes(tmp_path):
    # protocol 0's INST opcode, and plain GLOBAL / STACK_GLOBAL of builtins, all go through find_class
    marker = tmp_path / "ran"
    inst = f"(S'touch {marker}'\nios\nsystem\n.".encode()
    for index, payload in enumerate([inst, pickle.dumps(eval, protocol=0), pickle.dumps(print, protocol=4)]):
        with pytest.raises(ModelError, match="refusing to unpickle"):
            read_head_shapes(_zip_with_pickle(tmp_path / f"evil{index}.pt", payload))
    assert not marker.exists()


def test_check_head_messages(tmp_path):
    path = tmp_path / "head.pt"
    assert check_head(path, {"weight": (7, 32), "bias": (7,)}, 32) == 7
    with pytest.raises(ModelError, match=r"weight shape \(1, 7\), expected \[out, 32\]"):
        check_head(path, {"weight": (1, 7)}, 32, out_features=1)
    with pytest.raises(ModelError, match="weight shape None"):
        check_head(path, {"bias": (1,)}, 32)
    with pytest.raises(ModelError, match="bias shape"):
        check_head(path, {"weight": (1, 32), "bias": (2,)}, 32)
    with pytest.raises(ModelError, match="scale besides weight and bias"):
        check_head(path, {"weight": (1, 32), "scale": (1,)}, 32)


def test_wrong_bias_shape_fails_loading_with_model_error(tiny_model, tmp_path):
    folder = tmp_path / "bad-bias"
    shutil.copytree(tiny_model, folder)
    torch.save({"weight": torch.zeros(1, 32), "bias": torch.zeros(3)}, folder / "sparse_linear.pt")
    with pytest.raises(ModelError, match="bias shape"):
        load_encoder(str(folder), device="cpu")


# -- devices and precision ---------------------------------------------------------


@pytest.mark.parametrize("name", ["auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12", " cpu "])
def test_check_device_accepts(name):
    assert check_device(name) == name.strip()


@pytest.mark.parametrize("name", ["tpu", "cuda:", "cuda:x", "cpu:0", "CUDA", "", "cuda:0,cuda:1", "all"])
def test_check_device_refuses_with_a_usage_error(name):
    with pytest.raises(ModelOptionError, match=r"--device .*: not a device; use auto, cpu, cuda, cuda:N or mps") as raised:
        check_device(name)
    assert isinstance(raised.value, InvalidOptionError) and isinstance(raised.value, ModelError)
    assert raised.value.exit_code == EXIT_USAGE


def test_parse_devices():
    assert parse_devices("cuda:0,cuda:1") == ["cuda:0", "cuda:1"]
    assert parse_devices(" cpu , cpu ") == ["cpu", "cpu"]
    assert parse_devices("mps") == ["mps"]
    assert parse_devices(" all ") == "all"


@pytest.mark.parametrize("value, bad", [("cuda:0,tpu", "'tpu'"), ("auto", "'auto'"), ("cuda:0,", "''"),
                                        ("", "''"), ("all,cuda:0", "'all'"), ("x,y", "'x', 'y'")])
def test_parse_devices_names_what_is_wrong(value, bad):
    with pytest.raises(ModelOptionError) as raised:
        parse_devices(value)
    message = str(raised.value)
    assert message.startswith(f"--devices {value!r}: {bad} not a device name")
    assert "cuda:0,cuda:1" in message and "use all" in message
    assert raised.value.exit_code == EXIT_USAGE


def test_device_type():
    assert device_type("cuda:3") == "cuda" and device_type("cpu") == "cpu" and device_type("mps") == "mps"
    assert device_type("auto") is None


@pytest.mark.parametrize("native", [True, False])
def test_choose_precision(monkeypatch, native):
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: native)
    assert choose_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert choose_precision("auto", "cuda") == "fp16"
    assert choose_precision("auto", "cuda:1") == "fp16"
    assert choose_precision("auto", "mps") == "fp32"
    for explicit in ("fp32", "fp16", "bf16"):
        assert choose_precision(explicit, "cpu") == explicit
    with pytest.raises(ModelOptionError, match="--dtype fp8: use one of auto, fp32, fp16, bf16"):
        choose_precision("fp8", "cpu")


def test_encoder_uses_the_same_syntax_and_precision():
    with pytest.raises(ModelOptionError, match="not a device"):
        resolve_device("tpu")
    with pytest.raises(ModelOptionError, match="not a device name"):
        resolve_devices("auto")
    assert resolve_devices("cpu,cpu") == ["cpu", "cpu"]
    for dtype in ("auto", "fp32", "fp16", "bf16"):
        for kind in ("cpu", "cuda", "mps"):
            expected = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[choose_precision(dtype, kind)]
            assert resolve_dtype(dtype, kind) == expected
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device"):
            resolve_devices("all")
