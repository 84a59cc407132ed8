"""Loading and validating conversations: exact parses, every rule's exact message, file edge cases."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turntune.conversation import Conversation, Message, ToolCall
from turntune.data import RULES, DataReport, detect_format, load_conversations, parse_record
from turntune.errors import ConfigError, DataError

DATA = Path(__file__).parent / "data"
EXAMPLES = Path(__file__).parent.parent / "examples"


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def error_of(record, format="auto") -> DataError:
    with pytest.raises(DataError) as info:
        parse_record(record, "d.jsonl:17", format=format)
    return info.value


# ---- the three shapes, parsed exactly -------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_openai_with_tool_call_dict_arguments_dumped_unescaped():
    record = {"messages": [
        {"role": "system", "content": "You are terse."}, u("Weather in Zürich?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": '{"temp_c": 3}'},
        a("3 C.")], "tools": [WEATHER_TOOL]}
    assert parse_record(record, "f.jsonl:1") == Conversation(
        messages=(Message("system", "You are terse."), Message("user", "Weather in Zürich?"),
                  Message("assistant", "", (ToolCall("get_weather", '{"city": "Zürich"}', "c1"),)),
                  Message("tool", '{"temp_c": 3}', name="get_weather", tool_call_id="c1"),
                  Message("assistant", "3 C.")),
        tools=(WEATHER_TOOL,), source="f.jsonl:1")


def test_openai_keeps_argument_text_verbatim_and_text_beside_calls():
    record = {"messages": [u("q"), {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '{ "x":1 }'}}]}]}
    assert parse_record(record).messages[1] == Message("assistant", "Let me look.", (ToolCall("f", '{ "x":1 }'),))


def test_glm4_dict_tools_on_system_metadata_call_observation():
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    record = {"messages": [
        {"role": "system", "content": "", "tools": tools}, u("Weather in Beijing?"),
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Beijing"}'},
        {"role": "observation", "content": '{"temp_c": 20}'},
        {"role": "assistant", "metadata": "", "content": "20 C."}]}
    assert detect_format(record) == "glm4"
    assert parse_record(record, "g:3") == Conversation(
        messages=(Message("system", ""), Message("user", "Weather in Beijing?"),
                  Message("assistant", "", (ToolCall("get_weather", '{"city": "Beijing"}'),)),
                  Message("tool", '{"temp_c": 20}'), Message("assistant", "20 C.")),
        tools=(tools[0],), source="g:3")


def test_glm4_bare_list():
    conv = parse_record([u("Hi"), a("Hello")], "g:1")
    assert conv == Conversation((Message("user", "Hi"), Message("assistant", "Hello")), (), "g:1")


def test_sharegpt_system_tools_text_function_call_observation():
    record = {"system": "Be kind.", "tools": '[{"name": "add"}]', "conversations": [
        {"from": "human", "value": "1+2?"},
        {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 1, "b": 2}}'},
        {"from": "observation", "value": "3"}, {"from": "gpt", "value": "3"}]}
    assert parse_record(record, "s:2") == Conversation(
        messages=(Message("system", "Be kind."), Message("user", "1+2?"),
                  Message("assistant", "", (ToolCall("add", '{"a": 1, "b": 2}'),)),
                  Message("tool", "3"), Message("assistant", "3")),
        tools=({"name": "add"},), source="s:2")


def test_sharegpt_parallel_calls_as_a_list():
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": json.dumps(
        [{"name": "f", "arguments": "{}"}, {"name": "g", "arguments": {"k": "v"}}])}]}
    assert parse_record(record).messages[1].tool_calls == (ToolCall("f", "{}"), ToolCall("g", '{"k": "v"}'))


def test_format_override():
    plain = {"messages": [u("q"), a("r")]}
    assert detect_format(plain) == "openai"
    assert parse_record(plain, format="glm4") == parse_record(plain, format="openai")
    assert str(error_of({"conversations": []}, format="openai")) == (
        'd.jsonl:17: expected a list under "messages" for the openai format (set the format to auto or fix the record)')
    with pytest.raises(ConfigError, match="format='chatml' is not one of auto, openai, glm4, sharegpt"):
        parse_record(plain, format="chatml")  # type: ignore[arg-type]


# ---- every rule, minimal record, exact message ----------------------------------------------

CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}
RULE_CASES = [
    ("unknown_format", {"foo": 1},
     'd.jsonl:17: not a conversation (expected {"messages": [...]}, {"conversations": [...]} or a list of messages)'),
    ("unknown_format", {"messages": [u("q"), "a"]}, "d.jsonl:17: turn 2: message is a string, not an object"),
    ("unknown_role", {"messages": [u("q"), {"role": "bot", "content": "r"}]},
     "d.jsonl:17: turn 2: unknown role 'bot' (the openai format knows system, user, assistant, tool)"),
    ("unknown_role", {"messages": [{"role": ["user"], "content": "q"}, a("r")]},
     "d.jsonl:17: turn 1: unknown role ['user'] (the openai format knows system, user, assistant, tool)"),
    ("unknown_role", {"conversations": [{"from": "bot", "value": "q"}]},
     "d.jsonl:17: turn 1: unknown role 'bot' (the sharegpt format knows system, human, gpt, function_call, "
     "observation, user, assistant, tool, function)"),
    ("content_not_string", {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}, a("r")]},
     "d.jsonl:17: turn 1: content is a list, not a string (make it one string; join text parts)"),
    ("content_not_string", {"messages": [u("q"), {"role": "assistant", "content": None}]},
     "d.jsonl:17: turn 2: content is null or missing, not a string (make it one string; join text parts)"),
    ("system_not_first", {"messages": [u("q"), {"role": "system", "content": "s"}, a("r")]},
     "d.jsonl:17: turn 2: system message after the start "
     "(move it to the start or merge it into the first system message)"),
    ("consecutive_user", {"messages": [u("q"), u("q2"), a("r")]},
     "d.jsonl:17: turn 2: two user messages in a row (merge them or insert the assistant reply)"),
    ("consecutive_assistant", {"messages": [u("q"), a("r"), a("r2")]},
     "d.jsonl:17: turn 3: two assistant messages in a row (merge them or insert the user turn)"),
    ("no_assistant", {"messages": [{"role": "system", "content": "s"}, u("q")]},
     "d.jsonl:17: no assistant reply, so nothing to train on (add one or drop the record)"),
    ("tool_without_call", {"messages": [u("q"), {"role": "tool", "content": "3"}, a("r")]},
     "d.jsonl:17: turn 2: tool result without an assistant tool call before it "
     "(add the assistant message that makes the call, or drop the result)"),
    ("tool_without_call", {"messages": [u("q"), a("r"), {"role": "tool", "content": "3"}]},
     "d.jsonl:17: turn 3: tool result without an assistant tool call before it "
     "(add the assistant message that makes the call, or drop the result)"),
    ("empty_conversation", {"messages": []},
     "d.jsonl:17: no messages (drop the record, or add a user turn and an assistant reply)"),
    ("bad_tool_call", {"messages": [u("q"), {"role": "assistant", "content": None, "tool_calls": {"name": "f"}}]},
     'd.jsonl:17: turn 2: tool_calls must be a list of {"type": "function", "function": {"name", "arguments"}}'),
    ("bad_tool_call", {"messages": [u("q"), {**CALL, "tool_calls": [{"function": {"name": "", "arguments": "{}"}}]}]},
     "d.jsonl:17: turn 2: tool call has no function name (give each call a non-empty name)"),
    ("bad_tool_call", {"messages": [u("q"), {**CALL, "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]},
     "d.jsonl:17: turn 2: arguments of tool call 'f' are not a JSON object "
     '(write them as {"arg": value}, as an object or its JSON text)'),
    ("bad_tool_call", [u("q"), {"role": "assistant", "metadata": "python", "content": "print(1)"}],
     "d.jsonl:17: turn 2: arguments of tool call 'python' are not a JSON object "
     '(write them as {"arg": value}, as an object or its JSON text)'),
    ("bad_tool_call", {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f()"}]},
     'd.jsonl:17: turn 2: function_call value must be JSON {"name": ..., "arguments": {...}} or a list of them'),
    ("bad_tools", {"messages": [u("q"), a("r")], "tools": {"name": "f"}},
     "d.jsonl:17: tools must be a list of JSON-schema objects (or its JSON text)"),
    ("bad_reasoning", {"messages": [u("q"), {"role": "assistant", "content": "<think>a</think>b",
                                             "reasoning_content": "a"}]},
     "d.jsonl:17: turn 2: reasoning given twice: reasoning_content and a <think> block in content (keep one)"),
    ("bad_weight", {"messages": [u("q"), {"role": "assistant", "content": "r", "weight": 0.5}]},
     "d.jsonl:17: turn 2: weight must be 0 or 1, not 0.5 (0: context only, 1: trained)"),
    ("no_trained_reply", {"messages": [u("q"), {"role": "assistant", "content": "r", "weight": 0}]},
     "d.jsonl:17: every assistant reply has weight 0, so nothing to train on (set weight 1 on a reply, or drop "
     "the record)"),
    ("undeclared_tool", {"messages": [u("q"), CALL], "tools": [{"type": "function", "function": {"name": "g"}}]},
     "d.jsonl:17: turn 2: tool call to 'f', which the record's tools do not declare (declared: g; fix the name "
     "or declare the tool)"),
    ("unknown_tool_call_id", {"messages": [u("q"), CALL, {"role": "tool", "content": "3", "tool_call_id": "x"}]},
     "d.jsonl:17: turn 3: tool_call_id 'x' matches no call of the assistant message before it (its call ids: "
     "none; fix the id)"),
    ("call_without_result", {"messages": [u("q"), CALL, a("r")]},
     "d.jsonl:17: turn 3: assistant message right after a tool call: the call has no tool result (add the tool "
     "message with the result after the call, or drop the call)"),
]


@pytest.mark.parametrize("rule,record,message", RULE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RULE_CASES)])
def test_rule(rule, record, message):
    err = error_of(record)
    assert (err.rule, str(err)) == (rule, message)
    assert err.source == "d.jsonl:17"


def test_every_record_rule_has_a_case():
    file_rules = {"missing_file", "unreadable_file", "bad_json", "bad_utf8", "no_records"}  # on files (test_broken_inputs)
    assert {c[0] for c in RULE_CASES} == set(RULES) - file_rules


def test_turn_counts_the_records_own_list_not_the_implied_system():
    record = {"system": "s", "conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "t"}]}
    err = error_of(record)
    assert (err.rule, err.turn) == ("system_not_first", 2)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                     max_leaves=12)
_roles = st.sampled_from(["system", "user", "assistant", "tool", "observation", "x"]) | _json
_message = st.fixed_dictionaries({"role": _roles},
                                 optional={"content": _json | st.text(max_size=5), "metadata": _json,
                                           "tool_calls": _json, "tools": _json})
_record = (st.fixed_dictionaries({"messages": st.lists(_message, max_size=5)}, optional={"tools": _json})
           | st.lists(_message, max_size=5)
           | st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
               {"from": st.sampled_from(["human", "gpt", "function_call", "observation", "system"]),
                "value": _json | st.text(max_size=5)}), max_size=5)}, optional={"system": _json, "tools": _json})
           | _json)


@settings(max_examples=300, deadline=None)
@given(_record)
def test_any_json_value_gives_a_conversation_or_a_data_error(record):
    try:
        conv = parse_record(record, "h:1")
    except DataError as err:
        assert err.rule in RULES and str(err).startswith("h:1: ")
    else:
        assert any(m.role == "assistant" for m in conv.messages)


def test_allowed_edge_cases():
    # assistant first (a greeting), empty texts, trailing user turn, a call with no result
    conv = parse_record({"messages": [a("Hi!"), u(""), a(""), u("more?")]})
    assert [m.role for m in conv.messages] == ["assistant", "user", "assistant", "user"]
    assert parse_record({"messages": [u("q"), CALL]}).messages[1].tool_calls == (ToolCall("f", "{}"),)


# ---- files ----------------------------------------------------------------------------------

def test_mixed_file_counts_formats_and_ignores_blank_lines():
    res = load_conversations(DATA / "mixed.jsonl")
    path = str(DATA / "mixed.jsonl")
    assert [c.source for c in res.conversations] == [f"{path}:{n}" for n in (1, 3, 5, 6)]
    assert res.report.formats == Counter(openai=1, glm4=2, sharegpt=1)
    assert (res.report.records, res.report.valid, res.report.n_skipped) == (4, 4, 0)
    assert res.conversations[1] == parse_record(json.loads((DATA / "mixed.jsonl").read_text().splitlines()[2]),
                                                f"{path}:3")


def test_bom_is_tolerated():
    res = load_conversations(DATA / "bom.jsonl")
    assert [c.messages[0].content for c in res.conversations] == ["a", "Hi"]


def test_truncated_last_line():
    path = str(DATA / "truncated.jsonl")
    with pytest.raises(DataError) as info:
        load_conversations(path)
    assert (info.value.rule, str(info.value)) == ("bad_json", (
        f"{path}:3: not valid JSON: Expecting property name enclosed in double quotes at column 31 "
        "(the file ends mid-record: was it truncated? (remove the partial last line))"))
    res = load_conversations(path, on_invalid="skip")
    assert (res.report.records, res.report.valid, res.report.skipped) == (3, 2, Counter(bad_json=1))


def test_invalid_utf8_names_the_line():
    path = str(DATA / "bad_utf8.jsonl")
    with pytest.raises(DataError) as info:
        load_conversations(path)
    assert (info.value.rule, str(info.value)) == (
        "bad_utf8", f"{path}:2: invalid UTF-8 at byte offset 46 of the line (re-save the file as UTF-8)")
    res = load_conversations(path, on_invalid="skip")
    assert [c.source for c in res.conversations] == [f"{path}:1", f"{path}:3"]


def test_json_array_sources_are_indices():
    path = str(DATA / "array.json")
    res = load_conversations(path)
    assert [c.source for c in res.conversations] == [f"{path}:#0", f"{path}:#1", f"{path}:#2"]
    assert res.report.formats == Counter(openai=1, glm4=1, sharegpt=1)


def test_json_document_that_is_one_glm4_conversation():
    res = load_conversations(DATA / "single_glm4.json")
    assert len(res.conversations) == 1 and len(res.conversations[0].messages) == 4


def test_broken_json_document_raises_even_when_skipping():
    path = str(DATA / "broken.json")
    with pytest.raises(DataError, match=rf"^{path}:3: not valid JSON: Expecting value at column 17 \(fix the JSON"):
        load_conversations(path, on_invalid="skip")
    with pytest.raises(DataError, match=r":2: not valid JSON: Extra data at column 1 \(one record per line belongs"):
        load_conversations(DATA / "jsonl_named.json")


def test_missing_file_and_bad_settings():
    with pytest.raises(DataError) as info:
        load_conversations(DATA / "nope.jsonl")
    assert (info.value.rule, str(info.value)) == (
        "missing_file", f"{DATA / 'nope.jsonl'}: no such file (check the path)")
    with pytest.raises(ConfigError, match="on_invalid='drop' is not one of error, skip"):
        load_conversations(DATA / "bom.jsonl", on_invalid="drop")  # type: ignore[arg-type]


def test_error_mode_raises_the_first_error():
    with pytest.raises(DataError) as info:
        load_conversations(DATA / "invalid.jsonl")
    assert str(info.value) == (f"{DATA / 'invalid.jsonl'}:2: turn 3: two assistant messages in a row "
                               "(merge them or insert the user turn)")


def test_skip_mode_counts_every_rule_and_keeps_examples():
    path = str(DATA / "invalid.jsonl")
    res = load_conversations(path, on_invalid="skip")
    r = res.report
    assert (r.records, r.valid, r.n_skipped) == (10, 3, 7)
    assert r.skipped == Counter(consecutive_assistant=2, consecutive_user=1, unknown_format=1, unknown_role=1,
                                no_assistant=1, bad_json=1)
    assert r.examples["consecutive_assistant"] == [
        f"{path}:2: turn 3: two assistant messages in a row (merge them or insert the user turn)",
        f"{path}:6: turn 3: two assistant messages in a row (merge them or insert the user turn)"]
    assert r.notes == Counter(empty_reply=1, trailing_context=1)
    assert [c.source for c in res.conversations] == [f"{path}:1", f"{path}:8", f"{path}:9"]
    assert r.summary().splitlines() == [
        f"{path}: 10 records, 3 valid, 7 skipped",
        "  formats: openai 3",
        "  messages: 7, assistant turns: 3 (1.0 per conversation)",
        "  skipped bad_json: 1",
        f"    {path}:10: not valid JSON: Expecting property name enclosed in double quotes at column 2 "
        "(fix the line; JSONL holds one JSON record per line)",
        "  skipped consecutive_assistant: 2",
        f"    {path}:2: turn 3: two assistant messages in a row (merge them or insert the user turn)",
        f"    {path}:6: turn 3: two assistant messages in a row (merge them or insert the user turn)",
        "  skipped consecutive_user: 1",
        f"    {path}:3: turn 2: two user messages in a row (merge them or insert the assistant reply)",
        "  skipped no_assistant: 1",
        f"    {path}:7: no assistant reply, so nothing to train on (add one or drop the record)",
        "  skipped unknown_format: 1",
        f'    {path}:4: not a conversation (expected {{"messages": [...]}}, {{"conversations": [...]}} '
        "or a list of messages)",
        "  skipped unknown_role: 1",
        f"    {path}:5: turn 2: unknown role 'bot' (the openai format knows system, user, assistant, tool)",
        "  note empty_reply: 1 assistant replies with no text and no tool call (train only the stop)",
        "  note trailing_context: 1 conversations end after their last reply (no loss there)",
    ]


def test_empty_report_summary():
    assert DataReport(path="x.jsonl").summary() == "x.jsonl: 0 records, 0 valid, 0 skipped"


# ---- the shipped example data ---------------------------------------------------------------

def _make_data():
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLES / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_example_data_is_valid_held_out_and_up_to_date():
    train = load_conversations(EXAMPLES / "data" / "train.jsonl", on_invalid="skip")
    evals = load_conversations(EXAMPLES / "data" / "eval.jsonl", on_invalid="skip")
    for res, n in ((train, 200), (evals, 40)):
        assert (res.report.records, res.report.valid, res.report.n_skipped) == (n, n, 0)
        assert sum(bool(c.tools) for c in res.conversations) == n // 10
        replies = [m.content for c in res.conversations for m in c.messages if m.role == "assistant" and m.content]
        assert all(r.endswith(" - Tally") and ": " in r for r in replies)  # the persona the model should learn
    make_data = _make_data()
    def questions(res):
        return {q for c in res.conversations for q in make_data._questions({"messages": c.to_hf()})}
    assert not questions(train) & questions(evals)
    assert make_data.main(["--check"]) == 0  # regenerating gives the committed files byte for byte


def test_example_data_is_short_enough_for_cpu_training(smollm2_tokenizer):
    """Average 150-400 SmolLM2 tokens per conversation (chat template included), none over 512."""
    for split in ("train", "eval"):
        convs = load_conversations(EXAMPLES / "data" / f"{split}.jsonl").conversations
        lengths = [len(smollm2_tokenizer.apply_chat_template(c.to_hf(), tokenize=True)["input_ids"]) for c in convs]
        assert 150 <= sum(lengths) / len(lengths) <= 400, split
        assert max(lengths) <= 512, split


@pytest.mark.parametrize("record,rule", [
    # JSON inside a string that Python cannot hold: a rule broken, never a RecursionError/ValueError
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[" * 3000 + "]" * 3000}}]}]}, "bad_tool_call"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
      "tools": '[{"n": ' + "9" * 5000 + "}]"}, "bad_tools"),
    ({"conversations": [{"from": "human", "value": "q"},
                        {"from": "function_call", "value": '{"name": "f", "arguments": {"x": ' + "9" * 5000 + "}}"}]},
     "bad_tool_call"),
])
def test_nested_json_python_cannot_hold_is_a_rule(tmp_path, record, rule):
    with pytest.raises(DataError) as info:
        parse_record(record, "x:1")
    assert info.value.rule == rule
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert load_conversations(path, on_invalid="skip").report.skipped == {rule: 1}
