"""Conversation → training examples: the one place that decides which tokens are trained.

Every chat format renders a whole conversation once (a :class:`Rendered`: ids, and for each
token the assistant turn whose target it is). The strategies then only *slice* that rendering:

- ``all``: one sequence, every reply trained.
- ``expand``: one sequence per reply k, ending with k's terminator, only reply k trained. Under a
  prefix-stable template this is exactly ``input_ids[:turn_end[k]]`` of ``all``, which is why
  ``all`` with ``turn`` weighting has exactly ``expand``'s loss (DESIGN.md §1).
- ``last``: one sequence, only the final reply trained.
- ``full``: every token trained, user turns too (for comparison; warns).

Where slicing would not be exact, the conversation is rendered again: conversations whose
rendering is not prefix-stable (templates that drop earlier reasoning) are rendered per reply and
those samples merged into a token tree (``tree.py``; one sequence, the shared history once, each
reply with its reasoning a branch), or expanded for real with ``tree=False`` or where a tree cannot
be exact; conversations longer than
``max_length`` become windows of whole rounds (``all``) or lose their oldest rounds of history
(``expand``/``last``). Every such event is counted in an :class:`EncodeReport`.

A reply with ``weight`` 0 is context in every strategy: it is rendered, never labelled, and
``expand`` makes no sample for it. An error while encoding one conversation (a template that
refuses it, drops what it says, or gives no exact span) is that conversation's error: it stops
the run (``on_invalid="error"``) naming the record and the rule, or the conversation is skipped
and counted (``"skip"``), never the end of the whole data set.
"""
from __future__ import annotations

import contextlib
import gc
import json
import statistics
import threading
import warnings
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from turntune.constants import IGNORE_INDEX
from turntune.conversation import Conversation
from turntune.arrow_files import without_nulls
from turntune.data import FORMATS, DataReport, Format, OnInvalid, validate_chunk
from turntune.errors import ConfigError, DataError, TemplateError, TurntuneError
from turntune.example import Example
from turntune.templates.base import Rendered, Template
from turntune.tree import trees_of

Strategy = Literal["all", "expand", "last", "full"]
Weighting = Literal["token", "turn", "sample"]
TemplateName = Literal["auto", "glm4", "hf"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
# encode_batch's output: Example fields, and ``row`` (the input row each example comes from).
# The first seven by default; ``message`` (per token) is for inspecting and auditing.
BATCH_COLUMNS: tuple[str, ...] = ("input_ids", "labels", "weight", "turn", "position_ids", "tree_end", "row",
                                  "source", "n_turns", "message")


def check_choice(setting: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(f"{setting}: unknown value {value!r}; valid values: {', '.join(valid)}")


# What a chat template already gets on every render: template kwargs may not replace it.
RESERVED_TEMPLATE_NAMES = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "unk_token",
                           "sep_token", "pad_token", "cls_token", "mask_token")


def check_template_kwargs(kwargs: dict, setting: str = "template_kwargs") -> None:
    """Extra chat-template variables: names a template can read, JSON values (they are part of
    the encoded-data cache's key), none of the names every render already sets."""
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{setting}: expected a mapping such as {{clear_thinking: false}}, got {kwargs!r}")
    for name, value in kwargs.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{setting}: {name!r} is not a template variable name (letters, digits, _)")
        if name in RESERVED_TEMPLATE_NAMES:
            raise ConfigError(f"{setting}: {name!r} is set by turntune on every render; valid names are any "
                              f"others (reserved: {', '.join(RESERVED_TEMPLATE_NAMES)})")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ConfigError(f"{setting}: {name}: {value!r} is not a plain value (use true/false, numbers, "
                              "strings, lists or mappings of them)") from None


def resolve_template(tokenizer, template: str | Template = "auto", chat_template: str | None = None,
                     template_kwargs: dict | None = None) -> Template:
    """``auto``: the native GLM-4 format when the tokenizer has GLM-4's special tokens and no
    reasoning tokens (glm-4-9b-chat), else the tokenizer's own Jinja ``chat_template``: GLM-4.5+
    tokenizers carry ``</think>`` and their template renders reasoning, which the native format
    has no place for. ``template_kwargs``: extra variables for the Jinja template on every render
    (``{"clear_thinking": False}``); the native format has none to take."""
    if not isinstance(template, str):
        return template
    check_choice("template", template, get_args(TemplateName))
    kwargs = dict(template_kwargs or {})
    check_template_kwargs(kwargs)
    from turntune.templates.glm4 import GLM4Template

    def thinks() -> bool:
        i = tokenizer.convert_tokens_to_ids("</think>")
        return i is not None and tokenizer.convert_ids_to_tokens(i) == "</think>"

    native = GLM4Template.applies_to(tokenizer) and not (getattr(tokenizer, "chat_template", None) and thinks())
    if template == "glm4" or (template == "auto" and chat_template is None and native):
        if kwargs:
            raise ConfigError(f"template_kwargs {kwargs}: the native glm4 format renders no Jinja template, so "
                              "it has nothing to pass them to; use template hf (the tokenizer's chat_template or "
                              "data.chat_template), or remove them")
        return GLM4Template(tokenizer)
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "template: the tokenizer has no chat_template and no native format applies "
            "(native formats: glm4); give data.chat_template (a Jinja file) or use a chat model's tokenizer")
    from turntune.templates.hf import HFTemplate

    return HFTemplate(tokenizer, chat_template=chat_template, template_kwargs=kwargs)


# -- templates built for encode() -----------------------------------------------------------------
# encode() is called once per conversation (a ``datasets.map`` function). Building its template
# there each time (Jinja compile, the shape analysis started cold) was half of its time, so the
# templates it resolves are kept per tokenizer. Weak keys: a tokenizer's templates go when it
# does; the templates hold the tokenizer through a weak proxy, else an entry would keep its own
# key alive. The key holds the tokenizer's state that a template reads (chat template, vocabulary
# size, special-token strings), so a tokenizer changed in place gets a new template, and the thread:
# a template's shape caches are not thread-safe.
_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TEMPLATES_PER_TOKENIZER = 8  # (template, chat_template, state, thread) kept per tokenizer, oldest out


def _tokenizer_state(tokenizer) -> tuple:
    """What a resolved template read from ``tokenizer`` (see :func:`resolve_template`)."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates
        source = tuple(sorted(source.items()))
    specials = getattr(tokenizer, "special_tokens_map", {})
    return source, len(tokenizer), tuple((k, v) for k, v in specials.items() if isinstance(v, str))


def template_for(tokenizer, template: str | Template = "auto", chat_template: str | None = None,
                 template_kwargs: dict | None = None) -> Template:
    """:func:`resolve_template`, built once per tokenizer, choice, template kwargs, tokenizer state
    and thread (see above); a :class:`Template` object is returned as it is."""
    if not isinstance(template, str):
        return template
    try:
        kept = _TEMPLATES.get(tokenizer)
        if kept is None:
            kept = _TEMPLATES[tokenizer] = {}
    except TypeError:  # not weakly referenceable or not hashable: build it every time
        return resolve_template(tokenizer, template, chat_template, template_kwargs)
    kwargs = json.dumps(template_kwargs or {}, sort_keys=True, default=repr)  # values may be unhashable
    key = (template, chat_template, kwargs, _tokenizer_state(tokenizer), threading.get_ident())
    found = kept.get(key)
    if found is None:
        found = resolve_template(weakref.proxy(tokenizer), template, chat_template, template_kwargs)
        if len(kept) >= _TEMPLATES_PER_TOKENIZER:
            del kept[next(iter(kept))]
        kept[key] = found
    return found


# -- the report ---------------------------------------------------------------------------------
@dataclass
class EncodeReport:
    """What encoding did to the data, so that nothing is lost silently."""

    conversations: int = 0
    examples: int = 0
    replies: int = 0
    replies_trained: int = 0
    replies_lost: int = 0  # a reply that cannot fit max_length even with no history (not cut)
    replies_cut: int = 0  # cut at max_length because the user asked for it
    replies_excluded: int = 0  # weight 0 in the data: context only, by the user's choice
    windows: int = 0  # sequences made by splitting long conversations (all), beyond the first
    history_rounds_dropped: int = 0  # expand/last: oldest whole rounds dropped to fit
    not_prefix_stable: int = 0  # conversations rendered per reply because slicing is not exact
    trees: int = 0  # of those, conversations laid out as token trees (tree.py)
    tree_fallbacks: int = 0  # of those, expanded for real because a tree could not be exact
    tree_tokens: int = 0  # tokens of those trees
    tree_expanded_tokens: int = 0  # tokens the same samples take expanded for real
    conversations_without_labels: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    reply_tokens: int = 0  # target tokens of the replies the strategy means to train (weight 1; last: the last)
    reply_tokens_trained: int = 0
    history_seen: list[int] = field(default_factory=list)  # context tokens before each trained reply
    skipped: Counter = field(default_factory=Counter)  # rule -> conversations refused (on_invalid=skip)
    skip_examples: dict[str, list[str]] = field(default_factory=dict)  # rule -> first error texts

    @property
    def reply_tokens_lost(self) -> int:
        """Reply tokens meant to be trained that no example trains (too long; cut)."""
        return self.reply_tokens - self.reply_tokens_trained

    @property
    def lost_share(self) -> float:
        return self.reply_tokens_lost / self.reply_tokens if self.reply_tokens else 0.0

    def merge(self, other: "EncodeReport") -> None:
        for name, value in vars(other).items():
            if not value:  # most counts of one conversation are 0 (merged once per conversation)
                continue
            if type(value) is int:
                setattr(self, name, getattr(self, name) + value)
            elif isinstance(value, dict) and not isinstance(value, Counter):
                for key, texts in value.items():
                    getattr(self, name).setdefault(key, []).extend(texts)
            elif isinstance(value, list):
                getattr(self, name).extend(value)
            else:
                setattr(self, name, getattr(self, name) + value)

    def refuse(self, err: DataError) -> None:
        """Count a conversation skipped for ``err`` (keeping the first few texts per rule)."""
        self.skipped[err.rule] += 1
        kept = self.skip_examples.setdefault(err.rule, [])
        if len(kept) < _MAX_EXAMPLES:
            kept.append(str(err))

    def headline(self) -> str:
        """One line: what share of the reply tokens meant to be trained is lost, if any."""
        share = self.reply_tokens_trained / self.reply_tokens if self.reply_tokens else 0.0
        skipped = sum(self.skipped.values())
        parts = []
        if self.reply_tokens_lost:
            parts.append(f"LOST {self.lost_share:.1%} of reply tokens ({self.replies_lost} of "
                         f"{self.replies - self.replies_excluded} replies too long for max_length,"
                         f" {self.replies_cut} cut; reply tokens trained {share:.1%})")
        if skipped:
            parts.append(f"LOST {skipped} of {skipped + self.conversations} conversations (skipped: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) + ")")
        return "; ".join(parts) or f"reply tokens trained {share:.1%} (nothing lost)"

    def summary(self) -> str:
        h = sorted(self.history_seen)
        med = statistics.median(h) if h else 0
        p10 = h[len(h) // 10] if h else 0
        share = self.reply_tokens_trained / self.reply_tokens if self.reply_tokens else 0.0
        lines = [
            self.headline(),
            f"conversations {self.conversations}  ->  examples {self.examples}"
            f" (extra windows {self.windows})",
            f"tokens {self.tokens:,}  trained {self.trained_tokens:,}"
            f" ({self.trained_tokens / max(self.tokens, 1):.1%} of tokens)",
            f"replies {self.replies}: trained {self.replies_trained}, lost (too long) {self.replies_lost},"
            f" cut {self.replies_cut}" + (f", weight 0 (context only) {self.replies_excluded}" if self.replies_excluded
                                          else "") + f"; reply tokens trained {share:.1%}",
            f"history: rounds dropped {self.history_rounds_dropped}; tokens seen per reply median {med:.0f},"
            f" p10 {p10}",
            f"not prefix-stable {self.not_prefix_stable}: as token trees {self.trees}"
            f" ({self.tree_tokens:,} tokens vs {self.tree_expanded_tokens:,} expanded,"
            f" {self.tree_tokens / max(self.tree_expanded_tokens, 1):.2f}x), expanded for real"
            f" {self.not_prefix_stable - self.trees} (tree not exact {self.tree_fallbacks});"
            f" conversations with nothing to train {self.conversations_without_labels}",
        ]
        for rule, n in sorted(self.skipped.items()):
            lines.append(f"skipped {rule}: {n}")
            lines.extend(f"  {text}" for text in self.skip_examples.get(rule, []))
        return "\n".join(lines)


_MAX_EXAMPLES = 3  # error texts kept per rule in an EncodeReport


def check_lost(report: EncodeReport, max_lost_share: float, loaded=None) -> None:
    """Stop a run that would lose more than ``max_lost_share`` of what it was given: of the reply
    tokens meant to be trained, or of the conversations (skipped while loading, ``loaded`` a
    :class:`~turntune.data.DataReport`, or while encoding)."""
    fix = "or raise data.max_lost_share (1.0 turns this check off)"
    if report.lost_share > max_lost_share:
        raise TurntuneError(
            f"data.max_lost_share={max_lost_share:g}: this run would lose {report.lost_share:.1%} of the reply tokens "
            f"({report.replies_lost} replies too long for max_length, {report.replies_cut} cut); raise "
            f"data.max_length, set data.cut_long_replies=true, {fix}")
    skipped = sum(report.skipped.values()) + (loaded.n_skipped if loaded is not None else 0)
    total = skipped + report.conversations
    if total and skipped / total > max_lost_share:
        rules = Counter(report.skipped) + (Counter(loaded.skipped) if loaded is not None else Counter())
        raise TurntuneError(
            f"data.max_lost_share={max_lost_share:g}: {skipped} of {total} conversations were skipped ("
            + ", ".join(f"{k} {v}" for k, v in sorted(rules.items())) + f"); fix the data (the report names "
            f"the records), {fix}")


@dataclass
class LossShares:
    """Where a weighting puts the loss: for each reply index (1, 2, ..., ``buckets``+) and each kind
    of reply, its share of the trained tokens and its share of the summed token weights, i.e. of
    the loss of the whole data taken as one batch (a step's shares vary with what it holds).
    Under ``token`` the two shares are equal; ``turn`` gives each reply the same share, ``sample``
    each conversation."""

    weighting: str
    per_turn: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # token share, loss share, replies
    per_kind: dict[str, tuple[float, float, int]] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"weighting {self.weighting}: share of the trained tokens -> share of the loss"]
        rows = [(f"reply {k}", v) for k, v in self.per_turn.items()] + list(self.per_kind.items())
        for label, (tok, loss, n) in rows:
            lines.append(f"  {label:<12}{tok:>7.1%} -> {loss:>6.1%}   {n} {'reply' if n == 1 else 'replies'}")
        return "\n".join(lines)


def loss_shares(examples: Iterable[Example], weighting: str, kinds: dict[tuple[str, int], str] | None = None,
                buckets: int = 16) -> LossShares:
    """The :class:`LossShares` of encoded ``examples``, from the weights they carry (``weighting``:
    the policy they were encoded with, named in the summary); ``kinds`` maps (source, reply index)
    to a kind of reply (``evaluate.turn_kinds``). Tokens trained outside any reply (``full``'s
    user turns) are the row ``other``."""
    tokens: Counter = Counter()
    weight: Counter = Counter()
    replies: dict[str, set] = {}
    kind_tokens: Counter = Counter()
    kind_weight: Counter = Counter()
    kind_replies: dict[str, set] = {}
    for ex in examples:
        for t, lab, w in zip(ex.turn, ex.labels, ex.weight):
            if lab == IGNORE_INDEX:
                continue
            key = "other" if t < 0 else (f"{buckets}+" if t >= buckets - 1 else str(t + 1))
            tokens[key] += 1
            weight[key] += w
            replies.setdefault(key, set()).add((ex.source, t))
            if kinds is not None and t >= 0:
                kind = kinds.get((ex.source, t), "answer")
                kind_tokens[kind] += 1
                kind_weight[kind] += w
                kind_replies.setdefault(kind, set()).add((ex.source, t))
    n, total = sum(tokens.values()) or 1, sum(weight.values()) or 1.0
    order = sorted(tokens, key=lambda k: (k == "other", int(k.rstrip("+")) if k != "other" else 0))
    return LossShares(
        weighting,
        {k: (tokens[k] / n, weight[k] / total, len(replies[k])) for k in order},
        {k: (kind_tokens[k] / n, kind_weight[k] / total, len(kind_replies[k])) for k in sorted(kind_tokens)})


# -- public entry points ------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodeOptions:
    strategy: Strategy = "all"
    weighting: Weighting = "token"
    max_length: int | None = None
    cut_long_replies: bool = False
    history_fraction: float = 0.3
    tree: bool = True  # not prefix-stable: one token tree per conversation (False: expand for real)

    def __post_init__(self) -> None:
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError(f"max_length: {self.max_length} is too small (at least 8)")
        if not 0.0 <= self.history_fraction < 1.0:
            raise ConfigError(f"history_fraction: {self.history_fraction} must be in [0, 1)")


def encode(
    messages: Conversation | list[dict],
    tokenizer,
    *,
    template: str | Template = "auto",
    chat_template: str | None = None,
    strategy: Strategy = "all",
    weighting: Weighting = "token",
    max_length: int | None = None,
    cut_long_replies: bool = False,
    history_fraction: float = 0.3,
    tools: list[dict] | None = None,
    report: EncodeReport | None = None,
    template_kwargs: dict | None = None,
) -> list[Example]:
    """Encode one conversation into training examples with ``tokenizer`` (the model's Hugging Face
    tokenizer) and ``template`` (``auto``: native GLM-4 for GLM-4 tokenizers, else the tokenizer's
    chat template, or ``chat_template``: the text of a Jinja template to use instead). ``tools``:
    the tools the conversation declares (OpenAI's function schemas), for messages given as dicts.
    ``template_kwargs`` go to the Jinja template on every render, as ``apply_chat_template``'s
    keyword arguments do (``{"clear_thinking": False}`` keeps GLM-4.7's reasoning in the history).

    Made to be called once per conversation: the template is built on the first call and kept
    for the tokenizer (rebuilt if the tokenizer's chat template or vocabulary changes). For many
    conversations at once (``datasets.map(batched=True)``), :func:`encode_batch`.

    >>> [ex] = encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tok)  # doctest: +SKIP
    >>> tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100])  # doctest: +SKIP
    '\\nHello!<|user|>'
    """
    if tokenizer is None:
        raise ConfigError("encode: tokenizer is None; pass the model's tokenizer "
                          "(turntune.load_tokenizer(folder), or transformers.AutoTokenizer.from_pretrained)")
    if isinstance(messages, Conversation):
        if tools is not None:
            raise ConfigError("encode: tools are given with the messages as dicts; a Conversation carries its own "
                              "(Conversation(messages, tools=...), or pass the messages as dicts)")
    else:
        from turntune.data import parse_record

        messages = parse_record({"messages": messages, "tools": tools}, source="<messages>")
    tmpl = template_for(tokenizer, template, chat_template, template_kwargs)
    opts = EncodeOptions(strategy, weighting, max_length, cut_long_replies, history_fraction)
    return encode_conversations([messages], tmpl, opts, report=report)


def encode_batch(
    batch: Mapping[str, Sequence],
    tokenizer,
    *,
    template: str | Template = "auto",
    chat_template: str | None = None,
    strategy: Strategy = "all",
    weighting: Weighting = "token",
    max_length: int | None = None,
    cut_long_replies: bool = False,
    history_fraction: float = 0.3,
    format: Format = "auto",
    on_invalid: OnInvalid = "error",
    indices: Sequence[int] | None = None,
    columns: Sequence[str] = BATCH_COLUMNS[:7],
    report: EncodeReport | None = None,
    data_report: DataReport | None = None,
    template_kwargs: dict | None = None,
) -> dict[str, list]:
    """Encode a batch of records given as columns, what ``datasets.map(batched=True)`` passes and
    wants back: ``{"messages": [conversation, ...], "tools": [...]}`` (any record shape of
    :mod:`turntune.data`; other columns are counted as ignored keys) -> one list per column in
    ``columns`` (``BATCH_COLUMNS``: Example fields, and ``row``, the input row of each example).

    One conversation can give several examples (``expand``, windows) or none (a skipped row), so
    the output has its own number of rows; with ``datasets``, drop the input columns
    (``remove_columns=ds.column_names``). A row whose ``tree_end`` is not None is a token tree: it
    needs tree attention (``pack_batch``), not a plain causal mask (``tree=False`` in a config).

    Rows are validated as turntune reads Parquet (a null-valued key is a missing key: Arrow gives
    every message every key) and named ``row {i}``, i from ``indices`` (``with_indices=True``) or
    the position in the batch. A row that breaks a rule or that the template cannot encode raises a
    DataError naming it (``on_invalid="error"``), or is skipped and counted: validation rules in
    ``data_report``, encoding rules in ``report``. Options as :func:`encode`; the template is built
    once per tokenizer.

    >>> ds.map(lambda b, i: encode_batch(b, tok, indices=i), batched=True, with_indices=True,
    ...        remove_columns=ds.column_names)  # doctest: +SKIP
    """
    name = "encode_batch"
    if tokenizer is None:
        raise ConfigError(f"{name}: tokenizer is None; pass the model's tokenizer "
                          "(turntune.load_tokenizer(folder), or transformers.AutoTokenizer.from_pretrained)")
    if not isinstance(batch, Mapping):
        raise ConfigError(f"{name}: the batch is a {type(batch).__name__}, not a mapping of columns "
                          '({"messages": [conversation, ...]}); for one conversation, use encode()')
    sizes = {k: len(v) for k, v in batch.items()}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"{name}: the batch's columns differ in length ("
                          + ", ".join(f"{k} {n}" for k, n in sizes.items())
                          + "); pass what datasets.map(batched=True) passes: a dict of equally long columns")
    if "messages" not in batch and "conversations" not in batch:
        raise ConfigError(f"{name}: the batch has no 'messages' or 'conversations' column (it has: "
                          f"{', '.join(batch) or 'none'}); give the conversations in one of them")
    n = next(iter(sizes.values()))
    if indices is not None and len(indices) != n:
        raise ConfigError(f"{name}: {len(indices)} indices for {n} rows")
    for column in columns:
        check_choice("columns", column, BATCH_COLUMNS)
    check_choice("format", format, FORMATS)
    check_choice("on_invalid", on_invalid, get_args(OnInvalid))
    opts = EncodeOptions(strategy, weighting, max_length, cut_long_replies, history_fraction)
    tmpl = template_for(tokenizer, template, chat_template, template_kwargs)
    rows = list(indices) if indices is not None else list(range(n))
    sources = [f"row {i}" for i in rows]
    names = list(batch)
    records = [(src, without_nulls(dict(zip(names, values)))) for src, values in zip(sources, zip(*batch.values()))]
    convs = validate_chunk(records, format, on_invalid, data_report if data_report is not None else DataReport())
    examples = encode_conversations(convs, tmpl, opts, report=report, on_invalid=on_invalid)
    out: dict[str, list] = {}
    for column in columns:
        if column == "row":
            row_of = dict(zip(sources, rows))
            out[column] = [row_of[e.source] for e in examples]
        else:
            out[column] = [getattr(e, column) for e in examples]
    return out


def encode_conversations(
    conversations: Iterable[Conversation],
    template: Template,
    options: EncodeOptions = EncodeOptions(),
    *,
    report: EncodeReport | None = None,
    on_invalid: str = "error",
    chunk: int = 4096,
    progress=None,
) -> list[Example]:
    """Encode many conversations; tokenizer calls are batched ``chunk`` conversations at a time.

    A conversation the template cannot encode exactly raises a :class:`DataError` naming its
    source and rule (``on_invalid="error"``), or is skipped and counted in ``report.skipped``
    (``"skip"``). Why 4096: each batch call wakes the tokenizer's thread pool, and its threads burn
    CPU before going back to sleep, so fewer, larger calls cost less (bench/README.md, encoding).
    """
    check_choice("on_invalid", on_invalid, get_args(OnInvalid))
    if options.strategy == "full":  # Python's default filter shows it once per call site
        warnings.warn("strategy 'full' trains on user and system tokens too: the model learns to write "
                      "the user's turns. Use 'all' unless you are comparing.", stacklevel=2)
    report = report if report is not None else EncodeReport()
    convs = list(conversations)
    out: list[Example] = []
    # One conversation (encode() called per conversation): the collector runs as usual. A young
    # collection forced per call would count towards the older generations' collections ten times
    # as often as Python's own, and those traverse the whole heap.
    paused = _young_collections_only if len(convs) > 1 else contextlib.nullcontext
    for lo in range(0, len(convs), chunk):
        with paused():
            part = convs[lo:lo + chunk]
            # The renderings die with the loop, before the collection at the end of the chunk.
            for conv, r in zip(part, render_each(template, part)):
                own = EncodeReport()  # merged only if the whole conversation encodes
                try:
                    if isinstance(r, TurntuneError):
                        raise r
                    exs = _Encoder(conv, r, template, options, own).run()
                except TurntuneError as e:
                    err = conversation_error(conv, e)
                    if on_invalid == "error":
                        raise err from None
                    report.refuse(err)
                    continue
                report.merge(own)
                out.extend(exs)
        if progress is not None:
            progress(len(part))
    return out


def render_each(template: Template, part: Sequence[Conversation]) -> list:
    """Each conversation's rendering, or the TurntuneError that rendering it raised. One batched
    call where the whole chunk renders; one by one where some conversation refuses."""
    render_many = getattr(template, "render_many", None)
    if render_many is not None:
        try:
            return render_many(part)
        except TurntuneError:
            pass
    out: list = []
    for c in part:
        try:
            out.append(template.render(c))
        except TurntuneError as e:
            out.append(e)
    return out


def conversation_error(conv: Conversation, e: TurntuneError) -> DataError:
    """One conversation's encoding error as a DataError with its source and rule."""
    if isinstance(e, DataError):
        return e
    text = str(e).removeprefix(f"{conv.source}: ") if conv.source else str(e)
    return DataError(text, source=conv.source, rule=getattr(e, "rule", "template_refused"))


@contextlib.contextmanager
def _young_collections_only():
    """Pause Python's cyclic garbage collector for one chunk, then collect what the chunk made.

    Encoding makes tens of lists of hundreds of ints per conversation and (with the shipped
    templates) no reference cycles: reference counting frees everything. Left running, the
    collector traverses those young lists over and over, and each full collection traverses the
    whole heap (the examples so far, a loaded model, the data): up to a fifth of the encoding time
    on the benchmark. One young-generation collection per chunk still frees any cycles a chunk
    made (a template's macros can make some), so memory stays bounded by a chunk.
    """
    if not gc.isenabled():  # the caller manages the collector (or this is a nested call)
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect(0)


# -- one conversation ---------------------------------------------------------------------------
class _Encoder:
    """Turns one conversation and its rendering into examples (see the module docstring)."""

    def __init__(self, conv: Conversation, r: Rendered, template: Template, opts: EncodeOptions,
                 report: EncodeReport) -> None:
        self.conv, self.r, self.template, self.o, self.report = conv, r, template, opts, report
        self.limit = opts.max_length or 1 << 62
        self.asst = conv.assistant_indices  # message index of turn k
        self.n = len(r.turn_end)
        if self.n != len(self.asst):
            raise TemplateError(f"template {template.name} rendered {self.n} replies, the conversation has "
                                f"{len(self.asst)}", rule="span_not_found")
        # The replies to train (weight 1), and of those the ones this strategy means to train.
        self.trained = conv.trained_turns
        self.intended = self.trained[-1:] if opts.strategy == "last" else self.trained
        self.own_tokens: dict[int, int] = {}  # reply k -> its target tokens when rendered as its own sample
        msgs = conv.messages
        self.sys = 1 if msgs and msgs[0].role == "system" else 0
        # A window or truncated history starts at a round: a user message (never inside a tool chain).
        self.round_starts = [i for i, m in enumerate(msgs) if m.role == "user" and i >= self.sys] or [self.sys]
        # Token counts per message of the whole rendering, made on first use (_counts): only long
        # conversations need them, to estimate a window's length before rendering it.
        self._cum: list[int] | None = None  # cumulative tokens per message
        self.msg_tok: list[int] = []
        self.overhead = 0  # tokens outside messages plus the system prompt's
        self.tail: list[int] = []  # per reply: its message's tokens after its terminator

    def _counts(self):
        if self._cum is None:
            r = self.r
            counts = Counter(r.message)
            self.msg_tok = [counts.get(i, 0) for i in range(len(self.conv.messages))]
            self.overhead = counts.get(-1, 0) + sum(self.msg_tok[: self.sys])
            self._cum = [0]
            for c in self.msg_tok:
                self._cum.append(self._cum[-1] + c)
            # Per reply: its message's tokens after its terminator (ChatML's trailing newline). A
            # sample that ends with reply k does not hold them, so estimates leave them out.
            self.tail = []
            for k, end in enumerate(r.turn_end):
                i = end
                while i < len(r.message) and r.message[i] == self.asst[k]:
                    i += 1
                self.tail.append(i - end)

    def run(self) -> list[Example]:
        rep, r, s = self.report, self.r, self.o.strategy
        rep.conversations += 1
        rep.replies += self.n
        rep.replies_excluded += self.n - len(self.trained)
        if not self.trained:  # every reply weight 0 (validation refuses such records; an API caller may not)
            exs = []
        elif s == "full":
            exs = [self._full()]
        elif not r.prefix_stable and s != "last":
            rep.not_prefix_stable += 1
            exs = [e for k in self.trained if (e := self._for_turn(k)) is not None]
            if self.o.tree:
                exs = self._trees(exs)
        elif s == "expand":
            exs = [e for k in self.trained if (e := self._for_turn(k)) is not None]
        elif s == "last":
            e = self._for_turn(self.trained[-1])
            exs = [e] if e is not None else []
        elif r.turn_end[self.trained[-1]] <= self.limit:
            exs = [self._make(r, r.turn_end[self.trained[-1]], set(self.trained), 0,
                              list(range(len(self.conv.messages))))]
        else:
            exs = self._windows()
        # A reply's tokens as its own sample renders it where that differs (a template that strips
        # earlier reasoning renders a reply longer as the last one), else as the whole rendering has it.
        if len(self.intended) == self.n and not self.own_tokens:
            rep.reply_tokens += len(r.turn) - r.turn.count(-1)
        else:
            per_turn = Counter(r.turn)
            rep.reply_tokens += sum(self.own_tokens.get(k, per_turn[k]) for k in self.intended)
        counted = [(e, n) for e in exs if (n := e.n_trained) > 0]  # n_trained counts: once each
        exs = [e for e, _ in counted]
        if s == "all" and r.prefix_stable:
            rep.windows += max(len(exs) - 1, 0)
        if not exs:
            rep.conversations_without_labels += 1
        self._weigh(exs)
        for e, n in counted:
            rep.examples += 1
            rep.tokens += len(e)
            rep.trained_tokens += n
        return exs

    # -- building blocks ------------------------------------------------------------------------
    def _est(self, start: int, end: int) -> int:
        """Estimated tokens of the system prompt plus messages[start..end] rendered alone."""
        self._counts()
        return self.overhead + self._cum[end + 1] - self._cum[start]

    def _render_slice(self, start: int, end: int) -> tuple[Rendered, list[int], int]:
        """Render system + messages[start..end]. Returns it, the map from its message indices to
        the conversation's, and the conversation turn index of its first reply."""
        msgs = self.conv.messages
        keep = list(range(self.sys)) + list(range(start, end + 1))
        sub = Conversation(tuple(msgs[i] for i in keep), self.conv.tools, self.conv.source)
        first_turn = sum(1 for a in self.asst if a < start)
        return self.template.render(sub), keep, first_turn

    def _round_of(self, k: int) -> int:
        return max((s for s in self.round_starts if s <= self.asst[k]), default=self.sys)

    def _for_turn(self, k: int) -> Example | None:
        """Reply k alone, with as much history as fits (oldest whole rounds dropped first)."""
        r = self.r
        if r.prefix_stable and r.turn_end[k] <= self.limit:
            return self._make(r, r.turn_end[k], {k}, 0, list(range(len(self.conv.messages))))
        end = self.asst[k]
        # Candidate starts, most history first; the last one keeps only reply k's own round.
        rk = self._round_of(k)  # a reply before the first user turn (a greeting) has round `sys`
        starts = [s for s in self.round_starts if s < rk] + [rk]
        for start in starts:
            final = start == starts[-1]
            if not final and self._est(start, end) - self.tail[k] > self.limit:
                continue
            sub, keep, t0 = self._render_slice(start, end)
            self.own_tokens[k] = sub.turn.count(k - t0)
            if sub.turn_end[k - t0] <= self.limit or final:  # the sample ends at the reply's end
                self.report.history_rounds_dropped += sum(1 for s in self.round_starts if s < start)
                local = k - t0
                return self._make(sub, sub.turn_end[local], {local}, t0, keep)
        return None

    def _trees(self, samples: list[Example]) -> list[Example]:
        """The expanded samples merged into token trees of at most max_length (``tree.py``); the
        samples themselves where a tree cannot be exact (counted) or saves nothing."""
        tries = trees_of(samples, self.o.max_length)
        if tries is None:
            self.report.tree_fallbacks += 1
            return samples
        if len(tries) == len(samples):  # one sample per tree: nothing shared
            return samples
        rep = self.report
        rep.trees += 1
        rep.tree_tokens += sum(t.size for t in tries)
        rep.tree_expanded_tokens += sum(t.sample_tokens for t in tries)
        return [t.layout(self.conv.source, self.n) if t.samples > 1 else s
                for t, s in zip(tries, self._firsts(tries, samples))]

    @staticmethod
    def _firsts(tries, samples: list[Example]) -> list[Example]:
        """Each trie's first sample (the sample itself stands for a trie of one)."""
        out, at = [], 0
        for t in tries:
            out.append(samples[at])
            at += t.samples
        return out

    def _windows(self) -> list[Example]:
        """Split a conversation longer than max_length into windows of whole rounds.

        Each window is the system prompt, up to ``history_fraction`` of max_length of preceding
        history, then as many new replies as fit; each reply is trained in exactly one window.
        """
        out: list[Example] = []
        budget = int(self.o.history_fraction * self.limit)
        self._counts()
        todo = self.trained  # the replies to train, in order; weight-0 replies are only context
        i = 0
        while i < len(todo):
            t = todo[i]
            rs = self._round_of(t)
            start = rs
            for s in reversed([s for s in self.round_starts if s < rs]):  # grow history backwards
                if self._est(s, rs - 1) - self.overhead > budget:
                    break
                start = s
            j = i
            while j + 1 < len(todo) and self._est(start, self.asst[todo[j + 1]]) - self.tail[todo[j + 1]] <= self.limit:
                j += 1
            while True:  # the estimate can be off by a few template tokens: verify, then shrink
                sub, keep, t0 = self._render_slice(start, self.asst[todo[j]])
                if sub.turn_end[todo[j] - t0] <= self.limit or (start == rs and j == i):
                    break
                if j > i:
                    j -= 1
                else:
                    start = min(s for s in self.round_starts if s > start)
            ex = self._make(sub, sub.turn_end[todo[j] - t0], {k - t0 for k in todo[i:j + 1]}, t0, keep)
            out.append(ex)
            i = j + 1
        return out

    def _full(self) -> Example:
        r = self.r
        end = min(len(r.input_ids), self.limit)
        labels = [IGNORE_INDEX] + r.input_ids[1:end]  # position 0 is never predicted
        weight = [0.0] + [1.0] * (end - 1) if end else []  # token weights; _weigh sets the others
        turn = r.turn[:end]
        if len(self.trained) < self.n:  # weight-0 replies stay context, even here
            excluded = set(range(self.n)) - set(self.trained)
            turn = [-1 if t in excluded else t for t in turn]
            for i, t in enumerate(r.turn[:end]):
                if t in excluded:
                    labels[i], weight[i] = IGNORE_INDEX, 0.0
        ex = Example(r.input_ids[:end], labels, turn, weight, self.conv.source, self.n, r.message[:end])
        self.report.replies_trained += len({t for t in turn if t >= 0})
        self.report.reply_tokens_trained += sum(1 for t in turn if t >= 0)
        return ex

    def _make(self, r: Rendered, end: int, train: set[int], t0: int, keep: list[int]) -> Example:
        """Cut ``r`` at ``end`` (and at max_length), label the local turns in ``train``."""
        rep = self.report
        cut = end > self.limit
        if cut:
            end = self.limit
        ids = r.input_ids[:end]
        if t0 == 0 and len(train) == len(r.turn_end):  # every turn of r: copy, no per-token test
            turn = r.turn[:end]
        else:
            turn = [t + t0 if t in train else -1 for t in r.turn[:end]]
        if end:
            turn[0] = -1  # position 0 has nothing before it to predict it from
        message = r.message[:end] if len(keep) == len(self.conv.messages) else [keep[m] if m >= 0 else -1 for m in r.message[:end]]
        seen = {}
        pos = 0
        for t in sorted(train):  # first position of each turn, found by C-speed list.index
            try:
                pos = turn.index(t + t0, pos)
            except ValueError:
                continue
            seen[t + t0] = pos
        trained_turns = set(seen)
        for t in train:
            if t + t0 not in trained_turns:
                rep.replies_lost += 1
        if cut and not self.o.cut_long_replies:
            # Never cut inside a reply unless asked: drop the replies that do not end in time.
            # (`_for_turn`/`_windows` only get here when the reply cannot fit on its own.)
            for t in list(trained_turns):
                if r.turn_end[t - t0] > self.limit:
                    rep.replies_lost += 1
                    trained_turns.discard(t)
                    for i in range(end):
                        if turn[i] == t:
                            turn[i] = -1
        elif cut:
            rep.replies_cut += sum(1 for t in trained_turns if r.turn_end[t - t0] > self.limit)
        rep.replies_trained += len(trained_turns)
        rep.reply_tokens_trained += end - turn.count(-1)
        for t in trained_turns:
            rep.history_seen.append(seen[t])
        labels, weight = _labels_and_weights(ids, turn, {t: r.turn_end[t - t0] for t in trained_turns})
        return Example(ids, labels, turn, weight, self.conv.source, self.n, message)

    def _weigh(self, exs: list[Example]) -> None:
        """Per-token weights: the loss of any batch is sum(w * loss) / sum(w)."""
        w = self.o.weighting
        if w == "token":  # _make and _full made token weights already
            return
        per_turn = Counter(t for e in exs for t, lab in zip(e.turn, e.labels) if lab != IGNORE_INDEX)
        total = sum(e.n_trained for e in exs)
        for e in exs:
            for i, lab in enumerate(e.labels):
                if lab == IGNORE_INDEX:
                    continue
                if w == "turn":  # each reply counts once; `full`'s user tokens count as one turn
                    e.weight[i] = 1.0 / per_turn[e.turn[i]]
                else:
                    e.weight[i] = 1.0 / total



def _labels_and_weights(ids: list[int], turn: list[int], ends: dict[int, int]) -> tuple[list[int], list[float]]:
    """Labels (``ids[i]`` where ``turn[i] >= 0``, IGNORE_INDEX elsewhere) and token weights (1.0 on
    labels, 0.0 elsewhere); ``ends``: each trained turn and where its tokens should end.

    A template renders each reply as one run of tokens ending at its ``turn_end``, so both lists
    are built run by run with list operations at C speed (two per-token comprehensions were a
    third of the encoder's time). Every position is checked on the way (each gap holds only -1,
    each run only its turn); anything else takes the per-token way, with the same result.
    """
    labels: list[int] = []
    weight: list[float] = []
    at = 0
    for t, stop in sorted(ends.items(), key=lambda te: te[1]):
        try:
            start = turn.index(t, at)
        except ValueError:
            continue  # nothing of this turn left (cut off): the gap checks see to the rest
        stop, gap = min(stop, len(turn)), start - at
        if stop <= start or turn[at:start] != [-1] * gap or turn[start:stop] != [t] * (stop - start):
            break
        labels += [IGNORE_INDEX] * gap
        labels += ids[start:stop]
        weight += [0.0] * gap
        weight += [1.0] * (stop - start)
        at = stop
    else:
        if turn[at:] == [-1] * (len(turn) - at):
            labels += [IGNORE_INDEX] * (len(turn) - at)
            weight += [0.0] * (len(turn) - at)
            return labels, weight
    labels = [IGNORE_INDEX if t < 0 else x for x, t in zip(ids, turn)]
    return labels, [0.0 if t < 0 else 1.0 for t in turn]
