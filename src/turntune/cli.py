"""The command line. The only place that turns exceptions into exit codes.

    turntune validate DATA                   check records, report by rule (exit 1 if invalid, 2 if unreadable or empty)
    turntune encode DATA --model PATH        what encoding does to the data, and where the weighting puts the loss
                                             (cached for train; --output DIR writes it where you say)
    turntune train CONFIG [--s.k=v ...]      fine-tune (also under torchrun: python -m turntune train)
    turntune eval MODEL DATA [--compare B]   loss per turn and kind of reply
    turntune inspect / audit DATA            which tokens are trained
    turntune chat MODEL                      talk to a model
    turntune merge BASE ADAPTER OUT          fold a LoRA adapter into a standalone model
    turntune demo                            what `make demo` runs: examples/smollm2-lora.yaml, then a chat

validate, encode, inspect, audit and eval take --config CONFIG (and its --section.key=value overrides): they
then encode exactly as `turntune train CONFIG` does; their own flags override it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import warnings
from pathlib import Path

from typing import TYPE_CHECKING

from turntune.errors import TurntuneError

if TYPE_CHECKING:
    from turntune.config import Config

EXIT_INVALID, EXIT_ERROR = 1, 2


def _validate(a) -> int:
    """Every record checked (and counted by rule, never stopping at the first); with ``--model``
    or ``--config`` also what the run's template refuses, encoded as ``train`` would."""
    from turntune.data import load_conversations

    cfg = config_from_args(a)
    res = load_conversations(data_path(a, cfg, "train"), format=cfg.data.format, on_invalid="skip")
    print(res.report.summary())
    refused = 0
    if a.model or a.config:  # what only a template can tell: the records it refuses, drops text of, or cannot span
        from turntune.encoding import EncodeReport, encode_conversations
        from turntune.models import check_model_folder
        from turntune.recipes import recipe

        check_model_folder(cfg.model.path)
        r = recipe(cfg)
        tmpl = r.template
        rep = EncodeReport()
        encode_conversations(res.conversations, tmpl, r.options, report=rep, on_invalid="skip")
        refused = sum(rep.skipped.values())
        print(f"template {tmpl.name}: {rep.conversations} of {len(res.conversations)} valid records encode"
              + "".join(f"\n  refused {rule}: {n}\n" + "\n".join(f"    {t}" for t in rep.skip_examples[rule])
                        for rule, n in sorted(rep.skipped.items())))
    return EXIT_INVALID if res.report.n_skipped or refused else 0


# -- the settings every encoding command shares with `train` ----------------------------------------
# A flag of these commands stands for a config setting (flag -> section, key). The config (--config,
# or the defaults), then its --section.key=value overrides, then these flags: later wins.
FLAG_SETTINGS = {"model": ("model", "path"), "format": ("data", "format"), "on_invalid": ("data", "on_invalid"),
                 "template": ("data", "template"), "chat_template": ("data", "chat_template"),
                 "strategy": ("data", "strategy"), "weighting": ("data", "weighting"),
                 "max_length": ("data", "max_length")}
DEMO_CONFIG = "examples/smollm2-lora.yaml"  # what `make demo` runs: `turntune demo`


def _choices(name: str) -> tuple[str, ...]:
    """A data setting's valid values, read from the config schema (one list for CLI and YAML)."""
    import typing

    from turntune.config import DataConfig

    return typing.get_args(typing.get_type_hints(DataConfig)[name])


def add_encoding_args(s: argparse.ArgumentParser, *, model: bool = True, strategy: bool = True) -> None:
    """``--config`` and the flags that override it, for a command that encodes data as ``train`` does."""
    s.add_argument("--config", metavar="YAML", help="a training config: encode as `train` does with it "
                   "(--section.key=value overrides apply; the flags below override both)")
    if model:
        s.add_argument("--model", help="model folder, tokenizer folder, a run's final/ folder, or builtin:smollm2 / "
                       "builtin:tiny-glm4 (default: model.path)")
    s.add_argument("--format", choices=_choices("format"), help="data.format")
    s.add_argument("--on-invalid", choices=_choices("on_invalid"), help="data.on_invalid")
    s.add_argument("--template", choices=_choices("template"), help="data.template")
    s.add_argument("--chat-template", metavar="FILE", help="a Jinja file to use instead of the tokenizer's "
                   "chat_template (data.chat_template)")
    if strategy:
        s.add_argument("--strategy", choices=_choices("strategy"), help="data.strategy")
        s.add_argument("--weighting", choices=_choices("weighting"), help="data.weighting")
    s.add_argument("--max-length", type=int, help="data.max_length")


def config_from_args(a: argparse.Namespace) -> "Config":
    """The run's config as a command sees it: ``--config`` (or the defaults), its dotted
    overrides, then the command's own flags."""
    import dataclasses

    from turntune.config import load_config

    cfg = load_config(a.config, getattr(a, "overrides", []))
    changes: dict[str, dict] = {}
    for dest, (section, key) in FLAG_SETTINGS.items():
        value = getattr(a, dest, None)
        if value is not None:
            changes.setdefault(section, {})[key] = value
    return dataclasses.replace(cfg, **{sec: dataclasses.replace(getattr(cfg, sec), **kv) for sec, kv in changes.items()})


def data_path(a, cfg, split: str) -> str:
    """The data file given, or with ``--config`` the config's ``data.<split>``."""
    from turntune.errors import ConfigError

    if a.data:
        return a.data
    path = getattr(cfg.data, split) if a.config else None
    if not path:
        raise ConfigError(f"{a.cmd}: give a data file, or --config (its data.{split} is used)"
                          + (f"; data.{split} is not set in {a.config}" if a.config else ""))
    return path


def _encode(a) -> int:
    """Streams the file through the encoded-data cache that ``train`` reads with the same settings
    (or into ``--output``, which ``train`` takes as ``data.train``)."""
    from turntune.dataset import cached_encode, write_encoded
    from turntune.encoding import loss_shares
    from turntune.evaluation import MAX_TURN_BUCKET
    from turntune.models import check_model_folder
    from turntune.recipes import recipe

    cfg = config_from_args(a)
    path = data_path(a, cfg, "train")
    check_model_folder(cfg.model.path)  # a damaged folder is named before the data is read
    r = recipe(cfg)
    d = cfg.data
    if a.output:
        data = write_encoded(path, r.template, r.options, a.output, format=d.format, on_invalid=d.on_invalid,
                             num_proc=a.num_proc or d.num_proc)
    else:
        data = cached_encode(path, r.template, r.options, format=d.format, on_invalid=d.on_invalid,
                             cache_dir=d.cache_dir, num_proc=a.num_proc or d.num_proc).data
    size = sum(f.stat().st_size for f in data.folder.iterdir())
    print(f"encoded data: {data.folder} ({size / 2**20:,.1f} MiB, {size / max(data.n_tokens, 1):.1f} bytes per token)")
    print(data.data_report.summary())
    rep = data.encode_report
    print(r.describe())
    print(rep.summary())
    print(loss_shares(data, r.options.weighting, data.turn_kinds(), MAX_TURN_BUCKET).summary())
    return 0 if rep.examples else EXIT_INVALID


def _train(a) -> int:
    from turntune.config import load_config
    from turntune.training import train

    cfg = load_config(a.config, a.overrides)
    train(cfg, resume=a.resume)
    return 0


def _eval(a) -> int:
    """Score a model (and ``--compare``: a second one) on the held-out replies, encoded once with
    the tuned model's tokenizer and the run's template and settings, at the run's precision.
    The encoded replies come from the cache ``train`` reads (``dataset.cached_encode``): a second
    eval of the same data and settings maps them instead of encoding again."""
    import torch

    from turntune.chat import load_for_chat
    from turntune.dataset import cached_encode
    from turntune.errors import ConfigError, DataError
    from turntune.evaluation import evaluate
    from turntune.models import check_model_folder, load_tokenizer
    from turntune.recipes import has_tokenizer, recipe, tokenizer_folder
    from turntune.training import use_autocast

    cfg = config_from_args(a)
    tuned = a.tuned
    if tuned is None:
        if not a.config:
            raise ConfigError("eval: give MODEL, or --config (its train.output_dir/final is used)")
        tuned = str(Path(cfg.train.output_dir) / "final")
        if not Path(tuned).is_dir():
            raise ConfigError(f"eval: {tuned} does not exist (has the run of {a.config} finished?); give MODEL")
    data = data_path(a, cfg, "eval")
    for path in filter(None, (tuned, a.adapter, a.compare)):  # a damaged folder is named before the data is read
        check_model_folder(path)
    # The tuned model's tokenizer (an adapter folder's own, where it has one: the run saved its template there)
    own = a.adapter is not None and has_tokenizer(Path(a.adapter).expanduser())
    r = recipe(cfg, tokenizer_from=a.adapter if own else tuned)
    exs = cached_encode(data, r.template, r.eval_options, format=cfg.data.format, on_invalid=cfg.data.on_invalid,
                        cache_dir=cfg.data.cache_dir, num_proc=cfg.data.num_proc).data
    print(exs.data_report.summary())
    if not len(exs):
        raise DataError(f"{data}: no example has a trained token; nothing to evaluate")
    print(f"encoding: {r.describe(r.eval_options)}")
    if a.compare:  # both models score the same token ids: only meaningful with the same tokenizer
        other = load_tokenizer(tokenizer_folder(a.compare), trust_remote_code=cfg.model.trust_remote_code)
        if other.get_vocab() != r.tokenizer.get_vocab():
            raise ConfigError(f"eval --compare: {a.compare} has another tokenizer than {tuned} ({len(other)} vs "
                              f"{len(r.tokenizer)} tokens), so the two cannot be scored on the same tokens; "
                              "compare models that share a tokenizer (a tuned model and its base)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as `train` picks it
    amp = use_autocast(cfg, device)
    print(f"precision: {precision_note(cfg.train.autocast, amp, device, cfg.model.dtype)}")
    tuned_name = f"{tuned} + adapter {a.adapter}" if a.adapter else tuned
    runs = [("tuned" if a.compare else "model", tuned_name, tuned, a.adapter)]
    if a.compare:
        runs.append(("base", a.compare, a.compare, None))
    kinds = exs.turn_kinds()  # from the cached flags: (source, reply) -> answer / tool_call
    results = []
    for role, name, path, adapter in runs:
        print(f"{role}: {name}")
        model, _ = load_for_chat(path, adapter, trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype,
                                 attn_implementation=cfg.model.attn_implementation)
        results.append(evaluate(model.to(device), exs, pad_id=r.tokenizer.pad_token_id, max_length=cfg.data.max_length,
                                kinds=kinds, autocast=amp, device=device))
        del model
    roles = tuple(role for role, *_ in runs)
    print(results[0].table(results[1] if len(results) > 1 else None, (roles + ("",))[:2]))
    if a.json:
        out = {role: {"model": name, **res_.to_dict()} for (role, name, *_), res_ in zip(runs, results)}
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


def precision_note(setting: str, amp: bool, device, dtype: str = "float32") -> str:
    """What an evaluation computes in, and why (the run's ``train.autocast`` and ``model.dtype``)."""
    what = "bf16 autocast" if amp else ("fp32" if dtype == "float32" else f"{dtype} weights")
    if setting != "auto":
        return f"{what} (train.autocast={setting})"
    why = "runs bf16 natively" if amp else "has no native bf16"
    return f"{what} (train.autocast=auto: this {device.type} {why})"


def _chat(a) -> int:
    from turntune.chat import chat_loop, chat_template_for, load_for_chat
    from turntune.models import check_model_folder

    check_model_folder(a.model)
    model, tok = load_for_chat(a.model, a.adapter)
    chat_loop(model, chat_template_for(tok, a.template, a.adapter, a.model), system=a.system)
    return 0


def _merge(a) -> int:
    from turntune.models import merge_adapter

    print(f"merged into {merge_adapter(a.base, a.adapter, a.out)}")
    return 0


def _demo(a) -> int:
    """The built-in default run (``make demo``): prints held-out loss before/after and a short chat."""
    from turntune.chat import chat_loop, load_for_chat
    from turntune.checkpoint import latest as latest_checkpoint
    from turntune.config import load_config
    from turntune.errors import ConfigError
    from turntune.recipes import recipe
    from turntune.training import train

    if a.config == DEMO_CONFIG and not Path(DEMO_CONFIG).is_file():
        raise ConfigError(f"demo: {DEMO_CONFIG} not found; run `turntune demo` in the root of a turntune checkout "
                          "(it trains on examples/data), or give --config")
    cfg = load_config(a.config, a.overrides)
    out = Path(cfg.train.output_dir)
    if latest_checkpoint(out) is not None:  # an earlier demo: keep it, and run again beside it
        free = next(f"{out}-{i}" for i in itertools.count(2) if latest_checkpoint(Path(f"{out}-{i}")) is None)
        print(f"{out} holds an earlier run (kept); this one writes to {free}")
        cfg = load_config(a.config, [*a.overrides, f"train.output_dir={free}"])
    res = train(cfg, resume=False)
    if res.eval_before and res.eval_after:
        drop = res.eval_before.loss - res.eval_after.loss
        print(f"\nheld-out loss on assistant tokens: {res.eval_before.loss:.4f} -> {res.eval_after.loss:.4f}"
              f" ({drop / res.eval_before.loss:.1%} lower)")
        print(res.eval_after.table(res.eval_before, ("after", "before")))
    model, _ = load_for_chat(res.final_dir, dtype=cfg.model.dtype)
    print("\na short chat with the tuned model:")
    chat_loop(model, recipe(cfg, tokenizer_from=res.final_dir).template,
              system="You are Tally, a friendly helper for quick questions about numbers, places and cooking.",
              inputs=["How many pounds is 20 kg?", "What is 45 + 38?", "Thanks!"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turntune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("validate", help="check a data file; report invalid records by rule (with --model or "
                       "--config: also the records the template refuses)")
    s.add_argument("data", nargs="?", help="default with --config: data.train")
    add_encoding_args(s, strategy=False)
    s = sub.add_parser("encode", help="encode a data file as `train` does and report what was trained, dropped, "
                       "cut, and where the weighting puts the loss")
    s.add_argument("data", nargs="?", help="default with --config: data.train")
    add_encoding_args(s)
    s.add_argument("--output", help="write the encoded data to this folder (train takes it as data.train); "
                   "default: the cache that train reads (data.cache_dir)")
    s.add_argument("--num-proc", type=int, help="encoding processes (default: data.num_proc, else every core)")
    s = sub.add_parser("train", help="fine-tune; extra --section.key=value arguments override the config")
    s.add_argument("config", help="the run's YAML config (examples/smollm2-lora.yaml is the demo's)")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    s = sub.add_parser("eval", help="loss on assistant tokens per turn and kind of reply, at the run's precision")
    s.add_argument("tuned", nargs="?", metavar="MODEL",
                   help="model folder or a run's final/ folder (default with --config: train.output_dir/final)")
    s.add_argument("data", nargs="?", help="default with --config: data.eval")
    s.add_argument("--adapter", help="a LoRA adapter folder to put on MODEL")
    s.add_argument("--compare", metavar="BASE", help="a second model (the base) scored on the same encoded tokens")
    s.add_argument("--json", help="write the figures, keyed by role (model, or tuned and base)")
    add_encoding_args(s, model=False, strategy=False)
    s = sub.add_parser("chat", help="talk to a model (or a trained run's final folder)")
    s.add_argument("model")
    s.add_argument("--adapter")
    s.add_argument("--system")
    s.add_argument("--template", default="auto", choices=_choices("template"))
    s = sub.add_parser("merge", help="fold a LoRA adapter into its base model")
    s.add_argument("base")
    s.add_argument("adapter")
    s.add_argument("out")
    s = sub.add_parser("demo", help="the built-in default run (what `make demo` runs: LoRA on SmolLM2-135M-Instruct, "
                       "example data)")
    s.add_argument("--config", default=DEMO_CONFIG, help=f"default: {DEMO_CONFIG}")
    from turntune import inspect_cmd  # an import error here is a bug to see, not a missing command

    inspect_cmd.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    parallel = sys.modules.get("turntune.parallel")  # loaded by train/eval; under torchrun, leave cleanly
    return parallel.leave_distributed(code) if parallel else code


def _main(argv: list[str] | None) -> int:
    # HF_HUB_OFFLINE is the user's: a Hub repo id as model.path is downloaded when online and read
    # from the cache when offline (models.hub_snapshot); a local folder never touches the network.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress display: ours
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside PEFT
    args, extra = build_parser().parse_known_args(argv)
    overrides = [e for e in extra if e.startswith("--") and "." in e.split("=")[0]]
    unknown = [e for e in extra if e not in overrides]
    if unknown or (overrides and args.cmd not in ("train", "demo", "validate", "encode", "eval", "inspect", "audit")):
        print(f"turntune: error: unrecognized arguments: {' '.join(unknown or overrides)}", file=sys.stderr)
        return EXIT_ERROR
    args.overrides = overrides
    try:
        handler = {"validate": _validate, "encode": _encode, "train": _train, "eval": _eval, "chat": _chat,
                   "merge": _merge, "demo": _demo}.get(args.cmd)
        if handler is None:
            return args.run(args)
        return handler(args)
    except TurntuneError as e:
        print(f"turntune: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("turntune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
