"""Cascade on long TextWorld episodes (issue 10, evidence 1): per-turn divergence d_k of a weak student's
own episodes, scored by a clearly stronger privileged teacher, at several quest lengths.

    .venv/bin/python bench/textworld_cascade.py --quest-lengths 4 8         # then, if time allows: 16
    .venv/bin/python bench/cascade.py runs/textworld-cascade/ql4/trajectories.jsonl --max-turns 8 \
        --plot docs/img/cascade-textworld-ql4.png                           # tables + plot per quest length

Resumable: a quest length whose ``runs/textworld-cascade/ql{N}/summary.json`` exists is skipped; the SFT
model(s) are cached under ``runs/textworld-cascade/{teacher,student}/`` (reused while their settings match).

Models (SmolLM2-135M-Instruct fine-tuned here on scripted-expert episodes of TRAINING seeds):

- teacher: ``--teacher-steps`` (10) SFT steps (batch 4, lr 2e-4) on noisy-expert episodes of quest lengths 4 and 8
  (48 each, seeds ``random.Random(0).sample(range(900_000), 48)``): each turn is, with probability 0.25, a
  random admissible command (weight 0: not trained on) and otherwise the walkthrough's next command from the
  current state (trained on), so it sees states after detours and learns to recover. It is trained on, and
  scores with, the privileged prompt (``Task.reference``: the walkthrough from the start, appended to the
  system message: ``privileged_reference``, as ``opd-agents train`` builds it).
- student (default, ``--student-steps 0``): the same weights with the plain prompt, i.e. without the
  walkthrough: it acts in the tool format, but must find the plan from the objective and the room texts, so
  it errs; d_k measures exactly the privileged gap. ``--student-steps N`` > 0 instead fine-tunes a separate
  student for N steps (batch 4, lr 2e-4) on clean expert episodes of the first 16 of those seeds per quest
  length, plain prompt (not used for the numbers in docs/divergence.md: on 2 busy cores one SFT step on
  these ≈ 1,000–1,400-token episodes took ≈ 65 s, so the session could afford one SFT model).

Per quest length N: the student plays the held-out seeds 1000000.. (``heldout_seeds(--episodes)``) at
temperature 1.0 (sampling seed 0), ``max_turns = max_tool_calls = 2N``, 48 tokens per turn, 8192-token
context; the teacher scores every token of every turn (one forward pass per trajectory, privileged prompt)
and ``annotate_turns`` writes d_k and the first failing turn (``Turn.outcome`` invalid / off_plan). Written:
``ql{N}/trajectories.jsonl`` (scored student episodes), ``ql{N}/teacher.jsonl`` (the teacher playing the same
seeds with its privileged prompt, temperature 1.0, sampling seed 0: its success rate), ``ql{N}/summary.json``.
Torch threads: ``--threads`` (2 on the 2-core machine); one quest length at a time.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ENV_ID = "opd_agents/TextWorld-v0"
SFT_QUEST_LENGTHS = (4, 8)
SFT_EPISODES = 48  # per SFT quest length (teacher); the student uses the first STUDENT_EPISODES of them
STUDENT_EPISODES = 16
NOISE = 0.25
BATCH, LR = 4, 2e-4


def train_seeds(n: int = SFT_EPISODES) -> list[int]:
    return random.Random(0).sample(range(900_000), n)


def env_factory(q: int, max_turns: int | None = None) -> Callable[[], Any]:
    from opd_agents.env.core import EnvLimits
    from opd_agents.env.registry import make_env

    limits = None
    if max_turns is not None:
        limits = EnvLimits(max_turns=max_turns, max_tool_calls=max_turns, max_tokens_per_turn=48,
                           max_total_tokens=48 * max_turns, max_context_tokens=8192)
    return lambda: make_env(ENV_ID, quest_length=q, **({"limits": limits} if limits else {})).unwrapped


def play_noisy_expert(factory: Callable[[], Any], seeds: Sequence[int], renderer: Any, noise: float,
                      rng: random.Random) -> list[Any]:
    """Like ``opd_agents.rollout.expert.play_expert``, but each turn is a random admissible command with
    probability ``noise`` (turn weight 0) instead of the walkthrough's next command (weight 1)."""
    from opd_agents.rollout.runner import open_trajectory, record_step
    from opd_agents.types import Message, Turn

    out = []
    for seed in seeds:
        env = factory()
        traj = open_trajectory(env, seed, ENV_ID, "noisy-expert", renderer)
        while True:
            admissible = list(env._state.get("admissible_commands") or [])
            if admissible and rng.random() < noise:
                text, weight = env.parser.format_call("act", {"command": rng.choice(admissible)}), 0.0
            else:
                text, weight = env.expert_action(env.task, list(env.history)), 1.0
            obs, reward, terminated, truncated, info = env.step(text)
            ids = renderer.encode_assistant(text)
            turn = Turn(index=len(traj.turns), token_ids=ids, sampling_logprobs=[0.0] * len(ids), text=text,
                        finish="stop", weight=weight)
            traj.turns.append(turn)
            record_step(traj, turn, reward, info)
            if terminated or truncated:
                traj.stop_reason, traj.terminated, traj.truncated = info["stop_reason"], terminated, truncated
                break
            turn.observation_ids = renderer.observation_ids([Message.model_validate(m) for m in obs],
                                                            turn_closed=True)
        traj.messages = list(env.history)
        out.append(traj)
    return out


def build_sft(kind: str, base: str, steps: int, out_dir: Path, log: Callable[[str], None]) -> Path:
    """The teacher (privileged, noisy expert) or the student (plain, clean expert), cached by settings."""
    from opd_agents.models import load_model
    from opd_agents.rollout.renderer import ChatMLRenderer
    from opd_agents.teacher.base import TeacherView
    from opd_agents.teacher.sft import _save_atomically, sft_train
    from opd_agents.training.components import privileged_reference

    n = SFT_EPISODES if kind == "teacher" else STUDENT_EPISODES
    settings = {"kind": kind, "base": base, "steps": steps, "quest_lengths": list(SFT_QUEST_LENGTHS),
                "episodes_per_quest_length": n, "noise": NOISE if kind == "teacher" else 0.0,
                "batch": BATCH, "lr": LR, "seeds": "random.Random(0).sample(range(900_000), 48)"}
    marker = out_dir / "opd_sft_teacher.json"
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == settings:
        log(f"{kind}: cached {out_dir}")
        return out_dir
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, tok = load_model(base)
    renderer = ChatMLRenderer(tok, model_parser())
    rng = random.Random(1)
    trajs = []
    for q in SFT_QUEST_LENGTHS:
        factory = env_factory(q)
        seeds = train_seeds()[:n]
        if kind == "teacher":
            qtrajs = play_noisy_expert(factory, seeds, renderer, NOISE, rng)
            view = TeacherView(renderer, privileged_reference(factory))
            for t in qtrajs:  # train on the prompt the teacher scores with
                t.prompt_ids = view.prompt_ids(t)
        else:
            qtrajs = play_noisy_expert(factory, seeds, renderer, 0.0, rng)
        trajs += qtrajs
    t_play = time.perf_counter() - t0
    pad = tok.pad_token_id if tok.pad_token_id is not None else renderer.im_end_id
    # One episode per forward/backward: batch-4 steps on ≈1,500-token episodes peaked at 18 GB (OOM-killed).
    losses = sft_train(model, trajs, int(pad), steps, BATCH, LR, seed=0, log=log, micro_batch_size=1)
    turns = [x for t in trajs for x in t.turns]
    meta = {"settings": settings, "losses_first5": losses[:5], "losses_last5": losses[-5:],
            "episodes": len(trajs), "expert_success": sum(t.success for t in trajs) / len(trajs),
            "turns": len(turns), "trained_turns": sum(x.weight > 0 for x in turns),
            "play_s": t_play, "wall_s": time.perf_counter() - t0}
    _save_atomically(model, tok, out_dir, meta)
    log(f"{kind}: {steps} SFT steps on {len(trajs)} episodes, loss {losses[0]:.3f} -> {losses[-1]:.3f} "
        f"(play {t_play:.0f}s, total {meta['wall_s']:.0f}s) -> {out_dir}")
    return out_dir


def model_parser() -> Any:
    from opd_agents.env.parsers import get_parser

    return get_parser("hermes")


def run_quest_length(q: int, teacher_dir: Path, student_dir: Path, out: Path, episodes: int,
                     batch_size: int, log: Callable[[str], None], teacher_episodes: int) -> dict[str, Any]:
    from opd_agents import heldout_seeds
    from opd_agents.models import load_model
    from opd_agents.rollout.renderer import ChatMLRenderer
    from opd_agents.rollout.runner import Rollout
    from opd_agents.rollout.hf_engine import HFEngine
    from opd_agents.store import write_trajectories
    from opd_agents.teacher import HFTeacher
    from opd_agents.teacher.base import TeacherView
    from opd_agents.training.components import privileged_reference
    from opd_agents.training.divergence import annotate_turns, first_failing_turn
    from opd_agents.types import SamplingParams

    t0 = time.perf_counter()
    seeds = heldout_seeds(episodes)
    factory = env_factory(q, max_turns=2 * q)
    privileged = privileged_reference(env_factory(q))
    sampling = SamplingParams(temperature=1.0, max_tokens_per_turn=48, seed=0)
    student, tok = load_model(student_dir)
    renderer = ChatMLRenderer(tok, model_parser())
    trajs = Rollout(HFEngine(student, renderer), factory, sampling=sampling, model_id="sft-student",
                    max_episodes=batch_size, env_id=ENV_ID).run(seeds)
    t_roll = time.perf_counter() - t0
    log(f"ql{q}: student rollout {len(trajs)} episodes, success {sum(t.success for t in trajs)}/{len(trajs)}, "
        f"{t_roll:.0f}s")
    teacher = HFTeacher(teacher_dir, batch_size=4, renderer=renderer, privileged=privileged,
                        teacher_id="sft-teacher-privileged")
    t1 = time.perf_counter()
    teacher.score_and_apply(trajs)
    for t in trajs:
        annotate_turns(t)
    t_score = time.perf_counter() - t1
    out.mkdir(parents=True, exist_ok=True)
    write_trajectories(out / "trajectories.jsonl", trajs)
    log(f"ql{q}: scored in {t_score:.0f}s")
    firsts = [first_failing_turn(t) for t in trajs]
    outcomes = Counter(x.outcome.value if x.outcome else "none" for t in trajs for x in t.turns)
    summary: dict[str, Any] = {
        "quest_length": q, "seeds": [seeds[0], seeds[-1]], "max_turns": 2 * q, "temperature": 1.0,
        "student_success": sum(t.success for t in trajs) / len(trajs),
        "student_mean_turns": sum(len(t.turns) for t in trajs) / len(trajs),
        "with_failing_turn": sum(f is not None for f in firsts), "without": sum(f is None for f in firsts),
        "first_failing_turn_hist": dict(sorted(Counter(f for f in firsts if f is not None).items())),
        "student_turn_outcomes": dict(outcomes),
        "student_stop_reasons": dict(Counter(t.stop_reason.value if t.stop_reason else "none" for t in trajs)),
        "rollout_s": t_roll, "score_s": t_score, "teacher_success": None,
    }
    # Written now, so an interrupted teacher evaluation leaves the cascade data complete (teacher_success null).
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if teacher_episodes:
        t2 = time.perf_counter()
        view = TeacherView(renderer, privileged)
        tengine = HFEngine(teacher.model, renderer)
        tseeds = seeds[:teacher_episodes]
        ttrajs = Rollout(tengine, factory, sampling=sampling, model_id="sft-teacher-privileged",
                         max_episodes=batch_size, env_id=ENV_ID, sampling_prompt=view.prompt_ids).run(tseeds)
        write_trajectories(out / "teacher.jsonl", ttrajs)
        summary |= {
            "teacher_episodes": len(ttrajs), "teacher_success": sum(t.success for t in ttrajs) / len(ttrajs),
            "student_success_same_seeds": sum(t.success for t in trajs[:len(ttrajs)]) / len(ttrajs),
            "teacher_mean_turns": sum(len(t.turns) for t in ttrajs) / len(ttrajs),
            "teacher_stop_reasons": dict(Counter(t.stop_reason.value if t.stop_reason else "none" for t in ttrajs)),
            "teacher_rollout_s": time.perf_counter() - t2,
        }
    summary["wall_s"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"ql{q}: {json.dumps(summary)}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quest-lengths", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/textworld-cascade"))
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--teacher-steps", type=int, default=10)
    ap.add_argument("--student-steps", type=int, default=0,
                    help="0: the student is the teacher's weights with the plain prompt (no separate SFT)")
    ap.add_argument("--teacher-episodes", type=int, default=None,
                    help="held-out episodes the teacher plays for its success rate (default: --episodes; 0: none)")
    ap.add_argument("--batch-size", type=int, default=32, help="episodes per rollout batch")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    teacher_dir = build_sft("teacher", args.base, args.teacher_steps, args.out / "teacher", log)
    if args.student_steps == 0:  # the teacher's own weights, without the walkthrough: only the privileged gap
        student_dir = teacher_dir
        log("student: the teacher's weights with the plain prompt (no walkthrough)")
    else:
        student_dir = build_sft("student", args.base, args.student_steps, args.out / "student", log)
    for q in args.quest_lengths:
        out = args.out / f"ql{q}"
        if (out / "summary.json").is_file():
            log(f"ql{q}: done already ({out / 'summary.json'}), skipped")
            continue
        teacher_episodes = args.episodes if args.teacher_episodes is None else args.teacher_episodes
        run_quest_length(q, teacher_dir, student_dir, out, args.episodes, args.batch_size, log, teacher_episodes)


if __name__ == "__main__":
    main()
