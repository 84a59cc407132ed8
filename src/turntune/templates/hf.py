"""Any Hugging Face chat template → :class:`Rendered`, with the assistant spans found by construction.

The *shape* of a conversation is everything but its words: roles, tool calls, tools, and where
whitespace and non-special added tokens (``<think>``, ``<tool_call>``) sit in each content. Each
run of words becomes a numbered sentinel, and the shape is analysed once (then cached) by
rendering it and its prefixes with the template itself, in a Jinja sandbox:

- ``render(shape[:a], add_generation_prompt=True)`` ends where reply ``a`` starts;
- ``render(shape[:j])`` ends where message ``j`` starts, ``render(shape[:a+1])`` where reply a ends;
- what the template writes after a reply's last word, up to trailing whitespace, is its terminator.
  A template that writes none (GLM-4) ends a reply with the first token of what follows.

A reply whose prefix renderings are not prefixes of the whole rendering has no exact span in it:
the conversation is not prefix-stable, and the encoder renders its prefixes on their own. A real
conversation is rendered once and must equal its shape's rendering with the words put back; a
template that does more to words than that gets the same analysis on the real text (slower).

Tokens: added tokens the template writes stay single ids; special-token text inside words is
plain text. Pieces end at every reply start, terminator end and exact message start, so no token
straddles one: the tokens of a prefix rendering are a prefix of the tokens (``expand`` slices
them), and a generation prompt is tokenized on its own, as at inference.
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import jinja2
import numpy as np
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from turntune.conversation import Conversation, Message, ToolCall
from turntune.errors import TemplateError
from turntune.templates.base import Rendered

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters: no template tests for or strips them
_SLOT = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates are written for plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in an immutable sandbox (templates ship with model folders: untrusted
    code), in transformers' dialect: trimmed blocks, loop controls, ``raise_exception``, ``strftime_now``."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not compile: line {e.lineno}: {e.message}") from None


@contextmanager
def _specials_as_text(backend, on: bool) -> Iterator[None]:
    """The Rust tokenizer has one switch for this (transformers flips it too): set it, put it back."""
    saved = backend.encode_special_tokens
    backend.encode_special_tokens = on
    try:
        yield
    finally:
        backend.encode_special_tokens = saved


@dataclass(frozen=True, eq=False)
class _Plan:
    """A shape's rendering cut into pieces; piece i is ``text[points[i]:points[i+1]]``.

    Per *unit* (a piece, or a separator between two text pieces, see :meth:`HFTemplate._encode`):
    ``token`` (an added token's id, -1 for text), ``keep`` (False for separators), ``turn``,
    ``message``, and where its tokens start: after the ``anchor``-th added token (+``offset``)."""

    glue: tuple[str, ...]  # the text around the sentinels: glue[0] S glue[1] S ... glue[-1]
    words: tuple[int, ...]  # which word each sentinel stands for
    slot_len: tuple[int, ...]
    points: tuple[int, ...]
    slots_before: tuple[int, ...]  # per point: sentinels that end at or before it
    seps: tuple[int, ...]  # indices of the points where a separator goes
    token: np.ndarray
    keep: np.ndarray
    turn: np.ndarray
    message: np.ndarray
    anchor: np.ndarray
    offset: np.ndarray
    markers: np.ndarray  # token of each added-token unit and separator, in order
    turn_end_unit: tuple[tuple[int, int], ...]  # per reply: the unit it ends with (-1: no exact span
    #   here) and the separators before that unit
    extra: tuple[int, int, int] | None  # (token, message, turn) appended: GLM-4's final terminator
    prefix_stable: bool


class HFTemplate:
    """A tokenizer's Jinja ``chat_template`` (or the one given), with exact reply spans.

    >>> t = HFTemplate(AutoTokenizer.from_pretrained(folder))   # doctest: +SKIP
    >>> r = t.render(conversation)   # r.turn[i] == k on reply k's text and terminator
    """

    name = "hf"

    def __init__(self, tokenizer, chat_template: str | None = None, *, cache_size: int = 4096) -> None:
        source = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # several named templates: the default one renders chats
            source = source.get("default")
        if not source:
            raise TemplateError("the tokenizer has no chat_template; give one (a Jinja string)")
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if self._backend is None:
            raise TemplateError("HFTemplate needs a fast (Rust-backed) tokenizer")
        self._template = compile_template(source)
        self.tokenizer = tokenizer
        self._specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        added = tokenizer.added_tokens_decoder
        self._is_added = np.zeros(max([len(tokenizer), *added]) + 1, dtype=bool)
        self._is_added[list(added)] = True

        def union(tokens: list[str]) -> re.Pattern | None:  # a group: split() keeps what it splits on
            return re.compile("(" + "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) + ")") if tokens else None

        # Non-special added tokens in content stay in the shape: templates test for them ('</think>'
        # in content) and they encode the same either way. Special-token text is words: plain text.
        self._markers = union([t.content for t in added.values() if not t.special])
        self._special_text = union([t.content for t in added.values() if t.special])
        # The separator of joined pieces (see _encode): a special token that takes no whitespace.
        self._sep = next(((t.content, i) for i, t in sorted(added.items()) if t.special and not
                          (t.lstrip or t.rstrip or t.single_word or t.normalized)), None)
        self._plans: dict[tuple, _Plan] = {}
        self._cache_size = cache_size

    # -- public -----------------------------------------------------------------------------
    def render(self, conversation: Conversation) -> Rendered:
        return self.render_many([conversation])[0]

    def render_many(self, conversations: Sequence[Conversation]) -> list[Rendered]:
        """Render many conversations with one tokenizer call for all of them."""
        return self._encode([self._layout(c, False) for c in conversations])

    def generation_prompt(self, conversation: Conversation) -> list[int]:
        """The conversation as context, then the template's generation prompt."""
        return self._encode([self._layout(conversation, True)])[0].input_ids

    def stop_ids(self) -> list[int]:
        """EOS, and the last token of the terminator of a plain reply and of a tool call
        (``<|im_end|>``, ``<|eot_id|>``; GLM-4: ``<|user|>`` and ``<|observation|>``)."""
        out = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        for reply in (Message("assistant", "Hi."), Message("assistant", "", (ToolCall("f", "{}"),))):
            try:
                r = self.render(Conversation((Message("user", "Hi"), reply), source="<stop_ids probe>"))
            except TemplateError:
                continue  # a template without tool calls
            end = r.input_ids[r.turn_end[0] - 1]
            if self._is_added[end] and end not in out:
                out.append(end)
        return out

    # -- one conversation -------------------------------------------------------------------
    def _render(self, msgs: list[dict], tools: list[dict] | None, gen: bool, source: str) -> str:
        try:
            return self._template.render(messages=msgs, tools=tools, add_generation_prompt=gen, **self._specials)
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"{source}: the chat template did something the sandbox forbids: {e}") from None
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...) lands here
            raise TemplateError(f"{source}: the chat template refused this conversation: {e}") from None
        except Exception as e:  # a template is code: its TypeErrors and IndexErrors are its bugs
            raise TemplateError(f"{source}: the chat template failed ({type(e).__name__}: {e})") from None

    def _try(self, msgs: list[dict], tools, gen: bool, source: str) -> str | None:
        try:
            return self._render(msgs, tools, gen, source)
        except TemplateError:  # a template may refuse a prefix (say, one ending with a tool call)
            return None

    def _shape(self, conv: Conversation) -> tuple[tuple, list[str]]:
        """The conversation's shape (a hashable key, see :func:`_shape_messages`) and its words."""
        words: list[str] = []
        markers = self._markers

        def hide(text: str) -> str:
            if not text:
                return text
            if markers is None and not text[0].isspace() and not text[-1].isspace():
                words.append(text)
                return f"{_OPEN}{len(words) - 1}{_CLOSE}"
            out = []
            for i, part in enumerate(markers.split(text) if markers else [text]):
                core = part.strip()
                if i % 2 or not core:  # odd parts are markers; they and blanks stay as they are
                    out.append(part)
                    continue
                lead = part[: len(part) - len(part.lstrip())]
                out.append(f"{lead}{_OPEN}{len(words)}{_CLOSE}{part[len(part.rstrip()):]}")
                words.append(core)
            return "".join(out)

        key = tuple((m.role, hide(m.content), tuple((c.name, hide(c.arguments)) for c in m.tool_calls), m.name)
                    for m in conv.messages)
        return (key, json.dumps(conv.tools, sort_keys=True) if conv.tools else ""), words

    def _layout(self, conv: Conversation, gen: bool) -> tuple[_Plan, str, list[int], bool]:
        """The plan of the conversation's rendering, the rendering, where the plan's points fall
        in it, and whether its words hold special-token text."""
        key, words = self._shape(conv)
        tools = list(conv.tools) or None
        text = self._render(conv.to_hf(), tools, gen, conv.source)
        plan = self._plans.get((key, gen))
        if plan is None:
            try:
                plan = self._build(_shape_messages(key[0]), tools, gen, conv.source, with_words=True)
            except TemplateError:  # the template dislikes sentinels: the real conversation decides below
                pass
            else:
                if len(self._plans) >= self._cache_size:
                    self._plans.clear()
                self._plans[(key, gen)] = plan
        special = self._special_text is not None and any(self._special_text.search(w) for w in words)
        cum = _fill(plan, text, words) if plan is not None else None
        if cum is None:  # the template does more to words than this follows: analyse the real text
            if special:
                raise TemplateError(f"{conv.source}: the chat template changes message text in a way turntune "
                                    "cannot follow, and the text holds special-token strings whose place "
                                    "then cannot be told exactly")
            plan, cum = self._build(conv.to_hf(), tools, gen, conv.source, with_words=False), [0]
        return plan, text, [p + cum[b] for p, b in zip(plan.points, plan.slots_before)], special

    def _encode(self, laid: list[tuple[_Plan, str, list[int], bool]]) -> list[Rendered]:
        """Tokenize every rendering in one call and label the tokens.

        Usual case: the rendering is one string, tokenized with special tokens on, with a separator
        token wherever two text pieces meet. The tokenizer splits at added tokens before anything
        else, so each piece is tokenized alone, as the rendering is at inference except at those
        points; the added tokens and separators then show where each piece's tokens start. Words
        holding special-token text: each text piece alone, special tokens off (only those).
        """
        joined, alone = [], []
        for plan, text, pos, special in laid:
            if special or self._sep is None:
                alone += [text[pos[i]:pos[i + 1]] for i, t in enumerate(plan.token[plan.keep]) if t < 0]
            else:
                cut = [0, *plan.seps, len(pos) - 1]
                joined.append(self._sep[0].join(text[pos[a]:pos[b]] for a, b in zip(cut, cut[1:])))
        done_joined, done_alone = iter(self._tokenize(joined, False)), iter(self._tokenize(alone, True))
        out = []
        for plan, _, _, special in laid:
            bounds = np.empty(len(plan.token) + 1, dtype=np.int64)
            if special or self._sep is None:
                parts = [[t] if t >= 0 or not k else next(done_alone) for t, k in zip(plan.token.tolist(), plan.keep)]
                ids = np.array([t for p in parts for t in p], dtype=np.int64)
                bounds[0] = 0
                np.cumsum([len(p) for p in parts], out=bounds[1:])
            else:
                ids = np.array(next(done_joined), dtype=np.int64)
                at = np.flatnonzero(self._is_added[ids])
                if len(at) != len(plan.markers) or (ids[at] != plan.markers).any():
                    raise TemplateError("tokenizing a rendering did not give the added tokens its template wrote")
                bounds[:-1] = np.append(at, -1)[plan.anchor] + plan.offset
                bounds[-1] = len(ids)
            out.append(_labelled(plan, ids, bounds))
        return out

    def _tokenize(self, texts: list[str], specials_as_text: bool) -> list[list[int]]:
        if not texts:
            return []
        with _specials_as_text(self._backend, specials_as_text):
            return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    # -- the analysis of one shape ----------------------------------------------------------
    def _build(self, msgs: list[dict], tools, gen: bool, source: str, with_words: bool) -> _Plan:
        """Cut the rendering of ``msgs`` into labelled pieces (see the module docstring)."""
        text = self._render(msgs, tools, gen, source)
        found = list(_SLOT.finditer(text)) if with_words else []
        slots = [(m.start(), m.end()) for m in found]
        slot_end = {int(m.group(1)): m.end() for m in found}
        added = self._glue_tokens(text, slots)
        n = len(msgs)
        asst = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        # Where message j starts, when exact (n: the end; a generation prompt follows it). The
        # generation prompt's plan gets the same cuts as the rendering's, so the same tokens.
        whole = self._try(msgs, tools, False, source) if gen else text
        exact: list[int | None] = [None] * n + [len(whole) if whole is not None and text.startswith(whole) else None]
        label = [0] * n + [len(text)]  # message starts for labels: exact, else the best estimate
        label[0] = self._first_start(msgs, tools, text, source)
        for j in range(1, n):
            prefix = self._try(msgs[:j], tools, False, source)
            label[j] = label[j - 1]
            if prefix is not None and text.startswith(prefix):
                exact[j] = label[j] = len(prefix)
            elif prefix and (last := list(_SLOT.finditer(prefix))) and int(last[-1].group(1)) in slot_end:
                # estimate: message j-1's last word and what the template writes after it when last
                end, tail = slot_end[int(last[-1].group(1))], prefix[last[-1].end():]
                label[j] = max(label[j], end + len(os.path.commonprefix([tail, text[end:end + len(tail)]])))
        spans: list[tuple[int, int] | None] = []
        extra, why = None, ""
        for k, a in enumerate(asst):
            prompt = self._try(msgs[:a], tools, True, source)
            start, end = (len(prompt) if prompt is not None and text.startswith(prompt) else None), exact[a + 1]
            if start is None or end is None or start > end:
                spans.append(None)
                why = "the renderings up to it (with the generation prompt) and ending with it are not both " \
                      "prefixes of the whole rendering"
                continue
            stop = start + len(text[start:end].rstrip())
            if with_words:  # closed: the template writes something after the reply's last word
                lastword = max((e for s, e in slots if start <= s and e <= end), default=start)
                closed = bool(text[lastword:end].strip())
            else:  # words unknown: closed if the reply ends with an added token
                closed = any(s >= start and e == stop for s, (e, _) in added.items())
            if closed:  # trailing whitespace after the terminator is context
                spans.append((start, stop))
            elif a + 1 < n and end in added:  # no terminator in the turn: the next role token is it
                spans.append((start, added[end][0]))
            elif a + 1 == n and not gen and (tok := self._next_role_token(msgs, tools, text, source)) is not None:
                spans.append((start, end))
                extra = (tok, a, k)
            else:
                spans.append(None)
                why = "the template writes no end-of-turn token and no added token follows it"
        if spans and spans[-1] is None and not gen:
            raise TemplateError(f"{source}: cannot find the exact span of the final reply: {why}")
        cuts = {0, len(text)} | {p for s, (e, _) in added.items() for p in (s, e)}
        points = sorted(cuts | {p for p in exact if p is not None} | {p for sp in spans if sp for p in sp})
        units, seps = [], []  # (token, keep, message, turn), as in _Plan
        for i, (s, e) in enumerate(zip(points, points[1:])):
            if (s in added and added[s][0] != e) or any(a < s < b or a < e < b for a, b in slots):
                raise TemplateError(f"{source}: a reply or message boundary falls inside a token or a word")
            turn = next((k for k, sp in enumerate(spans) if sp and sp[0] <= s and e <= sp[1]), -1)
            msg = asst[turn] if turn >= 0 else max((j for j in range(n) if label[j] <= s), default=-1)
            if units and units[-1][0] < 0 and s not in added:  # two text pieces meet
                units.append((self._sep[1] if self._sep else -2, False, msg, -1))
                seps.append(i)
            units.append((added[s][1] if s in added else -1, True, msg, turn))
        if not units:
            raise TemplateError(f"{source}: the chat template renders this conversation as nothing")
        token, keep, message, turn = (np.array(x) for x in zip(*units))
        is_marker = token >= 0
        markers_before = np.cumsum(is_marker) - is_marker  # added tokens and separators before each unit
        ends = [max((u for u in range(len(units)) if turn[u] == k), default=-1) for k in range(len(spans))]
        glue = [text[a:b] for a, b in zip([0] + [e for _, e in slots], [s for s, _ in slots] + [len(text)])]
        return _Plan(
            tuple(glue), tuple(int(m.group(1)) for m in found), tuple(e - s for s, e in slots), tuple(points),
            tuple(sum(1 for _, e in slots if e <= p) for p in points), tuple(seps), token, keep, turn, message,
            np.where(is_marker, markers_before, markers_before - 1), (~is_marker).astype(np.int64), token[is_marker],
            tuple((-1 if u < 0 or extra and extra[2] == k else u, int((~keep[:u + 1]).sum())) for k, u in enumerate(ends)),
            extra,
            not gen and all(sp is not None for sp in spans))

    def _glue_tokens(self, text: str, slots: list[tuple[int, int]]) -> dict[int, tuple[int, int]]:
        """Added tokens the template wrote, ``{start: (end, id)}``, matched by the tokenizer's own
        rules on each stretch of text between words (words may hold special-token text)."""
        edges = [0] + [p for s, e in slots for p in (s, e)] + [len(text)]
        runs = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if a < b]
        with _specials_as_text(self._backend, False):
            encs = self._backend.encode_batch([text[a:b] for a, b in runs], add_special_tokens=False)
        return {a + s: (a + e, t) for (a, _), enc in zip(runs, encs)
                for t, (s, e) in zip(enc.ids, enc.offsets) if self._is_added[t]}

    def _first_start(self, msgs: list[dict], tools, text: str, source: str) -> int:
        """Where message 0's own text starts; what comes before (BOS, ``[gMASK]<sop>``, a default
        system prompt) belongs to no message. Its own text is what a second copy of it adds."""
        one, two = self._try(msgs[:1], tools, False, source), self._try(msgs[:1] * 2, tools, False, source)
        if one is not None and two is not None and two.startswith(one) and len(two) > len(one):
            own = two[len(one):]
            if text.startswith(one) and one.endswith(own):
                return len(one) - len(own)
        bare = self._try([], None, False, source)
        return len(bare) if bare is not None and text.startswith(bare) else 0

    def _next_role_token(self, msgs: list[dict], tools, text: str, source: str) -> int | None:
        """The added token a following message starts with (a tool result after a tool call)."""
        role = "tool" if msgs[-1].get("tool_calls") else "user"
        longer = self._try(msgs + [{"role": role, "content": "x"}], tools, False, source)
        if longer is None or not longer.startswith(text) or len(longer) == len(text):
            return None
        added = self._glue_tokens(longer[len(text):], [])
        return added[0][1] if 0 in added else None


def _labelled(plan: _Plan, ids: np.ndarray, bounds: np.ndarray) -> Rendered:
    """The tokens of one rendering labelled unit by unit (unit u has ``ids[bounds[u]:bounds[u+1]]``);
    the separators (one token each) dropped."""
    counts = bounds[1:] - bounds[:-1]
    turn, message = np.repeat(plan.turn, counts), np.repeat(plan.message, counts)
    if len(plan.seps):
        keep = np.ones(len(ids), dtype=bool)
        keep[bounds[:-1][~plan.keep]] = False
        ids, turn, message = ids[keep], turn[keep], message[keep]
    input_ids, turn, message = ids.tolist(), turn.tolist(), message.tolist()
    turn_end = [int(bounds[u + 1]) - d if u >= 0 else -1 for u, d in plan.turn_end_unit]
    if plan.extra is not None:
        input_ids.append(plan.extra[0])
        message.append(plan.extra[1])
        turn.append(plan.extra[2])
        turn_end[plan.extra[2]] = len(input_ids)
    return Rendered(input_ids, turn, message, turn_end, plan.prefix_stable)


def _shape_messages(key: tuple) -> list[dict]:
    """The shape key as messages in the Hugging Face form (the same form as ``Conversation.to_hf``)."""
    out = []
    for role, content, calls, name in key:
        d: dict = {"role": role, "content": content}
        if calls:
            d["tool_calls"] = [{"type": "function", "function": {"name": c, "arguments": a}} for c, a in calls]
        if name is not None:
            d["name"] = name
        out.append(d)
    return out


def _fill(plan: _Plan, text: str, words: list[str]) -> list[int] | None:
    """If ``text`` is the plan's rendering with the words put back (as they are, or JSON-escaped
    for a template that writes ``| tojson``), the length change after each sentinel; else None."""
    glue = plan.glue
    if not text.startswith(glue[0]):
        return None
    pos, cum = len(glue[0]), [0]
    for i, w in enumerate(plan.words):
        word, after = words[w], glue[i + 1]
        if not (text.startswith(word, pos) and text.startswith(after, pos + len(word))):
            word = json.dumps(word, ensure_ascii=False)[1:-1]
            if not (text.startswith(word, pos) and text.startswith(after, pos + len(word))):
                return None
        cum.append(cum[-1] + len(word) - plan.slot_len[i])
        pos += len(word) + len(after)
    return cum if pos == len(text) else None
