"""The transformers engine: continuous batching over per-episode KV caches, on the caller's event loop.

Requests arrive from many episodes at any time. Each loop of the serving task (1) admits the waiting requests:
their cached sessions (the episode's KV from earlier turns) are merged into one batch, only the new ids
(the observation after the last turn, or a fresh prompt) are prefilled, and the first token is sampled;
(2) decodes one token for every running row. A row that stops leaves the batch at once (no pad decoding)
and its cache is kept, dense, as the episode's session until the next request for it, so a waiting episode
costs no compute while its tool runs. Sampling uses one RNG per request, so what a request samples does
not depend on what else shares the batch (up to floating-point differences between batch shapes). Those
differences are why a deterministic rollout gates admission (``admission_gate``: wait until no env step is
in flight) and requests are admitted in their ``order``: the batches are then the same in every run.

The same task also scores: a ``ScoreRequest`` prefills an episode's new ids and returns log pi of its
last ``n_scored`` tokens (the online teacher scores each turn this way, reusing the teacher's cache).

The model runs on the thread of the event loop that awaits the requests (a task on that loop, one decode
step between yields), not in a thread of its own: torch's OpenMP runtime shortens its threads' spin-waits
for every team once more than one thread owns a team, and on a small CPU that made each forward 30-60%
slower — the engine's and the trainer's alike (measured: bench/engine_threads.py).
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import cast

import torch
from transformers import PreTrainedModel

from opd_agents.rollout.engine import AdmissionGate, Completion, CompletionRequest, Finish, register_engine
from opd_agents.rollout.kv import MIN_SHARED_PREFIX, KVBatch, KVSession, autocast, common_prefix_len, weights_version
from opd_agents.rollout.renderer import Renderer

_STOP_TAIL_TOKENS = 8  # how many trailing tokens are decoded to look for a stop string


@dataclass(frozen=True)
class ScoreRequest:
    ids: list[int]  # the whole sequence so far; its last ``n_scored`` ids are scored
    n_scored: int
    session: str | None = None
    keep_logits: bool = False  # also return the fp32 logits at the scored positions [n, V]
    keep_topk: int = 0  # also return the top-k ids at the scored positions
    order: int = 0  # as ``CompletionRequest.order``: requests admitted together are batched in this order


@dataclass
class Scores:
    logprobs: list[float]
    logits: torch.Tensor | None = None
    topk: list[list[int]] | None = None


@dataclass
class _Work:
    request: CompletionRequest | ScoreRequest
    future: asyncio.Future[Completion | Scores]
    generator: torch.Generator | None = None
    sampled: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def _ids_and_need(req: CompletionRequest | ScoreRequest) -> tuple[list[int], int]:
    """A request's sequence, and how many of its last positions must be fed for the logits it reads."""
    if isinstance(req, CompletionRequest):
        return req.prompt_ids, 1
    return req.ids, req.n_scored + 1


class HFEngine:
    """A transformers causal LM behind the engine protocol (``SamplingEngine``) plus ``score``."""

    def __init__(self, model: PreTrainedModel, renderer: Renderer, max_rows: int = 64,
                 compute_dtype: torch.dtype | None = None) -> None:
        """``compute_dtype``: run forwards in this dtype (the trainer's mixed precision), on a copy of the
        weights in it that follows the model's (``runner``)."""
        self.model = model.eval()
        self.compute_dtype = compute_dtype
        # Under mixed precision forwards run on a copy of the weights in the compute dtype, brought up to date
        # whenever the model's change: autocast alone would cast every weight again at every token step (on
        # an AMX CPU that is slower than fp32: SmolLM2, 8 rows, 193 ms per step vs 139 ms; bf16 weights 80 ms).
        self.runner = _low_precision_copy(model, compute_dtype) if compute_dtype is not None else self.model
        self._runner_version = weights_version(model)
        self.renderer = renderer
        tok = renderer.tokenizer
        self.pad_token_id = int(tok.pad_token_id if tok.pad_token_id is not None else renderer.eot_id)
        self.stop_ids = set(renderer.stop_token_ids)
        self.max_rows = max_rows
        self.tokens_fed = 0  # ids run through the model (prefill + decode): what the cache saved shows here
        self.tokens_shared = 0  # prompt ids not computed thanks to the shared prefix (net of computing it)
        self._prefix: KVSession | None = None
        self._prefix_version = -1
        self._pending: deque[_Work] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None  # the serving task, on the loop of the latest requests
        self._sessions: dict[str, KVSession] = {}
        self._lock = threading.Lock()
        self.admission_gate: AdmissionGate | None = None  # set by a deterministic rollout (GatedEngine)

    # ---- protocol ---------------------------------------------------------------------------------
    async def complete(self, request: CompletionRequest) -> Completion:
        generator = None
        if request.temperature > 0 and request.seed is not None:
            # On the CPU whatever the model's device: one uniform per token, so a seed samples alike on both.
            generator = torch.Generator().manual_seed(request.seed)
        result = await self._submit(request, generator)
        assert isinstance(result, Completion)
        return result

    async def score(self, request: ScoreRequest) -> Scores:
        if not 0 < request.n_scored < len(request.ids):
            raise ValueError(f"n_scored must be in 1..{len(request.ids) - 1}, got {request.n_scored}")
        result = await self._submit(request)
        assert isinstance(result, Scores)
        return result

    def release(self, session: str) -> None:
        with self._lock:
            self._sessions.pop(session, None)

    def load_weights(self, model: torch.nn.Module) -> None:
        """The engine runs ``model`` itself: nothing to copy, but cached sessions hold old activations."""
        if model is not self.model:
            raise ValueError("HFEngine samples with the module it was built with; build a new engine for another")
        with self._lock:
            self._sessions.clear()
        self._prefix = None
        self._sync_runner(force=True)

    def _sync_runner(self, force: bool = False) -> None:
        """Copy the model's weights into the runner when they changed since the last copy (or ``force``)."""
        if self.runner is self.model:  # fp32: nothing to follow (checked first: this runs every engine step)
            return
        version = weights_version(self.model)
        if version == self._runner_version and not force:
            return
        with torch.no_grad():
            for low, full in zip(self.runner.parameters(), self.model.parameters(), strict=True):
                low.copy_(full)
        self._runner_version = version

    def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done() and not task.get_loop().is_closed():
            task.get_loop().call_soon_threadsafe(task.cancel)  # it fails what it still holds
        with self._lock:
            self._sessions.clear()
        self._prefix = None

    def _submit(self, request: CompletionRequest | ScoreRequest,
                generator: torch.Generator | None = None) -> asyncio.Future[Completion | Scores]:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            # A new loop (each Rollout.run has its own): serve there. What the old task held is finished.
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._serve(), name="opd-hf-engine")
        work = _Work(request, loop.create_future(), generator)
        self._pending.append(work)
        assert self._wakeup is not None
        self._wakeup.set()
        return work.future

    # ---- serving ----------------------------------------------------------------------------------
    async def _serve(self) -> None:
        """Admit what is waiting, decode one token for every running row, yield so that episodes can send
        their next requests; sleep while there is nothing to do."""
        running = KVBatch(self.runner, self.pad_token_id)
        works: list[_Work] = []
        device = next(self.model.parameters()).device
        assert self._wakeup is not None
        try:
            while True:
                if not works and not self._pending:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                if self.admission_gate is not None:
                    await self.admission_gate()
                new = self._take_pending(self.max_rows - len(works))
                # grad mode and autocast are per thread and would leak into other tasks across an await: set
                # them around the synchronous work only.
                with torch.no_grad(), autocast(device, self.compute_dtype):
                    try:
                        self._sync_runner()
                        if new:
                            running, works = self._admit(new, running, works)
                        if works:
                            running, works = self._decode(running, works)
                    except Exception as e:  # noqa: BLE001 - a failed forward fails its requests, not the engine
                        self._fail(works + new, e)
                        running, works = KVBatch(self.runner, self.pad_token_id), []
                await asyncio.sleep(0)
        except asyncio.CancelledError:  # closed, or its loop shut down
            self._fail(works + list(self._pending), RuntimeError("engine closed"))
            self._pending.clear()
            raise

    def _take_pending(self, room: int) -> list[_Work]:
        """Up to ``room`` waiting requests, by their ``order`` (not arrival: threads decide that)."""
        if not self._pending:  # the common case on a decode step
            return []
        ordered = sorted(self._pending, key=lambda w: w.request.order)
        self._pending = deque(ordered[room:])
        return ordered[:room]

    @staticmethod
    def _fail(works: list[_Work], error: BaseException) -> None:
        for w in works:
            if not w.future.done():
                w.future.set_exception(error)

    def _resume(self, work: _Work) -> tuple[KVSession | None, list[int]]:
        """The request's cached session (cropped to what still matches) and the ids left to feed."""
        req = work.request
        ids, need = _ids_and_need(req)
        with self._lock:
            session = self._sessions.pop(req.session, None) if req.session else None
        if session is None:
            return None, list(ids)
        n = 0
        limit = min(len(session.tokens), len(ids) - need)
        while n < limit and session.tokens[n] == ids[n]:
            n += 1
        return (session.crop(n) if n < len(session.tokens) else session), list(ids[n:])

    def _keep_session(self, work: _Work, batch: KVBatch, row: int) -> None:
        if work.request.session:
            session = batch.session(row)
            with self._lock:
                self._sessions[work.request.session] = session

    def _share_prefix(self, new: list[_Work], resumed: list[tuple[KVSession | None, list[int]]]) -> None:
        """New episodes (no session yet) start from one cached copy of their common prompt prefix (system
        prompt + tool schemas; with group sampling the whole task prompt): it is computed once, kept while
        the weights stay the same, and each episode feeds only what follows it."""
        fresh = [i for i, (session, _) in enumerate(resumed) if session is None]
        if not fresh:
            return
        # A row must still feed the positions whose logits it reads.
        limit = min(len(resumed[i][1]) - _ids_and_need(new[i].request)[1] for i in fresh)
        version = weights_version(self.model)
        prefix = self._prefix if self._prefix is not None and self._prefix_version == version else None
        if prefix is not None and (len(prefix.tokens) > limit or
                                   any(resumed[i][1][: len(prefix.tokens)] != prefix.tokens for i in fresh)):
            prefix = None
        if prefix is None and len(fresh) > 1:
            n = min(common_prefix_len([resumed[i][1] for i in fresh]), limit)
            if n >= MIN_SHARED_PREFIX:
                batch = KVBatch.from_sessions(self.runner, self.pad_token_id, [None])
                batch.extend([resumed[fresh[0]][1][:n]])
                self.tokens_fed += n
                self.tokens_shared -= n  # net saving: the rows below take it n ids each
                prefix = self._prefix = batch.session(0)
                self._prefix_version = version
        if prefix is not None:
            for i in fresh:
                resumed[i] = (prefix, resumed[i][1][len(prefix.tokens):])
                self.tokens_shared += len(prefix.tokens)

    def _admit(self, new: list[_Work], running: KVBatch, works: list[_Work]) -> tuple[KVBatch, list[_Work]]:
        resumed = [self._resume(w) for w in new]
        self._share_prefix(new, resumed)
        batch = KVBatch.from_sessions(self.runner, self.pad_token_id, [s for s, _ in resumed])
        suffixes = [ids for _, ids in resumed]
        keep_last = max(_ids_and_need(w.request)[1] for w in new)
        self.tokens_fed += sum(len(s) for s in suffixes)
        logits = batch.extend(suffixes, keep_last=keep_last)  # [n, keep_last, V]
        still: list[int] = []
        sampling = [row for row, w in enumerate(new) if isinstance(w.request, CompletionRequest)]
        sampled = dict(zip(sampling, zip(*_sample([new[r] for r in sampling], logits[sampling, -1]))))
        for row, work in enumerate(new):
            req = work.request
            if isinstance(req, ScoreRequest):
                work.future.set_result(self._scores(logits[row, -req.n_scored - 1 : -1], req))
                self._keep_session(work, batch, row)
            elif self._advance(work, *sampled[row]):
                self._keep_session(work, batch, row)
            else:
                still.append(row)
        batch.keep(still)
        running.absorb(batch)
        return running, works + [new[r] for r in still]

    def _decode(self, running: KVBatch, works: list[_Work]) -> tuple[KVBatch, list[_Work]]:
        self.tokens_fed += len(works)
        logits = running.extend([[w.sampled[-1]] for w in works])[:, -1]
        still = []
        for row, (work, token, logprob) in enumerate(zip(works, *_sample(works, logits), strict=True)):
            if self._advance(work, token, logprob):
                self._keep_session(work, running, row)
            else:
                still.append(row)
        running.keep(still)
        return running, [works[r] for r in still]

    def _advance(self, work: _Work, token: int, logprob: float) -> bool:
        """Record the request's next token; True (and the future resolved) if it stopped."""
        req = work.request
        assert isinstance(req, CompletionRequest)
        work.sampled.append(token)
        work.logprobs.append(logprob)
        finish: Finish | None = None
        if token in self.stop_ids:
            finish = "stop"
        elif self._is_tool_stop(work.sampled):
            finish = "tool_call"
        elif len(work.sampled) >= req.max_tokens:
            finish = "length"
        if finish is not None:
            work.future.set_result(Completion(work.sampled, work.logprobs, finish))
        return finish is not None

    def _is_tool_stop(self, ids: list[int]) -> bool:
        stops = self.renderer.stop_strings
        if not stops or ids[-1] not in self.renderer.stop_string_enders():
            return False
        tail = self.renderer.tokenizer.decode(ids[-_STOP_TAIL_TOKENS:]).rstrip()
        return any(tail.endswith(s) for s in stops)

    @staticmethod
    def _scores(logits: torch.Tensor, req: ScoreRequest) -> Scores:
        targets = torch.tensor(req.ids[-req.n_scored:], dtype=torch.long, device=logits.device)
        logp = torch.log_softmax(logits, dim=-1)
        return Scores(logp.gather(1, targets[:, None]).squeeze(1).tolist(),
                      logits.clone() if req.keep_logits else None,
                      logits.topk(req.keep_topk, dim=-1).indices.tolist() if req.keep_topk else None)


def _sample(works: list[_Work], logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """Each completion's next token from ``logits`` [n, V], all rows at once (one transfer from the device).

    Inverse-CDF sampling: a row draws one uniform from its request's own generator and takes the token where
    its cumulative distribution passes it, so what a request samples does not depend on the batch.
    """
    if not works:
        return [], []
    reqs = [cast(CompletionRequest, w.request) for w in works]
    temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in reqs], device=logits.device)
    scaled = torch.log_softmax(logits.float() / temps[:, None], dim=-1)
    tokens = scaled.argmax(dim=-1)  # kept for the greedy rows
    rows = [i for i, r in enumerate(reqs) if r.temperature > 0]
    if rows:
        probs = scaled[rows].exp()
        nucleus = [(j, reqs[i].top_p) for j, i in enumerate(rows) if reqs[i].top_p < 1.0]
        if nucleus:
            cut = [j for j, _ in nucleus]
            probs[cut] = _top_p_filter(probs[cut], torch.tensor([p for _, p in nucleus], device=probs.device))
        cdf = probs.cumsum(dim=-1)
        u = torch.cat([torch.rand(1, generator=works[i].generator) for i in rows]).to(cdf.device)
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        tokens[rows] = picked.clamp(max=cdf.shape[1] - 1)
    logprobs = scaled.gather(1, tokens[:, None]).squeeze(1)
    return tokens.tolist(), logprobs.tolist()


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero what lies outside each row's nucleus (``top_p`` [n]); rows are not renormalised."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p[:, None]
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def _low_precision_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of ``model`` with its parameters in ``dtype`` (buffers such as rotary frequencies stay
    as they are: rounding them would move every position)."""
    runner = copy.deepcopy(model).eval()
    for param in runner.parameters():
        param.requires_grad_(False)
        param.grad = None
        param.data = param.data.to(dtype)
    return runner


@register_engine("hf")
def _hf_engine(model: PreTrainedModel, renderer: Renderer, max_rows: int = 64,
               compute_dtype: torch.dtype | None = None) -> HFEngine:
    return HFEngine(model, renderer, max_rows, compute_dtype)
