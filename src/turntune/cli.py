"""The command line. The only place that turns exceptions into exit codes.

    turntune validate DATA                 check records, report by rule (exit 1 if invalid, 2 if unreadable or empty)
    turntune encode DATA --model PATH      what encoding does to the data (and cache it; --output DIR)
    turntune train CONFIG [--s.k=v ...]    fine-tune (also under torchrun: python -m turntune train)
    turntune eval MODEL DATA               loss per turn and kind of reply
    turntune inspect / audit DATA          which tokens are trained
    turntune chat MODEL                    talk to a model
    turntune merge BASE ADAPTER OUT        fold a LoRA adapter into a standalone model
    turntune demo                          the built-in default: LoRA on SmolLM2 + the example data
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import warnings
from pathlib import Path

from turntune.errors import TurntuneError

EXIT_INVALID, EXIT_ERROR = 1, 2


def _validate(a) -> int:
    from turntune.data import load_conversations

    res = load_conversations(a.data, format=a.format, on_invalid="skip")
    print(res.report.summary())
    refused = 0
    if a.model:  # what only a template can tell: the records it refuses, drops text of, or cannot span
        from turntune.encode import EncodeOptions, EncodeReport, encode_conversations, resolve_template
        from turntune.models import load_tokenizer

        tok = load_tokenizer(a.model)
        chat_template = Path(a.chat_template).read_text(encoding="utf-8") if a.chat_template else None
        tmpl = resolve_template(tok, a.template, chat_template)
        rep = EncodeReport()
        encode_conversations(res.conversations, tmpl, EncodeOptions(), report=rep, on_invalid="skip")
        refused = sum(rep.skipped.values())
        print(f"template {tmpl.name}: {rep.conversations} of {len(res.conversations)} valid records encode"
              + "".join(f"\n  refused {rule}: {n}\n" + "\n".join(f"    {t}" for t in rep.skip_examples[rule])
                        for rule, n in sorted(rep.skipped.items())))
    return EXIT_INVALID if res.report.n_skipped or refused else 0


def _encoder(a):
    from turntune.encode import EncodeOptions, resolve_template
    from turntune.models import load_tokenizer

    tok = load_tokenizer(a.model)
    chat_template = Path(a.chat_template).read_text(encoding="utf-8") if getattr(a, "chat_template", None) else None
    tmpl = resolve_template(tok, a.template, chat_template)
    return tok, tmpl, EncodeOptions(a.strategy, a.weighting, a.max_length)


def _encode(a) -> int:
    """Streams the file through the encoded-data cache (or into ``--output``): what ``train``
    with the same settings reads without encoding again."""
    from turntune.dataset import cached_encode, write_encoded
    from turntune.models import check_model_folder

    check_model_folder(a.model)  # a damaged folder is named before the data is read
    _, tmpl, opts = _encoder(a)
    if a.output:
        data = write_encoded(a.data, tmpl, opts, a.output, format=a.format, on_invalid=a.on_invalid,
                             num_proc=a.num_proc)
    else:
        data = cached_encode(a.data, tmpl, opts, format=a.format, on_invalid=a.on_invalid, num_proc=a.num_proc).data
    size = sum(f.stat().st_size for f in data.folder.iterdir())
    print(f"encoded data: {data.folder} ({size / 2**20:,.1f} MiB, {size / max(data.n_tokens, 1):.1f} bytes per token)")
    print(data.data_report.summary())
    print(f"template {tmpl.name}, strategy {opts.strategy}, weighting {opts.weighting}, max_length {opts.max_length}")
    rep = data.encode_report
    print(rep.summary())
    return 0 if rep.examples else EXIT_INVALID


def _train(a, overrides: list[str]) -> int:
    from turntune.config import load_config
    from turntune.train import train

    cfg = load_config(a.config, overrides)
    train(cfg, resume=a.resume)
    return 0


def _eval(a) -> int:
    from turntune.chat import load_for_chat
    from turntune.data import load_conversations
    from turntune.encode import EncodeOptions, encode_conversations, resolve_template
    from turntune.evaluate import evaluate, turn_kinds
    from turntune.models import check_model_folder

    for path in filter(None, (a.model, a.compare)):  # a damaged folder is named before the data is read
        check_model_folder(path)
    res = load_conversations(a.data, format=a.format, on_invalid=a.on_invalid)
    results = []
    for path, adapter in [(a.model, a.adapter)] + ([(a.compare, None)] if a.compare else []):
        model, tok = load_for_chat(path, adapter)
        tmpl = resolve_template(tok, a.template)
        exs = encode_conversations(res.conversations, tmpl, EncodeOptions("all", "token", a.max_length),
                                   on_invalid=a.on_invalid)
        results.append(evaluate(model, exs, pad_id=tok.pad_token_id, max_length=a.max_length,
                                kinds=turn_kinds(res.conversations)))
    names = _model_names(a.model, a.compare) if a.compare else (Path(a.model).name or a.model, "")
    print(results[0].table(results[1] if len(results) > 1 else None, names))
    if a.json:
        Path(a.json).write_text(json.dumps({n: r.to_dict() for n, r in zip(names, results)}, indent=2))
    return 0


def _model_names(a: str, b: str) -> tuple[str, str]:
    """Short distinct names for two models: the last path parts that tell them apart (a base and
    its tuned copy often share a folder name, and ``--json`` keys them by name)."""
    pa, pb = Path(a).parts, Path(b).parts
    for d in range(1, max(len(pa), len(pb)) + 1):
        na, nb = "/".join(pa[-d:]), "/".join(pb[-d:])
        if na != nb:
            return na, nb
    return a, f"{b} (2)"


def _chat(a) -> int:
    from turntune.chat import chat_loop, load_for_chat
    from turntune.encode import resolve_template
    from turntune.models import check_model_folder

    check_model_folder(a.model)
    model, tok = load_for_chat(a.model, a.adapter)
    chat_loop(model, resolve_template(tok, a.template), system=a.system)
    return 0


def _merge(a) -> int:
    from turntune.models import merge_adapter

    print(f"merged into {merge_adapter(a.base, a.adapter, a.out)}")
    return 0


def _demo(a) -> int:
    """The built-in default run: prints held-out loss before/after and a short chat."""
    from turntune.chat import chat_loop, load_for_chat
    from turntune.checkpoint import latest as latest_checkpoint
    from turntune.config import load_config
    from turntune.encode import resolve_template
    from turntune.train import train

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
    model, tok = load_for_chat(res.final_dir)
    print("\na short chat with the tuned model:")
    chat_loop(model, resolve_template(tok, cfg.data.template), system="You are Tally, a friendly helper for quick questions about numbers, places and cooking.",
              inputs=["How many pounds is 20 kg?", "What is 45 + 38?", "Thanks!"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turntune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def data_args(s):
        s.add_argument("--format", default="auto", choices=["auto", "openai", "glm4", "sharegpt"])
        s.add_argument("--on-invalid", default="error", choices=["error", "skip"])

    def enc_args(s):
        s.add_argument("--template", default="auto", choices=["auto", "glm4", "hf"])
        s.add_argument("--strategy", default="all", choices=["all", "expand", "last", "full"])
        s.add_argument("--weighting", default="token", choices=["token", "turn", "sample"])
        s.add_argument("--max-length", type=int, default=2048)

    s = sub.add_parser("validate", help="check a data file; report invalid records by rule")
    s.add_argument("data")
    s.add_argument("--format", default="auto", choices=["auto", "openai", "glm4", "sharegpt"])
    s.add_argument("--model", help="also check what this model's template can encode (refused records, by rule)")
    s.add_argument("--template", default="auto", choices=["auto", "glm4", "hf"])
    s.add_argument("--chat-template", help="a Jinja file to use instead of the tokenizer's chat_template")
    s = sub.add_parser("encode", help="encode a data file and report what was trained, dropped, cut")
    s.add_argument("data")
    s.add_argument("--model", default="builtin:smollm2")
    data_args(s)
    enc_args(s)
    s.add_argument("--chat-template", help="a Jinja file to use instead of the tokenizer's chat_template")
    s.add_argument("--output", help="write the encoded data to this folder (train takes it as data.train); "
                   "default: the cache that train reads")
    s.add_argument("--num-proc", type=int, default=None, help="encoding processes (default: every core)")
    s = sub.add_parser("train", help="fine-tune; extra --section.key=value arguments override the config")
    s.add_argument("config", nargs="?")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    s = sub.add_parser("eval", help="loss on assistant tokens per turn and kind of reply")
    s.add_argument("model")
    s.add_argument("data")
    s.add_argument("--adapter")
    s.add_argument("--compare", help="a second model to put side by side")
    s.add_argument("--json")
    s.add_argument("--template", default="auto", choices=["auto", "glm4", "hf"])
    s.add_argument("--max-length", type=int, default=2048)
    data_args(s)
    s = sub.add_parser("chat", help="talk to a model (or a trained run's final folder)")
    s.add_argument("model")
    s.add_argument("--adapter")
    s.add_argument("--system")
    s.add_argument("--template", default="auto", choices=["auto", "glm4", "hf"])
    s = sub.add_parser("merge", help="fold a LoRA adapter into its base model")
    s.add_argument("base")
    s.add_argument("adapter")
    s.add_argument("out")
    s = sub.add_parser("demo", help="the built-in default run (LoRA on SmolLM2-135M-Instruct, example data)")
    s.add_argument("--config", default=None)
    try:
        from turntune import inspect_cmd

        inspect_cmd.add_parsers(sub)
    except ImportError:
        pass
    return p


def main(argv: list[str] | None = None) -> int:
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
    if unknown or (overrides and args.cmd not in ("train", "demo")):
        print(f"turntune: error: unrecognized arguments: {' '.join(unknown or overrides)}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if args.cmd == "train":
            return _train(args, overrides)
        if args.cmd == "demo":
            args.overrides = overrides
            return _demo(args)
        handler = {"validate": _validate, "encode": _encode, "eval": _eval, "chat": _chat, "merge": _merge}.get(args.cmd)
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
