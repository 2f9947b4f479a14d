"""Preflight: every check a run can make without loading a model, run before anything is created.

The trainer calls ``preflight(cfg)`` first thing, before its run dir exists or a model is loaded, so an
unknown env id, a bad env argument, a missing model, a teacher setting that cannot work with its backend
or a teacher server that is down fails in seconds with one typed error (exit code 2 from the CLI), not
after minutes of loading or, for a server, at the first scoring call.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from opd_agents.config import EnvConfig, RunConfig
from opd_agents.errors import ConfigError, OpdError
from opd_agents.models import check_model, tokenizer_dir
from opd_agents.env.registry import make_env, resolve_env_id
from opd_agents.rollout.engine import check_engine
from opd_agents.training.distributed import check_launch
from opd_agents.teacher import ServerTeacher, make_teacher
from opd_agents.training.losses import LOSSES
from opd_agents.training.tracking import check_report_to


def preflight(cfg: RunConfig) -> None:
    """Raise an OpdError naming the first problem of ``cfg`` that shows before any work."""
    check_env(cfg.env)
    check_engine(cfg.rollout.engine)
    check_report_to(cfg.report_to)
    check_launch(cfg.train.parallel, fsdp_refused=fsdp_refused(cfg), counts={
        "train.tasks_per_step": cfg.train.tasks_per_step, "eval.episodes": cfg.eval.episodes,
        "teacher_strength.episodes": cfg.teacher_strength.episodes})
    if cfg.rollout.engine == "vllm" and cfg.student.lora is not None:
        raise ConfigError("rollout.engine=vllm cannot load a LoRA student's weights yet: use rollout.engine=hf "
                          "with student.lora")
    check_teacher_settings(cfg)
    check_model(cfg.student.model)
    if cfg.teacher.backend == "server":
        check_teacher_server(cfg)
    else:
        check_model(cfg.teacher.model)


def fsdp_refused(cfg: RunConfig) -> list[str]:
    """Features that run the student outside the training forward (the sharded parameters are not there)."""
    refused = {
        "divergence.rock_tokens (re-reads a probe batch with the student)": cfg.divergence.rock_tokens != "off",
        "divergence policies that compare the student's top-k": cfg.divergence.build().top_k > 0,
        "train.teacher_rollouts_per_task > 1 (ranks teacher samples by the student)":
            cfg.train.teacher_rollouts_per_task > 1,
    }
    return [what for what, bad in refused.items() if bad]


def check_env(env: EnvConfig) -> None:
    """The id is registered and the env accepts its kwargs (it is built once: envs are cheap to build)."""
    env_id = resolve_env_id(env.id)
    try:
        make_env(env_id, **env.kwargs, limits=env.limits).close()
    except OpdError:
        raise
    except (TypeError, ValueError) as e:  # TypeError: an argument the constructor does not take
        # gymnasium appends every kwarg (limits included) to the message: keep the constructor's own words.
        reason = str(e).partition(" was raised from the environment creator")[0]
        raise ConfigError(f"env {env_id} refuses env.kwargs {env.kwargs}: {reason}") from e


def check_teacher_settings(cfg: RunConfig) -> None:
    """Settings the configured teacher backend cannot serve, refused before the run starts (otherwise they
    fail mid-run, after the models are loaded)."""
    backend, loss, train = cfg.teacher.backend, cfg.loss, cfg.train
    if backend == "hf":
        return
    refused = {
        f"loss.kind={loss.kind} with loss.top_k=0 needs full-vocabulary teacher logits (teacher.backend=hf, "
        f"or set loss.top_k > 0)": (loss.kind, "logprobs") not in LOSSES and loss.top_k == 0,  # no sampled-token loss
        **{what: True for what in cfg.divergence.build().unsupplied(backend)},  # policies' teacher signals
        "train.off_policy_source=teacher with train.on_policy_fraction < 1 lets the teacher play episodes "
        "(teacher.backend=hf)": train.on_policy_fraction < 1 and train.off_policy_source == "teacher",
        "train.teacher_rollouts_per_task > 1 lets the teacher play episodes (teacher.backend=hf)":
            train.teacher_rollouts_per_task > 1,
        "teacher.sft_from_expert fine-tunes a local model (teacher.backend=hf or vllm)":
            backend == "server" and cfg.teacher.sft_from_expert is not None,
    }
    if any(refused.values()):
        raise ConfigError(f"teacher.backend={backend} does not work with this config: "
                          + "; ".join(what for what, bad in refused.items() if bad))


def check_teacher_server(cfg: RunConfig) -> None:
    """Every server answers, serves teacher.model and tokenizes like the student (see ServerTeacher.check)."""
    teacher = make_teacher(cfg.teacher.backend_config())  # checks that it answers and serves teacher.model
    assert isinstance(teacher, ServerTeacher)
    teacher.check_tokenizer(student_tokenizer(cfg.student.model))  # only now: a dead server fails faster


def student_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer alone: a local dir's, or a built-in's extracted tokenizer (no model conversion)."""
    path = Path(name_or_path).expanduser()
    return AutoTokenizer.from_pretrained(path if path.exists() else tokenizer_dir(name_or_path))
