"""Hub ids resolve through huggingface_hub's cache (its real layout, built here from local models); an id
that is not cached fails with one typed error naming it and how to get it, before any work."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from opd_agents.errors import ModelNotCachedError
from opd_agents.models import check_model, load_model, load_tokenizer, resolve_model

REV = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: Path, repo_id: str, model_dir: Path, revision: str = REV, ref: str = "main") -> Path:
    """huggingface_hub's layout: blobs named by hash, snapshots/<rev>/ of symlinks to them, refs/<ref>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for f in model_dir.iterdir():
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snapshot / f.name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(revision)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache that huggingface_hub reads (it reads HF_HUB_CACHE into constants at import)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("OPD_AGENTS_HUB_DOWNLOAD", raising=False)
    return cache


def test_hub_id_resolves_from_the_cache(hub_cache: Path, tiny_model_dir: Path) -> None:
    snapshot = make_hub_cache(hub_cache, "acme/tiny-llama", tiny_model_dir)
    assert resolve_model("acme/tiny-llama") == snapshot
    check_model("acme/tiny-llama")
    model, tok = load_model("acme/tiny-llama")
    assert model.config.num_hidden_layers == 2 and tok.convert_tokens_to_ids("<|im_end|>") is not None


def test_hub_revision_and_refs(hub_cache: Path, tiny_model_dir: Path) -> None:
    other = "f" * 40
    make_hub_cache(hub_cache, "acme/tiny-llama", tiny_model_dir)
    snap = make_hub_cache(hub_cache, "acme/tiny-llama", tiny_model_dir, revision=other, ref="v2")
    assert resolve_model(f"acme/tiny-llama@{other}") == snap  # a commit hash
    assert resolve_model("acme/tiny-llama@v2") == snap  # a branch/tag through refs/
    with pytest.raises(ModelNotCachedError, match="--revision nope"):
        check_model("acme/tiny-llama@nope")


def test_uncached_hub_id_is_one_typed_error(hub_cache: Path) -> None:
    with pytest.raises(ModelNotCachedError) as e:
        check_model("Qwen/Qwen3-0.6B")
    msg = str(e.value)
    assert "'Qwen/Qwen3-0.6B'" in msg and "huggingface-cli download Qwen/Qwen3-0.6B" in msg
    assert str(hub_cache) in msg and "OPD_AGENTS_HUB_DOWNLOAD" in msg
    with pytest.raises(ModelNotCachedError):
        load_tokenizer("Qwen/Qwen3-0.6B")


def test_offline_wins_over_download(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloading allowed by us but HF_HUB_OFFLINE=1: huggingface_hub's rule holds, no network call."""
    monkeypatch.setenv("OPD_AGENTS_HUB_DOWNLOAD", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotCachedError, match="could not get it"):
        resolve_model("Qwen/Qwen3-0.6B")


def test_hub_cache_from_the_environment(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The real thing: HF_HUB_CACHE set in the environment of a fresh process (the CLI's preflight path)."""
    cache = tmp_path / "hf"
    snap = make_hub_cache(cache, "acme/tiny-llama", tiny_model_dir)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    code = ("from opd_agents.models import check_model, resolve_model; check_model('acme/tiny-llama'); "
            "print(resolve_model('acme/tiny-llama'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(snap)


def test_preflight_names_an_uncached_teacher(hub_cache: Path) -> None:
    from opd_agents.config import parse_config
    from opd_agents.training.preflight import preflight

    cfg = parse_config({"teacher": {"model": "acme/not-cached"}, "student": {"model": "acme/not-cached-either"}})
    with pytest.raises(ModelNotCachedError, match="acme/not-cached-either"):
        preflight(cfg)


@pytest.mark.slow
def test_smollm2_from_a_hub_cache(hub_cache: Path, smollm2_dir: Path) -> None:
    """The converted SmolLM2 served as HuggingFaceTB/SmolLM2-135M-Instruct from a hub-style cache."""
    make_hub_cache(hub_cache, "HuggingFaceTB/SmolLM2-135M-Instruct", smollm2_dir)
    model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    ref, _ = load_model(smollm2_dir)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
