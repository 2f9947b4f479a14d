"""The batch's common prompt prefix runs once, in the teacher pass and in the student's forward/backward,
and the results equal the plain computation (each trajectory alone)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from opd_agents.rollout.kv import MIN_SHARED_PREFIX, common_prefix_len
from opd_agents.teacher import HFTeacher
from opd_agents.training.policy import SharedPrefix, StudentLogits, assistant_batch
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


def test_teacher_keeps_the_prefix_for_later_batches_of_one_until_its_weights_change(
        tiny_model: Any, episodes: list[Trajectory], monkeypatch: pytest.MonkeyPatch) -> None:
    """Episodes scored one by one as they finish (the scoring stream) reuse the prompt prefix's keys/values
    computed for an earlier batch: one prefix forward for the run, results equal to plain passes. A change
    of the teacher's weights (self-distillation: the teacher is the student) drops the cache."""
    import opd_agents.rollout.kv as kv

    model, tok = tiny_model
    computed: list[int] = []
    real = kv.prefix_session
    monkeypatch.setattr(kv, "prefix_session", lambda m, ids: computed.append(len(ids)) or real(m, ids))
    plain = HFTeacher(model, tok, batch_size=1).logits_for(episodes)
    assert computed == []  # batches of one alone never guess a prefix
    teacher = HFTeacher(model, tok, batch_size=4)
    teacher.logits_for(episodes)  # the prefix all four share
    teacher.batch_size = 1
    one_by_one = [teacher.logits_for([t])[0] for t in episodes]
    assert len(computed) == 1 and computed[0] >= MIN_SHARED_PREFIX
    assert max((a - b).abs().max().item() for a, b in zip(one_by_one, plain, strict=True)) < 1e-4
    with torch.no_grad():
        next(model.parameters()).add_(0.0)  # an in-place update, as an optimizer step makes
    teacher.logits_for(episodes[:1])
    assert len(computed) == 1  # stale: dropped, and a batch of one does not rebuild it
    teacher.batch_size = 2
    teacher.logits_for(episodes[:2])
    assert len(computed) == 2


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


def test_a_steps_prefix_run_once_for_all_micro_batches_gives_the_same_gradients(
        tiny_model: Any, episodes: list[Trajectory], monkeypatch: pytest.MonkeyPatch) -> None:
    """Micro-batches of one step read the step's prefix computed once (``SharedPrefix``): the loss and every
    parameter's gradient equal those of feeding each trajectory whole, and no micro-batch runs its own."""
    model, _ = tiny_model
    calls = spy(monkeypatch, "opd_agents.training.policy")
    model.train()
    student = StudentLogits(model)
    views = [TrainingView.from_trajectory(t) for t in episodes]

    def loss_and_grads(micro: int, share_step: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        shared = SharedPrefix.build(student, views) if share_step else None
        total = 0.0
        for start in range(0, len(views), micro):
            batch = assistant_batch(student, views[start : start + micro], 0, shared)
            loss = -(batch.logprobs * batch.mask).sum()
            loss.backward()
            total += loss.item()
        if shared is not None:
            shared.backward()
        return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    step_loss, step_grads = loss_and_grads(micro=1, share_step=True)
    assert calls == len(views) * [calls[0]] and calls[0] >= MIN_SHARED_PREFIX
    alone_loss, alone_grads = loss_and_grads(micro=1, share_step=False)
    assert len(calls) == len(views)  # fed whole: no further shared-prefix forwards
    assert step_loss == pytest.approx(alone_loss, rel=1e-5)
    assert step_grads.keys() == alone_grads.keys()
    worst = max(((step_grads[n] - alone_grads[n]).abs().max() / alone_grads[n].abs().max().clamp(min=1e-8)).item()
                for n in alone_grads)
    assert worst < 1e-4
