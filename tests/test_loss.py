"""The loss: equals the model's own, label-only head == full head, sums normalised per step."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM, LlamaConfig,
    LlamaForCausalLM,
)

from turntune.collate import model_inputs, pad_batch
from turntune.constants import IGNORE_INDEX as IG
from turntune.errors import ConfigError
from turntune.example import Example
from turntune.loss import (
    LossSum, backward_loss, batch_loss, check_matches_model, cross_entropy_rows, model_parts,
    step_loss, window_weight,
)

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128,
              initializer_range=0.3)  # peaked logits: token losses differ, so weighting shows


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**COMMON))
    if kind == "glm":
        return GlmForCausalLM(GlmConfig(**COMMON, head_dim=16, pad_token_id=0))
    if kind == "glm4":
        return Glm4ForCausalLM(Glm4Config(**COMMON, head_dim=16, pad_token_id=0))
    return Gemma2ForCausalLM(Gemma2Config(**COMMON, head_dim=16, pad_token_id=0, final_logit_softcapping=2.0))


def examples(seed: int, n: int = 8, *, weighted: bool = True) -> list[Example]:
    """Chats of uneven length whose trained counts vary a lot (where per-micro-batch means go wrong)."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        length = rng.randint(6, 30)
        ids = [rng.randrange(1, VOCAB) for _ in range(length)]
        start = rng.randint(2, length - 1) if k % 2 else 1  # "last"-like or "all"-like
        trained = [i for i in range(start, length) if rng.random() < 0.8] or [length - 1]
        w = [0.0] * length
        for i in trained:
            w[i] = rng.uniform(0.2, 3.0) if weighted else 1.0
        out.append(Example(ids, [t if i in trained else IG for i, t in enumerate(ids)],
                           [0 if i in trained else -1 for i in range(length)], w))
    return out


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "glm", "glm4", "gemma2"])
def test_token_weighted_loss_equals_model_loss(kind: str) -> None:
    model = tiny(kind)
    batch = pad_batch(examples(1, weighted=False), pad_id=0)
    ls = batch_loss(model, batch)
    theirs = model(**model_inputs(batch), labels=batch.labels).loss
    assert ls.n_tokens == batch.n_trained and float(ls.total_weight) == batch.n_trained
    torch.testing.assert_close(ls.weighted_sum / ls.total_weight, theirs, atol=1e-5, rtol=0)


def test_softcapping_is_applied() -> None:
    model = tiny("gemma2")  # final_logit_softcapping=2 squeezes logits: the loss changes visibly
    batch = pad_batch(examples(1, weighted=False), pad_id=0)
    with torch.no_grad():
        assert abs(check_matches_model(model, batch) - float(model(**model_inputs(batch), labels=batch.labels).loss)) < 1e-5
        model.config.final_logit_softcapping = None
        plain = batch_loss(model, batch)
        model.config.final_logit_softcapping = 2.0
    assert abs(float(plain.weighted_sum / plain.total_weight) - check_matches_model(model, batch)) > 1e-2


def test_check_matches_model_catches_unknown_head() -> None:
    model = tiny("llama")
    model.config.logits_scaling = 3.0  # we would divide, Llama's forward does not
    with pytest.raises(ConfigError, match="LlamaForCausalLM: turntune's loss .* != the model's own"):
        check_matches_model(model, pad_batch(examples(2), pad_id=0))


@pytest.mark.parametrize("kind", ["llama", "glm"])
def test_label_only_head_equals_full_head(kind: str) -> None:
    model = tiny(kind)
    batch = pad_batch(examples(3), pad_id=0, side="left")
    results = []
    for full in (False, True):
        model.zero_grad()
        ls = batch_loss(model, batch, full_head=full)
        ls.weighted_sum.backward()
        results.append((ls, grads(model)))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.weighted_sum, b.weighted_sum, atol=1e-5, rtol=1e-6)
    assert a.n_tokens == b.n_tokens and float(a.total_weight) == float(b.total_weight)
    assert ga.keys() == gb.keys() and len(ga) == len(list(model.parameters()))
    for name in ga:  # float32; the two heads round differently (softmax vs log-softmax backward):
        scale = float(gb[name].abs().max())  # agreement to 1e-6 of each gradient's largest entry
        torch.testing.assert_close(ga[name], gb[name], atol=1e-6 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("rows", [1, 3, 130])
def test_cross_entropy_rows_equals_torch(rows: int) -> None:
    """The label-only head's own cross-entropy: values and gradients equal F.cross_entropy's for
    any upstream gradient (signed, zero). float64:
    same math, so agreement to 1e-12."""
    g = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, 997, generator=g, dtype=torch.float64) * 4).requires_grad_()
    targets = torch.randint(0, 997, (rows,), generator=g)
    targets[: rows // 2] = 7  # the same class in several rows
    upstream = torch.randn(rows, generator=g, dtype=torch.float64)
    if rows > 1:
        upstream[-1] = 0.0  # a row with no gradient
    mine = cross_entropy_rows(logits, targets)
    (grad_mine,) = torch.autograd.grad((mine * upstream).sum(), logits)
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), logits)
    torch.testing.assert_close(mine, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_mine, grad_ref, atol=1e-12, rtol=1e-12)


def test_batch_without_targets_is_zero_with_finite_grads() -> None:
    model = tiny("glm")
    exs = [Example([5, 6, 7, 8], [IG] * 4, [-1] * 4, [0.0] * 4), Example([9, 10], [IG, IG], [-1, -1], [0.0, 0.0])]
    ls = batch_loss(model, pad_batch(exs, pad_id=0))
    assert float(ls.weighted_sum) == 0.0 and float(ls.total_weight) == 0.0 and ls.n_tokens == 0
    total = window_weight([pad_batch(exs, pad_id=0)])
    loss = backward_loss(ls, total)
    loss.backward()
    assert float(loss) == 0.0
    g = grads(model)
    assert len(g) == len(list(model.parameters()))  # every parameter reached: DDP sees them all
    assert all(torch.isfinite(t).all() and (t == 0).all() for t in g.values())


def _run_window(model: torch.nn.Module, exs: list[Example], micro: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    window = [pad_batch(exs[s:s + micro], pad_id=0) for s in range(0, len(exs), micro)]
    total = window_weight(window)
    sums = []
    for b in window:
        ls = batch_loss(model, b)
        backward_loss(ls, total).backward()
        sums.append(LossSum(ls.weighted_sum.detach(), ls.total_weight, ls.n_tokens))
    return float(step_loss(sums, total)), grads(model)


def test_accumulation_is_exact() -> None:
    model = tiny("llama")
    exs = examples(4)
    loss8, g8 = _run_window(model, exs, micro=8)
    loss1, g1 = _run_window(model, exs, micro=1)
    assert abs(loss8 - loss1) < 1e-5
    for name in g8:
        torch.testing.assert_close(g1[name], g8[name], atol=1e-6, rtol=1e-4, msg=name)
    # the bug this guards against: averaging each micro-batch first gives another loss
    naive = sum(float(batch_loss(model, pad_batch([e], pad_id=0)).mean) for e in exs) / len(exs)
    assert abs(naive - loss8) > 1e-2


def test_backward_loss_is_exact_in_float64() -> None:
    """The step's ``world_size / total`` is taken in float64: a float64 run's gradients equal those
    of ``weighted_sum / total`` to rounding (a float32 factor put them off by up to 6e-8)."""
    model = tiny("llama").double()
    batch = pad_batch(examples(7), pad_id=0)  # uneven weights: a total 1/x of which float32 rounds
    total = window_weight([batch])
    assert total.dtype == torch.float64
    backward_loss(batch_loss(model, batch), total).backward()
    mine = grads(model)
    model.zero_grad()
    (batch_loss(model, batch).weighted_sum / total).backward()
    ref = grads(model)
    assert mine.keys() == ref.keys() and len(ref) == len(list(model.parameters()))
    for name, g in ref.items():  # to 1e-13 of each gradient's largest entry (entries that cancel
        assert g.dtype == torch.float64  # to near 0 carry rounding noise of the larger terms)
        torch.testing.assert_close(mine[name], g, rtol=1e-13, atol=1e-13 * float(g.abs().max()),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_model_parts_through_peft() -> None:
    peft = pytest.importorskip("peft")
    model = tiny("glm")
    plain = batch_loss(model, pad_batch(examples(5), pad_id=0))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    decoder, head = model_parts(wrapped)
    assert type(decoder).__name__ == "GlmModel" and "lora" in type(head).__module__
    ls = batch_loss(wrapped, pad_batch(examples(5), pad_id=0))  # LoRA B starts at 0: same function
    torch.testing.assert_close(ls.weighted_sum, plain.weighted_sum, atol=1e-5, rtol=0)
    ls.weighted_sum.backward()
    trained = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    assert any("lm_head" in n for n in trained)


def test_model_parts_rejects_a_bare_decoder() -> None:
    with pytest.raises(ConfigError, match="cannot find its decoder and LM head"):
        model_parts(tiny("llama").model)


DDP_CHILD = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    from turntune.collate import pad_batch
    from turntune.loss import LossModel, backward_loss, batch_loss, step_loss, window_weight

    class Decoder(nn.Module):  # pure torch (transformers takes ~20 s to import here); causal by cumsum
        def __init__(self):
            super().__init__()
            self.embed, self.proj = nn.Embedding(101, 32), nn.Linear(32, 32)
        def forward(self, input_ids, **_):
            return (torch.tanh(self.proj(self.embed(input_ids).cumsum(1))),)

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = Decoder(), nn.Linear(32, 101, bias=False)
        def get_decoder(self):
            return self.model
        def get_output_embeddings(self):
            return self.lm_head

    def run(model, batches):
        model.zero_grad()
        total = window_weight(batches)
        sums = [batch_loss(model, b) for b in batches]
        for ls in sums:
            backward_loss(ls, total).backward()
        return float(step_loss(sums, total)), {n: p.grad.clone() for n, p in model.named_parameters()}

    d = sys.argv[1]
    exs = torch.load(f"{d}/examples.pt", weights_only=False)
    torch.manual_seed(0)
    model = TinyLM()
    single = run(model, [pad_batch(exs, pad_id=0)])         # 1 rank x micro-batch 8 (before init)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ddp = DDP(LossModel(model))   # the loss inside the wrapped forward, so gradients get reduced
    mine = exs[rank * 4:(rank + 1) * 4]                      # 2 ranks x micro-batch 4
    loss, g = run(ddp, [pad_batch(mine, pad_id=0)])
    local = torch.tensor(loss)
    dist.all_reduce(local)                                   # each rank holds its share of the loss
    torch.save((single, (float(local), {k.removeprefix("module.model."): v for k, v in g.items()})),
               f"{d}/rank{rank}.pt")
    dist.barrier()
    from turntune.parallel import leave_distributed
    leave_distributed(0)  # as the CLI ends a torchrun process (parallel.py)
""")


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path: Path) -> None:
    """micro-batch 8 x accumulation 1 on one rank == 2 ranks (gloo DDP) x micro-batch 4."""
    torch.save(examples(6), tmp_path / "examples.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "child.py").write_text(DDP_CHILD)
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    for rank in range(2):
        (loss1, g1), (loss2, g2) = torch.load(tmp_path / f"rank{rank}.pt")
        assert abs(loss2 - loss1) < 1e-5, (loss1, loss2)
        assert g1.keys() == g2.keys() and len(g1) == 4
        for name, t in g1.items():
            torch.testing.assert_close(g2[name], t, atol=1e-6, rtol=1e-4, msg=name)
