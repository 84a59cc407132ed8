"""What every chat format hands to the encoder."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from turntune.conversation import Conversation


@dataclass
class Rendered:
    """One conversation rendered to token ids, with the loss layout known by construction.

    Per token (all lists have ``len(input_ids)``):
      - ``turn[i]``: index k of the assistant turn whose *target* token i is (its metadata/content
        and its terminator), or -1 for context (headers, system, user, tool output, padding).
      - ``message[i]``: index into ``conversation.messages`` of the message token i was rendered
        for (its header included), -1 for text that belongs to no message (``[gMASK]<sop>``, a
        default system prompt the template injects, ...). A terminator that is also the next
        header (GLM-4's next role token) belongs to the assistant message it ends.

    Per assistant turn k:
      - ``turn_end[k]``: one past the last token of turn k's terminator. For a prefix-stable
        rendering, ``input_ids[:turn_end[k]]`` is exactly the rendering of the conversation up to
        and including reply k, which is what ``expand`` trains on.

    ``prefix_stable`` is False when rendering a prefix of the conversation does not give a prefix
    of this rendering (templates that strip earlier reasoning, inject dates, ...); the encoder then
    renders every prefix on its own instead of slicing this one.
    """

    input_ids: list[int]
    turn: list[int]
    message: list[int]
    turn_end: list[int]
    prefix_stable: bool = True

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if len(self.turn) != n or len(self.message) != n:
            raise ValueError("Rendered: input_ids, turn and message must have the same length")


class Template(Protocol):
    """A chat format. ``render`` must put every assistant reply and its terminator in ``turn``."""

    name: str

    def render(self, conversation: Conversation) -> Rendered: ...

    def generation_prompt(self, conversation: Conversation) -> list[int]:
        """Token ids that prompt the next assistant reply after ``conversation`` (for chat/eval)."""
        ...

    def stop_ids(self) -> list[int]:
        """Token ids at which generation stops."""
        ...
