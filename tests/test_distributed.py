"""Two CPU processes under torchrun (gloo) log the same losses as one process with the same
global batch: rank r's micro-batch of step s is micro-batch (2s + r) of the single run's
2-step accumulation window, and the loss is normalised over both ranks' trained tokens.

Tolerance: 1e-5 relative (float32; the two runs add the same token losses in another order).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp: Path, model: Path, out: Path, accum: int) -> Path:
    lines = (ROOT / "examples/data/train.jsonl").read_text().splitlines()[:40]
    data = tmp / "train40.jsonl"
    data.write_text("\n".join(lines) + "\n")
    ev = tmp / "eval8.jsonl"
    ev.write_text("\n".join((ROOT / "examples/data/eval.jsonl").read_text().splitlines()[:8]) + "\n")
    cfg = {"model": {"path": str(model)},
           "data": {"train": str(data), "eval": str(ev), "max_length": 512, "weighting": "turn"},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0},  # dropout would draw different numbers per rank
           "train": {"output_dir": str(out), "max_steps": 4, "micro_batch_tokens": 512, "grad_accum": accum,
                     "lr": 5e-3, "warmup_steps": 1, "eval_every": 0, "autocast": "fp32", "seed": 1}}
    p = tmp / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _metrics(out: Path) -> tuple[list[float], float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in recs if r["kind"] == "train"]
    evals = [r["loss"] for r in recs if r["kind"] == "eval"]
    return train, evals[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tiny_glm_path, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "turntune", "train", str(_cfg(tmp_path, tiny_glm_path, tmp_path / "one", 2))],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={_free_port()}", "--master_addr=127.0.0.1",
                            "-m", "turntune", "train", str(_cfg(tmp_path, tiny_glm_path, tmp_path / "two", 1))],
                           env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stdout + multi.stderr
    assert "2 rank(s)" in multi.stdout
    one, eval_one = _metrics(tmp_path / "one")
    two, eval_two = _metrics(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-5)
    assert eval_two == pytest.approx(eval_one, rel=1e-5)
