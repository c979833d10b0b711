"""Shared fixtures: tiny BGE-M3-shaped checkpoints, built once per session, and no network.

Plain helpers (paths, running the CLI, writing corpora) are in helpers.py; this folder is put on sys.path
here, so test modules import them as `from helpers import ...`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_checkpoint import build_checkpoint  # noqa: E402

from bge_index.model.encoder import load_encoder  # noqa: E402

# Tests never reach a model hub: huggingface_hub must answer from its cache or fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Remembered checksum checks (checked_files.py) go to a folder of this test session, never the user's cache.
os.environ["BGE_INDEX_CACHE_DIR"] = tempfile.mkdtemp(prefix="bge-index-test-cache-")
atexit.register(shutil.rmtree, os.environ["BGE_INDEX_CACHE_DIR"], ignore_errors=True)  # not left in /tmp
# The CLI's --dtype auto means bf16 on CPUs with native bf16 and fp32 elsewhere; tests that compare
# vectors with an fp32 computation need the same precision on every machine. Tests of `auto` unset this.
os.environ["BGE_INDEX_DTYPE"] = "fp32"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight checkpoint with BGE-M3's layout: hidden 32, 2 layers, 512 max tokens."""
    return build_checkpoint(tmp_path_factory.mktemp("models") / "tiny-m3")


@pytest.fixture(scope="session")
def spread_model(tmp_path_factory) -> Path:
    """A tiny checkpoint whose dense vectors differ from text to text (cosines 0.5-0.9, not all ~1.0), so a
    dense ranking has no near-ties that float32 summation order could flip."""
    return build_checkpoint(tmp_path_factory.mktemp("models") / "spread-m3", initializer_range=1.0)


@pytest.fixture(scope="session")
def encoder(tiny_model):
    return load_encoder(str(tiny_model), device="cpu", dtype="fp32")


# CI (.ci/run) sets BGE_INDEX_REQUIRE_EXTRAS=1: there every optional extra is installed, so a test skipped
# because one does not import means a broken install, and fails the run instead of passing quietly.
_MISSING_EXTRA = ("could not import", "extra is not installed", "No module named")


def _fail_missing_extra(report) -> None:
    if report.skipped and os.environ.get("BGE_INDEX_REQUIRE_EXTRAS") == "1":
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if any(marker in reason for marker in _MISSING_EXTRA):
            report.outcome = "failed"
            report.longrepr = f"an optional extra is missing where CI installs them all: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_extra(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_missing_extra(outcome.get_result())


@pytest.fixture(scope="module")
def pristine(tiny_model, tmp_path_factory):
    """An index of the sample corpus in shards of 20 rows, built once per module; tests copy it (`ix`)."""
    from helpers import SAMPLE_CORPUS, index

    out = tmp_path_factory.mktemp("pristine") / "ix"
    index(SAMPLE_CORPUS, out, tiny_model, "--shard-rows", "20")
    return out


@pytest.fixture
def ix(pristine, tmp_path):
    """A copy of `pristine` to damage or change; copy2 keeps mtimes, so the index stays "untouched"."""
    import shutil

    out = tmp_path / "ix"
    shutil.copytree(pristine, out, copy_function=shutil.copy2)
    return out
