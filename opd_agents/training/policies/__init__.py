"""Divergence policies: small objects in a registry, one file each, composed from ``divergence.policies``.

| name | acts at | needs | what |
|---|---|---|---|
| loss_truncation | loss | none / logprobs (mode=threshold) | zero the turns after the first failing turn / d_k > tau |
| sod | loss | logprobs | SOD turn weights min((d_1+eps)/(d_k+eps), 1+delta) |
| iw_opd | loss | logprobs | token weights 1 + gamma (1 - prefix discrepancy share) |
| topk_drift | loss | topk | decay then truncate after the top-k sets stop overlapping for a span |
| change_point | loss | logprobs | truncate after the drop of the per-turn teacher margin |
| horizon | loss | none | train the first n(step / steps) turns, growing to all |
| off_plan | loss | none | zero the turns after the first non-ok Turn.outcome (else first tool error) |
| rollout_truncation | rollout | none / logprobs (mode=threshold, both) | end the episode at m invalid calls / d_k > tau |
"""

from opd_agents.training.policies import (  # noqa: F401  (each file registers its policy)
    change_point, horizon, iw_opd, loss_truncation, off_plan, rollout_truncation, sod, topk_drift,
)
from opd_agents.training.policies.base import (
    REGISTRY, DivergencePolicy, LossPolicy, PolicyParams, RolloutPolicy, Signals, Weights, register,
)
from opd_agents.training.policies.compose import PolicySet
from opd_agents.training.policies.config import DivergencePolicyConfig, RockMode, translate_legacy

__all__ = [
    "REGISTRY", "DivergencePolicy", "DivergencePolicyConfig", "LossPolicy", "PolicyParams", "PolicySet",
    "RockMode", "RolloutPolicy", "Signals", "Weights", "register", "translate_legacy",
]
