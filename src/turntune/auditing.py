"""A dataset-wide report of what a training run would see and learn (``turntune audit``).

Every figure is counted from the encoder's own output (the examples, their labels and message
indices) or from the template's rendering, never re-derived by searching the text for markers.
The terminator check is deliberately independent of the template code: a trained reply must end
with a control token (a special token of the tokenizer) in its labels, or the model never learns
to stop.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from turntune.constants import IGNORE_INDEX
from turntune.conversation import Conversation
from turntune.encoding import EncodeOptions, EncodeReport, conversation_error, encode_conversations, render_each
from turntune.errors import TurntuneError
from turntune.example import Example
from turntune.templates.base import Rendered, Template
from turntune.tree_view import tree_mismatches

COST_STRATEGIES = ("expand", "all", "last")
TEMPLATE_ROLE = "template"  # tokens that belong to no message
TURN_BUCKETS = 16  # replies from the 16th on are counted together, as in evaluation.py
# Words a template writes as a role header. Removed before deciding whether a message carries
# text that is neither its content nor markup (a date, a default prompt): only what is left counts.
HEADER_WORDS = ("system", "user", "assistant", "tool", "ipython", "observation", "model", "function")
MAX_LISTED = 5


@dataclass
class StrategyCost:
    examples: int
    tokens: int
    trained_tokens: int


@dataclass
class AddedText:
    """Text the template writes that is not in the data, and in how many conversations."""

    where: str  # "outside messages" or "in <role> messages"
    text: str
    conversations: int


@dataclass
class AuditReport:
    """Everything ``turntune audit`` prints. ``to_dict`` is the ``--json`` output."""

    template: str
    strategy: str
    max_length: int | None
    conversations: int = 0
    messages: int = 0
    rounds: int = 0  # user messages: each opens a round
    replies: int = 0
    tool_call_replies: int = 0
    tokens_by_role: dict[str, int] = field(default_factory=dict)  # whole conversations, rendered once
    trained_by_role: dict[str, int] = field(default_factory=dict)  # in the chosen strategy's examples
    trained_by_turn: dict[str, int] = field(default_factory=dict)  # "1", "2", ..., "16+"
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    replies_trained: int = 0  # (example, reply) pairs with at least one trained token
    terminator_trained: int = 0  # of those: the last trained token is a control token
    terminator_stops: int = 0  # of those: it is one of the template's stop tokens
    unterminated: list[str] = field(default_factory=list)  # the first few, "source: reply k ends with 'x'"
    examples_without_labels: int = 0
    encode: dict[str, int | float] = field(default_factory=dict)  # the EncodeReport's counts
    not_prefix_stable: int = 0
    not_prefix_stable_sources: list[str] = field(default_factory=list)
    prefix_handling: str = ""
    added_text: list[AddedText] = field(default_factory=list)
    format_markers: dict[str, int] = field(default_factory=dict)  # control-only text outside messages
    not_rendered: dict[str, int] = field(default_factory=dict)  # data the template drops or rewrites
    moved: dict[str, int] = field(default_factory=dict)  # content rendered inside another message
    special_in_content: dict[str, dict[str, int]] = field(default_factory=dict)  # string -> count, conversations
    cost: dict[str, StrategyCost] = field(default_factory=dict)
    tree_examples: int = 0  # examples laid out as token trees
    tree_replies_checked: int = 0  # (tree, reply) pairs checked against the reply's expanded sample
    tree_mismatch_count: int = 0
    tree_mismatches: list[str] = field(default_factory=list)  # the first few

    @property
    def terminator_share(self) -> float:
        return self.terminator_trained / self.replies_trained if self.replies_trained else 0.0

    @property
    def ok(self) -> bool:
        """Trainable, nothing refused, every trained reply learns to stop, and every token tree
        trains what real expansion would."""
        return (self.trained_tokens > 0 and self.terminator_trained == self.replies_trained
                and not self.encode.get("skipped") and not self.tree_mismatch_count)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["terminator_share"] = self.terminator_share
        base = self.cost.get("all")
        d["cost_ratio_vs_all"] = {k: v.tokens / base.tokens for k, v in self.cost.items()} if base and base.tokens else {}
        return d


def control_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens: what a terminator must be."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return ids


def special_strings(tokenizer) -> list[str]:
    """The text of every special token, longest first (so a regex union prefers the longest)."""
    out = set(tokenizer.all_special_tokens)
    out.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted(out, key=len, reverse=True)


def audit(conversations: Sequence[Conversation], tokenizer, template: Template,
          options: EncodeOptions = EncodeOptions()) -> AuditReport:
    """Encode ``conversations`` as ``options`` says (and under each strategy, for the cost) and
    count what is trained.

    >>> rep = audit(load_conversations("eval.jsonl").conversations, tok, resolve_template(tok))  # doctest: +SKIP
    >>> rep.terminator_share   # 1.0, or the template loses the end of turn
    """
    convs = list(conversations)
    rep = AuditReport(template.name, options.strategy, options.max_length)
    # A conversation the template refuses is counted (the encode report's skipped) and left out.
    er = EncodeReport()
    rendered = render_each(template, convs)
    for c, r in zip(convs, rendered):
        if isinstance(r, TurntuneError):
            er.refuse(conversation_error(c, r))
    convs, rendered = ([c for c, r in zip(convs, rendered) if not isinstance(r, TurntuneError)],
                       [r for r in rendered if not isinstance(r, TurntuneError)])
    _count_data(rep, convs)
    control = control_ids(tokenizer)
    roles = Counter()
    for c, r in zip(convs, rendered):
        roles.update(c.messages[m].role if m >= 0 else TEMPLATE_ROLE for m in r.message)
    rep.tokens_by_role = dict(roles)
    _template_text(rep, tokenizer, template, convs, rendered, control)
    _special_in_content(rep, tokenizer, convs)

    examples = encode_conversations(convs, template, options, report=er, on_invalid="skip")
    _count_examples(rep, examples, {c.source: c for c in convs}, control, set(template.stop_ids()), tokenizer)
    rep.encode = {k: dict(v) if isinstance(v, dict) else v for k, v in vars(er).items() if not isinstance(v, list)}
    unstable = [c.source for c, r in zip(convs, rendered) if not r.prefix_stable]
    rep.not_prefix_stable = len(unstable)
    rep.not_prefix_stable_sources = unstable[:MAX_LISTED]
    rep.prefix_handling = {
        "last": "only the final reply is trained, from the whole rendering: nothing to slice",
        "full": "every token is trained from the whole rendering: nothing to slice",
    }.get(options.strategy, "each reply rendered with its own history" + (
        ", the samples merged into a token tree where it is exact (else expanded for real)" if options.tree
        else " (expanded for real)") + ", so every trained token is what inference would see")
    _check_trees(rep, examples, convs, template, options)
    for s in COST_STRATEGIES:
        exs = examples if s == options.strategy else encode_conversations(
            convs, template, dataclasses.replace(options, strategy=s), on_invalid="skip")
        rep.cost[s] = StrategyCost(len(exs), sum(len(e) for e in exs), sum(e.n_trained for e in exs))
    return rep


def _check_trees(rep: AuditReport, examples: list[Example], convs: list[Conversation], template: Template,
                 options: EncodeOptions) -> None:
    """Every token tree against real expansion: the conversations laid out as trees are encoded
    again with ``tree=False`` (each reply its own sample), and each reply a tree trains must be its
    sample along its path (``tree_view.tree_mismatches``); a reply the samples train and the trees
    do not is counted too."""
    trees = [ex for ex in examples if ex.is_tree]
    rep.tree_examples = len(trees)
    if not trees:
        return
    sources = {ex.source for ex in trees}
    samples: dict[str, dict[int, Example]] = {}
    for s in encode_conversations([c for c in convs if c.source in sources], template,
                                  dataclasses.replace(options, tree=False), on_invalid="skip"):
        for t in set(s.turn) - {-1}:
            samples.setdefault(s.source, {})[t] = s
    problems: list[str] = []
    trained: dict[str, set[int]] = {}
    for ex in examples:
        if ex.source in sources:
            trained.setdefault(ex.source, set()).update(set(ex.turn) - {-1})
    for ex in trees:
        checked, found = tree_mismatches(ex, samples.get(ex.source, {}))
        rep.tree_replies_checked += checked
        problems += found
    for source in sorted(sources):
        for t in sorted(set(samples.get(source, {})) - trained[source]):
            problems.append(f"{source}: reply {t + 1}: its expanded sample trains it, no tree does")
    rep.tree_mismatch_count = len(problems)
    rep.tree_mismatches = problems[:MAX_LISTED]


def _count_data(rep: AuditReport, convs: list[Conversation]) -> None:
    rep.conversations = len(convs)
    for c in convs:
        rep.messages += len(c.messages)
        rep.rounds += sum(1 for m in c.messages if m.role == "user")
        rep.replies += len(c.assistant_indices)
        rep.tool_call_replies += sum(1 for m in c.messages if m.role == "assistant" and m.tool_calls)


def _count_examples(rep: AuditReport, examples: list[Example], by_source: dict[str, Conversation],
                    control: set[int], stops: set[int], tokenizer) -> None:
    by_role, by_turn = Counter(), Counter()
    for ex in examples:
        conv = by_source[ex.source]
        rep.examples += 1
        rep.tokens += len(ex)
        last: dict[int, int] = {}  # reply -> its last trained position
        for i, lab in enumerate(ex.labels):
            if lab == IGNORE_INDEX:
                continue
            m = ex.message[i] if ex.message else -1
            by_role[conv.messages[m].role if m >= 0 else TEMPLATE_ROLE] += 1
            by_turn[ex.turn[i]] += 1
            last[ex.turn[i]] = i
        rep.trained_tokens += ex.n_trained
        rep.examples_without_labels += ex.n_trained == 0
        for t, i in last.items():
            if t < 0:  # `full` trains user tokens under no reply: not a reply of its own
                continue
            rep.replies_trained += 1
            tok = ex.labels[i]
            if tok in control:
                rep.terminator_trained += 1
            elif len(rep.unterminated) < MAX_LISTED:
                rep.unterminated.append(f"{ex.source}: reply {t + 1} ends with {tokenizer.decode([tok])!r}")
            rep.terminator_stops += tok in stops
    rep.trained_by_role = dict(by_role)
    rep.trained_by_turn = {}
    for t in sorted(k for k in by_turn if k >= 0):
        key = str(t + 1) if t + 1 < TURN_BUCKETS else f"{TURN_BUCKETS}+"
        rep.trained_by_turn[key] = rep.trained_by_turn.get(key, 0) + by_turn[t]
    if by_turn.get(-1):  # `full`: tokens outside every reply
        rep.trained_by_turn["none"] = by_turn[-1]


def _sub(text: str, part: str, repl: str) -> str:
    """Replace whole occurrences of ``part``: a content "Yo" is not the start of "You are".
    (A loop, not a regex: every content is a new pattern, and compiling them dominated the audit.)"""
    def word(c: str) -> bool:
        return c.isalnum() or c == "_"

    out, i = [], 0
    while (j := text.find(part, i)) >= 0:
        k = j + len(part)
        if not ((word(part[0]) and j > 0 and word(text[j - 1])) or (word(part[-1]) and k < len(text) and word(text[k]))):
            out += [text[i:j], repl]
            i = k
        else:
            out.append(text[i:j + 1])
            i = j + 1
    out.append(text[i:])
    return "".join(out)


_HEADER_WORDS = re.compile(r"\b(" + "|".join(HEADER_WORDS) + r")\b")


def _residue(text: str, data: Sequence[str], markup: re.Pattern | None) -> str:
    """``text`` less the ``data`` strings (whole occurrences), ``markup`` matches, header words and blanks."""
    for d in data:
        if d:
            text = _sub(text, d, " ")
    if markup is not None:
        text = markup.sub(" ", text)
    return " ".join(_HEADER_WORDS.sub(" ", text).split())


def _find(content: str, text: str) -> str | None:
    """How ``content`` appears in ``text``: as is, trimmed, or JSON-escaped (``| tojson``); None if not."""
    for form in (content, content.strip(), json.dumps(content.strip(), ensure_ascii=False)[1:-1]):
        if form and form in text:
            return form
    return None


def _template_text(rep: AuditReport, tokenizer, template: Template, convs: list[Conversation],
                   rendered: list[Rendered], control: set[int]) -> None:
    """Find text the template writes that the data does not hold, and data it does not write.

    Each run of tokens of one message (or of none) is decoded. Outside messages, a run of control
    tokens only is a format marker (``[gMASK]<sop>``, BOS), one with other text is added text (a
    default system prompt). Inside a message, what is left once every content of the conversation,
    the tokenizer's added-token strings and role-header words are taken out is added text if it
    holds a letter or digit (a date written into the system turn, a tool-declaration block); it is
    shown as the message's rendering with its content replaced by ``{content}``. Tool-call
    replies are only checked for their function names (their JSON keys would read as added text).

    Not rendered: a content found nowhere in the conversation's rendering (dropped or rewritten,
    e.g. earlier reasoning stripped), a tool call whose name is not in its reply, tool declarations
    whose removal leaves the rendering unchanged. Moved: a content rendered inside another message
    (a system prompt folded into the first user turn).
    """
    added = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.content}, key=len, reverse=True)
    markup = re.compile("|".join(map(re.escape, added))) if added else None  # one pass, longest first
    runs: list[tuple[int, int, list[int]]] = []  # conversation, message (-1: none), ids
    for ci, r in enumerate(rendered):
        start = 0
        for i in range(1, len(r.message) + 1):
            if i == len(r.message) or r.message[i] != r.message[start]:
                runs.append((ci, r.message[start], r.input_ids[start:i]))
                start = i
    texts = tokenizer.batch_decode([ids for _, _, ids in runs], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    whole: dict[int, str] = {}
    own: dict[tuple[int, int], str | None] = {}  # (conversation, message) -> its content as found in its run
    for (ci, m, _), text in zip(runs, texts):
        whole[ci] = whole.get(ci, "") + text
        if m >= 0 and own.get((ci, m)) is None:
            own[ci, m] = _find(convs[ci].messages[m].content, text)
    # contents rendered inside another message (found in the conversation, not in their own run)
    elsewhere: dict[int, list[tuple[str, int]]] = {}
    dropped, moved = Counter(), Counter()
    for (ci, m), form in own.items():
        content = convs[ci].messages[m].content
        if form is None and content.strip():
            if (f := _find(content, whole[ci])) is not None:
                elsewhere.setdefault(ci, []).append((f, m))
            (moved if f is not None else dropped)[f"{convs[ci].messages[m].role} content (messages)"] += 1
    found: dict[tuple[str, str], set[int]] = {}
    markers: dict[str, set[int]] = {}
    for (ci, m, ids), text in zip(runs, texts):
        msg = convs[ci].messages[m] if m >= 0 else None
        if msg is not None:
            if msg.content.strip() and own[ci, m] is None:
                continue  # its own text cannot be told from added text
            dropped["tool calls (replies)"] += any(call.name not in text for call in msg.tool_calls)
            if msg.tool_calls:
                continue
        # The data in it, each with the name it is shown by: the same added text then reads the same.
        data = [(f, "{content}" if j == m else f"{{message {j}}}") for f, j in elsewhere.get(ci, [])]
        if msg is not None and own[ci, m]:
            data.append((own[ci, m], "{content}"))
        if msg is not None and msg.reasoning and (r := _find(msg.reasoning, text)) is not None:
            data.append((r, "{reasoning}"))  # a reply's reasoning is its data too, not added text
        data.sort(key=lambda fp: -len(fp[0]))
        left = _residue(text, [f for f, _ in data], markup)
        if not re.search(r"\w", left):
            if msg is None and all(t in control for t in ids):
                markers.setdefault(text, set()).add(ci)
            continue
        shown = text
        for f, name in data:
            shown = _sub(shown, f, name)
        found.setdefault((f"in {msg.role} messages" if msg else "outside messages", shown), set()).add(ci)
    for c, r in zip(convs, rendered):
        if c.tools:
            dropped["tool declarations (conversations)"] += template.render(
                dataclasses.replace(c, tools=())).input_ids == r.input_ids
    rep.added_text = [AddedText(w, t, len(cs)) for (w, t), cs in sorted(found.items(), key=lambda kv: -len(kv[1]))]
    rep.format_markers = {t: len(cs) for t, cs in markers.items()}
    rep.not_rendered, rep.moved = dict(+dropped), dict(+moved)


def _special_in_content(rep: AuditReport, tokenizer, convs: list[Conversation]) -> None:
    """Special-token strings typed inside message text (both templates encode them as plain text)."""
    strings = special_strings(tokenizer)
    if not strings:
        return
    pattern = re.compile("|".join(map(re.escape, strings)))
    count, where = Counter(), {}
    for ci, c in enumerate(convs):
        for m in c.messages:
            for text in [m.content, *(call.arguments for call in m.tool_calls)]:
                for hit in pattern.findall(text):
                    count[hit] += 1
                    where.setdefault(hit, set()).add(ci)
    rep.special_in_content = {s: {"count": n, "conversations": len(where[s])} for s, n in count.most_common()}
