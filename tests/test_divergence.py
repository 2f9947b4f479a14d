"""Hand-computed values of the divergence telemetry and of the ported policies (SOD, truncation), through the
legacy config keys."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from pydantic import ValidationError

from opd_agents.training.divergence import (
    annotate_turns,
    divergence_table,
    first_failing_turn,
    repeated_calls,
    step_divergence_metrics,
)
from opd_agents.training.policies import DivergencePolicyConfig
from opd_agents.training.policies.sod import sod_weights
from opd_agents.types import ErrorType, StopReason, ToolCall, ToolResult, Trajectory, Turn, TurnOutcome

E = ErrorType


# The pre-registry entry points, expressed with the policies built from the (translated) legacy keys: the
# values below are the ones the old implementation was tested with.
def apply_policies(traj: Trajectory, cfg: DivergencePolicyConfig) -> None:
    cfg.build().apply(traj, 1.0)


def loss_time_weights(traj: Trajectory, cfg: DivergencePolicyConfig) -> list[float]:
    truncation = [p for p in cfg.build().loss if p.name == "loss_truncation"]
    return truncation[0].weights(traj, 1.0).turn if truncation else [1.0] * len(traj.turns)


def rollout_stop_reason(traj: Trajectory, cfg: DivergencePolicyConfig) -> StopReason | None:
    return cfg.build().should_stop(traj)


def make_turn(index: int, sampling: Sequence[float], teacher: Sequence[float] | None = None,
              errors: Sequence[ErrorType | None] = (), d: float | None = None, weight: float = 1.0) -> Turn:
    """A turn with one tool result per entry of ``errors`` (None = an ok result)."""
    return Turn(index=index, token_ids=list(range(len(sampling))), sampling_logprobs=list(sampling), text="",
                finish="tool_call", teacher_logprobs=None if teacher is None else list(teacher),
                tool_results=[ToolResult(content="r", error_type=e) for e in errors], divergence=d, weight=weight)


def make_traj(turns: list[Turn], **kwargs: object) -> Trajectory:
    return Trajectory(env_id="e", task_id="t", seed=0, turns=turns, **kwargs)  # type: ignore[arg-type]


def traj_with_divs(divs: Sequence[float | None], error_at: int | None = None, tokens: Sequence[int] | None = None,
                   **kwargs: object) -> Trajectory:
    """Turns with stored d_k; turn ``error_at`` has one parse error, the others one ok result."""
    tokens = tokens or [2] * len(divs)
    turns = [make_turn(i, [-1.0] * n, errors=[E.parse_error if i == error_at else None], d=d)
             for i, (d, n) in enumerate(zip(divs, tokens, strict=True))]
    return make_traj(turns, **kwargs)


# ---- telemetry -------------------------------------------------------------------------------------
def test_annotate_divergence_reverse_kl_and_tool_metrics() -> None:
    traj = make_traj([
        # s - t = [1.0, -0.5, 0.0] -> d = 1.5 / 3 = 0.5, reverse KL = 0.5 / 3
        make_turn(0, [-0.5, -1.0, -2.0], [-1.5, -0.5, -2.0], errors=[None, None]),
        make_turn(1, [-0.2, -0.4], None, errors=[E.validation_failed, None, E.parse_error]),
        make_turn(2, [], [], errors=[]),
        make_turn(3, [-1.0], [-0.25]),
    ])
    annotate_turns(traj)
    t0, t1, t2, t3 = traj.turns
    assert t0.divergence == pytest.approx(0.5) and t0.metrics["reverse_kl"] == pytest.approx(0.5 / 3)
    assert t1.divergence is None and "reverse_kl" not in t1.metrics
    assert t2.divergence is None and "reverse_kl" not in t2.metrics
    assert t3.divergence == pytest.approx(0.75) and t3.metrics["reverse_kl"] == pytest.approx(-0.75)
    assert [t.metrics["tool_ok"] for t in traj.turns] == [1.0, 0.0, 1.0, 1.0]
    assert [t.metrics["tool_errors"] for t in traj.turns] == [0.0, 2.0, 0.0, 0.0]
    assert traj.metrics["first_error_turn"] == 1.0


def test_annotate_no_error_and_misaligned_logprobs() -> None:
    traj = make_traj([make_turn(0, [-1.0], [-1.0], errors=[None])])
    annotate_turns(traj)
    assert traj.metrics["first_error_turn"] == -1.0 and traj.turns[0].divergence == 0.0
    with pytest.raises(ValueError, match="teacher_logprobs"):
        annotate_turns(make_traj([make_turn(0, [-1.0, -2.0], [-1.0])]))


def test_repeated_calls_and_their_step_metrics() -> None:
    def turn(index: int, d: float | None, *calls: tuple[str, dict[str, object]]) -> Turn:
        t = make_turn(index, [-1.0], d=d)
        t.tool_calls = [ToolCall(name=n, arguments=a) for n, a in calls]
        return t

    go_east, take_key = ("act", {"command": "go east"}), ("act", {"command": "take key"})
    looping = make_traj([turn(0, 0.4, go_east), turn(1, 0.2, take_key), turn(2, 0.05, go_east),
                         turn(3, None), turn(4, 0.1, take_key, go_east), turn(5, None, take_key)])
    # The same command with other arguments, and the same calls in another order, are new calls.
    assert repeated_calls(looping) == [False, False, True, None, False, True]
    other = make_traj([turn(0, 0.3, ("act", {"command": "go west"})), turn(1, 0.5, ("look", {}))])
    m = step_divergence_metrics([looping, other])
    assert m["div/repeat_share"] == pytest.approx(2 / 7)  # 7 turns with calls, 2 repeat an earlier one
    assert m["div/d_repeated_call"] == pytest.approx(0.05)  # turn 5 is unscored: counted, no d
    assert m["div/d_new_call"] == pytest.approx((0.4 + 0.2 + 0.1 + 0.3 + 0.5) / 5)
    assert "div/repeat_share" not in step_divergence_metrics([make_traj([make_turn(0, [-1.0], d=0.1)])])


def test_topk_mass_and_entropy() -> None:
    traj = make_traj([make_turn(0, [-1.0, -1.0], [-1.0, -1.0]), make_turn(1, [], [])])
    topk = [[[math.log(0.5), math.log(0.25), -math.inf], [math.log(0.9)]], []]  # -inf: no mass
    annotate_turns(traj, topk)
    # position 0: mass 0.75, renormalised [2/3, 1/3]; position 1: mass 0.9, one value -> entropy 0
    h0 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert traj.turns[0].metrics["teacher_topk_mass"] == pytest.approx((0.75 + 0.9) / 2)
    assert traj.turns[0].metrics["teacher_entropy"] == pytest.approx(h0 / 2)
    assert "teacher_topk_mass" not in traj.turns[1].metrics
    with pytest.raises(ValueError, match="positions"):
        annotate_turns(traj, [[[-1.0]], []])
    with pytest.raises(ValueError, match="turns"):
        annotate_turns(traj, [[[-1.0], [-1.0]]])


def cascade_set() -> list[Trajectory]:
    return [
        # A: error at turn 1 (d 0.3), after = mean(0.9, 1.1) = 1.0 > 0.3 -> cascades
        traj_with_divs([0.2, 0.3, 0.9, 1.1], error_at=1, truncated=True, stop_reason=StopReason.divergence),
        # B: error at turn 0 (d 0.5), after = mean(0.4, 0.2) = 0.3 -> no cascade
        traj_with_divs([0.5, 0.4, 0.2], error_at=0, stop_reason=StopReason.completed),
        # C: no error
        traj_with_divs([0.1, 0.3], stop_reason=StopReason.completed),
        # D: error in the last turn -> nothing after it, cascade undefined
        traj_with_divs([0.4, 0.6], error_at=1),
    ]


def test_step_divergence_metrics_cascade() -> None:
    trajs = cascade_set()
    trajs[2].turns[1].weight = 0.0
    m = step_divergence_metrics(trajs)
    assert m["div/cascade_n"] == 2.0 and m["div/cascade_rate"] == pytest.approx(0.5)
    assert m["div/d_before_error"] == pytest.approx((0.2 + 0.4) / 2)  # A turn 0, D turn 0
    assert m["div/d_error_turn"] == pytest.approx((0.3 + 0.5 + 0.6) / 3)
    assert m["div/d_after_error"] == pytest.approx((0.9 + 1.1 + 0.4 + 0.2) / 4)
    assert m["div/d_no_error"] == pytest.approx(0.2)
    assert m["div/d_turn_0"] == pytest.approx((0.2 + 0.5 + 0.1 + 0.4) / 4)
    assert m["div/d_turn_1"] == pytest.approx((0.3 + 0.4 + 0.3 + 0.6) / 4)
    assert m["div/d_turn_2"] == pytest.approx((0.9 + 0.2) / 2)
    assert m["div/d_turn_3"] == pytest.approx(1.1) and "div/d_turn_4" not in m
    assert m["div/error_share"] == 0.75 and m["div/truncated_share"] == 0.25
    assert (m["div/stop_completed"], m["div/stop_divergence"], m["div/stop_none"]) == (0.5, 0.25, 0.25)
    assert m["div/mean_weight"] == pytest.approx(10 / 11)
    assert step_divergence_metrics([]) == {}


def test_cascade_rate_left_out_when_undefined() -> None:
    m = step_divergence_metrics([traj_with_divs([0.1, 0.2])])
    assert m["div/cascade_n"] == 0.0 and "div/cascade_rate" not in m and "div/d_after_error" not in m


def test_divergence_table() -> None:
    table = divergence_table(cascade_set(), max_turns=3)
    assert table["with_error"] == pytest.approx([(0.2 + 0.5 + 0.4) / 3, (0.3 + 0.4 + 0.6) / 3, (0.9 + 0.2) / 2])
    assert table["with_error_n"] == [3.0, 3.0, 2.0]  # A's turn 3 is past max_turns
    assert table["no_error"][:2] == pytest.approx([0.1, 0.3]) and table["no_error"][2] is None
    assert table["no_error_n"] == [1.0, 1.0, 0.0]


# ---- SOD -------------------------------------------------------------------------------------------
def test_sod_weights_values_and_cap() -> None:
    # (0.5 / d_k): 1, 2 -> capped 1.2, 0.5, None -> 1, 0.8
    w = sod_weights([0.5, 0.25, 1.0, None, 0.625], eps=1e-6, delta=0.2)
    assert w == pytest.approx([1.0, 1.2, 0.5, 1.0, 0.8], abs=1e-5)
    assert sod_weights([None, 0.2, 0.4], eps=1e-6, delta=0.2) == pytest.approx([1.0, 1.0, 0.5], abs=1e-5)
    assert sod_weights([None, None]) == [1.0, 1.0]
    assert sod_weights([0.0, 0.0], eps=1e-6, delta=0.0) == [1.0, 1.0]


def test_sod_renormalize_keeps_token_weighted_sum() -> None:
    traj = traj_with_divs([0.5, 1.0, 0.25], tokens=[2, 4, 2])
    apply_policies(traj, DivergencePolicyConfig(sod=True))
    assert [t.weight for t in traj.turns] == pytest.approx([1.0, 0.5, 1.2], abs=1e-5)
    apply_policies(traj, DivergencePolicyConfig(sod=True, sod_renormalize=True))
    # raw sum w*n = 2 + 2 + 2.4 = 6.4 over 8 tokens -> factor 1.25
    assert [t.weight for t in traj.turns] == pytest.approx([1.25, 0.625, 1.5], abs=1e-5)
    assert sum(t.weight * len(t.token_ids) for t in traj.turns) == pytest.approx(8.0)


def test_truncation_and_sod_compose() -> None:
    traj = traj_with_divs([0.5, 1.0, 0.25], error_at=1, tokens=[2, 4, 2])
    apply_policies(traj, DivergencePolicyConfig(sod=True, loss_truncation="first_error"))
    assert [t.weight for t in traj.turns] == pytest.approx([1.0, 0.5, 0.0], abs=1e-5)
    apply_policies(traj, DivergencePolicyConfig(sod=True, sod_renormalize=True, loss_truncation="first_error"))
    # kept turns 0, 1: sum w*n = 2 + 2 = 4 over 6 tokens -> factor 1.5
    assert [t.weight for t in traj.turns] == pytest.approx([1.5, 0.75, 0.0], abs=1e-5)
    assert traj.metrics["loss_truncated_turns"] == 1.0


# ---- loss-time truncation --------------------------------------------------------------------------
def test_first_error_keeps_the_failing_turn() -> None:
    traj = traj_with_divs([0.1, 0.2, 5.0, 0.1], error_at=1)  # planted error in the 2nd of 4 turns
    cfg = DivergencePolicyConfig(loss_truncation="first_error")
    assert loss_time_weights(traj, cfg) == [1.0, 1.0, 0.0, 0.0]
    apply_policies(traj, cfg)
    assert [t.weight for t in traj.turns] == [1.0, 1.0, 0.0, 0.0]
    assert traj.metrics["loss_truncated_turns"] == 2.0
    # a failing execution counts too; no error keeps everything
    traj.turns[1].tool_results = [ToolResult(content="boom", error_type=E.execution_failed)]
    assert loss_time_weights(traj, cfg) == [1.0, 1.0, 0.0, 0.0]
    assert loss_time_weights(traj_with_divs([0.1, 9.0]), cfg) == [1.0, 1.0]


def test_threshold_truncation() -> None:
    cfg = DivergencePolicyConfig(loss_truncation="threshold", tau=1.0)
    assert loss_time_weights(traj_with_divs([0.2, 0.8, 1.5, 0.3]), cfg) == [1.0, 1.0, 1.0, 0.0]
    assert loss_time_weights(traj_with_divs([None, 1.0, 2.0, 0.1]), cfg) == [1.0, 1.0, 1.0, 0.0]  # strict >
    assert loss_time_weights(traj_with_divs([0.2, 0.3]), cfg) == [1.0, 1.0]
    # unannotated turns: d_k computed from the logprobs (|-1 - -2.5| = 1.5 > tau)
    traj = make_traj([make_turn(0, [-1.0], [-1.2]), make_turn(1, [-1.0], [-2.5]), make_turn(2, [-1.0], [-1.0])])
    assert loss_time_weights(traj, cfg) == [1.0, 1.0, 0.0]


def test_defaults_are_plain_opd() -> None:
    traj = traj_with_divs([0.1, 3.0, 0.01], error_at=0)
    for t in traj.turns:
        t.weight = 0.3
    cfg = DivergencePolicyConfig()
    apply_policies(traj, cfg)
    assert [t.weight for t in traj.turns] == [1.0, 1.0, 1.0]
    assert traj.metrics["loss_truncated_turns"] == 0.0 and rollout_stop_reason(traj, cfg) is None
    with pytest.raises(ValidationError):
        DivergencePolicyConfig(sod_weight=1.0)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        DivergencePolicyConfig(loss_truncation="everything")  # type: ignore[arg-type]


# ---- rollout-time truncation -----------------------------------------------------------------------
def first_stop(turns: list[Turn], cfg: DivergencePolicyConfig) -> tuple[int, StopReason] | None:
    """Grow a trajectory turn by turn as the rollout does; (turn index, reason) of the first stop."""
    traj = make_traj([])
    for turn in turns:
        traj.turns.append(turn)
        if (reason := rollout_stop_reason(traj, cfg)) is not None:
            return turn.index, reason
    return None


def test_rollout_stops_at_mth_invalid_call() -> None:
    cfg = DivergencePolicyConfig(rollout_truncation="invalid_calls", max_invalid_calls=2)
    mixed = [make_turn(0, [-1.0], errors=[None]), make_turn(1, [-1.0], errors=[E.parse_error]),
             make_turn(2, [-1.0], errors=[E.execution_failed, E.timeout]),  # valid calls that failed: not counted
             make_turn(3, [-1.0], errors=[E.tool_not_found]), make_turn(4, [-1.0], errors=[E.parse_error])]
    assert first_stop(mixed, cfg) == (3, StopReason.divergence)
    parses = [make_turn(0, [-1.0], errors=[E.parse_error]), make_turn(1, [-1.0], errors=[None]),
              make_turn(2, [-1.0], errors=[E.parse_error]), make_turn(3, [-1.0])]
    assert first_stop(parses, cfg) == (2, StopReason.parse_error)
    two_in_one = [make_turn(0, [-1.0], errors=[None]), make_turn(1, [-1.0], errors=[E.validation_failed] * 2)]
    assert first_stop(two_in_one, cfg) == (1, StopReason.divergence)
    assert first_stop(mixed, DivergencePolicyConfig(rollout_truncation="invalid_calls", max_invalid_calls=4)) is None


def test_rollout_stops_when_divergence_exceeds_tau() -> None:
    turns = [make_turn(i, [-1.0], d=d) for i, d in enumerate([0.3, 1.0, 1.2, 0.1])]
    assert first_stop(turns, DivergencePolicyConfig(rollout_truncation="threshold", tau=1.0)) == (
        2, StopReason.divergence)
    assert first_stop(turns, DivergencePolicyConfig(rollout_truncation="invalid_calls", tau=1.0)) is None
    both = [make_turn(0, [-1.0], errors=[E.parse_error], d=0.1), make_turn(1, [-1.0], d=1.5),
            make_turn(2, [-1.0], errors=[E.parse_error], d=0.1)]
    cfg = DivergencePolicyConfig(rollout_truncation="both", tau=1.0, max_invalid_calls=2)
    assert first_stop(both, cfg) == (1, StopReason.divergence)
    both[1].divergence = 0.5
    assert first_stop(both, cfg) == (2, StopReason.parse_error)
    assert first_stop([make_turn(0, [-1.0], None)], cfg) is None  # unscored turn never stops


# ---- first failing turn: Turn.outcome first ----------------------------------------------------------
def test_first_failing_turn_uses_outcome_when_present() -> None:
    traj = traj_with_divs([0.1, 0.2, 0.3, 0.4], error_at=0)
    assert first_failing_turn(traj) == 0  # no outcome anywhere: the first tool error
    for t, o in zip(traj.turns, [TurnOutcome.ok, TurnOutcome.ok, TurnOutcome.off_plan, TurnOutcome.ok], strict=True):
        t.outcome = o
    assert first_failing_turn(traj) == 2  # outcomes reported: they decide, the tool error is ignored
    annotate_turns(traj)
    assert traj.metrics["first_error_turn"] == 2.0
    m = step_divergence_metrics([traj])
    assert m["div/d_error_turn"] == pytest.approx(0.3) and m["div/d_before_error"] == pytest.approx(0.15)
    for t in traj.turns:
        t.outcome = TurnOutcome.ok
    assert first_failing_turn(traj) is None


# ---- equivalence with the implementation before the registry ---------------------------------------
def _old_apply(traj: Trajectory, loss_truncation: str, tau: float, sod: bool, delta: float,
               renorm: bool) -> list[float]:
    """The pre-registry apply_policies, verbatim in substance (reference for the port)."""
    from opd_agents.training.divergence import turn_divergence

    turns = traj.turns
    if loss_truncation == "first_error":
        stop = next((i for i, t in enumerate(turns) if t.tool_error_types), None)
    elif loss_truncation == "threshold":
        stop = next((i for i, t in enumerate(turns) if (d := turn_divergence(t)) is not None and d > tau), None)
    else:
        stop = None
    keep = [1.0 if stop is None or i <= stop else 0.0 for i in range(len(turns))]
    w = [1.0] * len(turns)
    if sod:
        w = sod_weights([turn_divergence(t) for t in turns], 1e-6, delta)
        if renorm:
            tokens = [len(t.token_ids) * k for t, k in zip(turns, keep, strict=True)]
            weighted = sum(x * n for x, n in zip(w, tokens, strict=True))
            if weighted > 0:
                w = [x * sum(tokens) / weighted for x in w]
    return [k * x for k, x in zip(keep, w, strict=True)]


def test_ported_policies_equal_the_old_implementation_exactly() -> None:
    import random

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 6)
        divs = [None if rng.random() < 0.15 else rng.uniform(0.0, 3.0) for _ in range(n)]
        tokens = [rng.randint(0, 5) for _ in range(n)]
        traj = traj_with_divs(divs, error_at=rng.choice([None, *range(n)]), tokens=tokens)
        for trunc in ("none", "first_error", "threshold"):
            for sod, renorm in ((False, False), (True, False), (True, True), (False, True)):
                cfg = DivergencePolicyConfig(loss_truncation=trunc, tau=1.2, sod=sod, sod_delta=0.3,
                                             sod_renormalize=renorm)
                apply_policies(traj, cfg)
                assert [t.weight for t in traj.turns] == _old_apply(traj, trunc, 1.2, sod, 0.3, renorm)
