"""Two CPU processes under torchrun (gloo) log the same losses as one process with the same
global batch: rank r's micro-batch of step s is micro-batch (2s + r) of the single run's
2-step accumulation window, and the loss is normalised over both ranks' trained tokens.
Both ways of running several ranks (``train.parallel``): ``ddp`` (whole model per rank in torch's
DDP, gradients all-reduced once per window) and ``fsdp`` (FSDP2: weights, gradients and optimizer
state sharded).

Tolerance: 1e-5 relative for losses (float32; the runs add the same token losses in another
order), 1e-4 for gradient norms (a sum of squares over differently sharded pieces). Measured:
LoRA fsdp losses are bit-identical to one process; full fine-tuning differs by ~1e-7.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _cfg(tmp: Path, model: Path, out: Path, accum: int, chat_template: Path | None = None, **train) -> Path:
    lines = (ROOT / "examples/data/train.jsonl").read_text().splitlines()[:40]
    data = tmp / "train40.jsonl"
    data.write_text("\n".join(lines) + "\n")
    ev = tmp / "eval8.jsonl"
    ev.write_text("\n".join((ROOT / "examples/data/eval.jsonl").read_text().splitlines()[:8]) + "\n")
    cfg = {"model": {"path": str(model)},
           "data": {"train": str(data), "eval": str(ev), "max_length": 512, "weighting": "turn",
                    **({"chat_template": str(chat_template)} if chat_template else {})},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0},  # dropout would draw different numbers per rank
           "train": {"output_dir": str(out), "max_steps": 4, "micro_batch_tokens": 512, "grad_accum": accum,
                     "lr": 5e-3, "warmup_steps": 1, "eval_every": 0, "autocast": "fp32", "seed": 1,
                     "save_every": 2, "keep_last": 5, **train}}
    p = tmp / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cfg: Path, ranks: int, *args: str) -> str:
    """``turntune train`` in one process, or under torchrun with ``ranks`` CPU processes; its stdout."""
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={_free_port()}",
                   "--master_addr=127.0.0.1"]
    p = subprocess.run(launch + ["-m", "turntune", "train", str(cfg), *args], env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def _records(out: Path, kind: str) -> list[dict]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == kind]


def _metrics(out: Path) -> tuple[list[float], float]:
    return [r["loss"] for r in _records(out, "train")], _records(out, "eval")[-1]["loss"]


@pytest.fixture(scope="module")
def one_process(tiny_glm_path, tmp_path_factory) -> Path:
    """The reference: one process, LoRA, 2 micro-batches per step, a checkpoint at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("one")
    _run(_cfg(tmp, tiny_glm_path, tmp / "one", 2), 1)
    return tmp / "one"


@pytest.fixture(scope="module")
def fsdp_lora(tiny_glm_path, tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("fsdp")
    out = _run(_cfg(tmp, tiny_glm_path, tmp / "fsdp", 1, parallel="fsdp"), 2)
    return tmp / "fsdp", out


@pytest.mark.slow
def test_two_ranks_equal_one_process(one_process, tiny_glm_path, tmp_path):
    stdout = _run(_cfg(tmp_path, tiny_glm_path, tmp_path / "two", 1), 2)
    assert "2 rank(s)" in stdout
    assert "DDP over 2 ranks: trainable gradients all-reduced in buckets, once per step\n" in stdout
    one, eval_one = _metrics(one_process)
    two, eval_two = _metrics(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-5)
    assert eval_two == pytest.approx(eval_one, rel=1e-5)


@pytest.mark.slow
def test_fsdp_lora_two_ranks_equal_one_process(one_process, fsdp_lora):
    out, stdout = fsdp_lora
    assert "FSDP2: 2 decoder layers + the root sharded over 2 ranks" in stdout
    one, eval_one = _metrics(one_process)
    two, eval_two = _metrics(out)
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-5)
    assert eval_two == pytest.approx(eval_one, rel=1e-5)
    assert _records(out, "eval")[0]["loss"] == pytest.approx(_records(one_process, "eval")[0]["loss"], rel=1e-5)
    assert [r["grad_norm"] for r in _records(out, "train")] == pytest.approx(
        [r["grad_norm"] for r in _records(one_process, "train")], rel=1e-4)
    # rank 0 wrote the same files as one process: gathered weights, optimizer state numbered alike
    for f in ("checkpoints/step-000004/trainable.safetensors", "final/adapter_model.safetensors"):
        a, b = load_file(one_process / f), load_file(out / f)
        assert sorted(a) == sorted(b) and len(a) == 16  # q/k/v/o x A/B x 2 layers
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    oa, ob = (torch.load(o / "checkpoints/step-000004/optimizer.pt", weights_only=True) for o in (one_process, out))
    assert ob["param_groups"] == oa["param_groups"]
    assert sorted(ob["state"]) == sorted(oa["state"]) == list(range(16))
    for i, st in oa["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(ob["state"][i][k], v, rtol=1e-5, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_fsdp_stopped_at_a_checkpoint_resumes_with_the_same_losses(fsdp_lora, tmp_path, parallel):
    """The state a stop (or kill) right after step 2's checkpoint leaves; resumed sharded, and
    unsharded: a checkpoint does not depend on how the run was parallelised."""
    done, _ = fsdp_lora
    out = tmp_path / "fsdp"  # same name: the config's output_dir is rewritten below anyway
    shutil.copytree(done, out)
    shutil.rmtree(out / "checkpoints" / "step-000004")
    shutil.rmtree(out / "final")
    (out / "checkpoints" / "latest").write_text("step-000002")
    (out / "metrics.jsonl").write_text("")
    cfg = yaml.safe_load((done / "config.yaml").read_text())
    cfg["train"]["output_dir"], cfg["train"]["parallel"] = str(out), parallel
    p = tmp_path / "resume.yaml"
    p.write_text(yaml.safe_dump(cfg))
    stdout = _run(p, 2, "--resume")
    assert f"resumed from step 2 ({out / 'checkpoints' / 'step-000002'})" in stdout
    assert [r["step"] for r in _records(out, "train")] == [3, 4]
    full, eval_full = _metrics(done)
    resumed, eval_resumed = _metrics(out)
    assert resumed == pytest.approx(full[2:], rel=1e-5)
    assert eval_resumed == pytest.approx(eval_full, rel=1e-5)


# SmolLM2's own template (the tiny Llama's) drops tool calls: the shipped one renders them
TOOLS = ROOT / "examples/templates/chatml-tools.jinja"
FULL = dict(method="full", lr=1e-3, save_every=0)


@pytest.fixture(scope="module")
def one_process_full(tiny_llama_path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("one-full")
    _run(_cfg(tmp, tiny_llama_path, tmp / "one", 2, TOOLS, **FULL), 1)
    return tmp / "one"


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_full_fine_tuning_two_ranks_equal_one_process(one_process_full, tiny_llama_path, tmp_path, parallel):
    """Every weight trained (and, with fsdp, sharded); tiny Llama ties its LM head to the embedding."""
    _run(_cfg(tmp_path, tiny_llama_path, tmp_path / "two", 1, TOOLS, parallel=parallel, **FULL), 2)
    one, eval_one = _metrics(one_process_full)
    two, eval_two = _metrics(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-5)
    assert eval_two == pytest.approx(eval_one, rel=1e-5)
    a, b = (load_file(o / "final" / "model.safetensors") for o in (one_process_full, tmp_path / "two"))
    assert sorted(b) == sorted(a)  # the tied head is written once, as in one process
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


EVAL_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from turntune.collate import pack
from turntune.data import load_conversations
from turntune.encoding import EncodeOptions, encode_conversations, resolve_template
from turntune.evaluation import evaluate
from turntune.models import add_lora, load_model, load_tokenizer
from turntune.parallel import Dist, leave_distributed, shard_model

model_dir, data, result = sys.argv[1:]
dist.init_process_group("gloo")
tok = load_tokenizer(model_dir)
convs = load_conversations(data).conversations
examples = encode_conversations(convs, resolve_template(tok, "auto"), EncodeOptions("all", "token", 512))
torch.manual_seed(0)
model = add_lora(load_model(model_dir), 4, 8, 0.0)
for p in model.parameters():
    dist.broadcast(p.data, 0)
kw = dict(pad_id=tok.pad_token_id, max_length=512, rows_per_batch=1)
whole = evaluate(model, examples, **kw)
root = shard_model(model, Dist(dist.get_rank(), dist.get_world_size()))
sharded = evaluate(root, examples, **kw)
if dist.get_rank() == 0:
    with open(result, "w") as f:
        json.dump({"rows": len(pack(list(examples), 512)), "whole": [whole.loss, whole.tokens, whole.per_turn],
                   "sharded": [sharded.loss, sharded.tokens, sharded.per_turn]}, f)
dist.barrier()
leave_distributed(0)  # as the CLI ends a torchrun process (parallel.py)
"""


@pytest.mark.slow
def test_fsdp_evaluation_with_uneven_shares_of_rows(tiny_glm_path, tmp_path):
    """Ranks with different numbers of eval batches: the sharded model must still run the same
    number of forwards on each (each gathers weights collectively), or the run would hang."""
    script = tmp_path / "eval_fsdp.py"
    script.write_text(EVAL_SCRIPT)
    data = tmp_path / "eval8.jsonl"
    data.write_text("\n".join((ROOT / "examples/data/eval.jsonl").read_text().splitlines()[:8]) + "\n")
    result = tmp_path / "result.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(script), str(tiny_glm_path),
                        str(data), str(result)], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(result.read_text())
    assert r["rows"] % 2 == 1  # one batch of one row more on rank 0 than on rank 1
    assert r["sharded"][1] == r["whole"][1] > 0
    assert r["sharded"][0] == pytest.approx(r["whole"][0], rel=1e-6)
    assert r["sharded"][2].keys() == r["whole"][2].keys()
    for k, (loss, n) in r["whole"][2].items():
        assert r["sharded"][2][k][1] == n and r["sharded"][2][k][0] == pytest.approx(loss, rel=1e-6)


NO_SYNC_SCRIPT = """
import sys
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from turntune.collate import pad_batch
from turntune.data import load_conversations
from turntune.encoding import EncodeOptions, encode_conversations, resolve_template
from turntune.loss import window_weight
from turntune.models import add_lora, load_model, load_tokenizer
from turntune.parallel import distribute, leave_distributed, setup_distributed, sum_over_ranks
from turntune.training import accumulate

model_dir, data, result = sys.argv[1:]
tok = load_tokenizer(model_dir)
convs = load_conversations(data).conversations
examples = encode_conversations(convs, resolve_template(tok, "auto"), EncodeOptions("all", "turn", 512))[:6]
torch.manual_seed(0)
model = add_lora(load_model(model_dir), 4, 8, 0.0)
with torch.no_grad():  # LoRA's B starts at 0, which would leave every A without gradient
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.1)
trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}


def window_of(exs, micro):
    return [pad_batch(exs[s:s + micro], pad_id=tok.pad_token_id) for s in range(0, len(exs), micro)]


# the reference, in one process before the group exists: all 6 examples in 3 micro-batches of 2
num = accumulate(model, window_of(examples, 2), window_weight(window_of(examples, 6)), False)
reference = (float(num), {n: p.grad.clone() for n, p in trainable.items()})
model.zero_grad(set_to_none=True)

d = setup_distributed()
runner, note = distribute(model, d, "ddp")
calls = []


def counting(state, bucket):  # DDP's own all-reduce of one bucket, counted
    calls.append(bucket.index())
    return allreduce_hook(None, bucket)


runner.register_comm_hook(None, counting)
mine = examples[3 * d.rank:3 * d.rank + 3]
reductions = {}
for micro in (3, 1):  # a window of one micro-batch, then of three (rank r: examples 3r..3r+2)
    runner.zero_grad(set_to_none=True)
    window = window_of(mine, micro)
    denom = window_weight(window)
    num = sum_over_ranks(accumulate(runner, window, denom, False), d)
    reductions[len(window)] = len(calls)
    calls.clear()
got = (float(num), {n: p.grad.clone() for n, p in trainable.items()})
if d.rank == 0:
    torch.save({"ddp": isinstance(runner, DistributedDataParallel), "note": note, "reductions": reductions,
                "reference": reference, "got": got}, result)
torch.distributed.barrier()  # both done
leave_distributed(0)  # as the CLI ends a torchrun process (parallel.py)
"""


def test_ddp_reduces_gradients_once_per_window(tiny_glm_path, tmp_path):
    """torch's DDP, with ``no_sync()`` for all but a window's last micro-batch: a window of three
    micro-batches all-reduces as many buckets as a window of one (per-parameter all-reduces by
    hand reduce none through DDP), and 2 ranks x 3 micro-batches of 1 give the gradients of one
    process with 3 micro-batches of 2."""
    script = tmp_path / "no_sync.py"
    script.write_text(NO_SYNC_SCRIPT)
    data = tmp_path / "train8.jsonl"
    data.write_text("\n".join((ROOT / "examples/data/train.jsonl").read_text().splitlines()[:8]) + "\n")
    result = tmp_path / "result.pt"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(script), str(tiny_glm_path),
                        str(data), str(result)], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    r = torch.load(result, weights_only=False)
    assert r["ddp"] and r["note"] == "DDP over 2 ranks: trainable gradients all-reduced in buckets, once per step"
    assert r["reductions"][3] == r["reductions"][1] >= 1, r["reductions"]
    (loss_one, g_one), (loss_two, g_two) = r["reference"], r["got"]
    assert loss_two == pytest.approx(loss_one, rel=1e-6)
    assert g_one.keys() == g_two.keys() and len(g_one) == 16  # q/k/v/o x A/B x 2 layers
    for name, g in g_one.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g_two[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=name)


def test_parallel_is_ddp_or_fsdp():
    from turntune.config import load_config
    from turntune.errors import ConfigError

    assert load_config(None).train.parallel == "ddp"
    assert load_config(None, ["train.parallel=fsdp"]).train.parallel == "fsdp"
    with pytest.raises(ConfigError, match=r"^train.parallel: unknown value 'zero3'; valid values: ddp, fsdp$"):
        load_config(None, ["train.parallel=zero3"])


@pytest.mark.slow
def test_fsdp_with_one_process_runs_the_whole_model(one_process, tiny_glm_path, tmp_path):
    stdout = _run(_cfg(tmp_path, tiny_glm_path, tmp_path / "one", 2, parallel="fsdp"), 1)
    assert "train.parallel=fsdp with one process: nothing to shard, the model runs whole" in stdout
    assert "FSDP2" not in stdout
    assert _metrics(tmp_path / "one") == _metrics(one_process)


def test_a_torchrun_process_leaves_without_the_interpreters_teardown(tmp_path, monkeypatch):
    """Left to interpreter teardown, gloo's threads can abort a finished rank (SIGABRT after the
    work is saved: a failed job). The CLI destroys the group and leaves with its exit code."""
    import atexit

    import torch.distributed as dist

    from turntune import parallel
    from turntune.cli import main

    left = []

    class Left(Exception):
        pass

    def fake_exit(code):
        left.append((code, dist.is_initialized()))
        raise Left

    monkeypatch.setattr(parallel.os, "_exit", fake_exit)
    hooks = []
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: hooks.append(dist.is_initialized()))  # not pytest's
    data = str(ROOT / "examples/data/eval.jsonl")
    assert main(["validate", data]) == 0 and left == []  # no process group: an ordinary return
    try:
        for i, argv in enumerate((["validate", data], ["validate", str(tmp_path / "missing.jsonl")])):
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{i}'}", rank=0, world_size=1)
            with pytest.raises(Left):
                main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert left == [(0, False), (2, False)]  # the exit code kept, the group destroyed first
    assert hooks == [False, False]  # and what a normal exit runs first, run
