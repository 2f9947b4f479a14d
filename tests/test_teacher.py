"""Teacher scoring on a tiny random Llama: exactness vs unpadded passes, one forward per batch, the
privileged view, top-k, the tokenizer check, and the server teacher's retries against real local HTTP
servers (a fake vLLM backed by the same tiny model, plus failing ones)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pydantic
import pytest
import torch
from transformers import AutoTokenizer

from opd_agents.env.core import Task, ToolEnv
from opd_agents.errors import TeacherError, TeacherUnreachableError, TokenizerMismatchError
from opd_agents.rollout.expert import play_expert
from opd_agents.models import load_model
from opd_agents.env.parsers import get_parser
from opd_agents.rollout.renderer import ChatMLRenderer
from opd_agents.rollout.runner import Rollout
from opd_agents.rollout.hf_engine import HFEngine
from opd_agents.teacher import (
    HFTeacher,
    ServerTeacher,
    TeacherScores,
    TeacherView,
    apply_scores,
    check_same_tokenizer,
    make_teacher,
)
from opd_agents.env.tool import Tool, tool
from tests.loopback_http import json_server
from opd_agents.types import SamplingParams, Trajectory


# ---- a small multi-turn env, played by its scripted expert and by the tiny model ----------------------
@tool
def lookup(key: str) -> str:
    """Look up the value stored under a key."""
    return f"{key} = {len(key) * 7}"


class LookupEnv(ToolEnv):
    tools: ClassVar[list[Tool]] = [lookup]

    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        keys = [f"k{int(rng.integers(10, 10**(2 + i)))}" for i in range(1 + seed % 3)]
        answer = sum(len(k) * 7 for k in keys)
        return Task(id=f"lookup-{seed}", seed=seed, split=split, answer=answer,
                    prompt=f"Look up {', '.join(keys)} and add the values." + " Be careful." * seed,
                    reference=f"Call lookup on each of {keys}; the values sum to {answer}.", data={"keys": keys})

    def grade(self, task: Task, answer: str) -> float:
        return float(str(task.answer) in answer)

    def expert_action(self, task: Task, history: list[Any]) -> str:
        done, keys = sum(m.role == "tool" for m in history), task.data["keys"]
        return self.parser.format_call("lookup", {"key": keys[done]}) if done < len(keys) else f"Sum: {task.answer}."


def reference_of(traj: Trajectory) -> str:
    """Privileged context: the task's reference solution, regenerated from the trajectory's seed."""
    return LookupEnv().generate_task(np.random.default_rng(traj.seed), traj.seed, traj.split).reference


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any, ChatMLRenderer]:
    model, tok = load_model(tiny_model_dir)
    return model, tok, ChatMLRenderer(tok, get_parser("hermes"))


@pytest.fixture(scope="module")
def trajs(tiny: tuple[Any, Any, ChatMLRenderer]) -> list[Trajectory]:
    """Multi-turn expert trajectories of different lengths + single-turn samples of the tiny model."""
    model, _, renderer = tiny
    expert = play_expert(LookupEnv, [0, 1, 2, 5], env_id="lookup", renderer=renderer)
    rollout = Rollout(HFEngine(model, renderer), LookupEnv,
                      sampling=SamplingParams(max_tokens_per_turn=12, seed=0), env_id="lookup")
    sampled = rollout.run([3, 4])
    rollout.close()
    out = expert + sampled
    assert len({t.num_tokens for t in out}) == len(out) and max(len(t.turns) for t in out) >= 3
    return out


@torch.no_grad()
def unpadded_logprobs(model: Any, view: TeacherView, traj: Trajectory) -> list[float]:
    """Reference: one unbatched, unpadded forward pass over the teacher sequence."""
    seq = view.build(traj)
    logp = torch.log_softmax(model(torch.tensor([seq.input_ids])).logits[0].float(), dim=-1)
    return [float(logp[p - 1, seq.input_ids[p]]) for p in seq.positions]


def flat(scores: TeacherScores) -> list[float]:
    return [x for turn in scores.logprobs for x in turn]


# ---- HFTeacher -------------------------------------------------------------------------------------
def test_batched_scores_equal_unpadded_passes(tiny: Any, trajs: list[Trajectory]) -> None:
    model, tok, _ = tiny
    teacher = HFTeacher(model, tok, batch_size=8)
    for traj, s in zip(trajs, teacher.score(trajs), strict=True):
        assert [len(x) for x in s.logprobs] == [len(t.token_ids) for t in traj.turns]
        assert s.tokens_processed == traj.num_tokens
        ref = unpadded_logprobs(model, teacher.view, traj)
        assert np.abs(np.array(flat(s)) - np.array(ref)).max() <= 1e-5


def test_one_forward_pass_per_batch(tiny: Any, trajs: list[Trajectory]) -> None:
    model, tok, _ = tiny
    calls: list[tuple[int, ...]] = []
    handle = model.register_forward_hook(lambda m, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)),
                                         with_kwargs=True)
    try:
        HFTeacher(model, tok, batch_size=8).score(trajs)
        # The shared prompt prefix once (one row), then all turns of all trajectories in one pass.
        assert len(calls) == 2 and calls[0][0] == 1 and calls[1][0] == len(trajs)
        calls.clear()
        HFTeacher(model, tok, batch_size=4).score(trajs)
        assert [c[0] for c in calls] == [1, 4, len(trajs) - 4]  # the prefix is kept for the second batch
    finally:
        handle.remove()


def test_trajectory_without_turns_costs_nothing(tiny: Any, trajs: list[Trajectory], fake_server: Any) -> None:
    model, tok, _ = tiny
    bare = trajs[0].model_copy(update={"turns": []})
    fake, api_base = fake_server
    fake.reset()
    for teacher in (HFTeacher(model, tok), server_teacher(api_base)):
        s = teacher.score([bare], top_k=2)[0]
        assert s.logprobs == s.topk_ids == [] and s.tokens_processed == 0
    assert fake.requests == 0 and HFTeacher(model, tok).logits_for([bare])[0].shape == (0, len(tok))


def test_logits_for_lines_up_with_scores(tiny: Any, trajs: list[Trajectory]) -> None:
    model, tok, _ = tiny
    teacher = HFTeacher(model, tok)
    for traj, lg, s in zip(trajs, teacher.logits_for(trajs), teacher.score(trajs), strict=True):
        targets = torch.tensor([i for t in traj.turns for i in t.token_ids])
        assert lg.shape == (traj.num_assistant_tokens, len(tok)) and not lg.requires_grad
        got = torch.log_softmax(lg, -1).gather(1, targets[:, None]).squeeze(1)
        assert torch.allclose(got, torch.tensor(flat(s)), atol=1e-6)


def test_train_mode_is_restored_and_ignored(tiny: Any, trajs: list[Trajectory]) -> None:
    model, tok, _ = tiny
    eval_scores = HFTeacher(model, tok).score(trajs[:2])
    try:
        train_scores = HFTeacher(model.train(), tok).score(trajs[:2])
        assert model.training
    finally:
        model.eval()
    assert [flat(s) for s in eval_scores] == [flat(s) for s in train_scores]


def test_privileged_view_scores_exactly_the_students_tokens(tiny: Any, trajs: list[Trajectory]) -> None:
    model, tok, renderer = tiny
    plain = TeacherView()
    priv = TeacherView(renderer, reference_of)
    for traj in trajs:
        a, b = plain.build(traj), priv.build(traj)
        student_tokens = [i for t in traj.turns for i in t.token_ids]
        assert a.target_ids == b.target_ids == student_tokens
        shift = len(b.input_ids) - len(a.input_ids)
        assert shift > 0 and b.positions == [p + shift for p in a.positions]
        # Everything after the prompt (turns + observations) is the student's sequence verbatim.
        assert b.input_ids[shift + len(traj.prompt_ids):] == a.input_ids[len(traj.prompt_ids):]
        assert reference_of(traj) in tok.decode(b.input_ids[: len(traj.prompt_ids) + shift])
    priv_teacher = HFTeacher(model, tok, renderer=renderer, privileged=reference_of)
    for traj, p, q in zip(trajs, HFTeacher(model, tok).score(trajs), priv_teacher.score(trajs), strict=True):
        assert [len(x) for x in p.logprobs] == [len(x) for x in q.logprobs]
        assert np.abs(np.array(flat(p)) - np.array(flat(q))).max() > 1e-4  # the context matters
        ref = unpadded_logprobs(model, priv_teacher.view, traj)
        assert np.abs(np.array(flat(q)) - np.array(ref)).max() <= 1e-5


def test_privileged_view_needs_the_students_renderer(tiny: Any, trajs: list[Trajectory]) -> None:
    _, tok, _ = tiny
    with pytest.raises(ValueError, match="renderer"):
        TeacherView(None, reference_of)
    other = TeacherView(ChatMLRenderer(tok, get_parser("react")), reference_of)  # different tool instructions
    with pytest.raises(ValueError, match="does not reproduce its prompt_ids"):
        other.build(trajs[0])


def test_top_k(tiny: Any, trajs: list[Trajectory]) -> None:
    model, tok, _ = tiny
    scores = HFTeacher(model, tok).score(trajs, top_k=5)
    for traj, s in zip(trajs, scores, strict=True):
        assert s.topk_ids is not None and s.topk_logprobs is not None
        for turn, lps, ids, tlps in zip(traj.turns, s.logprobs, s.topk_ids, s.topk_logprobs, strict=True):
            assert len(ids) == len(tlps) == len(turn.token_ids) and all(len(r) == 5 for r in ids)
            for tok_id, lp, row_ids, row_lps in zip(turn.token_ids, lps, ids, tlps, strict=True):
                assert row_lps == sorted(row_lps, reverse=True)
                assert lp <= row_lps[0] + 1e-6
                if tok_id in row_ids:
                    assert abs(row_lps[row_ids.index(tok_id)] - lp) < 1e-6
    assert HFTeacher(model, tok).score(trajs[:1])[0].topk_ids is None


def test_apply_scores(tiny: Any, trajs: list[Trajectory]) -> None:
    model, tok, _ = tiny
    teacher = HFTeacher(model, tok, teacher_id="tiny-teacher")
    copies = [t.model_copy(deep=True) for t in trajs[:2]]
    scores = teacher.score_and_apply(copies)
    for traj, s in zip(copies, scores, strict=True):
        assert [t.teacher_logprobs for t in traj.turns] == s.logprobs
        assert traj.teacher_id == "tiny-teacher" and all(t.teacher_id == "tiny-teacher" for t in traj.turns)
    fresh = trajs[0].model_copy(deep=True)
    bad = TeacherScores(logprobs=[x[:-1] for x in scores[0].logprobs])
    with pytest.raises(ValueError, match="teacher logprobs for"):
        apply_scores(fresh, bad, "x")
    assert all(t.teacher_logprobs is None for t in fresh.turns)  # all or nothing


def test_tokenizer_check(tiny: Any, tiny_model_dir: Path) -> None:
    _, tok, _ = tiny
    check_same_tokenizer(tok, AutoTokenizer.from_pretrained(tiny_model_dir))
    grown = AutoTokenizer.from_pretrained(tiny_model_dir)
    grown.add_tokens(["<extra_tool_token>"])
    with pytest.raises(TokenizerMismatchError, match=r"vocab size .*cross-tokenizer"):
        check_same_tokenizer(tok, grown)
    other_eos = AutoTokenizer.from_pretrained(tiny_model_dir)  # same vocabulary, another end token
    other_eos.eos_token = "<|endoftext|>" if tok.eos_token != "<|endoftext|>" else "<|im_end|>"
    with pytest.raises(TokenizerMismatchError, match="eos_token"):
        check_same_tokenizer(tok, other_eos)


def test_make_teacher(tiny: Any, tiny_model_dir: Path, trajs: list[Trajectory]) -> None:
    model, tok, _ = tiny
    teacher = make_teacher({"backend": "hf", "model": str(tiny_model_dir), "batch_size": 2}, student_tokenizer=tok)
    assert isinstance(teacher, HFTeacher) and teacher.batch_size == 2
    assert flat(teacher.score(trajs[:1])[0]) == pytest.approx(flat(HFTeacher(model, tok).score(trajs[:1])[0]),
                                                              abs=1e-5)
    with pytest.raises(pydantic.ValidationError, match="extra_forbidden|Extra inputs"):
        make_teacher({"backend": "hf", "model": "x", "temprature": 1.0})
    with pytest.raises(ValueError, match="api_base"):
        make_teacher({"backend": "server", "model": "tiny"})


def test_make_teacher_checks_a_server_at_once(tiny: Any, fake_server: Any) -> None:
    _, tok, _ = tiny
    _, api_base = fake_server
    server = make_teacher({"backend": "server", "model": "tiny", "api_base": api_base}, student_tokenizer=tok)
    assert isinstance(server, ServerTeacher) and server.litellm_model == "openai/tiny"
    assert getattr(server, "model", None) is None  # callers read .model as an in-process model
    with pytest.raises(TeacherUnreachableError, match="127.0.0.1:1/v1"):  # port 1: nothing listens
        make_teacher({"backend": "server", "model": "tiny", "api_base": "http://127.0.0.1:1/v1"})


# ---- ServerTeacher against real local HTTP servers ---------------------------------------------------
class FakeVLLM:
    """A /v1/completions endpoint shaped like vLLM's, computing prompt_logprobs with the tiny model.

    ``fail_first`` requests answer 500; ``mode``: "ok", "500" (always), "sleep" (never answers in time),
    "400", "malformed" (no prompt_logprobs)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.reset()

    def reset(self, mode: str = "ok", fail_first: int = 0) -> None:
        self.mode, self.fail_first, self.requests, self.in_flight, self.max_in_flight = mode, fail_first, 0, 0, 0

    @torch.no_grad()
    def body(self, ids: list[int], k: int) -> dict[str, Any]:
        logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)
        entries: list[dict[str, Any] | None] = [None]
        for p in range(1, len(ids)):
            row = logp[p - 1]
            ranked = [(ids[p], int((row > row[ids[p]]).sum()) + 1)]  # the actual token, then the top-k
            ranked += [(i, r + 1) for r, i in enumerate(row.topk(k).indices.tolist() if k else [])]
            entries.append({str(i): {"logprob": float(row[i]), "rank": r, "decoded_token": "?"} for i, r in ranked})
        choice = {"index": 0, "text": " x", "logprobs": None, "finish_reason": "length", "prompt_logprobs": entries}
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "tiny", "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}

    def handle(self, req: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            n = self.requests = self.requests + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.mode == "sleep":
                time.sleep(3.0)
            if self.mode == "500" or n <= self.fail_first:
                return 500, {"error": {"message": "engine overloaded", "type": "InternalServerError"}}
            if self.mode == "400":
                return 400, {"error": {"message": "prompt_logprobs too large", "type": "BadRequestError"}}
            prompt = req["prompt"]
            ids = prompt[0] if prompt and isinstance(prompt[0], list) else prompt
            time.sleep(0.05)  # long enough for concurrent requests to overlap
            out = self.body(ids, int(req.get("prompt_logprobs") or 0))
            if self.mode == "malformed":
                del out["choices"][0]["prompt_logprobs"]
            return 200, out
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture(scope="module")
def fake_server(tiny: Any) -> Iterator[tuple[FakeVLLM, str]]:
    """FakeVLLM behind vLLM's routes: POST /v1/completions, and for the start-up check GET /v1/models and
    POST /tokenize (with the tiny model's tokenizer)."""
    fake = FakeVLLM(tiny[0])

    def tokenize(req: dict[str, Any]) -> tuple[int, Any]:
        ids = tiny[1].encode(req["prompt"], add_special_tokens=req.get("add_special_tokens", True))
        return 200, {"count": len(ids), "max_model_len": 2048, "tokens": ids}

    routes = {"GET /v1/models": lambda _: (200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]}),
              "POST /tokenize": tokenize, "POST /v1/completions": fake.handle}
    with json_server(routes) as api_base:
        yield fake, api_base


def server_teacher(api_base: str, **kw: Any) -> ServerTeacher:
    kw = {"concurrency": 3, "timeout_s": 10.0, "max_retries": 3, "backoff_s": 0.01, **kw}
    return ServerTeacher("tiny", api_base, **kw)


def test_server_teacher_matches_hf_and_runs_concurrently(tiny: Any, trajs: list[Trajectory], fake_server: Any) -> None:
    model, tok, _ = tiny
    fake, api_base = fake_server
    fake.reset()
    got = server_teacher(api_base).score(trajs, top_k=3)
    want = HFTeacher(model, tok).score(trajs, top_k=3)
    assert fake.requests == len(trajs) and fake.max_in_flight > 1
    for g, w in zip(got, want, strict=True):
        assert np.abs(np.array(flat(g)) - np.array(flat(w))).max() <= 1e-5
        assert g.topk_ids == w.topk_ids and g.tokens_processed == w.tokens_processed


def test_server_teacher_retries_5xx_then_succeeds(tiny: Any, trajs: list[Trajectory], fake_server: Any) -> None:
    model, tok, _ = tiny
    fake, api_base = fake_server
    fake.reset(fail_first=3)
    got = server_teacher(api_base, concurrency=1).score(trajs[:2])
    assert fake.requests == 2 + 3
    want = HFTeacher(model, tok).score(trajs[:2])
    assert all(np.allclose(flat(g), flat(w), atol=1e-5) for g, w in zip(got, want, strict=True))


def test_server_teacher_gives_up_after_max_retries(trajs: list[Trajectory], fake_server: Any) -> None:
    fake, api_base = fake_server
    fake.reset(mode="500")
    copies = [t.model_copy(deep=True) for t in trajs[:1]]
    start = time.perf_counter()
    with pytest.raises(TeacherError) as err:
        server_teacher(api_base, max_retries=2, backoff_s=0.05).score_and_apply(copies)
    assert time.perf_counter() - start < 5.0
    assert fake.requests == 3  # 1 attempt + 2 retries; the openai client's own retries are off
    assert api_base in str(err.value) and "HTTP 500 after 3 attempt(s)" in str(err.value)
    assert all(t.teacher_logprobs is None for t in copies[0].turns)  # nothing half-written


def test_server_teacher_does_not_retry_client_errors(trajs: list[Trajectory], fake_server: Any) -> None:
    fake, api_base = fake_server
    fake.reset(mode="400")
    with pytest.raises(TeacherError, match="HTTP 400 after 1 attempt"):
        server_teacher(api_base).score(trajs[:1])
    assert fake.requests == 1
    fake.reset(mode="malformed")
    with pytest.raises(TeacherError, match="malformed response.*no prompt_logprobs"):
        server_teacher(api_base).score(trajs[:1])


def test_server_teacher_connection_refused(trajs: list[Trajectory]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        api_base = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    start = time.perf_counter()
    with pytest.raises(TeacherError, match="connection failed after 3 attempt") as err:
        server_teacher(api_base, max_retries=2).score(trajs[:2])
    assert api_base in str(err.value) and time.perf_counter() - start < 10.0


def test_server_teacher_timeout(trajs: list[Trajectory], fake_server: Any) -> None:
    fake, api_base = fake_server
    fake.reset(mode="sleep")
    start = time.perf_counter()
    with pytest.raises(TeacherError, match="timeout after 2 attempt"):
        server_teacher(api_base, timeout_s=0.5, max_retries=1, concurrency=1).score(trajs[:1])
    assert time.perf_counter() - start < 4.0
    assert fake.requests == 2
