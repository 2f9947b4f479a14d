"""CPU decode: transformers' ``sdpa`` (keys/values copied up to every query head by ``repeat_kv``) vs the
package's ``GQA_SDPA`` (torch reads the grouped heads itself), and transformers' ``DynamicCache`` (a
``torch.cat`` of the whole cache per step) vs the engine's ``GrowingCache`` (in place), on the real
SmolLM2-135M-Instruct.

    .venv/bin/python bench/attention.py --repeats 3
    .venv/bin/python bench/attention.py --shared-prefix --dtype bfloat16 --repeats 3

Per variant, interleaved: one decode step of 8 rows over a 450-token cache (ms, 64 steps averaged, as in
one turn), and one forward + backward of 4 rows x 450 tokens (ms; no cache, so per attention only); medians
over repeats, and the largest logit difference to the first variant (they run the same arithmetic).

``--shared-prefix``: the engine's batch of 32 episodes that start with the same 354-token prompt (the
quickstart's system prompt + tool schemas) and 40-80 ids of their own, 64 decode steps: the prompt's
keys/values copied into every row vs attended from one copy (``KVSession.continuing``); ms per decode step
(the same random ids fed in both), the batch's KV bytes, and the largest logit difference at the last step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import DynamicCache, PreTrainedModel

from opd_agents.attention import GQA_SDPA
from opd_agents.models import load_model
from opd_agents.rollout.kv import GrowingCache, KVBatch, KVSession, autocast

VARIANTS = {"sdpa + DynamicCache": ("sdpa", DynamicCache), f"{GQA_SDPA} + DynamicCache": (GQA_SDPA, DynamicCache),
            f"{GQA_SDPA} + GrowingCache": (GQA_SDPA, GrowingCache)}


def smollm2_bench(doc: str) -> tuple[argparse.Namespace, PreTrainedModel]:
    """The CPU decode benchmarks' command line (--repeats, --threads) and the real SmolLM2 they time."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shared-prefix", action="store_true", help="time the engine's shared prompt prefix instead")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="(--shared-prefix) weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args, load_model("smollm2-135m-instruct")[0]


def shared_prefix(args: argparse.Namespace, model: PreTrainedModel) -> None:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (354,), generator=gen).tolist()
    own = [torch.randint(100, 40000, (int(n),), generator=gen).tolist() for n in torch.randint(40, 81, (32,), generator=gen)]
    fed = torch.randint(100, 40000, (len(own), 64), generator=gen)
    dtype = getattr(torch, args.dtype)
    low = copy.deepcopy(model).to(dtype)

    def decode(shared: bool, runner: PreTrainedModel, steps: int = 64) -> tuple[float, float, torch.Tensor]:
        compute = autocast(torch.device("cpu"), runner.dtype if runner.dtype != torch.float32 else None)
        with torch.no_grad(), compute:
            one = KVBatch.from_sessions(runner, 0, [None])
            one.extend([prompt])
            prefix = one.session(0)
            start = KVSession.continuing(prefix) if shared else prefix  # the prefix itself: copied into each row
            batch = KVBatch.from_sessions(runner, 0, [start] * len(own))
            logits = batch.extend(own)
            t0 = time.perf_counter()
            for step in range(steps):  # the same ids in both variants, so that their logits compare
                logits = batch.extend([[t] for t in fed[:, step].tolist()])
            ms = (time.perf_counter() - t0) / steps * 1000
        layers = [t for layer in batch.cache.layers for t in (layer.keys, layer.values)]
        layers += (prefix.keys + prefix.values) if shared else []
        return ms, sum(t.numel() * t.element_size() for t in layers) / 2**20, logits[:, -1]

    runs: dict[bool, list[float]] = {False: [], True: []}
    out: dict[bool, tuple[float, torch.Tensor]] = {}
    for _ in range(args.repeats):
        for shared, times in runs.items():
            ms, mib, logits = decode(shared, low)
            times.append(ms)
            out[shared] = (mib, logits)
    # Low precision: how far each variant's logits are from the same decode in fp32 (the rounding it adds).
    reference = decode(False, model)[2] if dtype != torch.float32 else out[False][1]
    for shared, times in runs.items():
        print(f"prompt {'shared (one copy)' if shared else 'copied into every row'} ({args.dtype}): decode "
              f"{statistics.median(times):.1f} ms/step {[round(x, 1) for x in times]}, KV {out[shared][0]:.0f} MiB, "
              f"max |logit difference| {(out[True][1] - out[False][1]).abs().max().item():.2e}, "
              f"to fp32: max {(out[shared][1] - reference).abs().max().item():.3f} "
              f"mean {(out[shared][1] - reference).abs().mean().item():.4f}")


def main() -> None:
    args, model = smollm2_bench(__doc__)
    if args.shared_prefix:
        shared_prefix(args, model)
        return
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
