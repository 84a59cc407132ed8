"""Nothing dropped: what a chat template's rendering must hold of each message (DESIGN.md §7).

A template that does not write a field trains a reply without it, silently: SmolLM2's own
template drops tool calls (the reply trains as its terminator alone), most drop
``reasoning_content``, and a template that writes ``arguments | tojson`` on the arguments' JSON
*text* teaches the model an escaped string instead of an object. So after rendering:

- every reply with an exact span holds, inside that span, its content, its reasoning and each of
  its tool calls: the name, and the arguments either as a JSON object (any spacing) or as each
  key and value written out (GLM-4.5's ``.items()`` style), but not as a JSON string;
- every other message's content is somewhere in the rendering (a system prompt folded into the
  first user turn is fine).

A reply without an exact span here is history the template rewrites (Qwen3 strips earlier
reasoning); the encoder renders it again as the last reply, and it is checked there. A reply's
weight does not matter: a weight-0 reply is context, and dropping it changes the history the
model learns from. Call ids are not checked (most templates never write them).

The words are looked for by a ``found(value, where)`` the caller gives: on a shape's rendering,
each sentinel of the value (once per shape); on a real text, each run of non-blank characters.
"""
from __future__ import annotations

import json
from collections.abc import Callable

Found = Callable[[str, str], bool]
_DECODER = json.JSONDecoder()


def find_dropped(key: tuple, text: str, spans: dict[int, tuple[int, int]], found: Found) -> tuple[int, list[str]] | None:
    """The first message some of whose text the rendering ``text`` lacks, and what it lacks
    (``content``, ``reasoning``, ``call 0``, ``call 1: arguments rendered as a JSON string``, ...);
    None if nothing is dropped. ``key`` holds the messages (see ``hf._key``), ``spans`` the
    characters of each reply with an exact span, by turn."""
    turn = -1
    for j, (role, content, calls, _, reasoning, _) in enumerate(key):
        where = text
        if role == "assistant":
            turn += 1
            if turn not in spans:
                continue  # history the template rewrites: checked where it is the last reply
            where = text[spans[turn][0]:spans[turn][1]]
        lost = [] if found(content, where) else ["content"]
        if reasoning and not found(reasoning, where):
            lost.append("reasoning")
        for i, (name, arguments, _) in enumerate(calls):
            if not found(name, where):
                lost.append(f"call {i}")
            elif (why := _arguments_lost(json.loads(arguments), where, found)) is not None:
                lost.append(f"call {i}: {why}")
        if lost:
            return j, lost
    return None


def describe(source: str, message: int, role: str, lost: list[str], names: list[str]) -> str:
    """The error for :func:`find_dropped`'s answer: where, what, and how to fix it."""
    what = []
    for item in lost:
        if item.startswith("call "):
            i, _, why = item[5:].partition(": ")
            what.append(f"tool call {names[int(i)]}" + (f" ({why})" if why else ""))
        else:
            what.append(item)
    fix = "set data.chat_template to a Jinja file that renders it"
    if any("JSON string" in w for w in what):
        fix += " (arguments reach templates as a mapping: write them with `| tojson` once)"
    return f"{source}: turn {message + 1}: the chat template does not render this {role} message's {', '.join(what)}; {fix}"


def _arguments_lost(arguments, where: str, found: Found) -> str | None:
    """Why a call's arguments are not in ``where`` (its name is), or None if they are."""
    if _holds_object(where, arguments):
        return None
    if _holds_json_string_of(where, arguments):
        return "arguments rendered as a JSON string"
    if not isinstance(arguments, dict) or all(
            found(k, where) and _value_found(v, where, found) for k, v in arguments.items()):
        return None  # written out key by key (or no arguments at all)
    return "arguments not rendered"


def _holds_object(where: str, value) -> bool:
    """Whether a JSON text of ``value`` starts at some ``{`` in ``where`` (any spacing)."""
    at = where.find("{")
    while at >= 0:
        try:
            if _DECODER.raw_decode(where, at)[0] == value:
                return True
        except (ValueError, RecursionError):  # not JSON, or nested past Python's limit
            pass
        at = where.find("{", at + 1)
    return False


def _holds_json_string_of(where: str, value) -> bool:
    """Whether a JSON string in ``where`` holds a JSON text of ``value`` (encoded twice)."""
    at = where.find('"{')
    while at >= 0:
        try:
            inner = _DECODER.raw_decode(where, at)[0]
            if isinstance(inner, str) and json.loads(inner) == value:
                return True
        except (ValueError, RecursionError):
            pass
        at = where.find('"{', at + 1)
    return False


def _value_found(value, where: str, found: Found) -> bool:
    """A value written out: a string as it is, anything else as JSON or as Jinja prints it."""
    if isinstance(value, str):
        return found(value, where)
    forms = (json.dumps(value, ensure_ascii=False), json.dumps(value, ensure_ascii=False, separators=(",", ":")), str(value))
    return any(f in where for f in forms)
