"""Rock tokens: the tracker on hand-made losses, id-level weights, and the trainer's probe tracking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd_agents.training.divergence import DivergencePolicyConfig
from opd_agents.models import build_tiny_model
from opd_agents.training.rock_tokens import RockTokenMonitor, RockTokenTracker
from opd_agents.training.trainer import Trainer
from tests.test_trainer import tiny_cfg


def step(tracker: RockTokenTracker, a: list[float], b: list[float]) -> None:
    tracker.update("a", a)
    tracker.update("b", b)
    tracker.end_step()


def test_rock_token_tracker() -> None:
    tracker = RockTokenTracker(quantile=0.75, min_steps=2)
    # 8 tokens per step; 0.75-quantile of [1]*6 + [4, 5] is 1.75 -> high: a0, b2
    step(tracker, [5, 1, 1, 1], [1, 1, 4, 1])
    assert tracker.rock_mask("a") == [False] * 4 and tracker.share() == 0.0
    # quantile of [1]*6 + [3, 4] is 1.5 -> high: a0 (2nd in a row), a3; b2's streak resets
    step(tracker, [4, 1, 1, 3], [1, 1, 1, 1])
    assert tracker.rock_mask("a") == [True, False, False, False] and tracker.rock_mask("b") == [False] * 4
    assert tracker.share() == pytest.approx(1 / 8)
    assert tracker.loss_share() == pytest.approx(4 / 13)  # a0's loss 4 of the step's total 13
    step(tracker, [4, 1, 1, 3], [1, 1, 1, 1])
    assert tracker.rock_mask("a") == [True, False, False, True] and tracker.share() == pytest.approx(2 / 8)
    # a0 drops out of the top quantile: its streak restarts
    step(tracker, [1, 1, 1, 3], [1, 1, 1, 2])
    assert tracker.rock_mask("a") == [False, False, False, True]
    # a flat loss has no high tokens
    step(tracker, [1, 1, 1, 1], [1, 1, 1, 1])
    assert tracker.share() == 0.0
    with pytest.raises(ValueError, match="fixed"):
        tracker.update("a", [1.0, 2.0])


def test_rock_tracker_from_config() -> None:
    tracker = RockTokenTracker.from_config(DivergencePolicyConfig(rock_quantile=0.5, rock_min_steps=1))
    tracker.update("p", [0.0, 1.0, 2.0, 3.0])
    tracker.end_step()  # median 1.5 -> tokens 2, 3 high, rock after one step
    assert tracker.rock_mask("p") == [False, False, True, True] and tracker.share() == 0.5
    with pytest.raises(ValueError):
        RockTokenTracker(quantile=1.0)


def monitor_with(mode: str, probe_ids: dict[str, list[int]], losses: dict[str, list[float]]) -> RockTokenMonitor:
    """A monitor whose tracker has committed one step of ``losses`` (median threshold, rock after 1 step)."""
    cfg = DivergencePolicyConfig(rock_tokens=mode, rock_quantile=0.5, rock_min_steps=1, rock_weight=0.25)
    monitor = RockTokenMonitor(cfg, pad_token_id=0)
    for key, values in losses.items():
        monitor.tracker.update(key, values)
    monitor.tracker.end_step()
    monitor.load_state_dict({"probe": [], "probe_ids": probe_ids, "tracker": monitor.tracker.state_dict()})
    return monitor


def test_rock_ids_are_ids_mostly_rock_on_the_probe() -> None:
    # losses: median 1.5 -> high (rock): a[1] (id 7), a[3] (id 9), b[0] (id 7); id 8 twice, never rock;
    # id 9 is rock once in two occurrences (half: counts as rock id)
    ids = {"a": [8, 7, 8, 9], "b": [7, 9, 5, 5]}
    monitor = monitor_with("mask", ids, {"a": [1, 3, 1, 4], "b": [5, 0, 1, 1]})
    assert monitor.rock_token_ids() == [7, 9]
    targets = torch.tensor([[7, 8, 9, 5]])
    assert monitor.token_weights(targets).tolist() == [[0.0, 1.0, 0.0, 1.0]]
    down = monitor_with("downweight", ids, {"a": [1, 3, 1, 4], "b": [5, 0, 1, 1]})
    assert down.token_weights(targets).tolist() == [[0.25, 1.0, 0.25, 1.0]]
    track = monitor_with("track", ids, {"a": [1, 3, 1, 4], "b": [5, 0, 1, 1]})
    assert track.token_weights(targets).tolist() == [[1.0] * 4]  # tracking never changes the loss


def test_trainer_tracks_rock_tokens_on_a_fixed_probe_and_resumes_it(tmp_path: Path, tiny_model_dir: Path,
                                                                      smollm2_tokenizer_dir: Path) -> None:
    teacher = build_tiny_model(tmp_path / "teacher", smollm2_tokenizer_dir, seed=1)  # nonzero token losses
    overrides = {"divergence.rock_tokens": "mask", "divergence.rock_quantile": 0.5,
                 "divergence.rock_min_steps": 1, "train.steps": 3, "teacher.model": str(teacher)}
    trainer = Trainer(tiny_cfg(tmp_path, tiny_model_dir, **overrides))
    trainer.train(until_step=2)
    probe = [v.trajectory_id for v in trainer.rock.probe]
    first_step = [json.loads(line)["id"] for line in (tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()][:2]
    assert probe == [t for t in first_step if t in probe] and probe  # the probe is step 1's batch, kept
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all(0.0 < r["rock/share"] <= 0.5 and 0.0 < r["rock/loss_share"] <= 1.0 for r in steps)
    assert all(r["rock/ids"] >= 1 and r["rock/probe_loss"] > 0 for r in steps)

    resumed = Trainer(tiny_cfg(tmp_path, tiny_model_dir, **overrides))
    assert resumed.resume()
    assert [v.trajectory_id for v in resumed.rock.probe] == probe
    assert resumed.rock.rock_token_ids() == trainer.rock.rock_token_ids()
    resumed.train()
