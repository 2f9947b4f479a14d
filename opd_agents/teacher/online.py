"""Turn-by-turn teacher scoring during a rollout, reusing the teacher's KV cache (rollout-time truncation).

The teacher model sits behind its own ``HFEngine``: each episode's turn is scored with a ``ScoreRequest``
on the episode's session, so only what is new (the previous observation ids and the turn's sampled ids) is
fed, and scoring an episode as it grows costs one pass over its tokens in total, O(T·L), instead of
re-reading the prefix every turn. Turns of different episodes that arrive together share a forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from opd_agents.rollout.hf_engine import HFEngine, ScoreRequest
from opd_agents.rollout.renderer import Renderer
from opd_agents.types import Trajectory


class OnlineTeacher:
    """Scores each new turn of every live episode with an in-process teacher model.

    ``keep_logits``: also keep the teacher's full-vocabulary logits at every scored token (what forward
    KL / JSD need), so the trainer needs no second teacher pass after the rollout; ``take_logits()``
    hands them over per trajectory, in the layout of ``HFTeacher.logits_for``. ``keep_topk``: also keep the
    teacher's top-k token ids at every scored token (what top-k divergence policies read); ``take_topk()``.
    """

    def __init__(self, model: PreTrainedModel, renderer: Renderer,
                 prompt_ids: Callable[[Trajectory], list[int]] | None = None, keep_logits: bool = False,
                 keep_topk: int = 0) -> None:
        self.engine = HFEngine(model, renderer)
        self.prompt_ids = prompt_ids or (lambda t: list(t.prompt_ids))  # privileged view: another prompt
        self.keep_logits = keep_logits
        self.keep_topk = keep_topk
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.topk: dict[str, list[list[list[int]]]] = {}  # per trajectory, per turn, per token: top-k ids

    @property
    def tokens_processed(self) -> int:
        return self.engine.tokens_fed

    async def score_turn(self, traj_id: str, ids: Sequence[int], n_turn: int) -> list[float]:
        """log pi_T of the last ``n_turn`` ids of the episode's teacher sequence ``ids`` (its new turn)."""
        model = self.engine.model
        was_training = model.training
        model.eval()
        try:
            scores = await self.engine.score(ScoreRequest(list(ids), n_turn, session=traj_id,
                                                          keep_logits=self.keep_logits, keep_topk=self.keep_topk))
        finally:
            model.train(was_training)
        if scores.logits is not None:
            self.logits.setdefault(traj_id, []).append(scores.logits)
        if scores.topk is not None:
            self.topk.setdefault(traj_id, []).append(scores.topk)
        return scores.logprobs

    def release(self, traj_id: str) -> None:
        self.engine.release(traj_id)

    def take_logits(self) -> dict[str, torch.Tensor]:
        """[assistant tokens, V] teacher logits per trajectory scored since the last call (then forgotten)."""
        rows = {tid: torch.cat(parts) for tid, parts in self.logits.items()}
        self.logits = {}
        return rows

    def take_topk(self) -> dict[str, list[list[list[int]]]]:
        """Per trajectory scored since the last call: the teacher's top-k ids per turn and token."""
        out, self.topk = self.topk, {}
        return out

    def close(self) -> None:
        self.engine.close()
