"""Token-level distillation losses (pure torch, no model code).

Layout: every per-token tensor is [B, T]; full-vocabulary logits are [B, T, V]. The caller aligns
positions: the logits at position t must already predict token t (i.e. the caller has shifted the
model output by one), so logits, sampled tokens, mask and weights share the same [B, T] grid.

``mask`` is a float [B, T] tensor, 1 on student-sampled assistant tokens and 0 elsewhere (prompt,
observations, padding, truncated turns). ``weights`` is an optional float [B, T] tensor of detached
per-token weights (e.g. per-turn SOD weights); default ones.

Aggregation (all losses): token-mean over the whole batch,
    loss = sum_{b,t} loss_{b,t} * mask_{b,t} * weight_{b,t} / sum_{b,t} mask_{b,t},
so every sampled token counts the same regardless of which episode it is in, and weights rescale
tokens without changing the denominator. (The policy-gradient loss puts the weights inside its
advantage instead; see ``reverse_kl_pg_loss``.)

JSD convention (as TRL's GKD): beta = 0 is forward KL(p_T || p_S), beta = 1 is reverse KL(p_S || p_T).

The registry at the end maps (``loss.kind``, teacher signal) to the function the trainer calls on one
micro-batch; each entry declares the signal it reads, so a new loss is one decorated function here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from opd_agents.errors import ConfigError
from opd_agents.training.chunked import per_position
from opd_agents.training.policies.base import Needs
from opd_agents.training.policy import AssistantBatch, cross_entropy

if TYPE_CHECKING:
    from opd_agents.config import LossConfig

TailMode = Literal["bucket", "renormalize"]


@dataclass
class LossOutput:
    loss: Tensor  # scalar, differentiable
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# helpers


def _check_mask(per_token_shape: torch.Size, mask: Tensor, weights: Tensor | None) -> None:
    if mask.shape != per_token_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != per-token shape {tuple(per_token_shape)}")
    if weights is not None and weights.shape != per_token_shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} != per-token shape {tuple(per_token_shape)}")


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    # where(), not multiply: padding positions may hold inf/nan (e.g. -inf logprobs), and 0 * inf = nan.
    return torch.where(mask > 0, x, torch.zeros_like(x))


def _aggregate(per_token: Tensor, mask: Tensor, weights: Tensor | None) -> Tensor:
    """Token-mean over the batch: sum(loss * mask * weights) / number of mask tokens."""
    scale = mask if weights is None else mask * _masked(weights.detach(), mask)
    return (_masked(per_token, mask) * scale).sum() / mask.sum().clamp_min(1.0)


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    """Unweighted mean of a (detached) per-token quantity over mask tokens, for metrics."""
    return float((_masked(x.detach(), mask) * mask).sum() / mask.sum().clamp_min(1.0))


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) over the last dim from log-probabilities, with 0 * log 0 = 0.

    Both inputs are zeroed where p == 0 *before* subtracting, so -inf entries (a zero tail bucket,
    masked vocabulary) give neither nan values nor nan gradients.
    """
    support = logp > -math.inf
    zero = torch.zeros_like(logp)
    logp_s = torch.where(support, logp, zero)
    logq_s = torch.where(support, logq, zero)
    return torch.where(support, logp_s.exp() * (logp_s - logq_s), zero).sum(-1)


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def _generalized_jsd(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
    """Per-position generalized JSD(beta) over the last dim (TRL convention, endpoints exact).

    m = beta * p_T + (1 - beta) * p_S and JSD = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m). That
    formula tends to 0 at both endpoints (m collapses onto the distribution whose KL is weighted by
    1), so beta == 0 and beta == 1 are special-cased to forward and reverse KL.
    """
    _check_beta(beta)
    if beta == 0.0:
        return _kl(logp_t, logp_s)
    if beta == 1.0:
        return _kl(logp_s, logp_t)
    # log m by logsumexp in log space: no exp of large logits, no log of underflowed mixtures.
    log_m = torch.logsumexp(torch.stack([logp_t + math.log(beta), logp_s + math.log1p(-beta)]), dim=0)
    return beta * _kl(logp_t, log_m) + (1.0 - beta) * _kl(logp_s, log_m)


def _upcast(x: Tensor) -> Tensor:
    # float32 at least: a half-precision log-softmax over a 100k+ vocabulary loses the small probabilities.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.log_softmax(_upcast(logits) / temperature, dim=-1)


def _divergence_output(per_token: Tensor, mask: Tensor, weights: Tensor | None) -> LossOutput:
    _check_mask(per_token.shape, mask, weights)
    return LossOutput(
        loss=_aggregate(per_token, mask, weights),
        metrics={"divergence": _masked_mean(per_token, mask), "num_tokens": float(mask.sum())},
    )


# ---------------------------------------------------------------------------------------------------
# sampled-token reverse KL as a policy gradient (+ optional GRPO outcome advantage)


def reverse_kl_pg_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    weights: Tensor | None = None,
    clip_eps: float = 0.2,
    coef: float = 1.0,
    outcome_advantages: Tensor | None = None,
) -> LossOutput:
    """PPO-clipped policy-gradient loss with the sampled reverse-KL estimator as advantage.

    Args:
        logprobs: [B, T] log pi_theta(y_t) of the sampled tokens under the current student (with grad).
        old_logprobs: [B, T] log-probs of the same tokens under the sampling policy.
        teacher_logprobs: [B, T] log pi_T(y_t).
        mask, weights: see the module docstring.
        clip_eps: PPO clip range for the importance ratio.
        coef: c, the scale of the distillation term.
        outcome_advantages: optional [B] episode-level advantages (e.g. ``grpo_advantages``),
            broadcast over the episode's tokens (hybrid OPD + GRPO).

    A_t = A_outcome + c * w_t * (log pi_T(y_t) - log pi_old(y_t)), detached: the per-token sample of
    -(log pi_S - log pi_T), with the sampling policy standing in for pi_S. The weights live inside the
    advantage (they scale only the distillation term, as in the hybrid formula), so the aggregation here
    is a plain token-mean over mask tokens, not re-weighted a second time.

    rho = exp(logprobs - old_logprobs); loss_t = -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A).
    Fully on-policy (rho == 1) the gradient is -A_t * grad log pi_theta(y_t): tokens the teacher likes
    more than the student are pushed up, the others down.

    Metrics: reverse_kl (mean of old - teacher over mask tokens), clip_frac (fraction of mask tokens
    where the clipped branch is active, i.e. zero gradient), advantage_mean, ratio_mean.
    """
    _check_mask(logprobs.shape, mask, weights)
    if old_logprobs.shape != logprobs.shape or teacher_logprobs.shape != logprobs.shape:
        raise ValueError("logprobs, old_logprobs and teacher_logprobs must share one [B, T] shape")
    old = _masked(old_logprobs.detach(), mask)
    teacher = _masked(teacher_logprobs.detach(), mask)
    w = torch.ones_like(old) if weights is None else weights.detach()
    adv = coef * w * (teacher - old)
    if outcome_advantages is not None:
        if outcome_advantages.shape != logprobs.shape[:1]:
            raise ValueError(f"outcome_advantages must be [B], got {tuple(outcome_advantages.shape)}")
        adv = adv + outcome_advantages.detach().to(adv.dtype).unsqueeze(-1)

    ratio = torch.exp(_masked(logprobs, mask) - old)
    surr = ratio * adv
    surr_clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(surr, surr_clipped)

    return LossOutput(
        loss=_aggregate(per_token, mask, None),
        metrics={
            "reverse_kl": _masked_mean(old - teacher, mask),
            "clip_frac": _masked_mean((surr_clipped < surr).to(old.dtype), mask),
            "advantage_mean": _masked_mean(adv, mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "num_tokens": float(mask.sum()),
        },
    )


def grpo_advantages(
    rewards: Tensor, group_ids: Sequence[Hashable] | Tensor, eps: float = 1e-6
) -> Tensor:
    """Group-normalised outcome advantages: (r - mean_group) / (std_group + eps), one per episode.

    group_ids: one id per episode (ints, task ids, ...); episodes with the same id are the G rollouts
    of one task. std is the unbiased sample std (as GRPO/TRL). A group with a single member, or whose
    rewards are all equal, carries no ranking signal and gets 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got {tuple(rewards.shape)}")
    ids = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    if len(ids) != rewards.shape[0]:
        raise ValueError(f"{len(ids)} group ids for {rewards.shape[0]} rewards")
    index: dict[Hashable, list[int]] = {}
    for i, g in enumerate(ids):
        index.setdefault(g, []).append(i)

    r = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
    out = torch.zeros_like(r)
    for members in index.values():
        idx = torch.tensor(members, device=r.device)
        group = r[idx]
        # max == min, not std == 0: the float mean of equal values need not equal them exactly.
        if len(members) < 2 or bool(group.max() == group.min()):
            continue
        out[idx] = (group - group.mean()) / (group.std() + eps)
    return out


# ---------------------------------------------------------------------------------------------------
# full-vocabulary divergences (in-process teacher)


def _full_vocab(divergence: Callable[[Tensor, Tensor], Tensor], student_logits: Tensor, teacher_logits: Tensor,
                temperature: float) -> Tensor:
    """``divergence(log p_S, log p_T)`` per position [B, T] over the full vocabulary, a chunk of positions at
    a time (``chunked.per_position``: autograd keeps the logits, not the [B, T, V] intermediates); the teacher
    never receives gradient."""
    def chunk(student: Tensor, teacher: Tensor) -> Tensor:
        return divergence(_log_softmax(student, temperature), _log_softmax(teacher.detach(), temperature))
    return per_position(chunk, student_logits, teacher_logits)


def forward_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    weights: Tensor | None = None,
    temperature: float = 1.0,
) -> LossOutput:
    """Forward KL(p_T || p_S) = sum_v p_T (log p_T - log p_S) per position (mean seeking).

    Logits [B, T, V], already aligned so position t predicts token t. Both are divided by temperature.
    """
    per_token = _full_vocab(lambda logp_s, logp_t: _kl(logp_t, logp_s), student_logits, teacher_logits, temperature)
    return _divergence_output(per_token, mask, weights)


def reverse_kl_full_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    weights: Tensor | None = None,
    temperature: float = 1.0,
) -> LossOutput:
    """Full-vocabulary reverse KL(p_S || p_T) = sum_v p_S (log p_S - log p_T) per position (mode seeking)."""
    return _divergence_output(_full_vocab(_kl, student_logits, teacher_logits, temperature), mask, weights)


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    beta: float,
    weights: Tensor | None = None,
    temperature: float = 1.0,
) -> LossOutput:
    """Generalised JSD(beta) of GKD over the full vocabulary.

    m = beta * p_T + (1 - beta) * p_S; loss = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m), computed in
    log space. Convention (TRL): beta = 0 -> forward KL(p_T || p_S), beta = 1 -> reverse KL(p_S || p_T);
    both endpoints are special-cased because the mixture formula itself goes to 0 there. For
    0 < beta < 1 the value is at most the binary entropy of beta (<= log 2).
    """
    per_token = _full_vocab(lambda logp_s, logp_t: _generalized_jsd(logp_s, logp_t, beta), student_logits,
                            teacher_logits, temperature)
    return _divergence_output(per_token, mask, weights)


# ---------------------------------------------------------------------------------------------------
# top-k divergences (server teacher returning only its top-k logprobs per position)


def _topk_support(
    student_logits: Tensor, teacher_topk_ids: Tensor, teacher_topk_logprobs: Tensor, tail: TailMode
) -> tuple[Tensor, Tensor, Tensor]:
    """(student log-probs, teacher log-probs, teacher tail mass) on the top-k(+1) support."""
    ids_shape = teacher_topk_ids.shape
    if ids_shape != teacher_topk_logprobs.shape or ids_shape[:-1] != student_logits.shape[:-1]:
        raise ValueError("teacher top-k ids/logprobs must both be [B, T, K] with student_logits [B, T, V]")
    logits = _upcast(student_logits)
    t_lp = teacher_topk_logprobs.detach().to(logits.dtype)
    t_tail = (-torch.expm1(torch.logsumexp(t_lp, dim=-1))).clamp_min(0.0)
    if tail == "renormalize":
        gathered = logits.gather(-1, teacher_topk_ids)
        return F.log_softmax(gathered, dim=-1), F.log_softmax(t_lp, dim=-1), t_tail
    if tail == "bucket":
        # gather then subtract the normaliser: no [B, T, V] log-softmax is materialised.
        s_lp = logits.gather(-1, teacher_topk_ids) - torch.logsumexp(logits, dim=-1, keepdim=True)
        tiny = torch.finfo(logits.dtype).tiny
        # 1 - sum p as -expm1(log sum p): no cancellation when the top-k holds nearly all the mass.
        s_tail = -torch.expm1(torch.logsumexp(s_lp, dim=-1))
        s_full = torch.cat([s_lp, s_tail.clamp_min(tiny).log().unsqueeze(-1)], dim=-1)
        t_full = torch.cat([t_lp, t_tail.clamp_min(tiny).log().unsqueeze(-1)], dim=-1)
        return s_full, t_full, t_tail
    raise ValueError(f"tail must be 'bucket' or 'renormalize', got {tail!r}")


def _topk_output(per_token: Tensor, t_tail: Tensor, mask: Tensor, weights: Tensor | None) -> LossOutput:
    out = _divergence_output(per_token, mask, weights)
    # How much teacher mass the top-k misses: large values mean k is too small for this teacher.
    out.metrics["teacher_tail_mass"] = _masked_mean(t_tail, mask)
    return out


def topk_forward_kl_loss(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    weights: Tensor | None = None,
    tail: TailMode = "bucket",
) -> LossOutput:
    """Forward KL(p_T || p_S) on the teacher's top-k support, for teachers that return only top-k logprobs.

    student_logits [B, T, V] (aligned: position t predicts token t); teacher_topk_ids [B, T, K] long,
    distinct per position (a duplicate would count its mass twice); teacher_topk_logprobs [B, T, K] the
    teacher's full-vocabulary log-probs of those ids. The mass outside the k ids is handled by ``tail``:

    - "renormalize": both distributions are restricted to the k ids and renormalised there (teacher by
      a log-softmax of its k logprobs, student by a log-softmax of its k gathered logits); the leftover
      mass is dropped on both sides, so only the relative order inside the top-k is trained.
    - "bucket": the k ids keep their true full-vocabulary probabilities and one extra entry holds the
      rest: teacher 1 - sum(top-k) (clamped >= 0, since rounded server logprobs can sum past 1),
      student 1 - sum of its probs on the same ids; the KL runs over these k + 1 entries, so the
      student is also taught how much mass to leave outside the teacher's top-k. Both tails are floored
      at the smallest positive float to keep the log finite; a zero tail then contributes ~0.

    With k = V both modes equal ``forward_kl_loss``. Extra metric: teacher_tail_mass (mean over mask).
    """
    logp_s, logp_t, t_tail = _topk_support(student_logits, teacher_topk_ids, teacher_topk_logprobs, tail)
    return _topk_output(_kl(logp_t, logp_s), t_tail, mask, weights)


def topk_generalized_jsd_loss(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    beta: float,
    weights: Tensor | None = None,
    tail: TailMode = "bucket",
) -> LossOutput:
    """Generalised JSD(beta) on the teacher's top-k(+1) support; same beta convention and tail modes."""
    logp_s, logp_t, t_tail = _topk_support(student_logits, teacher_topk_ids, teacher_topk_logprobs, tail)
    return _topk_output(_generalized_jsd(logp_s, logp_t, beta), t_tail, mask, weights)


# ---------------------------------------------------------------------------------------------------
# registry: what the trainer calls on one micro-batch, keyed by (loss.kind, the teacher signal it reads)


@dataclass
class TeacherTensors:
    """One micro-batch's teacher signal on its AssistantBatch's [B, N] grid; only what the loss needs is set."""

    logprobs: Tensor | None = None  # [B, N] log pi_T of the sampled tokens
    logits: Tensor | None = None  # [B, N, V] full-vocabulary logits (the student logits' dtype)
    topk_ids: Tensor | None = None  # [B, N, K] best first (0 on padding)
    topk_logprobs: Tensor | None = None  # [B, N, K] (-1e4 on padding)


# (student batch, teacher tensors, loss config, GRPO outcome advantages [B] or None) -> loss
LossFn = Callable[[AssistantBatch, TeacherTensors, "LossConfig", Tensor | None], LossOutput]


@dataclass(frozen=True)
class LossSpec:
    kind: str
    needs: Needs  # "none": no teacher; "logprobs": sampled tokens; "topk": top-k ids + logprobs; "logits": full
    fn: LossFn


LOSSES: dict[tuple[str, Needs], LossSpec] = {}
SFT = "sft"  # the loss of off-policy batches without teacher distributions; not a loss.kind


def register_loss(kind: str, needs: Needs) -> Callable[[LossFn], LossFn]:
    """Decorator: ``fn`` is loss.kind=``kind`` on batches whose teacher signal is ``needs``. A "logprobs"
    entry is used on on-policy batches only (a policy gradient on the student's own samples); otherwise
    loss.top_k > 0 picks the "topk" entry and loss.top_k = 0 the "logits" one."""
    def add(fn: LossFn) -> LossFn:
        if (kind, needs) in LOSSES:
            raise ValueError(f"loss {kind!r} reading {needs!r} is registered twice")
        LOSSES[(kind, needs)] = LossSpec(kind, needs, fn)
        return fn
    return add


def loss_kinds() -> list[str]:
    """The values loss.kind accepts."""
    return sorted({kind for kind, _ in LOSSES} - {SFT})


def select_loss(kind: str, top_k: int, on_policy: bool, sft: bool) -> LossSpec:
    """The registered loss of a micro-batch (``sft``: the batch has no teacher distributions)."""
    if sft:
        return LOSSES[(SFT, "none")]
    if on_policy and (kind, "logprobs") in LOSSES:
        return LOSSES[(kind, "logprobs")]
    needs: Needs = "topk" if top_k else "logits"
    if (kind, needs) not in LOSSES:
        raise ConfigError(f"loss.kind={kind} has no {'top-k' if top_k else 'full-vocabulary'} variant; "
                          f"set loss.top_k {'= 0' if top_k else '> 0'}")
    return LOSSES[(kind, needs)]


@register_loss(SFT, "none")
def _sft(batch: AssistantBatch, teacher: TeacherTensors, cfg: LossConfig, adv: Tensor | None) -> LossOutput:
    nll = cross_entropy(batch)
    return LossOutput(nll, {"nll": nll.item()})


@register_loss("reverse_kl", "logprobs")
def _reverse_kl_pg(batch: AssistantBatch, teacher: TeacherTensors, cfg: LossConfig, adv: Tensor | None) -> LossOutput:
    assert teacher.logprobs is not None
    adv = adv.to(batch.mask.device) if adv is not None else None
    # One update per batch: the sampling policy is the current student, so the trainer's own logprobs are
    # pi_old (ratio 1, the exact on-policy gradient); the engine's recorded ones differ by numerics only
    # (batch shapes, another engine), which tis_cap corrects for when asked.
    logprobs = batch.logprobs  # a property that runs the log-softmax over the vocabulary: read once
    old = logprobs.detach()
    weights = batch.weights
    if cfg.tis_cap is not None:
        weights = weights * torch.exp(old - batch.sampling_logprobs).clamp(max=cfg.tis_cap)
    return reverse_kl_pg_loss(logprobs, old, teacher.logprobs, batch.mask, weights, clip_eps=cfg.clip_eps,
                              coef=cfg.kl_coef, outcome_advantages=adv)


@register_loss("reverse_kl", "logits")
def _reverse_kl_full(batch: AssistantBatch, teacher: TeacherTensors, cfg: LossConfig, adv: Tensor | None) -> LossOutput:
    assert teacher.logits is not None
    return reverse_kl_full_loss(batch.logits, teacher.logits, batch.mask, batch.weights)


@register_loss("reverse_kl", "topk")
def _reverse_kl_topk(batch: AssistantBatch, teacher: TeacherTensors, cfg: LossConfig, adv: Tensor | None) -> LossOutput:
    assert teacher.topk_ids is not None and teacher.topk_logprobs is not None
    return topk_generalized_jsd_loss(batch.logits, teacher.topk_ids, teacher.topk_logprobs, batch.mask, 1.0,
                                     batch.weights, tail=cfg.tail)


@register_loss("forward_kl", "logits")
def _forward_kl(batch: AssistantBatch, teacher: TeacherTensors, cfg: LossConfig, adv: Tensor | None) -> LossOutput:
    assert teacher.logits is not None
    return forward_kl_loss(batch.logits, teacher.logits, batch.mask, batch.weights)


@register_loss("forward_kl", "topk")
def _forward_kl_topk(batch: AssistantBatch, teacher: TeacherTensors, cfg: LossConfig, adv: Tensor | None) -> LossOutput:
    assert teacher.topk_ids is not None and teacher.topk_logprobs is not None
    return topk_forward_kl_loss(batch.logits, teacher.topk_ids, teacher.topk_logprobs, batch.mask, batch.weights,
                                tail=cfg.tail)


@register_loss("jsd", "logits")
def _jsd(batch: AssistantBatch, teacher: TeacherTensors, cfg: LossConfig, adv: Tensor | None) -> LossOutput:
    assert teacher.logits is not None
    return generalized_jsd_loss(batch.logits, teacher.logits, batch.mask, cfg.beta, batch.weights)


@register_loss("jsd", "topk")
def _jsd_topk(batch: AssistantBatch, teacher: TeacherTensors, cfg: LossConfig, adv: Tensor | None) -> LossOutput:
    assert teacher.topk_ids is not None and teacher.topk_logprobs is not None
    return topk_generalized_jsd_loss(batch.logits, teacher.topk_ids, teacher.topk_logprobs, batch.mask, cfg.beta,
                                     batch.weights, tail=cfg.tail)
