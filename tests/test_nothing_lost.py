"""Nothing lost between the data file and the loss: every field that changes what is trained is
read (reasoning, per-reply weight, tool-call ids), every other key is counted, and the rules that
were missing or pointed at the wrong fix have their own names."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from turntune.conversation import Message, ToolCall
from turntune.data import RULES, load_conversations, parse_record
from turntune.errors import DataError


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str, **kw) -> dict:
    return {"role": "assistant", "content": text, **kw}


def call(name: str, args: dict, id: str | None = None) -> dict:
    c = {"type": "function", "function": {"name": name, "arguments": args}}
    return {**c, "id": id} if id else c


def error_of(record) -> DataError:
    with pytest.raises(DataError) as info:
        parse_record(record, "d.jsonl:5")
    return info.value


# ---- reasoning --------------------------------------------------------------------------------

def test_reasoning_content_is_read_in_every_shape():
    openai = parse_record({"messages": [u("q"), a("42", reasoning_content="6 times 7")]})
    assert openai.messages[1] == Message("assistant", "42", reasoning="6 times 7")
    glm = parse_record([u("q"), {"role": "assistant", "content": "42", "reasoning_content": "6 times 7"}])
    assert glm.messages[1].reasoning == "6 times 7"
    share = parse_record({"conversations": [{"from": "human", "value": "q"},
                                            {"from": "gpt", "value": "42", "reasoning_content": "6 times 7"}]})
    assert share.messages[1].reasoning == "6 times 7"


@pytest.mark.parametrize("content,reasoning,rest", [
    ("<think>\n6 times 7\n</think>\n\n42", "6 times 7", "42"),
    ("<think>6 times 7</think>42", "6 times 7", "42"),
    ("  <think>\n\n</think>\n\n42", "", "42"),  # an empty think block: no reasoning
    ("42 <think>not at the start</think>", "", "42 <think>not at the start</think>"),
])
def test_leading_think_block_in_content_is_reasoning(content, reasoning, rest):
    m = parse_record({"messages": [u("q"), a(content)]}).messages[1]
    assert (m.reasoning, m.content) == (reasoning, rest)


def test_reasoning_rules():
    err = error_of({"messages": [u("q"), a("<think>x</think>y", reasoning_content="x")]})
    assert (err.rule, err.turn) == ("bad_reasoning", 2)
    assert "reasoning given twice" in str(err)
    err = error_of({"messages": [u("q"), a("<think>never closed")]})
    assert err.rule == "bad_reasoning" and "</think>" in str(err)
    err = error_of({"messages": [u("q"), a("y", reasoning_content=["x"])]})
    assert err.rule == "bad_reasoning" and "a list" in str(err)


def test_a_reply_with_only_reasoning_is_not_an_empty_reply(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"messages": [u("q"), a("", reasoning_content="hmm")]}) + "\n")
    assert load_conversations(p).report.notes == Counter()


# ---- per-reply weight -------------------------------------------------------------------------

def test_weight_is_read_in_every_shape():
    conv = parse_record({"messages": [u("q"), a("bad", weight=0), u("again"), a("good", weight=1)]})
    assert [m.weight for m in conv.messages] == [1, 0, 1, 1]
    assert conv.trained_turns == [1]
    glm = parse_record([u("q"), {"role": "assistant", "content": "x", "weight": 0}, u("q"), a("y")])
    assert glm.trained_turns == [1]
    share = parse_record({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x", "weight": 0},
                                            {"from": "human", "value": "q"}, {"from": "gpt", "value": "y"}]})
    assert share.trained_turns == [1]


@pytest.mark.parametrize("weight", [2, 0.5, "1", True, None, -1])
def test_weight_other_than_0_or_1_is_a_rule(weight):
    err = error_of({"messages": [u("q"), a("x", weight=weight)]})
    assert (err.rule, err.turn) == ("bad_weight", 2)
    assert str(err).startswith("d.jsonl:5: turn 2: weight must be 0 or 1")


def test_weight_on_a_user_message_is_a_rule():
    err = error_of({"messages": [{"role": "user", "content": "q", "weight": 0}, a("x")]})
    assert (err.rule, err.turn) == ("bad_weight", 1)


def test_every_reply_weight_0_is_nothing_to_train():
    err = error_of({"messages": [u("q"), a("x", weight=0)]})
    assert err.rule == "no_trained_reply"


# ---- tool calls: ids, declared tools, results -------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def test_tool_call_ids_are_kept():
    conv = parse_record({"messages": [u("q"), a("", tool_calls=[call("weather", {"city": "Oslo"}, "c1")]),
                                      {"role": "tool", "tool_call_id": "c1", "content": "3"}, a("3 C")],
                         "tools": [WEATHER]})
    assert conv.messages[1].tool_calls == (ToolCall("weather", '{"city": "Oslo"}', "c1"),)
    assert conv.messages[2].tool_call_id == "c1"
    assert conv.to_hf()[1]["tool_calls"][0] == {"type": "function", "id": "c1",
                                                "function": {"name": "weather", "arguments": {"city": "Oslo"}}}


def test_call_to_an_undeclared_tool():
    err = error_of({"messages": [u("q"), a("", tool_calls=[call("wether", {})]), {"role": "tool", "content": "3"},
                                 a("r")], "tools": [WEATHER]})
    assert (err.rule, err.turn) == ("undeclared_tool", 2)
    assert "'wether'" in str(err) and "weather" in str(err)
    # no tools declared: nothing to check against
    parse_record({"messages": [u("q"), a("", tool_calls=[call("wether", {})]), {"role": "tool", "content": "3"}, a("r")]})


def test_tool_call_id_that_matches_no_call():
    err = error_of({"messages": [u("q"), a("", tool_calls=[call("weather", {}, "c1")]),
                                 {"role": "tool", "tool_call_id": "c2", "content": "3"}, a("r")]})
    assert (err.rule, err.turn) == ("unknown_tool_call_id", 3)
    assert "'c2'" in str(err) and "c1" in str(err)


def test_tool_call_followed_by_a_reply_instead_of_its_result():
    err = error_of({"messages": [u("q"), a("", tool_calls=[call("weather", {})]), a("it is cold")]})
    assert (err.rule, err.turn) == ("call_without_result", 3)
    assert "tool result" in str(err) and "merge" not in str(err)


def test_unanswered_calls_before_a_user_turn_are_counted(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": [u("q"), a("", tool_calls=[call("weather", {}), call("weather", {})]),
                                          {"role": "tool", "content": "3"}, u("hm?"), a("r")]}) + "\n")
    res = load_conversations(p)
    assert res.report.notes["unanswered_call"] == 1
    assert "unanswered_call" in res.report.summary()


# ---- ShareGPT's user/assistant variant ----------------------------------------------------------

def test_sharegpt_with_user_assistant_tool_roles():
    conv = parse_record({"conversations": [
        {"from": "user", "value": "q"},
        {"from": "function_call", "value": json.dumps({"name": "f", "arguments": {}})},
        {"from": "tool", "value": "3"}, {"from": "assistant", "value": "r"},
        {"from": "user", "value": "q2"}, {"from": "function_call", "value": json.dumps({"name": "f", "arguments": {}})},
        {"from": "function", "value": "4"}, {"from": "assistant", "value": "r2"}]})
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"] * 2


# ---- keys nobody reads are counted -------------------------------------------------------------

def test_unread_keys_are_counted_per_key(tmp_path):
    p = tmp_path / "k.jsonl"
    rows = [{"id": 1, "messages": [{"role": "user", "content": "q", "thinking": "x"},
                                   {"role": "assistant", "content": "r", "thinking": "y", "loss": 1}]},
            {"id": 2, "messages": [u("q"), a("r", contnet="typo")]}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = load_conversations(p).report
    assert rep.ignored_keys == Counter({"message.thinking": 2, "message.loss": 1, "message.contnet": 1, "id": 2})
    assert "  ignored keys (not read): id 2, message.contnet 1, message.loss 1, message.thinking 2" in rep.summary()


def test_a_misspelt_content_key_is_still_an_error():
    err = error_of({"messages": [u("q"), {"role": "assistant", "contnet": "r"}]})
    assert err.rule == "content_not_string"


def test_every_new_rule_is_public():
    for rule in ("bad_reasoning", "bad_weight", "no_trained_reply", "undeclared_tool", "unknown_tool_call_id",
                 "call_without_result"):
        assert rule in RULES
