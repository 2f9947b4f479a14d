"""CPU attention: transformers' ``sdpa`` (keys/values copied up to every query head by ``repeat_kv``) vs the
package's ``GQA_SDPA`` (torch reads the grouped heads itself), on the real SmolLM2-135M-Instruct.

    .venv/bin/python bench/attention.py --repeats 3

Per implementation, interleaved: one decode step of 8 rows over a 450-token cache (ms, 20 steps averaged),
and one forward + backward of 4 rows x 450 tokens (ms); medians over repeats, and the largest logit
difference between the two (they run the same arithmetic).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from opd_agents.models import GQA_SDPA, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model("smollm2-135m-instruct")
    ids = torch.randint(100, 40000, (8, 450), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :50] = 0  # one left-padded row, as in the engine's batches

    def decode(steps: int = 20) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            cache, m = DynamicCache(), mask
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

    times: dict[str, tuple[list[float], list[float]]] = {"sdpa": ([], []), GQA_SDPA: ([], [])}
    last: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for impl, (dec, tr) in times.items():
            model.set_attn_implementation(impl)
            ms, last[impl] = decode()
            dec.append(ms)
            tr.append(train())
    for impl, (dec, tr) in times.items():
        print(f"{impl}: decode {statistics.median(dec):.1f} ms/step {[round(x, 1) for x in dec]}, "
              f"forward+backward {statistics.median(tr):.0f} ms {[round(x) for x in tr]}")
    print(f"max |logit difference| {(last['sdpa'] - last[GQA_SDPA]).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
