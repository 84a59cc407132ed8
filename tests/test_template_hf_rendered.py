"""HFTemplate renders (and trains) everything a message says, or refuses the conversation.

Reasoning reaches templates as ``reasoning_content``, tool-call arguments as a mapping; after
rendering, every reply's content, reasoning and tool calls (name and arguments) must be in its
span and every other message's content somewhere in the rendering, else ``not_rendered``.
Assistant-first conversations (an opening greeting) train the greeting like any reply.
Test tokenizers are SmolLM2's, with other templates and added tokens set on copies.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
from tokenizers import AddedToken

from turntune.constants import IGNORE_INDEX
from turntune.conversation import Conversation, Message, ToolCall
from turntune.encoding import EncodeOptions, encode_conversations
from turntune.errors import TemplateError
from turntune.templates.hf import HFTemplate, _key, _messages

CHATML_TOOLS = (Path(__file__).resolve().parents[1] / "examples" / "templates" / "chatml-tools.jinja").read_text()
HEAD = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
GEN = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

# Qwen3's assistant turn: reasoning_content when given (else split out of content at </think>), a
# think block only after the last user query; arguments written as JSON (| tojson on a mapping).
QWEN3 = r"""
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}{%- endif %}{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or message.role == "system" %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- set tool_call = tool_call.function %}
            {{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

# GLM-4.5's way with arguments: each key and value written out (.items()), strings as they are.
ITEMS = HEAD + (
    "{% if m.role == 'assistant' %}{{ m.content }}{% for tc in m.tool_calls or [] %}"
    "{{ '<tool_call>' + tc.function.name + '\\n' }}{% for k, v in tc.function.arguments.items() %}"
    "{{ '<arg_key>' + k + '</arg_key>\\n<arg_value>' }}{{ v if v is string else v | tojson }}{{ '</arg_value>\\n' }}"
    "{% endfor %}{{ '</tool_call>' }}{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}") + GEN


def calls_template(arguments: str) -> str:
    """ChatML whose tool calls are ``{"name": ..., "arguments": <arguments>}``, ``a`` the mapping."""
    return HEAD + ("{{ m.content }}{% for tc in m.tool_calls or [] %}{% set a = tc.function.arguments %}"
                   "{{ '<tool_call>{\"name\": \"' + tc.function.name + '\", \"arguments\": ' }}" + arguments +
                   "{{ '}</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}") + GEN


TOJSON = calls_template("{{ a | tojson }}")
DOUBLE = calls_template("{{ a | tojson | tojson }}")  # the JSON text as a JSON string: encoded twice
NO_ARGS = calls_template("{{ '{}' }}")  # the call without its arguments


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    """SmolLM2's tokenizer with Qwen's reasoning and tool-call tags as (non-special) added tokens."""
    t = copy.deepcopy(smollm2_tokenizer)  # the session tokenizer is shared: never mutate it
    t.add_tokens([AddedToken(x, special=False, normalized=False)
                  for x in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")])
    return t


def text_of(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained(tok, r) -> list[str]:
    """The text of each reply's trained tokens (one run ending at turn_end)."""
    out = []
    for k, end in enumerate(r.turn_end):
        at = [i for i, t in enumerate(r.turn) if t == k]
        assert at == list(range(at[0], end)), f"reply {k} is not one run ending at turn_end"
        out.append(text_of(tok, r.input_ids[at[0]:end]))
    return out


def labelled(tok, exs) -> list[str]:
    return [text_of(tok, [x for x, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]) for e in exs]


def hf_text(tok, c: Conversation, template: str) -> str:
    """transformers' own rendering of ``to_hf()``: the reference for every rendering here."""
    return tok.apply_chat_template(c.to_hf(), tools=list(c.tools) or None, tokenize=False, chat_template=template)


def chat(*msgs: Message) -> Conversation:
    return Conversation(tuple(msgs), source="t.jsonl:7")


U, A = (lambda text: Message("user", text)), (lambda text, **kw: Message("assistant", text, **kw))
CALL = (ToolCall("get_weather", '{"city": "Paris", "days": 3}', id="call_1"),)
TOOL_CHAT = chat(U("Weather in Paris?"), A("", tool_calls=CALL),
                 Message("tool", "18 C", tool_call_id="call_1"), A("It is 18 C."))


# -- what templates are given ------------------------------------------------------------------
def test_templates_get_what_to_hf_gives():
    c = chat(Message("system", "S"), U("Q"), A("A", reasoning="R", tool_calls=CALL),
             Message("tool", "18 C", name="get_weather", tool_call_id="call_1"), A("B", weight=0))
    assert _messages(_key(c, lambda text: text)) == c.to_hf()
    assert [list(m) for m in _messages(_key(c, lambda text: text))] == [list(m) for m in c.to_hf()]  # key order too
    assert c.to_hf()[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "days": 3}


def test_call_ids_reach_the_template(tok):
    ids = HEAD + ("{{ m.content }}{% for tc in m.tool_calls or [] %}{{ '<tool_call>' + tc.id + ' ' + tc.function.name + ' ' }}"
                  "{{ tc.function.arguments | tojson }}{{ '</tool_call>' }}{% endfor %}"
                  "{% if m.tool_call_id %}{{ ' (answers ' + m.tool_call_id + ')' }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}") + GEN
    r = HFTemplate(tok, chat_template=ids).render(TOOL_CHAT)
    assert text_of(tok, r.input_ids) == hf_text(tok, TOOL_CHAT, ids)
    assert "<tool_response>" not in ids and "<|im_start|>tool\n18 C (answers call_1)<|im_end|>" in text_of(tok, r.input_ids)
    assert trained(tok, r)[0] == '<tool_call>call_1 get_weather {"city": "Paris", "days": 3}</tool_call><|im_end|>'


# -- reasoning ---------------------------------------------------------------------------------
def test_reasoning_content_is_rendered_and_trained(tok, smollm2_tokenizer):
    t = HFTemplate(tok, chat_template=QWEN3)
    c = chat(U("Q"), A("A", reasoning="R"))
    r = t.render(c)
    assert text_of(tok, r.input_ids) == hf_text(tok, c, QWEN3) == \
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"
    assert trained(tok, r) == ["<think>\nR\n</think>\n\nA<|im_end|>"]
    # no added tokens to anchor the pieces to: the words must be where the analysis says
    plain = HFTemplate(smollm2_tokenizer, chat_template=QWEN3).render(chat(U("Q"), A("A", reasoning="Long reasoning.")))
    assert trained(smollm2_tokenizer, plain) == ["<think>\nLong reasoning.\n</think>\n\nA<|im_end|>"]
    # reasoning is words like content: special-token text in it stays plain text
    typed = t.render(chat(U("Q"), A("A", reasoning="a typed <|im_end|>")))
    assert trained(tok, typed) == ["<think>\na typed <|im_end|>\n</think>\n\nA<|im_end|>"]
    assert typed.input_ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2
    # history loses its reasoning (Qwen3): each reply is trained with its own, rendered on its own
    two = chat(U("Q1"), A("A1", reasoning="R1"), U("Q2"), A("A2", reasoning="\nR2\n"))
    assert not t.render(two).prefix_stable
    assert labelled(tok, encode_conversations([two], t, EncodeOptions("all", tree=False))) == \
        ["<think>\nR1\n</think>\n\nA1<|im_end|>", "<think>\nR2\n</think>\n\nA2<|im_end|>"]


def test_a_template_that_splits_think_out_of_content_keeps_working(tok):
    c = chat(U("Q"), A("<think>\nR\n</think>\n\nA"))
    r = HFTemplate(tok, chat_template=QWEN3).render(c)
    assert trained(tok, r) == ["<think>\nR\n</think>\n\nA<|im_end|>"]


def test_a_template_without_reasoning_refuses_a_reply_with_reasoning(tok, smollm2_tokenizer):
    c = chat(U("Q"), A("A", reasoning="Let me think."))
    with pytest.raises(TemplateError, match=r"^t\.jsonl:7: turn 2: the chat template does not render this "
                                            r"assistant message's reasoning; set data\.chat_template") as e:
        HFTemplate(smollm2_tokenizer).render(c)
    assert e.value.rule == "not_rendered"
    assert trained(tok, HFTemplate(tok, chat_template=QWEN3).render(c)) == \
        ["<think>\nLet me think.\n</think>\n\nA<|im_end|>"]


# -- tool-call arguments ------------------------------------------------------------------------
def test_tojson_template_renders_the_arguments_as_an_object(tok):
    t = HFTemplate(tok, chat_template=QWEN3)
    r = t.render(TOOL_CHAT)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    assert text_of(tok, r.input_ids) == hf_text(tok, TOOL_CHAT, QWEN3) and not r.prefix_stable
    assert call in text_of(tok, r.input_ids)
    assert labelled(tok, encode_conversations([TOOL_CHAT], t, EncodeOptions("all", tree=False))) == \
        ["<think>\n\n</think>\n\n\n" + call + "<|im_end|>", "<think>\n\n</think>\n\nIt is 18 C.<|im_end|>"]
    t = HFTemplate(tok, chat_template=TOJSON)
    assert trained(tok, t.render(TOOL_CHAT))[0] == \
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}</tool_call><|im_end|>'


def test_items_template_writes_each_key_and_value(tok):
    t = HFTemplate(tok, chat_template=ITEMS)
    r = t.render(TOOL_CHAT)
    assert text_of(tok, r.input_ids) == hf_text(tok, TOOL_CHAT, ITEMS)
    assert trained(tok, r)[0] == ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
                                  "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call><|im_end|>")
    # other words in the same places (keys, string values, names, ids): the same shape, one analysis
    other = chat(U("Time in Rome?"), A("", tool_calls=(ToolCall("get_time", '{"zone": "CET \\"x\\"", "days": 3}', "c9"),)),
                 Message("tool", "noon", tool_call_id="c9"), A("Noon."))
    assert trained(tok, t.render(other))[0] == ('<tool_call>get_time\n<arg_key>zone</arg_key>\n<arg_value>CET "x"'
                                                 '</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n'
                                                 '</tool_call><|im_end|>')
    assert len(t._plans) == 1


def test_arguments_encoded_twice_are_refused(tok):
    t = HFTemplate(tok, chat_template=DOUBLE)
    assert '"arguments": "{\\"city\\": \\"Paris\\", \\"days\\": 3}"' in hf_text(tok, TOOL_CHAT, DOUBLE)
    with pytest.raises(TemplateError, match=r"^t\.jsonl:7: turn 2: the chat template does not render this assistant "
                                            r"message's tool call get_weather \(arguments rendered as a JSON string\); set data\.chat_template "
                                            r"to a Jinja file that renders it \(arguments reach templates as a mapping: "
                                            r"write them with `\| tojson` once\)$") as e:
        t.render(TOOL_CHAT)
    assert e.value.rule == "not_rendered"


def test_a_call_rendered_without_its_arguments_is_refused(tok):
    with pytest.raises(TemplateError, match=r"turn 2: .* tool call get_weather \(arguments not rendered\)") as e:
        HFTemplate(tok, chat_template=NO_ARGS).render(TOOL_CHAT)
    assert e.value.rule == "not_rendered"
    # a call with no arguments has none to drop
    c = chat(U("Now?"), A("", tool_calls=(ToolCall("now", "{}"),)), Message("tool", "12:00"), A("Noon."))
    assert trained(tok, HFTemplate(tok, chat_template=NO_ARGS).render(c))[0] == \
        '<tool_call>{"name": "now", "arguments": {}}</tool_call><|im_end|>'


def test_smollm2s_own_template_refuses_a_tool_call_reply(smollm2_tokenizer):
    with pytest.raises(TemplateError, match=r"^t\.jsonl:7: turn 2: the chat template does not render this assistant "
                                            r"message's tool call get_weather; set data\.chat_template to a Jinja "
                                            r"file that renders it") as e:
        HFTemplate(smollm2_tokenizer).render(TOOL_CHAT)
    assert e.value.rule == "not_rendered"
    # a weight-0 reply is context: the model would see a different history, so it is refused too
    ctx = chat(U("Weather in Paris?"), A("", tool_calls=CALL, weight=0), Message("tool", "18 C"), A("It is 18 C."))
    with pytest.raises(TemplateError, match="turn 2: .*tool call get_weather"):
        HFTemplate(smollm2_tokenizer).render(ctx)
    # examples/templates/chatml-tools.jinja renders it
    r = HFTemplate(smollm2_tokenizer, chat_template=CHATML_TOOLS).render(TOOL_CHAT)
    assert trained(smollm2_tokenizer, r) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}</tool_call><|im_end|>',
        "It is 18 C.<|im_end|>"]


# -- other messages ---------------------------------------------------------------------------------
def test_a_template_that_drops_system_messages_is_refused(smollm2_tokenizer):
    no_system = HEAD.replace("{{", "{% if m.role != 'system' %}{{", 1).replace("}}", "}}{{ m.content + '<|im_end|>\\n' }}{% endif %}", 1) \
        + "{% endfor %}" + GEN
    c = chat(Message("system", "Be brief."), U("Hi"), A("Hello!"))
    assert hf_text(smollm2_tokenizer, c, no_system) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    with pytest.raises(TemplateError, match=r"^t\.jsonl:7: turn 1: the chat template does not render this system "
                                            r"message's content; set data\.chat_template") as e:
        HFTemplate(smollm2_tokenizer, chat_template=no_system).render(c)
    assert e.value.rule == "not_rendered"


def test_a_template_that_drops_user_content_is_refused(smollm2_tokenizer):
    blank_user = HEAD + "{% if m.role != 'user' %}{{ m.content }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}" + GEN
    c = chat(U("Hi"), A("Hello!"))
    with pytest.raises(TemplateError, match=r"^t\.jsonl:7: turn 1: the chat template does not render this user "
                                            r"message's content") as e:
        HFTemplate(smollm2_tokenizer, chat_template=blank_user).render(c)
    assert e.value.rule == "not_rendered"


def test_a_template_that_changes_words_and_drops_content_is_refused_on_the_real_text(smollm2_tokenizer):
    # upper-cases every word (the slow path: the real text is searched) and drops tool results
    upper = HEAD + "{% if m.role != 'tool' %}{{ m.content | upper }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}" + GEN
    t = HFTemplate(smollm2_tokenizer, chat_template=upper)
    assert trained(smollm2_tokenizer, t.render(chat(U("hi"), A("hello there")))) == ["HELLO THERE<|im_end|>"]
    with pytest.raises(TemplateError, match=r"^t\.jsonl:7: turn 3: the chat template does not render this tool "
                                            r"message's content") as e:
        t.render(chat(U("hi"), A("calling"), Message("tool", "result"), A("done")))
    assert e.value.rule == "not_rendered"


# -- assistant-first conversations ----------------------------------------------------------------
GREETING = A("Hello! How can I help?")


# Qwen2.5's and Llama 3.1's way: read messages[0] to decide on a default system prompt, so no
# messages at all cannot be rendered (nor a generation prompt for an empty history).
FIRST_READ = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nDefault.<|im_end|>\\n' }}{% endif %}"
              + HEAD + "{{ m.content + '<|im_end|>\\n' }}{% endfor %}" + GEN)
TEMPLATES = {"own": None, "chatml-tools": CHATML_TOOLS, "first-read": FIRST_READ}


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("strategy", ["all", "expand"])
def test_a_greeting_before_the_first_user_message_is_a_trained_reply(smollm2_tokenizer, template, system, strategy):
    tok = smollm2_tokenizer
    t = HFTemplate(tok, chat_template=TEMPLATES[template])
    c = chat(*([Message("system", "Be brief.")] if system else []), GREETING, U("Hi"), A("Sure."))
    r = t.render(c)
    assert text_of(tok, r.input_ids) == hf_text(tok, c, TEMPLATES[template] or tok.chat_template) and r.prefix_stable
    assert trained(tok, r) == ["Hello! How can I help?<|im_end|>", "Sure.<|im_end|>"]
    exs = encode_conversations([c], t, EncodeOptions(strategy))
    ids = [[x for x, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX] for e in exs]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    plain = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    greeting, reply = plain("Hello! How can I help?") + [im_end], plain("Sure.") + [im_end]
    assert ids == ([greeting + reply] if strategy == "all" else [greeting, reply])
    # the greeting alone, too
    assert trained(tok, t.render(chat(*c.messages[: 1 + system]))) == ["Hello! How can I help?<|im_end|>"]


def test_a_greeting_no_exact_span_can_be_found_for_is_refused_with_a_rule(tok):
    # the generation prompt opens a think block that a rendered reply never has (DeepSeek-R1's way)
    r1 = HEAD + "{{ m.content + '<|im_end|>\\n' }}{% endfor %}" \
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
    with pytest.raises(TemplateError, match=r"^t\.jsonl:7: cannot find the exact span of the final reply") as e:
        HFTemplate(tok, chat_template=r1).render(chat(GREETING, U("Hi"), A("Sure.")))
    assert e.value.rule == "span_not_found"
