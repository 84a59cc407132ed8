"""Template kwargs (``data.template_kwargs``): extra chat-template variables on every render, as
``apply_chat_template``'s keyword arguments (GLM-4.7's ``clear_thinking``, Qwen3's ``enable_thinking``).

They reach the template through ``encode()``, ``resolve_template``, the config and every CLI
command's ``--config``; the nothing-dropped check renders with them; the encoded-data cache keys on
them only when set, so every fingerprint made without them keeps its value.
"""
from __future__ import annotations


import pytest
import yaml

from reasoning import ROUNDS, TOOL_LOOP, save_tokenizer, template_source, tokenizer_for, write_jsonl
from turntune import dataset
from turntune.config import load_config
from turntune.constants import IGNORE_INDEX
from turntune.conversation import Conversation, Message
from turntune.dataset import ENCODING_VERSION, cached_encode, encode_inputs, file_digest, fingerprint, \
    tokenizer_digest, write_encoded
from turntune.encoding import EncodeOptions, EncodeReport, encode, encode_conversations, resolve_template
from turntune.errors import ConfigError, DataError
from cli_run import run

PRESERVED = {"clear_thinking": False}


@pytest.fixture(scope="module")
def glm45(glm4_tokenizer):
    return tokenizer_for(glm4_tokenizer, "glm45")


def trained_text(tok, exs, turn: int) -> str:
    return "".join(tok.decode([lab]) for ex in exs for lab, t in zip(ex.labels, ex.turn)
                   if lab != IGNORE_INDEX and t == turn)


# -- encode(): clear_thinking=false makes GLM-4.5/4.7 prefix-stable ----------------------------------
def test_clear_thinking_false_is_one_pass_with_every_reasoning_trained(glm45):
    for conv in (ROUNDS, TOOL_LOOP):
        rep = EncodeReport()
        exs = encode(conv, glm45, template="hf", template_kwargs=PRESERVED, report=rep)
        assert (rep.not_prefix_stable, rep.trees, rep.tree_fallbacks, len(exs)) == (0, 0, 0, 1)
        assert exs[0].tree_end is None and exs[0].position_ids is None
        replies = [m for m in conv.messages if m.role == "assistant"]
        for k, m in enumerate(replies):
            assert m.reasoning in trained_text(glm45, exs, k), (conv.source, k)
        # the same ids as the template with the variable set inside it (tests/reasoning.py's
        # glm47-preserved family), so the kwarg reached every render
        same = encode(conv, glm45, template="hf", chat_template=template_source("glm47-preserved"))
        assert [e.input_ids for e in same] == [e.input_ids for e in exs]
        assert [e.labels for e in same] == [e.labels for e in exs]
        # without the kwarg the template clears earlier reasoning: trees
        rep = EncodeReport()
        encode(conv, glm45, template="hf", report=rep)
        assert (rep.not_prefix_stable, rep.trees) == (1, 1)


KEEPS_REASONING_IF_ASKED = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{ '<|user|>\\n' + m.content }}"
    "{%- elif m.role == 'assistant' -%}{{ '<|assistant|>' }}"
    "{%- if keep_reasoning and m.reasoning_content -%}{{ '\\n<think>' + m.reasoning_content + '</think>' }}{%- endif -%}"
    "{{ '\\n' + m.content }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}")


def test_the_nothing_dropped_check_renders_with_the_kwargs(glm45):
    conv = Conversation((Message("user", "Hi"), Message("assistant", "Hello.", reasoning="Greet back.")),
                        source="kw.jsonl:1")
    t = resolve_template(glm45, "hf", KEEPS_REASONING_IF_ASKED)
    with pytest.raises(DataError, match="does not render this assistant message's reasoning") as e:
        encode_conversations([conv], t)
    assert e.value.rule == "not_rendered"
    t = resolve_template(glm45, "hf", KEEPS_REASONING_IF_ASKED, {"keep_reasoning": True})
    [ex] = encode_conversations([conv], t)
    assert trained_text(glm45, [ex], 0) == "\n<think>Greet back.</think>\nHello.<|user|>"


def test_bad_kwargs_are_config_errors_naming_the_setting(glm45, glm4_tokenizer):
    with pytest.raises(ConfigError, match="'messages' is set by turntune on every render"):
        resolve_template(glm45, "hf", None, {"messages": []})
    with pytest.raises(ConfigError, match="'clear-thinking' is not a template variable name"):
        resolve_template(glm45, "hf", None, {"clear-thinking": False})
    # glm-4-9b-chat's tokenizer: auto is the native format, which has no Jinja to pass them to
    with pytest.raises(ConfigError, match="the native glm4 format renders no Jinja template"):
        resolve_template(glm4_tokenizer, "auto", None, PRESERVED)
    assert load_config(None, ["data.template_kwargs={clear_thinking: false}"]).data.template_kwargs == PRESERVED
    assert load_config(None, []).data.template_kwargs == {}
    with pytest.raises(ConfigError, match="data.template_kwargs: expected a mapping"):
        load_config(None, ["data.template_kwargs=[1, 2]"])
    with pytest.raises(ConfigError, match=r"data.template_kwargs: when: datetime.date\(2025, 1, 1\) is not a plain value"):
        load_config(None, ["data.template_kwargs={when: 2025-01-01}"])


# -- the encoded-data cache ------------------------------------------------------------------------
def test_fingerprint_without_kwargs_is_unchanged_and_with_kwargs_differs(glm45, tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", [ROUNDS, TOOL_LOOP])
    opts = EncodeOptions("all", "token", 512)
    plain = resolve_template(glm45, "hf")
    # exactly the inputs (so the fingerprint) every cache written before template kwargs has
    before = {"encoding_version": ENCODING_VERSION, "data": file_digest(data), "path": str(data),
              "tokenizer": tokenizer_digest(glm45), "template": "hf", "chat_template": glm45.chat_template,
              "options": {"strategy": "all", "weighting": "token", "max_length": 512, "cut_long_replies": False,
                          "history_fraction": 0.3, "tree": True},
              "format": "auto", "on_invalid": "error"}
    assert encode_inputs(data, plain, opts) == before
    assert encode_inputs(data, resolve_template(glm45, "hf", None, {}), opts) == before
    kw = encode_inputs(data, resolve_template(glm45, "hf", None, PRESERVED), opts)
    assert kw == {**before, "template_kwargs": PRESERVED}
    assert fingerprint(kw) != fingerprint(before)
    # a folder written with the kwargs is refused for a run without them, and the reverse
    folder = write_encoded(data, resolve_template(glm45, "hf", None, PRESERVED), opts, tmp_path / "enc",
                           num_proc=1).folder
    assert dataset.EncodedData(folder).encode_report.trees == 0
    with pytest.raises(ConfigError, match="was encoded with another template_kwargs than this run"):
        cached_encode(folder, plain, opts)
    assert cached_encode(folder, resolve_template(glm45, "hf", None, PRESERVED), opts).data.folder == folder


# -- the CLI, through --config ---------------------------------------------------------------------
def test_cli_commands_take_the_kwargs_from_the_config(glm4_tokenizer, tmp_path):
    model = save_tokenizer(glm4_tokenizer, "glm45", tmp_path / "glm45-tokenizer")
    data = write_jsonl(tmp_path / "r.jsonl", [ROUNDS, TOOL_LOOP])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(model)},
                                   "data": {"train": str(data), "template": "hf", "cache_dir": str(tmp_path / "cache"),
                                            "template_kwargs": PRESERVED}}))
    code, out, err = run(["encode", "--config", str(cfg), "--num-proc", "1"])
    assert code == 0, err
    assert "template hf (chat_template of " in out and ", template_kwargs {'clear_thinking': False}" in out
    assert "not prefix-stable 0: as token trees 0 (0 tokens vs 0 expanded" in out
    code, out, err = run(["encode", "--config", str(cfg), "--num-proc", "1", "--data.template_kwargs={}"])
    assert code == 0, err
    assert "template_kwargs" not in out and "not prefix-stable 2: as token trees 2 (" in out
    # the native GLM-4 format has no template to pass them to: one line, exit 2
    code, out, err = run(["encode", "--config", str(cfg), "--template", "glm4"])
    assert code == 2 and err.startswith("turntune: error: template_kwargs {'clear_thinking': False}: the native glm4")
    assert "Traceback" not in err
