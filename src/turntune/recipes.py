"""What a run encodes, built in one place from its config: the tokenizer, the template and the
encoding options.

``train`` builds its encoding here, and so does every command that shows or scores what a run
trains (``encode``, ``inspect``, ``audit``, ``eval``): given the same config they cannot disagree
about the template, the chat template, the strategy, the weighting or the window settings.

The tokenizer may come from a model folder, a tokenizer-only folder, or a run's LoRA result
(``final/``: adapter and tokenizer, no ``config.json``). A result folder's tokenizer carries the
chat template the run trained with (``train`` saves it there), so it is read from the folder
itself rather than from the base model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turntune.config import Config
from turntune.encoding import EncodeOptions, resolve_template
from turntune.errors import ConfigError
from turntune.templates.base import Template

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


@dataclass(frozen=True)
class Recipe:
    """A config's encoding: ``recipe(load_config("run.yaml")).options`` is what ``train`` uses."""

    config: Config
    tokenizer: Any
    template: Template
    tokenizer_dir: Path

    @property
    def options(self) -> EncodeOptions:
        """The training split's options (``data.*``)."""
        d = self.config.data
        return EncodeOptions(d.strategy, d.weighting, d.max_length, d.cut_long_replies, d.history_fraction)

    @property
    def eval_options(self) -> EncodeOptions:
        """Held-out data: every reply, token-weighted (a loss per token that runs can compare),
        with the run's window settings."""
        d = self.config.data
        return EncodeOptions("all", "token", d.max_length, d.cut_long_replies, d.history_fraction)

    def describe(self, options: EncodeOptions | None = None) -> str:
        """One line naming every setting that changes what is encoded."""
        o = options or self.options
        d = self.config.data
        if self.template.name != "hf":
            source = " (native)"
        elif d.chat_template:
            source = f" (chat_template {d.chat_template})"
        else:
            source = f" (chat_template of {self.tokenizer_dir})"
        kwargs = getattr(self.template, "template_kwargs", None)
        if kwargs:
            source += f", template_kwargs {kwargs}"
        return (f"template {self.template.name}{source}, strategy {o.strategy}, weighting {o.weighting}, "
                f"max_length {o.max_length}, history_fraction {o.history_fraction:g}, "
                f"cut_long_replies {str(o.cut_long_replies).lower()}")


def recipe(cfg: Config, tokenizer_from: str | Path | None = None) -> Recipe:
    """The tokenizer and template of ``cfg`` (its ``model.path``, or ``tokenizer_from``: another
    model, a tokenizer folder or a run's result folder), with ``data.chat_template`` applied.

    >>> r = recipe(load_config("examples/glm4-tiny.yaml"))  # doctest: +SKIP
    >>> r.template.name, r.options.weighting
    ('glm4', 'turn')
    """
    from turntune.models import load_tokenizer

    folder = tokenizer_folder(tokenizer_from if tokenizer_from is not None else cfg.model.path)
    tokenizer = load_tokenizer(folder, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.data.chat_template:
        try:
            text = Path(cfg.data.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise ConfigError(f"data.chat_template: cannot read {cfg.data.chat_template}: {why}") from None
        tokenizer.chat_template = text  # saved with a run's result, so `chat` and `eval` use it too
        return Recipe(cfg, tokenizer, run_template(cfg, tokenizer), folder)
    saved = saved_template(folder) if cfg.data.template == "auto" else None
    if saved is not None:  # a run's result: the template it trained with, not what `auto` makes of its tokenizer
        return Recipe(cfg, tokenizer, template_from_record(tokenizer, saved, cfg.data.template_kwargs), folder)
    return Recipe(cfg, tokenizer, run_template(cfg, tokenizer), folder)


def run_template(cfg: Config, tokenizer) -> Template:
    """The template a run of ``cfg`` trains with, given its recipe's tokenizer (whose
    ``chat_template`` :func:`recipe` has set to ``data.chat_template``'s text, when given)."""
    chat_template = tokenizer.chat_template if cfg.data.chat_template else None
    return resolve_template(tokenizer, cfg.data.template, chat_template, cfg.data.template_kwargs)


# -- the template a run's result was trained with (its turntune.json) ------------------------------
RUN_META = "turntune.json"


def template_record(template: Template) -> dict:
    """What a run's result stores of its template, resolved: ``auto`` would be decided again from
    the saved tokenizer alone, and a GLM-4 tokenizer trained with a ``data.chat_template`` would
    then get the native format."""
    return {"template": template.name, "chat_template": getattr(template, "source", None),
            "template_kwargs": dict(getattr(template, "template_kwargs", None) or {})}


def saved_template(folder: str | Path) -> dict | None:
    """The :func:`template_record` in ``folder``'s turntune.json; None where there is none (not a
    run's result, or one saved before templates were stored resolved: its ``template`` is ``auto``)."""
    meta = Path(folder) / RUN_META
    if not meta.is_file():
        return None
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{meta}: cannot read the run's record ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict) or record.get("template") not in ("glm4", "hf"):
        return None
    if record["template"] == "hf" and not isinstance(record.get("chat_template"), str):
        raise ConfigError(f"{meta}: template hf without its chat_template text; give --template or --config")
    return record


def template_from_record(tokenizer, record: dict, template_kwargs: dict | None = None) -> Template:
    """The template :func:`template_record` describes; ``template_kwargs`` replace the saved ones when given."""
    chat_template = record.get("chat_template") if record["template"] == "hf" else None
    kwargs = template_kwargs or record.get("template_kwargs") or {}
    return resolve_template(tokenizer, record["template"], chat_template, kwargs)


def tokenizer_folder(path: str | Path) -> Path:
    """The folder to load a tokenizer from: a folder with tokenizer files as it is (a model, a
    tokenizer alone, a run's ``final/``), an adapter folder without them its base model's, and
    anything else (``builtin:``, a model id) what ``models.resolve_path`` makes of it."""
    from turntune.models import resolve_path

    text = str(path)
    if not text.startswith("builtin:"):
        try:
            p = Path(text).expanduser()
        except RuntimeError:  # an unknown ~user: resolve_path names the setting
            return resolve_path(text)
        if has_tokenizer(p):
            return p
        base = adapter_base(p)
        if base is not None:
            return tokenizer_folder(base)
    return resolve_path(text)


def has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def adapter_base(folder: Path) -> str | None:
    """The base model a LoRA adapter folder names (``turntune.json`` of a run's result, else
    PEFT's ``adapter_config.json``), or None when ``folder`` is no adapter."""
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    meta = folder / RUN_META
    try:
        if meta.is_file():
            return str(json.loads(meta.read_text(encoding="utf-8"))["base_model"])
        return str(json.loads(config.read_text(encoding="utf-8"))["base_model_name_or_path"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.path: {folder} is an adapter folder whose base model cannot be read "
                          f"({type(e).__name__}: {e}); give the base model with --adapter") from None
