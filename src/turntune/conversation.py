"""Conversations: the typed value every later stage starts from.

Roles are normalised on load to four: ``system``, ``user``, ``assistant``, ``tool``
(GLM-4's ``observation`` and ShareGPT's ``observation``/``function_call`` map onto these).

Everything in a record that changes what is trained lives here, so no later stage has to go
back to the raw record: a reply's ``reasoning`` (``reasoning_content``, or a leading
``<think>…</think>`` in its content), its ``weight`` (0: context only, 1: trained), its tool
calls with their ids, and a tool result's ``tool_call_id``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    """One function call made by the assistant. ``arguments`` is the JSON text of a JSON object
    (as written in the data, or dumped from a mapping with ``ensure_ascii=False``)."""

    name: str
    arguments: str
    id: str | None = None  # OpenAI's call id, matched by a tool result's tool_call_id

    @property
    def arguments_dict(self) -> dict:
        """The arguments as a mapping (what Hugging Face chat templates expect), in the data's key order."""
        return json.loads(self.arguments)


@dataclass(frozen=True)
class Message:
    """One message. An assistant message may carry ``tool_calls`` (then ``content`` may be empty)
    and ``reasoning`` (the thinking that came before its content); ``weight`` 0 makes an assistant
    reply context only (OpenAI's fine-tuning format), 1 (the default) trains it."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    name: str | None = None  # tool results: the function that produced it (optional)
    reasoning: str = ""  # assistant: reasoning_content / a leading <think>...</think>
    weight: int = 1  # assistant: 1 trained, 0 context only
    tool_call_id: str | None = None  # tool results: the call this answers (optional)


@dataclass(frozen=True)
class Conversation:
    """A validated conversation.

    ``tools`` holds the tool declarations (JSON-schema dicts) offered on the system turn.
    ``source`` is where it came from, ``file:line`` (or ``file:#index`` for a JSON array),
    so every later error can point at it.
    """

    messages: tuple[Message, ...]
    tools: tuple[dict, ...] = ()
    source: str = ""

    @property
    def assistant_indices(self) -> list[int]:
        """Indices into ``messages`` of the assistant replies, in order (turn k = k-th of these)."""
        return [i for i, m in enumerate(self.messages) if m.role == "assistant"]

    @property
    def trained_turns(self) -> list[int]:
        """Turn indices k of the replies to train (weight 1), in order."""
        return [k for k, i in enumerate(self.assistant_indices) if self.messages[i].weight]

    def to_hf(self) -> list[dict]:
        """Messages in the OpenAI / Hugging Face chat-template shape: ``reasoning_content`` where a
        reply has reasoning, tool-call ``arguments`` as a mapping (templates write ``| tojson`` or
        ``.items()``; a JSON string there would be encoded twice)."""
        out: list[dict] = []
        for m in self.messages:
            d: dict = {"role": m.role, "content": m.content}
            if m.reasoning:
                d["reasoning_content"] = m.reasoning
            if m.tool_calls:
                d["tool_calls"] = [
                    {"type": "function", **({"id": c.id} if c.id is not None else {}),
                     "function": {"name": c.name, "arguments": c.arguments_dict}}
                    for c in m.tool_calls
                ]
            if m.name is not None:
                d["name"] = m.name
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out
