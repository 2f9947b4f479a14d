"""A teacher behind an OpenAI-compatible vLLM server, reached through litellm.

One request per trajectory: POST /v1/completions with the teacher's token ids as the prompt,
``max_tokens=1`` and ``prompt_logprobs=k`` (vLLM extension). The server runs one forward pass over the
whole prompt and returns, per position, the log-prob of the actual token (+ its top-k when k > 0).
Requests run concurrently; a failed request is retried with exponential backoff on timeouts, refused
connections, 429 and 5xx, and anything else (or running out of retries, or of one trajectory's time
budget ``score_timeout_s``) raises TeacherError: a batch is scored completely or not at all.

``api_base`` may list several servers of the same model (``ServerPool``): requests are load-balanced over
the servers that are up, a request that fails on one goes at once to another, a failed server sits out a
cool-down and is re-probed, and when no server can answer the batch fails with TeacherServersDownError.

``check()`` runs before any work (the trainer's preflight): every server answers, serves the model and
tokenizes a probe text into the student's ids, each request bounded by ``check_timeout_s`` and never
retried.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from transformers import PreTrainedTokenizerBase

from opd_agents.errors import (
    TeacherError,
    TeacherModelNotServedError,
    TeacherServersDownError,
    TeacherUnreachableError,
    TokenizerMismatchError,
)
from opd_agents.rollout.renderer import Renderer
from opd_agents.teacher.base import (
    PROBE_TEXT,
    PrivilegedFn,
    Teacher,
    TeacherScores,
    TeacherSequence,
    parse_prompt_logprobs,
)
from opd_agents.teacher.pool import ServerPool
from opd_agents.types import Trajectory

# litellm fetches a model cost map from the web on import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@functools.cache
def _litellm() -> ModuleType:
    """litellm, imported once and quieted: it prints a feedback banner on every failed request and logs
    each failure, while our TeacherError already says what failed."""
    import litellm

    litellm.suppress_debug_info = True
    logging.getLogger("LiteLLM").setLevel(logging.CRITICAL)
    return litellm


@dataclass(frozen=True)
class _Failure:
    kind: str
    detail: str
    retryable: bool
    unreachable: bool = False  # refused / timed out, as opposed to an answer we cannot use


def _classify(exc: BaseException) -> _Failure:
    """Map a litellm/openai/httpx exception (walking its cause chain) to a failure kind."""
    import httpx
    import openai

    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    detail = f"{type(exc).__name__}: {str(exc)[:300]}"
    if any(isinstance(c, (openai.APITimeoutError, httpx.TimeoutException, TimeoutError)) for c in chain):
        return _Failure("timeout", detail, retryable=True, unreachable=True)
    # litellm reports a refused connection as InternalServerError("Connection error."); the cause tells.
    if any(isinstance(c, (httpx.ConnectError, ConnectionError, openai.APIConnectionError)) for c in chain):
        return _Failure("connection failed", detail, retryable=True, unreachable=True)
    status = next((s for c in chain if isinstance(s := getattr(c, "status_code", None), int)), None)
    if status is not None and (status >= 500 or status == 429):
        return _Failure(f"HTTP {status}", detail, retryable=True)
    return _Failure(f"HTTP {status}" if status is not None else "request failed", detail, retryable=False)


class ServerTeacher(Teacher):
    """Teacher served by vLLM (``python -m vllm.entrypoints.openai.api_server ...``).

    ``model`` is the served model name (``--served-model-name``); ``api_base`` the OpenAI base URL, e.g.
    ``http://127.0.0.1:8000/v1``, or a list of them (servers of the same model). A failed request moves
    at once to a server it has not failed on yet when one is up (not counted as a retry); otherwise
    ``max_retries`` retries follow, sleeping ``backoff_s * 2**i`` before retry i. Each attempt waits at
    most ``timeout_s`` and one trajectory's attempts and sleeps together at most ``score_timeout_s``, so
    servers that hang fail a ``score`` call within about ``score_timeout_s``. ``concurrency`` requests
    run per server; a server that failed sits out ``cooldown_s``. ``check_timeout_s`` bounds each request
    of ``check()``. Note: vLLM caps ``prompt_logprobs`` at its ``--max-logprobs`` (default 20); a larger
    ``top_k`` is refused by the server (HTTP 400 -> TeacherError).
    """

    def __init__(
        self,
        model: str,
        api_base: str | Sequence[str],
        api_key: str = "x",
        concurrency: int = 4,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        score_timeout_s: float = 60.0,
        check_timeout_s: float = 10.0,
        cooldown_s: float = 10.0,
        privileged: PrivilegedFn | None = None,
        renderer: Renderer | None = None,
        teacher_id: str | None = None,
    ) -> None:
        if concurrency < 1 or max_retries < 0 or min(timeout_s, score_timeout_s, check_timeout_s) <= 0 or backoff_s < 0:
            raise ValueError("ServerTeacher needs concurrency >= 1, max_retries >= 0, backoff_s >= 0 and timeouts > 0")
        super().__init__(teacher_id or model, renderer, privileged)
        # litellm picks the provider from the prefix; "openai/" = any OpenAI-compatible server. The name is
        # not kept as ``self.model``: callers take that attribute for an in-process model they can run.
        self.litellm_model = model if model.startswith("openai/") else f"openai/{model}"
        self.served_name = self.litellm_model.removeprefix("openai/")
        self.pool = ServerPool([u.rstrip("/") for u in ([api_base] if isinstance(api_base, str) else api_base)],
                               cooldown_s)
        self.api_base = ", ".join(self.pool.urls)  # the server(s), as messages name them
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.score_timeout_s = score_timeout_s
        self.check_timeout_s = check_timeout_s

    def score(self, trajs: Sequence[Trajectory], top_k: int = 0) -> list[TeacherScores]:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        seqs = [self.view.build(t) for t in trajs]
        abort = threading.Event()  # set on the first failure: queued requests skip, retries stop
        workers = self.concurrency * len(self.pool.urls)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="opd-teacher") as pool:
            futures = [pool.submit(self._score_one, t, s, top_k, abort) for t, s in zip(trajs, seqs, strict=True)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                abort.set()
                for f in futures:
                    f.cancel()
        if failed is not None:
            raise failed.exception()  # type: ignore[misc]
        return [f.result() for f in futures]

    # ---- one trajectory ----------------------------------------------------------------------------
    def _score_one(self, traj: Trajectory, seq: TeacherSequence, top_k: int, abort: threading.Event) -> TeacherScores:
        if not seq.positions:
            return TeacherScores.empty(traj, top_k)
        response, url, attempts = self._request(traj, seq.input_ids, top_k, abort)
        choice = response.choices[0]
        plp = getattr(choice, "prompt_logprobs", None)
        try:
            if plp is None:
                raise ValueError("the response has no prompt_logprobs (not a vLLM server, or an old one?)")
            lps, top_ids, top_lps = parse_prompt_logprobs(plp, seq, top_k)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            failure = _Failure("malformed response", f"{type(e).__name__}: {e}", False)
            raise self._error(failure, attempts, traj, url, gave_up=False) from e
        return TeacherScores(
            logprobs=seq.split(lps), topk_ids=seq.split(top_ids) if top_k else None,
            topk_logprobs=seq.split(top_lps) if top_k else None, tokens_processed=len(seq.input_ids),
        )

    def _request(self, traj: Trajectory, ids: list[int], top_k: int,
                 abort: threading.Event) -> tuple[Any, str, int]:
        """The server's answer, the server that gave it and the attempts it took."""
        litellm = _litellm()
        deadline = time.monotonic() + self.score_timeout_s
        attempts = retries = 0
        tried: set[str] = set()
        url = self.pool.acquire_any()
        while True:
            if abort.is_set():
                self.pool.cancel(url)
                raise TeacherError(f"teacher server {self.api_base}: cancelled after another request failed")
            attempts += 1
            tried.add(url)
            try:
                response = litellm.text_completion(
                    model=self.litellm_model, api_base=url, api_key=self.api_key, prompt=ids,
                    max_tokens=1, temperature=0.0, extra_body={"prompt_logprobs": top_k},
                    timeout=max(min(self.timeout_s, deadline - time.monotonic()), 0.01),
                    max_retries=0,  # retries are ours (the openai client defaults to 2)
                )
            except Exception as e:  # noqa: BLE001 - every failure is classified below
                failure = _classify(e)
                # A retryable failure is one another server (or this one, later) could answer: it starts a cool-down.
                self.pool.release(url, f"{failure.kind}: {failure.detail}", server_down=failure.retryable)
                if not failure.retryable:
                    raise self._error(failure, attempts, traj, url, gave_up=False) from e
                other = self.pool.acquire(avoid=tried)  # another server that is up: at once, not a retry
                if other is not None and time.monotonic() < deadline:
                    url = other
                    continue
                if other is not None:
                    self.pool.cancel(other)
                if retries >= self.max_retries:
                    raise self._error(failure, attempts, traj, url, gave_up=True) from e
                pause = self.backoff_s * 2 ** retries
                if time.monotonic() + pause >= deadline:  # the budget ends before another attempt could
                    spent = (f"no answer within {self.score_timeout_s:g}s" if failure.kind == "timeout" else
                             f"{failure.kind}, {self.score_timeout_s:g}s budget spent")
                    failure = _Failure(spent, failure.detail, retryable=False, unreachable=failure.unreachable)
                    raise self._error(failure, attempts, traj, url, gave_up=True) from e
                retries += 1
                if abort.wait(pause):
                    raise TeacherError(f"teacher server {self.api_base}: cancelled after another request failed") from e
                url = self.pool.acquire_any()
            else:
                self.pool.release(url)
                return response, url, attempts

    def _error(self, failure: _Failure, attempts: int, traj: Trajectory, url: str, gave_up: bool) -> TeacherError:
        """The error of a request that ended on ``url``; ``gave_up``: after failures other servers could
        have answered (with several servers: every server is named with its last error)."""
        limits = (f"(timeout {self.timeout_s:g}s per request, {self.score_timeout_s:g}s per trajectory, max_retries "
                  f"{self.max_retries})")
        if gave_up and len(self.pool.urls) > 1:
            return TeacherServersDownError(
                f"teacher servers {self.api_base} (model {self.served_name!r}): no server scored trajectory "
                f"{traj.id}: {failure.kind} after {attempts} attempt(s) {limits}; no scores were written. "
                f"Servers: {self.pool.describe()}")
        cls = TeacherUnreachableError if failure.unreachable else TeacherError
        return cls(
            f"teacher server {url} (model {self.served_name!r}): {failure.kind} after {attempts} attempt(s) "
            f"{limits} while scoring trajectory {traj.id}; no scores were written. Last error: {failure.detail}"
        )

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per server URL: requests sent, failed, in flight, whether it is up now, its last error."""
        return self.pool.stats()

    # ---- start-up check ----------------------------------------------------------------------------
    def check(self, student_tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Fail fast, before any work: every server answers and serves ``model``; with
        ``student_tokenizer``, its tokenizer must also turn a probe text into the student's ids."""
        self.check_serves_model()
        if student_tokenizer is not None:
            self.check_tokenizer(student_tokenizer)

    def check_serves_model(self) -> None:
        """GET /v1/models on every server: TeacherUnreachableError (refused, no answer),
        TeacherModelNotServedError."""
        self._on_every_server(self._check_serves_model)

    def check_tokenizer(self, student_tokenizer: PreTrainedTokenizerBase) -> None:
        """POST /tokenize (vLLM) on a probe text, on every server; different ids raise
        TokenizerMismatchError. A server without /tokenize (404) gets a warning: its tokenizer cannot be
        checked from here."""
        ours = student_tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
        self._on_every_server(lambda server: self._check_tokenizer(server, ours))

    def _on_every_server(self, check: Callable[[str], None]) -> None:
        """Run ``check`` on every server at once (so n hung servers cost one check_timeout_s, not n); the
        first failing server in config order raises, naming the others that failed too."""
        urls = self.pool.urls
        if len(urls) == 1:
            check(urls[0])
            return
        with ThreadPoolExecutor(max_workers=len(urls), thread_name_prefix="opd-teacher-check") as pool:
            futures = [pool.submit(check, u) for u in urls]
        failed = [(u, e) for u, f in zip(urls, futures, strict=True) if (e := f.exception()) is not None]
        if not failed:
            return
        first = failed[0][1]
        if len(failed) > 1 and isinstance(first, TeacherError | TokenizerMismatchError):
            others = ", ".join(u for u, _ in failed[1:])
            raise type(first)(f"{first} (the check failed on {len(failed)} of {len(urls)} servers; also on "
                              f"{others})") from first
        raise first

    def _check_serves_model(self, server: str) -> None:
        url = f"{server}/models"
        resp = self._get_json(server, "GET", url)
        try:
            served = [str(m["id"]) for m in resp["data"]]
        except (KeyError, TypeError) as e:
            raise TeacherError(f"{self._where(server)}: GET {url} did not return an OpenAI model list "
                               f"({type(e).__name__}: {e}); is this an OpenAI-compatible (vLLM) server?") from e
        if self.served_name not in served:
            raise TeacherModelNotServedError(
                f"{self._where(server)}: model {self.served_name!r} is not served; the server serves: "
                f"{', '.join(repr(m) for m in served) or 'no model'}. Set teacher.model to its --served-model-name")

    def _check_tokenizer(self, server: str, ours: list[int]) -> None:
        url = f"{server.removesuffix('/v1')}/tokenize"
        body = {"model": self.served_name, "prompt": PROBE_TEXT, "add_special_tokens": False}
        resp = self._get_json(server, "POST", url, body, allow_404=True)
        if resp is None:
            warnings.warn(f"{self._where(server)}: POST {url} answered 404 (not a vLLM server?), so its tokenizer "
                          f"cannot be checked; it must be the student's, or every teacher score is wrong",
                          stacklevel=2)
            return
        theirs = resp.get("tokens") if isinstance(resp, dict) else None
        if not isinstance(theirs, list):
            raise TeacherError(f"{self._where(server)}: POST {url} returned no 'tokens' list: {str(resp)[:200]}")
        if theirs != ours:
            i = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
            raise TokenizerMismatchError(
                f"{self._where(server)}: the server's tokenizer differs from the student's: a probe text gives "
                f"{len(theirs)} ids on the server and {len(ours)} for the student, first differing at "
                f"position {i}: server {theirs[i:i + 6]} vs student {ours[i:i + 6]}. Teacher scores are looked "
                f"up by the student's token ids, so serve a model of the student's family")

    def _where(self, server: str) -> str:
        return f"teacher server {server} (model {self.served_name!r})"

    def _get_json(self, server: str, method: str, url: str, body: dict[str, Any] | None = None,
                  allow_404: bool = False) -> Any:
        """One request to ``server``, no retry, bounded by check_timeout_s; its JSON body (None for an
        allowed 404)."""
        import httpx

        where = self._where(server)
        try:
            resp = httpx.request(method, url, json=body, timeout=self.check_timeout_s,
                                 headers={"Authorization": f"Bearer {self.api_key}"})
        except httpx.TimeoutException as e:
            raise TeacherUnreachableError(f"{where}: no answer within {self.check_timeout_s:g}s to "
                                          f"{method} {url} ({type(e).__name__})") from e
        except httpx.HTTPError as e:  # refused, unresolvable host, reset...
            raise TeacherUnreachableError(f"{where}: {method} {url} failed: {type(e).__name__}: {e} "
                                          f"(is the server running?)") from e
        if resp.status_code == 404 and allow_404:
            return None
        if resp.status_code != 200:
            raise TeacherError(f"{where}: {method} {url} answered HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            return resp.json()
        except ValueError as e:
            raise TeacherError(f"{where}: {method} {url} did not answer JSON: {resp.text[:200]!r}") from e


def wait_for_server(api_base: str, timeout_s: float = 180.0, proc_alive: Callable[[], bool] | None = None) -> float:
    """Poll ``<server>/health`` until it answers 200; return the seconds waited. ``proc_alive``: optional
    callable, False when the server process died (fail fast instead of waiting out the timeout)."""
    import httpx

    root = api_base.rstrip("/").removesuffix("/v1")
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if proc_alive is not None and not proc_alive():
            raise TeacherError(f"teacher server at {root} exited before becoming healthy")
        try:
            if httpx.get(f"{root}/health", timeout=2.0).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TeacherError(f"teacher server at {root} not healthy after {timeout_s:g}s")
