"""CPU decode: transformers' ``sdpa`` (keys/values copied up to every query head by ``repeat_kv``) vs the
package's ``GQA_SDPA`` (torch reads the grouped heads itself), and transformers' ``DynamicCache`` (a
``torch.cat`` of the whole cache per step) vs the engine's ``GrowingCache`` (in place), on the real
SmolLM2-135M-Instruct.

    .venv/bin/python bench/attention.py --repeats 3

Per variant, interleaved: one decode step of 8 rows over a 450-token cache (ms, 64 steps averaged, as in
one turn), and one forward + backward of 4 rows x 450 tokens (ms; no cache, so per attention only); medians
over repeats, and the largest logit difference to the first variant (they run the same arithmetic).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, PreTrainedModel

from opd_agents.models import GQA_SDPA, load_model
from opd_agents.rollout.kv import GrowingCache

VARIANTS = {"sdpa + DynamicCache": ("sdpa", DynamicCache), f"{GQA_SDPA} + DynamicCache": (GQA_SDPA, DynamicCache),
            f"{GQA_SDPA} + GrowingCache": (GQA_SDPA, GrowingCache)}


def smollm2_bench(doc: str) -> tuple[argparse.Namespace, PreTrainedModel]:
    """The CPU decode benchmarks' command line (--repeats, --threads) and the real SmolLM2 they time."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args, load_model("smollm2-135m-instruct")[0]


def main() -> None:
    args, model = smollm2_bench(__doc__)
    ids = torch.randint(100, 40000, (8, 450), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :50] = 0  # one left-padded row, as in the engine's batches

    def decode(cache_cls: type[DynamicCache], steps: int = 64) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            cache, m = cache_cls(), mask
            out = model(input_ids=ids, attention_mask=m, past_key_values=cache, use_cache=True, logits_to_keep=1)
            t0 = time.perf_counter()
            for _ in range(steps):
                m = torch.cat([m, torch.ones(len(ids), 1, dtype=m.dtype)], 1)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(input_ids=nxt, attention_mask=m, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return (time.perf_counter() - t0) / steps * 1000, out.logits

    def train() -> float:
        t0 = time.perf_counter()
        logits = model(input_ids=ids[:4], attention_mask=mask[:4]).logits
        logits[:, -100:].logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) * 1000

    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in VARIANTS}
    last: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, (dec, tr) in times.items():
            impl, cache_cls = VARIANTS[name]
            model.set_attn_implementation(impl)
            ms, last[name] = decode(cache_cls)
            dec.append(ms)
            tr.append(train())
    first = next(iter(VARIANTS))
    for name, (dec, tr) in times.items():
        print(f"{name}: decode {statistics.median(dec):.1f} ms/step {[round(x, 1) for x in dec]}, "
              f"forward+backward {statistics.median(tr):.0f} ms {[round(x) for x in tr]}, "
              f"max |logit difference| to {first} {(last[first] - last[name]).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
