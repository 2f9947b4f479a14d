"""Shared fixtures.

Real-model artefacts (the SmolLM2 tokenizer, the converted SmolLM2) live in the user's cache
(``$OPD_AGENTS_CACHE``, default ``~/.cache/opd_agents``) so they are built once per machine, not once per
test run; tiny random models are built per session under pytest's tmp dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd_agents.models import build_tiny_model, load_model, resolve_model, tokenizer_dir

# ``dtype: auto`` means bf16 on CPUs with AMX (opd_agents.models.native_bf16): the suite tests the same fp32
# arithmetic on every CI machine (subprocesses inherit this); bf16 tests ask for it explicitly.
os.environ["OPD_AGENTS_NATIVE_BF16"] = "0"


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """The real SmolLM2 tokenizer (≈4 s on first use per machine, then cached)."""
    return tokenizer_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A 2-layer, hidden-64 random Llama over the SmolLM2 tokenizer (seed 0). Treat as read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """Like ``tiny_model_dir`` with other random weights (seed 1): a teacher that disagrees with it."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-teacher", smollm2_tokenizer_dir, seed=1)


@pytest.fixture()
def tiny_model(tiny_model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh (model, tokenizer) per test, so a test that trains it cannot affect another."""
    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct in fp32 (≈20 s conversion on first use per machine). Slow tests only."""
    return resolve_model("smollm2-135m-instruct")
