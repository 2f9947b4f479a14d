"""Why the HF engine runs the model on the caller's thread: the same decode step, timed on the main thread,
in a second thread, and on the main thread while another thread owns an (idle) OpenMP team.

    python bench/engine_threads.py [--threads 2] [--rows 8] [--context 400] [--repeats 3]

torch's CPU kernels run on OpenMP (libgomp). Once more than one thread owns a team, libgomp counts more
managed threads than CPUs and shortens every team's spin-wait between parallel regions, so each of the
hundreds of regions in a forward pays a futex wake-up. Interleaved, fresh model state per measurement;
needs a quiet machine (another busy process dwarfs the effect).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache

from opd_agents.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm, _ = load_model(args.model)
    gen = torch.Generator().manual_seed(0)

    def decode_ms() -> float:
        """ms per decode step of ``rows`` rows after a ``context``-token prefill (run in the calling thread)."""
        torch.set_num_threads(args.threads)  # per thread under OpenMP
        with torch.no_grad():
            cache = DynamicCache()
            lm(input_ids=torch.randint(0, 40000, (args.rows, args.context), generator=gen), past_key_values=cache,
               use_cache=True, logits_to_keep=1)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                lm(input_ids=torch.randint(0, 40000, (args.rows, 1), generator=gen), past_key_values=cache,
                   use_cache=True, logits_to_keep=1)
        return (time.perf_counter() - t0) / args.steps * 1000

    def in_thread(fn: Callable[[], float]) -> float:
        box: list[float] = []
        t = threading.Thread(target=lambda: box.append(fn()))
        t.start()
        t.join()
        return box[0]

    def beside_idle_team() -> float:
        stop = threading.Event()

        def own_a_team() -> None:
            a = torch.randn(512, 512)
            _ = a @ a  # this thread now owns an OpenMP team
            stop.wait()

        t = threading.Thread(target=own_a_team)
        t.start()
        time.sleep(0.3)
        try:
            return decode_ms()
        finally:
            stop.set()
            t.join()

    cells: dict[str, Callable[[], float]] = {
        "main thread": decode_ms,
        "second thread": lambda: in_thread(decode_ms),
        "main thread, another thread owns a team": beside_idle_team,
    }
    decode_ms()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in cells}
    for _ in range(args.repeats):
        for name, fn in cells.items():
            times[name].append(fn())
    base = statistics.median(times["main thread"])
    print(f"\nSmolLM2 decode step, {args.rows} rows, context {args.context}, {args.threads} threads "
          f"(median of {args.repeats}, ms)\n")
    print("| where | ms / step | runs | vs main thread |\n|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} | {', '.join(f'{t:.0f}' for t in ts)} | "
              f"{statistics.median(ts) / base:.2f}x |")


if __name__ == "__main__":
    main()
