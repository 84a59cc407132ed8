"""Faults: non-finite losses, unwritable or full output folders, crashes and kills while saving.

Everything trains a tiny random Llama on the hand-computable toy tokenizer (106 ids), so a run of
a few steps takes about a second. The SIGKILL trials of ``test_train.py`` kill at a moment chosen
by the clock; the trial here kills *inside* a checkpoint write, deterministically: the child
process blocks in the middle of writing ``trainable.safetensors`` and the test kills it there.
Crashes at the other moments of a save (optimizer state, the switch of ``latest``) and a full disk
during training are raised in-process.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from toy import toy_tokenizer
from turntune import checkpoint as ckpt
from turntune.cli import main
from turntune.config import load_config
from turntune.errors import TurntuneError

ROOT = Path(__file__).resolve().parents[1]


# -- a tiny model on the toy tokenizer --------------------------------------------------------------
def make_toy_model(dest: Path) -> Path:
    """A tiny random ``LlamaForCausalLM`` (vocab 106) with the toy tokenizer, in HF layout."""
    from turntune.assets import tiny_model_dir

    tok = dest.parent / f"{dest.name}-tokenizer"
    toy_tokenizer().save_pretrained(tok)
    return tiny_model_dir("llama", tok, dest, hidden=32, layers=2, heads=4, kv_heads=2)


def toy_conversations(n: int = 12) -> str:
    """n short two-round conversations in the toy tokenizer's alphabet (one JSONL text)."""
    lines = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"{i}+{i}?"}, {"role": "assistant", "content": f"{2 * i}."},
                {"role": "user", "content": "x2?"}, {"role": "assistant", "content": f"{4 * i}!"}]
        lines.append(json.dumps({"messages": msgs}))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> Path:
    return make_toy_model(tmp_path_factory.mktemp("toy-llama") / "model")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("toy-data") / "train.jsonl"
    p.write_text(toy_conversations())
    return p


def write_cfg(folder: Path, model: Path, data: Path, out: Path, **train) -> Path:
    cfg = {"model": {"path": str(model)},
           "data": {"train": str(data), "eval": None, "max_length": 64, "packing": True},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"output_dir": str(out), "max_steps": 6, "micro_batch_tokens": 64, "lr": 1e-2,
                     "warmup_steps": 1, "save_every": 1, "keep_last": 3, "autocast": "fp32", "seed": 1,
                     "eval_every": 0, **train}}
    p = folder / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def train_losses(out: Path) -> dict[int, float]:
    got: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            got[rec["step"]] = rec["loss"]
    return got


def trainable(out: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")


@pytest.fixture(scope="module")
def reference(toy_model, toy_data, tmp_path_factory) -> dict[int, float]:
    """Losses of an uninterrupted 6-step run: what every interrupted run must reproduce."""
    from turntune.training import train

    tmp = tmp_path_factory.mktemp("reference")
    train(load_config(write_cfg(tmp, toy_model, toy_data, tmp / "ref", save_every=0)))  # saving changes no loss
    got = train_losses(tmp / "ref")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    return got


# -- non-finite losses and gradients ----------------------------------------------------------------
class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def poison(monkeypatch, at_call: int, kind: str) -> dict:
    """Make the loss (or its gradient) of the ``at_call``-th micro-batch non-finite; record the
    trainable weights seen at every call, to check that a skipped step changes nothing."""
    import turntune.training as tr

    real = tr.batch_loss
    seen = {"calls": 0, "weights": []}

    def fake(model, batch, **kw):
        seen["calls"] += 1
        seen["weights"].append([p.detach().clone() for p in model.parameters() if p.requires_grad])
        ls = real(model, batch, **kw)
        if seen["calls"] == at_call:
            bad = {"nan loss": lambda w: w * float("nan"), "inf loss": lambda w: w + float("inf"),
                   "nan gradient": _NanGrad.apply}[kind]
            ls.weighted_sum = bad(ls.weighted_sum)
        return ls

    monkeypatch.setattr(tr, "batch_loss", fake)
    return seen


@pytest.mark.parametrize("kind", ["nan loss", "inf loss", "nan gradient"])
def test_nonfinite_stops_at_the_step_naming_it(toy_model, toy_data, tmp_path, monkeypatch, capsys, kind):
    out = tmp_path / "run"
    poison(monkeypatch, at_call=3, kind=kind)
    assert main(["train", str(write_cfg(tmp_path, toy_model, toy_data, out, save_every=2))]) == 2
    what = "gradient" if kind == "nan gradient" else "loss"
    assert capsys.readouterr().err == (
        f"turntune: error: non-finite {what} at step 3, micro-batches 2..2; lower train.lr, check the data, "
        "or set train.nonfinite=skip\n")
    assert sorted(train_losses(out)) == [1, 2]  # nothing logged for the bad step or after it
    assert ckpt.latest(out) == out / "checkpoints" / "step-000002"  # the last good state, intact


def test_nonfinite_skip_skips_counts_and_changes_nothing(toy_model, toy_data, tmp_path, monkeypatch, capsys):
    from turntune.training import train

    out = tmp_path / "run"
    seen = poison(monkeypatch, at_call=3, kind="nan loss")
    res = train(load_config(write_cfg(tmp_path, toy_model, toy_data, out, nonfinite="skip", max_steps=4,
                                                   save_every=0)))
    assert (res.steps, res.skipped_steps) == (4, 1)
    log = capsys.readouterr().out
    assert "skipped step 3, micro-batches 2..2: non-finite loss (1 so far)\n" in log
    assert "skipped non-finite steps: 1\n" in log
    assert sorted(train_losses(out)) == [1, 2, 4]
    w = seen["weights"]  # trainable weights as each step's forward saw them
    assert len(w) == 4
    assert all(torch.equal(a, b) for a, b in zip(w[2], w[3])), "the skipped step 3 moved the weights"
    assert not all(torch.equal(a, b) for a, b in zip(w[1], w[2])), "a normal step (2) should move them"


def test_a_huge_learning_rate_stops_with_the_step(toy_model, toy_data, tmp_path, capsys):
    """No monkeypatching: lr 1e30 overflows float32 activations after one Adam step."""
    out = tmp_path / "run"
    assert main(["train", str(write_cfg(tmp_path, toy_model, toy_data, out, lr=1e30, warmup_steps=0,
                                        max_grad_norm=0.0, save_every=0))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("turntune: error: non-finite loss at step 2, micro-batches 1..1; "), err
    assert sorted(train_losses(out)) == [1]


# -- the output folder ------------------------------------------------------------------------------
def _no_model_loading(monkeypatch) -> None:
    """Fail the test if training got as far as resolving the model folder."""
    import turntune.training as tr

    def boom(*a, **k):
        raise AssertionError("the output folder was not checked before the model was loaded")

    monkeypatch.setattr(tr, "resolve_path", boom)


@pytest.mark.parametrize("where", ["under a regular file", "an existing file"])
def test_unwritable_output_dir_is_reported_before_anything_loads(toy_model, toy_data, tmp_path, monkeypatch,
                                                                 capsys, where):
    # Tests run as root, which ignores chmod: a path that no one can create is one below a file.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out, why = (blocker / "run", "Not a directory") if where == "under a regular file" else (blocker, "File exists")
    _no_model_loading(monkeypatch)
    assert main(["train", str(write_cfg(tmp_path, toy_model, toy_data, out))]) == 2
    assert capsys.readouterr().err == f"turntune: error: train.output_dir: cannot write to {out}: {why}\n"


def test_dev_null_output_dir(toy_model, toy_data, tmp_path, monkeypatch, capsys):
    _no_model_loading(monkeypatch)
    assert main(["train", str(write_cfg(tmp_path, toy_model, toy_data, Path("/dev/null/run")))]) == 2
    assert capsys.readouterr().err == "turntune: error: train.output_dir: cannot write to /dev/null/run: Not a directory\n"


def test_a_full_disk_is_reported_before_anything_loads(toy_model, toy_data, tmp_path, monkeypatch, capsys):
    import shutil

    import turntune.training as tr

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(tr.shutil, "disk_usage", lambda p: usage._replace(free=int(0.1 * 2**30)))
    _no_model_loading(monkeypatch)
    out = tmp_path / "run"
    assert main(["train", str(write_cfg(tmp_path, toy_model, toy_data, out))]) == 2
    assert capsys.readouterr().err == (f"turntune: error: train.output_dir: only 0.10 GiB free on the disk of {out}; "
                                       "checkpoints need about 0.2 GiB\n")


# -- crashes while saving a checkpoint --------------------------------------------------------------
def _small_state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _half_written(path: Path) -> None:
    path.write_bytes(b"\x00" * 37)  # what a full disk leaves: a file that starts and stops


@pytest.mark.parametrize("crash_in", ["weights", "optimizer", "latest switch"])
def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, crash_in):
    out = tmp_path / "run"
    model, opt, sched = _small_state(0)
    ckpt.save(out, 1, model, opt, sched)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)  # step 2 would save different weights

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if crash_in == "weights":
        def fake(tensors, filename, *a, **k):
            if str(filename).endswith("trainable.safetensors"):
                _half_written(Path(filename))
                disk_full()
            return real(tensors, filename, *a, **k)

        real = ckpt.save_file
        monkeypatch.setattr(ckpt, "save_file", fake)
    elif crash_in == "optimizer":
        def fake_torch_save(obj, f, *a, **k):
            _half_written(Path(f))
            disk_full()

        monkeypatch.setattr(ckpt.torch, "save", fake_torch_save)
    else:
        real_replace = os.replace

        def fake_replace(src, dst):
            if str(dst).endswith("latest"):
                disk_full()
            return real_replace(src, dst)

        monkeypatch.setattr(ckpt.os, "replace", fake_replace)
    with pytest.raises(OSError, match="No space left on device"):
        ckpt.save(out, 2, model, opt, sched)
    monkeypatch.undo()

    assert ckpt.latest(out) == out / "checkpoints" / "step-000001"
    fresh, opt2, sched2 = _small_state(1)  # other weights: load must bring step 1's back
    state = ckpt.load(out, fresh, opt2, sched2)
    assert state["step"] == 1
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    # the next save completes and removes what the crash left behind
    ckpt.save(out, 3, model, opt, sched, keep_last=5)
    assert ckpt.latest(out) == out / "checkpoints" / "step-000003"
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_disk_full_while_training_keeps_the_last_checkpoint_and_resumes_exactly(
        toy_model, toy_data, tmp_path, monkeypatch, reference):
    from turntune.training import train

    out = tmp_path / "run"
    cfg = load_config(write_cfg(tmp_path, toy_model, toy_data, out, save_every=2))
    real, calls = ckpt.save_file, {"n": 0}

    def fake(tensors, filename, *a, **k):
        if str(filename).endswith("trainable.safetensors"):
            calls["n"] += 1
            if calls["n"] == 2:  # the checkpoint of step 4
                _half_written(Path(filename))
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", fake)
    with pytest.raises(TurntuneError) as info:
        train(cfg)
    monkeypatch.undo()
    assert str(info.value) == (
        f"train.output_dir: writing the checkpoint of step 4 in {out} failed: No space left on device; the previous "
        f"checkpoint ({out / 'checkpoints' / 'step-000002'}) is intact, free space and continue with --resume")
    assert ckpt.latest(out) == out / "checkpoints" / "step-000002"
    res = train(cfg, resume=True)
    assert res.steps == 6
    got = train_losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def test_disk_full_while_training_is_one_clean_error(toy_model, toy_data, tmp_path, monkeypatch, capsys):
    real, calls = ckpt.save_file, {"n": 0}

    def fake(tensors, filename, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # step 1's checkpoint (random states, weights) is written; step 2's is not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", fake)
    out = tmp_path / "run"
    assert main(["train", str(write_cfg(tmp_path, toy_model, toy_data, out, max_steps=3))]) == 2
    assert capsys.readouterr().err == (
        f"turntune: error: train.output_dir: writing the checkpoint of step 2 in {out} failed: No space left on "
        f"device; the previous checkpoint ({out / 'checkpoints' / 'step-000001'}) is intact, free space and "
        "continue with --resume\n")


def test_disk_full_at_the_first_checkpoint_says_there_is_none(toy_model, toy_data, tmp_path, monkeypatch, capsys):
    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    out = tmp_path / "run"
    assert main(["train", str(write_cfg(tmp_path, toy_model, toy_data, out, max_steps=2))]) == 2
    assert capsys.readouterr().err == (
        f"turntune: error: train.output_dir: writing the checkpoint of step 1 in {out} failed: No space left on "
        "device; no earlier checkpoint exists, free space and start again\n")


# -- SIGKILL inside a checkpoint write --------------------------------------------------------------
CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import turntune.checkpoint as ckpt

    marker, step = Path(sys.argv[1]), int(sys.argv[2])
    name = f"step-{step:06d}"

    def hang():
        marker.write_text("in")
        time.sleep(600)  # the parent kills us here

    real_save = ckpt.save_file

    def save_file(tensors, filename, *a, **k):
        if str(filename).endswith(f".tmp-{name}/trainable.safetensors"):
            Path(filename).write_bytes(b"half")  # the weights file is half written when the kill comes
            hang()
        return real_save(tensors, filename, *a, **k)

    ckpt.save_file = save_file
    from turntune.cli import main
    sys.exit(main(["train", sys.argv[3]]))
""")


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_then_resume_logs_the_same_losses(toy_model, toy_data, tmp_path, reference):
    from turntune.training import train

    out = tmp_path / "run"
    cfg_path = write_cfg(tmp_path, toy_model, toy_data, out, save_every=2)
    marker, log = tmp_path / "in-checkpoint", tmp_path / "child.log"
    with open(log, "w") as sink:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), "4", str(cfg_path)],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert marker.exists(), log.read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ckpt.latest(out) == out / "checkpoints" / "step-000002"  # step 4 was never switched in
    assert sorted(train_losses(out)) == [1, 2, 3, 4]

    res = train(load_config(cfg_path), resume=True)
    assert res.steps == 6
    got = train_losses(out)  # step 4 logged twice: the resumed value is the one kept
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert ckpt.latest(out) == out / "checkpoints" / "step-000006"
    assert not list((out / "checkpoints").glob(".tmp-*"))


# -- a damaged checkpoint on --resume ---------------------------------------------------------------
@pytest.mark.parametrize("damaged", ["optimizer.pt", "trainable.safetensors", "scheduler.pt", "rng-0.json",
                                     "state.json"])
def test_a_truncated_checkpoint_file_names_itself_and_the_way_back(tmp_path, damaged):
    out = tmp_path / "run"
    model, opt, sched = _small_state(0)
    ckpt.save(out, 1, model, opt, sched, keep_last=5)
    ckpt.save(out, 2, model, opt, sched, keep_last=5)
    bad = out / "checkpoints" / "step-000002" / damaged
    _half_written(bad)
    fresh, opt2, sched2 = _small_state(1)
    with pytest.raises(TurntuneError) as e:
        ckpt.load(out, fresh, opt2, sched2)
    msg = str(e.value)
    assert msg.startswith(f"--resume: {bad} is damaged or truncated (")
    assert msg.endswith(f"); delete {out / 'checkpoints' / 'step-000002'} and write 'step-000001' into "
                        f"{out / 'checkpoints' / 'latest'} to resume from the checkpoint before it")
    # doing what it says works: the previous checkpoint loads
    (out / "checkpoints" / "latest").write_text("step-000001")
    assert ckpt.load(out, fresh, opt2, sched2)["step"] == 1


def test_a_truncated_only_checkpoint_says_start_again(tmp_path):
    out = tmp_path / "run"
    model, opt, sched = _small_state(0)
    ckpt.save(out, 1, model, opt, sched)
    bad = out / "checkpoints" / "step-000001" / "optimizer.pt"
    bad.write_bytes(bad.read_bytes()[:100])  # cut short, as a copy or a full disk can leave it
    with pytest.raises(TurntuneError) as e:
        ckpt.load(out, *_small_state(1))
    assert str(e.value) == (f"--resume: {bad} is damaged or truncated (RuntimeError: PytorchStreamReader failed "
                            "reading zip archive: failed finding central directory); no earlier checkpoint is "
                            f"left: delete {out / 'checkpoints'} and start again without --resume")


def test_a_truncated_optimizer_state_on_resume_is_one_clean_error(toy_model, toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, toy_model, toy_data, out)
    assert main(["train", str(cfg), "--train.max_steps=2"]) == 0
    bad = out / "checkpoints" / "step-000002" / "optimizer.pt"
    _half_written(bad)
    capsys.readouterr()
    assert main(["train", str(cfg), "--train.max_steps=4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"turntune: error: --resume: {bad} is damaged or truncated (")
    assert "Traceback" not in err
