"""Where models come from and what a merge keeps: Hub repo ids resolved through the hub's own cache
(offline, a cache laid out as ``huggingface_hub`` lays it out), and ``turntune merge`` carrying the
run's chat template and generation config byte for byte."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from turntune.cli import main
from turntune.config import load_config
from turntune.errors import ConfigError
from turntune.models import is_repo_id, load_model, load_tokenizer, resolve_path

ROOT = Path(__file__).resolve().parents[1]
CHATML_TOOLS = ROOT / "examples" / "templates" / "chatml-tools.jinja"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(src: Path, cache: Path, repo_id: str) -> Path:
    """Lay ``src`` out as the Hub client caches a download: ``models--owner--name/`` with
    ``refs/main`` naming a commit, ``snapshots/<commit>/<file>`` symlinks into ``blobs/<hash>``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot, blobs = repo / "snapshots" / COMMIT, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache in place of the user's; the hub client is offline (conftest)."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE is True  # nothing here may reach the network
    cache = tmp_path / "hub"
    cache.mkdir()
    # The client reads HF_HUB_CACHE once at import; this is the value it then uses.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # "acme/..." must not name a folder under the working directory
    return cache


def test_repo_ids_and_paths():
    assert [is_repo_id(s) for s in ("Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                    "acme/tiny_chat.v2")] == [True, True, True]
    assert [is_repo_id(s) for s in ("./acme/x", "/acme/x", "~/x", "a/b/c", "acme", "acme/", "../x",
                                    "a/..", "builtin:smollm2", "examples/data")] == [False] * 10


def test_a_repo_id_loads_from_the_hub_cache_offline(tiny_llama_path, offline_hub):
    snapshot = hub_cache(tiny_llama_path, offline_hub, "acme/tiny-chat")
    assert resolve_path("acme/tiny-chat") == snapshot
    tok = load_tokenizer("acme/tiny-chat")
    assert tok.chat_template == load_tokenizer(tiny_llama_path).chat_template
    assert tok("Hello there")["input_ids"] == load_tokenizer(tiny_llama_path)("Hello there")["input_ids"]
    model = load_model("acme/tiny-chat")
    reference = load_model(tiny_llama_path)
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


def test_a_repo_id_missing_from_the_cache_offline_is_a_config_error(offline_hub):
    with pytest.raises(ConfigError) as e:
        load_model("acme/not-downloaded")
    assert str(e.value) == (
        "model.path: 'acme/not-downloaded' is not a local folder, so it was taken for a Hugging Face Hub repo id, "
        f"but it is not in the Hub cache ({offline_hub}) and HF_HUB_OFFLINE=1 forbids downloading it: download "
        "it first (`hf download acme/not-downloaded`), set HF_HUB_OFFLINE=0, or give a local folder")


def test_the_cli_takes_a_repo_id(tiny_llama_path, tmp_path):
    """``turntune encode --model owner/name`` in a fresh process, the cache named the user's way
    (the environment variable), offline."""
    cache = tmp_path / "hub"
    hub_cache(tiny_llama_path, cache, "acme/tiny-chat")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]}) + "\n")
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    run = subprocess.run([sys.executable, "-m", "turntune", "encode", str(data), "--model", "acme/tiny-chat"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    # the settings line names where the chat template came from: the snapshot in the Hub cache
    assert f"template hf (chat_template of {cache}/models--acme--tiny-chat/snapshots/" in run.stdout
    assert "), strategy all, weighting token, max_length 1024" in run.stdout


def test_the_cli_names_a_repo_id_it_cannot_find(offline_hub, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]}) + "\n")
    assert main(["encode", str(data), "--model", "acme/nothing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("turntune: error: model.path: 'acme/nothing' is not a local folder, so it was taken for a "
                          f"Hugging Face Hub repo id, but it is not in the Hub cache ({offline_hub})")
    assert err.count("\n") == 1


# -- merge --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tiny_llama_path, tmp_path_factory) -> Path:
    """One LoRA step on the tiny Llama with the example's ChatML-with-tools template (not the
    tokenizer's own): the run's final/ folder."""
    from turntune.training import train

    tmp = tmp_path_factory.mktemp("lora-run")
    lines = [ln for ln in (ROOT / "examples" / "data" / "train.jsonl").read_text().splitlines()
             if "tool_calls" not in ln][:4]
    (tmp / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(None, [f"model.path={tiny_llama_path}", f"data.train={tmp / 'train.jsonl'}", "data.eval=null",
                             f"data.chat_template={CHATML_TOOLS}", f"train.output_dir={tmp / 'run'}",
                             "train.max_steps=1", "train.micro_batch_tokens=1024", "train.autocast=fp32"])
    return train(cfg).final_dir


def test_merge_keeps_the_training_template_and_generation_config(tiny_llama_path, lora_run, tmp_path, capsys):
    base_template = (tiny_llama_path / "chat_template.jinja").read_bytes()
    assert base_template != CHATML_TOOLS.read_bytes()  # or the test shows nothing
    assert (lora_run / "chat_template.jinja").read_bytes() == CHATML_TOOLS.read_bytes()
    assert (lora_run / "generation_config.json").is_file()

    out = tmp_path / "merged"
    assert main(["merge", str(tiny_llama_path), str(lora_run), str(out)]) == 0
    assert capsys.readouterr().out == f"merged into {out}\n"
    for name in ("chat_template.jinja", "tokenizer_config.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (lora_run / name).read_bytes(), name
    assert load_tokenizer(out).chat_template == CHATML_TOOLS.read_text()
    # the template the run resolved travels too: chat/eval on the merged folder with --template auto
    # must not decide it again from the tokenizer (a GLM-4 tokenizer would get the native format)
    from turntune.recipes import RUN_META, adapter_base, saved_template

    keys = ("template", "chat_template", "template_kwargs")
    assert {k: saved_template(out)[k] for k in keys} == {k: saved_template(lora_run)[k] for k in keys}
    assert saved_template(lora_run)["template"] == "hf"
    assert "base_model" not in json.loads((out / RUN_META).read_text())  # a merged model is no adapter
    assert adapter_base(out) is None

    # and the weights are the adapter folded in: the same logits as base + adapter
    from peft import PeftModel

    ids = torch.tensor([load_tokenizer(out)("<|im_start|>user\nWhat is 2 + 2?<|im_end|>")["input_ids"]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_model(tiny_llama_path), str(lora_run)).eval()(ids).logits
        got = load_model(out).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merge_of_a_bare_adapter_takes_the_base_tokenizer(tiny_llama_path, lora_run, tmp_path):
    """A PEFT adapter folder without tokenizer files: the merged folder gets the base's."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((lora_run / name).read_bytes())
    out = tmp_path / "merged"
    assert main(["merge", str(tiny_llama_path), str(bare), str(out)]) == 0
    assert (out / "chat_template.jinja").read_bytes() == (tiny_llama_path / "chat_template.jinja").read_bytes()
    assert (out / "generation_config.json").is_file()
