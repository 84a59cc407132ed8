"""Safety: no code from a model folder, no pickles, a sandbox for chat templates, no network.

Each attack leaves a marker file if it succeeds: a ``__reduce__`` pickle that opens the marker
for writing, a ``modeling`` module that writes it on import, a template that tries to reach ``os``.
The pickle is first shown to work (``torch.load(weights_only=False)`` writes the marker), so the
tests that see no marker are not vacuous.
"""
from __future__ import annotations

import ast
import builtins
import inspect
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from test_faults import make_toy_model, toy_conversations
from toy import toy_tokenizer
from turntune import checkpoint as ckpt
from turntune.cli import main
from turntune.config import ModelConfig, load_config
from turntune.conversation import Conversation, Message
from turntune.errors import ConfigError, TemplateError
from turntune.models import load_model, load_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "turntune"


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: code execution, harmless and visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def evil_pickle(path: Path, marker: Path) -> Path:
    torch.save({"weight": _Payload(marker)}, path)
    return path


def test_the_pickle_payload_works_when_loaded_unsafely(tmp_path):
    marker = tmp_path / "PWNED"
    torch.load(evil_pickle(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> Path:
    return make_toy_model(tmp_path_factory.mktemp("safety-model") / "model")


# -- remote code ------------------------------------------------------------------------------------
def test_trust_remote_code_is_off_unless_asked():
    assert ModelConfig().trust_remote_code is False
    assert load_config(None).model.trust_remote_code is False
    for fn in (load_model, load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


def test_a_folder_that_needs_its_own_code_is_refused(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    toy_tokenizer().save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evilnet", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w')\nclass EvilConfig: pass\nclass EvilModel: pass\n")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(ConfigError) as info:
        load_model(folder)
    assert str(info.value) == (f"model.path: {folder} needs code from the folder itself; set "
                               "model.trust_remote_code=true only if you trust it")
    # a tokenizer that needs its own class is refused the same way
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        load_tokenizer(folder)
    assert str(info.value) == (f"model.path: the tokenizer in {folder} needs code from the folder itself; set "
                               "model.trust_remote_code=true only if you trust it")
    assert not marker.exists()


# -- weights: safetensors only; pickles only with weights_only=True ---------------------------------
def test_pickled_weights_are_never_opened(toy_model, tmp_path):
    marker = tmp_path / "PWNED"
    only_bin = tmp_path / "only-bin"
    only_bin.mkdir()
    for f in toy_model.iterdir():
        if not f.name.endswith(".safetensors"):
            (only_bin / f.name).write_bytes(f.read_bytes())
    evil_pickle(only_bin / "pytorch_model.bin", marker)
    with pytest.raises(ConfigError, match="has no \\*.safetensors weights; turntune does not load pickled checkpoints"):
        load_model(only_bin)
    # with both, the safetensors file is the one read
    both = tmp_path / "both"
    both.mkdir()
    for f in toy_model.iterdir():
        (both / f.name).write_bytes(f.read_bytes())
    evil_pickle(both / "pytorch_model.bin", marker)
    model = load_model(both)
    assert model.config.vocab_size == len(toy_tokenizer())
    assert not marker.exists()


def test_a_poisoned_checkpoint_is_not_unpickled(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save(tmp_path, 1, model, opt, sched)
    marker = tmp_path / "PWNED"
    evil_pickle(tmp_path / "checkpoints" / "step-000001" / "optimizer.pt", marker)
    with pytest.raises(Exception, match="Weights only load failed"):
        ckpt.load(tmp_path, model, opt, sched)
    assert not marker.exists()


def test_a_pickled_lora_adapter_is_loaded_weights_only(toy_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    from turntune.chat import load_for_chat

    adapter = tmp_path / "adapter"
    peft = get_peft_model(load_model(toy_model), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft.save_pretrained(adapter, safe_serialization=False)
    marker = tmp_path / "PWNED"
    evil_pickle(adapter / "adapter_model.bin", marker)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_for_chat(toy_model, adapter)
    assert not marker.exists()


def test_source_audit_every_torch_load_is_weights_only_and_nothing_unsafe():
    """A grep with a parser: every call in src/ is checked, not every line that looks like one."""
    torch_loads, model_loads, problems = 0, 0, []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "joblib", "marshal", "shelve") for n in names):
                    problems.append(f"{path.name}:{node.lineno}: imports a pickle module")
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.name}:{node.lineno}: {name}"

            def is_true(key: str) -> bool:
                return isinstance(kw.get(key), ast.Constant) and kw[key].value is True

            if name == "torch.load":
                torch_loads += 1
                if not is_true("weights_only"):
                    problems.append(f"{where} without weights_only=True")
            if name in ("eval", "exec", "yaml.load", "yaml.unsafe_load", "os.system", "os.popen"):
                problems.append(where)
            if is_true("trust_remote_code"):
                problems.append(f"{where} with trust_remote_code=True")
            if name == "AutoModelForCausalLM.from_pretrained":
                model_loads += 1
                if not is_true("use_safetensors"):
                    problems.append(f"{where} without use_safetensors=True")
    assert problems == []
    assert torch_loads == 2  # checkpoint.py: optimizer and scheduler state (proves the audit sees calls)
    assert model_loads == 1  # models.load_model: the one place user model folders are opened


# -- chat templates run in a sandbox ----------------------------------------------------------------
SANDBOX = [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "access to attribute '__class__' of 'str' object is unsafe."),
    ("{{ raise_exception.__globals__['os'].system('touch {marker}') }}",
     "access to attribute '__globals__' of 'function' object is unsafe."),
    ("{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
     "access to attribute '__init__' of 'type' object is unsafe."),
    ("{{ self.__init__.__globals__ }}", "access to attribute '__init__' of 'TemplateReference' object is unsafe."),
    ("{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages | length }}",
     "access to attribute 'append' of 'list' object is unsafe."),
]


@pytest.mark.parametrize("source,why", SANDBOX, ids=["mro", "globals", "cycler", "self", "mutate"])
def test_a_template_reaching_for_python_internals_fails_cleanly(tmp_path, source, why):
    from turntune.templates.hf import HFTemplate

    marker = tmp_path / "PWNED"
    template = HFTemplate(toy_tokenizer(), chat_template=source.replace("{marker}", str(marker)))
    conv = Conversation((Message("user", "q"), Message("assistant", "r")), source="d.jsonl:1")
    with pytest.raises(TemplateError) as info:
        template.render(conv)
    assert str(info.value) == f"d.jsonl:1: the chat template did something the sandbox forbids: {why}"
    assert not marker.exists()


def test_sandbox_limits_and_format_strings():
    from turntune.templates.hf import HFTemplate, compile_template

    conv = Conversation((Message("user", "q"), Message("assistant", "r")), source="d.jsonl:1")
    with pytest.raises(TemplateError, match=r"^d\.jsonl:1: the chat template failed \(OverflowError: Range too big"):
        HFTemplate(toy_tokenizer(), chat_template="{% for i in range(10**9) %}x{% endfor %}").render(conv)
    for source, why in [("{{ 'ab' * 10**9 }}", "'*' would make 2,000,000,000 items (the limit is 10,000,000)"),
                        ("{{ [0] * 20000000 }}", "'*' would make 20,000,000 items (the limit is 10,000,000)"),
                        ("{{ 7 ** 100000000 }}", "'**' would make an integer of about 300,000,000 bits (the limit is 100,000)"),
                        ("{{ (2 ** 50000) * (2 ** 50000) }}",
                         "'*' would make an integer of about 100,002 bits (the limit is 100,000)")]:
        with pytest.raises(TemplateError) as info:
            HFTemplate(toy_tokenizer(), chat_template=source).render(conv)
        assert str(info.value) == f"d.jsonl:1: the chat template did something the sandbox forbids: {why}"
    assert compile_template("{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ [1] * 2 }}").render() == "ababab1024[1, 1]"
    # str.format cannot reach attributes either: the sandboxed formatter yields nothing
    assert compile_template("{{ '{0.__class__}'.format(messages) }}").render(messages=[]) == ""


def test_an_evil_template_through_train_is_one_error(toy_model, tmp_path, capsys):
    import yaml

    jinja = tmp_path / "evil.jinja"
    jinja.write_text(SANDBOX[0][0])
    data = tmp_path / "train.jsonl"
    data.write_text(toy_conversations(2))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(toy_model)},
                                   "data": {"train": str(data), "eval": None, "template": "hf",
                                            "chat_template": str(jinja)},
                                   "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1}}))
    assert main(["train", str(cfg)]) == 2
    assert capsys.readouterr().err == (
        f"turntune: error: {data}:1: the chat template did something the sandbox forbids: "
        "access to attribute '__class__' of 'str' object is unsafe.\n")


# -- no network -------------------------------------------------------------------------------------
def test_tests_run_offline():
    import huggingface_hub.constants

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_the_cli_leaves_the_hub_to_the_environment(monkeypatch, tmp_path, capsys):
    """Online or offline is the user's choice (a Hub repo id downloads only when online); local
    folders never reach the network, whatever it says (the next test)."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    data = tmp_path / "d.jsonl"
    data.write_text(toy_conversations(1))
    assert main(["validate", str(data)]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_a_whole_run_opens_no_socket(toy_model, tmp_path, monkeypatch):
    """Train (and save) with every way out of the machine made to fail loudly, and the hub client
    told it is online: a local model folder never asks the network."""
    import huggingface_hub.constants
    import yaml

    from turntune.training import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(*a, **k):
        raise AssertionError(f"network access attempted: {a[:2]}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    data = tmp_path / "train.jsonl"
    data.write_text(toy_conversations(4))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(toy_model)},
                                   "data": {"train": str(data), "eval": str(data), "max_length": 64},
                                   "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "eval_every": 0,
                                             "micro_batch_tokens": 64, "autocast": "fp32"}}))
    res = train(load_config(cfg))
    assert res.steps == 2 and (res.final_dir / "adapter_model.safetensors").is_file()
