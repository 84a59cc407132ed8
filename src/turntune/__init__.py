"""turntune: fine-tune chat models on multi-turn dialogues with an exact assistant-only loss.

Every public name is importable from here, and each loads its module on first use, so
``import turntune`` imports no torch (the README's "Python API" section shows them in use):

    >>> import turntune
    >>> turntune.EncodeOptions(weighting="turn").strategy
    'all'
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"  # pyproject.toml reads it from here

# Public name -> "module:attribute". The one table to change when a module moves or is renamed.
_EXPORTS: dict[str, str] = {
    # conversation -> validated Conversation
    "load_conversations": "turntune.data:load_conversations",
    "parse_record": "turntune.data:parse_record",
    "DataReport": "turntune.data:DataReport",
    "Conversation": "turntune.conversation:Conversation",
    "Message": "turntune.conversation:Message",
    "ToolCall": "turntune.conversation:ToolCall",
    # templates and encoding
    "Template": "turntune.templates.base:Template",
    "GLM4Template": "turntune.templates.glm4:GLM4Template",
    "HFTemplate": "turntune.templates.hf:HFTemplate",
    "resolve_template": "turntune.encoding:resolve_template",
    "encode": "turntune.encoding:encode",
    "encode_batch": "turntune.encoding:encode_batch",
    "encode_conversations": "turntune.encoding:encode_conversations",
    "EncodeOptions": "turntune.encoding:EncodeOptions",
    "EncodeReport": "turntune.encoding:EncodeReport",
    "loss_shares": "turntune.encoding:loss_shares",
    "Example": "turntune.example:Example",
    "IGNORE_INDEX": "turntune.constants:IGNORE_INDEX",
    # a run's config and what it encodes
    "load_config": "turntune.config:load_config",
    "Config": "turntune.config:Config",
    "Recipe": "turntune.recipes:Recipe",
    "recipe": "turntune.recipes:recipe",
    "load_tokenizer": "turntune.models:load_tokenizer",
    "load_model": "turntune.models:load_model",
    # batches and the loss
    "Batch": "turntune.collate:Batch",
    "pack_batch": "turntune.collate:pack_batch",
    "pad_batch": "turntune.collate:pad_batch",
    "LossSum": "turntune.loss:LossSum",
    "batch_loss": "turntune.loss:batch_loss",
    "per_token_losses": "turntune.loss:per_token_losses",
    "step_loss": "turntune.loss:step_loss",
    # training and evaluation
    "train": "turntune.training:train",
    "TrainResult": "turntune.training:TrainResult",
    "evaluate": "turntune.evaluation:evaluate",
    "EvalResult": "turntune.evaluation:EvalResult",
    # errors
    "TurntuneError": "turntune.errors:TurntuneError",
    "DataError": "turntune.errors:DataError",
    "ConfigError": "turntune.errors:ConfigError",
    "TemplateError": "turntune.errors:TemplateError",
}

__all__ = ["__version__"] + list(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'turntune' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module_name), attr)
    # Kept for the next lookup. No public name is also a submodule's name (the modules are
    # encoding, training, evaluation, auditing), so ``turntune.encode`` is always the function.
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
