"""Every token of an encoded example, with what is trained made visible: terminal and HTML views;
and the audit report as plain-text tables.

The views only read :class:`Example` fields (``input_ids``, ``labels``, ``turn``, ``message``, and
for a token tree ``tree_end`` and ``position_ids``): what is shown as trained is exactly what the
loss sees, never recomputed from the text. A token tree is shown as a tree (``tree_view.py``): the
shared history once, then each branch, nested under the token it forks after and labelled by the
replies it trains.
"""
from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from turntune.auditing import MAX_LISTED, AuditReport
from turntune.constants import IGNORE_INDEX
from turntune.conversation import Conversation
from turntune.example import Example
from turntune.tree_view import Segment, parents, segments

NEWLINE = "↵"  # shown before a newline so that trailing newlines and blank lines are visible
OPEN, CLOSE = "«", "»"  # plain-text marks around trained tokens (no colour)
TEMPLATE_ROLE = "template"  # text that belongs to no message
GUTTER = 10
INDENT = "    "  # per level of a token tree's branches
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
    tree: list[Segment] | None = None  # a token tree's segments (roots); None: a plain sequence
    positions: list[int] | None = None  # a token tree's position ids
    reasoning: dict[int, str] = field(default_factory=dict)  # reply index -> its reasoning text

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
        shape = ""
        if self.tree is not None:
            n = sum(1 for root in self.tree for _ in root.walk()) - len(self.tree)
            shape = f"token tree ({n} branches)  "
        return (f"{self.source}  sample {self.sample}/{self.samples}  {shape}tokens {len(self.tokens)}: "
                f"trained {self.trained}, context {self.context}  (replies trained: {replies})")

    def branch_title(self, seg: Segment, number: str) -> str:
        """What a segment of a tree is: the history (the root), or a branch by the replies it
        trains, where it forks, and whether its first token repeats a sibling's."""
        below = seg.below()
        if not number:
            what = "shared history" + (f", trains {_replies(seg.turns)}" if seg.turns else "")
        elif seg.turns:
            text = "".join(t.text for t in self.tokens[seg.start:seg.stop])
            thinks = [t for t in seg.turns if self.reasoning.get(t) and self.reasoning[t].strip() in text]
            what = f"branch {number}: {_replies(seg.turns)}" + (
                " with its reasoning" if len(seg.turns) == 1 and thinks else
                f" (reasoning of {_replies(thinks)})" if thinks else "")
            if [t for t in below if t not in seg.turns]:
                what += f", then {_replies([t for t in below if t not in seg.turns])} below"
        else:
            what = f"branch {number}: history shared by {_replies(below)}" if below else f"branch {number}: context"
        span = f"tokens {seg.start}-{seg.stop - 1}"
        if seg.fork >= 0 and self.positions is not None:
            f = seg.fork
            span += f"; forks after token {f} {self.tokens[f].text!r} (position {self.positions[f]})"
            if seg.copy:
                span += f"; its first token repeats token {f + 1}"
        return f"{what}  [{span}]"


def token_texts(tokenizer, ids: Sequence[int], parent: Sequence[int] | None = None) -> list[str]:
    """The text each token adds to the decoded sequence.

    Decoding tokens one by one would break multi-byte characters and lose SentencePiece's leading
    spaces, so each token's text is the difference between decoding a short window ending with
    it and the same window without it. A token that ends inside a character shows nothing; the
    token that completes it shows the whole character. In a token tree (``parent``: each token's
    parent, ``tree_view.parents``) the window is the token's own ancestors, not the row before it.
    """
    if parent is None:
        wins = [list(ids[max(0, i - 6): i]) for i in range(len(ids))]
    else:
        wins = []
        for i in range(len(ids)):
            win, q = [], parent[i]
            while q >= 0 and len(win) < 6:
                win.append(ids[q])
                q = parent[q]
            wins.append(win[::-1])
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
        texts = token_texts(tokenizer, ex.input_ids, parents(ex.tree_end) if ex.is_tree else None)
        msgs = ex.message or [-1] * len(ex)
        tokens = [TokenView(t, txt, lab, turn, conv.messages[m].role if conv is not None and m >= 0 else TEMPLATE_ROLE,
                            m, t in special_ids)
                  for t, txt, lab, turn, m in zip(ex.input_ids, texts, ex.labels, ex.turn, msgs)]
        reasoning = {k: conv.messages[i].reasoning for k, i in enumerate(conv.assistant_indices)} if conv else {}
        views.append(ExampleView(ex.source, seen[ex.source], per_source[ex.source], tokens,
                                 segments(ex) if ex.is_tree else None, ex.position_ids, reasoning))
    return views


def _replies(turns: Sequence[int]) -> str:
    return ("reply " if len(turns) == 1 else "replies ") + ", ".join(str(t + 1) for t in turns)


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
    are bold magenta. Without colour each run of trained tokens is put between « and ». A token
    tree shows its shared history, then each branch under a title line, indented one level per
    branch it hangs from.
    """
    out: list[str] = []
    for v in views:
        out.append((_DIM + v.header() + _RESET) if color else v.header())
        if v.tree is None:
            out.extend(_token_lines(v.tokens, color))
        else:
            for root in v.tree:
                for seg, depth, number in root.walk():
                    indent = INDENT * depth
                    title = ("└─ " if depth else "") + v.branch_title(seg, number)
                    out.append(indent + ((_DIM + title + _RESET) if color else title))
                    pad = indent + ("   " if depth else "")
                    out.extend(pad + line for line in _token_lines(v.tokens[seg.start:seg.stop], color))
        out.append("")
    return "\n".join(out)


def _token_lines(tokens: Sequence[TokenView], color: bool) -> list[str]:
    """``tokens`` as lines ``role │ text``, trained ones marked (see :func:`render_terminal`)."""
    line: list[str] = []
    lines: list[str] = []
    is_open, message, shade = False, None, 0

    def flush(label: str) -> None:
        lines.append(f"{label:>{GUTTER}} │ " + "".join(line))
        line.clear()

    label = ""
    for tok in tokens:
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
    return lines


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
.branch{margin:.4em 0 .4em 1.6em;padding-left:.6em;border-left:3px solid #8fb8e0}
.bhead{font-size:.85em;color:#1f5fa6;margin:.3em 0}
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
        if v.tree is None:
            parts.extend(_html_tokens(v, 0, len(v.tokens)))
        for root in v.tree or []:
            parts.extend(_html_segment(v, root, ""))
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "".join(parts)  # no newline between tokens: the body keeps whitespace as written


def _html_segment(v: ExampleView, seg: Segment, number: str) -> list[str]:
    """A tree segment and, nested inside it, the branches that fork from its end."""
    e = html.escape
    out = [f'<div class="{"branch" if number else "trunk"}"><div class="bhead">{e(v.branch_title(seg, number))}</div>']
    out += _html_tokens(v, seg.start, seg.stop)
    for i, child in enumerate(seg.children, 1):
        out += _html_segment(v, child, f"{number}.{i}" if number else str(i))
    out.append("</div>")
    return out


def _html_tokens(v: ExampleView, start: int, stop: int) -> list[str]:
    """Tokens ``start..stop-1`` of a view: one line per message, one span per token."""
    e = html.escape
    parts: list[str] = []
    message = None
    for i in range(start, stop):
        tok = v.tokens[i]
        if tok.message != message:
            if message is not None:
                parts.append("</span></div>")
            message = tok.message
            parts.append(f'<div class="msg m-{e(tok.role)}"><span class="role">{e(tok.role)}'
                         f'{"" if tok.message < 0 else f" #{tok.message}"}</span><span class="body">')
        cls = "tok " + ("tr" if tok.trained else "ctx") + (" sp" if tok.special else "")
        tip = (f"id {tok.id} · label {tok.label}{'' if tok.trained else ' (not trained)'}"
               f" · turn {tok.turn if tok.turn >= 0 else '-'} · {tok.role}"
               + (f" · position {v.positions[i]}" if v.positions is not None else ""))
        parts.append(f'<span class="{cls}" title="{e(tip)}">{e(_shown(tok.text))}</span>')
    if message is not None:
        parts.append("</span></div>")
    return parts


def tree_line(counts: dict) -> str | None:
    """The token trees of an encode report (its counts, ``vars(EncodeReport)``): how many
    conversations became trees and what they save against real expansion; None if none needed one."""
    n = counts.get("not_prefix_stable", 0)
    if not n:
        return None
    trees, tokens, expanded = counts.get("trees", 0), counts.get("tree_tokens", 0), counts.get("tree_expanded_tokens", 0)
    saving = (f" ({tokens:,} tokens vs {expanded:,} expanded for real: {tokens / expanded:.2f}x, "
              f"{expanded - tokens:,} tokens saved)") if expanded else ""
    return (f"not prefix-stable {n}: as token trees {trees}{saving}; expanded for real {n - trees} "
            f"(tree not exact {counts.get('tree_fallbacks', 0)})")


# -- the audit report as text ---------------------------------------------------------------
def _short(text: str, width: int = 100) -> str:
    text = repr(text)[1:-1]  # newlines and tabs visible
    return text if len(text) <= width else text[: width - 1] + "…"


def format_report(rep: AuditReport, source: str = "") -> str:
    """The report as plain-text tables (what ``turntune audit`` prints)."""
    pct = lambda a, b: f"{a / b:.1%}" if b else "-"  # noqa: E731
    out = [f"audit {source}  template {rep.template}  strategy {rep.strategy}  max_length {rep.max_length}", "",
           f"data: conversations {rep.conversations}, messages {rep.messages}, rounds {rep.rounds}, "
           f"replies {rep.replies} (tool calls {rep.tool_call_replies})", "",
           f"{'role':12}{'tokens':>10}{'trained':>10}{'share':>8}   (tokens: whole conversations as rendered)"]
    roles = list(dict.fromkeys([*rep.tokens_by_role, *rep.trained_by_role]))
    for role in roles:
        n, t = rep.tokens_by_role.get(role, 0), rep.trained_by_role.get(role, 0)
        out.append(f"{role:12}{n:>10,}{t:>10,}{pct(t, n):>8}")
    out.append(f"{'total':12}{sum(rep.tokens_by_role.values()):>10,}{rep.trained_tokens:>10,}")
    out += ["", "trained tokens by reply: " + "  ".join(f"{k}: {v:,}" for k, v in rep.trained_by_turn.items())]
    out += ["", f"terminators: {rep.terminator_trained} of {rep.replies_trained} trained replies end with a trained "
                f"control token ({pct(rep.terminator_trained, rep.replies_trained)}; must be 100%); "
                f"{rep.terminator_stops} end with a stop token"]
    out += [f"  not terminated: {u}" for u in rep.unterminated]
    e = rep.encode
    out += ["", f"examples {rep.examples} ({rep.tokens:,} tokens); examples with no trained token "
                f"{rep.examples_without_labels}; conversations left with nothing to train "
                f"{e.get('conversations_without_labels', 0)}",
            f"truncation: history rounds dropped {e.get('history_rounds_dropped', 0)}, replies cut "
            f"{e.get('replies_cut', 0)}, replies lost (too long even alone) {e.get('replies_lost', 0)}, "
            f"extra windows {e.get('windows', 0)}",
            *[f"REFUSED {n} conversations ({rule}): " + "; ".join(e.get("skip_examples", {}).get(rule, []))
              for rule, n in sorted(e.get("skipped", {}).items())],
            f"not prefix-stable: {rep.not_prefix_stable} of {rep.conversations}"
            + (f" ({', '.join(rep.not_prefix_stable_sources)}{', ...' if rep.not_prefix_stable > MAX_LISTED else ''});"
               f" handled: {rep.prefix_handling}" if rep.not_prefix_stable else "")]
    if (line := tree_line(e)) is not None:
        out.append(line)
    if rep.tree_examples:
        out.append(f"token trees: {rep.tree_examples} examples; each trained reply's path checked against its "
                   f"expanded sample: {rep.tree_replies_checked} replies, {rep.tree_mismatch_count} problems "
                   "(must be 0)")
        out += [f"  TREE NOT EXACT: {m}" for m in rep.tree_mismatches]
    out += ["", "text the template adds (not in the data):" + ("" if rep.added_text else " none")]
    out += [f"  {a.where}, {a.conversations} conversations: {_short(a.text)}" for a in rep.added_text[:MAX_LISTED]]
    if len(rep.added_text) > MAX_LISTED:
        out.append(f"  ... {len(rep.added_text) - MAX_LISTED} more distinct texts (see --json)")
    out += [f"  WARNING: not rendered as given: {what}: {n}" for what, n in rep.not_rendered.items()]
    out += [f"  rendered inside another message: {what}: {n}" for what, n in rep.moved.items()]
    if rep.format_markers:
        out.append("  format markers: " + ", ".join(f"{_short(t)} ({n})" for t, n in rep.format_markers.items()))
    out += ["", "special-token strings inside content (encoded as plain text):" + ("" if rep.special_in_content else " none")]
    out += [f"  {s}: {v['count']} times in {v['conversations']} conversations" for s, v in rep.special_in_content.items()]
    base = rep.cost.get("all")
    out += ["", f"{'strategy':12}{'examples':>10}{'tokens':>12}{'trained':>10}{'vs all':>8}   (cost per epoch)"]
    for s, c in rep.cost.items():
        ratio = f"{c.tokens / base.tokens:.2f}x" if base and base.tokens else "-"
        out.append(f"{s:12}{c.examples:>10,}{c.tokens:>12,}{c.trained_tokens:>10,}{ratio:>8}")
    return "\n".join(out)
