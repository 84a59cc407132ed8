"""What a warm cache costs `turntune train` before its first step, for two data sizes side by side.

    .venv/bin/python bench/bench_first_step.py SMALL.yaml LARGE.yaml [...]

Each config is run as ``python -m turntune train CONFIG`` in a fresh process (its cache already
written: ``turntune encode`` or an earlier run; ``train.output_dir`` replaced by a temporary folder). This script reads the process's output as it comes
and samples its resident memory (``/proc/PID/status`` VmRSS, every 0.1 s), and prints per config:

- ``ready_s``: seconds from the start of the process to the line ``training: ...`` (model loaded,
  data mapped from the cache, the epoch's micro-batch plan made: the first step starts next);
- ``step1_s``: seconds to the ``step 1/`` line (the first optimizer step done);
- ``rss_ready_mb``: resident memory when ``training:`` is printed (model + data + plan, no
  activations yet), and ``rss_model_mb``: when the ``model:`` line is printed (the model loaded,
  the data already mapped and reported);
- ``peak_rss_mb``: the most resident memory seen until the process ends.

The line after the table is the growth of ``rss_ready_mb`` from the first config to each other
one: what more data costs a run beyond the model (issue 13: <= 200 MB from 10,000 to 1 M
conversations). Use configs that differ only in ``data.train`` (and output folder).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import tempfile
import time
from pathlib import Path

import yaml


def _rss_mb(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def run(config: str, tmp: Path) -> dict:
    """One ``turntune train`` of ``config``, its output folder replaced by a fresh one under ``tmp``."""
    cfg = yaml.safe_load(Path(config).read_text())
    cfg.setdefault("train", {})["output_dir"] = str(tmp / f"run{len(list(tmp.iterdir()))}")
    path = tmp / f"{Path(config).stem}-{len(list(tmp.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "turntune", "train", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb(proc.pid))
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    out: dict = {"config": config}
    tail: list[str] = []
    for line in proc.stdout:  # type: ignore[union-attr]
        tail = (tail + [line.rstrip()])[-5:]
        now = time.time() - t0
        if line.startswith("model:") and "rss_model_mb" not in out:
            out["rss_model_mb"] = round(_rss_mb(proc.pid))
        elif line.startswith("training:") and "ready_s" not in out:
            out["ready_s"], out["rss_ready_mb"] = round(now, 1), round(_rss_mb(proc.pid))
        elif line.startswith("step 1/") and "step1_s" not in out:
            out["step1_s"] = round(now, 1)
        elif line.startswith("rank ") and "data read" not in out:
            out["data read"] = line.split(": ", 1)[1].strip()
    rc = proc.wait()
    stop.set()
    out["peak_rss_mb"] = round(peak[0])
    if rc != 0:
        raise SystemExit(f"{config}: exit {rc}\n" + "\n".join(tail))
    return out


def main() -> None:
    configs = sys.argv[1:]
    if len(configs) < 2:
        raise SystemExit(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(c, Path(tmp)) for c in configs]
    for r in results:
        print(json.dumps(r))
    for r in results[1:]:
        print(f"resident at the first step, {results[0]['config']} -> {r['config']}: "
              f"{r['rss_ready_mb'] - results[0]['rss_ready_mb']:+.0f} MB; ready in {results[0]['ready_s']} s -> {r['ready_s']} s")


if __name__ == "__main__":
    main()
