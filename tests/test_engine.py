"""The HF engine at the token boundary: cached sessions, scoring, errors, the registry."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
import torch

from opd_agents.errors import ConfigError
from opd_agents.models import load_model
from opd_agents.rollout.engine import CompletionRequest, SamplingEngine, engine_names, make_engine
from opd_agents.rollout.hf_engine import HFEngine, ScoreRequest, _sample
from opd_agents.rollout.kv import weights_version
from opd_agents.rollout.renderer import ChatMLRenderer
from opd_agents.training.policy import adamw
from tests.test_rollout import EchoEverything


@pytest.fixture()
def engine(tiny_model_dir: Any) -> Any:
    model, tok = load_model(tiny_model_dir)
    eng = make_engine("hf", model=model, renderer=ChatMLRenderer(tok, EchoEverything(stop_strings=())))
    yield eng
    eng.close()


def fresh_logprobs(model: torch.nn.Module, ids: list[int], n: int) -> list[float]:
    """log pi of the last n ids from one unbatched forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [logp[p - 1, ids[p]].item() for p in range(len(ids) - n, len(ids))]


def test_registry_and_protocol(engine: HFEngine) -> None:
    assert isinstance(engine, SamplingEngine) and "hf" in engine_names()
    with pytest.raises(ConfigError, match="unknown rollout engine 'nope'"):
        make_engine("nope")


def test_sessions_reuse_the_cache_and_survive_a_changed_prefix(engine: HFEngine) -> None:
    """Turn 2 of an episode feeds only its new ids; a request whose ids leave the cached prefix (an
    edited history) still gets exact logprobs: the session is cut back to the common prefix."""
    prompt = list(range(100, 140))

    async def play() -> tuple[Any, Any, Any]:
        first = await engine.complete(CompletionRequest(prompt, max_tokens=6, seed=0, session="ep"))
        fed_after_first = engine.tokens_fed
        second_ids = prompt + first.token_ids + [7, 8, 9]
        second = await engine.complete(CompletionRequest(second_ids, max_tokens=5, seed=1, session="ep"))
        assert engine.tokens_fed - fed_after_first == 1 + 3 + 4  # last sampled token, observation, decode
        edited = prompt[:20] + [5, 6] + prompt[22:] + first.token_ids
        third = await engine.complete(CompletionRequest(edited, max_tokens=4, seed=2, session="ep"))
        return (second_ids, second), (edited, third), first

    (ids2, second), (ids3, third), _ = asyncio.run(play())
    for ids, completion in ((ids2, second), (ids3, third)):
        full = ids + completion.token_ids
        fresh = fresh_logprobs(engine.model, full, len(completion.token_ids))
        assert max(abs(a - b) for a, b in zip(fresh, completion.logprobs, strict=True)) < 1e-4
        assert completion.finish == "length"


def test_score_equals_a_fresh_forward_and_keeps_logits(engine: HFEngine) -> None:
    ids = list(range(200, 260))

    async def score() -> Any:
        first = await engine.score(ScoreRequest(ids[:30], 10, session="t"))
        second = await engine.score(ScoreRequest(ids, 12, session="t", keep_logits=True, keep_topk=3))
        return first, second

    first, second = asyncio.run(score())
    assert first.logprobs == pytest.approx(fresh_logprobs(engine.model, ids[:30], 10), abs=1e-4)
    assert second.logprobs == pytest.approx(fresh_logprobs(engine.model, ids, 12), abs=1e-4)
    assert second.logits is not None and tuple(second.logits.shape) == (12, engine.model.config.vocab_size)
    assert second.topk is not None and len(second.topk) == 12 and len(second.topk[0]) == 3
    with pytest.raises(ValueError, match="n_scored must be in 1..59"):
        asyncio.run(engine.score(ScoreRequest(ids, 60)))


def test_a_failed_forward_fails_its_request_not_the_engine(engine: HFEngine) -> None:
    vocab = engine.model.config.vocab_size
    with pytest.raises(IndexError):
        asyncio.run(engine.complete(CompletionRequest([1, 2, vocab + 5], max_tokens=3, seed=0)))
    ok = asyncio.run(engine.complete(CompletionRequest([1, 2, 3], max_tokens=3, seed=0)))
    assert len(ok.token_ids) == 3


def test_new_episodes_share_one_prompt_prefix_and_it_follows_the_weights(engine: HFEngine) -> None:
    """Episodes with a common prompt start reuse one cached prefix (exact logprobs); after an in-place
    weight change the prefix is recomputed, so nothing stale is ever read."""
    shared = list(range(400, 440))
    prompts = [shared + [7, 8], shared + [9], shared + [10, 11, 12]]

    async def play(ps: list[list[int]]) -> list[Any]:
        return list(await asyncio.gather(*(engine.complete(CompletionRequest(p, max_tokens=4, seed=i))
                                           for i, p in enumerate(ps))))

    first = asyncio.run(play(prompts))
    assert engine.tokens_shared == 2 * len(shared)  # 3 rows take it, computed once
    for p, c in zip(prompts, first, strict=True):
        assert c.logprobs == pytest.approx(fresh_logprobs(engine.model, p + c.token_ids, 4), abs=1e-4)
    asyncio.run(play([shared + [13]]))  # a later episode alone: the kept prefix serves it
    assert engine.tokens_shared == 3 * len(shared)
    with torch.no_grad():
        next(engine.model.parameters()).mul_(1.5)
    later = asyncio.run(play(prompts))
    assert engine.tokens_shared == 5 * len(shared)  # recomputed once for the new weights
    for p, c in zip(prompts, later, strict=True):
        assert c.logprobs == pytest.approx(fresh_logprobs(engine.model, p + c.token_ids, 4), abs=1e-4)


def test_mixed_precision_decodes_with_a_bf16_copy_that_follows_the_weights(tiny_model_dir: Any) -> None:
    """With a compute dtype the engine samples from a bf16 copy of the weights (buffers untouched), equal to
    a bf16 forward of the model; an in-place change of the model's weights reaches the copy before the next
    forward, without a load_weights call."""
    model, tok = load_model(tiny_model_dir)
    eng = make_engine("hf", model=model, renderer=ChatMLRenderer(tok, EchoEverything(stop_strings=())),
                      compute_dtype=torch.bfloat16)
    assert eng.runner is not model
    assert {p.dtype for p in eng.runner.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in eng.runner.buffers()} == {b.dtype for b in model.buffers()}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the trained weights stay fp32
    prompt = list(range(300, 330))

    def bf16_logprobs(ids: list[int], n: int) -> list[float]:
        reference = copy.deepcopy(model).to(torch.bfloat16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return fresh_logprobs(reference, ids, n)

    try:
        before = asyncio.run(eng.complete(CompletionRequest(prompt, max_tokens=5, seed=0)))
        assert before.logprobs == pytest.approx(bf16_logprobs(prompt + before.token_ids, 5), abs=2e-2)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.3)
        after = asyncio.run(eng.complete(CompletionRequest(prompt, max_tokens=5, seed=0)))
        assert after.logprobs == pytest.approx(bf16_logprobs(prompt + after.token_ids, 5), abs=2e-2)
        assert after.logprobs != before.logprobs
        torch.testing.assert_close(next(eng.runner.parameters()).float(), next(model.parameters()),
                                   rtol=1e-2, atol=0)
    finally:
        eng.close()


def test_an_optimizer_step_reaches_the_bf16_copy(tiny_model_dir: Any) -> None:
    """The trainer's fused AdamW writes the weights in one kernel that bumps no version counter by itself;
    ``adamw`` bumps them, so the engine's copy (and every cache keyed on ``weights_version``) follows a
    step even without a load_weights call."""
    model, tok = load_model(tiny_model_dir)
    eng = make_engine("hf", model=model, renderer=ChatMLRenderer(tok, EchoEverything(stop_strings=())),
                      compute_dtype=torch.bfloat16)
    opt = adamw(list(model.parameters()), lr=0.5)
    before = weights_version(model)
    model(torch.tensor([[5, 6, 7]])).logits.sum().backward()
    opt.step()
    assert weights_version(model) > before
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eng._sync_runner()
    torch.testing.assert_close(next(eng.runner.parameters()).float(), next(model.parameters()), rtol=1e-2, atol=0)
    eng.close()


def test_weights_served_over_http_arrive_byte_for_byte(tmp_path: Any) -> None:
    """The cross-node weight-sync path's transport (vllm_engine.serve_file): the file comes back whole
    from its URL; any other path is a 404; after the block nothing listens."""
    import httpx

    from opd_agents.rollout.vllm_engine import _local_address_towards, serve_file

    payload = bytes(range(256)) * 5000
    path = tmp_path / "model.safetensors"
    path.write_bytes(payload)
    assert _local_address_towards("localhost") == "127.0.0.1"
    with serve_file(str(path), "127.0.0.1") as url:
        assert httpx.get(url).content == payload
        assert httpx.get(url.rsplit("/", 2)[0] + "/x/model.safetensors").status_code == 404
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2)


def test_weight_sync_options_only_with_a_vllm_server() -> None:
    from pydantic import ValidationError

    from opd_agents.config import RolloutConfig

    assert RolloutConfig(engine="vllm_server", api_base="http://10.0.0.2:8000", weight_sync="http").weight_sync == "http"
    with pytest.raises(ValidationError, match="weight_sync"):
        RolloutConfig(engine="hf", weight_sync="http")
    with pytest.raises(ValidationError):
        RolloutConfig(engine="vllm_server", api_base="http://10.0.0.2:8000", weight_sync="nccl")


def _works(n: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> list[Any]:
    from concurrent.futures import Future

    from opd_agents.rollout.hf_engine import _Work

    req = CompletionRequest(prompt_ids=[1], max_tokens=1, temperature=temperature, top_p=top_p)
    # _sample reads only the request and the generator, never the future
    return [_Work(req, Future(), torch.Generator().manual_seed(seed + i)) for i in range(n)]


def test_batched_sampling_follows_the_distribution_and_the_nucleus() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6) * 2
    probs = torch.softmax(logits, dim=-1)
    n = 20_000
    tokens, logprobs = _sample(_works(n), logits.expand(n, -1))
    freq = torch.bincount(torch.tensor(tokens), minlength=6).float() / n
    assert (freq - probs).abs().max() < 0.015  # 3 sigma of a 20k-draw frequency is < 0.011
    assert logprobs == pytest.approx(torch.log(probs[tokens]).tolist(), abs=1e-5)
    # top-p: only the smallest set of tokens whose mass reaches p; logprobs stay those before the cut
    nucleus = set(probs.argsort(descending=True)[: int((probs.sort(descending=True).values.cumsum(0) < 0.6).sum()) + 1].tolist())
    tokens, _ = _sample(_works(2000, top_p=0.6), logits.expand(2000, -1))
    assert set(tokens) == nucleus
    greedy, greedy_lp = _sample(_works(3, temperature=0.0), logits.expand(3, -1))
    assert greedy == [int(logits.argmax())] * 3 and greedy_lp[0] == pytest.approx(float(probs.max().log()), abs=1e-6)


def test_a_seeded_request_samples_the_same_alone_or_in_a_batch() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 50) * 3
    together, _ = _sample(_works(8, seed=10), logits)
    alone = [_sample(_works(1, seed=10 + i), logits[i : i + 1])[0][0] for i in range(8)]
    assert together == alone
