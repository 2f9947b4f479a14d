"""``divergence:`` in the run config: the list of policies (each validated by its own params model), the
composition options and the rock-token settings. The pre-list keys are translated here, in one place."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from opd_agents.training.policies.base import REGISTRY
from opd_agents.training.policies.compose import PolicySet

RockMode = Literal["off", "track", "mask", "downweight"]

# The keys before the policy list, and their defaults (a key at its default adds no policy).
LEGACY_KEYS = {"loss_truncation": "none", "tau": 1.0, "rollout_truncation": "none", "max_invalid_calls": 2,
               "sod": False, "sod_eps": 1e-6, "sod_delta": 0.2, "sod_renormalize": False}


def translate_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """Old keys -> entries appended to ``policies`` (loss_truncation, sod, rollout_truncation, in that
    order); ``sod_renormalize`` (with sod) -> ``renormalize``. Other keys pass through."""
    old = {k: data[k] for k in LEGACY_KEYS if k in data}
    if not old:
        return data
    v = LEGACY_KEYS | old
    out = {k: x for k, x in data.items() if k not in LEGACY_KEYS}
    added: list[dict[str, Any]] = []
    if v["loss_truncation"] != "none":
        added.append({"name": "loss_truncation", "mode": v["loss_truncation"], "tau": v["tau"]})
    if v["sod"]:
        added.append({"name": "sod", "delta": v["sod_delta"], "eps": v["sod_eps"]})
        if v["sod_renormalize"]:
            out["renormalize"] = True
    if v["rollout_truncation"] != "none":
        added.append({"name": "rollout_truncation", "mode": v["rollout_truncation"],
                      "max_invalid_calls": v["max_invalid_calls"], "tau": v["tau"]})
    out["policies"] = [*out.get("policies", []), *added]
    return out


def _spec(entry: Any) -> dict[str, Any]:
    """One list entry -> {"name": ..., every param with its default}; ValueError naming the problem."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"a divergence policy is {{name: ..., <params>}}, got {entry!r}")
    name, params = entry["name"], {k: x for k, x in entry.items() if k != "name"}
    if name not in REGISTRY:
        raise ValueError(f"unknown divergence policy '{name}'; registered: {', '.join(sorted(REGISTRY))}")
    model = REGISTRY[name].Params
    try:
        return {"name": name, **model.model_validate(params).model_dump()}
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(model.model_fields) or "none"
                problems.append(f"unknown parameter '{key}' (allowed: {allowed})")
            else:
                problems.append(f"parameter '{key}' = {err.get('input')!r}: {err['msg']}")
        raise ValueError(f"divergence policy '{name}': " + "; ".join(problems)) from None


class DivergencePolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policies: list[Any] = Field(default_factory=list, description="[{name: sod}, {name: iw_opd, gamma: 0.5}, ...]; "
                                                                  "[] = plain OPD (telemetry stays on)")
    renormalize: bool = Field(False, description="rescale the composed weights so the kept tokens' total "
                                                 "weight stays their count")
    rock_tokens: RockMode = Field("off", description="track: rock/* metrics on a fixed probe; mask/downweight "
                                                       "also scale rock token ids in the loss (opd_agents.training.rock_tokens)")
    rock_quantile: float = Field(0.9, gt=0.0, lt=1.0, description="a token is 'high' above this loss quantile")
    rock_min_steps: int = Field(3, ge=1, description="consecutive high steps that make a rock token")
    rock_weight: float = Field(0.1, ge=0.0, le=1.0, description="multiplier of rock tokens in 'downweight'")

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        return translate_legacy(data) if isinstance(data, dict) else data

    @field_validator("policies")
    @classmethod
    def _validate(cls, entries: list[Any]) -> list[dict[str, Any]]:
        specs = [_spec(e) for e in entries]
        names = [s["name"] for s in specs]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"divergence policies listed twice: {', '.join(twice)}")
        return specs

    def build(self) -> PolicySet:
        policies = []
        for spec in self.policies:
            cls = REGISTRY[spec["name"]]
            policies.append(cls(cls.Params.model_validate({k: v for k, v in spec.items() if k != "name"})))
        return PolicySet(policies, self.renormalize)
