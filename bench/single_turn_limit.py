"""The single-turn workload in plain transformers + torch, nothing else: the "limit" issue 11 measures
opd-agents against (what the hardware does with the stock library calls, no framework around them).

    .venv/bin/python bench/single_turn_limit.py [--steps 4 --warmup-steps 1 --threads 2]

Per step, as in ``bench/vs_trl.py --workload single``: 4 of trl_opd_baseline.py's word problems (chat
template, SmolLM2's default system prompt), ``generate`` (temperature 1, <= 64 new tokens, stop at EOS), the
teacher's forward over prompt + completion (no grad), the student's forward + backward of the sampled-token
reverse-KL policy gradient, fused AdamW (lr 1e-6). Student = teacher = SmolLM2-135M-Instruct, fp32. Student
tokens = completion tokens up to the first EOS. Prints one JSON line (median student tokens/s over the
timed steps, and the time of each part).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_agents.models import resolve_model
from vs_trl import WORD_PROBLEM_SYSTEM, word_problems  # bench/ is on the path of a bench script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, fused=True)
    prompts = word_problems(16, 0)
    rows = []
    for step in range(a.warmup_steps + a.steps):
        batch = [[{"role": "system", "content": WORD_PROBLEM_SYSTEM}, {"role": "user", "content": q}]
                 for q in prompts[4 * step % 16 : 4 * step % 16 + 4]]
        enc = tok.apply_chat_template(batch, add_generation_prompt=True, return_tensors="pt", padding=True,
                                      return_dict=True)
        t0 = time.perf_counter()
        student.eval()
        with torch.no_grad():
            seq = student.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=64,
                                   pad_token_id=tok.pad_token_id)
        t_gen = time.perf_counter()
        completion = seq[:, enc["input_ids"].shape[1]:]
        ended = (completion == tok.eos_token_id).int().cumsum(1)
        in_loss = (ended == 0) | ((ended == 1) & (completion == tok.eos_token_id))  # through the first EOS
        attn = torch.cat([enc["attention_mask"], torch.ones_like(completion)], dim=1)
        n_prompt = enc["input_ids"].shape[1]
        with torch.no_grad():
            t_logits = teacher(input_ids=seq, attention_mask=attn).logits[:, n_prompt - 1 : -1]
            t_lp = torch.log_softmax(t_logits, -1).gather(2, completion[..., None]).squeeze(2)
        t_teacher = time.perf_counter()
        student.train()
        s_logits = student(input_ids=seq, attention_mask=attn).logits[:, n_prompt - 1 : -1]
        s_lp = torch.log_softmax(s_logits, -1).gather(2, completion[..., None]).squeeze(2)
        advantage = (t_lp - s_lp).detach()  # reverse KL, sampled-token policy gradient
        loss = -(advantage * s_lp * in_loss).sum() / in_loss.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_end = time.perf_counter()
        if step >= a.warmup_steps:
            rows.append({"tokens": int(in_loss.sum()), "step_s": t_end - t0, "generate_s": t_gen - t0,
                         "teacher_s": t_teacher - t_gen, "student_s": t_end - t_teacher})
    print(json.dumps({
        "framework": "plain transformers", "steps": len(rows),
        "student_tokens_per_s": round(statistics.median(r["tokens"] / r["step_s"] for r in rows), 2),
        **{f"{k}_per_step": round(statistics.median(r[k] for r in rows), 3)
           for k in ("step_s", "generate_s", "teacher_s", "student_s")},
        "loss_tokens_per_step": [r["tokens"] for r in rows], "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
