"""Closed-form values, conventions and gradient directions of opd_agents.training.losses (pure torch, fast)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from opd_agents.config import parse_config
from opd_agents.errors import ConfigError
from opd_agents.training.chunked import per_position
from opd_agents.training.losses import (
    LOSSES as REGISTRY,
    SFT,
    LossOutput,
    _aggregate,
    _generalized_jsd,
    _kl,
    forward_kl_loss,
    generalized_jsd_loss,
    grpo_advantages,
    loss_kinds,
    register_loss,
    reverse_kl_full_loss,
    reverse_kl_pg_loss,
    select_loss,
    topk_forward_kl_loss,
    topk_generalized_jsd_loss,
)

D = torch.float64
P_T = [0.5, 0.3, 0.2]
P_S = [0.2, 0.5, 0.3]
# KL by hand on the two V=3 distributions above.
FWD = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
REV = 0.2 * math.log(0.2 / 0.5) + 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.2)
M = [0.35, 0.4, 0.25]  # (P_T + P_S) / 2
JSD_HALF = 0.5 * sum(t * math.log(t / m) for t, m in zip(P_T, M)) + 0.5 * sum(
    s * math.log(s / m) for s, m in zip(P_S, M)
)


def logits_of(*dists: list[float]) -> torch.Tensor:
    """[1, T, V] logits (log-probs) for T hand-written distributions."""
    return torch.tensor([dists], dtype=D).log()


def ones(t: int) -> torch.Tensor:
    return torch.ones(1, t, dtype=D)


def rand_logits(b: int = 2, t: int = 3, v: int = 5, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(b, t, v, dtype=D, generator=torch.Generator().manual_seed(seed)) * scale


def full_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    lp, ids = torch.log_softmax(teacher_logits, -1).topk(k, dim=-1)
    return ids, lp


# ------------------------------------------------------------------------------ full vocabulary


def test_forward_and_reverse_kl_closed_form() -> None:
    s, t = logits_of(P_S), logits_of(P_T)
    out = forward_kl_loss(s, t, ones(1))
    assert isinstance(out, LossOutput) and out.loss.dim() == 0
    assert out.loss.item() == pytest.approx(FWD, abs=1e-12)
    assert out.metrics["divergence"] == pytest.approx(FWD, abs=1e-12)
    assert reverse_kl_full_loss(s, t, ones(1)).loss.item() == pytest.approx(REV, abs=1e-12)


def test_jsd_endpoints_and_half() -> None:
    s, t = logits_of(P_S), logits_of(P_T)
    assert generalized_jsd_loss(s, t, ones(1), beta=0.0).loss.item() == pytest.approx(FWD, abs=1e-12)
    assert generalized_jsd_loss(s, t, ones(1), beta=1.0).loss.item() == pytest.approx(REV, abs=1e-12)
    assert generalized_jsd_loss(s, t, ones(1), beta=0.5).loss.item() == pytest.approx(JSD_HALF, abs=1e-12)


def test_jsd_general_beta_by_hand() -> None:
    beta = 0.3
    m = [beta * t + (1 - beta) * s for t, s in zip(P_T, P_S)]
    want = beta * sum(t * math.log(t / mm) for t, mm in zip(P_T, m)) + (1 - beta) * sum(
        s * math.log(s / mm) for s, mm in zip(P_S, m)
    )
    got = generalized_jsd_loss(logits_of(P_S), logits_of(P_T), ones(1), beta=beta).loss.item()
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_bounded_by_binary_entropy(beta: float) -> None:
    s, t = rand_logits(seed=1, scale=10.0), rand_logits(seed=2, scale=10.0)
    bound = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
    out = generalized_jsd_loss(s, t, torch.ones(2, 3, dtype=D), beta=beta)
    assert 0.0 <= out.loss.item() <= bound <= math.log(2) + 1e-12
    # Near-disjoint supports reach the bound.
    far = generalized_jsd_loss(logits_of([1 - 1e-15, 1e-15]), logits_of([1e-15, 1 - 1e-15]), ones(1), beta=beta)
    assert far.loss.item() == pytest.approx(bound, abs=1e-9)


def test_temperature_divides_both_logits() -> None:
    s, t = rand_logits(seed=3), rand_logits(seed=4)
    mask = torch.ones(2, 3, dtype=D)
    a = forward_kl_loss(s, t, mask, temperature=2.0).loss
    b = forward_kl_loss(s / 2.0, t / 2.0, mask).loss
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_half_precision_logits_are_upcast() -> None:
    s, t = rand_logits(seed=5), rand_logits(seed=6)
    mask = torch.ones(2, 3, dtype=D)
    ref = forward_kl_loss(s, t, mask).loss.item()
    low = forward_kl_loss(s.bfloat16(), t.bfloat16(), mask.bfloat16()).loss
    assert low.dtype == torch.float32 and low.item() == pytest.approx(ref, rel=0.05)


def test_invalid_beta_and_tail_raise() -> None:
    s = rand_logits()
    with pytest.raises(ValueError):
        generalized_jsd_loss(s, s, torch.ones(2, 3, dtype=D), beta=1.5)
    ids, lp = full_topk(s, 2)
    with pytest.raises(ValueError):
        topk_forward_kl_loss(s, ids, lp, torch.ones(2, 3, dtype=D), tail="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        forward_kl_loss(s, s, torch.ones(2, 2, dtype=D))


# ------------------------------------------------------------------------------ shared properties


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], LossOutput]
# Every logit-based loss as fn(student_logits, teacher_logits, mask, weights); top-k ones use k = 3.
LOSSES: dict[str, LossFn] = {
    "fkl": forward_kl_loss,
    "rkl": reverse_kl_full_loss,
    "jsd0.5": lambda s, t, m, w: generalized_jsd_loss(s, t, m, 0.5, w),
    "jsd0.9": lambda s, t, m, w: generalized_jsd_loss(s, t, m, 0.9, w),
    "topk_fkl_bucket": lambda s, t, m, w: topk_forward_kl_loss(s, *full_topk(t, 3), m, w, tail="bucket"),
    "topk_fkl_renorm": lambda s, t, m, w: topk_forward_kl_loss(s, *full_topk(t, 3), m, w, tail="renormalize"),
    "topk_jsd_bucket": lambda s, t, m, w: topk_generalized_jsd_loss(s, *full_topk(t, 3), m, 0.5, w, tail="bucket"),
    "topk_jsd_renorm": lambda s, t, m, w: topk_generalized_jsd_loss(
        s, *full_topk(t, 3), m, 0.5, w, tail="renormalize"
    ),
}


def _all_losses(
    s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None
) -> dict[str, LossOutput]:
    return {name: fn(s, t, mask, weights) for name, fn in LOSSES.items()}


def test_zero_loss_when_student_equals_teacher() -> None:
    s = rand_logits(seed=7)
    for name, out in _all_losses(s, s.clone(), torch.ones(2, 3, dtype=D)).items():
        assert abs(out.loss.item()) < 1e-12, name
    lp = torch.log_softmax(s, -1)[..., 0]
    pg = reverse_kl_pg_loss(lp, lp.detach(), lp.detach(), torch.ones(2, 3, dtype=D))
    assert abs(pg.loss.item()) < 1e-12 and pg.metrics["reverse_kl"] == 0.0


def _per_position(s: torch.Tensor, t: torch.Tensor) -> dict[str, list[float]]:
    """Each loss evaluated on one position at a time (batch element 0)."""
    per: dict[str, list[float]] = {}
    for i in range(s.shape[1]):
        for name, out in _all_losses(s[:1, i : i + 1], t[:1, i : i + 1], ones(1)).items():
            per.setdefault(name, []).append(out.loss.item())
    return per


def test_mask_zeroes_tokens_and_sets_denominator() -> None:
    s, t = rand_logits(b=1, seed=8), rand_logits(b=1, seed=9)
    per = _per_position(s, t)
    mask = torch.tensor([[1.0, 0.0, 1.0]], dtype=D)
    s2 = s.clone()
    s2[0, 1] = torch.tensor([50.0, -50.0, 3.0, 0.0, 1.0])  # masked position: must not matter
    for name, out in _all_losses(s2, t, mask).items():
        assert out.loss.item() == pytest.approx((per[name][0] + per[name][2]) / 2, abs=1e-12), name
        assert out.metrics["num_tokens"] == 2.0


def test_weights_scale_per_token_contributions() -> None:
    s, t = rand_logits(b=1, seed=10), rand_logits(b=1, seed=11)
    per = _per_position(s, t)
    w = torch.tensor([[2.0, 0.5, 0.0]], dtype=D)
    for name, out in _all_losses(s, t, ones(3), w).items():
        want = (2.0 * per[name][0] + 0.5 * per[name][1]) / 3  # denominator = mask tokens, not weight sum
        assert out.loss.item() == pytest.approx(want, abs=1e-12), name


def test_sgd_step_reduces_each_divergence() -> None:
    t = rand_logits(seed=12)
    mask = torch.ones(2, 3, dtype=D)
    for name, fn in LOSSES.items():
        s = rand_logits(seed=13).requires_grad_(True)
        before = fn(s, t, mask, None).loss
        before.backward()
        with torch.no_grad():
            after = fn(s - 0.5 * s.grad, t, mask, None).loss  # type: ignore[operator]
        assert after.item() < before.item(), name


# ------------------------------------------------------------------------------ top-k


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("beta", [None, 0.0, 0.3, 1.0])
def test_topk_with_full_k_equals_full_vocab(tail: str, beta: float | None) -> None:
    t = rand_logits(seed=14)
    ids, lp = full_topk(t, t.shape[-1])  # sorted by teacher prob, so ids are a permutation
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=D)
    s_full = rand_logits(seed=15).requires_grad_(True)
    s_topk = s_full.detach().clone().requires_grad_(True)
    if beta is None:
        full = forward_kl_loss(s_full, t, mask).loss
        topk = topk_forward_kl_loss(s_topk, ids, lp, mask, tail=tail).loss  # type: ignore[arg-type]
    else:
        full = generalized_jsd_loss(s_full, t, mask, beta).loss
        topk = topk_generalized_jsd_loss(s_topk, ids, lp, mask, beta, tail=tail).loss  # type: ignore[arg-type]
    full.backward()
    topk.backward()
    assert topk.item() == pytest.approx(full.item(), abs=1e-10)
    torch.testing.assert_close(s_topk.grad, s_full.grad, atol=1e-10, rtol=0)


# V = 4, teacher top-2 given in non-sorted id order [1, 0] to exercise the gather.
T4 = [0.5, 0.3, 0.15, 0.05]
S4 = [0.4, 0.2, 0.3, 0.1]
IDS = torch.tensor([[[1, 0]]])
TLP = torch.tensor([[[math.log(0.3), math.log(0.5)]]], dtype=D)


def test_topk_bucket_hand_example() -> None:
    # Support {0, 1, tail}: teacher (0.5, 0.3, 0.2), student (0.4, 0.2, 0.4).
    want = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.4)
    out = topk_forward_kl_loss(logits_of(S4), IDS, TLP, ones(1), tail="bucket")
    assert out.loss.item() == pytest.approx(want, abs=1e-12)
    assert out.metrics["teacher_tail_mass"] == pytest.approx(0.2, abs=1e-12)
    rev = 0.4 * math.log(0.4 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.4 * math.log(0.4 / 0.2)
    jsd1 = topk_generalized_jsd_loss(logits_of(S4), IDS, TLP, ones(1), beta=1.0, tail="bucket")
    assert jsd1.loss.item() == pytest.approx(rev, abs=1e-12)


def test_topk_renormalize_hand_example() -> None:
    # Renormalised over {0, 1}: teacher (0.625, 0.375), student (2/3, 1/3).
    want = 0.625 * math.log(0.625 / (2 / 3)) + 0.375 * math.log(0.375 / (1 / 3))
    out = topk_forward_kl_loss(logits_of(S4), IDS, TLP, ones(1), tail="renormalize")
    assert out.loss.item() == pytest.approx(want, abs=1e-12)


def test_topk_bucket_teacher_mass_over_one_is_clamped() -> None:
    # Rounded server logprobs summing past 1: tail clamped to 0, loss finite, equals KL over the k ids.
    tlp = torch.tensor([[[math.log(0.6), math.log(0.45)]]], dtype=D)
    s = logits_of(S4).requires_grad_(True)
    out = topk_forward_kl_loss(s, torch.tensor([[[0, 1]]]), tlp, ones(1), tail="bucket")
    out.loss.backward()
    want = 0.6 * math.log(0.6 / 0.4) + 0.45 * math.log(0.45 / 0.2)
    assert out.loss.item() == pytest.approx(want, abs=1e-9)
    assert out.metrics["teacher_tail_mass"] == 0.0 and torch.isfinite(s.grad).all()  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ sampled reverse-KL PG


def test_pg_on_policy_gradient_direction() -> None:
    # Token 0: teacher likes it more than the student (A > 0); token 1: less (A < 0).
    logits = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]], dtype=D, requires_grad=True)
    tokens = torch.tensor([[0, 0]])
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    teacher = lp.detach() + torch.tensor([[1.0, -1.0]], dtype=D)
    out = reverse_kl_pg_loss(lp, lp.detach(), teacher, ones(2))
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)  # -mean(A) = -(1 - 1) / 2
    assert out.metrics["reverse_kl"] == pytest.approx(0.0) and out.metrics["ratio_mean"] == 1.0
    lp.retain_grad()
    out.loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5, 0.5]], dtype=D))  # = -A / N
    with torch.no_grad():
        stepped = logits - 1.0 * logits.grad  # type: ignore[operator]
        new_lp = torch.log_softmax(stepped, -1).gather(-1, tokens[..., None])[..., 0]
    assert new_lp[0, 0] > lp[0, 0] and new_lp[0, 1] < lp[0, 1]


def test_pg_weights_and_coef_scale_advantage() -> None:
    old = torch.tensor([[-1.0, -2.0, -3.0]], dtype=D)
    teacher = torch.tensor([[-0.5, -2.5, -1.0]], dtype=D)
    lp = old.clone().requires_grad_(True)
    w = torch.tensor([[2.0, 1.0, 0.5]], dtype=D)
    out = reverse_kl_pg_loss(lp, old, teacher, ones(3), weights=w, coef=0.5)
    out.loss.backward()
    adv = 0.5 * w * (teacher - old)  # [0.5, -0.25, 0.5]
    torch.testing.assert_close(lp.grad, -adv / 3)
    assert out.metrics["advantage_mean"] == pytest.approx(adv.mean().item())
    assert out.metrics["reverse_kl"] == pytest.approx((old - teacher).mean().item())


def test_pg_clipping_zeroes_gradient() -> None:
    old = torch.zeros(1, 4, dtype=D)
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, -1, +1, -1
    lp = torch.tensor([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]], dtype=D, requires_grad=True)
    teacher = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=D)
    out = reverse_kl_pg_loss(lp, old, teacher, ones(4), clip_eps=0.2)
    out.loss.backward()
    g = lp.grad[0]  # type: ignore[index]
    assert g[0] == 0.0 and g[3] == 0.0  # outside the trust region in the advantage's direction
    assert g[1] > 0.0 and g[2] < 0.0  # moving back toward it keeps its gradient (-rho * A / N)
    assert g[1].item() == pytest.approx(1.5 / 4) and g[2].item() == pytest.approx(-0.5 / 4)
    assert out.metrics["clip_frac"] == pytest.approx(0.5)


def test_pg_masked_positions_ignore_nonfinite_values() -> None:
    lp = torch.tensor([[-1.0, 0.0]], dtype=D, requires_grad=True)
    old = torch.tensor([[-1.0, float("nan")]], dtype=D)
    teacher = torch.tensor([[-0.5, float("-inf")]], dtype=D)
    out = reverse_kl_pg_loss(lp, old, teacher, torch.tensor([[1.0, 0.0]], dtype=D))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-0.5)
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5, 0.0]], dtype=D))


def test_hybrid_adds_outcome_advantage() -> None:
    old = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]], dtype=D)
    teacher = torch.tensor([[-0.5, -1.5], [-2.0, -1.0]], dtype=D)
    outcome = torch.tensor([1.0, -0.5], dtype=D)
    lp = old.clone().requires_grad_(True)
    out = reverse_kl_pg_loss(lp, old, teacher, torch.ones(2, 2, dtype=D), coef=2.0, outcome_advantages=outcome)
    out.loss.backward()
    adv = outcome[:, None] + 2.0 * (teacher - old)  # [[2, 0], [-0.5, 1.5]]
    torch.testing.assert_close(lp.grad, -adv / 4)
    assert out.loss.item() == pytest.approx(-adv.mean().item())
    with pytest.raises(ValueError):
        reverse_kl_pg_loss(lp, old, teacher, torch.ones(2, 2, dtype=D), outcome_advantages=outcome[:1])


# ------------------------------------------------------------------------------ GRPO


def test_grpo_advantages_two_groups() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 3.0, 3.0, 5.0], dtype=D)
    a = 0.5 / math.sqrt(1 / 3)  # group "a": mean 0.5, unbiased std sqrt(1/3)
    want = torch.tensor([a, -a, a, -a, 0.0, 0.0, 0.0], dtype=D)  # "b" has zero std, "c" one member
    adv = grpo_advantages(rewards, ["a", "a", "a", "a", "b", "b", "c"], eps=0.0)
    torch.testing.assert_close(adv, want)
    by_tensor = grpo_advantages(rewards, torch.tensor([0, 0, 0, 0, 1, 1, 2]), eps=0.0)
    torch.testing.assert_close(by_tensor, want)


def test_grpo_interleaved_groups_and_eps() -> None:
    rewards = torch.tensor([2.0, 10.0, 0.0, 20.0])
    adv = grpo_advantages(rewards, [0, 1, 0, 1])
    s0, s1 = math.sqrt(2.0), math.sqrt(50.0)  # unbiased std of {2, 0} and {10, 20}
    want = torch.tensor([1 / (s0 + 1e-6), -5 / (s1 + 1e-6), -1 / (s0 + 1e-6), 5 / (s1 + 1e-6)])
    torch.testing.assert_close(adv, want)
    with pytest.raises(ValueError):
        grpo_advantages(rewards, [0, 1])


@pytest.mark.parametrize(("kind", "top_k", "on_policy", "sft", "needs"), [
    ("reverse_kl", 0, True, False, "logprobs"),  # the PG loss on the student's own samples
    ("reverse_kl", 8, True, False, "logprobs"),
    ("reverse_kl", 0, False, False, "logits"),  # teacher samples: full-vocabulary reverse KL
    ("forward_kl", 0, True, False, "logits"),
    ("jsd", 8, True, False, "topk"),
    ("jsd", 8, False, True, "none"),  # expert data: SFT whatever the kind
])
def test_registry_picks_the_loss_of_a_batch(kind: str, top_k: int, on_policy: bool, sft: bool, needs: str) -> None:
    spec = select_loss(kind, top_k, on_policy, sft)
    assert spec.needs == needs and spec.kind == (SFT if sft else kind)


def test_a_registered_loss_is_a_loss_kind() -> None:
    assert loss_kinds() == ["forward_kl", "jsd", "reverse_kl"]
    with pytest.raises(ValueError, match="registered twice"):
        register_loss("jsd", "topk")(REGISTRY[("jsd", "topk")].fn)
    with pytest.raises(ConfigError, match="'loss.kind' = 'fkl': .*registered: forward_kl, jsd, reverse_kl"):
        parse_config({"loss": {"kind": "fkl"}})
    register_loss("tvd", "logits")(REGISTRY[("forward_kl", "logits")].fn)
    try:
        assert parse_config({"loss": {"kind": "tvd"}}).loss.kind == "tvd"
        assert select_loss("tvd", 0, True, False).needs == "logits"
        with pytest.raises(ConfigError, match="loss.kind=tvd has no top-k variant"):
            select_loss("tvd", 4, True, False)
    finally:
        del REGISTRY[("tvd", "logits")]


# ------------------------------------------------------------------------------ chunked over positions
FULL_VOCAB: dict[str, tuple[Callable[..., LossOutput], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "forward_kl": (forward_kl_loss, lambda lp_s, lp_t: _kl(lp_t, lp_s)),
    "reverse_kl": (reverse_kl_full_loss, _kl),
    "jsd": (lambda s, t, m, w: generalized_jsd_loss(s, t, m, 0.3, w), lambda lp_s, lp_t: _generalized_jsd(lp_s, lp_t, 0.3)),
}


def _saving(fn: Callable[[], LossOutput]) -> tuple[LossOutput, int]:
    """``fn()`` and the number of elements autograd saved for its backward."""
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = fn()
    return out, sum(saved)


@pytest.mark.parametrize("kind", FULL_VOCAB)
def test_full_vocab_losses_equal_over_chunks_of_positions(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """3 rows x 7 positions in chunks of 4 (a chunk spans two rows) vs the formula over all 21 at once: the
    same loss and gradient, and the chunked pass keeps only its inputs for the backward."""
    loss_fn, divergence = FULL_VOCAB[kind]
    teacher = rand_logits(3, 7, 11, seed=1)
    mask = (torch.rand(3, 7, generator=torch.Generator().manual_seed(2)) > 0.3).to(D)
    weights = torch.rand(3, 7, dtype=D, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(per_position, "__defaults__", (4,))
    student = rand_logits(3, 7, 11, seed=0).requires_grad_()
    chunked, chunked_saved = _saving(lambda: loss_fn(student, teacher, mask, weights))
    whole, whole_saved = _saving(lambda: LossOutput(_aggregate(
        divergence(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)), mask, weights)))
    (chunked_grad,) = torch.autograd.grad(chunked.loss, student)
    (whole_grad,) = torch.autograd.grad(whole.loss, student)
    torch.testing.assert_close(chunked.loss, whole.loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=0, atol=1e-12)
    inputs = student.numel() + teacher.numel() + mask.numel() + weights.numel()
    assert chunked_saved < inputs + student.numel() <= whole_saved  # not one [positions, V] intermediate kept


def test_sampled_logprobs_equal_over_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = rand_logits(2, 5, 9, seed=4).requires_grad_()
    targets = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(5))
    expected = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    monkeypatch.setattr(per_position, "__defaults__", (3,))
    got = per_position(lambda x, t: torch.log_softmax(x, -1).gather(-1, t.unsqueeze(-1)).squeeze(-1), logits, targets)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    (g_expected,) = torch.autograd.grad(expected.sum(), logits)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    torch.testing.assert_close(g_got, g_expected, rtol=0, atol=1e-12)


def test_per_position_rejects_misaligned_tensors() -> None:
    with pytest.raises(ValueError, match="leading dims"):
        per_position(lambda a, b: a.sum(-1), torch.zeros(2, 3, 4), torch.zeros(2, 4, 4))
