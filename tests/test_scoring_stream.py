"""The teacher scores finished episodes while the others still play (``ScoringStream``), and what it gives
equals one pass after the rollout."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from opd_agents import EnvLimits
from opd_agents.config import parse_config
from opd_agents.errors import ConfigError
from opd_agents.models import load_model
from opd_agents.teacher.hf import HFTeacher
from opd_agents.training.components import scores_while_rolling_out
from opd_agents.training.signal import ScoringStream, gather_teacher_signal
from opd_agents.types import SamplingParams, Trajectory
from tests.test_rollout import GatedEchoEnv, make_rollout


class GateOpeningTeacher(HFTeacher):
    """The real HF teacher, noting the seeds of each batch it scored; a batch without seed 0 opens
    ``GatedEchoEnv``'s gate, which seed 0's episode is waiting on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[int]] = []

    def _logits(self, trajs: Sequence[Trajectory]) -> Iterator[tuple[int, Any, torch.Tensor]]:
        yield from super()._logits(trajs)  # what score() and logits_for() both run on
        self.batches.append([t.seed for t in trajs])
        if 0 not in self.batches[-1]:
            GatedEchoEnv.gate.set()


@pytest.mark.parametrize("need", ["logits", "logprobs", "topk"])
def test_stream_scores_while_slow_episode_plays_and_equals_one_pass(tiny_model_dir: Path, tiny_teacher_dir: Path,
                                                                    need: Any) -> None:
    rollout, _, _ = make_rollout(tiny_model_dir, {"max_turns": 3}, SamplingParams(max_tokens_per_turn=8, seed=0))
    rollout.env_factory = lambda: GatedEchoEnv(limits=EnvLimits(max_turns=3))  # seed 0 waits for the teacher
    rollout.deterministic = False  # the others play on while seed 0's tool call waits
    model, tok = load_model(tiny_teacher_dir)
    teacher = GateOpeningTeacher(model, tok, batch_size=8)
    GatedEchoEnv.close_gate()
    stream = ScoringStream(teacher, need, top_k=4, chunk=1)
    trajs = rollout.run([0, 1, 2, 3], on_episode_end=stream.submit)
    streamed = stream.result()
    signal = gather_teacher_signal(teacher, trajs, None, need, 4, streamed=streamed)
    assert streamed.scored == signal.scored == {t.id for t in trajs}  # nothing was scored twice
    # The others were scored while seed 0's episode was still playing (it waited for exactly that).
    assert GatedEchoEnv.released == [True] and any(0 not in seeds for seeds in teacher.batches)
    expected = [[list(turn.teacher_logprobs) for turn in t.turns] for t in trajs]
    one_pass_teacher = HFTeacher(model, tok, batch_size=8)
    for t in trajs:
        for turn in t.turns:
            turn.teacher_logprobs = None
    one_pass = gather_teacher_signal(one_pass_teacher, trajs, None, need, 4)
    for t, lps in zip(trajs, expected, strict=True):
        assert signal.logprobs[t.id] == lps
        got = torch.tensor([x for turn in lps for x in turn])
        want = torch.tensor([x for turn in one_pass.logprobs[t.id] for x in turn])
        assert got.shape == want.shape and got.numel() > 0
        assert torch.allclose(got, want, atol=1e-4)
        if need == "logits":
            assert torch.allclose(signal.logits[t.id], one_pass.logits[t.id], atol=1e-4)
        if need == "topk":
            assert signal.topk_ids[t.id] == one_pass.topk_ids[t.id]
    assert signal.tokens_processed == one_pass.tokens_processed > 0


def test_stream_batches_by_arrival_in_chunks(tiny_model_dir: Path) -> None:
    """Fixed batches of ``chunk`` in arrival order, the rest at ``result()``: never what the worker happened
    to find waiting (teacher numerics depend on what shares a batch)."""
    model, tok = load_model(tiny_model_dir)
    rollout, _, _ = make_rollout(tiny_model_dir, {"max_turns": 1}, SamplingParams(max_tokens_per_turn=4, seed=0))
    trajs = rollout.run([3, 4, 5, 6, 7])
    teacher = GateOpeningTeacher(model, tok, batch_size=8)
    stream = ScoringStream(teacher, "logprobs", top_k=0, chunk=2)
    for t in trajs:
        stream.submit(t)
    assert stream.result().scored == {t.id for t in trajs}
    assert teacher.batches == [[3, 4], [5, 6], [7]]


def test_stream_raises_the_teachers_error_at_result(tiny_model_dir: Path) -> None:
    class BrokenTeacher(HFTeacher):
        def score(self, trajs: Sequence[Trajectory], top_k: int = 0) -> Any:
            raise RuntimeError("teacher server went away")

    model, tok = load_model(tiny_model_dir)
    rollout, _, _ = make_rollout(tiny_model_dir, {"max_turns": 1}, SamplingParams(max_tokens_per_turn=4, seed=0))
    stream = ScoringStream(BrokenTeacher(model, tok), "logprobs", top_k=0, chunk=1)
    rollout.run([1, 2], on_episode_end=stream.submit)  # the rollout itself finishes
    with pytest.raises(RuntimeError, match="went away"):
        stream.result()


@pytest.mark.parametrize(("teacher", "device", "expected"), [
    ({}, "cpu", False),  # auto, in-process on the CPU: no scoring thread beside the sampler
    ({"overlap": True}, "cpu", True),
    ({"backend": "server", "api_base": "http://127.0.0.1:9/v1"}, "cpu", True),  # another process scores
    ({}, "cuda", True),  # the hf teacher follows the run onto the GPU
    ({"device": "cuda:1"}, "cpu", True),
    ({"backend": "server", "api_base": "http://127.0.0.1:9/v1", "overlap": False}, "cpu", False),
])
def test_overlap_auto_is_off_only_for_an_in_process_cpu_teacher(teacher: dict[str, Any], device: str,
                                                                 expected: bool) -> None:
    cfg = parse_config({"env": {"id": "opd_agents/Arithmetic-v0"}, "teacher": teacher})
    assert scores_while_rolling_out(cfg, torch.device(device)) is expected


def test_overlap_rejects_other_values() -> None:
    with pytest.raises(ConfigError, match="overlap"):
        parse_config({"env": {"id": "opd_agents/Arithmetic-v0"}, "teacher": {"overlap": "sometimes"}})
