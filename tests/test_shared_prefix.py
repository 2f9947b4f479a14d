"""The batch's common prompt prefix runs once, in the teacher pass and in the student's forward/backward,
and the results equal the plain computation (each trajectory alone)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from opd_agents.rollout.kv import MIN_SHARED_PREFIX, common_prefix_len
from opd_agents.teacher import HFTeacher
from opd_agents.training.policy import assistant_batch
from opd_agents.training.view import TrainingView
from opd_agents.types import SamplingParams, Trajectory
from tests.test_rollout import make_rollout


@pytest.fixture(scope="module")
def episodes(tiny_model_dir: Any) -> list[Trajectory]:
    rollout, _, _ = make_rollout(tiny_model_dir, {"max_turns": 3}, SamplingParams(max_tokens_per_turn=16, seed=0))
    trajs = rollout.run([0, 1, 2, 3])
    rollout.close()
    assert common_prefix_len([t.prompt_ids for t in trajs]) >= MIN_SHARED_PREFIX  # system prompt + tool schema
    return trajs


def spy(monkeypatch: pytest.MonkeyPatch, module: str) -> list[int]:
    """Record the prefix length of every shared-prefix forward ``module`` runs."""
    import opd_agents.rollout.kv as kv

    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[3])
        return kv.forward_shared_prefix(*args, **kwargs)

    monkeypatch.setattr(f"{module}.forward_shared_prefix", counted)
    return calls


def test_teacher_pass_with_a_shared_prefix_equals_one_by_one(tiny_model: Any, episodes: list[Trajectory],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny_model
    calls = spy(monkeypatch, "opd_agents.teacher.hf")
    together = HFTeacher(model, tok, batch_size=4).logits_for(episodes)
    assert len(calls) == 1 and calls[0] >= MIN_SHARED_PREFIX
    alone = HFTeacher(model, tok, batch_size=1).logits_for(episodes)
    assert len(calls) == 1  # a batch of one has nothing to share
    assert max((a - b).abs().max().item() for a, b in zip(together, alone, strict=True)) < 1e-4


def test_student_forward_and_backward_with_a_shared_prefix_equal_one_by_one(
        tiny_model: Any, episodes: list[Trajectory], monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = tiny_model
    calls = spy(monkeypatch, "opd_agents.training.policy")
    model.train()
    views = [TrainingView.from_trajectory(t) for t in episodes]
    pad = 0

    def loss_and_grads(groups: list[list[TrainingView]]) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        total = 0.0
        for group in groups:
            batch = assistant_batch(model, group, pad)
            loss = -(batch.logprobs * batch.mask).sum()
            loss.backward()
            total += loss.item()
        return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared_loss, shared_grads = loss_and_grads([views])
    assert len(calls) == 1 and calls[0] >= MIN_SHARED_PREFIX
    alone_loss, alone_grads = loss_and_grads([[v] for v in views])
    assert shared_loss == pytest.approx(alone_loss, rel=1e-5)
    assert shared_grads.keys() == alone_grads.keys()
    worst = max(((shared_grads[n] - alone_grads[n]).abs().max() / alone_grads[n].abs().max().clamp(min=1e-8)).item()
                for n in alone_grads)
    assert worst < 1e-4  # relative to each parameter's largest gradient entry
