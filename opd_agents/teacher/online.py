"""Turn-by-turn teacher scoring during a rollout, reusing the teacher's KV cache (rollout-time truncation).

The teacher keeps one cached batch of the live episodes, like the student's sampler: each turn it is fed
only what is new (the previous observation ids and the turn's sampled ids), so scoring an episode as it
grows costs one pass over its tokens in total, O(T·L), instead of re-reading the prefix every turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from opd_agents.rollout.sampler import KVBatch
from opd_agents.types import Trajectory


class OnlineTeacher:
    """Scores each new turn of every live episode with an in-process teacher model.

    ``keep_logits``: also keep the teacher's full-vocabulary logits at every scored token (what forward
    KL / JSD need), so the trainer needs no second teacher pass after the rollout; ``take_logits()``
    hands them over per trajectory, in the layout of ``HFTeacher.logits_for``. ``keep_topk``: also keep the
    teacher's top-k token ids at every scored token (what top-k divergence policies read); ``take_topk()``.
    """

    def __init__(self, model: PreTrainedModel, pad_token_id: int,
                 prompt_ids: Callable[[Trajectory], list[int]] | None = None, keep_logits: bool = False,
                 keep_topk: int = 0) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.prompt_ids = prompt_ids or (lambda t: list(t.prompt_ids))  # privileged view: another prompt
        self.keep_logits = keep_logits
        self.keep_topk = keep_topk
        self.batch: KVBatch | None = None
        self.pending: list[list[int]] = []
        self.live_ids: list[str] = []  # trajectory id of each live row
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.topk: dict[str, list[list[list[int]]]] = {}  # per trajectory, per turn, per token: top-k ids
        self.tokens_processed = 0

    def begin(self, trajs: Sequence[Trajectory]) -> None:
        self.batch = KVBatch(self.model, self.pad_token_id)
        self.pending = [self.prompt_ids(t) for t in trajs]
        self.live_ids = [t.id for t in trajs]
        if self.keep_logits:  # only then does take_logits() empty this dict each step
            self.logits.update({t.id: [] for t in trajs})
        if self.keep_topk:
            self.topk.update({t.id: [] for t in trajs})

    def take_logits(self) -> dict[str, torch.Tensor]:
        """[assistant tokens, V] teacher logits per trajectory scored since the last call (then forgotten)."""
        width = next((parts[0].shape[-1] for parts in self.logits.values() if parts), self.model.config.vocab_size)
        rows = {tid: torch.cat(parts) if parts else torch.empty(0, width) for tid, parts in self.logits.items()}
        self.logits = {}
        return rows

    def take_topk(self) -> dict[str, list[list[list[int]]]]:
        """Per trajectory scored since the last call: the teacher's top-k ids per turn and token."""
        out, self.topk = self.topk, {}
        return out

    @torch.no_grad()
    def score(self, turns: Sequence[Sequence[int]]) -> list[list[float]]:
        """log pi_T of each row's new turn tokens (rows = the live episodes, in batch order)."""
        assert self.batch is not None, "begin() first"
        chunks = [[*p, *t] for p, t in zip(self.pending, turns, strict=True)]
        self.tokens_processed += sum(len(c) for c in chunks)
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.batch.extend(chunks, all_logits=True)  # [B, W, V], each row right-aligned
        finally:
            self.model.train(was_training)
        logp = torch.log_softmax(logits, dim=-1)
        width = logits.shape[1]
        out = []
        for row, turn in enumerate(turns):
            n = len(turn)
            # Position width-1-n predicts the turn's first token; the last token's own logits are unused.
            pos = torch.arange(width - 1 - n, width - 1)
            ids = torch.tensor(list(turn), dtype=torch.long)
            out.append(logp[row, pos, ids].tolist())
            if self.keep_logits:
                self.logits[self.live_ids[row]].append(logits[row, pos].float())
            if self.keep_topk:
                self.topk[self.live_ids[row]].append(logits[row, pos].topk(self.keep_topk, dim=-1).indices.tolist())
        self.pending = [[] for _ in turns]
        return out

    def observe(self, row_observations: Sequence[Sequence[int]]) -> None:
        """The observation ids that follow each live row's turn (fed with the next turn)."""
        self.pending = [list(o) for o in row_observations]

    def keep(self, rows: Sequence[int]) -> None:
        assert self.batch is not None
        self.batch.keep(rows)
        self.pending = [self.pending[r] for r in rows]
        self.live_ids = [self.live_ids[r] for r in rows]
