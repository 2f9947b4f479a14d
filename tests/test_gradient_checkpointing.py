"""``train.gradient_checkpointing``: every decoder layer recomputed in the backward, with the shared prompt
prefix still shared. Losses and gradients equal the plain computation; the forward keeps far less for the
backward; the layers really run twice."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from opd_agents.errors import ConfigError
from opd_agents.training.policy import SharedPrefix, StudentLogits, assistant_batch, checkpoint_layers
from opd_agents.training.view import TrainingView
from opd_agents.types import SamplingParams, Trajectory
from tests.test_rollout import make_rollout


@pytest.fixture(scope="module")
def episodes(tiny_model_dir: Any) -> list[Trajectory]:
    rollout, _, _ = make_rollout(tiny_model_dir, {"max_turns": 3}, SamplingParams(max_tokens_per_turn=16, seed=0))
    trajs = rollout.run([0, 1, 2, 3])
    rollout.close()
    return trajs


def step(model: Any, views: list[TrainingView], micro: int) -> tuple[float, dict[str, torch.Tensor], int, int]:
    """One training step as the trainer runs it (the step's prefix once, micro-batches on top): its loss,
    the parameters' gradients, the bytes autograd saved for the backward, and decoder-layer calls."""
    model.zero_grad(set_to_none=True)
    student = StudentLogits(model)
    saved, calls = [0], [0]
    weights = {p.data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:  # (a linear saves its weight: no memory of its own)
            saved[0] += t.numel() * t.element_size()
        return t

    hooks = [m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    total = 0.0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        shared = SharedPrefix.build(student, views)
        assert shared is not None
        for start in range(0, len(views), micro):
            batch = assistant_batch(student, views[start : start + micro], 0, shared)
            loss = -(batch.logprobs * batch.mask).sum()
            loss.backward()
            total += loss.item()
        shared.backward()
    for h in hooks:
        h.remove()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved[0], calls[0]


def test_checkpointed_layers_give_the_same_gradients_and_keep_less(tiny_model: Any,
                                                                   episodes: list[Trajectory]) -> None:
    model, _ = tiny_model
    model.train()
    views = [TrainingView.from_trajectory(t) for t in episodes]
    plain_loss, plain_grads, plain_saved, plain_calls = step(model, views, micro=2)
    checkpoint_layers(model)
    ckpt_loss, ckpt_grads, ckpt_saved, ckpt_calls = step(model, views, micro=2)

    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert ckpt_grads.keys() == plain_grads.keys() and len(plain_grads) == len(list(model.parameters()))
    worst = max(((ckpt_grads[n] - plain_grads[n]).abs().max() / plain_grads[n].abs().max().clamp(min=1e-8)).item()
                for n in plain_grads)
    assert worst < 1e-5  # the same arithmetic, run twice
    assert ckpt_calls == 2 * plain_calls  # every layer's forward ran again in the backward (prefix included)
    assert ckpt_saved < plain_saved / 2  # what the forward keeps: the layers' inputs, not their insides


def test_eval_mode_forwards_and_caches_are_untouched(tiny_model: Any, episodes: list[Trajectory]) -> None:
    """Sampling and scoring run the same model in eval mode: no recomputation, and a growing cache grows once."""
    model, _ = tiny_model
    checkpoint_layers(model)
    model.eval()
    ids = torch.tensor([episodes[0].prompt_ids])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    assert out.past_key_values.get_seq_length() == ids.shape[1]


def test_a_model_without_checkpointing_support_is_refused_before_training() -> None:
    class Plain(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        checkpoint_layers(Plain())  # type: ignore[arg-type]
