"""The message/token boundary, in one place.

A renderer turns the opening messages (+ tool schemas) into prompt ids, and each batch of observation
messages into the ids appended after a student turn. It never re-tokenizes history: the sampled ids are
kept verbatim and observation text is tokenized against a fixed special-token prefix and sliced off, so
no BPE merge can cross the boundary. Two renderers sit behind the ``Renderer`` protocol: ChatML with a
Hermes-style tools section (SmolLM2's own template has none; the default), and the model's own chat
template (``rollout/chat_template.py``), used only where it passes the prefix check token-exact
multi-turn needs. ``make_renderer`` picks one from ``student.chat_template``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from transformers import PreTrainedTokenizerBase

from opd_agents.env.parsers import ToolCallParser
from opd_agents.errors import ConfigError
from opd_agents.types import Message

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ChatTemplateChoice = Literal["chatml", "model", "auto"]


class ChatTemplateWarning(UserWarning):
    """The model's chat template was asked for but cannot render token-exact turns: ChatML is used."""


class Renderer(Protocol):
    """What the rollout, engines, teachers and expert need from the message/token boundary."""

    tokenizer: PreTrainedTokenizerBase
    parser: ToolCallParser
    eot_id: int  # the end-of-turn token the model emits to close a turn

    def prompt_ids(self, messages: Sequence[Message], tool_schemas: Sequence[dict[str, Any]] = ()) -> list[int]: ...
    def observation_ids(self, observations: Sequence[Message], turn_closed: bool) -> list[int]: ...
    def encode_assistant(self, text: str) -> list[int]: ...
    @property
    def stop_token_ids(self) -> list[int]: ...
    @property
    def stop_strings(self) -> tuple[str, ...]: ...
    def stop_string_enders(self) -> frozenset[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class TokenBoundary:
    """The token-side half every renderer shares: encoding, the end-of-turn id, stops and decoding."""

    tokenizer: PreTrainedTokenizerBase
    parser: ToolCallParser
    eot_id: int
    _enders: tuple[tuple[str, ...], frozenset[int]] | None = None

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_assistant(self, text: str) -> list[int]:
        """Ids of a turn written as text (expert, teacher): the text, then the end-of-turn token."""
        return [*self._encode(text), self.eot_id]

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.eot_id]

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self.parser.stop_strings

    def stop_string_enders(self) -> frozenset[int]:
        """Ids whose text (trailing whitespace aside) ends with the last character of a stop string: only
        after one of them can a turn's text newly end with a stop string, so samplers decode nothing else."""
        key = self.stop_strings
        if self._enders is None or self._enders[0] != key:
            lasts = {s.rstrip()[-1] for s in key if s.strip()}
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._enders = (key, frozenset(i for i, t in enumerate(texts) if t.rstrip()[-1:] in lasts))
        return self._enders[1]

    def decode(self, ids: Sequence[int]) -> str:
        """Assistant text of a turn, without the end-of-turn token."""
        if ids and ids[-1] == self.eot_id:
            ids = ids[:-1]
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


class ChatMLRenderer(TokenBoundary):
    """ChatML with tools; tool results go back as ``<tool_response>`` blocks in a user message."""

    kind = "chatml"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, parser: ToolCallParser) -> None:
        self.tokenizer = tokenizer
        self.parser = parser
        ids = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError(f"tokenizer has no {IM_START}/{IM_END} special tokens; ChatMLRenderer needs them")
        self.im_start_id, self.im_end_id = ids
        self.eot_id = self.im_end_id
        self._im_end_prefix = self._encode(IM_END)

    # ---- text ------------------------------------------------------------------------------------
    def system_text(self, system: str, tool_schemas: Sequence[dict[str, Any]]) -> str:
        if not tool_schemas:
            return system
        tools = "\n".join(json.dumps(s, ensure_ascii=False) for s in tool_schemas)
        return (
            f"{system}\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
            f"</tools>\n\n{self.parser.format_instructions}"
        )

    def messages_text(self, messages: Sequence[Message], tool_schemas: Sequence[dict[str, Any]] = ()) -> str:
        """The whole conversation as ChatML text (no trailing assistant header)."""
        parts: list[str] = []
        pending_tool: list[str] = []

        def flush_tool() -> None:
            if pending_tool:
                body = "\n".join(f"<tool_response>\n{c}\n</tool_response>" for c in pending_tool)
                parts.append(f"{IM_START}user\n{body}{IM_END}\n")
                pending_tool.clear()

        for m in messages:
            if m.role == "tool":  # consecutive tool results share one user block (Qwen convention)
                pending_tool.append(m.content)
                continue
            flush_tool()
            content = self.system_text(m.content, tool_schemas) if m.role == "system" else m.content
            parts.append(f"{IM_START}{m.role}\n{content}{IM_END}\n")
        flush_tool()
        return "".join(parts)

    def assistant_header(self) -> str:
        return f"{IM_START}assistant\n"

    # ---- tokens ----------------------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[Message], tool_schemas: Sequence[dict[str, Any]] = ()) -> list[int]:
        return self._encode(self.messages_text(messages, tool_schemas) + self.assistant_header())

    def observation_ids(self, observations: Sequence[Message], turn_closed: bool) -> list[int]:
        """Ids appended after a student turn: template glue, the tool results, the next assistant header.

        ``turn_closed``: the turn already ends with the end-of-turn token (else we add it as glue, e.g. when
        sampling stopped on ``</tool_call>``). The text is tokenized after a fixed ``<|im_end|>`` prefix and
        the prefix ids are sliced off, so the "\\n" glue the model never generates is tokenized exactly as
        a full render would.
        """
        body = "\n" + self.messages_text(observations) + self.assistant_header()
        ids = self._encode(IM_END + body)
        if ids[: len(self._im_end_prefix)] != self._im_end_prefix:
            raise RuntimeError("tokenizer merged across the end-of-turn token; cannot slice observation ids")
        ids = ids[len(self._im_end_prefix) :]
        return ids if turn_closed else [self.im_end_id, *ids]


def make_renderer(tokenizer: PreTrainedTokenizerBase, parser: ToolCallParser,
                  chat_template: ChatTemplateChoice = "chatml") -> Renderer:
    """``chatml``: the project's ChatML renderer (today's behaviour). ``model``: the model's own chat template
    where it passes the prefix check (else a warning and ChatML). ``auto``: the model's template when it is
    tool-aware and passes the check, ChatML otherwise (a warning only when a tool-aware template fails)."""
    if chat_template != "chatml":
        from opd_agents.rollout.chat_template import ChatTemplateRenderer, TemplateUnsuitable

        try:
            return ChatTemplateRenderer(tokenizer, parser)
        except TemplateUnsuitable as e:
            if chat_template == "model" or e.tool_aware:  # auto stays quiet about templates without tools
                warnings.warn(f"not rendering with the model's chat template: {e}; using the project's ChatML "
                              f"renderer instead", ChatTemplateWarning, stacklevel=2)
    try:
        return ChatMLRenderer(tokenizer, parser)
    except ValueError as e:
        raise ConfigError(f"{e}; this tokenizer needs a chat template that passes the prefix check "
                          f"(student.chat_template: model)") from None
