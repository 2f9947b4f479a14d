"""Several teacher servers behind one config (``teacher.api_base: [url, url]``): requests spread over them, a
server killed mid-run is failed over (same scores as one server), a server down at start is named before
any work, every server down at run time fails within the time budget naming each, a failed server is
re-probed after its cool-down. Real HTTP servers on 127.0.0.1 (fake vLLMs backed by a tiny model)."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from opd_agents.config import parse_config
from opd_agents.rollout.expert import play_expert
from opd_agents.env.parsers import get_parser
from opd_agents.errors import (
    ConfigError,
    TeacherServersDownError,
    TeacherUnreachableError,
    TokenizerMismatchError,
)
from opd_agents.models import load_model
from opd_agents.rollout.renderer import ChatMLRenderer
from opd_agents.teacher import ServerTeacher, TeacherScores, make_teacher
from opd_agents.types import Trajectory
from tests.loopback_http import LoopbackServer, Route
from tests.test_preflight import run_config, train_refuses
from tests.test_teacher import FakeVLLM, LookupEnv

CONCURRENCY = 1  # per server: which server gets each request is then known (least in flight, in turn)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The fake servers run the model in several handler threads at once: with one intra-op thread each
    they share the cores instead of stalling each other for seconds (then a request could time out)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def trajs(tiny: tuple[Any, Any]) -> list[Trajectory]:
    renderer = ChatMLRenderer(tiny[1], get_parser("hermes"))
    return play_expert(LookupEnv, [0, 1, 2, 3, 4, 5], env_id="lookup", renderer=renderer)


def vllm_routes(fake: FakeVLLM, tok: Any, shift: int = 0) -> dict[str, Route]:
    """vLLM's routes around ``fake``; ``shift`` changes /tokenize's ids from the third on (another tokenizer)."""
    def tokenize(req: dict[str, Any]) -> tuple[int, Any]:
        ids = tok.encode(req["prompt"], add_special_tokens=req.get("add_special_tokens", True))
        return 200, {"tokens": ids[:2] + [i + shift for i in ids[2:]], "count": len(ids)}

    return {"GET /v1/models": lambda _: (200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]}),
            "POST /tokenize": tokenize, "POST /v1/completions": fake.handle}


@pytest.fixture()
def servers(tiny: tuple[Any, Any]) -> Iterator[list[tuple[FakeVLLM, LoopbackServer]]]:
    """Two fake vLLM servers of the same model."""
    with contextlib.ExitStack() as stack:
        out = []
        for _ in range(2):
            fake = FakeVLLM(tiny[0])
            out.append((fake, stack.enter_context(LoopbackServer(vllm_routes(fake, tiny[1])))))
        yield out


@pytest.fixture(scope="module")
def reference(tiny: tuple[Any, Any], trajs: list[Trajectory]) -> list[TeacherScores]:
    """The scores of one server alone."""
    fake = FakeVLLM(tiny[0])
    with LoopbackServer(vllm_routes(fake, tiny[1])) as server:
        return ServerTeacher("tiny", server.api_base, timeout_s=30.0).score(trajs, top_k=3)


def pool_teacher(urls: list[str], **kw: Any) -> ServerTeacher:
    kw = {"concurrency": CONCURRENCY, "timeout_s": 30.0, "max_retries": 3, "backoff_s": 0.01, "cooldown_s": 60.0,
          **kw}
    return ServerTeacher("tiny", urls, **kw)


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


# ---- load balancing and failover ---------------------------------------------------------------------
def test_a_batch_spreads_over_both_servers(servers: Any, trajs: list[Trajectory], reference: Any) -> None:
    (fa, a), (fb, b) = servers
    teacher = pool_teacher([a.api_base, b.api_base + "/"])  # a trailing slash names the same server
    assert teacher.score(trajs, top_k=3) == reference
    assert fa.requests + fb.requests == len(trajs) and fa.requests >= 2 and fb.requests >= 2
    assert fa.max_in_flight == fb.max_in_flight == CONCURRENCY  # least in flight: one each, never two on one
    stats = teacher.stats()
    healthy = {"failures": 0, "in_flight": 0, "up": True, "last_error": None}
    assert stats == {a.api_base: {"requests": fa.requests, **healthy}, b.api_base: {"requests": fb.requests, **healthy}}


def test_a_server_killed_mid_run_is_failed_over(tiny: Any, trajs: list[Trajectory], reference: Any) -> None:
    fa, fb = FakeVLLM(tiny[0]), FakeVLLM(tiny[0])
    routes_b = vllm_routes(fb, tiny[1])

    def die_at_second_request(req: dict[str, Any]) -> tuple[int, Any]:
        answer = fb.handle(req)
        if fb.requests == 2:
            b.kill()  # this request's connection is reset unanswered; new ones are refused
        return answer

    with LoopbackServer(vllm_routes(fa, tiny[1])) as a, \
            LoopbackServer({**routes_b, "POST /v1/completions": die_at_second_request}) as b:
        teacher = pool_teacher([a.api_base, b.api_base], max_retries=0)  # a move to another server is no retry
        teacher.check()
        assert teacher.score(trajs, top_k=3) == reference
    assert (fa.requests, fb.requests) == (len(trajs) - 1, 2)  # b answered one; its second went to a
    stats = teacher.stats()
    assert stats[a.api_base] == {"requests": len(trajs) - 1, "failures": 0, "in_flight": 0, "up": True,
                                 "last_error": None}
    assert (stats[b.api_base]["requests"], stats[b.api_base]["failures"], stats[b.api_base]["up"]) == (2, 1, False)
    assert stats[b.api_base]["last_error"].startswith("connection failed: ")


def test_a_failed_server_sits_out_its_cooldown_then_is_reprobed(servers: Any, trajs: list[Trajectory],
                                                                reference: Any) -> None:
    (fa, a), (fb, b) = servers
    fb.reset(fail_first=1)  # b's first request answers 500
    teacher = pool_teacher([a.api_base, b.api_base], cooldown_s=3.0)
    assert teacher.score(trajs[:4], top_k=3) == reference[:4]
    assert (fa.requests, fb.requests) == (4, 1)  # the 500 was retried on a at once, then a took the rest
    assert teacher.stats()[b.api_base] | {"last_error": None} == {"requests": 1, "failures": 1, "in_flight": 0,
                                                                 "up": False, "last_error": None}
    assert teacher.stats()[b.api_base]["last_error"].startswith("HTTP 500: ")
    assert teacher.score(trajs[4:], top_k=3) == reference[4:]
    assert (fa.requests, fb.requests) == (6, 1)  # b is cooling down
    time.sleep(3.2)
    assert teacher.score(trajs[:2], top_k=3) == reference[:2]
    assert (fa.requests, fb.requests) == (7, 2)  # one probe request for b (a took the other): b is up again
    assert teacher.stats()[b.api_base]["up"] and teacher.stats()[b.api_base]["failures"] == 1


def test_every_server_down_at_run_time_fails_in_time_naming_each(tiny: Any, servers: Any,
                                                                 trajs: list[Trajectory]) -> None:
    (_, a), _ = servers
    fb, hanging, released = FakeVLLM(tiny[0]), threading.Event(), threading.Event()

    def completions(req: dict[str, Any]) -> tuple[int, Any]:
        if hanging.is_set():  # b accepts the request and never answers in time
            released.wait(30.0)
            return 503, {"error": {"message": "gone"}}
        return fb.handle(req)

    with LoopbackServer({**vllm_routes(fb, tiny[1]), "POST /v1/completions": completions}) as b:
        teacher = pool_teacher([a.api_base, b.api_base], timeout_s=0.5, score_timeout_s=2.0, max_retries=20,
                               backoff_s=0.05, cooldown_s=0.1)
        teacher.check()  # both up before the run
        pool_teacher([a.api_base, b.api_base]).score(trajs[:2])  # litellm's slow first call stays out of the timing
        a.kill()  # refused from now on
        hanging.set()
        start = time.perf_counter()
        try:
            with pytest.raises(TeacherServersDownError) as err:
                teacher.score(trajs, top_k=3)
            elapsed = time.perf_counter() - start
        finally:
            released.set()
    assert elapsed < 2.0 + 2.0, elapsed  # score_timeout_s (each trajectory's requests and backoff), plus slack
    msg = str(err.value)
    assert msg.startswith(f"teacher servers {a.api_base}, {b.api_base} (model 'tiny'): no server scored trajectory ")
    assert "no scores were written" in msg
    for url, last_error in ((a.api_base, "connection failed"), (b.api_base, "timeout")):  # each with its own error
        assert re.search(rf"{re.escape(url)} \(down[^;]*; \d+ of \d+ request\(s\) failed; last error: {last_error}: ",
                         msg), msg
    assert isinstance(err.value, TeacherUnreachableError)


# ---- before any work ----------------------------------------------------------------------------------
def test_a_server_down_at_start_is_named_before_any_work(tmp_path: Path, tiny_model_dir: Path, servers: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (fa, a), _ = servers
    down = closed_port()
    cfg = run_config(tmp_path, tiny_model_dir, **{"teacher.backend": "server", "teacher.model": "tiny",
                                                    "teacher.api_base": [a.api_base, down]})
    line = train_refuses(tmp_path, cfg, monkeypatch)  # exit 2, one line, no run dir, no model loaded
    assert f"teacher server {down} (model 'tiny')" in line and "Connection refused" in line
    assert f"teacher server {a.api_base}" not in line
    assert fa.requests == 0  # nothing was scored


def test_every_server_is_checked_at_once(tiny: Any, servers: Any) -> None:
    (_, a), _ = servers
    fake = FakeVLLM(tiny[0])
    with (LoopbackServer(vllm_routes(fake, tiny[1], shift=7)) as other_tokenizer,
          pytest.raises(TokenizerMismatchError) as err):
        make_teacher({"backend": "server", "model": "tiny", "api_base": [a.api_base, other_tokenizer.api_base]},
                     student_tokenizer=tiny[1])
    assert f"teacher server {other_tokenizer.api_base} (model 'tiny')" in str(err.value)
    assert a.api_base not in str(err.value)
    hung = socket.socket()  # accepts (the kernel's backlog) and never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    hanging, down = f"http://127.0.0.1:{hung.getsockname()[1]}/v1", closed_port()
    start = time.perf_counter()
    with hung, pytest.raises(TeacherUnreachableError) as err2:
        ServerTeacher("tiny", [a.api_base, hanging, down], check_timeout_s=1.0).check()
    assert time.perf_counter() - start < 1.0 + 1.5  # in parallel: one check_timeout_s, not one per server
    msg = str(err2.value)
    assert msg.startswith(f"teacher server {hanging} (model 'tiny'): no answer within 1s")  # first in config order
    assert msg.endswith(f"(the check failed on 2 of 3 servers; also on {down})")


def test_config_takes_one_url_or_a_list(tiny_model_dir: Path) -> None:
    def teacher(api_base: Any) -> Any:
        return parse_config({"teacher": {"backend": "server", "model": "tiny", "api_base": api_base}}).teacher

    assert teacher("http://h:8000/v1").api_base == "http://h:8000/v1"
    assert teacher(["http://h1:8000/v1", "http://h2:8000/v1"]).backend_config().api_base == [
        "http://h1:8000/v1", "http://h2:8000/v1"]
    with pytest.raises(ConfigError, match="at least one URL"):
        teacher([])
    with pytest.raises(ConfigError, match=r"\['http://h1:8000/v1'\] is listed more than once"):
        teacher(["http://h1:8000/v1", "http://h2:8000/v1", "http://h1:8000/v1/"])
