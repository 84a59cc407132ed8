"""Reading and validating conversation files: the first stage of the data flow.

Every record is checked for structure here, before anything is tokenized, so a bad record is
reported once with where (``file:line``, turn), which rule, and how to fix it.

Files: ``.json`` is one document (a list of records, or one record; sources ``file:#i``, i
0-based); anything else is JSONL, read line by line (one record per line, blank lines ignored,
a UTF-8 BOM tolerated at the start of any line; sources ``file:line``, 1-based).

Record shapes, detected per record in ``auto`` mode (a mixed file is fine):

- ``openai``: ``{"messages": [{"role", "content", "tool_calls": [{"id", "type": "function",
  "function": {"name", "arguments"}}], "reasoning_content", "weight"}], "tools": [...]}``, roles
  system/user/assistant/tool (a tool result may name its ``tool_call_id``).
- ``glm4``: ``{"messages": [...]}`` or a bare list; roles system/user/assistant/observation;
  ``tools`` on the system message; a tool call is ``{"role": "assistant", "metadata": NAME,
  "content": ARGUMENTS_JSON}``. Chosen over ``openai`` when a message has ``observation``,
  ``metadata`` or ``tools``.
- ``sharegpt``: ``{"conversations": [{"from", "value"}], "system": ..., "tools": ...}``, from
  system/human/gpt/function_call/observation (or user/assistant/tool/function); a ``function_call``
  value is JSON ``{"name", "arguments"}`` (or a list of them).

What a reply says beyond its text is read in every shape, never dropped:

- reasoning: ``reasoning_content`` on an assistant message, or a ``<think>…</think>`` block at the
  start of its content (split the way reasoning templates split it: the reasoning and the rest,
  each without the newlines next to the tags). Both at once is an error (``bad_reasoning``).
- ``weight``: 0 (the reply is context only) or 1 (trained, the default), OpenAI's fine-tuning
  format; on assistant messages only (``bad_weight``). A record whose every reply has weight 0 has
  nothing to train (``no_trained_reply``).
- Keys that no rule reads (``thinking``, ``loss``, a misspelt ``contnet``, a record's ``id``) are
  counted per key in the report (``ignored keys``), so nothing vanishes without a number.

Choices (each a place where templates or trainers disagree):

- Tool-call arguments must be a JSON object (text or dict; a dict is dumped with
  ``ensure_ascii=False``). So GLM-4 code-interpreter calls with raw code are rejected.
- An empty assistant reply without tool calls is kept but counted (note ``empty_reply``): it
  trains only the terminator, i.e. teaches the model to stop at once, and some Hugging Face
  templates drop empty messages (the encoder's span check catches that). Empty user, system or
  tool text is kept as is.
- A conversation may end on a user or tool turn: those messages are kept (they are context that
  carries no loss in any strategy but ``full``) and counted (note ``trailing_context``).
- A conversation may start with an assistant message after the system prompt (a greeting).
- An assistant tool call need not be followed by its result when the conversation ends there (the
  model learns to call). Followed by another assistant message it is an error
  (``call_without_result``); followed by a user turn with results missing it is kept and counted
  (note ``unanswered_call``).
- When the record declares tools, every call must name one of them (``undeclared_tool``: the model
  would learn to call functions its prompt never offers); a tool result's ``tool_call_id`` must
  name a call of the assistant message it answers (``unknown_tool_call_id``).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, get_args

from turntune.conversation import Conversation, Message, ToolCall
from turntune.errors import ConfigError, DataError, printable

Format = Literal["auto", "openai", "glm4", "sharegpt"]
OnInvalid = Literal["error", "skip"]
FORMATS: tuple[str, ...] = get_args(Format)
# The closed set of rule names a DataError from this module can carry (part of the public API).
RULES: tuple[str, ...] = (
    "missing_file", "bad_json", "bad_utf8", "unknown_format", "unknown_role", "content_not_string",
    "bad_tool_call", "bad_tools", "empty_conversation", "system_not_first", "consecutive_user",
    "consecutive_assistant", "tool_without_call", "no_assistant", "no_records", "bad_reasoning",
    "bad_weight", "no_trained_reply", "undeclared_tool", "unknown_tool_call_id", "call_without_result",
    "unreadable_file",
)
# Each format's role names mapped onto ours. ShareGPT's function_call is an assistant tool call.
_ROLES: dict[str, dict[str, str]] = {
    "openai": {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"},
    "glm4": {"system": "system", "user": "user", "assistant": "assistant", "observation": "tool"},
    "sharegpt": {"system": "system", "human": "user", "gpt": "assistant", "function_call": "assistant",
                 "observation": "tool", "user": "user", "assistant": "assistant", "tool": "tool",
                 "function": "tool"},
}
# The keys each shape reads; any other key is counted in DataReport.ignored_keys.
_READ = {
    "openai": ({"messages", "tools"}, {"role", "content", "tool_calls", "name", "tool_call_id",
                                       "reasoning_content", "weight"}),
    "glm4": ({"messages", "tools"}, {"role", "content", "metadata", "tools", "reasoning_content", "weight"}),
    "sharegpt": ({"conversations", "system", "tools"}, {"from", "value", "reasoning_content", "weight"}),
}
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
MAX_EXAMPLES = 3  # error texts kept per rule in a DataReport


@dataclass
class DataReport:
    """What a load saw. Nothing is dropped without being counted here."""

    path: str = ""
    records: int = 0  # non-blank records read
    valid: int = 0
    skipped: Counter = field(default_factory=Counter)  # rule -> records skipped for it
    formats: Counter = field(default_factory=Counter)  # format -> valid records in it
    examples: dict[str, list[str]] = field(default_factory=dict)  # rule -> first error texts
    notes: Counter = field(default_factory=Counter)  # kept but worth knowing (see module doc)
    messages: int = 0  # in valid conversations
    assistant_turns: int = 0  # in valid conversations
    replies_weight_0: int = 0  # replies the data marks as context only
    ignored_keys: Counter = field(default_factory=Counter)  # key -> times seen; no rule reads it

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "DataReport") -> None:
        """Add the counts of ``other`` (the next chunk in file order): the same report as one pass."""
        for name in ("records", "valid", "messages", "assistant_turns", "replies_weight_0"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("skipped", "formats", "notes", "ignored_keys"):
            getattr(self, name).update(getattr(other, name))
        for rule, texts in other.examples.items():
            kept = self.examples.setdefault(rule, [])
            kept.extend(texts[:MAX_EXAMPLES - len(kept)])

    def finish(self) -> None:
        """After the last record: drop zero counts; a file with no record at all is an error."""
        self.notes = +self.notes
        if self.records == 0:  # an empty file is a mistake in every mode: there is nothing to skip
            raise DataError("no records: the file is empty, blank or an empty JSON list (one JSON conversation "
                            "per line for .jsonl, a JSON list for .json)", source=self.path, rule="no_records")

    def to_dict(self) -> dict:
        return {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DataReport":
        counters = {"skipped", "formats", "notes", "ignored_keys"}
        return cls(**{k: Counter(v) if k in counters else v for k, v in d.items()})

    def summary(self) -> str:
        """Human-readable, several lines: counts, formats, each rule with its first errors."""
        lines = [f"{printable(self.path)}: {self.records} records, {self.valid} valid, {self.n_skipped} skipped"]
        if self.formats:
            lines.append("  formats: " + ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items())))
        if self.valid:
            lines.append(f"  messages: {self.messages}, assistant turns: {self.assistant_turns}"
                         f" ({self.assistant_turns / self.valid:.1f} per conversation)"
                         + (f", {self.replies_weight_0} with weight 0 (context only)" if self.replies_weight_0 else ""))
        for rule, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {rule}: {n}")
            lines.extend(f"    {text}" for text in self.examples.get(rule, []))
        why = {"empty_reply": "assistant replies with no text and no tool call (train only the stop)",
               "trailing_context": "conversations end after their last reply (no loss there)",
               "unanswered_call": "tool calls whose results are missing before the next user turn"}
        lines.extend(f"  note {k}: {v} {why.get(k, '')}".rstrip() for k, v in sorted(self.notes.items()))
        if self.ignored_keys:
            lines.append("  ignored keys (not read): "
                         + ", ".join(f"{k} {v:,}" for k, v in sorted(self.ignored_keys.items())))
        return "\n".join(lines)


@dataclass
class LoadResult:
    """The valid conversations, in file order, and the report of everything read."""

    conversations: list[Conversation]
    report: DataReport


def load_conversations(path: str | Path, *, format: Format = "auto",
                       on_invalid: OnInvalid = "error") -> LoadResult:
    """Read and validate every record of a data file (JSONL, JSON, Parquet or a ``datasets``
    folder; see :func:`read_chunks`).

    ``on_invalid="error"`` raises the first DataError; ``"skip"`` drops bad records and counts
    them per rule in ``report``. A ``.json`` file that does not parse raises in both modes (there
    is no record to skip to). Example: ``print(load_conversations("train.jsonl").report.summary())``.
    Holds every conversation; :func:`iter_conversations` streams them.
    """
    report = DataReport()
    conversations = list(iter_conversations(path, format=format, on_invalid=on_invalid, report=report))
    return LoadResult(conversations, report)


def iter_conversations(path: str | Path, *, format: Format = "auto", on_invalid: OnInvalid = "error",
                       report: DataReport | None = None, chunk_size: int = 4096) -> Iterator[Conversation]:
    """The valid conversations of a data file in file order, read ``chunk_size`` records at a
    time, never all at once; ``report`` (filled as they come) is complete when the iterator ends.

    >>> rep = DataReport(); n = sum(1 for _ in iter_conversations("train.jsonl", report=rep))
    """
    _check_choice("format", format, FORMATS)
    _check_choice("on_invalid", on_invalid, get_args(OnInvalid))
    report = report if report is not None else DataReport()
    chunks = read_chunks(path, chunk_size)
    report.path = chunks.name
    for chunk in chunks:
        part = DataReport()
        yield from validate_chunk(chunk, format, on_invalid, part)
        report.merge(part)
    report.finish()


def validate_chunk(chunk: list[tuple[str, Any]], format: Format, on_invalid: OnInvalid,
                   report: DataReport) -> list[Conversation]:
    """Parse and validate one chunk of :func:`read_chunks` (raw JSONL lines are decoded here, so
    worker processes share the JSON parsing); counts into ``report``."""
    out: list[Conversation] = []
    for source, obj in chunk:
        if isinstance(obj, bytes):
            obj = _line_record(source, obj)
            if obj is _BLANK:  # a blank line is no record
                continue
        report.records += 1
        try:
            if isinstance(obj, DataError):
                raise obj
            conv, fmt = _parse(obj, source, format, report.ignored_keys)
        except DataError as err:
            if on_invalid == "error":
                raise
            report.skipped[err.rule] += 1
            kept = report.examples.setdefault(err.rule, [])
            if len(kept) < MAX_EXAMPLES:
                kept.append(str(err))
            continue
        out.append(conv)
        report.valid += 1
        report.formats[fmt] += 1
        report.messages += len(conv.messages)
        report.assistant_turns += len(conv.assistant_indices)
        report.replies_weight_0 += sum(1 for m in conv.messages if m.role == "assistant" and not m.weight)
        report.notes["empty_reply"] += sum(1 for m in conv.messages if m.role == "assistant" and not m.tool_calls
                                           and not m.content.strip() and not m.reasoning.strip())
        report.notes["trailing_context"] += conv.messages[-1].role != "assistant"
        report.notes["unanswered_call"] += _unanswered_calls(conv.messages)
    return out


def parse_record(obj: Any, source: str = "", format: Format = "auto") -> Conversation:
    """Validate one in-memory record and normalise it; raises DataError.

    >>> parse_record({"messages": [{"role": "user", "content": "Hi"},
    ...                            {"role": "assistant", "content": "Hello"}]}).messages[1].content
    'Hello'
    """
    _check_choice("format", format, FORMATS)
    return _parse(obj, source, format)[0]


def detect_format(obj: Any, source: str = "") -> str:
    """``openai``, ``glm4`` or ``sharegpt`` for one record; DataError ``unknown_format`` otherwise."""
    if isinstance(obj, list):
        return "glm4"
    if isinstance(obj, dict):
        if "conversations" in obj:
            return "sharegpt"
        msgs = obj.get("messages")
        if isinstance(msgs, list):
            glm = any(isinstance(m, dict) and (m.get("role") == "observation" or m.get("metadata")
                                               or "tools" in m) for m in msgs)
            return "glm4" if glm else "openai"
    raise DataError('not a conversation (expected {"messages": [...]}, {"conversations": [...]}'
                    " or a list of messages)", source=source, rule="unknown_format")


# ---- reading ---------------------------------------------------------------------------------

_BOM = b"\xef\xbb\xbf"
_BLANK = object()  # a blank JSONL line (``null`` is a record: a wrong one)


@dataclass
class RecordChunks:
    """A data file's records in file order, ``size`` at a time: lists of ``(source, record)``,
    where a record is a raw JSONL line (bytes: :func:`validate_chunk` decodes it), a parsed object,
    or the DataError that reading it gave (for skip mode). ``name`` names the file in messages."""

    path: Path
    name: str
    size: int

    def __iter__(self) -> Iterator[list[tuple[str, Any]]]:
        chunk: list[tuple[str, Any]] = []
        for item in self._records():
            chunk.append(item)
            if len(chunk) == self.size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _records(self) -> Iterator[tuple[str, Any]]:
        path, name = self.path, self.name
        if path.is_dir():
            from turntune.arrow_files import folder_records

            return folder_records(path, name)
        if path.suffix.lower() == ".parquet":
            from turntune.arrow_files import parquet_records

            return parquet_records(path, name)
        if path.suffix.lower() == ".json":
            return _json_records(path, name)
        return _jsonl_lines(path, name)


def read_chunks(path: str | Path, size: int = 4096) -> RecordChunks:
    """The records of ``path``: ``.json`` (one document), ``.parquet``, a folder written by
    ``datasets``' ``save_to_disk`` (or a ``datasets`` cache folder of ``.arrow`` files), anything
    else JSONL. Missing or unreadable paths raise DataError here, before any record is read."""
    path = Path(path)
    name = printable(str(path))  # every source and message below names the file through it
    try:
        found = path.is_file() or path.is_dir()
    except OSError as e:  # a folder on the way that may not be searched
        raise _unreadable_file(name, e) from None
    if not found:
        raise DataError("no such file (check the path)", source=name, rule="missing_file")
    return RecordChunks(path, name, size)


def _jsonl_lines(path: Path, name: str) -> Iterator[tuple[str, bytes]]:
    """Yield ``(file:line, raw line)``; decoding is :func:`_line_record`'s (in the workers)."""
    # Binary lines: split on b"\n" only (text mode / str.splitlines would also split on U+2028
    # inside strings), so line numbers match what editors show, and bad UTF-8 stays per line.
    try:
        f = path.open("rb")
    except OSError as e:
        raise _unreadable_file(name, e) from None
    with f:
        for lineno, raw in enumerate(f, 1):
            yield f"{name}:{lineno}", raw


def _line_record(source: str, raw: bytes) -> Any:
    """One JSONL line's record, a DataError for a bad line, or ``_BLANK`` for a blank one."""
    if raw.startswith(_BOM):  # any line: `cat a.jsonl b.jsonl` keeps b's BOM mid-file
        raw = raw[len(_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataError(f"invalid UTF-8 at byte offset {e.start} of the line "
                         "(re-save the file as UTF-8)", source=source, rule="bad_utf8")
    if not text.strip():
        return _BLANK
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        fix = ("the file ends mid-record: was it truncated? (remove the partial last line)"
               if not raw.endswith(b"\n") else "fix the line; JSONL holds one JSON record per line")
        return DataError(f"not valid JSON: {_json_msg(e)} at column {e.colno} ({fix})",
                         source=source, rule="bad_json")
    except (ValueError, RecursionError) as e:  # parses as JSON, but Python cannot hold it
        return DataError(_unreadable(e), source=source, rule="bad_json")


def _json_records(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise _unreadable_file(name, e) from None
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 at byte offset {e.start} (re-save the file as UTF-8)",
                        source=name, rule="bad_utf8") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        fix = ("one record per line belongs in a .jsonl file" if e.msg == "Extra data"
               else "fix the JSON syntax")
        raise DataError(f"not valid JSON: {_json_msg(e)} at column {e.colno} ({fix})",
                        source=f"{name}:{e.lineno}", rule="bad_json") from None
    except (ValueError, RecursionError) as e:
        raise DataError(_unreadable(e), source=name, rule="bad_json") from None
    # A list of message dicts is one bare GLM-4 conversation, not a list of records.
    if isinstance(doc, list) and not (doc and all(isinstance(m, dict) and "role" in m for m in doc)):
        for i, record in enumerate(doc):
            yield f"{name}:#{i}", record
    else:
        yield f"{name}:#0", doc


def _unreadable_file(name: str, e: OSError) -> DataError:
    """The whole file is out of reach (no read permission, an I/O error): nothing to skip to."""
    return DataError(f"cannot read the file: {e.strerror or e} (check that you may read it)", source=name,
                     rule="unreadable_file")


def _json_msg(e: json.JSONDecodeError) -> str:
    """The parser's words, minus a dangling "at" ("Unterminated string starting at" + " at column")."""
    return e.msg.removesuffix(" at")


def _unreadable(e: Exception) -> str:
    """Valid JSON that Python's json module refuses: json.loads raises these, not JSONDecodeError."""
    if isinstance(e, RecursionError):
        return "not readable JSON: nested too deeply (records are a few levels deep; is this a conversation?)"
    return "not readable JSON: a number with more than 4300 digits (write it as a string)"


# ---- normalising -----------------------------------------------------------------------------

# (1-based turn in the record's own message list, or None for a message the format implies)
_Item = tuple[int | None, Message]


def _parse(obj: Any, source: str, format: str, ignored: Counter | None = None) -> tuple[Conversation, str]:
    fmt = detect_format(obj, source) if format == "auto" else format
    items, tools = {"openai": _openai, "glm4": _glm4, "sharegpt": _sharegpt}[fmt](obj, source)
    _check_structure(items, source)
    _check_tool_use(items, tools, source)
    _check_unicode(items, tools, source)
    if ignored is not None:  # counted only for records that are kept
        _count_unread(obj, fmt, ignored)
    return Conversation(tuple(m for _, m in items), tuple(tools), source), fmt


def _count_unread(obj: Any, fmt: str, ignored: Counter) -> None:
    record_keys, message_keys = _READ[fmt]
    if isinstance(obj, dict):
        ignored.update(k for k in obj if k not in record_keys)
        msgs = obj.get("conversations" if fmt == "sharegpt" else "messages")
    else:
        msgs = obj
    for m in msgs:
        ignored.update(f"message.{k}" for k in m if k not in message_keys)
        if fmt == "openai" and m.get("role") != "tool":  # read on tool results only
            ignored.update(f"message.{k}" for k in ("name", "tool_call_id") if k in m)


def _messages(obj: Any, key: str, fmt: str, source: str) -> list:
    msgs = obj if (fmt == "glm4" and isinstance(obj, list)) else (
        obj.get(key) if isinstance(obj, dict) else None)
    if not isinstance(msgs, list):
        raise DataError(f'expected a list under "{key}" for the {fmt} format (set the format to auto '
                        "or fix the record)", source=source, rule="unknown_format")
    return msgs


def _role(m: Any, key: str, fmt: str, source: str, turn: int) -> str:
    if not isinstance(m, dict):
        raise DataError(f"message is {_kind(m)}, not an object", source=source, turn=turn,
                        rule="unknown_format")
    known, role = _ROLES[fmt], m.get(key)
    if not isinstance(role, str) or role not in known:  # (a list or dict role is not hashable)
        raise DataError(f"unknown role {role!r} (the {fmt} format knows {', '.join(known)})",
                        source=source, turn=turn, rule="unknown_role")
    return role


def _loads(text: str) -> Any:
    """Parsed JSON, or None where the text is not JSON, or JSON Python cannot hold (nested too
    deep, an integer past the digit limit): the caller names the rule."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None


def _kind(value: Any) -> str:
    """A JSON user's name for a value's type."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null or missing"}
    return names.get(type(value), type(value).__name__)


def _text(value: Any, source: str, turn: int | None, what: str = "content") -> str:
    if not isinstance(value, str):
        raise DataError(f"{what} is {_kind(value)}, not a string (make it one string; join text parts)",
                        source=source, turn=turn, rule="content_not_string")
    return value


def _call(name: Any, arguments: Any, source: str, turn: int, call_id: str | None = None) -> ToolCall:
    if not isinstance(name, str) or not name.strip():
        raise DataError("tool call has no function name (give each call a non-empty name)",
                        source=source, turn=turn, rule="bad_tool_call")
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not isinstance(arguments, str) or not isinstance(_loads(arguments), dict):
        raise DataError(f"arguments of tool call {name!r} are not a JSON object "
                        '(write them as {"arg": value}, as an object or its JSON text)',
                        source=source, turn=turn, rule="bad_tool_call")
    return ToolCall(name, arguments, call_id)


def _tools(value: Any, source: str) -> list[dict]:
    if value is None:
        return []
    if isinstance(value, str):  # ShareGPT files (LLaMA-Factory) store tools as JSON text
        value = _loads(value) if value.strip() else []
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError("tools must be a list of JSON-schema objects (or its JSON text)",
                        source=source, rule="bad_tools")
    if not all(isinstance(t.get("function", {}), dict) for t in value):  # templates read its fields
        raise DataError('a tool\'s "function" must be an object ({"name": ..., "parameters": {...}})',
                        source=source, rule="bad_tools")
    return value


def _reply_fields(m: dict, role: str, content: str, source: str, turn: int) -> tuple[str, str, int]:
    """(content, reasoning, weight) of a message: reasoning from ``reasoning_content`` or a leading
    ``<think>`` block of an assistant's content; weight 0/1 (assistant messages only)."""
    weight = m.get("weight", 1)
    if "weight" in m and (role != "assistant" or type(weight) not in (int, float) or weight not in (0, 1)):
        if role != "assistant":
            msg = f"weight on a {role} message: only assistant replies carry a weight (remove it)"
        else:
            msg = f"weight must be 0 or 1, not {weight!r} (0: context only, 1: trained)"
        raise DataError(msg, source=source, turn=turn, rule="bad_weight")
    if role != "assistant":
        if m.get("reasoning_content") is not None:  # read, so not counted as ignored: refuse, never drop
            raise DataError(f"reasoning_content on a {role} message: only assistant replies carry reasoning "
                            "(move it into the content, or remove it)", source=source, turn=turn, rule="bad_reasoning")
        return content, "", 1
    reasoning = m.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise DataError(f"reasoning_content is {_kind(reasoning)}, not a string (make it one string)",
                        source=source, turn=turn, rule="bad_reasoning")
    reasoning = reasoning or ""
    head = content.lstrip()
    if head.startswith(_THINK_OPEN):
        end = head.find(_THINK_CLOSE)
        if end < 0:
            raise DataError(f"content opens {_THINK_OPEN} but never closes it with {_THINK_CLOSE} "
                            "(close the reasoning, or move it to reasoning_content)",
                            source=source, turn=turn, rule="bad_reasoning")
        if reasoning:
            raise DataError("reasoning given twice: reasoning_content and a <think> block in content "
                            "(keep one)", source=source, turn=turn, rule="bad_reasoning")
        reasoning = head[len(_THINK_OPEN):end].strip("\n")
        content = head[end + len(_THINK_CLOSE):].lstrip("\n")
    return content, reasoning, int(weight)


def _openai(obj: Any, source: str) -> tuple[list[_Item], list[dict]]:
    items: list[_Item] = []
    for turn, m in enumerate(_messages(obj, "messages", "openai", source), 1):
        role = _role(m, "role", "openai", source, turn)
        calls: tuple[ToolCall, ...] = ()
        if role == "assistant" and m.get("tool_calls") is not None:
            raw = m["tool_calls"]
            if not isinstance(raw, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                    for c in raw):
                raise DataError('tool_calls must be a list of {"type": "function", "function": '
                                '{"name", "arguments"}}', source=source, turn=turn, rule="bad_tool_call")
            calls = tuple(_call(c["function"].get("name"), c["function"].get("arguments"), source, turn,
                                c.get("id") if isinstance(c.get("id"), str) else None) for c in raw)
        content = "" if (calls and m.get("content") is None) else _text(m.get("content"), source, turn)
        content, reasoning, weight = _reply_fields(m, role, content, source, turn)
        name = m.get("name") if role == "tool" and isinstance(m.get("name"), str) else None
        call_id = m.get("tool_call_id") if role == "tool" and isinstance(m.get("tool_call_id"), str) else None
        items.append((turn, Message(role, content, calls, name, reasoning, weight, call_id)))  # type: ignore[arg-type]
    return items, _tools(obj.get("tools"), source)


def _glm4(obj: Any, source: str) -> tuple[list[_Item], list[dict]]:
    items: list[_Item] = []
    tools = _tools(obj.get("tools"), source) if isinstance(obj, dict) else []
    for turn, m in enumerate(_messages(obj, "messages", "glm4", source), 1):
        role = _ROLES["glm4"][_role(m, "role", "glm4", source, turn)]
        content = _text(m.get("content"), source, turn)
        if role == "system":
            tools += _tools(m.get("tools"), source)
        meta = m.get("metadata")
        if meta is not None and not isinstance(meta, str):
            raise DataError("metadata must be a string (the called function's name)",
                            source=source, turn=turn, rule="bad_tool_call")
        if role == "assistant" and meta and meta.strip():
            _, reasoning, weight = _reply_fields(m, role, "", source, turn)
            call = _call(meta.strip(), content, source, turn)
            items.append((turn, Message("assistant", "", (call,), reasoning=reasoning, weight=weight)))
        else:
            content, reasoning, weight = _reply_fields(m, role, content, source, turn)
            items.append((turn, Message(role, content, reasoning=reasoning, weight=weight)))  # type: ignore[arg-type]
    return items, tools


def _sharegpt(obj: Any, source: str) -> tuple[list[_Item], list[dict]]:
    msgs = _messages(obj, "conversations", "sharegpt", source)
    items: list[_Item] = []
    if obj.get("system") is not None:  # the top-level system prompt is implied as message 0
        system = _text(obj["system"], source, None, "system")
        if system:
            items.append((None, Message("system", system)))
    for turn, m in enumerate(msgs, 1):
        sender = _role(m, "from", "sharegpt", source, turn)
        value = _text(m.get("value"), source, turn, "value")
        role = _ROLES["sharegpt"][sender]
        if sender != "function_call":
            value, reasoning, weight = _reply_fields(m, role, value, source, turn)
            items.append((turn, Message(role, value, reasoning=reasoning, weight=weight)))  # type: ignore[arg-type]
            continue
        _, reasoning, weight = _reply_fields(m, role, "", source, turn)
        parsed = _loads(value)
        parsed = parsed if isinstance(parsed, list) else [parsed]
        if not parsed or not all(isinstance(c, dict) for c in parsed):
            raise DataError('function_call value must be JSON {"name": ..., "arguments": {...}} or a list '
                            "of them", source=source, turn=turn, rule="bad_tool_call")
        calls = tuple(_call(c.get("name"), c.get("arguments"), source, turn) for c in parsed)
        items.append((turn, Message("assistant", "", calls, reasoning=reasoning, weight=weight)))
    return items, _tools(obj.get("tools"), source)


# ---- structure -------------------------------------------------------------------------------

def _check_structure(items: list[_Item], source: str) -> None:
    """The role-order rules every template relies on; the first broken one raises."""
    if not items:
        raise DataError("no messages (drop the record, or add a user turn and an assistant reply)",
                        source=source, rule="empty_conversation")
    prev: Message | None = None
    for k, (turn, m) in enumerate(items):
        broken = None
        if m.role == "system" and k > 0:
            broken = ("system_not_first", "system message after the start "
                      "(move it to the start or merge it into the first system message)")
        elif prev is not None and m.role == prev.role == "user":
            broken = ("consecutive_user", "two user messages in a row (merge them or insert the assistant reply)")
        elif prev is not None and m.role == prev.role == "assistant" and prev.tool_calls:
            broken = ("call_without_result", "assistant message right after a tool call: the call has no "
                      "tool result (add the tool message with the result after the call, or drop the call)")
        elif prev is not None and m.role == prev.role == "assistant":
            broken = ("consecutive_assistant",
                      "two assistant messages in a row (merge them or insert the user turn)")
        elif m.role == "tool" and not (prev is not None and (prev.role == "tool" or prev.tool_calls)):
            broken = ("tool_without_call", "tool result without an assistant tool call before it "
                      "(add the assistant message that makes the call, or drop the result)")
        if broken:
            raise DataError(broken[1], source=source, turn=turn, rule=broken[0])
        prev = m
    if not any(m.role == "assistant" for _, m in items):
        raise DataError("no assistant reply, so nothing to train on (add one or drop the record)",
                        source=source, rule="no_assistant")
    if not any(m.role == "assistant" and m.weight for _, m in items):
        raise DataError("every assistant reply has weight 0, so nothing to train on (set weight 1 on a "
                        "reply, or drop the record)", source=source, rule="no_trained_reply")


def _check_tool_use(items: list[_Item], tools: list[dict], source: str) -> None:
    """Calls name declared tools (when the record declares any); result ids name a call."""
    declared = {t.get("function", t).get("name") for t in tools}
    calls: list[ToolCall] = []  # the calls the current run of tool results answers
    for turn, m in items:
        if m.tool_calls:
            calls = list(m.tool_calls)
            for c in calls:
                if tools and c.name not in declared:
                    known = ", ".join(sorted(str(n) for n in declared))
                    raise DataError(f"tool call to {c.name!r}, which the record's tools do not declare (declared: "
                                    f"{known}; fix the name or declare the tool)", source=source, turn=turn,
                                    rule="undeclared_tool")
        elif m.role == "tool" and m.tool_call_id is not None:
            ids = [c.id for c in calls if c.id is not None]
            if m.tool_call_id not in ids:
                raise DataError(f"tool_call_id {m.tool_call_id!r} matches no call of the assistant message before "
                                f"it (its call ids: {', '.join(ids) or 'none'}; fix the id)", source=source,
                                turn=turn, rule="unknown_tool_call_id")
        elif m.role != "tool":
            calls = []


def _unanswered_calls(msgs: tuple[Message, ...]) -> int:
    """Tool calls left without a result before the next user or system turn (not at the end)."""
    missing, pending = 0, 0
    for m in msgs:
        if m.tool_calls:
            missing, pending = missing + pending, len(m.tool_calls)
        elif m.role == "tool":
            pending = max(pending - 1, 0)
        elif m.role == "user":
            missing, pending = missing + pending, 0
    return missing


def _check_unicode(items: list[_Item], tools: list[dict], source: str) -> None:
    """JSON's \\u escapes can write half of a UTF-16 pair, which no tokenizer accepts; say so here."""
    for turn, m in items:
        for text in (m.content, m.name or "", *(t for c in m.tool_calls for t in (c.name, c.arguments))):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"text holds an unpaired surrogate {text[e.start]!r}, which is not Unicode "
                                "(fix the \\u escape that wrote it, or remove it)",
                                source=source, turn=turn, rule="bad_utf8") from None
    if tools:
        try:
            json.dumps(tools, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError("tools hold an unpaired surrogate, which is not Unicode (fix the \\u escape "
                            "that wrote it, or remove it)", source=source, rule="bad_utf8") from None
        except (TypeError, ValueError, RecursionError) as e:
            raise DataError(f"tools are not plain JSON ({type(e).__name__}: {e})", source=source,
                            rule="bad_tools") from None


def _check_choice(setting: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{setting}={value!r} is not one of {', '.join(valid)}")
