"""Training configs: YAML validated by pydantic. A bad key or value stops everything with one message."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from opd_agents.training.policies import DivergencePolicyConfig
from opd_agents.env.core import EnvLimits
from opd_agents.errors import ConfigError
from opd_agents.teacher.base import TeacherConfig
from opd_agents.training.losses import loss_kinds
from opd_agents.training.tracking import tracker_names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnvConfig(_Strict):
    id: str = Field("opd_agents/Arithmetic-v0", description=(
        "a registered id (the short name works too), module:ClassName, or module:registered-id"))
    kwargs: dict[str, Any] = Field(default_factory=dict, description="constructor kwargs of the env")
    limits: EnvLimits = Field(default_factory=EnvLimits)


class LoraConfig(_Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class StudentConfig(_Strict):
    model: str = Field("smollm2-135m-instruct", description=(
        "a local model directory, a hub id in the Hugging Face cache (org/name[@revision]) or a built-in"))
    lora: LoraConfig | None = None
    chat_template: Literal["chatml", "model", "auto"] = Field("chatml", description=(
        "chatml: the project's ChatML renderer; model: the model's own tool-aware chat template where it "
        "passes the prefix check (else a warning and ChatML), its tool-call format picked from the template "
        "unless env.kwargs.parser is set; auto: model when the template renders tools, else chatml"))


class SFTTeacherConfig(_Strict):
    """Build the teacher by fine-tuning ``model`` on scripted-expert trajectories before distilling."""

    episodes: int = Field(64, gt=0)
    steps: int = Field(40, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(1e-4, gt=0)


class RunTeacherConfig(TeacherConfig):
    """The backend settings of ``opd_agents.teacher.TeacherConfig`` plus how the run builds the teacher."""

    model: str = "smollm2-135m-instruct"
    privileged: bool = Field(False, description="teacher sees the task's reference solution")
    sft_from_expert: SFTTeacherConfig | None = None
    overlap: bool | Literal["auto"] = Field("auto", description=(
        "score each episode as soon as it finishes, while the rest of the rollout still plays (off: one pass "
        "after the rollout); auto: on unless the teacher is an in-process model on the CPU, whose scoring "
        "thread would share the sampler's cores and slow every forward of both (a second OpenMP team)"))

    @model_validator(mode="after")
    def _server_needs_base(self) -> RunTeacherConfig:
        if self.backend == "server" and not self.api_base:
            raise ValueError("teacher.backend 'server' needs teacher.api_base (e.g. http://127.0.0.1:8000/v1)")
        return self

    def backend_config(self) -> TeacherConfig:
        return TeacherConfig.model_validate(self.model_dump(exclude={"privileged", "sft_from_expert", "overlap"}))


class LossConfig(_Strict):
    kind: str = Field("reverse_kl", description="a loss registered in opd_agents.training.losses "
                                                "(reverse_kl, forward_kl, jsd, ...)")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD mixture: 0 = forward KL, 1 = reverse KL")
    top_k: int = Field(0, ge=0, description="0 = full vocabulary (in-process teacher); k = teacher's top-k")
    tail: Literal["bucket", "renormalize"] = "bucket"
    clip_eps: float = Field(0.2, gt=0.0)
    kl_coef: float = Field(1.0, ge=0.0)
    outcome_coef: float = Field(0.0, ge=0.0, description="weight of the GRPO outcome advantage (0 = pure OPD)")
    tis_cap: float | None = Field(None, ge=1.0, description=(
        "reverse_kl: weight each token by min(pi_trainer / pi_engine, cap) (truncated importance sampling: "
        "corrects for an engine whose numerics differ from the trainer's); None = off"))

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        if kind not in loss_kinds():
            raise ValueError(f"unknown loss kind {kind!r}; registered: {', '.join(loss_kinds())}")
        return kind


class EvalConfig(_Strict):
    every: int = Field(10, gt=0)
    episodes: int = Field(32, ge=0, description="held-out episodes per evaluation; 0: no evaluation")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy-like (sampled at a tiny temperature)")
    before: bool = Field(True, description="evaluate the student at step 0 (the teacher-strength check does anyway)")


class RolloutConfig(_Strict):
    engine: str = Field("hf", description="sampling engine (opd_agents.rollout.engine registry): hf | vllm | "
                                          "vllm_server")
    max_episodes: int = Field(32, gt=0, description="episodes in flight at once; the engine batches their turns")
    deterministic: bool = Field(True, description="the hf engine admits requests only while no env step is in "
                                                  "flight, so a seeded run repeats exactly; false: slow tools "
                                                  "overlap decoding instead")
    api_base: str | None = Field(None, description="engine=vllm_server: the server, e.g. http://127.0.0.1:8000")
    weight_sync: Literal["auto", "shm", "http"] = Field(
        "auto", description="engine=vllm_server: how new weights reach it: a file in /dev/shm (same node), or "
                            "served over HTTP by the trainer (another node); auto: shm for a loopback server")
    weights_host: str | None = Field(None, description="weight_sync=http: the address the trainer serves the "
                                                       "weights on (default: its address towards the server)")

    @model_validator(mode="after")
    def _api_base_with_server(self) -> RolloutConfig:
        if (self.api_base is None) != (self.engine != "vllm_server"):
            raise ValueError("rollout.api_base goes with rollout.engine=vllm_server (and only with it)")
        if self.engine != "vllm_server" and (self.weight_sync != "auto" or self.weights_host):
            raise ValueError("rollout.weight_sync / weights_host go with rollout.engine=vllm_server")
        return self


class TeacherStrengthConfig(_Strict):
    episodes: int = Field(32, ge=0, description="0 skips the check")
    min_gap: float = Field(0.1, ge=0.0)
    on_weak: Literal["warn", "stop"] = "warn"


class TrainLoopConfig(_Strict):
    steps: int = Field(40, gt=0)
    tasks_per_step: int = Field(8, gt=0)
    group_size: int = Field(1, gt=0, description="rollouts per task (G); >1 enables GRPO group advantages")
    lr: float = Field(2e-5, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    gradient_checkpointing: bool = Field(False, description=(
        "recompute each decoder layer's activations in the backward instead of keeping them through the "
        "micro-batch (TRL's gradient_checkpointing): a step's activation memory drops to the layers' inputs, "
        "for about one more forward pass of the student per micro-batch"))
    dtype: Literal["auto", "float32", "bf16-mixed", "bfloat16"] = Field("auto", description=(
        "the student's weights / compute: float32; bf16-mixed (fp32 weights and optimizer, forwards under bf16 "
        "autocast); bfloat16 (bf16 weights: half the memory, but AdamW updates far below a weight's magnitude "
        "round away); auto = bf16-mixed where bf16 matmuls are native (GPUs, CPUs with AMX), else float32"))
    on_policy_fraction: float = Field(1.0, ge=0.0, le=1.0, description="GKD lambda: share of on-policy batches")
    off_policy_source: Literal["teacher", "expert"] = "teacher"
    teacher_rollouts_per_task: int = Field(1, gt=0, description="best-of-N teacher trajectories; 1 = plain OPD")
    teacher_aux_weight: float = Field(0.05, ge=0.0)
    checkpoint_every: int = Field(20, gt=0)
    keep_checkpoints: int | None = Field(None, ge=1, description=(
        "keep only the newest N step checkpoints (older ones are deleted once a newer one is whole; "
        "TRL's save_total_limit); None keeps all"))
    parallel: Literal["none", "ddp", "fsdp"] = Field("none", description=(
        "under torchrun: ddp = a full student per rank, gradients all-reduced; fsdp = the student sharded "
        "over the ranks (FSDP2). Each rank plays its slice of a step's tasks"))
    dist_timeout_s: float = Field(600.0, gt=0, description=(
        "a collective waiting longer than this (a rank hung) fails the whole job"))


class RunConfig(_Strict):
    run_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"
    env: EnvConfig = Field(default_factory=EnvConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    teacher: RunTeacherConfig = Field(default_factory=RunTeacherConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    teacher_strength: TeacherStrengthConfig = Field(default_factory=TeacherStrengthConfig)
    divergence: DivergencePolicyConfig = Field(default_factory=DivergencePolicyConfig)
    sampling_temperature: float = Field(1.0, gt=0.0)
    max_tokens_per_turn: int = Field(128, gt=0)
    report_to: list[str] = Field(default_factory=list, description=(
        "experiment trackers beside metrics.jsonl (always written): tensorboard, wandb, trackio; a name or a "
        "list, none = metrics.jsonl only (as transformers' TrainingArguments.report_to)"))

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> list[str]:
        return tracker_names(value)

    @model_validator(mode="after")
    def _strength_check_needs_eval(self) -> RunConfig:
        if self.teacher_strength.episodes and not self.eval.episodes:
            raise ValueError("teacher_strength compares the teacher with the student's held-out success: it needs "
                             "eval.episodes > 0 (or set teacher_strength.episodes: 0)")
        return self

    @model_validator(mode="after")
    def _tis_needs_untempered_sampling(self) -> RunConfig:
        if self.loss.tis_cap is not None and self.sampling_temperature != 1.0:
            raise ValueError("loss.tis_cap compares the engine's and the trainer's logprobs at temperature 1: "
                             f"it needs sampling_temperature = 1.0, not {self.sampling_temperature}")
        return self


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent: Any = model
        for part in err["loc"][:-1]:
            field = parent.model_fields.get(str(part)) if isinstance(parent, type) else None
            parent = field.annotation if field else None
            parent = next((a for a in getattr(parent, "__args__", ()) if isinstance(a, type)), parent)
        allowed = sorted(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        return f"unknown key '{loc}'" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
    return f"'{loc}' = {err.get('input')!r}: {err['msg']}"


def parse_config(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err, RunConfig) for err in e.errors()]
        raise ConfigError(f"invalid config {source}: " + "; ".join(lines)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(data, str(path))
