from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd_agents.training.view import TrainingView, collate, token_logprobs
from opd_agents.types import Trajectory, Turn


def two_turn_traj(teacher: bool = True) -> Trajectory:
    return Trajectory(
        env_id="e", task_id="t", seed=0, prompt_ids=[10, 11, 12],
        turns=[
            Turn(index=0, token_ids=[20, 21], sampling_logprobs=[-0.1, -0.2], text="a", finish="tool_call",
                 observation_ids=[30, 31, 32], teacher_logprobs=[-0.3, -0.4] if teacher else None, weight=1.0),
            Turn(index=1, token_ids=[40, 41, 42], sampling_logprobs=[-0.5, -0.6, -0.7], text="b", finish="stop",
                 teacher_logprobs=[-0.8, -0.9, -1.0] if teacher else None, weight=0.5),
        ],
    )


def test_alignment_two_turns() -> None:
    v = TrainingView.from_trajectory(two_turn_traj())
    assert v.input_ids == [10, 11, 12, 20, 21, 30, 31, 32, 40, 41, 42]
    assert v.loss_mask == [0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    assert v.sampling_logprobs == [0.0, 0.0, 0.0, -0.1, -0.2, 0.0, 0.0, 0.0, -0.5, -0.6, -0.7]
    assert v.teacher_logprobs == [0.0, 0.0, 0.0, -0.3, -0.4, 0.0, 0.0, 0.0, -0.8, -0.9, -1.0]
    assert v.turn_index == [-1, -1, -1, 0, 0, -1, -1, -1, 1, 1, 1]
    assert v.token_weights == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5]
    assert v.has_teacher is True and len(v) == 11


def test_view_length_matches_trajectory_token_count() -> None:
    traj = two_turn_traj()
    v = TrainingView.from_trajectory(traj)
    assert len(v) == traj.num_tokens and sum(v.loss_mask) == traj.num_assistant_tokens
    assert v.trajectory_id == traj.id


def test_without_teacher_and_partial_teacher() -> None:
    v = TrainingView.from_trajectory(two_turn_traj(teacher=False))
    assert v.has_teacher is False and v.teacher_logprobs == [0.0] * 11
    partial = two_turn_traj()
    partial.turns[1].teacher_logprobs = None
    v = TrainingView.from_trajectory(partial)
    assert v.has_teacher is False
    assert v.teacher_logprobs == [0.0, 0.0, 0.0, -0.3, -0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_no_turns() -> None:
    v = TrainingView.from_trajectory(Trajectory(env_id="e", task_id="t", seed=0, prompt_ids=[1, 2]))
    assert v.input_ids == [1, 2] and v.loss_mask == [0, 0] and v.has_teacher is True


def test_mismatched_sampling_logprobs() -> None:
    traj = two_turn_traj()
    traj.turns[1].sampling_logprobs = [-0.5, -0.6]
    with pytest.raises(ValueError, match=rf"trajectory {traj.id} turn 1: 2 sampling_logprobs for 3 token_ids"):
        TrainingView.from_trajectory(traj)


def test_mismatched_teacher_logprobs() -> None:
    traj = two_turn_traj()
    traj.turns[0].teacher_logprobs = [-0.3, -0.4, -0.5]
    with pytest.raises(ValueError, match="turn 0: 3 teacher_logprobs for 2 token_ids"):
        TrainingView.from_trajectory(traj)


def test_collate_pads_right() -> None:
    long = TrainingView.from_trajectory(two_turn_traj())
    short_traj = Trajectory(env_id="e", task_id="s", seed=1, prompt_ids=[7, 8], turns=[
        Turn(index=0, token_ids=[9], sampling_logprobs=[-2.0], text="c", finish="stop")])
    short = TrainingView.from_trajectory(short_traj)
    batch = collate([long, short], pad_token_id=99)
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask", "sampling_logprobs", "teacher_logprobs",
                          "turn_index", "token_weights", "has_teacher"}
    for key in ("input_ids", "attention_mask", "loss_mask", "sampling_logprobs", "teacher_logprobs",
                "turn_index", "token_weights"):
        assert batch[key].shape == (2, 11), key
    assert batch["input_ids"].dtype == torch.long and batch["turn_index"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.float32 and batch["sampling_logprobs"].dtype == torch.float32
    assert batch["input_ids"][0].tolist() == long.input_ids
    assert batch["input_ids"][1].tolist() == [7, 8, 9] + [99] * 8
    assert batch["attention_mask"].sum(dim=1).tolist() == [11, 3]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 8
    assert batch["loss_mask"][1].tolist() == [0.0, 0.0, 1.0] + [0.0] * 8
    assert batch["sampling_logprobs"][1].tolist() == [0.0, 0.0, -2.0] + [0.0] * 8
    assert batch["turn_index"][1].tolist() == [-1, -1, 0] + [-1] * 8
    assert batch["token_weights"][1].tolist() == [0.0, 0.0, 1.0] + [0.0] * 8
    assert torch.allclose(batch["teacher_logprobs"][0], torch.tensor(long.teacher_logprobs))
    assert batch["has_teacher"].tolist() == [True, False]


def test_collate_empty() -> None:
    with pytest.raises(ValueError, match="at least one"):
        collate([], pad_token_id=0)


def test_token_logprobs_convention() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    lp = token_logprobs(logits, ids)
    assert lp.shape == (2, 5)
    assert lp[:, 0].tolist() == [0.0, 0.0]  # position 0 has no prediction
    for b in range(2):
        for i in range(1, 5):  # logits at i-1 predict token i
            expected = torch.log_softmax(logits[b, i - 1], dim=-1)[ids[b, i]]
            assert torch.isclose(lp[b, i], expected)


def test_view_logprobs_match_a_forward_pass(tiny_model: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    """Sampling logprobs recorded in the view's convention equal a training forward pass on the view."""
    model, _ = tiny_model
    prompt, turn_ids = [1, 4093, 198], [17, 23, 2]
    ids = torch.tensor([prompt + turn_ids])
    with torch.no_grad():
        lp = token_logprobs(model(ids).logits, ids)[0]
    traj = Trajectory(env_id="e", task_id="t", seed=0, prompt_ids=prompt, turns=[
        Turn(index=0, token_ids=turn_ids, sampling_logprobs=lp[3:].tolist(), text="x", finish="stop")])
    batch = collate([TrainingView.from_trajectory(traj)], pad_token_id=2)
    with torch.no_grad():
        recomputed = token_logprobs(model(batch["input_ids"]).logits, batch["input_ids"])
    mask = batch["loss_mask"].bool()
    assert torch.allclose(recomputed[mask], batch["sampling_logprobs"][mask], atol=1e-5)
