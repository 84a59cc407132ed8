"""Experiment tracking (``train.report_to``) and the loss plot.

TensorBoard event files are written by turntune itself and read back here with TensorBoard's own
reader. wandb and mlflow are not installed in the test environment: their absence is a
ConfigError, and the calls turntune makes are checked against recording stand-ins for the two
modules (the API surface used: ``wandb.init/log/finish``, ``mlflow.start_run/log_params/
log_metrics/end_run``).
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from turntune.cli import main
from turntune.config import load_config
from turntune.errors import ConfigError
from turntune.plot import loss_figure
from turntune.tracking import crc32c, event_bytes, open_tracker, scalars

ROOT = Path(__file__).resolve().parents[1]


def test_crc32c_known_answers():
    # the check value of CRC-32C (RFC 3720 B.4 / the CRC catalogue) and iSCSI's all-zero block
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA


def test_event_bytes_parse_as_tensorboard_events():
    from tensorboard.compat.proto.event_pb2 import Event

    e = Event.FromString(event_bytes(12.5, 7, values={"train/loss": 1.25, "train/lr": 2e-4}))
    assert (e.wall_time, e.step) == (12.5, 7)
    assert [(v.tag, v.simple_value) for v in e.summary.value] == [("train/loss", 1.25),
                                                                   ("train/lr", pytest.approx(2e-4, rel=1e-7))]
    assert Event.FromString(event_bytes(1.0, 0, file_version="brain.Event:2")).file_version == "brain.Event:2"


def test_scalars_flatten_a_record():
    rec = {"kind": "eval", "step": 4, "loss": 1.5, "tokens": 120, "ok": True, "nan": float("nan"),
           "per_kind": {"tool_call": {"loss": 2.5, "tokens": 8}}}
    assert dict(scalars(rec, "eval/")) == {"eval/loss": 1.5, "eval/tokens": 120.0,
                                           "eval/per_kind/tool_call/loss": 2.5, "eval/per_kind/tool_call/tokens": 8.0}


def test_report_to_in_the_config():
    assert load_config().train.report_to == ()
    cfg = load_config(None, ["train.report_to=tensorboard,wandb"])
    assert cfg.train.report_to == ("tensorboard", "wandb")
    assert "  report_to:\n  - tensorboard\n  - wandb\n" in cfg.to_yaml()
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.report_to=tensorbord"])
    assert str(e.value) == "train.report_to: unknown value 'tensorbord'; valid values: tensorboard, wandb, mlflow"


@pytest.fixture(scope="module")
def tracked_run(tiny_llama_path, tmp_path_factory) -> Path:
    """Three LoRA steps on the tiny Llama with an evaluation before, at step 2 and after; TensorBoard on."""
    from turntune.training import train

    tmp = tmp_path_factory.mktemp("tracked")
    lines = [ln for ln in (ROOT / "examples" / "data" / "train.jsonl").read_text().splitlines()
             if "tool_calls" not in ln][:6]
    (tmp / "d.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(None, [f"model.path={tiny_llama_path}", f"data.train={tmp / 'd.jsonl'}",
                             f"data.eval={tmp / 'd.jsonl'}", f"train.output_dir={tmp / 'my-run'}",
                             "train.max_steps=3", "train.eval_every=2", "train.warmup_steps=1",
                             "train.micro_batch_tokens=512", "data.max_length=512", "train.autocast=fp32",
                             "train.report_to=tensorboard"])
    train(cfg)
    return tmp / "my-run"


def test_tensorboard_event_files_hold_every_record(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(tracked_run.glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].parent == tracked_run  # next to metrics.jsonl
    records = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [0, 2, 3]

    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/perplexity"} <= tags
    for tag, recs in (("train/loss", train), ("train/lr", train), ("eval/loss", evals)):
        got = acc.Scalars(tag)
        key = tag.split("/")[1]
        assert [s.step for s in got] == [r["step"] for r in recs]
        assert [s.value for s in got] == pytest.approx([r[key] for r in recs], rel=1e-6)  # stored as float32
    assert (tracked_run / "loss.png").stat().st_size > 0


def test_the_plot(tracked_run):
    records = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    fig = loss_figure(records, "my-run")
    fig.canvas.draw()
    ax, lr_ax = fig.axes
    assert ax.get_title() == "my-run"
    train_line, eval_points = ax.get_lines()
    assert list(train_line.get_xdata()) == [1, 2, 3]
    # eval losses are points where they were measured, not a line through them
    assert list(eval_points.get_xdata()) == [0, 2, 3]
    assert (eval_points.get_linestyle(), eval_points.get_marker()) == ("None", "o")
    # the learning rate on the second axis: warmup 1 step, then cosine decay
    (lr_line,) = lr_ax.get_lines()
    assert lr_ax.get_ylabel() == "learning rate"
    assert list(lr_line.get_ydata()) == [r["lr"] for r in records if r["kind"] == "train"]
    # whole-number step ticks only (three steps would otherwise get 0.5 ticks)
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "train loss", "eval loss (assistant tokens)", "learning rate"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_a_tracker_that_is_not_installed_is_a_config_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # absent, whatever this machine has installed
    with pytest.raises(ConfigError) as e:
        open_tracker(("tensorboard", "wandb"), tmp_path, {})
    assert str(e.value) == "train.report_to: wandb is not installed; pip install wandb (or remove wandb from train.report_to)"
    assert not list(tmp_path.glob("events.out.tfevents.*"))  # checked before any tracker started
    # through the command line: one line, before anything is loaded or trained
    config = str(Path(__file__).resolve().parents[1] / "examples" / "smollm2-lora.yaml")
    assert main(["train", config, "--train.report_to=wandb", f"--train.output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == f"turntune: error: {e.value}\n"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class Recorder:
    """A stand-in module that records each call as (name, args, kwargs)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, name: str, ret=None):
        def f(*a, **k):
            self.calls.append((name, a, k))
            return ret

        return f


def test_wandb_and_mlflow_get_every_record(monkeypatch, tmp_path):
    rec_w, rec_m = Recorder(), Recorder()
    run = types.SimpleNamespace(log=rec_w("run.log"), finish=rec_w("run.finish"))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=rec_w("init", run)))
    monkeypatch.setitem(sys.modules, "mlflow", types.SimpleNamespace(
        start_run=rec_m("start_run"), log_params=rec_m("log_params"), log_metrics=rec_m("log_metrics"),
        end_run=rec_m("end_run")))
    out = tmp_path / "exp-7"
    out.mkdir()
    tracker = open_tracker(("wandb", "mlflow", "wandb"), out, {"train": {"lr": 0.001, "report_to": ["wandb"]}})
    tracker.log({"kind": "eval", "step": 0, "loss": 3.0, "per_turn": {"0": {"loss": 3.5}}})
    tracker.log({"kind": "train", "step": 1, "loss": 2.0, "lr": 1e-3})
    tracker.close()
    assert rec_w.calls == [
        ("init", (), {"name": "exp-7", "dir": str(out), "config": {"train": {"lr": 0.001, "report_to": ["wandb"]}}}),
        ("run.log", ({"eval/loss": 3.0, "eval/per_turn/0/loss": 3.5},), {"step": 0}),
        ("run.log", ({"train/loss": 2.0, "train/lr": 1e-3},), {"step": 1}),
        ("run.finish", (), {})]
    assert rec_m.calls == [
        ("start_run", (), {"run_name": "exp-7"}),
        ("log_params", ({"train.lr": "0.001", "train.report_to": "['wandb']"},), {}),
        ("log_metrics", ({"eval/loss": 3.0, "eval/per_turn/0/loss": 3.5},), {"step": 0}),
        ("log_metrics", ({"train/loss": 2.0, "train/lr": 1e-3},), {"step": 1}),
        ("end_run", (), {})]
