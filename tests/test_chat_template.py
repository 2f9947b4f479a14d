"""The model's own chat template as the renderer: the prefix check (fallback + warning where it fails),
token-exact multi-turn rollouts where it holds, and the tool-call parser picked from the template family.
Templates in the Qwen and Llama-3 styles are written here and saved into tiny models' tokenizers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from opd_agents.env.parsers import HermesParser, Llama3JsonParser
from opd_agents.env.registry import make_env
from opd_agents.models import build_tiny_model, load_model, load_tokenizer
from opd_agents.rollout.chat_template import ChatTemplateRenderer, template_parser
from opd_agents.rollout.expert import play_expert
from opd_agents.rollout.hf_engine import HFEngine
from opd_agents.rollout.renderer import ChatMLRenderer, ChatTemplateWarning, make_renderer
from opd_agents.rollout.runner import Rollout
from opd_agents.training.view import TrainingView
from opd_agents.types import Message, SamplingParams, Trajectory
from tests.test_rollout import EchoEnv

# Qwen2.5's layout: tools in the system block, tool results grouped in one user block.
QWEN_STYLE = """{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}\
{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}\
{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}\
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": \
<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\
{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\
{%- endif %}\
{%- for message in messages %}\
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}\
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\
{%- elif message.role == 'assistant' %}{%- set content = message.content %}STRIP\
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}\
{%- elif message.role == 'tool' %}\
{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}\
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}\
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}\
{%- endif %}{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
# Qwen3-style: earlier turns lose their <think> block when re-rendered (breaks the prefix property).
QWEN3_STRIP = ("{%- if '</think>' in content and not loop.last %}"
               "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}")

# Llama 3.1's layout: JSON calls with "parameters", tool results as ipython turns, content trimmed.
LLAMA3_STYLE = """{{- bos_token }}{%- if messages[0]['role'] == 'system' %}\
{%- set system_message = messages[0]['content'] %}{%- set messages = messages[1:] %}\
{%- else %}{%- set system_message = '' %}{%- endif %}\
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{%- if tools is not none %}\
{{- 'Environment: ipython\\n' }}{%- endif %}{{- 'Cutting Knowledge Date: December 2023\\n\\n' + system_message }}\
{%- if tools is not none %}{{- '\\n\\nYou have access to the following functions. To call a function, respond \
with JSON for a function call. Respond in the format {"name": function name, "parameters": dictionary of argument \
name and its value}. Do not use variables.\\n\\n' }}{%- for t in tools %}{{- t | tojson(indent=4) }}\
{{- '\\n\\n' }}{%- endfor %}{%- endif %}{{- '<|eot_id|>' }}\
{%- for message in messages %}{%- if message.role in ['ipython', 'tool'] %}\
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}\
{%- else %}{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim \
+ '<|eot_id|>' }}{%- endif %}{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"]


def tokenizer_with(src: Path, out: Path, template: str, special: list[str] | None = None) -> Path:
    tok = AutoTokenizer.from_pretrained(src)
    if special:
        tok.add_special_tokens({"additional_special_tokens": special})
        tok.bos_token = special[0]
    tok.chat_template = template
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen_style_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("qwen-style")
    src = tokenizer_with(smollm2_tokenizer_dir, root / "tok", QWEN_STYLE.replace("STRIP", ""))
    return build_tiny_model(root / "model", src)


@pytest.fixture(scope="module")
def llama3_style_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """Headers end in one newline: SmolLM2's pre-tokenizer splits a trailing "\n\n" differently before
    text (Llama 3's own regex keeps it whole), see test_header_whitespace_merge_falls_back."""
    root = tmp_path_factory.mktemp("llama3-style")
    template = LLAMA3_STYLE.replace("<|end_header_id|>\\n\\n", "<|end_header_id|>\\n")
    src = tokenizer_with(smollm2_tokenizer_dir, root / "tok", template, LLAMA3_TOKENS)
    return build_tiny_model(root / "model", src)


def tok_of(path: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(path) if (path / "config.json").is_file() else AutoTokenizer.from_pretrained(path)


# ---- the check and the choice ---------------------------------------------------------------------
def test_qwen_style_template_is_used(qwen_style_dir: Path) -> None:
    tok = tok_of(qwen_style_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = make_renderer(tok, HermesParser(), "model")
    assert isinstance(r, ChatTemplateRenderer) and r.family == "hermes" == template_parser(tok)
    assert r.eot_id == tok.convert_tokens_to_ids("<|im_end|>") and r.stop_token_ids == [r.eot_id]


def test_stripping_template_falls_back_with_a_warning(tmp_path: Path, smollm2_tokenizer_dir: Path) -> None:
    tok = tok_of(tokenizer_with(smollm2_tokenizer_dir, tmp_path, QWEN_STYLE.replace("STRIP", QWEN3_STRIP)))
    with pytest.warns(ChatTemplateWarning, match="does not extend the shorter one"):
        r = make_renderer(tok, HermesParser(), "auto")
    assert isinstance(r, ChatMLRenderer)


def test_default_and_auto_keep_chatml_for_smollm2(smollm2_tokenizer_dir: Path) -> None:
    tok = tok_of(smollm2_tokenizer_dir)
    assert isinstance(make_renderer(tok, HermesParser()), ChatMLRenderer)  # default: today's renderer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SmolLM2's template has no tools: auto falls back quietly
        assert isinstance(make_renderer(tok, HermesParser(), "auto"), ChatMLRenderer)
    with pytest.warns(ChatTemplateWarning, match="does not render tools"):
        assert isinstance(make_renderer(tok, HermesParser(), "model"), ChatMLRenderer)


def test_llama3_style_template(llama3_style_dir: Path) -> None:
    tok = tok_of(llama3_style_dir)
    assert template_parser(tok) == "llama3_json"
    with pytest.warns(ChatTemplateWarning, match="trims assistant text"):
        r = make_renderer(tok, Llama3JsonParser(), "model")
    assert isinstance(r, ChatTemplateRenderer) and r.eot_id == tok.convert_tokens_to_ids("<|eot_id|>")


def test_header_whitespace_merge_falls_back(tmp_path: Path, smollm2_tokenizer_dir: Path) -> None:
    """Llama 3.1's real "\n\n" after each header, over a tokenizer that tokenizes "\n\n" alone and
    "\n\n<text>" differently: the token-level check catches it."""
    tok = tok_of(tokenizer_with(smollm2_tokenizer_dir, tmp_path, LLAMA3_STYLE, LLAMA3_TOKENS))
    with pytest.warns(ChatTemplateWarning, match="merges tokens across a turn boundary"):
        assert isinstance(make_renderer(tok, Llama3JsonParser(), "model"), ChatMLRenderer)


# ---- token-exact trajectories ---------------------------------------------------------------------
def full_ids(traj: Trajectory) -> list[int]:
    return [*traj.prompt_ids, *(i for t in traj.turns for i in (*t.token_ids, *t.observation_ids))]


def template_ids(tok: PreTrainedTokenizerBase, traj: Trajectory, generation: bool) -> list[int]:
    msgs = [m.model_dump(exclude_none=True) for m in traj.messages]
    return list(tok.apply_chat_template(msgs, tools=traj.tool_schemas, add_generation_prompt=generation,
                                        tokenize=True, return_dict=False))


@pytest.mark.parametrize("style,parser", [("qwen", "hermes"), ("llama3", "llama3_json")])
def test_expert_trajectory_equals_the_template(style: str, parser: str, qwen_style_dir: Path,
                                               llama3_style_dir: Path) -> None:
    """Multi-turn expert episodes: prompt + turns + observations are exactly apply_chat_template's ids."""
    tok = tok_of(qwen_style_dir if style == "qwen" else llama3_style_dir)
    env_factory = lambda: make_env("opd_agents/Arithmetic-v0", parser=parser).unwrapped  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChatTemplateWarning)  # the Llama-style trim note
        renderer = make_renderer(tok, env_factory().parser, "model")
    assert isinstance(renderer, ChatTemplateRenderer)
    trajs = play_expert(env_factory, [0, 1, 2], env_id="arith", renderer=renderer)
    for traj in trajs:
        assert len(traj.turns) >= 2 and traj.success
        ids = full_ids(traj)
        whole = template_ids(tok, traj, generation=False)
        assert whole[: len(ids)] == ids  # the template adds only trailing glue after the final eot
        assert tok.decode(whole[len(ids):]).strip() == ""


def test_sampled_rollout_with_the_template_is_token_exact(qwen_style_dir: Path) -> None:
    """A real multi-turn sampled rollout: the stored ids reproduce their logprobs, the prompt is the
    template's, and each turn's observation ids are the template's text after that turn."""
    model, tok = load_model(qwen_style_dir)
    env_factory = lambda: EchoEnv(limits={"max_turns": 4})  # noqa: E731
    renderer = make_renderer(tok, env_factory().parser, "model")
    assert isinstance(renderer, ChatTemplateRenderer)
    rollout = Rollout(HFEngine(model, renderer), env_factory, SamplingParams(max_tokens_per_turn=12, seed=0),
                      max_episodes=3)
    try:
        trajs = rollout.run([0, 1, 2])
    finally:
        rollout.close()
    for traj in trajs:
        assert len(traj.turns) == 4
        opening = [m.model_dump(exclude_none=True) for m in traj.messages[:2]]
        assert traj.prompt_ids == list(tok.apply_chat_template(opening, tools=traj.tool_schemas,
                                                               add_generation_prompt=True, return_dict=False))
        for k, turn in enumerate(traj.turns[:-1]):
            before = traj.messages[: 2 + k * 2]  # system, user, then (assistant, tool) per turn
            after = traj.messages[: 2 + (k + 1) * 2]
            assert after[-2].role == "assistant" and after[-1].role == "tool"
            short = renderer._render([Message.model_validate(m) for m in before], traj.tool_schemas)
            longer = renderer._render([Message.model_validate(m) for m in after], traj.tool_schemas)
            assert longer.startswith(short + turn.text)  # text level: the template extends the conversation
            tail = tok.encode(longer[len(short) + len(turn.text):], add_special_tokens=False)
            expected = tail[1:] if turn.finish == "stop" else tail
            assert turn.observation_ids == expected
        view = TrainingView.from_trajectory(traj)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([view.input_ids])).logits[0].float(), dim=-1)
        pos = [i for i, m in enumerate(view.loss_mask) if m]
        fresh = np.array([logp[p - 1, view.input_ids[p]].item() for p in pos])
        np.testing.assert_allclose(fresh, [view.sampling_logprobs[p] for p in pos], atol=2e-4)


def test_training_with_the_models_template(tmp_path: Path, llama3_style_dir: Path) -> None:
    """student.chat_template=model: the trainer renders with the template and the env reads Llama-3 JSON."""
    from opd_agents.config import parse_config
    from opd_agents.training.trainer import Trainer

    cfg = parse_config({
        "run_dir": str(tmp_path / "run"), "max_tokens_per_turn": 8,
        "env": {"id": "opd_agents/Arithmetic-v0", "kwargs": {"difficulty": 1}, "limits": {"max_turns": 2}},
        "student": {"model": str(llama3_style_dir), "chat_template": "model"},
        "teacher": {"model": str(llama3_style_dir)},
        "train": {"steps": 1, "tasks_per_step": 2, "micro_batch_size": 2, "checkpoint_every": 1},
        "eval": {"every": 100, "episodes": 2, "before": False}, "teacher_strength": {"episodes": 0}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChatTemplateWarning)  # the trim note
        trainer = Trainer(cfg)
    assert isinstance(trainer.renderer, ChatTemplateRenderer) and trainer.parser.name == "llama3_json"
    trainer.train()
    traj = next(iter((tmp_path / "run").glob("**/*.jsonl")))
    assert traj.stat().st_size > 0


def test_cli_rollout_with_the_models_template(tmp_path: Path, llama3_style_dir: Path) -> None:
    from typer.testing import CliRunner

    from opd_agents.cli import app
    from opd_agents.store import read_trajectories

    out = tmp_path / "t.jsonl"
    res = CliRunner().invoke(app, ["rollout", "--env", "opd_agents/Arithmetic-v0", "--out", str(out), "-n", "2",
                                   "--model", str(llama3_style_dir), "--chat-template", "model",
                                   "--max-tokens-per-turn", "8"])
    assert res.exit_code == 0, res.output
    trajs = list(read_trajectories(out))
    tok = tok_of(llama3_style_dir)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")  # the Llama-style template's prompt, not ChatML's
    assert len(trajs) == 2 and all(t.prompt_ids[0] == bos for t in trajs)


def test_an_sft_teacher_learns_the_text_of_the_runs_template(tmp_path: Path, qwen_style_dir: Path) -> None:
    """student.chat_template reaches the SFT teacher: it is trained on the episodes as that template renders
    them (the text it will score); ChatML teachers keep their settings (cached ones stay valid)."""
    from opd_agents.teacher.sft import build_sft_teacher

    env_id = "opd_agents/Arithmetic-v0"
    factory = lambda: make_env(env_id, difficulty=1).unwrapped  # noqa: E731
    settings = {}
    for choice in ("chatml", "model"):
        out = build_sft_teacher(str(qwen_style_dir), factory, env_id, factory().parser, tmp_path / choice,
                                episodes=2, steps=1, batch_size=2, lr=1e-3, seed=0, chat_template=choice)
        settings[choice] = json.loads((out / "opd_sft_teacher.json").read_text())["settings"]
    assert "chat_template" not in settings["chatml"] and settings["model"]["chat_template"] == "model"
