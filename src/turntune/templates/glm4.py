"""GLM-4's chat format, built piece by piece from special-token ids and encoded text.

Layout (glm-4-9b-chat)::

    [gMASK]<sop><|system|>\n{system}<|user|>\n{user}<|assistant|>\n{reply}<|user|>\n...
    <|assistant|>get_weather\n{"city": "Beijing"}<|observation|>\n{result}<|assistant|>\n...

There is no end-of-turn token inside a turn: a reply ends where the next role token begins, so
that role token (``<|user|>`` or ``<|observation|>``; an appended ``<|user|>`` after the final
reply, ``<|observation|>`` after a final tool call) is the reply's terminator and is trained.
``<|assistant|>`` itself is the prompt and is not; the ``\\n``/function name after it is. These
are the targets of the official GLM-4 fine-tuning code (its loss mask shifted right by one).

Because the ids are built here, the mask is known by construction: nothing is re-tokenized and
text that looks like a special token inside content is encoded as plain text.
"""
from __future__ import annotations

import json

from turntune.conversation import Conversation
from turntune.errors import TemplateError
from turntune.templates.base import Rendered
from turntune.templates.hf import _SERIAL_CHARS, _SERIAL_TEXTS

SPECIAL = {
    "<|endoftext|>": 151329, "[MASK]": 151330, "[gMASK]": 151331, "[sMASK]": 151332,
    "<sop>": 151333, "<eop>": 151334, "<|system|>": 151335, "<|user|>": 151336,
    "<|assistant|>": 151337, "<|observation|>": 151338,
}
ROLE_TOKEN = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "tool": "<|observation|>"}


def tools_text(tools: tuple[dict, ...]) -> str:
    """How tool declarations are written into the system turn (same text as our Jinja template)."""
    parts = ["# Available tools"]
    for tool in tools:
        fn = tool.get("function", tool)
        parts.append(f"## {fn.get('name', 'tool')}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}\n"
                     "Call this function with its arguments written as JSON.")
    return "\n\n".join(parts)


def encode_plain(tokenizer, texts: list[str]) -> list[list[int]]:
    """Encode texts with special-token strings kept as plain text, in one batch call.

    Goes to the Rust tokenizer directly: the Python wrapper's per-call overhead is most of the
    cost of encoding short chat messages. Without character offsets (``encode_batch_fast``: same
    ids); the few short texts of one conversation (``encode()`` per call) one by one on this thread,
    as ``HFTemplate._tokenize`` does: waking the tokenizer's thread pool for them costs more CPU.
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        saved = backend.encode_special_tokens
        backend.encode_special_tokens = True  # '<|user|>' typed by a user is text, not a control token
        try:
            if len(texts) <= _SERIAL_TEXTS and sum(map(len, texts)) <= _SERIAL_CHARS:
                return [backend.encode_batch_fast([t], add_special_tokens=False)[0].ids for t in texts]
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = saved
    out = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
    return list(out["input_ids"])


class GLM4Template:
    """The native GLM-4 format. ``tokenizer`` must carry GLM-4's special tokens at their ids."""

    name = "glm4"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: dict[str, int] = {}
        for tok in SPECIAL:  # per-token lookups: get_vocab() copies a 151k-entry dict
            got = tokenizer.convert_tokens_to_ids(tok)
            if got is None or tokenizer.convert_ids_to_tokens(got) != tok:
                raise TemplateError(f"tokenizer has no GLM-4 special token {tok!r}; use template 'hf' "
                                    "(the tokenizer's own chat_template) for this model")
            self.ids[tok] = got  # ids may differ from glm-4-9b-chat's in a custom vocabulary

    @staticmethod
    def applies_to(tokenizer) -> bool:
        for t in ("[gMASK]", "<sop>", "<|assistant|>", "<|observation|>"):
            i = tokenizer.convert_tokens_to_ids(t)
            if i is None or tokenizer.convert_ids_to_tokens(i) != t:
                return False
        return True

    # -- rendering --------------------------------------------------------------------------
    def _pieces(self, conv: Conversation) -> list[tuple[int, str, int, bool]]:
        """(role token id, text after it, message index, trained) for every role block."""
        msgs = list(conv.messages)
        out: list[tuple[int, str, int, bool]] = []
        tools = tools_text(conv.tools) if conv.tools else ""
        if tools and (not msgs or msgs[0].role != "system"):
            out.append((self.ids["<|system|>"], "\n" + tools, -1, False))
        for i, m in enumerate(msgs):
            if m.reasoning:  # training it as content, or dropping it, would both be silent losses
                raise TemplateError(f"{conv.source}: turn {i + 1}: the native GLM-4 format (glm-4-9b-chat) has no "
                                    "place for reasoning; to train reasoning, set data.chat_template to a Jinja "
                                    "template that renders it (reasoning_content / <think>)", rule="not_rendered")
            role = self.ids[ROLE_TOKEN[m.role]]
            if m.role == "system":
                text = m.content + ("\n\n" + tools if tools else "")
                out.append((role, "\n" + text, i, False))
            elif m.role == "assistant":
                if m.content or not m.tool_calls:
                    out.append((role, "\n" + m.content, i, True))
                for call in m.tool_calls:  # the function name goes in the metadata slot
                    out.append((role, f"{call.name}\n{call.arguments}", i, True))
            else:
                out.append((role, "\n" + m.content, i, False))
        return out

    def render_many(self, conversations: list[Conversation]) -> list[Rendered]:
        """Render many conversations with a single tokenizer call."""
        all_pieces = [self._pieces(c) for c in conversations]
        texts = [p[1] for pieces in all_pieces for p in pieces]
        encoded = iter(encode_plain(self.tokenizer, texts))
        return [self._assemble(c, pieces, encoded) for c, pieces in zip(conversations, all_pieces)]

    def render(self, conversation: Conversation) -> Rendered:
        return self.render_many([conversation])[0]

    def _assemble(self, conv: Conversation, pieces, encoded) -> Rendered:
        ids = [self.ids["[gMASK]"], self.ids["<sop>"]]
        turn = [-1, -1]
        message = [-1, -1]
        turn_end: list[int] = []
        k = -1  # current assistant turn
        prev_msg = None
        for role_id, _text, mi, trained in pieces:
            body = next(encoded)
            reply_open = bool(turn_end) and turn_end[-1] < 0
            if reply_open and not trained:
                # This role token ends reply k: it is that reply's terminator (trained, and the
                # token `expand` cuts after). It belongs to the reply's message.
                ids.append(role_id)
                turn.append(k)
                message.append(prev_msg)
                turn_end[k] = len(ids)
            elif trained and mi != prev_msg:  # a new reply: its <|assistant|> is the prompt
                k += 1
                turn_end.append(-1)
                ids.append(role_id)
                turn.append(-1)
                message.append(mi)
            else:
                # Context role tokens, and a second <|assistant|> inside the same reply (content
                # followed by a tool call), which the model must write itself.
                ids.append(role_id)
                turn.append(k if trained else -1)
                message.append(mi)
            ids.extend(body)
            turn.extend([k if trained else -1] * len(body))
            message.extend([mi] * len(body))
            prev_msg = mi
        if turn_end and turn_end[-1] < 0:
            last = conv.messages[prev_msg] if prev_msg is not None and prev_msg >= 0 else None
            end_tok = "<|observation|>" if last is not None and last.tool_calls else "<|user|>"
            ids.append(self.ids[end_tok])
            turn.append(k)
            message.append(prev_msg)
            turn_end[-1] = len(ids)
        return Rendered(ids, turn, message, turn_end, prefix_stable=True)

    # -- generation -------------------------------------------------------------------------
    def generation_prompt(self, conversation: Conversation) -> list[int]:
        """The rendering of ``conversation`` as context, then ``<|assistant|>`` (no newline)."""
        r = self.render_many([conversation])[0]
        ids = r.input_ids
        if r.turn_end and r.turn_end[-1] == len(ids):  # drop the appended terminator
            ids = ids[:-1]
        return ids + [self.ids["<|assistant|>"]]

    def stop_ids(self) -> list[int]:
        return [self.ids["<|endoftext|>"], self.ids["<|user|>"], self.ids["<|observation|>"]]
