"""Conversations: the typed value every later stage starts from.

Roles are normalised on load to four: ``system``, ``user``, ``assistant``, ``tool``
(GLM-4's ``observation`` and ShareGPT's ``observation``/``function_call`` map onto these).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    """One function call made by the assistant. ``arguments`` is the JSON text of the arguments."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    """One message. An assistant message may carry ``tool_calls`` (then ``content`` may be empty)."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    name: str | None = None  # tool results: the function that produced it (optional)


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

    def to_hf(self) -> list[dict]:
        """Messages in the OpenAI / Hugging Face chat-template shape."""
        out: list[dict] = []
        for m in self.messages:
            d: dict = {"role": m.role, "content": m.content}
            if m.tool_calls:
                d["tool_calls"] = [
                    {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in m.tool_calls
                ]
            if m.name is not None:
                d["name"] = m.name
            out.append(d)
        return out
