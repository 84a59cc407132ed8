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
from turntune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ["load_conversations", "Conversation", "Message", "encode", "encode_conversations", "EncodeOptions",
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
