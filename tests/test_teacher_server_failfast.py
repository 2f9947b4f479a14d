"""A teacher server that is down, hangs, serves another model or another tokenizer fails fast with a typed
error naming it. Real sockets on 127.0.0.1 only: a listener that accepts and never answers, a closed
port, and stdlib HTTP servers shaped like vLLM's routes; nothing in the HTTP layer is mocked."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from opd_agents.config import parse_config
from opd_agents.errors import TeacherModelNotServedError, TeacherUnreachableError, TokenizerMismatchError
from opd_agents.rollout.expert import play_expert
from opd_agents.env.parsers import get_parser
from opd_agents.training.preflight import preflight
from opd_agents.env.registry import make_env
from opd_agents.rollout.renderer import ChatMLRenderer
from opd_agents.teacher import ServerTeacher
from opd_agents.teacher.base import PROBE_TEXT
from opd_agents.types import Trajectory
from tests.loopback_http import Route, json_server

@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture()
def hanging() -> Iterator[str]:
    """A TCP server that accepts every connection, reads nothing and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    stop.set()
    for conn in held:
        conn.close()
    listener.close()


@pytest.fixture()
def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def models(*names: str) -> Route:
    return lambda _: (200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})


def tokenize_with(tok: PreTrainedTokenizerBase, shift: int = 0) -> Route:
    """vLLM's POST /tokenize; ``shift`` changes the ids of the third token on, as another tokenizer would."""
    def route(req: dict[str, Any]) -> tuple[int, Any]:
        ids = tok.encode(req["prompt"], add_special_tokens=req.get("add_special_tokens", True))
        ids = ids[:2] + [i + shift for i in ids[2:]]
        return 200, {"count": len(ids), "max_model_len": 2048, "tokens": ids}
    return route


# ---- the start-up check ------------------------------------------------------------------------------
def test_a_server_that_never_answers_fails_within_the_check_timeout(hanging: str, tiny_model_dir: Path) -> None:
    cfg = parse_config({"student": {"model": str(tiny_model_dir)},
                        "teacher": {"backend": "server", "model": "tiny", "api_base": hanging, "check_timeout_s": 2}})
    start = time.perf_counter()
    with pytest.raises(TeacherUnreachableError) as err:
        preflight(cfg)
    elapsed = time.perf_counter() - start
    assert 1.9 < elapsed < 10.0
    assert hanging in str(err.value) and "'tiny'" in str(err.value) and "no answer within 2s" in str(err.value)


def test_a_closed_port_fails_at_once(closed_port: str) -> None:
    start = time.perf_counter()
    with pytest.raises(TeacherUnreachableError, match="Connection refused") as err:
        ServerTeacher("tiny", closed_port).check()
    assert time.perf_counter() - start < 3.0  # no retry loop: a refused connection is not retried here
    assert closed_port in str(err.value) and "'tiny'" in str(err.value)


def test_a_model_that_is_not_served_is_named_with_the_served_ones() -> None:
    with (json_server({"GET /v1/models": models("qwen3-8b", "llama-70b")}) as api_base,
          pytest.raises(TeacherModelNotServedError) as err):
        ServerTeacher("tiny", api_base).check()
    msg = str(err.value)
    assert api_base in msg and "model 'tiny' is not served" in msg and "'qwen3-8b', 'llama-70b'" in msg


def test_the_servers_tokenizer_must_be_the_students(tok: PreTrainedTokenizerBase) -> None:
    ours = tok.encode(PROBE_TEXT, add_special_tokens=False)
    with json_server({"GET /v1/models": models("tiny"), "POST /tokenize": tokenize_with(tok)}) as api_base:
        ServerTeacher("openai/tiny", api_base).check(tok)  # same ids: passes
    with (json_server({"GET /v1/models": models("tiny"), "POST /tokenize": tokenize_with(tok, shift=7)}) as api_base,
          pytest.raises(TokenizerMismatchError) as err):
        ServerTeacher("tiny", api_base).check(tok)
    msg = str(err.value)
    assert api_base in msg and "first differing at position 2" in msg
    assert f"server {[i + 7 for i in ours[2:8]]} vs student {ours[2:8]}" in msg


def test_a_server_without_tokenize_gets_a_warning(tok: PreTrainedTokenizerBase) -> None:
    with (json_server({"GET /v1/models": models("tiny")}) as api_base,
          pytest.warns(UserWarning, match="tokenize answered 404.*cannot be checked")):
        ServerTeacher("tiny", api_base).check(tok)


# ---- scoring: a bounded budget, and litellm stays quiet ---------------------------------------------
@pytest.fixture(scope="module")
def trajs(tok: PreTrainedTokenizerBase) -> list[Trajectory]:
    renderer = ChatMLRenderer(tok, get_parser("hermes"))
    return play_expert(lambda: make_env("opd_agents/Arithmetic-v0").unwrapped, [0, 1, 2], renderer=renderer)


def test_scoring_against_a_hanging_server_ends_within_its_budget(
        hanging: str, trajs: list[Trajectory], capfd: pytest.CaptureFixture[str]) -> None:
    import litellm  # noqa: F401 - its first import takes seconds; keep it out of the measured time

    teacher = ServerTeacher("tiny", hanging, concurrency=2, timeout_s=1.0, score_timeout_s=2.5, max_retries=10,
                            backoff_s=0.05)
    start = time.perf_counter()
    with pytest.raises(TeacherUnreachableError, match=r"no answer within 2.5s after \d attempt") as err:
        teacher.score(trajs)  # 3 trajectories, 2 at a time: the queued one is never sent
    elapsed = time.perf_counter() - start
    assert elapsed < 2.5 + 2.0, elapsed
    assert hanging in str(err.value) and "'tiny'" in str(err.value)
    out = capfd.readouterr()
    assert "Give Feedback" not in out.out + out.err and "LiteLLM.Info" not in out.out + out.err
