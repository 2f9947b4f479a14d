"""In-process transformers teacher: exact log-probs and full-vocabulary logits at the student's tokens.

Trajectories are sorted by length and fed ``batch_size`` at a time, RIGHT-padded with an attention mask:
for a causal model right padding leaves every real token at its unpadded position (0..L-1) and the pads
are only ever attended to by pads, so each row's logits equal an unpadded pass over its own ids.
Only the logits at the positions that predict student tokens (p - 1 for token p) are computed
(``logits_to_keep``) and turned into log-probs, so memory is [student tokens, V], not [B, T, V].
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd_agents.models import load_model
from opd_agents.rollout.kv import PrefixCache, forward_shared_prefix
from opd_agents.rollout.renderer import Renderer
from opd_agents.teacher.base import PrivilegedFn, Teacher, TeacherScores, TeacherSequence
from opd_agents.types import Trajectory


class HFTeacher(Teacher):
    """A transformers causal LM as the teacher.

    ``model_or_path``: a loaded model, e.g. a PreTrainedModel or a peft-wrapped one (used as is: its device
    and dtype are kept, and train mode is restored after scoring, so the student itself can serve as a
    privileged self-distillation teacher), or a model directory / built-in name (loaded with ``device``
    and ``dtype``).
    """

    def __init__(
        self,
        model_or_path: PreTrainedModel | torch.nn.Module | str | os.PathLike[str],
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
        renderer: Renderer | None = None,
        privileged: PrivilegedFn | None = None,
        teacher_id: str | None = None,
    ) -> None:
        if isinstance(model_or_path, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("HFTeacher with an in-memory model needs its tokenizer")
            model = model_or_path
        else:
            model, loaded_tok = load_model(model_or_path, dtype=dtype, device=device)
            tokenizer = tokenizer or loaded_tok
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        name = getattr(getattr(model, "config", None), "name_or_path", None)
        super().__init__(teacher_id or str(name or type(model).__name__), renderer, privileged)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)  # any id works: pads are masked and never read
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._prefix = PrefixCache(model)

    # ---- public ----------------------------------------------------------------------------------
    def score(self, trajs: Sequence[Trajectory], top_k: int = 0) -> list[TeacherScores]:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        out = [TeacherScores.empty(t, top_k) for t in trajs]  # kept for trajectories without turns
        for i, seq, logits in self._logits(trajs):
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(seq.target_ids, dtype=torch.long, device=logp.device)
            lps = logp.gather(1, target[:, None]).squeeze(1).tolist()
            s = TeacherScores(logprobs=seq.split(lps), tokens_processed=len(seq.input_ids))
            if top_k > 0:
                vals, ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
                s.topk_ids, s.topk_logprobs = seq.split(ids.tolist()), seq.split(vals.tolist())
            out[i] = s
        return out

    def logits_for(self, trajs: Sequence[Trajectory]) -> list[Tensor]:
        """Teacher logits (fp32, no grad) for full-vocabulary losses: per trajectory a [n, V] tensor whose
        row j predicts the j-th student-sampled token (turns in order), i.e. the rows line up with the
        ``loss_mask == 1`` positions of the trajectory's TrainingView. Raw logits: apply log_softmax (and any
        temperature) yourself."""
        out: list[Tensor | None] = [None] * len(trajs)
        for i, _, logits in self._logits(trajs):
            out[i] = logits
        width = next((t.shape[-1] for t in out if t is not None), None)
        if width is None:  # nothing scored at all: fall back to the configured vocabulary
            width = getattr(getattr(self.model, "config", None), "vocab_size", None) or len(self.tokenizer)
        return [t if t is not None else torch.empty(0, width) for t in out]

    # ---- internals ---------------------------------------------------------------------------------
    def _logits(self, trajs: Sequence[Trajectory]) -> Iterator[tuple[int, TeacherSequence, Tensor]]:
        """(trajectory index, its teacher sequence, [n_student_tokens, V] fp32 logits), batch by batch."""
        seqs = [self.view.build(t) for t in trajs]
        todo = [i for i, s in enumerate(seqs) if s.positions]
        todo.sort(key=lambda i: len(seqs[i].input_ids), reverse=True)  # similar lengths share a batch
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            batch = [seqs[i] for i in idx]
            yield from zip(idx, batch, self._forward(batch), strict=True)

    @torch.no_grad()
    def _forward(self, batch: Sequence[TeacherSequence]) -> list[Tensor]:
        """One forward pass over a right-padded batch; logits at every position predicting a student token."""
        device = next(self.model.parameters()).device
        width = max(len(s.input_ids) for s in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, s in enumerate(batch):
            ids[r, : len(s.input_ids)] = torch.tensor(s.input_ids, dtype=torch.long)
            mask[r, : len(s.input_ids)] = 1
        rows = torch.cat([torch.full((len(s.positions),), r, dtype=torch.long) for r, s in enumerate(batch)])
        was_training = self.model.training
        self.model.eval()
        try:
            # The prompt prefix the rows share (system prompt + tool schemas; with group sampling the whole
            # task prompt) is computed once and kept while the weights stay the same; every column read
            # below lies after it.
            cached = self._prefix.lookup([s.input_ids for s in batch], min(min(s.positions) for s in batch) - 1)
            prefix = len(cached.tokens) if cached is not None else 0
            cols = torch.cat([torch.tensor(s.positions, dtype=torch.long) - 1 for s in batch]) - prefix
            kwargs = {}
            if self._keeps_logits:  # compute the LM head only on the columns some row needs
                keep = torch.unique(cols)
                kwargs["logits_to_keep"] = keep.to(device)
                cols = torch.searchsorted(keep, cols)
            if cached is not None:
                out = forward_shared_prefix(self.model, ids.to(device), mask.to(device), prefix, cached, **kwargs)
            else:
                out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs)
            logits = out.logits
        finally:
            self.model.train(was_training)
        picked = logits[rows.to(device), cols.to(device)].float()
        return list(picked.split([len(s.positions) for s in batch]))
