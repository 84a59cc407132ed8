"""The training loop end to end on a tiny GLM: runs, saves, resumes exactly, and survives SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from turntune.config import load_config
from turntune.training import train

ROOT = Path(__file__).resolve().parents[1]


def subset(tmp: Path, name: str, n: int) -> str:
    """The first n conversations of a shipped split: enough to train a few steps, quick on 2 cores."""
    p = tmp / f"{name}-{n}.jsonl"
    if not p.exists():
        lines = (ROOT / "examples/data" / f"{name}.jsonl").read_text().splitlines()[:n]
        p.write_text("\n".join(lines) + "\n")
    return str(p)


def write_cfg(tmp: Path, model: Path, out: Path, **train_over) -> Path:
    cfg = {
        "model": {"path": str(model)},
        "data": {"train": subset(tmp, "train", 48), "eval": subset(tmp, "eval", 10),
                 "max_length": 512, "weighting": "turn"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"method": "lora", "output_dir": str(out), "max_steps": 8, "micro_batch_tokens": 512,
                  "lr": 5e-3, "warmup_steps": 2, "eval_every": 4, "save_every": 2, "keep_last": 2,
                  "autocast": "fp32", "seed": 3, **train_over},
    }
    p = tmp / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def losses(out: Path) -> dict[int, float]:
    """Last logged train loss per step (a resumed run appends to the same metrics file)."""
    got = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            got[r["step"]] = r["loss"]
    return got


@pytest.fixture(scope="module")
def reference(tiny_glm_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = load_config(write_cfg(tmp, tiny_glm_path, tmp / "ref"))
    res = train(cfg)
    return res, losses(tmp / "ref")


@pytest.mark.slow
def test_a_run_trains_saves_and_lowers_eval_loss(reference):
    res, got = reference
    assert sorted(got) == list(range(1, 9))
    assert res.eval_after.loss < res.eval_before.loss
    assert set(res.eval_after.per_turn) >= {"1", "2"} and "tool_call" in res.eval_after.per_kind
    final = res.final_dir
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert (res.output_dir / "loss.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (res.output_dir / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000006", "step-000008"]  # keep_last=2
    # the adapter loads with PEFT on its base model and changes its output
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(json.loads((final / "turntune.json").read_text())["base_model"])
    ids = torch.tensor([[151331, 151333, 151336, 100, 200]])
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(final))
    assert not torch.allclose(tuned(input_ids=ids).logits, before)


@pytest.mark.slow
def test_output_dir_with_checkpoints_needs_resume(reference, tiny_glm_path, tmp_path):
    res, _ = reference
    cfg = load_config(write_cfg(tmp_path, tiny_glm_path, res.output_dir))
    from turntune.errors import ConfigError

    with pytest.raises(ConfigError, match="already holds checkpoints; pass --resume"):
        train(cfg)


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "turntune", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [3, 5])
def test_sigkill_then_resume_logs_the_same_losses(reference, tiny_glm_path, tmp_path, kill_after):
    """Kill -9 once `kill_after` steps are logged (a checkpoint may be half written), resume."""
    _, ref = reference
    out = tmp_path / f"killed{kill_after}"
    cfg = write_cfg(tmp_path, tiny_glm_path, out)
    proc = _run_cli(["train", str(cfg)])
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        m = out / "metrics.jsonl"
        if m.is_file() and sum('"train"' in x for x in m.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _run_cli(["train", str(cfg), "--resume"])
    log = done.communicate(timeout=600)[0]
    assert done.returncode == 0, log
    assert "resumed from step" in log
    got = losses(out)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, log)


@pytest.mark.slow
def test_chat_with_the_trained_adapter(reference):
    """What `make demo` ends with: load the run's final folder (adapter + its base) and talk."""
    from turntune.chat import chat_loop, load_for_chat
    from turntune.encoding import resolve_template

    res, _ = reference
    model, tok = load_for_chat(res.final_dir)
    template = resolve_template(tok, "auto")
    assert template.name == "glm4"
    lines: list[str] = []
    msgs = chat_loop(model, template, system="Be brief.", inputs=["Hi", "What is 2 + 2?"], echo=lines.append)
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert lines[0] == "you> Hi" and lines[1].startswith("assistant> ")
    assert all(isinstance(m.content, str) for m in msgs)


def test_demo_run_again_keeps_the_earlier_run(tmp_path, monkeypatch, capsys):
    """`make demo` twice: the second run writes beside the first (``OUT-2``, then ``OUT-3``),
    never over it and never stopping on "already holds checkpoints"."""
    import turntune.training as train_mod
    from turntune.cli import main

    out = tmp_path / "demo"
    for name in ("demo", "demo-2"):  # two earlier complete runs
        folder = tmp_path / name / "checkpoints" / "step-000001"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
        (tmp_path / name / "checkpoints" / "latest").write_text("step-000001")
    seen = []

    class Stop(Exception):
        pass

    def fake_train(cfg, resume=False):  # noqa: ANN001
        seen.append((cfg.train.output_dir, resume))
        raise Stop

    monkeypatch.setattr(train_mod, "train", fake_train)
    with pytest.raises(Stop):
        main(["demo", "--config", str(ROOT / "examples/smollm2-lora.yaml"), f"--train.output_dir={out}"])
    assert seen == [(f"{out}-3", False)]
    assert capsys.readouterr().out.startswith(f"{out} holds an earlier run (kept); this one writes to {out}-3\n")
