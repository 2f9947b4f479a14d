"""The divergence-policy registry: each new policy on hand-made trajectories with known values, composition,
registry and config errors, the legacy-key translation, and the backend check."""

from __future__ import annotations


import pytest

from opd_agents.config import parse_config
from opd_agents.errors import ConfigError
from opd_agents.training.policies import REGISTRY, DivergencePolicyConfig, PolicySet, Signals, translate_legacy
from opd_agents.training.policies.change_point import change_point
from opd_agents.types import ErrorType, StopReason, ToolResult, Trajectory, Turn, TurnOutcome
from tests.test_divergence import make_traj, make_turn, traj_with_divs


def build(*specs: dict[str, object], renormalize: bool = False) -> PolicySet:
    return DivergencePolicyConfig(policies=list(specs), renormalize=renormalize).build()


def weights(traj: Trajectory, *specs: dict[str, object], progress: float = 1.0,
            signals: Signals | None = None) -> tuple[list[float], list[float] | None]:
    factors = build(*specs).apply(traj, progress, signals)
    return [t.weight for t in traj.turns], factors


# ---- IW-OPD ----------------------------------------------------------------------------------------
def test_iw_opd_matches_the_formula() -> None:
    sampling = [[-1.0, -0.5], [-2.0], [-0.1, -0.3, -0.2]]
    teacher = [[-1.5, -0.5], None, [-0.4, -0.3, -1.2]]
    traj = make_traj([make_turn(i, s, t) for i, (s, t) in enumerate(zip(sampling, teacher, strict=True))])
    turn_w, factors = weights(traj, {"name": "iw_opd", "gamma": 0.5})
    assert turn_w == [1.0, 1.0, 1.0]
    # direct: |D| over the scored tokens in order = 0.5, 0, (turn 1 unscored), 0.3, 0, 1.0; total 1.8
    deltas = [0.5, 0.0, 0.3, 0.0, 1.0]
    total = sum(deltas)
    direct = [1 + 0.5 * (1 - sum(deltas[:t]) / total) for t in range(len(deltas))]
    expected = direct[:2] + [1.0] + direct[2:]  # the unscored turn's token keeps 1
    assert factors == pytest.approx(expected)
    assert factors[0] == pytest.approx(1.5) and factors[-1] == pytest.approx(1 + 0.5 * (1 - 0.8 / 1.8))
    flat = make_traj([make_turn(0, [-1.0, -2.0], [-1.0, -2.0])])
    assert weights(flat, {"name": "iw_opd", "gamma": 0.5})[1] == [1.5, 1.5]  # no discrepancy at all


# ---- top-k drift -----------------------------------------------------------------------------------
def test_topk_drift_downweights_then_truncates_after_the_span() -> None:
    # 10 tokens over 2 turns (4 + 6); k = 2. Overlap: tokens 0-2 share both ids; 3 shares none (a run of
    # 1, reset by 4); from 5 on none: the run of span=3 completes at token 7 -> decay 0.5^(t-7+1).
    same, other = [1, 2], [8, 9]
    student = [[same] * 4, [same] * 6]
    teacher = [[same, same, same, other], [same, other, other, other, other, other]]
    traj = make_traj([make_turn(0, [-1.0] * 4, [-1.0] * 4), make_turn(1, [-1.0] * 6, [-1.0] * 6)])
    spec = {"name": "topk_drift", "k": 2, "min_overlap": 0.5, "span": 3, "decay": 0.5, "floor": 0.2}
    turn_w, factors = weights(traj, spec, signals=Signals(teacher, student))
    assert turn_w == [1.0, 1.0]
    assert factors == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.0]  # 0.125 < floor: truncated
    # a half overlap (1 of 2) is not drift at min_overlap 0.5; no signals: no change
    half = [[[1, 9]] * 4, [[1, 9]] * 6]
    assert weights(traj, spec, signals=Signals(half, student))[1] == [1.0] * 10
    assert weights(traj, spec)[1] is None


# ---- change point ----------------------------------------------------------------------------------
def test_change_point_found_at_the_planted_shift() -> None:
    margins = [-0.2, -0.3, -0.25, -1.6, -1.5, -1.7]  # planted drop after turn 2
    assert change_point(margins, min_drop=0.5) == 3
    assert change_point([-0.2, -0.3, -0.25, -0.4, -0.35], min_drop=0.5) is None  # no shift that large
    assert change_point([-1.5, -1.6, -0.2, -0.3], min_drop=0.5) is None  # a rise is not a drop
    turns = [make_turn(i, [-1.0, -1.0], [m, m]) for i, m in enumerate(margins)]
    turn_w, _ = weights(make_traj(turns), {"name": "change_point", "min_drop": 0.5})
    assert turn_w == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # the first low turn is kept
    faded, _ = weights(make_traj(turns), {"name": "change_point", "suffix_weight": 0.25})
    assert faded == [1.0, 1.0, 1.0, 1.0, 0.25, 0.25]
    assert weights(make_traj(turns[:2]), {"name": "change_point"})[0] == [1.0, 1.0]  # < min_turns


# ---- horizon curriculum ----------------------------------------------------------------------------
def test_horizon_grows_with_progress() -> None:
    traj = traj_with_divs([0.1] * 5)
    kept = [sum(weights(traj, {"name": "horizon", "start_turns": 1}, progress=p)[0]) for p in
            (0.0, 0.19, 0.2, 0.5, 0.79, 0.8, 1.0)]
    assert kept == [1, 1, 2, 3, 4, 5, 5]  # n = 1 + floor(p * 5), capped at 5
    assert weights(traj, {"name": "horizon", "start_turns": 2}, progress=0.1)[0] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert weights(traj_with_divs([0.1]), {"name": "horizon", "start_turns": 3}, progress=0.0)[0] == [1.0]


# ---- off-plan truncation ---------------------------------------------------------------------------
def test_off_plan_masks_after_the_first_off_plan_turn() -> None:
    traj = traj_with_divs([0.1] * 5, error_at=0)
    outcomes = [TurnOutcome.ok, TurnOutcome.ok, TurnOutcome.off_plan, TurnOutcome.ok, TurnOutcome.invalid]
    for t, o in zip(traj.turns, outcomes, strict=True):
        t.outcome = o
    assert weights(traj, {"name": "off_plan"})[0] == [1.0, 1.0, 1.0, 0.0, 0.0]  # outcome wins over the error
    fallback = traj_with_divs([0.1] * 4, error_at=1)  # no outcome info: the first tool error turn
    assert weights(fallback, {"name": "off_plan"})[0] == [1.0, 1.0, 0.0, 0.0]
    assert weights(traj_with_divs([0.1] * 3), {"name": "off_plan"})[0] == [1.0, 1.0, 1.0]


# ---- composition -----------------------------------------------------------------------------------
def test_policies_compose_by_multiplying_and_report_metrics() -> None:
    traj = make_traj([make_turn(i, [-1.0, -1.0], [-1.0 - d, -1.0 - d], errors=[ErrorType.parse_error] if i == 2 else [])
                      for i, d in enumerate([0.5, 1.0, 0.25, 0.5])])
    policies = build({"name": "sod"}, {"name": "horizon", "start_turns": 1}, {"name": "off_plan"},
                     {"name": "iw_opd", "gamma": 0.5})
    factors = policies.apply(traj, 0.5)  # horizon: 1 + floor(0.5 * 4) = 3 turns
    sod = [1.0, 0.5, 1.2, 1.0]
    expected = [s * h for s, h in zip(sod, [1, 1, 1, 0], strict=True)]
    assert [t.weight for t in traj.turns] == pytest.approx(expected, abs=1e-5)
    assert factors is not None and len(factors) == 8 and factors[0] == pytest.approx(1.5)
    assert traj.metrics["loss_truncated_turns"] == 1.0
    m = policies.step_metrics(1)
    assert m["div/policy/horizon/zero_share"] == pytest.approx(0.25)
    assert m["div/policy/off_plan/zero_share"] == pytest.approx(0.25)  # turn 3, after the error turn 2
    assert m["div/policy/iw_opd/mean_weight"] > 1.0 and m["div/policy/sod/zero_share"] == 0.0
    assert policies.step_metrics(1) == {}  # reset after each step


def test_rollout_truncation_counts_calls_the_env_refused() -> None:
    """TextWorld's wrong moves are well-formed calls whose command the game refuses (Turn.outcome invalid)."""
    turns = [make_turn(i, [-1.0]) for i in range(3)]
    turns[0].outcome, turns[1].outcome, turns[2].outcome = TurnOutcome.ok, TurnOutcome.invalid, TurnOutcome.invalid
    spec = {"name": "rollout_truncation", "mode": "invalid_calls", "max_invalid_calls": 2}
    assert build(spec).should_stop(make_traj(turns[:2])) is None  # one refused call so far
    assert build(spec).should_stop(make_traj(turns)) == StopReason.divergence
    assert build(spec | {"count_invalid_outcomes": False}).should_stop(make_traj(turns)) is None
    # a turn with an invalid-call error counts its errors once, not again for its invalid outcome
    erring = make_turn(0, [-1.0], errors=[ErrorType.parse_error])
    erring.outcome = TurnOutcome.invalid
    assert build(spec).should_stop(make_traj([erring])) is None
    assert build(spec).should_stop(make_traj([erring, turns[1]])) == StopReason.divergence


def test_any_rollout_policy_stops_and_is_counted() -> None:
    policies = build({"name": "rollout_truncation", "mode": "invalid_calls", "max_invalid_calls": 1}, {"name": "sod"})
    traj = make_traj([make_turn(0, [-1.0], errors=[ErrorType.tool_not_found])])
    assert policies.should_stop(traj) == StopReason.divergence
    assert policies.step_metrics(2) == {"div/policy/rollout_truncation/stop_share": 0.5}
    assert build().should_stop(traj) is None


def test_renormalize_covers_token_factors() -> None:
    traj = make_traj([make_turn(0, [-1.0, -1.0], [-2.0, -1.0]), make_turn(1, [-1.0, -1.0], [-1.0, -3.0])])
    policies = build({"name": "iw_opd"}, {"name": "loss_truncation", "mode": "threshold", "tau": 0.4}, renormalize=True)
    factors = policies.apply(traj, 1.0)
    assert factors is not None
    total = sum(t.weight * f for t, row in zip(traj.turns, [factors[:2], factors[2:]], strict=True) for f in row)
    assert total == pytest.approx(2.0) and traj.turns[1].weight == 0.0  # 2 kept tokens


# ---- registry, config, translation -----------------------------------------------------------------
def test_registry_declares_acts_at_and_needs() -> None:
    assert set(REGISTRY) == {"loss_truncation", "sod", "rollout_truncation", "iw_opd", "topk_drift",
                             "change_point", "horizon", "off_plan"}
    p = {n: cls(cls.Params()) for n, cls in REGISTRY.items()}
    assert p["rollout_truncation"].acts_at == "rollout" and all(
        x.acts_at == "loss" for n, x in p.items() if n != "rollout_truncation")
    assert (p["topk_drift"].needs, p["topk_drift"].top_k) == ("topk", 8)
    assert p["horizon"].needs == p["off_plan"].needs == p["loss_truncation"].needs == "none"
    assert p["iw_opd"].needs == p["sod"].needs == p["change_point"].needs == "logprobs"


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="unknown divergence policy 'nope'; registered: change_point, horizon"):
        parse_config({"divergence": {"policies": [{"name": "nope"}]}})
    with pytest.raises(ConfigError, match=r"divergence policy 'iw_opd': parameter 'gamma' = -1"):
        parse_config({"divergence": {"policies": [{"name": "iw_opd", "gamma": -1}]}})
    with pytest.raises(ConfigError, match=r"'sod': unknown parameter 'gama' \(allowed: delta, eps\)"):
        parse_config({"divergence": {"policies": [{"name": "sod", "gama": 1}]}})
    with pytest.raises(ConfigError, match="listed twice: sod"):
        parse_config({"divergence": {"policies": ["sod"], "sod": True}})
    cfg = parse_config({"divergence": {"policies": ["off_plan", {"name": "iw_opd"}]}})
    assert cfg.divergence.policies == [{"name": "off_plan"}, {"name": "iw_opd", "gamma": 0.5}]


def test_legacy_keys_translate_to_the_list() -> None:
    old = {"loss_truncation": "threshold", "tau": 1.5, "sod": True, "sod_delta": 0.3, "sod_renormalize": True,
           "rollout_truncation": "both", "max_invalid_calls": 3, "rock_tokens": "track"}
    assert translate_legacy(old) == {
        "rock_tokens": "track", "renormalize": True,
        "policies": [{"name": "loss_truncation", "mode": "threshold", "tau": 1.5},
                     {"name": "sod", "delta": 0.3, "eps": 1e-6},
                     {"name": "rollout_truncation", "mode": "both", "max_invalid_calls": 3, "tau": 1.5}]}
    assert translate_legacy({"sod_renormalize": True}) == {"policies": []}  # renormalize only came with SOD
    cfg = parse_config({"divergence": {"policies": ["horizon"], "loss_truncation": "first_error"}})
    assert [p["name"] for p in cfg.divergence.policies] == ["horizon", "loss_truncation"]
    assert parse_config({}).divergence.build().loss == []  # default: plain OPD, telemetry only


def test_backends_that_cannot_supply_a_policy_are_refused() -> None:
    from opd_agents.training.preflight import check_teacher_settings

    server = {"backend": "server", "model": "m", "api_base": "http://127.0.0.1:1/v1"}
    threshold = {"policies": [{"name": "rollout_truncation", "mode": "threshold"}]}
    cfg = parse_config({"teacher": server, "divergence": threshold})
    with pytest.raises(ConfigError, match="divergence.rollout_truncation=threshold scores each turn"):
        check_teacher_settings(cfg)
    ok = {"policies": [{"name": "rollout_truncation", "mode": "invalid_calls"}, "topk_drift", "change_point"]}
    check_teacher_settings(parse_config({"teacher": server, "divergence": ok}))  # top-k: every backend serves it


def test_migrated_shipped_config_equals_its_legacy_form() -> None:
    from pathlib import Path

    from opd_agents.config import load_config

    shipped = load_config(Path(__file__).resolve().parents[1] / "configs" / "gpu-8b-teacher-server.yaml").divergence
    legacy = {"loss_truncation": "first_error", "sod": True, "sod_delta": 0.2, "rock_tokens": "track"}
    assert shipped == parse_config({"divergence": legacy}).divergence
