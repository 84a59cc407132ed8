"""Every token of an encoded example, with what is trained made visible: terminal and HTML views.

The views only read :class:`Example` fields (``input_ids``, ``labels``, ``turn``, ``message``):
what is shown as trained is exactly what the loss sees, never recomputed from the text.
"""
from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass

from turntune.constants import IGNORE_INDEX
from turntune.conversation import Conversation
from turntune.example import Example

NEWLINE = "↵"  # shown before a newline so that trailing newlines and blank lines are visible
OPEN, CLOSE = "«", "»"  # plain-text marks around trained tokens (no colour)
TEMPLATE_ROLE = "template"  # text that belongs to no message
GUTTER = 10
# ANSI SGR codes. Trained tokens alternate two greens so that token boundaries stay visible.
_TRAINED = ("\x1b[30;42m", "\x1b[30;102m")
_SPECIAL = "\x1b[1;35m"
_DIM = "\x1b[2m"
_RESET = "\x1b[0m"


@dataclass
class TokenView:
    id: int
    text: str  # what the token adds to the decoded text (special tokens as themselves)
    label: int
    turn: int
    role: str
    message: int
    special: bool

    @property
    def trained(self) -> bool:
        return self.label != IGNORE_INDEX


@dataclass
class ExampleView:
    """One example: where it came from, its tokens, and the counts printed with it."""

    source: str
    sample: int  # 1-based index among the examples of its conversation
    samples: int
    tokens: list[TokenView]

    @property
    def trained(self) -> int:
        return sum(t.trained for t in self.tokens)

    @property
    def context(self) -> int:
        return len(self.tokens) - self.trained

    @property
    def turns(self) -> list[int]:
        return sorted({t.turn for t in self.tokens if t.trained and t.turn >= 0})

    def header(self) -> str:
        replies = ", ".join(str(t + 1) for t in self.turns) or "none"
        return (f"{self.source}  sample {self.sample}/{self.samples}  tokens {len(self.tokens)}: "
                f"trained {self.trained}, context {self.context}  (replies trained: {replies})")


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded sequence.

    Decoding tokens one by one would break multi-byte characters and lose SentencePiece's leading
    spaces, so each token's text is the difference between decoding a short window ending with
    it and the same window without it. A token that ends inside a character shows nothing; the
    token that completes it shows the whole character.
    """
    wins = [list(ids[max(0, i - 6): i]) for i in range(len(ids))]
    before = tokenizer.batch_decode(wins, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    after = tokenizer.batch_decode([w + [t] for w, t in zip(wins, ids)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    out = []
    for i, (b, a) in enumerate(zip(before, after)):
        b = b.rstrip("\ufffd")  # an unfinished character before this token
        if a.endswith("\ufffd") and i + 1 < len(ids):
            out.append("")  # this token ends inside a character: the next one shows it
        elif a.startswith(b):
            out.append(a[len(b):])
        else:  # a decoder that rewrites earlier text: fall back to the token alone
            out.append(tokenizer.decode([ids[i]], skip_special_tokens=False))
    return out


def build_views(conversations: Sequence[Conversation], examples: Sequence[Example], tokenizer,
                special_ids: set[int]) -> list[ExampleView]:
    """One view per example, in order; ``special_ids`` are shown as control tokens."""
    by_source = {c.source: c for c in conversations}
    per_source: dict[str, int] = {}
    for ex in examples:
        per_source[ex.source] = per_source.get(ex.source, 0) + 1
    seen: dict[str, int] = {}
    views = []
    for ex in examples:
        conv = by_source.get(ex.source)
        seen[ex.source] = seen.get(ex.source, 0) + 1
        texts = token_texts(tokenizer, ex.input_ids)
        msgs = ex.message or [-1] * len(ex)
        tokens = [TokenView(t, txt, lab, turn, conv.messages[m].role if conv is not None and m >= 0 else TEMPLATE_ROLE,
                            m, t in special_ids)
                  for t, txt, lab, turn, m in zip(ex.input_ids, texts, ex.labels, ex.turn, msgs)]
        views.append(ExampleView(ex.source, seen[ex.source], per_source[ex.source], tokens))
    return views


def use_color(choice: str, stream) -> bool:
    """``auto``: colour on a terminal unless NO_COLOR is set (https://no-color.org)."""
    if choice != "auto":
        return choice == "always"
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def _shown(text: str) -> str:
    return text.replace("\n", NEWLINE + "\n").replace("\t", "→")


def render_terminal(views: Sequence[ExampleView], color: bool) -> str:
    """Each example as lines ``role │ tokens``: a new message starts a new line with its role.

    With colour trained tokens have a green background (two alternating shades), special tokens
    are bold magenta. Without colour each run of trained tokens is put between « and ».
    """
    out: list[str] = []
    for v in views:
        out.append((_DIM + v.header() + _RESET) if color else v.header())
        line: list[str] = []
        lines: list[str] = []
        is_open, message, shade = False, None, 0

        def flush(label: str) -> None:
            lines.append(f"{label:>{GUTTER}} │ " + "".join(line))
            line.clear()

        label = ""
        for tok in v.tokens:
            if tok.message != message:  # a role boundary: close marks, start a labelled line
                if is_open:
                    line.append(CLOSE)
                    is_open = False
                if line:  # else the previous token ended with a newline: this line is still free
                    flush(label)
                message, label = tok.message, tok.role
            if not color and tok.trained != is_open:
                line.append(OPEN if tok.trained else CLOSE)
                is_open = tok.trained
            style = ((_TRAINED[shade] if tok.trained else "") + (_SPECIAL if tok.special else "")) if color else ""
            shade ^= tok.trained
            for j, part in enumerate(_shown(tok.text).split("\n")):
                if j:  # a newline inside the token: go on on a new line with an empty gutter
                    flush(label)
                    label = ""
                if part:
                    line.append(style + part + _RESET if style else part)
        if is_open:
            line.append(CLOSE)
        flush(label)
        out.extend(lines)
        out.append("")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.ex{margin:1.5em 0;border-top:1px solid #ccc}
.head{font-weight:600;margin:.6em 0}
.msg{display:flex;margin:2px 0}
.role{flex:0 0 6.5em;font-size:.8em;color:#666;padding-top:.2em}
.body{font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-word;flex:1}
.tok{border-radius:2px}
.tok.tr{background:#a8e6b0}
.tok.tr:nth-child(even){background:#c9f2ce}
.tok.ctx{color:#555}
.tok.sp{color:#9b1f9b;font-weight:700}
.legend span{margin-right:1.2em;padding:0 .3em}
.key.tr{background:#a8e6b0}.key.ctx{color:#555;border:1px solid #ccc}.key.sp{color:#9b1f9b;font-weight:700}
.m-system .role{color:#a65e00}.m-user .role{color:#1f5fa6}.m-assistant .role{color:#1c7d2e}.m-tool .role{color:#7d1c6e}
"""


def render_html(views: Sequence[ExampleView], title: str) -> str:
    """One self-contained page: inline CSS, no script, no external asset. Each token is one
    ``<span class="tok ...">`` whose ``title`` (the tooltip) holds its id, label, turn and role."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
        '<p class="legend"><span class="key tr">trained (label = token id)</span>'
        '<span class="key ctx">context (label -100)</span><span class="key sp">special token</span>'
        f"<span>{NEWLINE} newline</span><span>hover a token: id, label, turn</span></p>",
    ]
    for v in views:
        parts.append(f'\n<section class="ex"><div class="head">{e(v.header())}</div>')
        message = None
        for tok in v.tokens:
            if tok.message != message:
                if message is not None:
                    parts.append("</span></div>")
                message = tok.message
                parts.append(f'<div class="msg m-{e(tok.role)}"><span class="role">{e(tok.role)}'
                             f'{"" if tok.message < 0 else f" #{tok.message}"}</span><span class="body">')
            cls = "tok " + ("tr" if tok.trained else "ctx") + (" sp" if tok.special else "")
            tip = (f"id {tok.id} · label {tok.label}{'' if tok.trained else ' (not trained)'}"
                   f" · turn {tok.turn if tok.turn >= 0 else '-'} · {tok.role}")
            parts.append(f'<span class="{cls}" title="{e(tip)}">{e(_shown(tok.text))}</span>')
        if message is not None:
            parts.append("</span></div>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "".join(parts)  # no newline between tokens: the body keeps whitespace as written
