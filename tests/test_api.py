"""The front door: ``import turntune`` gives every public name, lazily (no torch on import), and
the README's "Python API" examples run as doctests so they cannot rot."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import turntune
from turntune.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ["load_conversations", "DataReport", "Conversation", "Message", "encode", "encode_batch", "encode_conversations",
          "EncodeOptions",
          "EncodeReport", "Example", "Template", "GLM4Template", "HFTemplate", "resolve_template", "pack_batch",
          "pad_batch", "Batch", "batch_loss", "per_token_losses", "LossSum", "evaluate", "EvalResult", "train",
          "TrainResult", "load_config", "Config", "Recipe", "recipe", "load_tokenizer", "load_model",
          "TurntuneError", "DataError", "ConfigError", "TemplateError", "__version__"]


def python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_turntune_loads_no_torch_and_exposes_the_public_names():
    got = python("import json, sys, turntune\n"
                 "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'tokenizers') if m in sys.modules)\n"
                 "print(json.dumps({'heavy': heavy, 'all': turntune.__all__, 'dir': dir(turntune),"
                 " 'version': turntune.__version__}))")
    assert got["heavy"] == []
    assert set(PUBLIC) <= set(got["all"]) and set(got["all"]) <= set(got["dir"])
    assert len(got["all"]) == len(set(got["all"]))
    # one source for the version: pyproject reads it from the package
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "turntune.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", got["version"])


# Functions whose names modules used to have (encode.py, train.py, evaluate.py, audit.py)
FUNCTIONS = {"encode", "train", "evaluate"}


def test_every_public_name_is_the_object_its_module_defines():
    import importlib
    import inspect

    for name in turntune.__all__:
        if name == "__version__":
            continue
        module, _, attr = turntune._EXPORTS[name].partition(":")
        want = getattr(importlib.import_module(module), attr)
        assert not inspect.ismodule(want), name
        assert getattr(turntune, name) is want, name
    with pytest.raises(AttributeError, match="module 'turntune' has no attribute 'nope'"):
        turntune.nope  # noqa: B018


def test_the_function_names_are_never_ambiguous():
    import importlib.util
    import inspect

    import turntune.auditing  # noqa: F401  (what any other import of the module does too)
    import turntune.encoding  # noqa: F401
    import turntune.evaluation  # noqa: F401
    import turntune.training  # noqa: F401

    assert [inspect.isfunction(getattr(turntune, n)) for n in sorted(FUNCTIONS)] == [True] * 3
    for name in (*FUNCTIONS, "audit"):  # no module shares a public function's name
        assert importlib.util.find_spec(f"turntune.{name}") is None, name


MSGS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]


def test_encode_needs_its_tokenizer():
    from turntune.encoding import encode

    with pytest.raises(TypeError, match="tokenizer"):
        encode(MSGS)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match=r"^encode: tokenizer is None; pass the model's tokenizer"):
        encode(MSGS, None)


def test_encode_takes_a_chat_template():
    from toy import toy_tokenizer

    from turntune.encoding import encode

    chatml = (ROOT / "examples/templates/chatml-tools.jinja").read_text()
    tok = toy_tokenizer()  # GLM-4's special tokens: without a chat_template, the native GLM-4 format
    [native] = encode(MSGS, tok)
    assert tok.decode(native.input_ids) == "[gMASK]<sop><|user|>\nHi<|assistant|>\nYo<|user|>"
    [ex] = encode(MSGS, tok, chat_template=chatml)
    assert tok.decode(ex.input_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>"
    assert tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100]) == "Yo<|im_end|>"


# -- encode_batch: what datasets.map(batched=True) calls -----------------------------------------
def chat(*texts: str, system: str | None = None, **extra) -> list[dict]:
    """Messages alternating user/assistant, as a dataset's row holds them."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": t, **extra} for i, t in enumerate(texts)]


ROWS = [chat("Hi", "Hello!", "And?", "Ciao.", system="Be brief."), chat("2+2?", "4"),
        chat("a", "b", "c", "d", "e", "f")]


def test_encode_batch_returns_the_columns_of_what_encode_conversations_gives():
    from toy import toy_tokenizer
    from types import MappingProxyType

    from turntune.data import parse_record
    from turntune.encoding import EncodeOptions, EncodeReport, encode_batch, encode_conversations, resolve_template

    tok = toy_tokenizer()
    batch = MappingProxyType({"messages": ROWS})  # datasets passes a Mapping (its LazyBatch), not always a dict
    report = EncodeReport()
    cols = encode_batch(batch, tok, strategy="expand", weighting="turn", report=report)
    ref_report = EncodeReport()
    convs = [parse_record({"messages": m}, source=f"row {i}") for i, m in enumerate(ROWS)]
    ref = encode_conversations(convs, resolve_template(tok), EncodeOptions("expand", "turn"), report=ref_report)
    assert len(ref) == 2 + 1 + 3  # one row per example: expand makes one per reply
    assert list(cols) == ["input_ids", "labels", "weight", "turn", "position_ids", "tree_end", "row"]
    assert cols["row"] == [0, 0, 1, 2, 2, 2]
    for name in ("input_ids", "labels", "weight", "turn", "position_ids", "tree_end"):
        assert cols[name] == [getattr(e, name) for e in ref], name
    assert report == ref_report and report.conversations == 3 and report.examples == 6
    # indices (map(..., with_indices=True)) number the rows; columns picks any Example field
    cols = encode_batch(batch, tok, indices=[7, 8, 9], columns=("source", "row", "n_turns", "input_ids"))
    assert cols == {"source": ["row 7", "row 8", "row 9"], "row": [7, 8, 9], "n_turns": [2, 1, 3],
                    "input_ids": [e.input_ids for e in encode_conversations(convs, resolve_template(tok))]}
    assert encode_batch({"messages": []}, tok, columns=("input_ids", "row")) == {"input_ids": [], "row": []}


def test_encode_batch_reads_what_arrow_gives():
    # Arrow gives every row every column and every message every key, null where absent (a
    # weight on one reply puts weight: null on every other message), and the data set's other columns
    from toy import toy_tokenizer

    from turntune.data import DataReport
    from turntune.encoding import encode, encode_batch

    tok = toy_tokenizer((ROOT / "examples/templates/chatml-tools.jinja").read_text())
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    nulls = {"weight": None, "tool_calls": None, "reasoning_content": None}
    rows = [chat("Hi", "Yo", system="S", **nulls), chat("x", "y", **nulls), chat("q", "a", "q2", "a2", **nulls)]
    rows[1][1]["weight"] = rows[2][1]["weight"] = 0  # row 1 then has nothing to train: refused
    data_report = DataReport()
    cols = encode_batch({"messages": rows, "tools": [tools, None, None], "id": ["a", "b", "c"]}, tok,
                        template="hf", on_invalid="skip", data_report=data_report)
    assert cols["row"] == [0, 2]
    weighted = [dict(m, weight=0) if i == 1 else m for i, m in enumerate(chat("q", "a", "q2", "a2"))]
    want = encode(chat("Hi", "Yo", system="S"), tok, template="hf", tools=tools) + encode(weighted, tok, template="hf")
    assert cols["input_ids"] == [w.input_ids for w in want] and cols["labels"] == [w.labels for w in want]
    assert tok.decode([t for t, lab in zip(cols["input_ids"][1], cols["labels"][1]) if lab != -100]) == "a2<|im_end|>"
    assert data_report.skipped == {"no_trained_reply": 1} and data_report.valid == 2
    assert data_report.ignored_keys == {"id": 2}  # counted, never dropped silently (a skipped row's are not)


def test_encode_batch_errors_name_the_row():
    from toy import toy_tokenizer

    from turntune.data import DataReport
    from turntune.encoding import EncodeReport, encode_batch

    tok = toy_tokenizer()
    bad = [chat("Hi", "Yo"), chat("Hi", "Yo", "Again"), [{"role": "user", "content": "Hi"}] * 2]
    with pytest.raises(DataError, match=r"^row 12: turn 2: two user messages in a row") as e:
        encode_batch({"messages": bad}, tok, indices=[10, 11, 12])
    assert e.value.rule == "consecutive_user"
    # an error while encoding (here: a template that refuses) is the row's too
    refuses = ("{% if messages | length > 2 %}{{ raise_exception('too long') }}{% endif %}"
               + (ROOT / "examples/templates/chatml-tools.jinja").read_text())
    with pytest.raises(DataError, match=r"^row 1: the chat template refused this conversation: too long$"):
        encode_batch({"messages": bad[:2]}, tok, chat_template=refuses)
    report, data_report = EncodeReport(), DataReport()
    cols = encode_batch({"messages": bad}, tok, chat_template=refuses, on_invalid="skip", report=report,
                        data_report=data_report, columns=("row",))
    assert cols == {"row": [0]}
    assert report.skipped == {"template_refused": 1} and data_report.skipped == {"consecutive_user": 1}
    assert report.conversations == 1 and data_report.records == 3


def test_encode_batch_refuses_bad_arguments_in_one_line():
    from toy import toy_tokenizer

    from turntune.encoding import encode_batch

    tok = toy_tokenizer()
    cases = [
        (dict(batch={"messages": ROWS, "tools": [None]}),
         r"^encode_batch: the batch's columns differ in length \(messages 3, tools 1\); pass what "
         r"datasets.map\(batched=True\) passes: a dict of equally long columns$"),
        (dict(batch={"text": ["a"]}), r"^encode_batch: the batch has no 'messages' or 'conversations' column "
                                      r"\(it has: text\); .*"),
        (dict(batch=ROWS), r"^encode_batch: the batch is a list, not a mapping of columns .*"),
        (dict(batch={"messages": ROWS}, indices=[1]), r"^encode_batch: 1 indices for 3 rows$"),
        (dict(batch={"messages": ROWS}, columns=("input_ids", "mask")),
         r"^columns: unknown value 'mask'; valid values: input_ids, labels, weight, turn, position_ids, tree_end, "
         r"row, source, n_turns, message$"),
        (dict(batch={"messages": ROWS}, on_invalid="drop"), r"^on_invalid: unknown value 'drop'; valid values: error, skip$"),
        (dict(batch={"messages": ROWS}, strategy="each"), r"^strategy: unknown value 'each'"),
        (dict(batch={"messages": ROWS}, tokenizer=None), r"^encode_batch: tokenizer is None; pass the model's tokenizer"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("tokenizer", tok)
        with pytest.raises(ConfigError, match=message):
            encode_batch(**kwargs)


def readme_api_examples() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Python API section has no ```python blocks"
    return "\n".join(blocks)


@pytest.mark.slow  # the examples train 2 steps
def test_readme_python_api_examples_run(tmp_path):
    """Every ```python block of the README's "Python API" section, run as one doctest session
    (the blocks build on each other, as a reader runs them) in a fresh interpreter from the
    repository root, as a reader would start."""
    source = readme_api_examples()
    assert source.count(">>> ") >= 10
    (tmp_path / "api.txt").write_text(source, encoding="utf-8")
    code = ("import doctest, sys\n"
            "r = doctest.testfile(sys.argv[1], module_relative=False, name='README.md: Python API',"
            " optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)\n"
            "print(f'tried {r.attempted} failed {r.failed}')\n"
            "sys.exit(1 if r.failed or not r.attempted else 0)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "api.txt")], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"tried {source.count('>>> ')} failed 0"
