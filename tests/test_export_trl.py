"""Export for TRL: real episodes -> a datasets.Dataset in TRL's conversational format with tools, read back with
load_from_disk, rendered by transformers' apply_chat_template(messages, tools=tools), and (where trl imports
from a side install) accepted by TRL's own data utilities and SFTTrainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from opd_agents.analysis.export import TRL_SCHEMAS, chat_messages, export_trl, trl_features
from opd_agents.analysis.trajectories import TrajectoryFilter
from opd_agents.cli import app
from opd_agents.env.core import ToolEnv
from opd_agents.env.registry import make_env
from opd_agents.rollout.expert import play_expert
from opd_agents.rollout.runner import open_trajectory, record_step
from opd_agents.store import read_trajectories, write_trajectories
from opd_agents.types import Trajectory, Turn

ENV = "opd_agents/Arithmetic-v0"
# Where a side install of trl lives (pip install --target DIR --no-deps trl); trl is not a dependency.
TRL_SIDE = os.environ.get("OPD_TRL_SIDE", "/tmp/trl_side")
# A tool-aware ChatML template in the Qwen style (SmolLM2's own template ignores tools and tool_calls).
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}"
    "<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{%- for call in message.tool_calls or [] %}\n<tool_call>\n"
    '{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n{%- endfor %}"
)


def new_env() -> ToolEnv:
    return make_env(ENV, difficulty=2).unwrapped


def play(seed: int, actions: list[str | None]) -> Trajectory:
    """An episode with these assistant texts (None: the scripted expert's next one)."""
    env = new_env()
    traj = open_trajectory(env, seed, ENV, "test")
    assert env.task is not None
    for action in actions:
        text = action if action is not None else env.expert_action(env.task, list(env.history))
        _, reward, terminated, truncated, info = env.step(text)
        turn = Turn(index=len(traj.turns), token_ids=[], sampling_logprobs=[], text=text, finish="stop")
        traj.turns.append(turn)
        record_step(traj, turn, reward, info)
        if terminated or truncated:
            traj.stop_reason = info["stop_reason"]
            break
    traj.messages = list(env.history)
    return traj


@pytest.fixture()
def traj_file(tmp_path: Path) -> Path:
    """Two expert episodes (successful, calculator calls), one with a malformed call first, one wrong answer."""
    trajs = play_expert(new_env, [3, 4], env_id=ENV)
    trajs.append(play(5, ['Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": </tool_call>',
                          None, None, None, None]))
    trajs.append(play(6, ["Answer: -1"]))
    assert [t.success for t in trajs] == [True, True, True, False]
    path = tmp_path / "trajectories.jsonl"
    write_trajectories(path, trajs)
    return path


def test_messages_carry_tool_calls_and_results(traj_file: Path, tmp_path: Path) -> None:
    from datasets import load_from_disk

    out = tmp_path / "trl"
    result = CliRunner().invoke(app, ["export", str(traj_file), "--format", "trl", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "exported 4 trajectory rows" in result.stdout
    ds = load_from_disk(str(out))
    assert ds.features == trl_features("trajectory")
    assert ds.column_names == TRL_SCHEMAS["trajectory"].names == [
        "messages", "tools", "id", "env_id", "task_id", "seed", "reward", "success", "stop_reason"]
    row = ds[0]
    original = read_trajectories(traj_file)[0]
    assert row["tools"] == original.tool_schemas and row["tools"][0]["function"]["name"] == "calculator"
    system, user, first, result_msg = row["messages"][:4]
    assert system == {"role": "system", "content": original.messages[0].content}
    assert user == {"role": "user", "content": original.messages[1].content}
    call = original.turns[0].tool_calls[0]
    assert first == {"role": "assistant", "content": original.messages[2].content.split("<tool_call>")[0].strip(),
                     "tool_calls": [{"id": call.id, "type": "function",
                                     "function": {"name": "calculator", "arguments": call.arguments}}]}
    assert result_msg == {"role": "tool", "content": original.turns[0].tool_results[0].content,
                          "name": "calculator", "tool_call_id": call.id}
    assert row["messages"][-1] == {"role": "assistant", "content": original.messages[-1].content}  # the answer
    assert (row["reward"], row["success"], row["stop_reason"], row["env_id"]) == (1.0, True, "completed", ENV)
    # The malformed call: its text kept as written, no tool_calls, the tool message explains.
    bad, why = ds[2]["messages"][2:4]
    assert "tool_calls" not in bad and bad["content"].startswith("Let me compute.\n<tool_call>")
    assert why["role"] == "tool" and why["content"].startswith("formatting issue: ") and "name" not in why


def test_success_filter_and_turn_level(traj_file: Path, tmp_path: Path) -> None:
    from datasets import load_from_disk

    assert export_trl(traj_file, tmp_path / "sft", flt=TrajectoryFilter(success=True)) == 3
    assert load_from_disk(str(tmp_path / "sft"))["success"] == [True, True, True]
    result = CliRunner().invoke(app, ["export", str(traj_file), "--format", "trl", "--out", str(tmp_path / "turns"),
                                      "--level", "turn", "--failed"])
    assert result.exit_code == 0, result.output
    ds = load_from_disk(str(tmp_path / "turns"))
    assert ds.features == trl_features("turn") and len(ds) == 1  # the wrong answer: one turn
    assert [m["role"] for m in ds[0]["prompt"]] == ["system", "user"]
    assert ds[0]["completion"] == [{"role": "assistant", "content": "Answer: -1"}]
    turns = sum(len(t.turns) for t in read_trajectories(traj_file))
    assert export_trl(traj_file, tmp_path / "all_turns", level="turn") == turns
    rows = load_from_disk(str(tmp_path / "all_turns"))
    assert rows[1]["prompt"][-1]["role"] == "tool" and rows[1]["turn"] == 1
    assert rows[1]["prompt"] == load_from_disk(str(tmp_path / "sft"))[0]["messages"][:4]


def test_chat_templates_render_the_rows(traj_file: Path, tmp_path: Path, smollm2_tokenizer_dir: Path) -> None:
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    export_trl(traj_file, tmp_path / "trl")
    row = load_from_disk(str(tmp_path / "trl"))[0]
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    plain = tok.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
    assert row["messages"][-1]["content"] in plain
    text = tok.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False, chat_template=TOOL_TEMPLATE)
    call = row["messages"][2]["tool_calls"][0]["function"]
    assert json.dumps(row["tools"][0]) in text
    assert f'<tool_call>\n{json.dumps({"name": "calculator", "arguments": call["arguments"]})}\n</tool_call>' in text
    assert f"<|im_start|>tool\n{row['messages'][3]['content']}<|im_end|>" in text


def test_other_call_formats_leave_the_content(tmp_path: Path) -> None:
    traj = play(3, [None])
    text = traj.messages[2].content
    head = text.split("<tool_call>")[0].strip()
    assert chat_messages(traj)[2]["content"] == head
    # The same call written ReAct-style: the Action lines are the call, the thought stays.
    react = head + "\nAction: calculator\nAction Input: " + json.dumps(traj.turns[0].tool_calls[0].arguments)
    traj.messages[2].content = react
    assert chat_messages(traj, "react")[2]["content"] == head
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        export_trl(tmp_path / "x.jsonl", tmp_path / "out", parser="nope")


TRL_CHECK = """
import json, sys
from datasets import load_from_disk
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer
from trl.data_utils import is_conversational, maybe_apply_chat_template
episodes, turns, model_dir, template, out = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(model_dir)
tok.chat_template = template
ds = load_from_disk(episodes)
for row in ds:
    assert is_conversational(row)
    text = maybe_apply_chat_template(row, tok, tools=row["tools"])["text"]
    assert "<tool_call>" in text and row["messages"][-1]["content"] in text
for row in load_from_disk(turns):  # prompt-completion rows, as GRPO / SFT read them
    assert is_conversational(row)
    done = maybe_apply_chat_template(row, tok, tools=row["tools"])
    assert set(done) >= {"prompt", "completion"} and done["completion"]
args = SFTConfig(output_dir=out, max_steps=1, per_device_train_batch_size=2, report_to="none", use_cpu=True,
                 save_strategy="no", logging_steps=1, dataset_num_proc=1)
trainer = SFTTrainer(model=model_dir, args=args, train_dataset=ds, processing_class=tok)
print("TRL_OK", len(trainer.train_dataset), trainer.train().training_loss)
"""


def test_trl_reads_the_dataset(traj_file: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (TRL_SIDE, os.environ.get("PYTHONPATH")) if p)}
    probe = subprocess.run([sys.executable, "-c", "import trl.data_utils, trl.trainer.sft_trainer"], env=env,
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"trl does not import here (not a dependency; pip install --target {TRL_SIDE} --no-deps trl): "
                    f"{probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else probe.returncode}")
    export_trl(traj_file, tmp_path / "episodes", flt=TrajectoryFilter(success=True))
    export_trl(traj_file, tmp_path / "turns", level="turn")
    args: list[Any] = [tmp_path / "episodes", tmp_path / "turns", tiny_model_dir, TOOL_TEMPLATE, tmp_path / "sft-out"]
    run = subprocess.run([sys.executable, "-c", TRL_CHECK, *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "TRL_OK 3 " in run.stdout
