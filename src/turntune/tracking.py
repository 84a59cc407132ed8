"""Experiment tracking: every record the run writes to metrics.jsonl also goes to the trackers named
in ``train.report_to`` -- TensorBoard, Weights & Biases, MLflow -- as flat scalars
(``train/loss``, ``train/lr``, ``eval/loss``, ``eval/per_turn/0/loss`` ...) at the record's step.

TensorBoard needs no package to write: :class:`EventFile` writes its event-file format itself
(a TFRecord of ``Event`` protocol buffers), next to metrics.jsonl, so ``tensorboard --logdir runs``
shows every run. wandb and mlflow are used only when installed (``pip install wandb`` /
``pip install mlflow``); naming one that is not is a ConfigError before anything is trained.
"""
from __future__ import annotations

import importlib
import math
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal, Protocol

from turntune.errors import ConfigError

TrackerName = Literal["tensorboard", "wandb", "mlflow"]


def run_name(out: Path) -> str:
    """A run is named by its output folder (``runs/smollm2-lora`` -> ``smollm2-lora``)."""
    return Path(out).resolve().name


def scalars(rec: Mapping[str, object], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numbers of a record, nested keys joined by ``/``; ``kind`` and ``step`` say where they go.

    >>> dict(scalars({"kind": "eval", "step": 3, "loss": 1.5, "per_turn": {0: {"loss": 2.0}}}, "eval/"))
    {'eval/loss': 1.5, 'eval/per_turn/0/loss': 2.0}
    """
    return _numbers({k: v for k, v in rec.items() if k not in ("kind", "step")}, prefix)


def _numbers(tree: Mapping, prefix: str) -> Iterator[tuple[str, float]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield f"{prefix}{key}", float(value)


# -- TensorBoard's event file, written directly ---------------------------------------------------
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing. ``crc32c(b"123456789") == 0xE3069283``."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2): strings and nested messages."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(wall_time: float, step: int, *, file_version: str | None = None,
                values: Mapping[str, float] | None = None) -> bytes:
    """One serialized ``tensorflow.Event``: wall_time (1, double), step (2, int64), then either
    file_version (3, string) or a summary (5) of ``Summary.Value``s with tag (1) and simple_value (2, float)."""
    msg = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        msg += _field(3, file_version.encode())
    if values:
        summary = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", v))
                           for tag, v in values.items())
        msg += _field(5, summary)
    return msg


class EventFile:
    """A TensorBoard event file (``events.out.tfevents.*``), flushed after every record so a
    crashed run keeps what it logged."""

    def __init__(self, folder: Path) -> None:
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.turntune"
        self.path = Path(folder) / name
        self._f = open(self.path, "ab")
        self._write(event_bytes(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        length = struct.pack("<Q", len(event))
        self._f.write(length + struct.pack("<I", _masked_crc(length)) + event + struct.pack("<I", _masked_crc(event)))
        self._f.flush()

    def log(self, step: int, values: dict[str, float]) -> None:
        self._write(event_bytes(time.time(), step, values=values))

    def close(self) -> None:
        self._f.close()


# -- optional packages --------------------------------------------------------------------------------
def _require(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"train.report_to: {name} is not installed; pip install {name} "
                          f"(or remove {name} from train.report_to)") from None


def flat_params(config: Mapping[str, object], prefix: str = "") -> Iterator[tuple[str, str]]:
    """A nested config as flat ``section.key`` parameters (MLflow takes no nesting)."""
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from flat_params(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", str(value)


class Wandb:
    def __init__(self, wandb, name: str, out: Path, config: dict) -> None:
        self.run = wandb.init(name=name, dir=str(out), config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    def __init__(self, mlflow, name: str, config: dict) -> None:
        self.mlflow = mlflow
        mlflow.start_run(run_name=name)
        mlflow.log_params(dict(flat_params(config)))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class Sink(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class Tracker:
    """What the training loop calls beside metrics.jsonl: ``log(record)`` and, at the end, ``close()``."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, rec: Mapping[str, object]) -> None:
        values = dict(scalars(rec, f"{rec.get('kind', 'train')}/"))
        step = int(rec.get("step", 0))
        for sink in self.sinks:
            sink.log(step, values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_tracker(report_to: tuple[TrackerName, ...], out: Path, config: dict) -> Tracker:
    """The trackers of ``train.report_to`` for the run writing to ``out`` (call on rank 0 only).

    >>> open_tracker(("tensorboard",), Path("runs/x"), cfg.to_dict()).log({"kind": "train", "step": 1, "loss": 2.0})  # doctest: +SKIP
    """
    wanted = list(dict.fromkeys(report_to))  # each once, in the order given
    modules = {w: _require(w) for w in wanted if w != "tensorboard"}  # all checked before any is started
    name, sinks = run_name(out), []
    for which in wanted:
        if which == "tensorboard":
            sinks.append(EventFile(out))
        elif which == "wandb":
            sinks.append(Wandb(modules["wandb"], name, out, config))
        else:
            sinks.append(Mlflow(modules["mlflow"], name, config))
    return Tracker(sinks)
