"""Issue 12's leftovers: a run's result stores the template it was resolved to (``chat`` and
``eval`` on it then render as training did), and ``validate`` takes ``--config``.

The case: a GLM-4 tokenizer (``auto`` picks the native format for it) trained with its own
``data.chat_template``. Its ``final/`` used to record ``template: auto``, so ``turntune chat
final/`` chatted in the native format the run never saw.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from reasoning import TEMPLATES
from turntune import chat as chat_module
from turntune.config import load_config
from turntune.models import load_tokenizer
from turntune.recipes import recipe
from cli_run import run, subset

ROOT = Path(__file__).resolve().parents[1]
CUSTOM = TEMPLATES / "glm4-0414.jinja"  # a Jinja GLM template: not what `auto` picks for this tokenizer


@pytest.fixture(scope="module")
def glm_run(tiny_glm_path, tmp_path_factory):
    """A 1-step LoRA run on the tiny GLM with data.chat_template set; returns (config, final/)."""
    tmp = tmp_path_factory.mktemp("glm-custom")
    cfg = {"model": {"path": str(tiny_glm_path)},
           "data": {"train": str(subset(tmp, "train", 4)), "eval": None, "chat_template": str(CUSTOM),
                    "max_length": 256},
           "lora": {"r": 2, "alpha": 4},
           "train": {"method": "lora", "output_dir": str(tmp / "run"), "max_steps": 1, "micro_batch_tokens": 256,
                     "warmup_steps": 0, "eval_every": 0, "seed": 1}}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, log, err = run(["train", str(path)])
    assert code == 0, log + err
    return path, tmp / "run" / "final"


@pytest.mark.slow  # trains one step
def test_the_result_records_the_resolved_template_and_chat_uses_it(glm_run, tiny_glm_path, monkeypatch):
    _, final = glm_run
    meta = json.loads((final / "turntune.json").read_text())
    assert (meta["template"], meta.get("chat_template"), meta.get("template_kwargs")) == ("hf", CUSTOM.read_text(), {})
    from turntune.chat import chat_template_for  # here: the assertion above is the one older code fails
    assert meta["base_model"] == str(tiny_glm_path)
    # without the record, `auto` on this tokenizer is the native format: what chat used to pick
    tok = load_tokenizer(final)
    assert chat_template_for(tok, "auto").name == "glm4"
    chosen = chat_template_for(tok, "auto", None, final)
    assert (chosen.name, chosen.source) == ("hf", CUSTOM.read_text())
    assert chat_template_for(tok, "glm4", final).name == "glm4"  # a template named on the command line wins
    # the CLI: `turntune chat final/` talks through the recorded template
    seen = []
    monkeypatch.setattr(chat_module, "chat_loop", lambda model, template, **kw: seen.append(template))
    code, _, err = run(["chat", str(final)])
    assert code == 0, err
    assert (seen[0].name, seen[0].source) == ("hf", CUSTOM.read_text())
    # recipes (eval, inspect, encode with --model final/ and no --config) use it too
    r = recipe(load_config(None, [f"model.path={final}"]))
    assert (r.template.name, r.template.source) == ("hf", CUSTOM.read_text())
    assert recipe(load_config(None, [f"model.path={final}", "data.template=glm4"])).template.name == "glm4"
    code, out, err = run(["inspect", str(subset(final.parent, "eval", 1)), "--model", str(final), "-n", "1",
                          "--color", "never"])
    assert code == 0, err
    assert f"template hf (chat_template of {final})" in out.splitlines()[0]


def test_a_result_saved_before_templates_were_recorded_still_works(tiny_glm_path, tmp_path):
    """Older results say ``template: auto``: ``auto`` then decides from the tokenizer, as before."""
    from turntune.chat import chat_template_for

    old = tmp_path / "old-final"
    load_tokenizer(tiny_glm_path).save_pretrained(old)
    (old / "turntune.json").write_text(json.dumps({"base_model": str(tiny_glm_path), "method": "lora",
                                                   "template": "auto"}))
    tok = load_tokenizer(old)
    assert chat_template_for(tok, "auto", old).name == "glm4"
    assert recipe(load_config(None, [f"model.path={old}"])).template.name == "glm4"
    (old / "turntune.json").write_text("{broken")
    code, _, err = run(["inspect", str(subset(tmp_path, "eval", 1)), "--model", str(old)])
    assert code == 2 and err.startswith(f"turntune: error: {old / 'turntune.json'}: cannot read the run's record")


# -- validate --config ----------------------------------------------------------------------------
def test_validate_takes_the_config(tiny_glm_path, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                    + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "42",
                                                       "reasoning_content": "6 times 7"}]}) + "\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(tiny_glm_path)}, "data": {"train": str(data)}}))
    # the config's model and data: the native GLM-4 format has no place for reasoning
    code, out, err = run(["validate", "--config", str(cfg)])
    assert code == 1, err
    assert out.startswith(f"{data}: 2 records, 2 valid, 0 skipped")
    assert "template glm4: 1 of 2 valid records encode" in out and "refused not_rendered: 1" in out
    # its dotted overrides and the command's flags apply, as for encode/inspect/audit/eval
    code, out, err = run(["validate", "--config", str(cfg), f"--data.chat_template={CUSTOM}"])
    assert code == 1 and "template hf: 1 of 2 valid records encode" in out  # 0414 writes no reasoning either
    code, out, err = run(["validate", "--config", str(cfg), "--chat-template", str(TEMPLATES / "glm45.jinja")])
    assert (code, err) == (0, "") and "template hf: 2 of 2 valid records encode" in out
    # no data and no config: a usage error naming both
    code, _, err = run(["validate"])
    assert code == 2 and err == "turntune: error: validate: give a data file, or --config (its data.train is used)\n"
