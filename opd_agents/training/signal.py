"""The teacher's signal for one training step: one typed object, and the one function that decides where it
comes from.

Sources, cheapest first: the online teacher (it scored every turn during the rollout, keeping full logits or
top-k ids when asked); else a ``ScoringStream`` (it scored episodes as they finished, while the others still
played); else one full-logits pass (the loss's distributions and the sampled-token logprobs at once); else
sampled-token (or top-k) scoring. Whatever the source, the sampled-token logprobs are also on the turns
(``turn.teacher_logprobs``: telemetry and the stores read them there).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from opd_agents.teacher import Teacher, TeacherScores, apply_scores
from opd_agents.teacher.online import OnlineTeacher
from opd_agents.training.losses import TeacherTensors
from opd_agents.training.policies.base import Needs
from opd_agents.training.policy import AssistantBatch, pad_rows
from opd_agents.types import Trajectory


@dataclass
class TeacherSignal:
    """What the teacher gave for a step's trajectories, per trajectory id (each dict holds only the
    trajectories it was obtained for). Per-token lists are per turn, aligned with ``turn.token_ids``."""

    logprobs: dict[str, list[list[float]]] = field(default_factory=dict)  # log pi_T of the sampled tokens
    logits: dict[str, Tensor] = field(default_factory=dict)  # [assistant tokens, V] full-vocabulary logits
    topk_ids: dict[str, list[list[list[int]]]] = field(default_factory=dict)  # scored top-k, best first
    topk_logprobs: dict[str, list[list[list[float]]]] = field(default_factory=dict)
    online_topk_ids: dict[str, list[list[list[int]]]] = field(default_factory=dict)  # the policies' width
    tokens_processed: int = 0  # teacher tokens read after the rollout (or while it ran, by a stream)
    scored: set[str] = field(default_factory=set)  # trajectories scored here (not by the online teacher)

    def merge(self, other: TeacherSignal) -> None:
        """Take ``other``'s trajectories in (signals of disjoint trajectories)."""
        for name in ("logprobs", "logits", "topk_ids", "topk_logprobs", "online_topk_ids"):
            getattr(self, name).update(getattr(other, name))
        self.tokens_processed += other.tokens_processed
        self.scored |= other.scored

    def policy_topk_ids(self, traj: Trajectory, k: int) -> list[list[list[int]]] | None:
        """The teacher's top-k ids that divergence policies read: from the logits rows when there are any
        (free), else the online teacher's, else the scored ones."""
        if traj.id in self.logits:
            return split_turns(traj, self.logits[traj.id].topk(k, dim=-1).indices.tolist())
        return self.online_topk_ids.get(traj.id, self.topk_ids.get(traj.id))

    def tensors(self, micro: Sequence[Trajectory], batch: AssistantBatch, needs: Needs, top_k: int) -> TeacherTensors:
        """The micro-batch's rows of what a loss ``needs``, padded to ``batch``'s [B, N] grid on its device
        (top-k lists cut to the loss's ``top_k``: a policy may have asked for wider ones)."""
        width, device = batch.logits.shape[1], batch.logits.device
        if needs == "logprobs":
            rows = [torch.tensor([x for turn in self.logprobs[t.id] for x in turn], dtype=torch.float32) for t in micro]
            return TeacherTensors(logprobs=pad_rows(rows, width).to(device))
        if needs == "logits":
            return TeacherTensors(logits=pad_rows([self.logits[t.id].to(device, batch.logits.dtype) for t in micro],
                                                  width))
        if needs == "topk":
            ids = [torch.tensor([pos[:top_k] for turn in self.topk_ids[t.id] for pos in turn], dtype=torch.long)
                   for t in micro]
            lps = [torch.tensor([pos[:top_k] for turn in self.topk_logprobs[t.id] for pos in turn],
                                dtype=torch.float32) for t in micro]
            return TeacherTensors(topk_ids=pad_rows(ids, width, 0).to(device),
                                  topk_logprobs=pad_rows(lps, width, -1e4).to(device))
        return TeacherTensors()


def gather_teacher_signal(teacher: Teacher, trajs: Sequence[Trajectory], online: OnlineTeacher | None,
                          need: Needs, top_k: int, streamed: TeacherSignal | None = None) -> TeacherSignal:
    """Get what a step reads from the teacher, reading each token once.

    ``need``: "logits" (a full-vocabulary loss), "topk" (top-k ids and logprobs), "logprobs" (sampled
    tokens) or "none". ``top_k``: the width to score at (the widest the loss or a policy reads). ``online``:
    the teacher that scored the batch's turns during the rollout, None when the batch was not sampled with
    it (off-policy batches). ``streamed``: what a ``ScoringStream`` already scored during the rollout."""
    signal = TeacherSignal()
    rows = online.take_logits() if online is not None and online.keep_logits else {}
    signal.online_topk_ids = online.take_topk() if online is not None and online.keep_topk else {}
    # The online teacher keeps the policies' top-k ids but not the top-k logprobs a top-k loss needs.
    scored_online = online is not None and need != "topk" and all(
        turn.teacher_logprobs is not None for t in trajs for turn in t.turns)
    if need == "logits" and scored_online and all(t.id in rows for t in trajs):
        signal.logits = rows
    elif need != "none" and (need == "logits" or not scored_online):
        if streamed is not None:
            signal.merge(streamed)
        rest = [t for t in trajs if t.id not in signal.scored]
        if rest:
            signal.merge(score_batch(teacher, rest, need, top_k))
    for t in trajs:
        lps = [turn.teacher_logprobs for turn in t.turns if turn.teacher_logprobs is not None]
        if len(lps) == len(t.turns):  # a trajectory is scored whole or not at all
            signal.logprobs[t.id] = lps
    return signal


def score_batch(teacher: Teacher, trajs: Sequence[Trajectory], need: Needs, top_k: int) -> TeacherSignal:
    """Score ``trajs`` after their rollout: one full-logits pass for ``need == "logits"``, else sampled-token
    (and top-k) scoring; the sampled-token logprobs land on the turns either way."""
    signal = TeacherSignal(scored={t.id for t in trajs})
    if need == "logits":
        signal.logits, signal.tokens_processed = _full_logits_pass(teacher, trajs)
    elif need != "none":
        scores = teacher.score_and_apply(trajs, top_k=top_k)
        for t, s in zip(trajs, scores, strict=True):
            if s.topk_ids is not None and s.topk_logprobs is not None:
                signal.topk_ids[t.id], signal.topk_logprobs[t.id] = s.topk_ids, s.topk_logprobs
        signal.tokens_processed = sum(s.tokens_processed for s in scores)
    return signal


class ScoringStream:
    """Scores episodes as they finish, while the rest of the rollout still plays (``Rollout.run``'s
    ``on_episode_end``): every ``chunk`` episodes, in the order they arrive, go to one worker thread as one
    batch, so the teacher still batches and its pass over the first episodes hides behind the generation of
    the last ones. The batches depend on the arrival order only (a deterministic rollout makes that the same
    in every run), never on how busy the worker was: teacher numerics depend on what shares a batch.
    ``result()`` scores the rest and waits."""

    def __init__(self, teacher: Teacher, need: Needs, top_k: int, chunk: int) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.teacher, self.need, self.top_k, self.chunk = teacher, need, top_k, chunk
        self._pending: list[Trajectory] = []
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-teacher")
        self._batches: list[Future[TeacherSignal]] = []

    def submit(self, traj: Trajectory) -> None:
        self._pending.append(traj)
        if len(self._pending) >= self.chunk:
            self._dispatch()

    def _dispatch(self) -> None:
        batch, self._pending = self._pending, []
        self._batches.append(self._worker.submit(score_batch, self.teacher, batch, self.need, self.top_k))

    def result(self) -> TeacherSignal:
        """Every submitted episode's signal (a scoring error is raised here); the worker stops."""
        signal = TeacherSignal()
        try:
            if self._pending:
                self._dispatch()
            for batch in self._batches:
                signal.merge(batch.result())
        finally:
            self.close()
        return signal

    def close(self) -> None:
        """Stop the worker; batches not started yet are dropped (the rollout failed: nothing to score)."""
        self._worker.shutdown(wait=True, cancel_futures=True)


def _full_logits_pass(teacher: Teacher, trajs: Sequence[Trajectory]) -> tuple[dict[str, Tensor], int]:
    """Teacher logits at every student token, per trajectory, and the tokens read; fills turn.teacher_logprobs
    from them (no second pass)."""
    rows = teacher.logits_for(trajs)  # type: ignore[attr-defined]
    processed = 0
    for traj, row in zip(trajs, rows, strict=True):
        if not traj.turns:
            continue
        seq = teacher.view.build(traj)
        target = torch.tensor(seq.target_ids, dtype=torch.long, device=row.device)
        lps = torch.log_softmax(row, dim=-1).gather(1, target[:, None]).squeeze(1).tolist()
        apply_scores(traj, TeacherScores(logprobs=seq.split(lps), tokens_processed=len(seq.input_ids)),
                     teacher.teacher_id)
        processed += len(seq.input_ids)
    return {t.id: row for t, row in zip(trajs, rows, strict=True)}, processed


def split_turns(traj: Trajectory, flat: Sequence[Any]) -> list[list[Any]]:
    """Cut a per-assistant-token list into per-turn lists."""
    out, start = [], 0
    for turn in traj.turns:
        out.append(list(flat[start : start + len(turn.token_ids)]))
        start += len(turn.token_ids)
    return out
