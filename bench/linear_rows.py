"""CPU decode with few rows: ``F.linear`` (MKL's ``x @ W^T``) vs ``FewRowsLinear`` (``W @ x^T``), on the
real SmolLM2-135M-Instruct. It decides ``models.few_rows_products_pay`` (by CPU vendor): faster on an AMD EPYC,
slower on an Intel Xeon (docs/benchmarks.md).

    .venv/bin/python bench/linear_rows.py --repeats 3 [--threads 2]

Part 1, per weight shape of the model and rows 1-16: microseconds per product, both ways. Part 2, interleaved:
one decode step (ms, 32 steps over a 100-token context averaged) for 1, 2, 4 and 8 rows with the model's
linears as loaded (``FewRowsLinear``) and forced back to ``F.linear``, medians over repeats, and the largest
logit difference between the two.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from attention import smollm2_bench  # bench/ is on the path of a bench script
from opd_agents.models import FewRowsLinear
from opd_agents.rollout.kv import GrowingCache

# The W @ x^T side is measured on any CPU (the library takes it only where it pays: few_rows_products_pay).
os.environ["OPD_AGENTS_FEW_ROWS"] = "1"


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


@contextmanager
def plain_linears() -> Iterator[None]:
    """``FewRowsLinear`` modules run ``F.linear`` inside."""
    few = FewRowsLinear.forward
    FewRowsLinear.forward = torch.nn.Linear.forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        FewRowsLinear.forward = few  # type: ignore[method-assign]


def main() -> None:
    args, model = smollm2_bench(__doc__)
    shapes = sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)})

    print(f"## one product, us: F.linear / W @ x^T ({args.threads} threads)\n")
    print("| in -> out | " + " | ".join(f"{r} rows" for r in (1, 2, 4, 8, 16)) + " |\n|---|" + "---|" * 5)
    with torch.no_grad():
        for k, n in shapes:
            w = torch.randn(n, k)
            cells = []
            for rows in (1, 2, 4, 8, 16):
                x = torch.randn(rows, k)
                calls = 200 if n < 10_000 else 10
                a = per_call_us(lambda: torch.nn.functional.linear(x, w), calls)
                b = per_call_us(lambda: torch.mm(w, x.t()).t().contiguous(), calls)
                cells.append(f"{a:.0f} / {b:.0f}")
            print(f"| {k} -> {n} | " + " | ".join(cells) + " |")

    def decode(rows: int, steps: int = 32) -> tuple[float, torch.Tensor]:
        ids = torch.randint(100, 40000, (rows, 100), generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            cache = GrowingCache()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            t0 = time.perf_counter()
            for _ in range(steps):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return (time.perf_counter() - t0) / steps * 1000, out.logits

    times: dict[tuple[str, int], list[float]] = {}
    diffs: dict[int, float] = {}
    for _ in range(args.repeats):
        for rows in (1, 2, 4, 8):
            with plain_linears():
                ms_plain, ref = decode(rows)
            ms_few, logits = decode(rows)
            times.setdefault(("F.linear", rows), []).append(ms_plain)
            times.setdefault(("FewRowsLinear", rows), []).append(ms_few)
            diffs[rows] = max(diffs.get(rows, 0.0), (logits - ref).abs().max().item())
    print(f"\n## decode step, ms (median of {args.repeats}, interleaved)\n")
    print("| rows | F.linear | FewRowsLinear | change | max logit diff |\n|---|---|---|---|---|")
    for rows in (1, 2, 4, 8):
        a, b = statistics.median(times[("F.linear", rows)]), statistics.median(times[("FewRowsLinear", rows)])
        print(f"| {rows} | {a:.1f} | {b:.1f} | {100 * (b / a - 1):+.0f} % | {diffs[rows]:.1e} |")


if __name__ == "__main__":
    main()
