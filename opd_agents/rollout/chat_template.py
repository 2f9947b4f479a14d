"""The model's own chat template as a renderer, used only where it can render turns token-exactly.

Token-exact multi-turn needs two things from a template: rendering a longer conversation extends the
shorter one (earlier turns are never rewritten, e.g. reasoning stripped) and the text after an assistant
turn starts with one special end-of-turn token, then depends only on the new messages. Both are checked
once, on a two-turn probe conversation, at the token level; a template that fails raises
``TemplateUnsuitable`` and ``make_renderer`` falls back to ChatML with a warning. At run time the text
after a turn is rendered around a fixed probe turn and sliced off, so sampled ids are never re-tokenized.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from opd_agents.env.parsers import ToolCallParser
from opd_agents.rollout.renderer import ChatTemplateWarning, TokenBoundary
from opd_agents.types import Message

# Markers of the tool-call format a template teaches, most specific first -> the parser that reads it.
_FAMILIES = (("[TOOL_CALLS]", "mistral"), ("<tool_call>", "hermes"), ("<|python_tag|>", "llama3_json"),
             ('"parameters"', "llama3_json"))
_PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_tool", "description": "A probe.",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
# The fixed context the text after a turn is rendered in (the check proves it does not matter).
_HEAD = (Message(role="system", content="You are a probe."), Message(role="user", content="Probe?"))
_REPLY = "Probe reply."


class TemplateUnsuitable(ValueError):
    """The model's chat template cannot render token-exact turns; ``tool_aware``: it does render tools."""

    def __init__(self, reason: str, tool_aware: bool) -> None:
        super().__init__(reason)
        self.tool_aware = tool_aware


def template_text(tokenizer: PreTrainedTokenizerBase) -> str:
    template: Any = getattr(tokenizer, "chat_template", None) or ""
    return "\n".join(template.values()) if isinstance(template, dict) else str(template)


def template_parser(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The tool-call parser the model's template teaches (hermes / llama3_json / mistral), if it names one."""
    text = template_text(tokenizer)
    return next((parser for marker, parser in _FAMILIES if marker in text), None)


class ChatTemplateRenderer(TokenBoundary):
    """Prompts from ``apply_chat_template(messages, tools=...)``; observation ids from the template's text
    after a turn, tokenized after its end-of-turn token (the prefix ids sliced off)."""

    kind = "model"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, parser: ToolCallParser) -> None:
        self.tokenizer, self.parser = tokenizer, parser
        if not template_text(tokenizer):
            raise TemplateUnsuitable("the tokenizer has no chat template", tool_aware=False)
        self.family = template_parser(tokenizer)
        if self._render(_HEAD, [_PROBE_TOOL]) == self._render(_HEAD, ()):
            raise TemplateUnsuitable("its chat template does not render tools", tool_aware=False)
        self._head = self._render(_HEAD, ())
        self._eot_text, self.eot_id = self._find_eot()
        self._check()

    # ---- text ------------------------------------------------------------------------------------
    def _render(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]], generation: bool = True) -> str:
        try:
            return str(self.tokenizer.apply_chat_template(
                [m.model_dump(exclude_none=True) for m in messages], tools=list(tools) or None,
                add_generation_prompt=generation, tokenize=False))
        except Exception as e:  # noqa: BLE001 - any template error means it cannot render this conversation
            raise TemplateUnsuitable(f"its chat template fails to render a tool conversation "
                                     f"({type(e).__name__}: {e})", tool_aware=True) from e

    def observation_text(self, observations: Sequence[Message]) -> str:
        """The template's text after an assistant turn's content: end-of-turn, the observations, the next
        assistant header."""
        lead = self._head + _REPLY
        full = self._render([*_HEAD, Message(role="assistant", content=_REPLY), *observations], ())
        if not full.startswith(lead):
            raise TemplateUnsuitable("rendering a longer conversation does not extend the shorter one (the "
                                     "template rewrites earlier turns, e.g. strips reasoning)", tool_aware=True)
        return full[len(lead) :]

    def _find_eot(self) -> tuple[str, int]:
        tail = self.observation_text([Message(role="tool", content="probe result")])
        added = sorted(self.tokenizer.get_added_vocab().items(), key=lambda kv: -len(kv[0]))
        for text, tid in added:
            if text and tail.startswith(text) and self._encode(text) == [tid]:
                return text, tid
        raise TemplateUnsuitable("an assistant turn does not end with a special end-of-turn token",
                                 tool_aware=True)

    def _check(self) -> None:
        """The prefix property on a two-turn probe (with a reasoning block), at the token level."""
        try:
            call = self.parser.format_call("probe_tool", {"x": 1})
        except NotImplementedError:  # a parser without a written form (tests): any call-like text will do
            call = '{"name": "probe_tool", "arguments": {"x": 1}}'
        turns = [("<think>\nI should call the tool.\n</think>\n\n" + call,
                  [Message(role="tool", name="probe_tool", content="1"), Message(role="tool", content="two")]),
                 (call, [Message(role="tool", name="probe_tool", content="3")])]
        conv, ids = list(_HEAD), self.prompt_ids(_HEAD, [_PROBE_TOOL])
        text = self._render(conv, [_PROBE_TOOL])
        for reply, obs in turns:
            conv += [Message(role="assistant", content=reply), *obs]
            ids += self.encode_assistant(reply) + self.observation_ids(obs, turn_closed=True)
            longer = self._render(conv, [_PROBE_TOOL])
            if not longer.startswith(text + reply):
                raise TemplateUnsuitable("rendering a longer conversation does not extend the shorter one (the "
                                         "template rewrites earlier turns, e.g. strips reasoning)", tool_aware=True)
            if longer != text + reply + self.observation_text(obs):
                raise TemplateUnsuitable("the text after an assistant turn depends on the earlier conversation",
                                         tool_aware=True)
            if self._encode(longer) != ids:
                raise TemplateUnsuitable("tokenizing a rendered conversation merges tokens across a turn "
                                         "boundary", tool_aware=True)
            text = longer
        if not self._render([*_HEAD, Message(role="assistant", content=" x \n")], (), False).count(" x \n"):
            warnings.warn("the model's chat template trims assistant text: a turn that ends in whitespace "
                          "re-renders without it (the stored ids stay what the model sampled)",
                          ChatTemplateWarning, stacklevel=3)

    # ---- tokens ----------------------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[Message], tool_schemas: Sequence[dict[str, Any]] = ()) -> list[int]:
        return self._encode(self._render(messages, tool_schemas))

    def observation_ids(self, observations: Sequence[Message], turn_closed: bool) -> list[int]:
        """Ids appended after a student turn. ``turn_closed``: it already ends with the end-of-turn token
        (else the token is added, e.g. when sampling stopped on a stop string)."""
        text = self.observation_text(observations)
        ids = self._encode(text)
        if not text.startswith(self._eot_text) or ids[:1] != [self.eot_id]:
            raise RuntimeError("the template's text after a turn does not start with its end-of-turn token")
        return ids[1:] if turn_closed else ids
