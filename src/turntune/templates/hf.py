"""Any Hugging Face chat template → :class:`Rendered`, with the assistant spans found by construction.

A conversation's *shape* is all but its words: roles, tool calls, tools, and where non-special
added tokens (``<think>``) and blank runs sit in each content. Each run of words becomes a numbered
sentinel; a shape is analysed once (then cached) by rendering it and its prefixes with the
template, in a sandbox: ``render(shape[:a], add_generation_prompt=True)`` ends where reply ``a``
starts, ``render(shape[:j])`` where message ``j`` starts (``[:a+1]``: where reply a ends). What the
template writes after a reply's last word, up to trailing whitespace, is its terminator; a template
that writes none (GLM-4) ends the reply with the first token of what follows. A reply whose prefix
renderings are not prefixes of the whole has no exact span: the conversation is not prefix-stable
and the encoder renders its prefixes on their own. Each real conversation is rendered once and must
equal its shape's rendering with the words put back (as they are, stripped, or JSON-escaped); if
the template does more to words than that, the real text gets the same analysis (slower).

Templates get what :meth:`Conversation.to_hf` gives: ``reasoning_content``, call ids, and call
arguments as a mapping (whose keys and string values are words; see :func:`_key`). A message that
opens the conversation (a greeting) is a reply like any other: see :meth:`HFTemplate._greeting_start`.
Nothing dropped (``templates/dropped.py``): each reply's words, reasoning and tool calls must be in
its span, other messages' words in the rendering, else the conversation is refused
(``not_rendered``); checked once per shape on the sentinels, or on the real text when the template
does more to words than the shape follows.

Long conversations: rendering every prefix costs time quadratic in the conversation's length. From
``_LONG_FROM`` messages on, where the words are in the shape, each prefix rendering's end is
predicted instead: a short probe (the system messages, a user message, the last two messages of the
prefix) must render what the whole rendering has from the probe's first word on, and the prefix
then ends where that stretch ends; a few prefixes are rendered for real to verify the predictions,
and where any check fails every prefix is rendered as above (:meth:`HFTemplate._prefix_ends` says
what is checked and what is assumed).

Tokens: each rendering is tokenized whole, as at inference; added tokens the template writes are
single ids and show where each piece's tokens start, special-token text in words stays plain text.
Pieces end at every reply start, terminator end and exact message start, and no token may straddle
one (checked, else the pieces are tokenized apart): a prefix rendering's tokens are a prefix of the
tokens (``expand`` slices them), and a generation prompt tokenizes as it does at inference.
"""
from __future__ import annotations

import bisect
import itertools
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jinja2

from turntune.conversation import Conversation, Message, ToolCall
from turntune.errors import TemplateError
from turntune.templates.base import Rendered
from turntune.templates.dropped import describe, find_dropped
from turntune.templates.sandbox import compile_template, reads_variable

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters: no template tests for or strips them
_SLOT = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
_DECODER = json.JSONDecoder()
_SERIAL_TEXTS, _SERIAL_CHARS = 64, 8192  # up to this much, tokenize on this thread (see _tokenize)
# Long conversations (see HFTemplate._prefix_ends): from this many messages on, prefix renderings
# are predicted from probes; a probe ends with this many messages (more where tool results follow
# their call); this many predictions spread over the conversation are also rendered for real.
_LONG_FROM, _WINDOW, _SPOT_CHECKS = 64, 2, 8


@dataclass(frozen=True, eq=False)
class _Plan:
    """A shape's rendering cut into pieces; piece i is ``text[points[i]:points[i+1]]``."""

    glue: tuple[str, ...]  # the text around the sentinels: glue[0] S glue[1] S ... glue[-1]
    words: tuple[int, ...]  # which word each sentinel stands for
    slot_len: tuple[int, ...]
    points: tuple[int, ...]
    slots_before: tuple[int, ...]  # per point: sentinels that end at or before it
    token: tuple[int, ...]  # per piece: the id of an added token the template wrote, -1: text
    runs: tuple[tuple[int, int, int, int], ...]  # pieces p0..p1 share (turn, message)
    turn_end_piece: tuple[int, ...]  # per reply: the piece it ends with; -1: no exact span here
    extra: tuple[int, int, int] | None  # (token, message, turn) appended: GLM-4's final terminator
    prefix_stable: bool
    # Where each piece's tokens start in the whole rendering's tokens: after the anchor-th added
    # token, plus offset. Two text pieces can meet (a reply start after "assistant\n"): the first
    # must then tokenize alone as ``known`` (checked per conversation), or ``joinable`` is False.
    anchor: tuple[int, ...]
    offset: tuple[int, ...]
    markers: tuple[int, ...]  # the added tokens, in order
    known: tuple[tuple[int, list[int]], ...]
    joinable: bool


class HFTemplate:
    """A tokenizer's Jinja ``chat_template`` (or the one given), with exact reply spans.

    Caches the analysis of each conversation shape; not thread-safe (one instance per worker).

    >>> t = HFTemplate(AutoTokenizer.from_pretrained(folder))   # doctest: +SKIP
    >>> r = t.render(conversation)   # r.turn[i] == k on reply k's text and terminator
    """

    name = "hf"

    def __init__(self, tokenizer, chat_template: str | None = None, *, cache_size: int = 4096,
                 template_kwargs: dict | None = None) -> None:
        source = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # several named templates: the default one renders chats
            source = source.get("default")
        if not source:
            raise TemplateError("the tokenizer has no chat_template; give one (a Jinja string)")
        self.source: str = source  # the Jinja text: part of the encoded-data cache's fingerprint
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if self._backend is None:
            raise TemplateError("HFTemplate needs a fast (Rust-backed) tokenizer")
        self._template = compile_template(source)
        # A template that never names ``tools`` renders the same with or without them: its shapes
        # then need no tool list, and conversations with different tools share their analysis.
        self._reads_tools = reads_variable(source, "tools")
        self.tokenizer = tokenizer
        self._specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        # Extra variables on every render (``clear_thinking``), so the analysis of each shape, the
        # nothing-dropped check and the generation prompt all see the template as the user set it.
        self.template_kwargs: dict = dict(template_kwargs or {})  # part of the cache's fingerprint when set
        self._context = {**self._specials, **self.template_kwargs}
        added = tokenizer.added_tokens_decoder
        self._added = set(added)

        def union(tokens: list[str]) -> re.Pattern | None:  # a group: split() keeps what it splits on
            return re.compile("(" + "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) + ")") if tokens else None

        # Non-special added tokens in content stay in the shape: templates test for them ('</think>'
        # in content) and they encode the same either way. Special-token text is words: plain text.
        self._markers = union([t.content for t in added.values() if not t.special])
        self._special_text = union([t.content for t in added.values() if t.special])
        self._plans: dict[tuple, _Plan] = {}
        self._renders: dict[tuple, str | None] = {}
        self._dropped: dict[tuple, tuple[int, list[str]] | None] = {}  # per shape: see _dropped_in_shape
        self._cache_size = cache_size
        self._long_from = _LONG_FROM  # messages; math.inf: always the full analysis (the tests' oracle)
        self._long_paths: Counter[str] = Counter()  # long shapes analysed: "predicted", or "full" where refused

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
            if end in self._added and end not in out:
                out.append(end)
        return out

    # -- one conversation -------------------------------------------------------------------
    def _render(self, msgs: list[dict], tools: list[dict] | None, gen: bool, source: str) -> str:
        try:
            return self._template.render(messages=msgs, tools=tools, add_generation_prompt=gen, **self._context)
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"{source}: the chat template did something the sandbox forbids: {e}") from None
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...) lands here
            raise TemplateError(f"{source}: the chat template refused this conversation: {e}") from None
        except Exception as e:  # a template is code: its TypeErrors and IndexErrors are its bugs
            raise TemplateError(f"{source}: the chat template failed ({type(e).__name__}: {e})") from None

    def _try(self, key: tuple, tools: tuple[str, list | None], gen: bool, source: str) -> str | None:
        """The rendering of the messages ``key`` (see :meth:`_shape`), None if the template refuses
        it (say, a prefix ending with a tool call). Memoized: shapes share their prefixes."""
        memo = (key, tools[0], gen)
        if memo not in self._renders:
            if len(self._renders) >= 16 * self._cache_size:
                self._renders.clear()
            try:
                self._renders[memo] = self._render(_messages(key), tools[1], gen, source)
            except TemplateError:
                self._renders[memo] = None
        return self._renders[memo]

    def _shape(self, conv: Conversation) -> tuple[tuple, list[str]]:
        """The conversation's shape as a hashable key, and its words."""
        words: list[str] = []
        markers = self._markers

        def hide(text: str) -> str:
            if markers is None or not text:
                parts = [text]
            else:
                parts = markers.split(text)
            out = []
            for i, part in enumerate(parts):
                if i % 2 or part.isspace() or not part:  # odd parts are markers; they and blanks stay
                    out.append(part)
                else:  # whitespace around words is not in the shape: a template may strip it (see _fill)
                    out.append(f"{_OPEN}{len(words)}{_CLOSE}")
                    words.append(part)
            return "".join(out)

        return _key(conv, hide), words

    def _layout(self, conv: Conversation, gen: bool) -> tuple[_Plan, str, list[int], bool]:
        """The plan of the conversation's rendering, the rendering, where the plan's points fall
        in it, and whether its words hold special-token text."""
        key, words = self._shape(conv)
        given = list(conv.tools) or None
        tools = (json.dumps(conv.tools, sort_keys=True) if given and self._reads_tools else "",
                 given if self._reads_tools else None)
        text = self._render(conv.to_hf(), given, gen, conv.source)
        plan, error = self._plans.get((key, tools[0], gen)), None
        if plan is None:
            try:
                plan = self._build(key, tools, gen, conv.source, with_words=True)
            except TemplateError as e:  # say, the template dislikes sentinels: the real text decides below
                error = e
            else:
                if len(self._plans) >= self._cache_size:
                    self._plans.clear()
                self._plans[(key, tools[0], gen)] = plan
        special = self._special_text is not None and any(self._special_text.search(w) for w in words)
        cum = _fill(plan, text, words) if plan is not None else None
        if cum is None:  # the template does more to words than this follows: analyse the real text
            if special:
                raise error or TemplateError(f"{conv.source}: the chat template changes message text in a way "
                                             "turntune cannot follow, and the text holds special-token strings "
                                             "whose place then cannot be told exactly", rule="span_not_found")
            real = _key(conv, str)
            plan, cum = self._build(real, tools, gen, conv.source, with_words=False), [0]
            lost = None if gen else find_dropped(real, text, _spans(plan), _text_finder())
        else:
            lost = None if gen else self._dropped_in_shape(key, tools[0], plan)
        if lost is not None:  # generation prompts (chat, eval) take the history as the template writes it
            j, what = lost
            m = conv.messages[j]
            raise TemplateError(describe(conv.source, j, m.role, what, [c.name for c in m.tool_calls]),
                                rule="not_rendered")
        return plan, text, [p + cum[b] for p, b in zip(plan.points, plan.slots_before)], special

    def _dropped_in_shape(self, key: tuple, tools: str, plan: _Plan) -> tuple[int, list[str]] | None:
        """:func:`find_dropped` on the shape's rendering, by sentinel: once per shape. The real
        text is the shape's with the words put back, so what the shape holds where, it holds."""
        memo = (key, tools)
        if memo not in self._dropped:
            if len(self._dropped) >= self._cache_size:
                self._dropped.clear()
            self._dropped[memo] = find_dropped(key, _plan_text(plan), _spans(plan), _sentinels_found)
        return self._dropped[memo]

    def _encode(self, laid: list[tuple[_Plan, str, list[int], bool]]) -> list[Rendered]:
        """Tokenize every rendering and label the tokens, in one tokenizer call (two if needed).

        Usual case: each rendering is tokenized whole, as at inference; the tokenizer splits at
        added tokens before anything else, so they show where each piece's tokens start. Where two
        text pieces meet, the first must have tokenized as it does alone. Otherwise (a reply that
        starts with whitespace, or words with special-token text), each text piece is tokenized
        alone, special-token text as plain text.
        """
        whole = iter(self._tokenize([text for plan, text, _, special in laid if plan.joinable and not special], False))
        done: list[tuple[list[int], list[int]] | None] = []
        for plan, _, _, special in laid:
            done.append(None if special or not plan.joinable else self._bounds(plan, next(whole)))
        alone = [text[pos[i]:pos[i + 1]] for (plan, text, pos, _), d in zip(laid, done) if d is None
                 for i, t in enumerate(plan.token) if t < 0]
        alone_ids = iter(self._tokenize(alone, True))
        out = []
        for (plan, _, _, _), d in zip(laid, done):
            if d is None:
                parts = [[t] if t >= 0 else next(alone_ids) for t in plan.token]
                d = [t for p in parts for t in p], [0, *itertools.accumulate(len(p) for p in parts)]
            out.append(_labelled(plan, *d))
        return out

    def _bounds(self, plan: _Plan, ids: list[int]) -> tuple[list[int], list[int]] | None:
        """The tokens of a whole rendering and where each piece's start (and the end), if they fit."""
        at, cur = [], 0
        try:  # text pieces cannot hold added-token text (words with special text go alone)
            for m in plan.markers:
                cur = ids.index(m, cur)
                at.append(cur)
                cur += 1
        except ValueError:
            raise TemplateError("tokenizing a rendering did not give the added tokens its template wrote",
                                rule="span_not_found") from None
        at.append(-1)  # anchor -1: no added token before, the piece starts at 0
        bounds = [at[a] + o for a, o in zip(plan.anchor, plan.offset)] + [len(ids)]
        if any(ids[bounds[i]:bounds[i] + len(known)] != known for i, known in plan.known):
            return None  # a token straddles two pieces (say, a reply starting with a newline)
        return ids, bounds

    def _tokenize(self, texts: list[str], specials_as_text: bool, offsets: bool = False) -> list:
        """One batch call. The Rust tokenizer has a single switch for special-token text (transformers
        flips it per call too): set it for the call, then put it back.

        A few short texts (a shape's analysis, one conversation) are encoded one by one on this
        thread: a batch call hands them to the tokenizer's thread pool, whose threads wake, spin and
        go back to sleep, which costs more CPU than a few short texts do (same ids either way). A
        batch of one text stays on this thread, and ``encode_batch_fast`` skips the character
        offsets that ``encode`` computes: a fifth of the tokenizer's time, where they are not needed."""
        if not texts:
            return []
        backend, saved = self._backend, self._backend.encode_special_tokens
        backend.encode_special_tokens = specials_as_text
        try:
            if len(texts) <= _SERIAL_TEXTS and sum(map(len, texts)) <= _SERIAL_CHARS:
                if offsets:
                    return [backend.encode(t, add_special_tokens=False) for t in texts]
                return [backend.encode_batch_fast([t], add_special_tokens=False)[0].ids for t in texts]
            if offsets:
                return backend.encode_batch(texts, add_special_tokens=False)
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = saved

    # -- the analysis of one shape ----------------------------------------------------------
    def _build(self, msgs: tuple, tools: tuple[str, list | None], gen: bool, source: str, with_words: bool) -> _Plan:
        """Cut the rendering of the messages ``msgs`` into labelled pieces (see the module docstring):
        where each message starts, where each reply's span is, then the pieces between those points."""
        text = self._try(msgs, tools, gen, source)
        if text is None:
            text = self._render(_messages(msgs), tools[1], gen, source)  # raises the template's error
        found = list(_SLOT.finditer(text)) if with_words else []
        slots = [(m.start(), m.end()) for m in found]
        added = self._glue_tokens(text, slots)
        exact, label, ends = self._message_starts(msgs, tools, gen, source, text, found, with_words)
        spans, extra = self._reply_spans(msgs, tools, gen, source, text, slots, added, exact, label, ends, with_words)
        return self._pieces(msgs, gen, source, text, found, slots, added, exact, label, spans, extra)

    def _message_starts(self, msgs: tuple, tools: tuple[str, list | None], gen: bool, source: str, text: str,
                        found: list[re.Match], with_words: bool) -> tuple[list, list[int], dict | None]:
        """Where each message starts in ``text``: ``exact`` (None where no prefix rendering is a prefix
        of the whole; index n: the end, a generation prompt follows it), ``label`` (exact, else the best
        estimate, for labels), and ``ends`` (long conversations: every prefix's end predicted and checked,
        else None and the prefixes are rendered)."""
        n = len(msgs)
        slot_end = {int(m.group(1)): m.end() for m in found}
        # The generation prompt's plan gets the same cuts as the rendering's, so the same tokens.
        whole = self._try(msgs, tools, False, source) if gen else text
        exact: list[int | None] = [None] * n + [len(whole) if whole is not None and text.startswith(whole) else None]
        label = [0] * n + [len(text)]
        label[0] = self._first_start(msgs, tools, text, source)
        ends = None
        if with_words and n >= self._long_from:
            ends = self._prefix_ends(msgs, tools, text, source)
            self._long_paths["predicted" if ends is not None else "full"] += 1
        for j in range(1, n):
            if ends is not None:
                exact[j] = ends[j, False]
                label[j] = max(label[j - 1], exact[j])
                continue
            prefix = self._try(msgs[:j], tools, False, source) or ""
            if text.startswith(prefix) and prefix:
                exact[j], label[j] = len(prefix), max(label[j - 1], len(prefix))
                continue
            # Estimates: where the prefix rendering parts from the whole one, or later, message j-1's
            # last word and what the template writes after it when it is last (history it rewrites).
            label[j] = max(label[j - 1], len(os.path.commonprefix([prefix, text])))
            if (last := list(_SLOT.finditer(prefix))) and int(last[-1].group(1)) in slot_end:
                end, tail = slot_end[int(last[-1].group(1))], prefix[last[-1].end():]
                label[j] = max(label[j], end + len(os.path.commonprefix([tail, text[end:end + len(tail)]])))
        return exact, label, ends

    def _reply_spans(self, msgs: tuple, tools: tuple[str, list | None], gen: bool, source: str, text: str,
                     slots: list[tuple[int, int]], added: dict, exact: list, label: list[int], ends: dict | None,
                     with_words: bool) -> tuple[list[tuple[int, int] | None], tuple[int, int, int] | None]:
        """Each reply's exact span ``(start, stop)`` in ``text`` (None where there is none: the
        conversation is then not prefix-stable), and GLM-4's appended final terminator, if any."""
        n = len(msgs)
        slot_start, slot_stop = [a for a, _ in slots], [b for _, b in slots]
        spans: list[tuple[int, int] | None] = []
        extra, why = None, ""
        for k, a in enumerate(i for i, m in enumerate(msgs) if m[0] == "assistant"):
            if ends is not None:
                prompt, start, end = None, ends[a, True], exact[a + 1]
            else:
                prompt = self._try(msgs[:a], tools, True, source)
                start, end = (len(prompt) if prompt is not None and text.startswith(prompt) else None), exact[a + 1]
            at = exact[a] if a else label[0]  # where the reply's message starts, when known exactly
            if start is None and at is not None and all(m[0] == "system" for m in msgs[:a]):  # a greeting
                start = self._greeting_start(msgs[:a], tools, text, at, source)
            if start is None or end is None or start > end:
                spans.append(None)
                why = "the renderings up to it (with the generation prompt) and ending with it are not both " \
                      "prefixes of the whole rendering"
                if prompt is not None and not text.startswith(prompt):  # say, a prompt ending in '<think>\n'
                    i = len(os.path.commonprefix([prompt, text]))
                    why += f": the generation prompt reads {prompt[i:i + 24]!r} where the reply's rendering " \
                           f"reads {text[i:i + 24]!r}"
                continue
            stop = start + len(text[start:end].rstrip())
            if with_words:  # closed: the template writes something after the reply's last word
                i = bisect.bisect_right(slot_stop, end) - 1  # the last word ending by `end` (by bisection: long conversations)
                lastword = slot_stop[i] if i >= 0 and slot_start[i] >= start else start
                lastword = max(lastword, _arguments_end(text, start, end, msgs[a][2]))  # '"}' is data
                closed = bool(text[lastword:end].strip()) and not _closes_own_tags(text[lastword:end], text[start:lastword])
            else:  # words unknown: closed if the reply ends with an added token
                last = [s for s, (e, _) in added.items() if s >= start and e == stop]
                closed = bool(last) and not _closes_own_tags(text[last[0]:stop], text[start:last[0]])
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
            raise TemplateError(f"{source}: cannot find the exact span of the final reply: {why}", rule="span_not_found")
        return spans, extra

    def _pieces(self, msgs: tuple, gen: bool, source: str, text: str, found: list[re.Match],
                slots: list[tuple[int, int]], added: dict, exact: list, label: list[int],
                spans: list[tuple[int, int] | None], extra: tuple[int, int, int] | None) -> _Plan:
        """The plan: ``text`` cut at every message start, reply span end and added token, each piece
        labelled with its reply and message, and where its tokens start in the whole rendering's."""
        n = len(msgs)
        asst = [i for i, m in enumerate(msgs) if m[0] == "assistant"]
        slot_start, slot_stop = [a for a, _ in slots], [b for _, b in slots]
        cuts = {0, len(text)} | {p for s, (e, _) in added.items() for p in (s, e)}
        points = sorted(cuts | {p for p in exact if p is not None} | {p for sp in spans if sp for p in sp})
        before = [bisect.bisect_right(slot_stop, p) for p in points]  # sentinels ending at or before each point
        if any(i < len(slots) and slot_start[i] < p for p, i in zip(points, before)):
            raise TemplateError(f"{source}: a reply or message boundary falls inside a word", rule="span_not_found")
        exact_spans = [(sp[0], sp[1], k) for k, sp in enumerate(spans) if sp]
        token, runs, last = [], [], [-1] * len(spans)  # runs: [first piece, end piece, turn, message]
        for i, (s, e) in enumerate(zip(points, points[1:])):
            if s in added and added[s][0] != e:
                raise TemplateError(f"{source}: a reply or message boundary falls inside a token", rule="span_not_found")
            sp = exact_spans[bisect.bisect_right(exact_spans, (s, math.inf)) - 1] if exact_spans else (0, -1, -1)
            turn = sp[2] if sp[0] <= s and e <= sp[1] else -1
            msg = asst[turn] if turn >= 0 else bisect.bisect_right(label, s, 0, n) - 1
            token.append(added[s][1] if s in added else -1)
            if runs and runs[-1][2:] == [turn, msg]:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1, turn, msg])
            if turn >= 0:
                last[turn] = i
        if not token:
            raise TemplateError(f"{source}: the chat template renders this conversation as nothing")
        meets = [i for i in range(len(token) - 1) if token[i] < 0 and token[i + 1] < 0]  # two text pieces
        fixed = [i for i in meets if not (before[i] < len(slots) and slot_start[before[i]] < points[i + 1])]
        known = dict(zip(fixed, self._tokenize([text[points[i]:points[i + 1]] for i in fixed], False)))
        marker = [t >= 0 for t in token]
        anchor = list(itertools.accumulate(marker, initial=0))  # added tokens before each piece
        offset = [0 if m else 1 for m in marker]
        for i in meets:  # the next piece starts after this one's tokens
            offset[i + 1] = offset[i] + len(known.get(i, ()))
        glue = [text[a:b] for a, b in zip([0] + [e for _, e in slots], [s for s, _ in slots] + [len(text)])]
        return _Plan(glue=tuple(glue), words=tuple(int(m.group(1)) for m in found),
                     slot_len=tuple(e - s for s, e in slots), points=tuple(points), slots_before=tuple(before),
                     token=tuple(token), runs=tuple(map(tuple, runs)),
                     turn_end_piece=tuple(-1 if extra and extra[2] == k else i for k, i in enumerate(last)),
                     extra=extra, prefix_stable=not gen and all(sp is not None for sp in spans),
                     anchor=tuple(b - (not m) for b, m in zip(anchor, marker)), offset=tuple(offset),
                     markers=tuple(t for t in token if t >= 0), known=tuple(known.items()),
                     joinable=len(known) == len(meets))

    def _glue_tokens(self, text: str, slots: list[tuple[int, int]]) -> dict[int, tuple[int, int]]:
        """Added tokens the template wrote, ``{start: (end, id)}``, matched by the tokenizer's own
        rules on each stretch of text between words (words may hold special-token text)."""
        edges = [0] + [p for s, e in slots for p in (s, e)] + [len(text)]
        runs = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if a < b]
        encs = self._tokenize([text[a:b] for a, b in runs], False, offsets=True)
        return {a + s: (a + e, t) for (a, _), enc in zip(runs, encs)
                for t, (s, e) in zip(enc.ids, enc.offsets) if t in self._added}

    def _first_start(self, msgs: tuple, tools: tuple[str, list | None], text: str, source: str) -> int:
        """Where message 0's own text starts; what comes before (BOS, ``[gMASK]<sop>``, a default
        system prompt) belongs to no message. Its own text is what a second copy of it adds."""
        one, two = self._try(msgs[:1], tools, False, source), self._try(msgs[:1] * 2, tools, False, source)
        if one is not None and two is not None and two.startswith(one) and len(two) > len(one):
            own = two[len(one):]
            if text.startswith(one) and one.endswith(own):
                return len(one) - len(own)
        bare = self._try((), ("", None), False, source)
        return len(bare) if bare is not None and text.startswith(bare) else 0

    def _greeting_start(self, before: tuple, tools: tuple[str, list | None], text: str, at: int, source: str) -> int | None:
        """Where a reply with no user message before it (an opening greeting) starts, or None.

        Its generation prompt (the system prompt, or nothing, then the prompt) need not be a prefix
        of the rendering: SmolLM2's template writes its default system prompt only when there are
        messages, and Llama 3.1's and Qwen2.5's cannot render no messages at all. The reply then
        starts after what the generation prompt adds to a history (that one, else one with a user
        message), written where the reply's message starts (``at``): what the model is shown
        before any reply it writes."""
        for history in (before, before + (_plain("user", "x"),)):
            bare, prompt = self._try(history, tools, False, source), self._try(history, tools, True, source)
            if bare is not None and prompt is not None and prompt.startswith(bare) and len(prompt) > len(bare):
                header = prompt[len(bare):]
                return at + len(header) if text.startswith(header, at) else None
        return None

    def _next_role_token(self, msgs: tuple, tools: tuple[str, list | None], text: str, source: str) -> int | None:
        """The added token a following message starts with (a tool result after a tool call)."""
        nxt = _plain("tool" if msgs[-1][2] else "user", "x")
        longer = self._try(msgs + (nxt,), tools, False, source)
        if longer is not None and not longer.startswith(text) and any(m[4] for m in msgs):
            # A template that drops reasoning once a message follows (GLM-4.5, GLM-Z1) rewrites the
            # replies, not what follows them: ask again with the reasoning left out.
            bare = tuple(m[:4] + ("",) + m[5:] for m in msgs)
            text, longer = self._try(bare, tools, False, source), self._try(bare + (nxt,), tools, False, source)
        if longer is None or text is None or not longer.startswith(text) or len(longer) == len(text):
            return None
        added = self._glue_tokens(longer[len(text):], [])
        return added[0][1] if 0 in added else None

    # -- long conversations: prefix renderings predicted from probes ----------------------------
    def _prefix_ends(self, msgs: tuple, tools: tuple[str, list | None], text: str,
                     source: str) -> dict[tuple[int, bool], int] | None:
        """Where each prefix rendering ends in ``text`` (the shape's whole rendering), found without
        rendering every prefix: ``(j, False)``: ``len(render(msgs[:j]))`` for ``0 < j < n``;
        ``(a, True)``: ``len(render(msgs[:a]))`` with the generation prompt, for each reply ``a``.
        None where some prefix rendering is not a prefix of ``text`` or a check fails: the caller
        then renders every prefix (the full analysis, which also says what is not prefix-stable).

        A probe for prefix ``j`` is a short conversation: the leading system messages, the latest
        user message before the window (where the window does not start with one), then the window
        ``msgs[j-2:j]`` (reaching back over tool results to their call). Its words are renumbered
        from 0, so probes of windows alike in all but their words are one memoized rendering.
        What the probe renders from the window's first word on, with the words numbered back, must
        be in ``text`` from that word on, character for character; the prediction is that the
        prefix rendering ends where that stretch ends. Where the probe's stretch is not there (the
        template numbers its messages, writes something at one index, ...), the prefix is rendered.

        Checked, exactly: every probe's stretch against ``text`` (so the window renders the same in
        the probe and in the whole); every word of ``text`` appears once; no prefix ends after a
        later message's word or before one of its own messages' words; the prefixes whose window
        reaches the system messages (the first few) and those not predicted are rendered and must
        be prefixes of ``text``; the latest prediction of each window pattern (the roles in the
        window, generation prompt or not) and ``_SPOT_CHECKS`` predictions spread over the
        conversation are rendered and must equal their prediction. One failure: None.
        Assumed, for the other prefixes: the template renders the history before the window as it
        does in the whole rendering (prefix-stable history), and what it writes after the window's
        first word depends on the window, the system messages and the latest user message only,
        not on the window's position (a rule such as "after the 150th message, when last" at an
        index no check renders would go unseen; one that holds from some length on is caught by
        the latest prediction of each pattern). Cost: one rendering of the whole per check, about
        one short probe per distinct window, and string comparisons linear in ``text``.
        """
        n = len(msgs)
        found = list(_SLOT.finditer(text))
        start_of = {int(m.group(1)): m.start() for m in found}
        if len(start_of) != len(found):  # a word written twice: which copy a probe anchors on is unclear
            return None
        end_of = {int(m.group(1)): m.end() for m in found}
        words = [[int(w) for part in _strings(m) for w in _SLOT.findall(part)] for m in msgs]
        # A prefix rendering cannot hold a later message's word, and (being a prefix of the whole)
        # holds every word of its own messages that the whole has before it.
        own_end, later_start = [-1] * (n + 1), [len(text)] * (n + 1)
        for j in range(n):
            own_end[j + 1] = max([own_end[j]] + [end_of[w] for w in words[j] if w in end_of])
        for j in reversed(range(n)):
            later_start[j] = min([later_start[j + 1]] + [start_of[w] for w in words[j] if w in start_of])
        head = 0
        while head < n and msgs[head][0] == "system":  # a message key starts with its role
            head += 1
        latest_user, user = [], None
        for i, m in enumerate(msgs):
            latest_user.append(user)
            user = i if m[0] == "user" else user
        points = sorted([(j, False) for j in range(1, n)] + [(a, True) for a in range(n) if msgs[a][0] == "assistant"])
        def real(j: int, gen: bool) -> str | None:  # not memoized: long, and rendered once (unless refused)
            try:
                return self._render(_messages(msgs[:j]), tools[1], gen, source)
            except TemplateError:
                return None

        ends: dict[tuple[int, bool], int] = {}
        predicted: list[tuple[int, bool]] = []
        latest: dict[tuple, tuple[int, bool]] = {}  # per window pattern: its latest prediction
        for j, gen in points:
            first = j - _WINDOW
            while first > head and msgs[first][0] == "tool":
                first -= 1
            end = None
            if first > head:
                u = latest_user[first]
                bridge = (msgs[u],) if msgs[first][0] != "user" and u is not None else ()
                end = self._probe(msgs[:head] + bridge, msgs[first:j], tools, gen, source, text, start_of)
                if end is not None and not own_end[j] <= end <= later_start[j]:
                    end = None
            if end is None:
                prefix = real(j, gen)
                if prefix is None or not (prefix or gen) or not text.startswith(prefix):
                    return None  # not a prefix: the full analysis decides what is exact
                end = len(prefix)
            else:
                predicted.append((j, gen))
                latest[gen, tuple(m[0] for m in msgs[first:j])] = (j, gen)
            ends[j, gen] = end
        spots = predicted[::max(1, -(-len(predicted) // _SPOT_CHECKS))]
        for j, gen in sorted(set(latest.values()) | set(spots)):
            prefix = real(j, gen)
            if prefix is None or len(prefix) != ends[j, gen] or not text.startswith(prefix):
                return None
        return ends

    def _probe(self, lead: tuple, window: tuple, tools: tuple[str, list | None], gen: bool, source: str,
               text: str, start_of: dict[int, int]) -> int | None:
        """Where the rendering of a prefix ending with ``window`` ends in ``text``, if the probe
        ``lead + window`` (words renumbered) renders from the window's first word on exactly what
        ``text`` has from that word on (see :meth:`_prefix_ends`); else None."""
        local, numbers, base = _renumber(lead, window)  # the lead's words are numbered first: below `base`
        rendered = self._try(local, tools, gen, source)
        first = next((m for m in _SLOT.finditer(rendered or "") if int(m.group(1)) >= base), None)
        if first is None:  # the window renders no word: nothing to anchor on
            return None
        try:
            at = start_of.get(numbers[int(first.group(1))])
            stretch = _SLOT.sub(lambda m: f"{_OPEN}{numbers[int(m.group(1))]}{_CLOSE}", rendered[first.start():])
        except IndexError:  # a sentinel the template made up
            return None
        return at + len(stretch) if at is not None and text.startswith(stretch, at) else None


def _key(conv: Conversation, hide) -> tuple:
    """The messages as a hashable tuple, ``hide`` applied to the words: content, reasoning, ids,
    and each call's name, argument keys and string values. One message is ``(role, content,
    calls, name, reasoning, tool_call_id)``, one call ``(name, arguments as JSON text, id)``.

    Arguments reach templates as a mapping (:meth:`Conversation.to_hf`), so they cannot be hidden
    whole: their keys and string values are words, numbers and the nesting stay in the shape
    (sentinels are strings, so ``is string`` and ``| tojson`` treat them as the words they hide).
    Calls with the same layout then share an analysis, and special-token text in a key or value is
    plain text like any word's."""
    def hold(value):  # None stays None: to_hf leaves the key out
        return None if value is None else hide(value)

    return tuple((m.role, hide(m.content),
                  tuple((hide(c.name), json.dumps(_hide_json(c.arguments_dict, hide), ensure_ascii=False), hold(c.id))
                        for c in m.tool_calls),
                  m.name, hide(m.reasoning), hold(m.tool_call_id))
                 for m in conv.messages)


def _hide_json(value, hide):
    """A JSON value with ``hide`` applied to every object key and string inside it."""
    if isinstance(value, str):
        return hide(value)
    if isinstance(value, dict):
        return {hide(k): _hide_json(v, hide) for k, v in value.items()}
    if isinstance(value, list):
        return [_hide_json(v, hide) for v in value]
    return value


def _strings(x) -> Iterator[str]:
    """The strings in a (nested) message key, in order."""
    if isinstance(x, str):
        yield x
    elif isinstance(x, tuple):
        for y in x:
            yield from _strings(y)


def _renumber(lead: tuple, rest: tuple) -> tuple[tuple, list[int], int]:
    """The messages ``lead + rest`` with their words renumbered 0, 1, ... in order, each new
    number's old one, and how many numbers the lead took."""
    numbers: list[int] = []
    new: dict[int, int] = {}

    def one(m: re.Match) -> str:
        old = int(m.group(1))
        if old not in new:
            new[old] = len(numbers)
            numbers.append(old)
        return f"{_OPEN}{new[old]}{_CLOSE}"

    def walk(x):
        if isinstance(x, str):
            return _SLOT.sub(one, x) if _OPEN in x else x
        return tuple(walk(y) for y in x) if isinstance(x, tuple) else x

    first = walk(lead)
    base = len(numbers)
    return first + walk(rest), numbers, base


def _messages(key: tuple) -> list[dict]:
    """Messages in the Hugging Face form, as :meth:`Conversation.to_hf` writes them (the same keys,
    in the same order: a template that walks a message's items sees the same thing)."""
    out = []
    for role, content, calls, name, reasoning, call_id in key:
        d: dict = {"role": role, "content": content}
        if reasoning:
            d["reasoning_content"] = reasoning
        if calls:
            d["tool_calls"] = [{"type": "function", **({"id": i} if i is not None else {}),
                                "function": {"name": f, "arguments": json.loads(a)}} for f, a, i in calls]
        if name is not None:
            d["name"] = name
        if call_id is not None:
            d["tool_call_id"] = call_id
        out.append(d)
    return out


def _plain(role: str, content: str) -> tuple:
    """One message of a key: ``role`` saying ``content``, nothing else."""
    return role, content, (), None, "", None


def _labelled(plan: _Plan, ids: list[int], bounds: list[int]) -> Rendered:
    """The tokens of one rendering (piece i has ``ids[bounds[i]:bounds[i+1]]``), labelled."""
    turn, message = [], []
    for p0, p1, t, m in plan.runs:
        turn += [t] * (bounds[p1] - bounds[p0])
        message += [m] * (bounds[p1] - bounds[p0])
    turn_end = [bounds[i + 1] if i >= 0 else -1 for i in plan.turn_end_piece]
    if plan.extra is not None:
        ids = ids + [plan.extra[0]]
        message.append(plan.extra[1])
        turn.append(plan.extra[2])
        turn_end[plan.extra[2]] = len(ids)
    return Rendered(ids, turn, message, turn_end, plan.prefix_stable)


def _fill(plan: _Plan, text: str, words: list[str]) -> list[int] | None:
    """If ``text`` is the plan's rendering with the words put back (as they are, stripped the ways
    templates strip content, or JSON-escaped for ``| tojson``), the length change after each
    sentinel; else None. Exact either way: the text must match, character for character."""
    glue = plan.glue
    put = [words[w] for w in plan.words]
    if len(text) == len(glue[0]) + sum(map(len, plan.glue[1:])) + sum(map(len, put)) and \
            text == "".join(itertools.chain.from_iterable(zip(glue, put))) + glue[-1]:  # the usual case, at C speed
        return [0, *itertools.accumulate(len(w) - n for w, n in zip(put, plan.slot_len))]
    if not text.startswith(glue[0]):
        return None
    pos, cum = len(glue[0]), [0]
    for i, w in enumerate(plan.words):
        raw, after = words[w], glue[i + 1]
        for word in (raw, raw.strip(), raw.strip("\n"), raw.lstrip("\n"), raw.rstrip("\n"),
                     json.dumps(raw, ensure_ascii=False)[1:-1]):
            if text.startswith(word, pos) and text.startswith(after, pos + len(word)):
                break
        else:
            return None
        cum.append(cum[-1] + len(word) - plan.slot_len[i])
        pos += len(word) + len(after)
    return cum if pos == len(text) else None


def _arguments_end(text: str, start: int, end: int, calls: tuple) -> int:
    """Where the last of the calls' arguments, written as a JSON object, ends in ``text[start:end]``
    (``start`` if none is). Their closing quotes and braces are the reply's data, not a terminator:
    GLM-4 ends a call with its arguments, and its terminator is the next role token."""
    wanted = [json.loads(arguments) for _, arguments, _ in calls]
    out, at = start, text.find("{", start, end)
    while wanted and at >= 0:
        try:
            value, stop = _DECODER.raw_decode(text, at)
        except (ValueError, RecursionError):  # not JSON, or nested past Python's limit
            pass
        else:
            if stop <= end and value in wanted:
                out = max(out, stop)
        at = text.find("{", at + 1, end)
    return out


_LAST_CLOSING_TAG = re.compile(r"</([^<>\s/]+)>\s*$")


def _closes_own_tags(tail: str, body: str) -> bool:
    """Whether what a template writes after a reply's last word ends by closing a tag that the
    reply itself opened (GLM-4.5's ``</tool_call>``): that is the reply's data, not an end of turn,
    and the reply then ends with the next role token, as a plain one does. (ChatML's
    ``</tool_call><|im_end|>`` ends with its end-of-turn token.)"""
    m = _LAST_CLOSING_TAG.search(tail)
    return m is not None and f"<{m.group(1)}>" in body + tail[:m.start()]


def _plan_text(plan: _Plan) -> str:
    """The text the plan was cut from: the shape's rendering, sentinels in (the real text, on the slow path)."""
    slots = (f"{_OPEN}{w}{_CLOSE}" for w in plan.words)
    return "".join(itertools.chain.from_iterable(zip(plan.glue, slots))) + plan.glue[-1]


def _spans(plan: _Plan) -> dict[int, tuple[int, int]]:
    """The characters of each reply with an exact span, by turn."""
    out: dict[int, tuple[int, int]] = {}
    for p0, p1, t, _ in plan.runs:
        if t >= 0:
            a, b = out.get(t, (plan.points[p0], plan.points[p1]))
            out[t] = (min(a, plan.points[p0]), max(b, plan.points[p1]))
    return out


def _sentinels_found(value: str, where: str) -> bool:
    """Each word of a hidden value, by its sentinel (blanks and markers are the template's to place)."""
    return all(m.group(0) in where for m in _SLOT.finditer(value))


def _text_finder():
    """``found(value, where)`` for real text: each run of non-blank characters of the value, in order,
    case aside, as it is or JSON-escaped (templates trim, re-space, re-case or ``| tojson`` words;
    they must not drop them). The casefolded ``where`` is kept for the next call (one text, many values)."""
    seen: list[str] = ["", ""]

    def found(value: str, where: str) -> bool:
        if seen[0] is not where:
            seen[:] = [where, where.casefold()]
        hay, at = seen[1], 0
        for run in value.casefold().split():
            i = hay.find(run, at)
            if i < 0:
                run = json.dumps(run, ensure_ascii=False)[1:-1]
                i = hay.find(run, at)
            if i < 0:
                return False
            at = i + len(run)
        return True

    return found
