"""Issue 7: a reply trained inside a window has exactly the loss it has in an `expand` sample with
the same history: the template's own rendering of system + the window's rounds up to that reply.

Tiny random GlmForCausalLM, float64 (tolerance 1e-9 on each token's loss).
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from turntune.constants import IGNORE_INDEX
from turntune.conversation import Conversation, Message
from turntune.encoding import EncodeOptions, EncodeReport, encode_conversations, resolve_template
from turntune.models import load_tokenizer


def token_losses(model, ids: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]  # loss of token i at i-1


@pytest.mark.slow  # GLM's 151k vocabulary in float64
def test_window_reply_loss_equals_expand_with_same_history(tiny_glm_path):
    tok = load_tokenizer(tiny_glm_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_glm_path, dtype=torch.float64, attn_implementation="eager")
    model.train(False)
    template = resolve_template(tok, "auto")
    msgs = [Message("system", "Answer briefly.")]
    for i in range(12):
        msgs += [Message("user", f"Question number {i}: what is {i} times {i + 3}?"),
                 Message("assistant", f"{i} times {i + 3} is {i * (i + 3)}. Anything else?")]
    conv = Conversation(tuple(msgs), (), "long.jsonl:1")
    rep = EncodeReport()
    windows = encode_conversations([conv], template, EncodeOptions("all", max_length=120), report=rep)
    assert len(windows) >= 3 and rep.replies_trained == 12
    checked = 0
    with torch.no_grad():
        for w in windows:
            kept = sorted({m for m in w.message if m >= 0})
            lw = token_losses(model, w.input_ids)
            for t in sorted({t for t in w.turn if t >= 0}):
                reply = conv.assistant_indices[t]
                # the expand sample with this window's history: render system + rounds up to reply t
                sub = Conversation(tuple(conv.messages[i] for i in kept if i <= reply), (), conv.source)
                sample = encode_conversations([sub], template, EncodeOptions("last"))[0]
                le = token_losses(model, sample.input_ids)
                pos_w = [i for i, x in enumerate(w.turn) if x == t]
                pos_e = [i for i, x in enumerate(sample.labels) if x != IGNORE_INDEX]
                assert [w.input_ids[i] for i in pos_w] == [sample.input_ids[i] for i in pos_e]
                for a, b in zip(pos_w, pos_e):
                    assert abs(float(lw[a - 1] - le[b - 1])) < 1e-9
                    checked += 1
    assert checked == sum(e.n_trained for e in windows)
