"""A teacher behind an OpenAI-compatible vLLM server, reached through litellm.

One request per trajectory: POST /v1/completions with the teacher's token ids as the prompt,
``max_tokens=1`` and ``prompt_logprobs=k`` (vLLM extension). The server runs one forward pass over the
whole prompt and returns, per position, the log-prob of the actual token (+ its top-k when k > 0).
Requests run concurrently; a failed request is retried with exponential backoff on timeouts, refused
connections, 429 and 5xx, and anything else (or running out of retries) raises TeacherError: a batch is
scored completely or not at all.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from opd_agents.errors import TeacherError
from opd_agents.renderer import ChatMLRenderer
from opd_agents.teacher.base import PrivilegedFn, Teacher, TeacherScores, TeacherSequence, parse_prompt_logprobs
from opd_agents.types import Trajectory

# litellm fetches a model cost map from the web on import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@dataclass(frozen=True)
class _Failure:
    kind: str
    detail: str
    retryable: bool


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
        return _Failure("timeout", detail, retryable=True)
    # litellm reports a refused connection as InternalServerError("Connection error."); the cause tells.
    if any(isinstance(c, (httpx.ConnectError, ConnectionError, openai.APIConnectionError)) for c in chain):
        return _Failure("connection failed", detail, retryable=True)
    status = next((s for c in chain if isinstance(s := getattr(c, "status_code", None), int)), None)
    if status is not None and (status >= 500 or status == 429):
        return _Failure(f"HTTP {status}", detail, retryable=True)
    return _Failure(f"HTTP {status}" if status is not None else "request failed", detail, retryable=False)


class ServerTeacher(Teacher):
    """Teacher served by vLLM (``python -m vllm.entrypoints.openai.api_server ...``).

    ``model`` is the served model name (``--served-model-name``); ``api_base`` the OpenAI base URL, e.g.
    ``http://127.0.0.1:8000/v1``. ``max_retries`` retries follow the first attempt, sleeping
    ``backoff_s * 2**i`` before retry i. Note: vLLM caps ``prompt_logprobs`` at its ``--max-logprobs``
    (default 20); a larger ``top_k`` is refused by the server (HTTP 400 -> TeacherError).
    """

    def __init__(
        self,
        model: str,
        api_base: str,
        api_key: str = "x",
        concurrency: int = 4,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        privileged: PrivilegedFn | None = None,
        renderer: ChatMLRenderer | None = None,
        teacher_id: str | None = None,
    ) -> None:
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("ServerTeacher needs concurrency >= 1, max_retries >= 0, timeout_s > 0, backoff_s >= 0")
        super().__init__(teacher_id or model, renderer, privileged)
        self.model = model
        # litellm picks the provider from the prefix; "openai/" = any OpenAI-compatible server.
        self.litellm_model = model if model.startswith("openai/") else f"openai/{model}"
        self.api_base = api_base.rstrip("/")
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s

    def score(self, trajs: Sequence[Trajectory], top_k: int = 0) -> list[TeacherScores]:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        seqs = [self.view.build(t) for t in trajs]
        abort = threading.Event()  # set on the first failure: queued requests skip, retries stop
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="opd-teacher") as pool:
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
        response = self._request(traj, seq.input_ids, top_k, abort)
        choice = response.choices[0]
        plp = getattr(choice, "prompt_logprobs", None)
        try:
            if plp is None:
                raise ValueError("the response has no prompt_logprobs (not a vLLM server, or an old one?)")
            lps, top_ids, top_lps = parse_prompt_logprobs(plp, seq, top_k)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise self._error("malformed response", 1, traj, f"{type(e).__name__}: {e}") from e
        return TeacherScores(
            logprobs=seq.split(lps), topk_ids=seq.split(top_ids) if top_k else None,
            topk_logprobs=seq.split(top_lps) if top_k else None, tokens_processed=len(seq.input_ids),
        )

    def _request(self, traj: Trajectory, ids: list[int], top_k: int, abort: threading.Event) -> Any:
        import litellm

        attempts = 0
        while True:
            if abort.is_set():
                raise TeacherError(f"teacher server {self.api_base}: cancelled after another request failed")
            attempts += 1
            try:
                return litellm.text_completion(
                    model=self.litellm_model, api_base=self.api_base, api_key=self.api_key, prompt=ids,
                    max_tokens=1, temperature=0.0, extra_body={"prompt_logprobs": top_k},
                    timeout=self.timeout_s, max_retries=0,  # retries are ours (the openai client defaults to 2)
                )
            except Exception as e:  # noqa: BLE001 - every failure is classified below
                failure = _classify(e)
                if not failure.retryable or attempts > self.max_retries:
                    raise self._error(failure.kind, attempts, traj, failure.detail) from e
            if abort.wait(self.backoff_s * 2 ** (attempts - 1)):
                raise TeacherError(f"teacher server {self.api_base}: cancelled after another request failed")

    def _error(self, kind: str, attempts: int, traj: Trajectory, detail: str) -> TeacherError:
        return TeacherError(
            f"teacher server {self.api_base} (model {self.model!r}): {kind} after {attempts} attempt(s) "
            f"(timeout {self.timeout_s:g}s, max_retries {self.max_retries}) while scoring trajectory "
            f"{traj.id}; no scores were written. Last error: {detail}"
        )


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
