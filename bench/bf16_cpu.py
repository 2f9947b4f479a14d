"""fp32 vs bf16 on a CPU with AMX tiles (``opd_agents.models.native_bf16``), on the real SmolLM2-135M-Instruct:
what ``train.dtype: auto`` / ``teacher.dtype: auto`` pick there, part by part.

    .venv/bin/python bench/bf16_cpu.py --repeats 3 [--threads 2]

Interleaved, medians over repeats (seconds unless said):
- matmul: one 512x576x1536 product (ms), fp32 vs bf16 tensors;
- engine: the HF engine sampling 8 requests of a 400-token prompt to 32 tokens each (sessions, continuous
  batching), fp32 vs ``compute_dtype=bf16`` (a bf16 copy of the weights under autocast);
- train: one forward + backward of ``StudentLogits`` over 8 x 450 tokens, fp32 vs bf16 autocast (fp32 weights);
- teacher: one scoring forward over 8 x 450 tokens, fp32 weights vs bf16 weights.
A CPU without AMX runs bf16 emulated: there ``auto`` keeps fp32, and this script shows why.
"""

from __future__ import annotations

import asyncio
import copy
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoTokenizer

from attention import smollm2_bench  # bench/ is on the path of a bench script
from opd_agents.models import native_bf16
from opd_agents.rollout.engine import CompletionRequest
from opd_agents.rollout.hf_engine import HFEngine
from opd_agents.rollout.renderer import ChatMLRenderer
from opd_agents.env.parsers import HermesParser
from opd_agents.training.policy import StudentLogits


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    args, model = smollm2_bench(__doc__)
    print(f"native bf16 here: {native_bf16(torch.device('cpu'))}; threads {torch.get_num_threads()}")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (8, 450), generator=gen)
    mask = torch.ones_like(ids)
    tok = AutoTokenizer.from_pretrained(model.name_or_path)
    renderer = ChatMLRenderer(tok, HermesParser())
    bf16_weights = copy.deepcopy(model).to(torch.bfloat16)
    engines = {"fp32": HFEngine(model, renderer), "bf16": HFEngine(model, renderer, compute_dtype=torch.bfloat16)}
    for e in engines.values():
        e.stop_ids = set()  # every request decodes its 32 tokens, whatever it samples
    rows, cols = torch.arange(8).repeat_interleave(64), torch.arange(385, 449).repeat(8)
    slots = torch.arange(64).repeat(8)

    def matmul(dtype: torch.dtype) -> Callable[[], object]:
        a, b = torch.randn(512, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        return lambda: [a @ b for _ in range(20)]

    def engine(name: str) -> Callable[[], object]:
        async def play() -> None:
            reqs = [CompletionRequest(ids[i, :400].tolist(), max_tokens=32, temperature=1.0, seed=i, order=i)
                    for i in range(8)]
            await asyncio.gather(*(engines[name].complete(r) for r in reqs))
        return lambda: asyncio.run(play())

    def train(dtype: torch.dtype | None) -> Callable[[], object]:
        trained = StudentLogits(model, dtype)

        def step() -> None:
            trained(ids, mask, rows, cols, slots, 64).float().logsumexp(-1).mean().backward()
            model.zero_grad(set_to_none=True)
        return step

    def teacher(m: torch.nn.Module) -> Callable[[], object]:
        def forward() -> None:
            with torch.no_grad():
                m(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        return forward

    cases: dict[str, tuple[Callable[[], object], Callable[[], object], float]] = {
        "matmul 512x576x1536 (ms)": (matmul(torch.float32), matmul(torch.bfloat16), 1000 / 20),
        "engine: 8 x 32 tokens": (engine("fp32"), engine("bf16"), 1.0),
        "train fwd+bwd 8 x 450": (train(None), train(torch.bfloat16), 1.0),
        "teacher forward 8 x 450": (teacher(model), teacher(bf16_weights), 1.0),
    }
    for fp32, bf16, _ in cases.values():  # warm-up
        fp32(), bf16()
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in cases}
    for _ in range(args.repeats):
        for name, (fp32, bf16, _) in cases.items():
            times[name][0].append(timed(fp32))
            times[name][1].append(timed(bf16))
    print(f"{'part':<28} {'fp32':>9} {'bf16':>9} {'speedup':>8}")
    for name, (a, b) in times.items():
        scale = cases[name][2]
        fa, fb = statistics.median(a) * scale, statistics.median(b) * scale
        print(f"{name:<28} {fa:>9.3f} {fb:>9.3f} {fa / fb:>7.2f}x")
    for e in engines.values():
        e.close()


if __name__ == "__main__":
    main()
