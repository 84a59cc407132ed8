"""The fact turntune rests on (DESIGN.md §1), proven on real (tiny, random) models in float64:

- every reply token has the same loss under ``all`` as in its ``expand`` sample;
- ``all`` + ``turn`` weighting == ``expand`` with a mean of per-sample means (loss and gradients);
- ``all`` + ``token`` weighting == ``expand`` with a token mean.

Tolerance: 1e-9 absolute on losses; gradients within 1e-6 of the largest gradient entry. The
models run in float64, but transformers' RMSNorm computes in float32 whatever the dtype, so the
two sides (different batch shapes, hence different matmul blocking) agree to float32 rounding
there; nothing else differs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from turntune.collate import pad_batch
from turntune.constants import IGNORE_INDEX
from turntune.conversation import Conversation, Message, ToolCall
from turntune.encoding import EncodeOptions, encode_conversations, resolve_template
from turntune.loss import batch_loss
from turntune.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONVS = [
    Conversation((Message("system", "You are terse."), Message("user", "What is 2+2?"), Message("assistant", "4."),
                  Message("user", "And 3+3?"), Message("assistant", "6, of course."),
                  Message("user", "Thanks <|user|> <|im_end|>"), Message("assistant", "Any time.")), (), "a:1"),
    Conversation((Message("user", "Weather in Paris?"),
                  Message("assistant", "", (ToolCall("get_weather", '{"city": "Paris"}'),)),
                  Message("tool", '{"temp": 21}'), Message("assistant", "It is 21 degrees."),
                  Message("user", "Nice."), Message("assistant", "Enjoy the sun!")), (), "b:1"),
]


def per_token(model, ex) -> dict[int, float]:
    """Loss of each labelled position (position i predicted from i-1), straight from the logits."""
    ids = torch.tensor([ex.input_ids])
    logits = model(input_ids=ids, use_cache=False).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return {i: -logp[i - 1, ex.input_ids[i]] for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX}


@pytest.fixture(params=[pytest.param("glm", marks=pytest.mark.slow), "llama"])  # GLM: a 151k vocab in float64
def setup(request, tiny_glm_path, tiny_llama_path):
    path = tiny_glm_path if request.param == "glm" else tiny_llama_path
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager")
    model.train(False)
    # SmolLM2's own template drops tool calls (a tool-call reply is refused, not_rendered): the
    # shipped ChatML template with tool calls renders them, so the call is trained and compared too
    tools = None if request.param == "glm" else (ROOT / "examples" / "templates" / "chatml-tools.jinja").read_text()
    template = resolve_template(tok, "auto", chat_template=tools)
    assert template.name == ("glm4" if request.param == "glm" else "hf")
    return model, tok, template


def enc(template, strategy, weighting):
    return encode_conversations(CONVS, template, EncodeOptions(strategy, weighting))


def test_every_reply_token_has_the_same_loss(setup):
    model, _, template = setup
    alls, expands = enc(template, "all", "token"), enc(template, "expand", "token")
    assert len(alls) == 2 and len(expands) == 3 + 3
    with torch.no_grad():
        checked = 0
        for ex in expands:
            full = next(a for a in alls if a.source == ex.source)
            assert ex.input_ids == full.input_ids[: len(ex)]  # prefix-stable: expand is a prefix of all
            la, le = per_token(model, full), per_token(model, ex)
            for i, v in le.items():
                assert full.turn[i] == ex.turn[i] >= 0
                assert abs(float(la[i] - v)) < 1e-9
                checked += 1
        assert checked == sum(a.n_trained for a in alls)  # every trained token of `all` is checked once


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_all_with_turn_weighting_is_expand_mean_of_means(setup):
    model, tok, template = setup
    pad = tok.pad_token_id
    # expand, the way per-sample training computes it: each sample's mean loss, then the mean
    model.zero_grad()
    samples = enc(template, "expand", "token")
    per_sample = []
    for ex in samples:
        losses = torch.stack(list(per_token(model, ex).values()))
        per_sample.append(losses.mean())
    ref = torch.stack(per_sample).mean()
    ref.backward()
    g_ref = grads(model).clone()
    # all + turn weighting through turntune's own loss, in one padded batch
    model.zero_grad()
    batch = pad_batch(enc(template, "all", "turn"), pad_id=pad)
    ls = batch_loss(model, batch)
    ours = ls.weighted_sum / ls.total_weight
    ours.backward()
    g = grads(model)
    assert float(ls.total_weight) == pytest.approx(len(samples))  # one unit of weight per reply
    assert abs(float(ours - ref)) < 1e-9
    err = (g - g_ref).abs().max() / g_ref.abs().max()
    assert err < 1e-6, float(err)
    # and expand + turn weighting through turntune gives the same again
    model.zero_grad()
    ls2 = batch_loss(model, pad_batch(enc(template, "expand", "turn"), pad_id=pad))
    assert abs(float(ls2.weighted_sum / ls2.total_weight - ref)) < 1e-9


def test_all_with_token_weighting_is_expand_token_mean(setup):
    model, tok, template = setup
    with torch.no_grad():
        samples = enc(template, "expand", "token")
        ref = torch.cat([torch.stack(list(per_token(model, ex).values())) for ex in samples]).mean()
        ls = batch_loss(model, pad_batch(enc(template, "all", "token"), pad_id=tok.pad_token_id))
    assert abs(float(ls.weighted_sum / ls.total_weight - ref)) < 1e-9
    # and it is the model's own loss on the same batch (token weighting)
