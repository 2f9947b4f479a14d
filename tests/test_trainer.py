"""The OPD loop on a tiny model: every loss, resume == uninterrupted, LoRA, off-policy, strength check."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
import torch
from typer.testing import CliRunner

from opd_agents.training.checkpoint import latest_checkpoint
from opd_agents.cli import app
from opd_agents.config import load_config, parse_config
from opd_agents.errors import ConfigError
from opd_agents.models import build_tiny_model
from opd_agents.training.trainer import TeacherTooWeakError, Trainer, step_seeds
from tests.test_rollout import EchoEnv

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_cfg(tmp_path: Path, model: Path, **overrides: Any) -> Any:
    base: dict[str, Any] = {
        "run_dir": str(tmp_path / "run"),
        "env": {"id": "opd_agents/Arithmetic-v0", "kwargs": {"difficulty": 1},
                "limits": {"max_turns": 2, "max_tokens_per_turn": 8}},
        "student": {"model": str(model)},
        "teacher": {"model": str(model)},
        "train": {"steps": 2, "tasks_per_step": 2, "micro_batch_size": 2, "checkpoint_every": 1, "lr": 1e-3},
        "eval": {"every": 100, "episodes": 2},
        "teacher_strength": {"episodes": 0},
        "max_tokens_per_turn": 8,
    }
    for dotted, value in overrides.items():
        node = base
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(base)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("loss", [
    {"loss.kind": "reverse_kl"},
    {"loss.kind": "forward_kl"},
    {"loss.kind": "jsd", "loss.beta": 0.5},
    {"loss.kind": "forward_kl", "loss.top_k": 8, "loss.tail": "bucket"},
    {"loss.kind": "reverse_kl", "loss.outcome_coef": 1.0, "train.group_size": 2},
])
def test_every_loss_trains_and_updates_the_student(tmp_path: Path, tiny_model_dir: Path, tiny_teacher_dir: Path,
                                                   loss: dict[str, Any]) -> None:
    # A teacher that differs from the student: with the student's own weights every distillation
    # gradient is exactly zero.
    trainer = Trainer(tiny_cfg(tmp_path, tiny_model_dir, **{"teacher.model": str(tiny_teacher_dir), **loss}))
    before = params(trainer.student)
    summary = trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0 and "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert all(r["student_tokens"] > 0 and r["teacher_tokens"] > 0 for r in steps)
    changed = sum(not torch.equal(before[k], v) for k, v in params(trainer.student).items())
    assert changed > 0
    assert "student_before" in summary and "student_after" in summary
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_000002"


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    straight = Trainer(tiny_cfg(tmp_path / "a", tiny_model_dir, **{"train.steps": 3}))
    straight.train()

    first = Trainer(tiny_cfg(tmp_path / "b", tiny_model_dir, **{"train.steps": 3}))
    first.train(until_step=2)  # "killed" after the step-2 checkpoint
    # A checkpoint the process was killed while writing must be ignored.
    (tmp_path / "b" / "run" / "checkpoints" / ".step_000003.partial").mkdir()
    resumed = Trainer(tiny_cfg(tmp_path / "b", tiny_model_dir, **{"train.steps": 3}))
    assert resumed.resume() and resumed.start_step == 2
    resumed.train()
    a, b = params(straight.student), params(resumed.student)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert not (tmp_path / "b" / "run" / "checkpoints" / ".step_000003.partial").exists()

    def train_seeds(run: Path) -> list[int]:
        return [json.loads(line)["seed"] for line in (run / "trajectories.jsonl").read_text().splitlines()]

    assert train_seeds(tmp_path / "a" / "run") == train_seeds(tmp_path / "b" / "run")
    assert train_seeds(tmp_path / "a" / "run")[4:] == step_seeds(0, 3, 2)


def test_lora_trains_only_the_adapter(tmp_path: Path, tiny_model_dir: Path, tiny_teacher_dir: Path) -> None:
    trainer = Trainer(tiny_cfg(tmp_path, tiny_model_dir, **{"student.lora": {"r": 4, "alpha": 8},
                                                             "teacher.model": str(tiny_teacher_dir)}))
    before = params(trainer.student)
    trainer.train()
    after = params(trainer.student)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt is not None and (ckpt / "model" / "adapter_model.safetensors").is_file()


def test_lora_with_recomputed_layers_trains_as_without(tmp_path: Path, tiny_model_dir: Path,
                                                       tiny_teacher_dir: Path) -> None:
    """LoRA freezes the embeddings, so the checkpointed layers' inputs carry no grad (non-reentrant
    checkpointing needs none): the adapter learns the same with ``train.gradient_checkpointing``."""
    after: dict[bool, dict[str, torch.Tensor]] = {}
    for recompute in (False, True):
        trainer = Trainer(tiny_cfg(tmp_path / str(recompute), tiny_model_dir, **{
            "student.lora": {"r": 4, "alpha": 8}, "teacher.model": str(tiny_teacher_dir),
            "train.gradient_checkpointing": recompute}))
        before = params(trainer.student)
        trainer.train()
        after[recompute] = params(trainer.student)
    moved = max((after[False][k] - before[k]).abs().max().item() for k in before)
    assert max((after[True][k] - after[False][k]).abs().max().item() for k in before) <= 1e-6 < moved


def test_off_policy_expert_batches_use_sft(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = tiny_cfg(tmp_path, tiny_model_dir, **{"train.on_policy_fraction": 0.0,
                                                  "train.off_policy_source": "expert", "loss.kind": "reverse_kl"})
    trainer = Trainer(cfg)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all(r["on_policy"] is False for r in steps)
    assert all(r["rollout/success_rate"] == 1.0 for r in steps)  # the scripted expert's own episodes
    assert all(r["loss"] > 1.0 for r in steps)  # NLL of expert tokens under a random tiny model


def test_best_of_n_teacher_trajectories_add_an_aux_loss(tmp_path: Path, tiny_model_dir: Path) -> None:
    trainer = Trainer(tiny_cfg(tmp_path, tiny_model_dir, **{"train.teacher_rollouts_per_task": 2,
                                                              "train.steps": 1}))
    trainer.train()
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["aux_loss"] > 0.0


def test_teacher_not_stronger_stops_when_configured(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = tiny_cfg(tmp_path, tiny_model_dir, **{"teacher_strength": {"episodes": 2, "min_gap": 0.5,
                                                                      "on_weak": "stop"}})
    with pytest.raises(TeacherTooWeakError, match="not clearly stronger"):
        Trainer(cfg).train()


def test_shipped_configs_validate() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize(("override", "message"), [
    ({"train.stepz": 3}, "unknown key 'train.stepz'; allowed keys here: checkpoint_every"),
    ({"loss.kind": "fkl"}, "'loss.kind' = 'fkl': Value error, unknown loss kind 'fkl'; registered: forward_kl, jsd, "
                        "reverse_kl"),
    ({"train.lr": -1}, "'train.lr' = -1: Input should be greater than 0"),
])
def test_bad_config_gets_one_clear_message(tmp_path: Path, override: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(CONFIGS / "quickstart.yaml", override)


def test_cli_refuses_bad_config_before_any_work(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\ntrain: {steps: 0}\n")
    result = CliRunner().invoke(app, ["train", "-c", str(bad)])
    assert result.exit_code == 2
    assert "'train.steps' = 0" in result.output and not (tmp_path / "x").exists()


def test_rollout_time_truncation_on_divergence(tmp_path: Path, tiny_model_dir: Path,
                                               smollm2_tokenizer_dir: Path) -> None:
    """tau = 0: every episode is cut right after its first scored turn, with stop_reason divergence, and
    the online teacher (KV cache reused turn by turn) already supplied the logprobs: no re-scoring pass."""
    other_teacher = build_tiny_model(tmp_path / "teacher", smollm2_tokenizer_dir, seed=1)  # d_k > 0 surely
    if "opd_agents_test/Echo-v0" not in gym.registry:  # every message is a tool call: multi-turn episodes
        gym.register("opd_agents_test/Echo-v0", entry_point=EchoEnv, disable_env_checker=True)
    cfg = tiny_cfg(tmp_path, tiny_model_dir, **{"divergence.rollout_truncation": "threshold", "divergence.tau": 0.0,
                                                  "train.steps": 1, "env.id": "opd_agents_test/Echo-v0",
                                                  "env.kwargs": {}, "env.limits.max_turns": 3,
                                                  "env.limits.max_tokens_per_turn": 48, "max_tokens_per_turn": 48,
                                                  "teacher.model": str(other_teacher)})
    trainer = Trainer(cfg)
    trainer.train()
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    trajs = [json.loads(line) for line in (tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()]
    for t in trajs:
        assert t["stop_reason"] == "divergence" and len(t["turns"]) == 1
        assert t["turns"][0]["teacher_logprobs"] is not None and t["turns"][0]["divergence"] > 0
    assert row["teacher_tokens"] == 0 and row["teacher_tokens_rollout"] > 0


def test_loss_time_truncation_masks_turns_after_first_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = tiny_cfg(tmp_path, tiny_model_dir, **{"divergence.loss_truncation": "first_error", "divergence.sod": True,
                                                  "train.steps": 1})
    Trainer(cfg).train()
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert "div/d_turn_0" in row and "div/mean_weight" in row


def test_a_new_run_in_a_used_dir_starts_over(tmp_path: Path, tiny_model_dir: Path) -> None:
    Trainer(tiny_cfg(tmp_path, tiny_model_dir, **{"train.steps": 1})).train()
    Trainer(tiny_cfg(tmp_path, tiny_model_dir, **{"train.steps": 1})).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]
    assert len((tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()) == 2


def test_online_teacher_logits_replace_the_post_rollout_pass(tmp_path: Path, tiny_model_dir: Path,
                                                             smollm2_tokenizer_dir: Path) -> None:
    """Forward KL with rollout-time scoring (tau = inf: nothing is cut): the loss takes the full logits the
    online teacher kept while scoring turn by turn (KV cache reused), there is no second teacher pass,
    and the loss equals the plain run's on the same trajectories."""
    other_teacher = build_tiny_model(tmp_path / "teacher", smollm2_tokenizer_dir, seed=1)
    if "opd_agents_test/Echo-v0" not in gym.registry:
        gym.register("opd_agents_test/Echo-v0", entry_point=EchoEnv, disable_env_checker=True)
    common = {"loss.kind": "forward_kl", "train.steps": 1, "teacher.model": str(other_teacher),
              "env.id": "opd_agents_test/Echo-v0", "env.kwargs": {}, "env.limits.max_turns": 3,
              "env.limits.max_tokens_per_turn": 24, "max_tokens_per_turn": 24}
    rows = {}
    for name, extra in (("plain", {}), ("online", {"divergence.rollout_truncation": "threshold",
                                                   "divergence.tau": 1e9})):
        Trainer(tiny_cfg(tmp_path / name, tiny_model_dir, **common, **extra)).train()
        metrics = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        rows[name] = json.loads(metrics[-1])
    plain, online = rows["plain"], rows["online"]
    assert plain["trajectory_tokens"] == online["trajectory_tokens"]  # same episodes
    assert plain["teacher_tokens"] > 0 and plain["teacher_tokens_rollout"] == 0
    assert online["teacher_tokens"] == 0 and online["teacher_tokens_rollout"] > 0
    assert online["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl"])  # top-k from the scores / from the logits rows
def test_composed_policies_act_in_a_real_run(tmp_path: Path, tiny_model_dir: Path, smollm2_tokenizer_dir: Path,
                                             loss: str) -> None:
    """A list of registry policies in one run: the trainer supplies top-k to topk_drift (teacher's from its
    pass, student's from a no-grad pass) and progress to horizon; every policy's metrics show it acted."""
    other_teacher = build_tiny_model(tmp_path / "teacher", smollm2_tokenizer_dir, seed=1)
    if "opd_agents_test/Echo-v0" not in gym.registry:
        gym.register("opd_agents_test/Echo-v0", entry_point=EchoEnv, disable_env_checker=True)
    policies = [{"name": "iw_opd", "gamma": 0.5},
                {"name": "topk_drift", "k": 4, "min_overlap": 1.0, "span": 1, "decay": 0.5, "floor": 0.01},
                {"name": "horizon", "start_turns": 1}, {"name": "change_point", "min_drop": 0.01},
                {"name": "rollout_truncation", "mode": "invalid_calls", "max_invalid_calls": 5}]
    cfg = tiny_cfg(tmp_path, tiny_model_dir, **{
        "divergence.policies": policies, "loss.kind": loss, "train.steps": 2, "teacher.model": str(other_teacher),
        "env.id": "opd_agents_test/Echo-v0", "env.kwargs": {}, "env.limits.max_turns": 3,
        "env.limits.max_tokens_per_turn": 16, "max_tokens_per_turn": 16})
    trainer = Trainer(cfg)
    trainer.train(until_step=1)  # progress 1/2: horizon keeps 1 + floor(0.5 * 3) = 2 of 3 turns
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["step"] == 1 and math.isfinite(row["loss"])
    assert row["div/policy/iw_opd/mean_weight"] > 1.0
    assert 0.0 < row["div/policy/topk_drift/mean_weight"] < 1.0  # two unrelated tiny models: top-4 sets differ
    assert row["div/policy/horizon/zero_share"] > 0.0
    assert "div/policy/change_point/zero_share" in row and "div/policy/rollout_truncation/stop_share" in row
    trajs = [json.loads(line) for line in (tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()]
    three = [t for t in trajs if len(t["turns"]) == 3]
    assert three and all(t["turns"][2]["weight"] == 0.0 for t in three)


def test_online_teacher_keeps_the_topk_a_policy_reads(tmp_path: Path, tiny_model_dir: Path,
                                                      smollm2_tokenizer_dir: Path) -> None:
    """Rollout-time scoring (tau = inf: nothing cut) + topk_drift: the online teacher keeps the top-k ids
    as it scores each turn, so no teacher pass runs after the rollout, and the policy still acts."""
    other_teacher = build_tiny_model(tmp_path / "teacher", smollm2_tokenizer_dir, seed=1)
    if "opd_agents_test/Echo-v0" not in gym.registry:
        gym.register("opd_agents_test/Echo-v0", entry_point=EchoEnv, disable_env_checker=True)
    policies = [{"name": "rollout_truncation", "mode": "threshold", "tau": 1e9},
                {"name": "topk_drift", "k": 4, "min_overlap": 1.0, "span": 1, "decay": 0.5, "floor": 0.01}]
    cfg = tiny_cfg(tmp_path, tiny_model_dir, **{
        "divergence.policies": policies, "train.steps": 1, "teacher.model": str(other_teacher),
        "env.id": "opd_agents_test/Echo-v0", "env.kwargs": {}, "env.limits.max_turns": 2,
        "env.limits.max_tokens_per_turn": 16, "max_tokens_per_turn": 16})
    Trainer(cfg).train()
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["teacher_tokens"] == 0 and row["teacher_tokens_rollout"] > 0
    assert 0.0 < row["div/policy/topk_drift/mean_weight"] < 1.0
    assert row["div/policy/rollout_truncation/stop_share"] == 0.0


def test_engine_trainer_mismatch_is_measured_and_tis_weights_tokens(tmp_path: Path, tiny_model_dir: Path,
                                                                    tiny_teacher_dir: Path) -> None:
    """Every on-policy step reports |log pi_trainer - log pi_engine| over the sampled tokens; with the HF
    engine (same weights, other batch shapes) it is floating-point noise, so truncated importance sampling
    (weights min(ratio, cap) ~ 1) leaves the loss as it was."""
    rows = {}
    for name, extra in (("plain", {}), ("tis", {"loss.tis_cap": 2.0})):
        Trainer(tiny_cfg(tmp_path / name, tiny_model_dir, **{"teacher.model": str(tiny_teacher_dir),
                                                              "train.steps": 1, **extra})).train()
        rows[name] = json.loads((tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    plain, tis = rows["plain"], rows["tis"]
    assert 0.0 <= plain["mismatch/mean_abs"] <= plain["mismatch/p99"] <= plain["mismatch/max"] < 1e-4
    assert tis["loss"] == pytest.approx(plain["loss"], rel=1e-3, abs=1e-6)


def test_tis_needs_untempered_sampling_and_engines_are_checked(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="tis_cap .* sampling_temperature = 1.0"):
        tiny_cfg(tmp_path, tiny_model_dir, **{"loss.tis_cap": 2.0, "sampling_temperature": 0.7})
    with pytest.raises(ConfigError, match="unknown rollout engine 'sglang'; known: hf, vllm, vllm_server"):
        Trainer(tiny_cfg(tmp_path, tiny_model_dir, **{"rollout.engine": "sglang"}))
    assert not (tmp_path / "run").exists()  # refused before any work
    with pytest.raises(ConfigError, match="rollout.api_base goes with rollout.engine=vllm_server"):
        tiny_cfg(tmp_path, tiny_model_dir, **{"rollout.engine": "vllm_server"})


def test_pick_device_keeps_fp32_weights_under_mixed_precision() -> None:
    from opd_agents.training.components import pick_device

    assert pick_device("cpu", "auto") == (torch.device("cpu"), torch.float32, None)  # the suite: no native bf16
    assert pick_device("cpu", "bf16-mixed") == (torch.device("cpu"), torch.float32, torch.bfloat16)
    assert pick_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16, None)


def test_auto_computes_in_bf16_where_the_cpu_multiplies_it_natively(monkeypatch: pytest.MonkeyPatch,
                                                                     tiny_model_dir: Path) -> None:
    """On an AMX CPU ``auto`` is bf16-mixed for the student and bf16 weights for the frozen teacher."""
    from opd_agents.teacher import make_teacher
    from opd_agents.training.components import pick_device

    monkeypatch.setenv("OPD_AGENTS_NATIVE_BF16", "1")
    assert pick_device("cpu", "auto") == (torch.device("cpu"), torch.float32, torch.bfloat16)
    assert pick_device("cpu", "float32") == (torch.device("cpu"), torch.float32, None)
    teacher = make_teacher({"backend": "hf", "model": str(tiny_model_dir), "dtype": "auto"})
    assert next(teacher.model.parameters()).dtype == torch.bfloat16
    monkeypatch.setenv("OPD_AGENTS_NATIVE_BF16", "0")
    teacher = make_teacher({"backend": "hf", "model": str(tiny_model_dir), "dtype": "auto"})
    assert next(teacher.model.parameters()).dtype == torch.float32


def test_bf16_mixed_keeps_the_small_updates_bf16_weights_round_away(tmp_path: Path, tiny_model_dir: Path,
                                                                     tiny_teacher_dir: Path) -> None:
    """At lr 1e-5 an AdamW step moves a weight by ~1e-5, under half a bf16 ulp for |w| > ~2e-3: bf16 weights
    keep few of the updates; bf16-mixed (fp32 weights, bf16 autocast in the engine and the training
    forward) keeps them all, and its engine/trainer mismatch stays at bf16 rounding."""
    changed = {}
    for dtype in ("bfloat16", "bf16-mixed"):
        trainer = Trainer(tiny_cfg(tmp_path / dtype, tiny_model_dir, **{
            "teacher.model": str(tiny_teacher_dir), "train.steps": 1, "train.lr": 1e-5, "train.dtype": dtype,
            "train.lr_schedule": "constant"}))
        before = params(trainer.student)
        trainer.train()
        after = params(trainer.student)
        assert {v.dtype for v in after.values()} == {torch.bfloat16 if dtype == "bfloat16" else torch.float32}
        changed[dtype] = sum(int((before[k] != v).sum()) for k, v in after.items()) / sum(v.numel() for v in after.values())
        row = json.loads((tmp_path / dtype / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        assert torch.isfinite(torch.tensor(row["loss"])) and row["mismatch/mean_abs"] < 0.05
    assert changed["bf16-mixed"] > 0.9 and changed["bfloat16"] < 0.5
