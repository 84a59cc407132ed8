"""HFTemplate: exact reply spans for any Jinja chat template.

Every template is checked the same way: the rendered text (hand-written, and equal to what
transformers renders), the exact text of each reply's trained tokens (content + terminator, no
header), special-token text in content staying plain text, tool calls trained and tool results
not, and prefix stability (the rendering up to reply k is the first turn_end[k] tokens).
Test tokenizers are SmolLM2's (ChatML) with other special tokens and templates set on copies,
and the GLM-4-style tokenizer of ``turntune.assets``, which is also checked against the native
GLM-4 format token for token.
"""
from __future__ import annotations

import copy
import json

import pytest
from tokenizers import AddedToken

from turntune.assets import GLM4_CHAT_TEMPLATE
from turntune.conversation import Conversation, Message, ToolCall
from turntune.encoding import EncodeOptions, encode_conversations
from turntune.errors import TemplateError
from turntune.templates.glm4 import GLM4Template
from turntune.templates.hf import HFTemplate

# -- templates ----------------------------------------------------------------------------------
# Qwen2.5's layout: tools in the system turn, <tool_call> JSON in the reply (arguments | tojson),
# consecutive tool results grouped in one user turn, a default system prompt.
QWEN25 = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}
    {{- "\n\n# Tools\n\n<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

# Llama 3.1's layout: BOS, a system turn always (with a date), content trimmed, tool calls as
# JSON with "parameters", tool results under the ipython role.
LLAMA3 = r"""
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}{%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}{%- set loop_messages = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Today Date: ' + strftime_now('%d %b %Y') + '\n\n' }}
{%- if tools %}{%- for t in tools %}{{- t | tojson(indent=4) + '\n\n' }}{%- endfor %}{%- endif %}
{{- system_message + '<|eot_id|>' }}
{%- for message in loop_messages %}
    {%- if message.role == 'assistant' and message.tool_calls %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
        {%- for tc in message.tool_calls %}
            {{- '{"name": "' + tc.function.name + '", "parameters": ' }}{{- tc.function.arguments | tojson }}{{- '}' }}
        {%- endfor %}
        {{- '<|eot_id|>' }}
    {%- elif message.role == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""

# Mistral's layout: [INST] ... [/INST] reply</s>, the system prompt folded into the first user
# turn, no generation prompt of its own, tool calls and results in their own special tokens.
MISTRAL = r"""
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if loop.first and message.role != 'user' %}
        {{- raise_exception('Conversation must start with a user message (after the system one)') }}
    {%- endif %}
    {%- if message.role == 'user' %}
        {%- if loop.first and tools %}{{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{%- endif %}
        {%- if loop.first and system_message is defined %}
            {{- '[INST] ' + system_message + '\n\n' + message.content + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message.content + '[/INST]' }}
        {%- endif %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '[TOOL_CALLS] [' }}
        {%- for tc in message.tool_calls %}
            {{- '{"name": "' + tc.function.name + '", "arguments": ' + (tc.function.arguments | tojson) + '}' }}
            {%- if not loop.last %}{{- ', ' }}{%- endif %}
        {%- endfor %}
        {{- ']' + eos_token }}
    {%- elif message.role == 'assistant' %}
        {{- ' ' + message.content + eos_token }}
    {%- elif message.role == 'tool' %}
        {{- '[TOOL_RESULTS] {"content": ' + (message.content | tojson) + '}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception('Only user, assistant and tool roles are supported after the system message') }}
    {%- endif %}
{%- endfor %}
"""

# Qwen3's layout: reasoning (<think>...</think> in the content) is kept only for replies after
# the last user query; earlier replies lose it, and the final one always gets a think block.
QWEN3 = r"""
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}{%- endif %}{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or message.role == "system" %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- set args = tool_call.function.arguments %}
            {{- '\n<tool_call>\n{"name": "' + tool_call.function.name + '", "arguments": ' + (args if args is string else args | tojson) + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""


# -- tokenizers ---------------------------------------------------------------------------------
def _variant(base, template: str, specials=(), plain=(), bos=None, eos=None):
    tok = copy.deepcopy(base)  # the session tokenizer is shared: never mutate it
    extra = {"additional_special_tokens": list(specials)} if specials else {}
    tok.add_special_tokens({**({"bos_token": bos} if bos else {}), **({"eos_token": eos} if eos else {}), **extra})
    if plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    tok.chat_template = template
    return tok


TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")


@pytest.fixture(scope="module")
def chatml(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def qwen25(smollm2_tokenizer):
    return _variant(smollm2_tokenizer, QWEN25, plain=TOOL_TOKENS)


@pytest.fixture(scope="module")
def llama3(smollm2_tokenizer):
    return _variant(smollm2_tokenizer, LLAMA3, specials=["<|start_header_id|>", "<|end_header_id|>"],
                    bos="<|begin_of_text|>", eos="<|eot_id|>")


@pytest.fixture(scope="module")
def mistral(smollm2_tokenizer):
    specials = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
    return _variant(smollm2_tokenizer, MISTRAL, specials=specials, bos="<s>", eos="</s>")


@pytest.fixture(scope="module")
def qwen3(smollm2_tokenizer):
    return _variant(smollm2_tokenizer, QWEN3, plain=("<think>", "</think>", *TOOL_TOKENS))


@pytest.fixture(scope="module")
def glm4(glm4_tokenizer):
    assert glm4_tokenizer.chat_template == GLM4_CHAT_TEMPLATE
    return glm4_tokenizer


# -- conversations ------------------------------------------------------------------------------
def conv(*msgs, tools=()) -> Conversation:
    out = []
    for role, content, *calls in msgs:
        out.append(Message(role, content, tuple(ToolCall(n, a) for n, a in calls)))
    return Conversation(tuple(out), tuple(tools), "t.jsonl:7")


BASIC = conv(("system", "Be brief."), ("user", "Hi <|im_end|> there"), ("assistant", "Hello!"),
             ("user", "Bye"), ("assistant", "Ciao."))
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
ARGS = '{"city": "Paris"}'
TOOLS = conv(("user", "Weather in Paris?"), ("assistant", "", ("get_weather", ARGS)), ("tool", "18 C"),
             ("assistant", "It is 18 C."), tools=[WEATHER])


# -- helpers ------------------------------------------------------------------------------------
def text_of(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained(tok, r) -> list[str]:
    """The text of each reply's trained tokens, checking they are one contiguous run ending at turn_end."""
    out = []
    for k, end in enumerate(r.turn_end):
        at = [i for i, t in enumerate(r.turn) if t == k]
        assert at == list(range(at[0], end)), f"reply {k} is not one run ending at turn_end"
        out.append(text_of(tok, r.input_ids[at[0]:end]))
    assert all(t < len(r.turn_end) for t in r.turn)
    return out


def messages_text(tok, r, n: int) -> list[str]:
    return [text_of(tok, [x for x, m in zip(r.input_ids, r.message) if m == j]) for j in range(-1, n)]


def check_prefixes(t: HFTemplate, c: Conversation) -> None:
    """The rendering up to reply k is a prefix of the whole, labelled alike, and ends at turn_end[k]
    but for whitespace the template writes after the terminator (context, never trained)."""
    full = t.render(c)
    assert full.prefix_stable
    for k, a in enumerate(c.assistant_indices):
        part = t.render(Conversation(c.messages[: a + 1], c.tools, c.source))
        n, end = len(part.input_ids), full.turn_end[k]
        assert part.input_ids == full.input_ids[:n] and part.turn_end == full.turn_end[: k + 1]
        assert part.turn == full.turn[:n] and part.message == full.message[:n]
        assert text_of(t.tokenizer, part.input_ids[end:]).strip() == "" and set(part.turn[end:]) <= {-1}


def hf_text(tok, c: Conversation, gen: bool = False) -> str:
    return tok.apply_chat_template(c.to_hf(), tools=list(c.tools) or None, tokenize=False, add_generation_prompt=gen)


# -- ChatML: SmolLM2's own template ---------------------------------------------------------------
def test_chatml_exact_text_spans_and_messages(chatml):
    t = HFTemplate(chatml)
    r = t.render(BASIC)
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <|im_end|> there<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                "<|im_start|>assistant\nCiao.<|im_end|>\n")
    assert text_of(chatml, r.input_ids) == expected == hf_text(chatml, BASIC)
    assert trained(chatml, r) == ["Hello!<|im_end|>", "Ciao.<|im_end|>"]
    assert messages_text(chatml, r, 5) == [
        "", "<|im_start|>system\nBe brief.<|im_end|>\n", "<|im_start|>user\nHi <|im_end|> there<|im_end|>\n",
        "<|im_start|>assistant\nHello!<|im_end|>\n", "<|im_start|>user\nBye<|im_end|>\n",
        "<|im_start|>assistant\nCiao.<|im_end|>\n"]
    # the '<|im_end|>' typed by the user is plain text: the control token appears once per message only
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert r.input_ids.count(im_end) == 5
    assert [x for x, m in zip(r.input_ids, r.message) if m == 1].count(im_end) == 1
    # no special text in content: the ids are exactly what the tokenizer gives the whole rendering
    no_special = Conversation(BASIC.messages[:1] + (Message("user", "Hi there"),) + BASIC.messages[2:], source="x")
    r2 = t.render(no_special)
    assert r2.input_ids == chatml(hf_text(chatml, no_special), add_special_tokens=False).input_ids
    assert r.prefix_stable and r2.prefix_stable
    check_prefixes(t, BASIC)


def test_chatml_default_system_prompt_belongs_to_no_message(chatml):
    c = Conversation(BASIC.messages[1:], source="x")
    r = HFTemplate(chatml).render(c)
    default = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert messages_text(chatml, r, 4)[:2] == [default, "<|im_start|>user\nHi <|im_end|> there<|im_end|>\n"]
    assert trained(chatml, r) == ["Hello!<|im_end|>", "Ciao.<|im_end|>"]


def test_chatml_whitespace_and_leading_newline_are_part_of_the_reply(chatml):
    t = HFTemplate(chatml)
    c = conv(("user", " Hi\n"), ("assistant", "\n\n  Hello!  \n"), ("user", "x"), ("assistant", "\nok"))
    r = t.render(c)
    assert text_of(chatml, r.input_ids) == hf_text(chatml, c)
    assert trained(chatml, r) == ["\n\n  Hello!  \n<|im_end|>", "\nok<|im_end|>"]
    # the generation prompt is tokenized on its own, as at inference: no token straddles the reply start
    for k, a in enumerate(c.assistant_indices):
        prompt = t.generation_prompt(Conversation(c.messages[:a], source="x"))
        assert r.input_ids[: len(prompt)] == prompt and r.turn[len(prompt) - 1] == -1 and r.turn[len(prompt)] == k
    check_prefixes(t, c)


def test_chatml_generation_prompt_and_stop_ids(chatml):
    t = HFTemplate(chatml)
    c = Conversation(BASIC.messages[:4], source="x")
    ids = t.generation_prompt(c)
    assert text_of(chatml, ids) == hf_text(chatml, c, gen=True)
    assert text_of(chatml, ids).endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert t.stop_ids() == [chatml.convert_tokens_to_ids("<|im_end|>")]


# -- ChatML with tools: Qwen2.5 -------------------------------------------------------------------
def test_qwen25_tool_call_trained_tool_result_not(qwen25):
    t = HFTemplate(qwen25)
    r = t.render(TOOLS)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'  # an object, not a string
    expected = ("<|im_start|>system\nYou are Qwen.\n\n# Tools\n\n<tools>\n" + json.dumps(WEATHER) + "\n</tools><|im_end|>\n"
                "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n" + call + "<|im_end|>\n"
                "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n"
                "<|im_start|>assistant\nIt is 18 C.<|im_end|>\n")
    assert text_of(qwen25, r.input_ids) == expected == hf_text(qwen25, TOOLS)
    assert trained(qwen25, r) == [call + "<|im_end|>", "It is 18 C.<|im_end|>"]
    assert messages_text(qwen25, r, 4)[3] == "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n"
    # <tool_call> is an added token the model writes: one id, inside the trained span
    tc = qwen25.convert_tokens_to_ids("<tool_call>")
    assert [r.turn[i] for i, x in enumerate(r.input_ids) if x == tc] == [0]
    check_prefixes(t, TOOLS)


def test_qwen25_grouped_tool_results(qwen25):
    c = conv(("user", "Both?"), ("assistant", "On it.", ("get_weather", ARGS), ("get_weather", '{"city": "Rome"}')),
             ("tool", "18 C"), ("tool", "25 C"), ("assistant", "18 and 25."), tools=[WEATHER])
    t = HFTemplate(qwen25)
    r = t.render(c)
    assert text_of(qwen25, r.input_ids) == hf_text(qwen25, c)
    assert trained(qwen25, r)[1] == "18 and 25.<|im_end|>"
    assert trained(qwen25, r)[0].startswith("On it.\n<tool_call>\n") and trained(qwen25, r)[0].count("<tool_call>") == 2
    # the two results share one user turn: the first ends where the second's text starts
    assert messages_text(qwen25, r, 5)[3:5] == ["<|im_start|>user\n<tool_response>\n18 C\n</tool_response>",
                                                "\n<tool_response>\n25 C\n</tool_response><|im_end|>\n"]
    check_prefixes(t, c)


# -- Llama 3 ------------------------------------------------------------------------------------------
def test_llama3_exact_text_spans_and_tools(llama3):
    t = HFTemplate(llama3)
    r = t.render(BASIC)
    text = text_of(llama3, r.input_ids)
    date = text.split("Today Date: ")[1].split("\n")[0]
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    expected = ("<|begin_of_text|>" + head.format("system") + f"Today Date: {date}\n\nBe brief.<|eot_id|>"
                + head.format("user") + "Hi <|im_end|> there<|eot_id|>" + head.format("assistant") + "Hello!<|eot_id|>"
                + head.format("user") + "Bye<|eot_id|>" + head.format("assistant") + "Ciao.<|eot_id|>")
    assert text == expected == hf_text(llama3, BASIC)
    assert trained(llama3, r) == ["Hello!<|eot_id|>", "Ciao.<|eot_id|>"]
    assert r.input_ids.count(llama3.convert_tokens_to_ids("<|im_end|>")) == 0  # typed text stays text
    check_prefixes(t, BASIC)
    r = t.render(TOOLS)
    assert text_of(llama3, r.input_ids) == hf_text(llama3, TOOLS)
    assert trained(llama3, r) == ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                                  "It is 18 C.<|eot_id|>"]
    assert messages_text(llama3, r, 4)[3] == head.format("ipython") + "18 C<|eot_id|>"
    assert t.stop_ids() == [llama3.convert_tokens_to_ids("<|eot_id|>")]
    check_prefixes(t, TOOLS)


def test_llama3_trims_content_and_the_span_follows(llama3):
    c = conv(("user", "  Hi  "), ("assistant", " \n Hello! \n"))
    r = HFTemplate(llama3).render(c)
    assert text_of(llama3, r.input_ids) == hf_text(llama3, c)
    assert trained(llama3, r) == ["Hello!<|eot_id|>"]


# -- Mistral ----------------------------------------------------------------------------------------
def test_mistral_system_folded_into_first_user_turn(mistral):
    t = HFTemplate(mistral)
    r = t.render(BASIC)
    expected = "<s>[INST] Be brief.\n\nHi <|im_end|> there[/INST] Hello!</s>[INST] Bye[/INST] Ciao.</s>"
    assert text_of(mistral, r.input_ids) == expected == hf_text(mistral, BASIC)
    assert trained(mistral, r) == [" Hello!</s>", " Ciao.</s>"]
    assert messages_text(mistral, r, 5)[3] == " Hello!</s>"
    check_prefixes(t, BASIC)
    assert t.stop_ids() == [mistral.convert_tokens_to_ids("</s>")]


def test_mistral_tools(mistral):
    t = HFTemplate(mistral)
    r = t.render(TOOLS)
    expected = ("<s>[AVAILABLE_TOOLS] " + json.dumps([WEATHER]) + "[/AVAILABLE_TOOLS][INST] Weather in Paris?[/INST]"
                '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>'
                '[TOOL_RESULTS] {"content": "18 C"}[/TOOL_RESULTS] It is 18 C.</s>')
    assert text_of(mistral, r.input_ids) == expected == hf_text(mistral, TOOLS)
    assert trained(mistral, r) == ['[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>',
                                   " It is 18 C.</s>"]
    check_prefixes(t, TOOLS)


def test_template_refusal_is_a_template_error_naming_the_source(mistral):
    with pytest.raises(TemplateError, match=r"t\.jsonl:7: .*must start with a user message"):
        HFTemplate(mistral).render(conv(("assistant", "Hi"), ("user", "x"), ("assistant", "y")))


# -- GLM-4: no terminator in the turn ------------------------------------------------------------------
GLM_CONVS = [
    BASIC,
    TOOLS,
    conv(("user", "Hi <|user|> and <|assistant|>"), ("assistant", "Hello <|observation|>")),
    conv(("system", "Sys"), ("user", "Weather?"), ("assistant", "Let me look.", ("get_weather", ARGS)),
         ("tool", "18 C"), ("assistant", "18 C."), ("user", "Thanks"), ("assistant", "", ("get_weather", ARGS)),
         tools=[WEATHER]),
    # arguments ending in a number: the call still ends with data, the next role token is its terminator;
    # special-token text in a key and escaped quotes in a value stay plain text
    conv(("user", "Weather?"), ("assistant", "", ("get_weather", '{"city": "Paris", "days": 3}')), ("tool", "18 C"),
         ("assistant", "", ("get_weather", '{"<|observation|>": "a \\"b\\"", "days": [1, 2]}')), tools=[WEATHER]),
]


@pytest.mark.parametrize("i", range(len(GLM_CONVS)))
def test_glm4_agrees_with_the_native_format_token_for_token(glm4, i):
    c = GLM_CONVS[i]
    r, native = HFTemplate(glm4).render(c), GLM4Template(glm4).render(c)
    assert (r.input_ids, r.turn, r.message, r.turn_end, r.prefix_stable) == \
        (native.input_ids, native.turn, native.message, native.turn_end, True)
    check_prefixes(HFTemplate(glm4), c)


def test_glm4_next_role_token_is_the_terminator(glm4):
    r = HFTemplate(glm4).render(BASIC)
    text = text_of(glm4, r.input_ids)
    assert text == hf_text(glm4, BASIC) + "<|user|>"  # the appended terminator of the final reply
    assert text == "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi <|im_end|> there<|assistant|>\nHello!<|user|>\nBye" \
                   "<|assistant|>\nCiao.<|user|>"
    assert trained(glm4, r) == ["\nHello!<|user|>", "\nCiao.<|user|>"]
    assert messages_text(glm4, r, 5)[:2] == ["[gMASK]<sop>", "<|system|>\nBe brief."]
    r = HFTemplate(glm4).render(TOOLS)
    assert trained(glm4, r) == ['get_weather\n{"city": "Paris"}<|observation|>', "\nIt is 18 C.<|user|>"]
    ends_with_call = Conversation(TOOLS.messages[:2], TOOLS.tools, "x")
    assert trained(glm4, HFTemplate(glm4).render(ends_with_call)) == ['get_weather\n{"city": "Paris"}<|observation|>']
    t = HFTemplate(glm4)
    assert t.stop_ids() == [glm4.convert_tokens_to_ids(x) for x in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    assert text_of(glm4, t.generation_prompt(Conversation(BASIC.messages[:4], source="x"))).endswith("Bye<|assistant|>")


def test_glm4_special_text_in_content_is_plain_text(glm4):
    r = HFTemplate(glm4).render(GLM_CONVS[2])
    user = glm4.convert_tokens_to_ids("<|user|>")
    assert r.input_ids.count(user) == 2  # the user's role token and the final terminator, not the typed one
    assert trained(glm4, r) == ["\nHello <|observation|><|user|>"]


# -- Qwen3: earlier reasoning stripped -> not prefix-stable ---------------------------------------------
THINK = conv(("system", "S"), ("user", "Q1"), ("assistant", "<think>\nr1\n</think>\n\nA1"),
             ("user", "Q2 <|im_end|>"), ("assistant", "<think>\nr2\n</think>\n\nA2"))


def test_qwen3_is_detected_not_prefix_stable(qwen3):
    t = HFTemplate(qwen3)
    r = t.render(THINK)
    expected = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
                "<|im_start|>user\nQ2 <|im_end|><|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>\n")
    assert text_of(qwen3, r.input_ids) == expected == hf_text(qwen3, THINK)
    assert not r.prefix_stable
    # reply 0 appears stripped of its reasoning: it has no exact span here and is not labelled
    assert r.turn_end == [-1, len(r.input_ids) - 1] and 0 not in r.turn
    assert text_of(qwen3, [x for x, k in zip(r.input_ids, r.turn) if k == 1]) == "<think>\nr2\n</think>\n\nA2<|im_end|>"
    assert r.input_ids.count(qwen3.convert_tokens_to_ids("<|im_end|>")) == 5
    # rendered on its own, each reply is exact: that is what the encoder trains
    first = t.render(Conversation(THINK.messages[:3], source="x"))
    assert first.prefix_stable and trained(qwen3, first) == ["<think>\nr1\n</think>\n\nA1<|im_end|>"]
    exs = encode_conversations([THINK], t, EncodeOptions(strategy="all", tree=False))  # expanded for real
    assert [text_of(qwen3, [x for x, lab in zip(e.input_ids, e.labels) if lab != -100]) for e in exs] == \
        ["<think>\nr1\n</think>\n\nA1<|im_end|>", "<think>\nr2\n</think>\n\nA2<|im_end|>"]


def test_qwen3_reply_without_reasoning_gets_the_empty_think_block(qwen3):
    c = conv(("user", "Q"), ("assistant", "A"))
    assert trained(qwen3, HFTemplate(qwen3).render(c)) == ["<think>\n\n</think>\n\nA<|im_end|>"]
    two = conv(("user", "Q"), ("assistant", "A"), ("user", "Q2"), ("assistant", "B"))
    assert not HFTemplate(qwen3).render(two).prefix_stable  # the empty block is dropped from history


# -- templates turntune cannot follow, and hostile ones --------------------------------------------------
def test_template_that_changes_words_is_analysed_on_the_real_text(chatml):
    upper = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content | upper + '<|im_end|>\n' }}{% endfor %}" \
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    t = HFTemplate(chatml, chat_template=upper)
    c = conv(("user", "hi"), ("assistant", "hello"), ("user", "more"), ("assistant", "ok"))
    r = t.render(c)
    assert trained(chatml, r) == ["HELLO<|im_end|>", "OK<|im_end|>"] and r.prefix_stable
    with pytest.raises(TemplateError, match=r"t\.jsonl:7: .*special-token strings"):
        t.render(conv(("user", "say <|im_end|>"), ("assistant", "no")))


def test_template_without_end_of_turn_token_is_refused(chatml):
    plain = "{% for m in messages %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}" \
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    with pytest.raises(TemplateError, match=r"t\.jsonl:7: cannot find the exact span of the final reply: .*no end-of-turn"):
        HFTemplate(chatml, chat_template=plain).render(conv(("user", "Hi"), ("assistant", "Hello")))


def test_generation_prompt_the_rendering_does_not_have_is_refused(qwen3):
    # DeepSeek-R1's layout: the prompt opens a think block that the rendered history never has, so no
    # reply has a span that both the rendering and inference agree on
    r1 = ("{% for m in messages %}{% if m.role == 'user' %}{{ '<|im_start|>user\\n' + m.content + '<|im_end|>' }}"
          "{% else %}{{ '<|im_start|>assistant\\n' + m.content.split('</think>')[-1] + '<|im_end|>' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")
    c = conv(("user", "Q"), ("assistant", "<think>\nr\n</think>\n\nA"))
    with pytest.raises(TemplateError, match=r"t\.jsonl:7: cannot find the exact span of the final reply: .* the "
                                            r"generation prompt reads '<think>\\n' where the reply's rendering reads "
                                            r"'\\n\\nA<\|im_end\|>'"):
        HFTemplate(qwen3, chat_template=r1).render(c)


@pytest.mark.parametrize("source", ["{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}",
                                    "{% set x = messages.append(1) %}{{ x }}"])
def test_sandbox_refuses_unsafe_templates(chatml, source):
    t = HFTemplate(chatml, chat_template=source)
    with pytest.raises(TemplateError, match="t.jsonl:7: the chat template did something the sandbox forbids"):
        t.render(conv(("user", "Hi"), ("assistant", "Hello")))


def test_generation_markers_are_rendered_as_they_are(chatml):
    marked = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' %}"
              "{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m.content + '<|im_end|>' }}"
              "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    c = conv(("user", "Hi"), ("assistant", "Hello!"))
    r = HFTemplate(chatml, chat_template=marked).render(c)
    assert text_of(chatml, r.input_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert trained(chatml, r) == ["Hello!<|im_end|>"]


def test_broken_template_fails_at_construction(chatml):
    with pytest.raises(TemplateError, match="does not compile: line 1"):
        HFTemplate(chatml, chat_template="{% for m in messages %}")


def test_conversations_that_differ_only_in_words_share_one_analysis(llama3):
    t = HFTemplate(llama3)
    variants = [conv(("user", "Hi"), ("assistant", "Hello!")), conv(("user", " other words\n"), ("assistant", "\n More. ")),
                conv(("user", "<|eot_id|> typed"), ("assistant", "x"))]
    rendered = t.render_many(variants)
    assert len(t._plans) == 1  # one shape: the template was analysed once, each conversation rendered once
    assert [trained(llama3, r) for r in rendered] == [["Hello!<|eot_id|>"], ["More.<|eot_id|>"], ["x<|eot_id|>"]]
    assert [text_of(llama3, r.input_ids) for r in rendered] == [hf_text(llama3, c) for c in variants]


def test_sandbox_verdicts_are_remembered_and_refusals_stay_refusals(chatml):
    from turntune.templates.sandbox import compile_template

    t = HFTemplate(chatml, chat_template="{% set x = messages.append(1) %}{{ x }}")
    for _ in range(2):  # the second refusal comes from the remembered verdict
        with pytest.raises(TemplateError, match="access to attribute 'append' of 'list' object is unsafe"):
            t.render(conv(("user", "Hi"), ("assistant", "Hello")))
    env = compile_template("{% set x = messages.append(1) %}{{ x }}").environment
    assert env._verdicts == {(list, "append"): False}
    loop = compile_template("{% for m in messages %}{{ loop.first }}{% endfor %}")
    assert loop.render(messages=[1, 2]) == "TrueFalse" and list(loop.environment._verdicts.values()) == [True]


def test_sandbox_judges_an_object_that_claims_another_class_every_time():
    from turntune.templates.sandbox import compile_template

    class Liar:  # isinstance(Liar(), list) is True: Jinja's list rules apply to it
        def __init__(self, cls: type) -> None:
            self.claim = cls  # per object: a verdict per type would be wrong

        __class__ = property(lambda self: self.claim)
        append = None

    env = compile_template("{{ x }}").environment
    assert env.is_safe_attribute(Liar(list), "append", None) is False
    assert env.is_safe_attribute(Liar(Liar), "append", None) is True  # an honest one: remembered
    assert env.is_safe_attribute(Liar(list), "append", None) is False
    assert env._verdicts == {(Liar, "append"): True}


def test_a_template_that_never_reads_tools_shares_shapes_across_tool_lists(chatml, qwen25):
    from turntune.templates.sandbox import reads_variable

    assert not reads_variable(chatml.chat_template, "tools") and reads_variable(QWEN25, "tools")
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    same = [conv(("user", "Hi"), ("assistant", "Hello!"), tools=tools) for tools in ([], [WEATHER], [other])]
    t = HFTemplate(chatml)
    rendered = t.render_many(same)
    assert len(t._plans) == 1 and [trained(chatml, r) for r in rendered] == [["Hello!<|im_end|>"]] * 3
    assert [text_of(chatml, r.input_ids) for r in rendered] == [hf_text(chatml, c) for c in same]
    t = HFTemplate(qwen25)  # Qwen2.5 writes the tools in its system turn: one analysis per tool list
    rendered = t.render_many(same)
    assert len(t._plans) == 3 and [trained(qwen25, r) for r in rendered] == [["Hello!<|im_end|>"]] * 3
    assert [text_of(qwen25, r.input_ids) for r in rendered] == [hf_text(qwen25, c) for c in same]


def test_labels_and_weights_by_runs_equal_the_per_token_rule():
    from turntune.encoding import _labels_and_weights

    ids = list(range(100, 112))
    for turn, ends in [([-1, -1, 0, 0, 0, -1, -1, 1, 1, -1, -1, -1], {0: 5, 1: 9}),  # runs: fast way
                       ([-1, 0, 0, -1, 0, -1, -1, -1, -1, -1, -1, -1], {0: 3}),  # turn 0 in two pieces
                       ([-1, 0, 0, 1, 1, -1, -1, -1, -1, -1, -1, -1], {0: 3}),  # a labelled turn not in ends
                       ([-1, 0, 0, -1, -1, -1, -1, -1, -1, -1, 1, 1], {0: 3, 1: 99}),  # an end past the tokens
                       ([-1] * 12, {0: 4})]:  # nothing left to train
        labels, weight = _labels_and_weights(ids, turn, ends)
        assert labels == [-100 if t < 0 else x for x, t in zip(ids, turn)]
        assert weight == [0.0 if t < 0 else 1.0 for t in turn]


def test_encoding_makes_no_garbage_cycles_and_leaves_the_collector_as_it_was(chatml, qwen25):
    import gc

    for tok, convs in ((chatml, [BASIC, conv(("user", "x"), ("assistant", "y"))] * 3),  # (SmolLM2's drops tool calls)
                       (qwen25, [BASIC, TOOLS, conv(("user", "x"), ("assistant", "y"))] * 3)):
        gc.collect()
        gc.disable()
        try:
            exs = encode_conversations(convs, HFTemplate(tok), EncodeOptions("all"))
            assert not gc.isenabled() and gc.collect() == 0  # reference counting freed everything
        finally:
            gc.enable()
        again = encode_conversations(convs, HFTemplate(tok), EncodeOptions("all"), chunk=2)
        assert gc.isenabled() and [vars(e) for e in again] == [vars(e) for e in exs]


def test_a_big_batch_and_one_by_one_tokenize_alike(qwen25):
    from turntune.templates import hf

    # more texts than go one by one, both with special-token text in words (tokenized piece by piece) and without
    convs = [conv(("user", f"Question {i}" + " <|im_end|>" * (i % 3 == 0)), ("assistant", f"Answer {i}, é 日本."),
                  tools=[WEATHER] * (i % 2)) for i in range(2 * hf._SERIAL_TEXTS)] + [TOOLS]
    t = HFTemplate(qwen25)
    assert [vars(r) for r in t.render_many(convs)] == [vars(t.render(c)) for c in convs]


def test_render_many_equals_render_one_by_one(chatml, qwen25):
    convs = [BASIC, Conversation(BASIC.messages[1:], source="y"), conv(("user", "x"), ("assistant", "y")), BASIC]
    t = HFTemplate(chatml)
    assert [vars(r) for r in t.render_many(convs)] == [vars(HFTemplate(chatml).render(c)) for c in convs]
    t = HFTemplate(qwen25)
    assert [vars(r) for r in t.render_many([TOOLS, BASIC])] == [vars(t.render(TOOLS)), vars(t.render(BASIC))]


# -- against a brute-force oracle: transformers' own rendering of every prefix ---------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PIECES = ["Hi", "yes", " ", "  ", "\n", "\n\n", "x=1;", "é", "日本", "<|im_end|>", "<|eot_id|>", "[INST]", "</s>",
          "<|user|>", "<|assistant|>", "<think>", "</think>", "<tool_call>"]
text_st = st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("".join)


@st.composite
def chats(draw, tools: bool):
    msgs = [("system", draw(text_st))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs.append(("user", draw(text_st)))
        if tools and draw(st.integers(0, 3)) == 0:
            msgs += [("assistant", "", ("get_weather", ARGS)), ("tool", draw(text_st))]
        msgs.append(("assistant", draw(text_st)))
    return conv(*msgs, tools=[WEATHER] if tools else [])


def oracle_targets(tok, c: Conversation, glm: bool) -> list[str]:
    """Reply k's target text from transformers' renderings: what rendering reply k adds after the
    generation prompt, up to trailing whitespace; GLM-4: all of it, then the next role token."""
    out = []
    for a in c.assistant_indices:
        prompt = hf_text(tok, Conversation(c.messages[:a], c.tools), gen=True)
        upto = hf_text(tok, Conversation(c.messages[: a + 1], c.tools))
        assert upto.startswith(prompt)
        reply = upto[len(prompt):]
        if glm:
            nxt = c.messages[a + 1].role if a + 1 < len(c.messages) else ("tool" if c.messages[a].tool_calls else "user")
            out.append(reply + ("<|observation|>" if nxt == "tool" else "<|user|>"))
        else:
            out.append(reply.rstrip())
    return out


@pytest.mark.parametrize("name", ["chatml", "qwen25", "llama3", "mistral", "glm4"])
def test_random_conversations_match_the_oracle(request, name):
    tok = request.getfixturevalue(name)
    t = HFTemplate(tok)
    specials = {i for i, a in tok.added_tokens_decoder.items() if a.special}

    @settings(max_examples=25, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(c=chats(tools=name in ("qwen25", "glm4")))
    def check(c):
        r = t.render(c)
        whole = hf_text(tok, c)
        assert text_of(tok, r.input_ids) == whole + ("<|user|>" if name == "glm4" else "")
        assert trained(tok, r) == oracle_targets(tok, c, glm=name == "glm4")
        # control tokens only where the template writes them: as many as with the typed ones removed
        plain = conv(*[(m.role, "".join(ch for ch in m.content if ch not in "<|>[]/"),
                        *[(x.name, x.arguments) for x in m.tool_calls]) for m in c.messages],
                     tools=c.tools)
        count = lambda ids: sum(1 for i in ids if i in specials)  # noqa: E731
        assert count(r.input_ids) == count(t.render(plain).input_ids)
        check_prefixes(t, c)

    check()
