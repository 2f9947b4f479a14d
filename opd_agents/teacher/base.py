"""What every teacher backend shares: the teacher's view of a trajectory, the scores it returns, the
tokenizer check and the backend config.

A teacher scores exactly the tokens the student sampled: log pi_T(y_t | prefix) for every assistant token
of every turn, from ONE forward pass over the whole trajectory (prompt, turns and observations in order),
never one pass per turn. Only the prompt may differ from the student's (privileged context); the
student's assistant and observation ids are reused verbatim.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import PreTrainedTokenizerBase

from opd_agents.errors import TokenizerMismatchError
from opd_agents.rollout.renderer import Renderer
from opd_agents.types import Message, Trajectory

# Extra context only the teacher sees (e.g. the task's reference solution), appended to its system message.
PrivilegedFn = Callable[[Trajectory], str]
T = TypeVar("T")


@dataclass
class TeacherScores:
    """Teacher scores of one trajectory, per turn and aligned with ``turn.token_ids``.

    ``topk_ids[k][t]`` / ``topk_logprobs[k][t]``: the teacher's top-k next-token distribution at the
    position that predicts token t of turn k (best first); None unless scored with ``top_k > 0``.
    """

    logprobs: list[list[float]]
    topk_ids: list[list[list[int]]] | None = None
    topk_logprobs: list[list[list[float]]] | None = None
    tokens_processed: int = 0  # teacher tokens fed for this trajectory (cost accounting)

    @classmethod
    def empty(cls, traj: Trajectory, top_k: int = 0) -> TeacherScores:
        """Scores of a trajectory with no sampled tokens (nothing is fed to the teacher)."""
        def per_turn() -> list[Any]:
            return [[] for _ in traj.turns]

        return cls(per_turn(), per_turn() if top_k else None, per_turn() if top_k else None)


@dataclass
class TeacherSequence:
    """The teacher's token sequence for one trajectory and where the student's tokens sit in it."""

    input_ids: list[int]
    positions: list[int]  # index in input_ids of every student-sampled token, turn by turn
    turn_lengths: list[int] = field(default_factory=list)

    @property
    def target_ids(self) -> list[int]:
        return [self.input_ids[p] for p in self.positions]

    def split(self, flat: Sequence[T]) -> list[list[T]]:
        """Cut a per-student-token list into per-turn lists."""
        out, start = [], 0
        for n in self.turn_lengths:
            out.append(list(flat[start : start + n]))
            start += n
        return out


class TeacherView:
    """Builds the teacher's sequence: teacher prompt + Σ (turn.token_ids + turn.observation_ids).

    Without ``privileged`` the teacher prompt is ``traj.prompt_ids``. With it, the opening messages (those
    before the first assistant message: system + user) are re-rendered with the extra text appended to the
    system message, and the positions shift by the change in prompt length.
    """

    def __init__(self, renderer: Renderer | None = None, privileged: PrivilegedFn | None = None) -> None:
        if privileged is not None and renderer is None:
            raise ValueError("a privileged-context teacher needs the renderer the student was rolled out with "
                             "(same template and tool-call parser), to re-render the prompt")
        self.renderer = renderer
        self.privileged = privileged

    def prompt_ids(self, traj: Trajectory) -> list[int]:
        if self.privileged is None:
            return list(traj.prompt_ids)
        assert self.renderer is not None
        opening = _opening_messages(traj)
        # Re-rendering the student's own opening must give back its prompt ids, or the renderer differs
        # from the one the student used and the teacher would see a different conversation.
        if self.renderer.prompt_ids(opening, traj.tool_schemas) != list(traj.prompt_ids):
            raise ValueError(f"trajectory {traj.id}: re-rendering its opening messages does not reproduce its "
                             f"prompt_ids; pass the renderer (tokenizer + tool-call parser) the student used")
        extra = self.privileged(traj)
        if not extra:
            return list(traj.prompt_ids)
        if opening and opening[0].role == "system":
            sys_msg = opening[0].model_copy(update={"content": f"{opening[0].content}\n\n{extra}"})
            opening = [sys_msg, *opening[1:]]
        else:
            opening = [Message(role="system", content=extra), *opening]
        return self.renderer.prompt_ids(opening, traj.tool_schemas)

    def build(self, traj: Trajectory) -> TeacherSequence:
        ids = self.prompt_ids(traj)
        if not ids:
            raise ValueError(f"trajectory {traj.id} has no prompt ids; the first sampled token needs a prefix")
        positions: list[int] = []
        for turn in traj.turns:
            positions.extend(range(len(ids), len(ids) + len(turn.token_ids)))
            ids.extend(turn.token_ids)
            ids.extend(turn.observation_ids)
        return TeacherSequence(ids, positions, [len(t.token_ids) for t in traj.turns])


def _opening_messages(traj: Trajectory) -> list[Message]:
    out = []
    for m in traj.messages:
        if m.role == "assistant":
            break
        out.append(m)
    return out


class Teacher(ABC):
    """A frozen teacher. ``score`` returns, per trajectory, log pi_T of every student-sampled token."""

    def __init__(self, teacher_id: str, renderer: Renderer | None = None,
                 privileged: PrivilegedFn | None = None) -> None:
        self.teacher_id = teacher_id
        self.view = TeacherView(renderer, privileged)

    @abstractmethod
    def score(self, trajs: Sequence[Trajectory], top_k: int = 0) -> list[TeacherScores]:
        """One forward pass per trajectory (batched across trajectories); all or nothing: on failure it
        raises instead of returning partial scores."""

    def score_and_apply(self, trajs: Sequence[Trajectory], top_k: int = 0) -> list[TeacherScores]:
        """``score`` then write the logprobs into the trajectories (top-k stays in the returned scores)."""
        scores = self.score(trajs, top_k)
        for traj, s in zip(trajs, scores, strict=True):
            apply_scores(traj, s, self.teacher_id)
        return scores

    def close(self) -> None:
        """Release the backend's resources (engines, pools). Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def apply_scores(traj: Trajectory, scores: TeacherScores, teacher_id: str) -> None:
    """Fill ``turn.teacher_logprobs`` / ``teacher_id`` of every turn (checked against the token counts first,
    so a mismatch leaves the trajectory untouched)."""
    if len(scores.logprobs) != len(traj.turns):
        raise ValueError(f"trajectory {traj.id}: {len(scores.logprobs)} scored turns for {len(traj.turns)} turns")
    for turn, lps in zip(traj.turns, scores.logprobs, strict=True):
        if len(lps) != len(turn.token_ids):
            raise ValueError(f"trajectory {traj.id} turn {turn.index}: {len(lps)} teacher logprobs for "
                             f"{len(turn.token_ids)} tokens")
    for turn, lps in zip(traj.turns, scores.logprobs, strict=True):
        turn.teacher_logprobs = list(lps)
        turn.teacher_id = teacher_id
    traj.teacher_id = teacher_id


# ---- vLLM prompt_logprobs ---------------------------------------------------------------------------
def parse_prompt_logprobs(
    prompt_logprobs: Sequence[dict[Any, Any] | None], seq: TeacherSequence, top_k: int
) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """Student-token logprobs (+ top-k ids/logprobs, best first) from vLLM's ``prompt_logprobs``: one entry
    per prompt token (the first is null), each ``{token_id: {logprob, rank, decoded_token}}`` holding the
    actual token and, with k > 0, the top-k. Through JSON (server) ids are strings and values dicts; from the
    offline engine ids are ints and values ``vllm.logprobs.Logprob`` objects. Both are accepted."""
    if len(prompt_logprobs) != len(seq.input_ids):
        raise ValueError(f"prompt_logprobs has {len(prompt_logprobs)} entries for {len(seq.input_ids)} prompt tokens")
    lps: list[float] = []
    top_ids: list[list[int]] = []
    top_lps: list[list[float]] = []
    for p in seq.positions:
        entry = {int(k): v for k, v in (prompt_logprobs[p] or {}).items()}
        tok = seq.input_ids[p]
        if tok not in entry:
            raise ValueError(f"prompt_logprobs at position {p} lacks the actual token {tok}")
        lps.append(float(_field(entry[tok], "logprob")))
        if top_k > 0:
            ranked = sorted(entry.items(), key=lambda kv: _field(kv[1], "rank") or math.inf)[:top_k]
            top_ids.append([k for k, _ in ranked])
            top_lps.append([float(_field(v, "logprob")) for _, v in ranked])
    return lps, top_ids, top_lps


def _field(value: Any, name: str) -> Any:
    return value.get(name) if isinstance(value, dict) else getattr(value, name, None)


# ---- tokenizer check -------------------------------------------------------------------------------
PROBE_TEXT = ('Hello, world! <|im_start|>user\n17*23 = ?<|im_end|>\n<tool_call>{"x": [1, 2.5]}</tool_call>'
              '\tdéjà vu 東京')


def _vocab_hash(tok: PreTrainedTokenizerBase) -> str:
    items = sorted(tok.get_vocab().items())
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def check_same_tokenizer(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase) -> None:
    """Raise TokenizerMismatchError unless both tokenizers map text and ids identically.

    Teacher scores are looked up by the student's token ids, so the vocabularies must be the same. Checks
    the size, the full token->id map, the special tokens and the encoding of a probe text (merge rules).
    The pad token is ignored: padding is never scored.
    """
    problems: list[str] = []
    if len(student_tok) != len(teacher_tok):
        problems.append(f"vocab size {len(student_tok)} (student) vs {len(teacher_tok)} (teacher)")
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        diff = sorted(set(sv.items()) ^ set(tv.items()))
        problems.append(f"{len(diff)} token->id entries differ (vocab hash {_vocab_hash(student_tok)} vs "
                        f"{_vocab_hash(teacher_tok)}; e.g. {diff[:3]})")
    for name in ("bos_token", "eos_token", "unk_token"):
        s, t = getattr(student_tok, name), getattr(teacher_tok, name)
        if s != t:
            problems.append(f"{name} {s!r} (student) vs {t!r} (teacher)")
    s_special = set(student_tok.all_special_tokens) - {student_tok.pad_token}
    t_special = set(teacher_tok.all_special_tokens) - {teacher_tok.pad_token}
    if s_special != t_special:
        problems.append(f"special tokens differ: only student {sorted(s_special - t_special)}, "
                        f"only teacher {sorted(t_special - s_special)}")
    if not problems:
        s_ids = student_tok.encode(PROBE_TEXT, add_special_tokens=False)
        t_ids = teacher_tok.encode(PROBE_TEXT, add_special_tokens=False)
        if s_ids != t_ids:
            problems.append(f"same vocabulary but a probe text tokenizes differently (merge rules or "
                            f"normalisation differ): {s_ids[:12]} vs {t_ids[:12]}")
    if problems:
        raise TokenizerMismatchError(
            "teacher and student tokenizers differ: " + "; ".join(problems) + ". On-policy distillation "
            "scores the student's token ids with the teacher, so both must share one tokenizer; "
            "opd-agents has no cross-tokenizer path. Use a teacher from the same model family."
        )


# ---- config ----------------------------------------------------------------------------------------
class TeacherConfig(BaseModel):
    """How to build a teacher (``make_teacher``). Field names match ``opd_agents.config.TeacherConfig``."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["hf", "server", "vllm"] = "hf"
    model: str = Field(..., description="hf/vllm: model dir or built-in name; server: the served model name")
    teacher_id: str | None = Field(None, description="recorded on scored turns; default: the model")
    # hf
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("float32", description=(
        "hf: the teacher's weights (it is frozen: no optimizer to protect); auto = bfloat16 where bf16 matmuls "
        "are native (GPUs, CPUs with AMX), else float32; vllm: passed to vLLM"))
    batch_size: int = Field(8, gt=0)
    # server
    api_base: str | list[str] | None = Field(None, description=(
        "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1, or a list of them: servers of the same "
        "model, load-balanced, each checked before any work, a failed request retried on another"))
    api_key: str = "x"
    concurrency: int = Field(4, gt=0)
    timeout_s: float = Field(30.0, gt=0, description="one scoring request")
    max_retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    score_timeout_s: float = Field(60.0, gt=0, description="one trajectory's scoring, retries and backoff included")
    check_timeout_s: float = Field(10.0, gt=0, description="each request of the start-up check (never retried)")
    cooldown_s: float = Field(10.0, ge=0, description="a server whose request failed gets none for this long, "
                                                       "then one probe request")
    # vllm
    max_model_len: int = Field(2048, gt=0)

    @field_validator("api_base")
    @classmethod
    def _distinct_servers(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            urls = [u.rstrip("/") for u in value]
            if not urls or not all(urls):
                raise ValueError("a list of teacher servers needs at least one URL, and no empty ones")
            if len(set(urls)) != len(urls):
                raise ValueError(f"each teacher server once: {sorted({u for u in urls if urls.count(u) > 1})} "
                                 f"is listed more than once")
        return value
