"""Reasoning-model template fixtures on the GLM-4-style tokenizer (tests/templates/*.jinja, written
for this project from the facts in DESIGN.md §8 and the issue): tokenizers, templates, conversations.
Shared by tests/test_tree.py and bench/bench_tree.py."""
from __future__ import annotations

import copy
from pathlib import Path

from tokenizers import AddedToken

from turntune.conversation import Conversation, Message, ToolCall

TEMPLATES = Path(__file__).resolve().parent / "templates"
# The real GLM-4.5 / Qwen3 tokenizers have these as added (non-special) tokens.
PLAIN = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
         "</arg_value>", "<tool_response>", "</tool_response>")
CHATML = ("<|im_start|>", "<|im_end|>")
# family -> (template file, extra special tokens, what the template is meant to show)
FAMILIES = {
    "glm4-0414": ("glm4-0414.jinja", ()),
    "glm-z1": ("glm-z1.jinja", ()),
    "glm-z1-train": ("glm-z1-train.jinja", ()),
    "glm45": ("glm45.jinja", ()),
    "glm47-preserved": ("glm45.jinja", ()),  # clear_thinking=false
    "qwen3": ("qwen3.jinja", CHATML),
}


def template_source(family: str) -> str:
    src = (TEMPLATES / FAMILIES[family][0]).read_text()
    if family == "glm47-preserved":  # what chat_template_kwargs={"clear_thinking": False} does
        src = "{%- set clear_thinking = false -%}\n" + src
    return src


def tokenizer_for(base, family: str):
    """A copy of the GLM-4-style tokenizer with the family's tokens and template (never mutate ``base``)."""
    tok = copy.deepcopy(base)
    specials = FAMILIES[family][1]
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN])
    tok.chat_template = template_source(family)
    return tok


M = Message
WEATHER = ToolCall("get_weather", '{"city": "Paris", "days": 2}')

# Three rounds of plain replies, each with reasoning.
ROUNDS = Conversation((
    M("system", "Be brief."),
    M("user", "What is 2+2?"), M("assistant", "4.", reasoning="Add two and two."),
    M("user", "And 3+3?"), M("assistant", "6.", reasoning="Three plus three is six."),
    M("user", "Thanks!"), M("assistant", "Any time.", reasoning="Be polite."),
), (), "rounds.jsonl:1")

# A tool loop with interleaved reasoning inside the first user turn, then one more round.
TOOL_LOOP = Conversation((
    M("system", "Be brief."),
    M("user", "Weather in Paris?"),
    M("assistant", "", (WEATHER,), reasoning="I need the weather tool."),
    M("tool", '{"temp": 21}'),
    M("assistant", "It is 21 degrees.", reasoning="The tool says 21."),
    M("user", "Nice."), M("assistant", "Enjoy the sun!", reasoning="Close warmly."),
), (), "tools.jsonl:1")


def without_reasoning(conv: Conversation) -> Conversation:
    return Conversation(tuple(Message(m.role, m.content, m.tool_calls, m.name) for m in conv.messages),
                        conv.tools, conv.source)


def conversations(family: str) -> list[Conversation]:
    """The fixture conversations a family can render (GLM-4-0414 has no reasoning; Z1 no tools)."""
    if family == "glm4-0414":
        return [without_reasoning(ROUNDS), without_reasoning(TOOL_LOOP)]
    if family in ("glm-z1", "glm-z1-train"):
        return [ROUNDS]
    return [ROUNDS, TOOL_LOOP]


def write_jsonl(path: Path, convs: list[Conversation]) -> Path:
    """The conversations as OpenAI-shaped JSONL records (reasoning_content, tool_calls), one a line."""
    import json

    path.write_text("".join(json.dumps({"messages": c.to_hf()}) + "\n" for c in convs), encoding="utf-8")
    return path


def save_tokenizer(base, family: str, folder: Path) -> Path:
    """The family's tokenizer (its template as the tokenizer's chat_template) saved as a folder,
    which the CLI takes as ``--model``."""
    tokenizer_for(base, family).save_pretrained(folder)
    return folder
