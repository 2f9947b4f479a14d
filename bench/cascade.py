"""Cascade reproduction: mean per-turn divergence d_k by turn index, trajectories with a failing turn vs without
(the analogue of SOD's Fig. 1a), from any file of teacher-scored trajectories.

The failing turn is the telemetry's ``first_failing_turn``: the first turn whose ``Turn.outcome`` is invalid or
off_plan when the env reports outcomes (TextWorld-v0), else the first turn whose tool call failed.

    .venv/bin/python bench/cascade.py runs/quickstart/trajectories.jsonl --plot docs/img/cascade.png
    .venv/bin/python bench/cascade.py runs/ablation/plain-s*/trajectories.jsonl     # several runs pooled

Besides d_k by absolute turn index it prints d_k aligned on each trajectory's first failing turn
(offset 0 = the first failing turn), which shows directly whether divergence grows after it, and, when the env
reports ``Turn.outcome``, the same restricted to turns whose own outcome is ok, and mean d_k by outcome. Then
loops: the share of turns whose tool calls repeat an earlier turn's exactly, by quarter of ``--max-turns``, with
mean d_k of repeated vs new calls; and where the teacher's signal sits: the shares of sum |log pi_S - log pi_T|
before, at and after the first failing turn and in repeated calls.

Training runs write scored trajectories (teacher logprobs and d_k on every turn) to RUN_DIR/trajectories.jsonl;
`opd-agents score` scores any other trajectory file.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from opd_agents.store import iter_trajectories
from opd_agents.training.divergence import divergence_table, first_failing_turn, repeated_calls, turn_divergence
from opd_agents.types import Trajectory


def print_repeats(trajs: list[Trajectory], max_turns: int) -> None:
    """Share of turns whose tool calls repeat an earlier turn's exactly, by quarter of the horizon, and mean
    d_k of repeated vs new calls: a student stuck in a loop is copied by the teacher as well, so low d_k late in
    an episode can mean agreement on the loop rather than recovery."""
    window = max(1, -(-max_turns // 4))
    repeats: dict[int, list[bool]] = defaultdict(list)
    d_by_kind: dict[str, list[float]] = defaultdict(list)
    for t in trajs:
        for turn, repeated in zip(t.turns, repeated_calls(t), strict=True):
            if repeated is None:
                continue
            repeats[turn.index // window].append(repeated)
            if (d := turn_divergence(turn)) is not None:
                d_by_kind["repeated" if repeated else "new"].append(d)
    if not repeats:
        return
    print(f"\n{'turns':>34} | {'repeat an earlier call':>22} {'n':>5}")
    for w in sorted(repeats):
        share = sum(repeats[w]) / len(repeats[w])
        print(f"{f'{w * window + 1}-{(w + 1) * window}':>34} | {share:>22.2f} {len(repeats[w]):>5}")
    print(f"\n{'tool call':>34} | {'mean d_k':>8} {'n':>5}")
    for kind in ("new", "repeated"):
        if d_by_kind[kind]:
            print(f"{kind:>34} | {statistics.mean(d_by_kind[kind]):>8.3f} {len(d_by_kind[kind]):>5}")


def print_signal_share(trajs: list[Trajectory]) -> None:
    """Where the teacher's per-token signal sits: shares of sum |log pi_S - log pi_T| over all scored tokens
    (d_k x tokens per turn) before, at and after each trajectory's first failing turn, and in repeated calls --
    what a policy that cuts after the first failing turn, or one that masks repeats, would take out of the loss."""
    mass: dict[str, float] = defaultdict(float)
    tokens: dict[str, int] = defaultdict(int)
    for t in trajs:
        first = first_failing_turn(t)
        for turn, repeated in zip(t.turns, repeated_calls(t), strict=True):
            if (d := turn_divergence(turn)) is None:
                continue
            n = len(turn.sampling_logprobs)
            where = ("no failing turn" if first is None else "before the first failing turn" if turn.index < first
                     else "at it" if turn.index == first else "after it")
            for key in (where, "repeated calls") if repeated else (where,):
                mass[key] += d * n
                tokens[key] += n
            mass["all"] += d * n
            tokens["all"] += n
    if not mass["all"]:
        return
    title = "share of sum |log pi_S - log pi_T| over scored tokens"
    print(f"\n{title:>52} | {'share':>5} {'tokens':>6}")
    for key in ("before the first failing turn", "at it", "after it", "no failing turn", "repeated calls"):
        if tokens[key]:
            print(f"{key:>52} | {mass[key] / mass['all']:>5.2f} {tokens[key] / tokens['all']:>6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trajectories", type=Path, nargs="+")
    ap.add_argument("--max-turns", type=int, default=6)
    ap.add_argument("--plot", type=Path, help="write the figure here (PNG or SVG)")
    ap.add_argument("--title", help="the figure's title")
    args = ap.parse_args()

    trajs = [t for path in args.trajectories for t in iter_trajectories(path)
             if any(x.teacher_logprobs for x in t.turns)]
    table = divergence_table(trajs, max_turns=args.max_turns)
    with_err = sum(1 for t in trajs if first_failing_turn(t) is not None)
    print(f"{len(trajs)} scored trajectories ({with_err} with a failing turn) from "
          f"{', '.join(map(str, args.trajectories))}\n")
    print(f"{'turn k':>6} | {'d_k with failing turn':>21} {'n':>5} | {'d_k without':>12} {'n':>5}")
    for k in range(args.max_turns):
        a, na = table["with_error"][k], table["with_error_n"][k]
        b, nb = table["no_error"][k], table["no_error_n"][k]
        if not na and not nb:
            continue
        fa = f"{a:.3f}" if a is not None else "-"
        fb = f"{b:.3f}" if b is not None else "-"
        print(f"{k + 1:>6} | {fa:>21} {int(na or 0):>5} | {fb:>12} {int(nb or 0):>5}")
    by_offset: dict[int, list[float]] = defaultdict(list)
    by_offset_ok: dict[int, list[float]] = defaultdict(list)  # only turns whose own outcome is ok
    for t in trajs:
        first = first_failing_turn(t)
        if first is None:
            continue
        for turn in t.turns:
            d = turn_divergence(turn)
            if d is not None:
                by_offset[turn.index - first].append(d)
                if turn.outcome is not None and turn.outcome.value == "ok":
                    by_offset_ok[turn.index - first].append(d)
    if by_offset:
        print(f"\n{'turns after the first failing turn':>34} | {'mean d_k':>8} {'n':>5}"
              + (f" | {'mean d_k, ok turns':>18} {'n':>5}" if by_offset_ok else ""))
        for off in sorted(by_offset):
            row = f"{off:>34} | {statistics.mean(by_offset[off]):>8.3f} {len(by_offset[off]):>5}"
            if by_offset_ok:
                ok = by_offset_ok.get(off, [])
                row += f" | {statistics.mean(ok) if ok else float('nan'):>18.3f} {len(ok):>5}"
            print(row)
    by_outcome: dict[str, list[float]] = defaultdict(list)
    for t in trajs:
        for turn in t.turns:
            d = turn_divergence(turn)
            if d is not None and turn.outcome is not None:
                by_outcome[turn.outcome.value].append(d)
    if by_outcome:
        print(f"\n{'Turn.outcome':>34} | {'mean d_k':>8} {'n':>5}")
        for o in sorted(by_outcome):
            print(f"{o:>34} | {statistics.mean(by_outcome[o]):>8.3f} {len(by_outcome[o]):>5}")
    print_repeats(trajs, args.max_turns)
    print_signal_share(trajs)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, (ax, ax_off) = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
        for key, label in (("with_error", "with a failing turn"), ("no_error", "without")):
            pts = [(k + 1, v) for k, v in enumerate(table[key]) if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xlabel("turn k")
        ax.set_ylabel("mean d_k = mean |log pi_S - log pi_T|")
        ax.set_title("by turn index")
        ax.legend()
        offsets = sorted(by_offset)
        ax_off.plot(offsets, [statistics.mean(by_offset[o]) for o in offsets], marker="o", color="C0",
                    label="all turns")
        if by_offset_ok:
            ok_offsets = sorted(by_offset_ok)
            ax_off.plot(ok_offsets, [statistics.mean(by_offset_ok[o]) for o in ok_offsets], marker=".",
                        linestyle="--", color="C2", label="turns whose outcome is ok")
            ax_off.legend()
        ax_off.axvline(0, color="grey", linestyle=":")
        ax_off.set_xlabel("turns after the first failing turn")
        ax_off.set_title("aligned on the first failing turn")
        for a in (ax, ax_off):
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if args.title:
            fig.suptitle(args.title)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
