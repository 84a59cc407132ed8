"""Broken data and bad settings: every one gets its exact message, its exact count, no traceback.

The corpus is ``tests/broken/`` (byte-exact files; ``.gitattributes`` keeps git off their line
ends) plus one file built here, ``huge_content.jsonl`` (a reply of 1 MB). Each
file's expectation is one row of ``CORPUS``: for every bad line, the rule and the exact message.
Error mode must raise the first of them; skip mode must count exactly those, per rule, and keep
the rest. The same files then go through the command line, in-process (``validate`` exit codes
and summaries, ``encode`` with a tiny ``max_length``) and as real subprocesses (``python -m
turntune``), where stderr must never hold a traceback.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import turntune.data as data_mod
from test_properties import check_contract, glm4_expected_targets, targets_by_turn
from toy import SP, cid, toy_tokenizer
from turntune.cli import main
from turntune.conversation import Conversation, Message
from turntune.data import RULES, load_conversations
from turntune.encoding import EncodeOptions, EncodeReport, encode_conversations
from turntune.errors import DataError
from turntune.templates.glm4 import GLM4Template

BROKEN = Path(__file__).parent / "broken"
HUGE = 1 << 20  # characters in the huge reply


@dataclass(frozen=True)
class Case:
    """A corpus file: valid records, and for each bad line (1-based) its rule and message
    (after ``file:line: ``)."""

    valid: int
    bad: dict[int, tuple[str, str]] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    refused: int = 0  # valid records the encoder refuses (the native GLM-4 format has no reasoning)


NOT_A_CONVERSATION = 'not a conversation (expected {"messages": [...]}, {"conversations": [...]} or a list of messages)'
JSONL_FIX = "(fix the line; JSONL holds one JSON record per line)"
OPENAI_ROLES = "(the openai format knows system, user, assistant, tool)"
NO_CALL = "tool result without an assistant tool call before it (add the assistant message that makes the call, or drop the result)"
NO_REPLY = "no assistant reply, so nothing to train on (add one or drop the record)"
NOT_SCHEMA = "tools must be a list of JSON-schema objects (or its JSON text)"

CORPUS: dict[str, Case] = {
    "malformed_json.jsonl": Case(2, {
        2: ("bad_json", f"not valid JSON: Expecting ',' delimiter at column 48 {JSONL_FIX}"),
        3: ("bad_json", f"not valid JSON: Expecting property name enclosed in double quotes at column 2 {JSONL_FIX}"),
        4: ("bad_json", f"not valid JSON: Expecting value at column 87 {JSONL_FIX}"),  # trailing comma
    }, formats={"openai": 2}),
    "truncated_last_line.jsonl": Case(2, {
        3: ("bad_json", "not valid JSON: Unterminated string starting at column 43 (the file ends mid-record: was it "
                        "truncated? (remove the partial last line))"),
    }, formats={"openai": 2}),
    "wrong_types.jsonl": Case(0, {
        1: ("content_not_string", "turn 2: content is a number, not a string (make it one string; join text parts)"),
        2: ("content_not_string", "turn 1: content is a list, not a string (make it one string; join text parts)"),
        3: ("unknown_format", NOT_A_CONVERSATION),  # "messages" is an object
        4: ("unknown_role", f"turn 1: unknown role 3 {OPENAI_ROLES}"),
        5: ("bad_tool_call", 'turn 2: tool_calls must be a list of {"type": "function", "function": {"name", "arguments"}}'),
        6: ("bad_tool_call", "turn 2: metadata must be a string (the called function's name)"),
        7: ("bad_tools", NOT_SCHEMA),
        8: ("content_not_string", "turn 1: value is null or missing, not a string (make it one string; join text parts)"),
        9: ("unknown_format", NOT_A_CONVERSATION),  # 42
        10: ("unknown_format", NOT_A_CONVERSATION),  # "just a string"
        11: ("unknown_format", NOT_A_CONVERSATION),  # null
        12: ("unknown_format", "turn 2: message is a string, not an object"),
    }),
    "unknown_roles.jsonl": Case(1, {
        1: ("unknown_role", f"turn 2: unknown role 'bot' {OPENAI_ROLES}"),
        2: ("unknown_role", f"turn 1: unknown role 'human' {OPENAI_ROLES}"),
        3: ("unknown_role", f"turn 2: unknown role 'Assistant' {OPENAI_ROLES}"),
        4: ("unknown_role", f"turn 2: unknown role 'ipython' {OPENAI_ROLES}"),
        5: ("unknown_role", "turn 4: unknown role 'tool' (the glm4 format knows system, user, assistant, observation)"),
        6: ("unknown_role", "turn 1: unknown role 'bot' (the sharegpt format knows system, human, gpt, function_call, "
                            "observation, user, assistant, tool, function)"),
    }, formats={"openai": 1}),
    "empty_content.jsonl": Case(4, {
        4: ("empty_conversation", "no messages (drop the record, or add a user turn and an assistant reply)"),
        5: ("empty_conversation", "no messages (drop the record, or add a user turn and an assistant reply)"),
        6: ("unknown_format", NOT_A_CONVERSATION),
    }, formats={"openai": 4}, notes={"empty_reply": 2}),  # "" and "   " replies are kept, and counted
    "huge_content.jsonl": Case(1, formats={"openai": 1}),
    "invalid_utf8.jsonl": Case(1, {
        2: ("bad_utf8", "invalid UTF-8 at byte offset 46 of the line (re-save the file as UTF-8)"),  # \xff
        3: ("bad_utf8", "invalid UTF-8 at byte offset 43 of the line (re-save the file as UTF-8)"),  # cut 3-byte char
        4: ("bad_utf8", "invalid UTF-8 at byte offset 45 of the line (re-save the file as UTF-8)"),  # Latin-1
    }, formats={"openai": 1}),
    "bom.jsonl": Case(2, formats={"openai": 2}),  # a BOM on line 1 and on line 2 (concatenated files)
    "bom.json": Case(1, formats={"openai": 1}),
    "mixed_formats.jsonl": Case(5, formats={"openai": 1, "glm4": 2, "sharegpt": 2}),
    "tool_without_call.jsonl": Case(0, {
        1: ("tool_without_call", f"turn 2: {NO_CALL}"),
        2: ("tool_without_call", f"turn 1: {NO_CALL}"),
        3: ("tool_without_call", f"turn 3: {NO_CALL}"),
        4: ("tool_without_call", f"turn 2: {NO_CALL}"),
    }),
    "special_tokens.jsonl": Case(1, formats={"openai": 1}),
    "no_assistant.jsonl": Case(0, {1: ("no_assistant", NO_REPLY), 2: ("no_assistant", NO_REPLY),
                                   3: ("no_assistant", NO_REPLY), 4: ("no_assistant", NO_REPLY)}),
    "all_replies_too_long.jsonl": Case(1, formats={"openai": 1}),
    "deep_nesting.jsonl": Case(1, {
        1: ("bad_json", "not readable JSON: nested too deeply (records are a few levels deep; is this a conversation?)"),
    }, formats={"openai": 1}),
    "huge_number.jsonl": Case(1, {
        1: ("bad_json", "not readable JSON: a number with more than 4300 digits (write it as a string)"),
    }, formats={"openai": 1}),
    "lone_surrogate.jsonl": Case(1, {
        1: ("bad_utf8", "turn 2: text holds an unpaired surrogate '\\ud83d', which is not Unicode (fix the \\u escape "
                        "that wrote it, or remove it)"),
    }, formats={"openai": 1}),  # line 2 holds a proper pair (an emoji) and is valid
    "bad_tools.jsonl": Case(1, {
        1: ("bad_tools", 'a tool\'s "function" must be an object ({"name": ..., "parameters": {...}})'),
        2: ("bad_tools", NOT_SCHEMA),
        3: ("bad_tools", NOT_SCHEMA),  # ShareGPT tools text that is not JSON
    }, formats={"openai": 1}),
    "crlf.jsonl": Case(2, formats={"openai": 2}),
    "role_order.jsonl": Case(0, {
        1: ("consecutive_user", "turn 2: two user messages in a row (merge them or insert the assistant reply)"),
        2: ("consecutive_assistant", "turn 3: two assistant messages in a row (merge them or insert the user turn)"),
        3: ("system_not_first", "turn 2: system message after the start (move it to the start or merge it into the "
                                "first system message)"),
    }),
    "control_characters.jsonl": Case(1, formats={"openai": 1}),
    "reply_fields.jsonl": Case(2, {
        1: ("bad_reasoning", "turn 2: reasoning given twice: reasoning_content and a <think> block in content (keep one)"),
        2: ("bad_reasoning", "turn 2: content opens <think> but never closes it with </think> (close the reasoning, or "
                             "move it to reasoning_content)"),
        3: ("bad_weight", "turn 2: weight must be 0 or 1, not 2 (0: context only, 1: trained)"),
        4: ("bad_weight", "turn 1: weight on a user message: only assistant replies carry a weight (remove it)"),
        5: ("no_trained_reply", "every assistant reply has weight 0, so nothing to train on (set weight 1 on a reply, "
                                "or drop the record)"),
        6: ("undeclared_tool", "turn 2: tool call to 'wether', which the record's tools do not declare (declared: "
                               "weather; fix the name or declare the tool)"),
        7: ("unknown_tool_call_id", "turn 3: tool_call_id 'c9' matches no call of the assistant message before it "
                                    "(its call ids: c1; fix the id)"),
        8: ("call_without_result", "turn 3: assistant message right after a tool call: the call has no tool result "
                                   "(add the tool message with the result after the call, or drop the call)"),
    }, formats={"openai": 2}, notes={"unanswered_call": 1}, refused=1),
}
# A .json document is one record set: when it does not parse, there is nothing to skip to.
BROKEN_DOCUMENT = ("broken_document.json", 3, "not valid JSON: Expecting value at column 1 (fix the JSON syntax)")
# A file with no record at all (empty, or blank lines only) is a mistake in both modes too.
EMPTY_FILE = ("empty_file.jsonl", "no records: the file is empty, blank or an empty JSON list (one JSON conversation "
                                  "per line for .jsonl, a JSON list for .json)")
WHOLE_FILE = (BROKEN_DOCUMENT[0], EMPTY_FILE[0])


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Every corpus file by name; the huge one is written here rather than kept in git."""
    files = {p.name: p for p in BROKEN.iterdir() if not p.name.startswith(".")}
    huge = tmp_path_factory.mktemp("huge") / "huge_content.jsonl"
    msgs = [{"role": "user", "content": "Write a lot."}, {"role": "assistant", "content": "a" * HUGE},
            {"role": "user", "content": "And briefly?"}, {"role": "assistant", "content": "Yes."}]
    huge.write_text(json.dumps({"messages": msgs}) + "\n")
    files[huge.name] = huge
    return files


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    """The toy tokenizer as a model folder (config.json, no weights): enough for ``encode``."""
    folder = tmp_path_factory.mktemp("toy-folder")
    toy_tokenizer().save_pretrained(folder)
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def glm4():
    return GLM4Template(toy_tokenizer())


def test_the_corpus_is_complete(corpus):
    assert set(corpus) == set(CORPUS) | set(WHOLE_FILE)
    assert len(corpus) == 24
    covered = {rule for case in CORPUS.values() for rule, _ in case.bad.values()}
    assert covered == set(RULES) - {"missing_file", "unreadable_file", "no_records"}  # tests below cover those


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_broken_file_exact_message_and_skip_counts(corpus, monkeypatch, name):
    case, path = CORPUS[name], corpus[name]
    monkeypatch.setattr(data_mod, "MAX_EXAMPLES", 1000)  # keep every message, not the first 3 per rule
    expected = {line: (rule, f"{path}:{line}: {msg}") for line, (rule, msg) in case.bad.items()}
    if expected:
        with pytest.raises(DataError) as info:
            load_conversations(path)
        first = expected[min(expected)]
        assert (info.value.rule, str(info.value)) == first
    else:
        assert len(load_conversations(path).conversations) == case.valid
    res = load_conversations(path, on_invalid="skip")
    r = res.report
    assert (r.records, r.valid, r.n_skipped) == (case.valid + len(case.bad), case.valid, len(case.bad))
    assert r.skipped == Counter(rule for rule, _ in case.bad.values())
    assert {rule: sorted(texts) for rule, texts in r.examples.items()} == {
        rule: sorted(text for ru, text in expected.values() if ru == rule) for rule in r.skipped}
    assert r.formats == Counter(case.formats)
    assert r.notes == Counter(case.notes)
    assert len(res.conversations) == case.valid
    bad_sources = {f"{path}:{line}" for line in case.bad}
    assert not bad_sources & {c.source for c in res.conversations}


def test_empty_file_raises_in_both_modes(corpus, tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    for path in (corpus[EMPTY_FILE[0]], blank):
        for mode in ("error", "skip"):
            with pytest.raises(DataError) as info:
                load_conversations(path, on_invalid=mode)
            assert (info.value.rule, str(info.value)) == ("no_records", f"{path}: {EMPTY_FILE[1]}")


def test_broken_json_document_raises_in_both_modes(corpus):
    name, line, msg = BROKEN_DOCUMENT
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as info:
            load_conversations(corpus[name], on_invalid=mode)
        assert (info.value.rule, str(info.value)) == ("bad_json", f"{corpus[name]}:{line}: {msg}")


# -- what the valid records of the corpus become --------------------------------------------------
def _encode(convs, template, **opts):
    rep, o = EncodeReport(), EncodeOptions(**opts)
    exs = encode_conversations(convs, template, o, report=rep)
    check_contract(convs, exs, rep, o)
    return exs, rep


def test_special_token_text_stays_text_in_the_native_format(corpus, glm4):
    conv = load_conversations(corpus["special_tokens.jsonl"]).conversations[0]
    (ex,), _ = _encode([conv], glm4)
    assert targets_by_turn(ex) == {0: cid("\n<|endoftext|><|observation|>[gMASK]") + [SP["<|user|>"]],
                                   1: cid("\n<|im_end|><|im_start|>user\nhi") + [SP["<|user|>"]]}
    # control ids appear exactly where the format puts them, never from typed text
    assert [i for i in ex.input_ids if i < 10] == [SP[t] for t in ("[gMASK]", "<sop>", "<|system|>", "<|user|>",
                                                                  "<|assistant|>", "<|user|>", "<|assistant|>",
                                                                  "<|user|>")]
    assert targets_by_turn(ex) == dict(enumerate(glm4_expected_targets(conv)))


def test_special_token_text_stays_text_in_a_jinja_template(corpus, smollm2_tokenizer):
    from turntune.templates.hf import HFTemplate

    conv = load_conversations(corpus["special_tokens.jsonl"]).conversations[0]
    (ex,), _ = _encode([conv], HFTemplate(smollm2_tokenizer))
    im_start, im_end = smollm2_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ex.input_ids.count(im_start) == ex.input_ids.count(im_end) == 5  # one per message, none typed
    for t, ids in targets_by_turn(ex).items():
        reply = conv.messages[conv.assistant_indices[t]].content
        assert ids[-1] == im_end and im_start not in ids and im_end not in ids[:-1]
        assert smollm2_tokenizer.decode(ids[:-1]) == reply


def test_every_reply_too_long_is_lost_and_counted(corpus, glm4):
    convs = load_conversations(corpus["all_replies_too_long.jsonl"]).conversations
    for strategy in ("all", "expand", "last"):
        exs, rep = _encode(convs, glm4, strategy=strategy, max_length=64)
        lost = 1 if strategy == "last" else 2
        assert (exs, rep.replies_lost, rep.replies_trained, rep.conversations_without_labels) == ([], lost, 0, 1)
    exs, rep = _encode(convs, glm4, max_length=64, cut_long_replies=True)  # asked for: cut, not lost
    assert (len(exs), rep.replies_cut, rep.replies_lost, rep.replies_trained) == (2, 2, 0, 2)
    assert all(len(e) == 64 for e in exs)


def test_control_characters_and_crlf_encode(corpus, glm4):
    convs = (load_conversations(corpus["control_characters.jsonl"]).conversations
             + load_conversations(corpus["crlf.jsonl"]).conversations)
    exs, rep = _encode(convs, glm4)
    assert rep.replies_trained == 3 and len(exs) == 3
    assert convs[2].messages[0].content == "line one\r\nline two"  # CRLF inside text is text


def test_expand_counts_a_lost_greeting(glm4):
    """A reply before the first user turn that does not fit is lost and counted (found by the
    property tests: it used to vanish uncounted)."""
    conv = Conversation((Message("assistant", "Hello there, how can I help you?"), Message("user", "q"),
                         Message("assistant", "r")), source="greeting.jsonl:1")
    exs, rep = _encode([conv], glm4, strategy="expand", max_length=20)
    assert (rep.replies, rep.replies_trained, rep.replies_lost) == (2, 1, 1)
    assert [targets_by_turn(e) for e in exs] == [{1: cid("\nr") + [SP["<|user|>"]]}]


# -- the command line, in-process -------------------------------------------------------------------
def _validate_exit(name: str) -> int:
    return 1 if CORPUS[name].bad else 0


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_cli_validate_exit_code_and_summary(corpus, capsys, name):
    case, path = CORPUS[name], corpus[name]
    assert main(["validate", str(path)]) == _validate_exit(name)
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0] == f"{path}: {case.valid + len(case.bad)} records, {case.valid} valid, {len(case.bad)} skipped"
    for rule, n in sorted(Counter(rule for rule, _ in case.bad.values()).items()):
        assert f"  skipped {rule}: {n}" in lines
    assert out.err == ""


def test_cli_validate_document_and_missing_file(corpus, tmp_path, capsys):
    name, line, msg = BROKEN_DOCUMENT
    assert main(["validate", str(corpus[name])]) == 2
    assert capsys.readouterr().err == f"turntune: error: {corpus[name]}:{line}: {msg}\n"
    assert main(["validate", str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err == f"turntune: error: {tmp_path / 'nope.jsonl'}: no such file (check the path)\n"


WEIGHTING_VIEW = "weighting token: share of the trained tokens -> share of the loss"


def test_cli_encode_with_a_tiny_max_length_reports_replies_lost(corpus, toy_dir, capsys):
    path = corpus["all_replies_too_long.jsonl"]
    assert main(["encode", str(path), "--model", str(toy_dir), "--max-length", "64"]) == 1  # nothing to train
    out = capsys.readouterr().out.splitlines()
    end = out.index(WEIGHTING_VIEW)  # the report, then where the loss goes (nowhere: no example)
    assert out[end:] == [WEIGHTING_VIEW]
    assert out[end - 5:end] == [
        "conversations 1  ->  examples 0 (extra windows 0)",
        "tokens 0  trained 0 (0.0% of tokens)",
        "replies 2: trained 0, lost (too long) 2, cut 0; reply tokens trained 0.0%",
        "history: rounds dropped 0; tokens seen per reply median 0, p10 0",
        "not prefix-stable 0: as token trees 0 (0 tokens vs 0 expanded, 0.00x), expanded for real 0 (tree not "
        "exact 0); conversations with nothing to train 1"]


@pytest.mark.parametrize("name", sorted(set(CORPUS) - {"huge_content.jsonl"}))  # that one: in the process runs
def test_cli_encode_skipping_every_broken_file(corpus, toy_dir, capsys, name):
    """Skip mode: the valid records are encoded; exit 1 only when nothing is left to train."""
    case = CORPUS[name]
    code = main(["encode", str(corpus[name]), "--model", str(toy_dir), "--max-length", "256", "--on-invalid", "skip"])
    out = capsys.readouterr()
    nothing = case.valid == 0 or name == "all_replies_too_long.jsonl"
    assert code == (1 if nothing else 0), out
    assert f"conversations {case.valid - case.refused}  ->  examples " in out.out
    assert out.err == ""


# -- the command line as a real process: never a traceback ------------------------------------------
# Starting Python and importing transformers costs about 1.5 s of CPU, 46 times over. So one
# driver process imports turntune once, then forks one child per run, and the child runs the
# package's ``__main__`` exactly as ``python -m turntune`` does (``runpy``, with the interpreter's
# own top-level handling: an uncaught exception prints its traceback and exits 1). One run is also
# made cold, with ``python -m turntune``, and must give the same exit code, stdout and stderr.
DRIVER = """
import json, os, runpy, sys, traceback
import transformers.utils.logging, turntune.cli, turntune.data, turntune.encoding, turntune.models
turntune.models.load_tokenizer(sys.argv[2])  # warm: the children inherit every module this imports

def child(args):
    sys.argv = ["turntune", *args]
    try:
        runpy.run_module("turntune", run_name="__main__", alter_sys=True)
    except SystemExit as e:  # as the interpreter does at the top level
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0

codes = []
for job in json.loads(sys.argv[1]):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, job["out"]), (2, job["err"])):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        code = child(job["args"])
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""
COMMANDS = ("validate", "encode")


def _args(corpus, toy_dir, name: str, command: str) -> list[str]:
    extra = ["--model", str(toy_dir), "--max-length", "256"] if command == "encode" else []
    return [command, str(corpus[name]), *extra]


def _expected_exit(name: str, command: str) -> int:
    if name in WHOLE_FILE:
        return 2
    if command == "validate":
        return _validate_exit(name)
    if CORPUS[name].bad:  # encode stops at the first bad record (on_invalid=error)
        return 2
    return 1 if name == "all_replies_too_long.jsonl" else 0


@pytest.fixture(scope="module")
def process_runs(corpus, toy_dir, tmp_path_factory) -> dict[tuple[str, str], tuple[int, str, str]]:
    """``(name, command) -> (exit code, stdout, stderr)`` of a process run for every corpus file."""
    tmp = tmp_path_factory.mktemp("runs")
    keys = [(name, command) for name in sorted(corpus) for command in COMMANDS]
    jobs = [{"args": _args(corpus, toy_dir, *key), "out": str(tmp / f"{i}.out"), "err": str(tmp / f"{i}.err")}
            for i, key in enumerate(keys)]
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs), str(toy_dir)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    codes = json.loads(done.stdout.splitlines()[-1])
    return {key: (code, Path(job["out"]).read_text(), Path(job["err"]).read_text())
            for key, job, code in zip(keys, jobs, codes)}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", sorted([*CORPUS, *WHOLE_FILE]))
def test_a_process_never_prints_a_traceback(process_runs, name, command):
    code, out, err = process_runs[(name, command)]
    assert "Traceback" not in err, err
    assert code == _expected_exit(name, command), (out, err)
    if code == 2:
        assert err.startswith("turntune: error: ") and err.count("\n") == 1, err
    else:
        assert err == ""
    if (name, command) == ("huge_content.jsonl", "encode"):  # the 1 MB reply is lost, and counted
        lines = out.splitlines()
        end = lines.index(WEIGHTING_VIEW)  # the report, then where the loss goes
        assert lines[end + 1:] == ["  reply 2      100.0% -> 100.0%   1 reply", "  answer       100.0% -> 100.0%   1 reply"]
        assert lines[end - 5:end] == [
            "conversations 1  ->  examples 1 (extra windows 0)",
            # [gMASK]<sop><|user|>\nAnd briefly?<|assistant|>\nYes.<|user|>: 23 tokens, the last 6 trained
            "tokens 23  trained 6 (26.1% of tokens)",
            f"replies 2: trained 1, lost (too long) 1, cut 0; reply tokens trained {6 / (HUGE + 8):.1%}",
            "history: rounds dropped 0; tokens seen per reply median 17, p10 17",
            "not prefix-stable 0: as token trees 0 (0 tokens vs 0 expanded, 0.00x), expanded for real 0 (tree not "
            "exact 0); conversations with nothing to train 0"]


def test_a_cold_start_matches_the_forked_run(process_runs, corpus, toy_dir):
    key = ("all_replies_too_long.jsonl", "encode")  # through loading, tokenizer and encoder
    done = subprocess.run([sys.executable, "-m", "turntune", *_args(corpus, toy_dir, *key)], capture_output=True,
                          text=True, timeout=300)
    assert (done.returncode, done.stdout, done.stderr) == process_runs[key]


# -- bad configuration: one clear message naming the setting ----------------------------------------
@pytest.fixture(scope="module")
def plain_tokenizer_dir(tmp_path_factory) -> Path:
    """A model folder whose tokenizer has no chat template and no GLM-4 special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(c): 1 + c - 32 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    folder = tmp_path_factory.mktemp("plain-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(folder)
    (folder / "config.json").write_text("{}")
    return folder


def _train_cfg(tmp: Path, model_path: Path | str, **sections) -> Path:
    data = tmp / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}) + "\n")
    cfg = {"model": {"path": str(model_path)}, "data": {"train": str(data), "eval": None, "max_length": 64},
           "train": {"output_dir": str(tmp / "run"), "max_steps": 1}}
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


SETTINGS = "autocast, epochs, eval_every, grad_accum, gradient_checkpointing, keep_last, log_every, lr, max_grad_norm, " \
           "max_steps, method, micro_batch_tokens, min_lr_ratio, nonfinite, output_dir, parallel, report_to, save_every, schedule, seed, " \
           "warmup_steps, weight_decay"
BAD_CONFIGS = {
    "unknown key": ({"train": {"learning_rate": 1e-4}}, [],
                    f"unknown setting 'train.learning_rate'; valid settings in 'train': {SETTINGS}"),
    "unknown section": ({"optimizer": {"lr": 1}}, [],
                        "unknown setting 'optimizer'; valid settings in 'config': data, lora, model, train"),
    "unknown override": ({}, ["--train.lr_max=1"],
                         f"unknown setting 'train.lr_max'; valid settings in 'train': {SETTINGS}"),
    "integer as text": ({"train": {"max_steps": "ten"}}, [], "train.max_steps: expected an integer, got 'ten'"),
    "number override": ({}, ["--train.lr=fast"], "train.lr: expected a number, got 'fast'"),
    "boolean": ({"model": {"trust_remote_code": "maybe"}}, [],
                "model.trust_remote_code: expected true or false, got 'maybe'"),
    "closed set": ({"data": {"strategy": "everything"}}, [],
                   "data.strategy: unknown value 'everything'; valid values: all, expand, last, full"),
    "list": ({"lora": {"target_modules": 5}}, [], "lora.target_modules: expected a list, got 5"),
    "section as a value": ({"model": "some/folder"}, [], "'model' must be a section (a mapping), got 'some/folder'"),
}


@pytest.mark.parametrize("what", sorted(BAD_CONFIGS))
def test_bad_setting_is_one_message_naming_it(toy_dir, tmp_path, capsys, what):
    sections, overrides, message = BAD_CONFIGS[what]
    cfg = _train_cfg(tmp_path, toy_dir, **sections)
    assert main(["train", str(cfg), *overrides]) == 2
    assert capsys.readouterr().err == f"turntune: error: {message}\n"
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_bad_model_folders(toy_dir, plain_tokenizer_dir, tmp_path, capsys):
    def train_err(model) -> str:
        assert main(["train", str(_train_cfg(tmp_path, model))]) == 2
        return capsys.readouterr().err

    missing = tmp_path / "no-such-model"
    assert train_err(missing) == (
        f"turntune: error: model.path: {missing} is not a folder. Give a local model folder in Hugging Face layout "
        "(config.json, *.safetensors, tokenizer files), or a Hub repo id (owner/name)\n")
    from huggingface_hub import constants

    assert train_err("THUDM/glm-4-9b-chat") == (  # a hub id, offline and not in the cache: not fetched
        "turntune: error: model.path: 'THUDM/glm-4-9b-chat' is not a local folder, so it was taken for a Hugging "
        f"Face Hub repo id, but it is not in the Hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids "
        "downloading it: download it first (`hf download THUDM/glm-4-9b-chat`), set HF_HUB_OFFLINE=0, or give a "
        "local folder\n")
    assert train_err("builtin:llama-7b") == (
        "turntune: error: model.path: unknown built-in 'builtin:llama-7b'; built-ins: builtin:smollm2, builtin:tiny-glm4\n")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    assert train_err(no_config) == (
        f"turntune: error: model.path: {no_config} has no config.json; is it a Hugging Face model folder?\n")
    assert train_err(plain_tokenizer_dir) == (
        "turntune: error: template: the tokenizer has no chat_template and no native format applies (native formats: "
        "glm4); give data.chat_template (a Jinja file) or use a chat model's tokenizer\n")
    # pickled weights only: refused after the data is checked, before anything is unpickled
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in toy_dir.iterdir():
        (pickled / f.name).write_bytes(f.read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"never read")
    assert train_err(pickled) == (
        f"turntune: error: model.path: {pickled} has no *.safetensors weights; turntune does not load pickled "
        "checkpoints (convert them with safetensors first)\n")


def test_glm4_template_forced_on_another_tokenizer(plain_tokenizer_dir, tmp_path, capsys):
    cfg = _train_cfg(tmp_path, plain_tokenizer_dir, data={"template": "glm4"})
    assert main(["train", str(cfg)]) == 2
    assert capsys.readouterr().err == (
        "turntune: error: tokenizer has no GLM-4 special token '<|endoftext|>'; use template 'hf' (the tokenizer's own "
        "chat_template) for this model\n")


def test_config_file_itself(tmp_path, capsys):
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err == f"turntune: error: config file {tmp_path / 'none.yaml'} does not exist\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert main(["train", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"turntune: error: {bad}: not valid YAML: ")
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n- data\n")
    assert main(["train", str(listing)]) == 2
    assert capsys.readouterr().err == (f"turntune: error: {listing}: the top level must be a mapping of sections "
                                       "(model, data, lora, train)\n")


def test_missing_chat_template_file_names_the_setting(toy_dir, tmp_path, capsys):
    missing = tmp_path / "none.jinja"
    cfg = _train_cfg(tmp_path, toy_dir, data={"chat_template": str(missing)})
    assert main(["train", str(cfg)]) == 2
    assert capsys.readouterr().err == f"turntune: error: data.chat_template: cannot read {missing}: No such file or directory\n"


OUT_OF_RANGE = [("train.lr", "-1", "-1.0", "a positive number"), ("train.lr", ".nan", "nan", "a positive number"),
                ("train.grad_accum", "0", "0", "at least 1"), ("lora.r", "0", "0", "at least 1"),
                ("train.max_steps", "-5", "-5", "0 or more"), ("data.max_length", "4", "4", "at least 8"),
                ("train.keep_last", "0", "0", "at least 1"),
                # numpy seeds only take 0 <= seed < 2**32: these used to pass the config and then raise in numpy
                ("train.seed", "-1", "-1", "0 <= x < 2**32"), ("train.seed", "4294967296", "4294967296", "0 <= x < 2**32")]


@pytest.mark.parametrize("setting,value,shown,need", OUT_OF_RANGE)
def test_out_of_range_settings_are_refused_at_load(toy_dir, tmp_path, capsys, setting, value, shown, need):
    """Each of these used to get through loading: a traceback from AdamW, PEFT or a division by zero
    later, or (max_steps, keep_last) a run that trains or keeps nothing."""
    assert main(["train", str(_train_cfg(tmp_path, toy_dir)), f"--{setting}={value}"]) == 2
    assert capsys.readouterr().err == f"turntune: error: {setting}: {shown} is out of range ({need})\n"
    assert not (tmp_path / "run").exists()


# -- user mistakes that used to end in a traceback ---------------------------------------------------
# Each was found escaping as a raw exception (PermissionError, UnicodeEncodeError, RuntimeError,
# TypeError, SafetensorError, ValueError); each must be exit code 2 and one line naming the file or
# setting.
def _cli_err(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _unreadable(monkeypatch, path: Path) -> None:
    """Take read permission away from ``path``. Root ignores file modes (tests run as root), so
    there the refusal the kernel would give anyone else is raised where the file is opened."""
    import errno
    import os

    path.chmod(0)
    if os.geteuid() == 0:
        real = Path.open

        def denied(self, *a, **k):
            if self == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "open", denied)  # Path.read_bytes opens through it too


GOOD_RECORD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]})


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_data_file_without_read_permission(tmp_path, toy_dir, monkeypatch, capsys, suffix):
    path = tmp_path / f"locked{suffix}"
    path.write_text(GOOD_RECORD + "\n")
    _unreadable(monkeypatch, path)
    message = f"{path}: cannot read the file: Permission denied (check that you may read it)"
    for mode in ("error", "skip"):  # there is no record to skip to
        with pytest.raises(DataError) as info:
            load_conversations(path, on_invalid=mode)
        assert (info.value.rule, str(info.value)) == ("unreadable_file", message)
    assert _cli_err(capsys, ["validate", str(path)]) == f"turntune: error: {message}\n"
    assert _cli_err(capsys, ["encode", str(path), "--model", str(toy_dir)]) == f"turntune: error: {message}\n"


def test_a_file_name_that_is_not_utf8_on_a_strict_terminal(tmp_path, toy_dir):
    """A Linux file name may hold any byte; Python hands it over as a lone surrogate, which a
    strict UTF-8 stdout refuses to print. The name is shown with the byte escaped instead."""
    import os

    raw = os.fsencode(tmp_path) + b"/data-\xff.jsonl"
    with open(raw, "wb") as f:
        f.write(GOOD_RECORD.encode() + b"\n{broken\n")
    shown = f"{tmp_path}/data-\\xff.jsonl"
    bad_line = f"{shown}:2: not valid JSON: Expecting property name enclosed in double quotes at column 2 {JSONL_FIX}"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "turntune", *args, os.fsdecode(raw)], capture_output=True,
                              text=True, env=env, timeout=300)

    done = run("validate")
    assert (done.returncode, done.stderr) == (1, ""), done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{shown}: 2 records, 1 valid, 1 skipped"
    assert lines[-2:] == ["  skipped bad_json: 1", f"    {bad_line}"]
    done = run("encode", "--model", str(toy_dir))
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"turntune: error: {bad_line}\n")


def test_model_path_under_an_unknown_users_home(toy_dir, tmp_path, capsys):
    where = "~turntune-no-such-user/models/x"
    message = (f"turntune: error: model.path: {where}: there is no user 'turntune-no-such-user' whose home '~' "
               "could stand for (write the folder's full path)\n")
    assert _cli_err(capsys, ["train", str(_train_cfg(tmp_path, where))]) == message
    assert _cli_err(capsys, ["encode", str(tmp_path / "train.jsonl"), "--model", where]) == message
    assert _cli_err(capsys, ["eval", where, str(tmp_path / "train.jsonl")]) == message


@pytest.mark.parametrize("text,what", [("[1, 2]", "a list"), ('"llama"', "a string"), ("null", "null")])
def test_a_config_json_that_is_not_an_object(toy_dir, tmp_path, capsys, text, what):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in toy_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text(text)
    message = (f"turntune: error: model.path: {folder / 'config.json'} holds {what}, not an object (a Hugging Face "
               "config.json is one JSON object of settings)\n")
    assert _cli_err(capsys, ["train", str(_train_cfg(tmp_path, folder))]) == message
    assert _cli_err(capsys, ["encode", str(tmp_path / "train.jsonl"), "--model", str(folder)]) == message


def _weights(path: Path) -> bytes:
    """A small safetensors file (header of 120 bytes, data 64 bytes) written to ``path``."""
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, 2)}, str(path))
    return path.read_bytes()


# damage -> (the file's bytes from the intact ones, what the message says after "model.path: FILE ")
DAMAGED_WEIGHTS = {
    "cut in the data": (lambda b: b[:150], "is truncated: 150 bytes, its header says 192 (copy the file again)"),
    "cut in the header": (lambda b: b[:40], "is truncated: 40 bytes, its header alone needs 128 (copy the file again)"),
    "shorter than the header length": (lambda b: b[:5], "is truncated: 5 bytes, not even the 8-byte header length "
                                                        "(copy the file again)"),
    "extra bytes": (lambda b: b + b"\0\0\0", "has 195 bytes, its header says 192: it is damaged (copy the file "
                                             "again)"),
    "header not JSON": (lambda b: b[:8] + b"\xff" * 120 + b[128:], "is damaged: its header is not a safetensors "
                                                                   "JSON header (copy the file again)"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_WEIGHTS))
def test_damaged_safetensors_are_found_by_their_header(tmp_path, damage):
    from safetensors import safe_open

    from turntune.errors import ConfigError
    from turntune.models import check_model_folder

    cut, says = DAMAGED_WEIGHTS[damage]
    path = tmp_path / "model.safetensors"
    (tmp_path / "config.json").write_text("{}")
    intact = _weights(path)
    assert check_model_folder(tmp_path) == tmp_path
    path.write_bytes(cut(intact))
    with pytest.raises(ConfigError) as info:
        check_model_folder(tmp_path)
    assert str(info.value) == f"model.path: {path} {says}"
    with pytest.raises(Exception, match="Error while deserializing header"):  # safetensors agrees it is broken
        safe_open(str(path), "pt")


def test_truncated_weights_are_refused_before_the_data_is_read(toy_dir, tmp_path, monkeypatch, capsys):
    import turntune.training as tr

    folder = tmp_path / "model"
    folder.mkdir()
    for f in toy_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "model.safetensors"
    weights.write_bytes(_weights(weights)[:150])

    def too_late(*a, **k):
        raise AssertionError("the data was read before the model folder was checked")

    monkeypatch.setattr(tr, "cached_encode", too_late)
    message = f"turntune: error: model.path: {weights} is truncated: 150 bytes, its header says 192 (copy the file again)\n"
    assert _cli_err(capsys, ["train", str(_train_cfg(tmp_path, folder))]) == message
    monkeypatch.setattr("turntune.data.load_conversations", too_late)  # eval imports it from there
    monkeypatch.setattr("turntune.dataset.cached_encode", too_late)  # encode imports it from there
    assert _cli_err(capsys, ["encode", str(tmp_path / "train.jsonl"), "--model", str(folder)]) == message
    assert _cli_err(capsys, ["eval", str(folder), str(tmp_path / "train.jsonl")]) == message


@pytest.mark.parametrize("setting", ["train.output_dir", "data.train", "data.eval", "model.path",
                                     "data.chat_template"])
def test_a_path_setting_with_a_nul_byte(toy_dir, tmp_path, capsys, setting):
    section, name = setting.split(".")
    cfg = _train_cfg(tmp_path, toy_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw.setdefault(section, {})[name] = f"{tmp_path}/run\0x"
    cfg.write_text(yaml.safe_dump(raw))
    assert _cli_err(capsys, ["train", str(cfg)]) == (
        f"turntune: error: {setting}: '{tmp_path}/run\\x00x' holds a NUL byte, which no path can (remove it)\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", ["train.output_dir", "data.train", "model.path"])
def test_an_empty_path_setting(toy_dir, tmp_path, monkeypatch, capsys, setting):
    """An empty path is the current folder to the OS: a run would write its checkpoints there."""
    monkeypatch.chdir(tmp_path)
    assert _cli_err(capsys, ["train", str(_train_cfg(tmp_path, toy_dir)), f"--{setting}="]) == (
        f"turntune: error: {setting}: empty; give a path\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "train.jsonl"]  # nothing written
