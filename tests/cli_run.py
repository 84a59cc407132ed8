"""Helpers for tests that run the command line in-process (shared by the CLI test files)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

from turntune.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> tuple[int, str, str]:
    """``turntune ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def subset(tmp: Path, name: str, n: int) -> Path:
    """The first ``n`` records of examples/data/NAME.jsonl, written under ``tmp``."""
    p = tmp / f"{name}-{n}.jsonl"
    p.write_text("\n".join((ROOT / "examples/data" / f"{name}.jsonl").read_text().splitlines()[:n]) + "\n")
    return p
