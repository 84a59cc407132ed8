"""Every command sees what training sees: ``encode``, ``inspect``, ``audit`` and ``eval`` read the
training YAML (``--config`` and the same dotted overrides), take a run's result folder as
``--model``, compare two models on the same encoded tokens, and evaluate at the run's precision.

One tiny LoRA run (1 step) is the reference: its log and metrics are what ``train`` encoded and
scored; each command must show exactly that.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from turntune.cli import main
from turntune.constants import IGNORE_INDEX
from cli_run import run, subset

ROOT = Path(__file__).resolve().parents[1]
CHATML_TOOLS = ROOT / "examples/templates/chatml-tools.jinja"


@pytest.fixture(scope="module")
def tuned(tiny_llama_path, tmp_path_factory):
    """A 1-step LoRA run on the tiny Llama (SmolLM2's tokenizer) with settings that differ from
    every command's old defaults: the tool-call template, windows (max_length 256), turn
    weighting, history_fraction 0.5 and bf16 autocast. Returns (config path, run folder, log)."""
    tmp = tmp_path_factory.mktemp("tuned")
    cfg = {
        "model": {"path": str(tiny_llama_path)},
        "data": {"train": str(subset(tmp, "train", 12)), "eval": str(subset(tmp, "eval", 6)),
                 "chat_template": str(CHATML_TOOLS), "max_length": 256, "weighting": "turn",
                 "history_fraction": 0.5},
        "lora": {"r": 4, "alpha": 8},
        "train": {"method": "lora", "output_dir": str(tmp / "run"), "max_steps": 1, "micro_batch_tokens": 256,
                  "lr": 5e-2, "warmup_steps": 0, "eval_every": 0, "autocast": "bf16", "seed": 1},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, log, err = run(["train", str(path)])
    assert code == 0, log + err
    return path, tmp / "run", log


def train_block(log: str, split: str = "train") -> list[str]:
    """The encoding report that ``train`` logged for a split (the lines under its heading)."""
    lines = log.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{split} encoding ("))
    block = []
    for line in lines[at + 1:]:
        if not line.startswith("  "):
            break
        block.append(line[2:])
    return block


def contains_block(text: str, block: list[str]) -> bool:
    lines = text.splitlines()
    return any(lines[i:i + len(block)] == block for i in range(len(lines)))


# -- item 3: --config -----------------------------------------------------------------------------
@pytest.mark.slow  # uses the 1-step training run
def test_encode_with_the_config_reports_what_train_encoded(tuned):
    cfg, _, log = tuned
    block = train_block(log)
    assert any("extra windows" in b for b in block) and len(block) >= 5
    code, out, err = run(["encode", "--config", str(cfg)])
    assert code == 0, err
    assert contains_block(out, block), f"train encoded:\n{chr(10).join(block)}\nencode showed:\n{out}"
    # the settings are printed, the chat template by its file
    assert (f"template hf (chat_template {CHATML_TOOLS}), strategy all, weighting turn, max_length 256, "
            "history_fraction 0.5, cut_long_replies false") in out


@pytest.mark.slow  # uses the 1-step training run
def test_flags_and_dotted_overrides_override_the_config(tuned):
    cfg, _, log = tuned
    code, out, _ = run(["encode", "--config", str(cfg), "--max-length", "2048", "--data.history_fraction=0.3"])
    assert code == 0
    assert "max_length 2048, history_fraction 0.3" in out
    assert not contains_block(out, train_block(log))  # no windows at 2048: another report
    assert "(extra windows 0)" in out


def test_without_config_the_defaults_are_the_configs(tiny_llama_path, tmp_path):
    """``--max-length`` used to default to 2048 while a run's default is 1024."""
    data = subset(tmp_path, "eval", 2)
    code, out, _ = run(["encode", str(data), "--model", str(tiny_llama_path), "--chat-template", str(CHATML_TOOLS)])
    assert code == 0
    assert "strategy all, weighting token, max_length 1024, history_fraction 0.3, cut_long_replies false" in out


@pytest.mark.slow  # uses the 1-step training run
def test_a_lora_result_folder_works_as_model(tuned):
    """``final/`` (adapter + tokenizer, no config.json) carries the template it was trained with."""
    cfg, out_dir, log = tuned
    final = out_dir / "final"
    assert not (final / "config.json").exists() and (final / "adapter_config.json").is_file()
    code, out, err = run(["encode", "--config", str(cfg), "--model", str(final), "--data.chat_template=null"])
    assert code == 0, err
    assert contains_block(out, train_block(log))
    # the 6th conversation has a tool call: SmolLM2's own template would drop it (refused, or
    # "not rendered" in the audit); the folder's template renders and trains it
    data = str(subset(out_dir.parent, "eval", 6))
    code, out, err = run(["inspect", data, "-n", "6", "--color", "never", "--model", str(final)])
    assert code == 0, err
    assert f"template hf (chat_template of {final})" in out.splitlines()[0]
    assert "«<tool_call>{" in out.replace("↵\n", "\n")
    code, out, err = run(["audit", data, "--model", str(final)])
    assert code == 0, err
    assert "REFUSED" not in out and "data: conversations 6, messages 50, rounds 21, replies 22 (tool calls 1)" in out


def test_a_tokenizer_only_folder_works_as_model(tiny_llama_path, tmp_path):
    tok = tmp_path / "tokenizer-only"
    tok.mkdir()
    for f in tiny_llama_path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tok / f.name)
    assert not (tok / "config.json").exists()
    data = subset(tmp_path, "eval", 2)
    for cmd in ("encode", "audit"):
        code, out, err = run([cmd, str(data), "--model", str(tok), "--chat-template", str(CHATML_TOOLS)])
        assert code == 0, err


@pytest.mark.slow  # uses the 1-step training run
def test_inspect_and_audit_take_the_config(tuned):
    cfg, _, _ = tuned
    code, out, err = run(["inspect", "--config", str(cfg), "-n", "1", "--color", "never"])
    assert code == 0, err
    assert out.startswith("turntune inspect train-12.jsonl: template hf (chat_template ")
    assert "max_length 256" in out.splitlines()[0]
    code, out, err = run(["audit", "--config", str(cfg), "--json", str(Path(cfg).with_name("audit.json"))])
    assert code in (0, 1), err
    assert "max_length 256" in out


def test_no_data_and_no_config_is_a_usage_error(tiny_llama_path):
    code, _, err = run(["encode", "--model", str(tiny_llama_path)])
    assert code == 2
    assert err.strip() == "turntune: error: encode: give a data file, or --config (its data.train is used)"


# -- items 2 and 4: eval ----------------------------------------------------------------------------
def eval_json(args: list[str], tmp: Path) -> tuple[str, dict]:
    out = tmp / "eval.json"
    code, text, err = run([*args, "--json", str(out)])
    assert code == 0, err
    return text, json.loads(out.read_text())


def train_eval_after(out_dir: Path) -> dict:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"][-1]


@pytest.mark.slow  # uses the 1-step training run
def test_eval_scores_what_train_scored_at_the_runs_precision(tuned, tmp_path):
    """The same adapter and tokens give the same loss in ``train``'s eval and ``turntune eval``:
    both under the run's precision (here bf16 autocast), which both name."""
    cfg, out_dir, _ = tuned
    after = train_eval_after(out_dir)
    assert after["precision"] == "bf16"
    text, res = eval_json(["eval", str(out_dir / "final"), "--config", str(cfg)], tmp_path)
    assert "precision: bf16 autocast (train.autocast=bf16)" in text
    got = res["model"]
    assert got["precision"] == "bf16" and got["tokens"] == after["tokens"]
    assert got["loss"] == pytest.approx(after["loss"], rel=1e-6)
    text, fp32 = eval_json(["eval", str(out_dir / "final"), "--config", str(cfg), "--train.autocast=fp32"], tmp_path)
    assert "precision: fp32 (train.autocast=fp32)" in text
    assert fp32["model"]["tokens"] == after["tokens"] and fp32["model"]["loss"] != got["loss"]


@pytest.mark.slow  # uses the 1-step training run
def test_eval_compare_scores_the_same_tokens_and_labels_roles(tuned, tiny_llama_path, tmp_path):
    cfg, out_dir, _ = tuned
    final = out_dir / "final"
    text, res = eval_json(["eval", str(final), "--config", str(cfg), "--compare", str(tiny_llama_path)], tmp_path)
    assert set(res) == {"tuned", "base"}
    tuned_r, base_r = res["tuned"], res["base"]
    assert (tuned_r["model"], base_r["model"]) == (str(final), str(tiny_llama_path))
    assert tuned_r["tokens"] == base_r["tokens"] == train_eval_after(out_dir)["tokens"]
    for key in ("per_turn", "per_kind"):
        assert {k: v["tokens"] for k, v in tuned_r[key].items()} == {k: v["tokens"] for k, v in base_r[key].items()}
    assert "tool_call" in tuned_r["per_kind"] and tuned_r["loss"] != base_r["loss"]
    lines = text.splitlines()
    assert f"tuned: {final}" in lines and f"base: {tiny_llama_path}" in lines
    head = next(line for line in lines if line.split()[:1] == ["tuned"] and "base" in line)
    assert head.split() == ["tuned", "base", "tokens"]


@pytest.mark.slow  # uses the 1-step training run
def test_eval_compare_header_with_an_adapter(tuned, tiny_llama_path, tmp_path):
    """``--adapter`` on the same base: the header used to read ``builtin:smollm2builtin:smollm2 (2)``."""
    cfg, out_dir, _ = tuned
    final = out_dir / "final"
    text, res = eval_json(["eval", str(tiny_llama_path), "--adapter", str(final), "--config", str(cfg),
                           "--compare", str(tiny_llama_path)], tmp_path)
    lines = text.splitlines()
    assert f"tuned: {tiny_llama_path} + adapter {final}" in lines and f"base: {tiny_llama_path}" in lines
    assert [line.split() for line in lines if line.split()[:1] == ["tuned"] and "base" in line] == [["tuned", "base", "tokens"]]
    assert res["tuned"]["tokens"] == res["base"]["tokens"] and res["tuned"]["loss"] != res["base"]["loss"]


@pytest.mark.slow  # uses the 1-step training run
def test_eval_compare_refuses_models_with_different_tokenizers(tuned, tiny_glm_path):
    cfg, out_dir, _ = tuned
    code, _, err = run(["eval", str(out_dir / "final"), "--config", str(cfg), "--compare", str(tiny_glm_path)])
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "--compare" in err and "tokenizer" in err and "same tokens" in err


# -- item 5: train and demo ----------------------------------------------------------------------------
def test_train_without_a_config_prints_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: turntune train") and "config" in err


def test_demo_is_what_make_demo_runs(monkeypatch, tmp_path):
    """``turntune demo`` runs examples/smollm2-lora.yaml; ``make demo`` runs ``turntune demo``."""
    import turntune.training as train_mod
    from turntune.config import load_config

    seen = []

    class Stop(Exception):
        pass

    def fake_train(cfg, resume=False):  # noqa: ANN001
        seen.append(cfg)
        raise Stop

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(train_mod, "train", fake_train)
    with pytest.raises(Stop):
        main(["demo", f"--train.output_dir={tmp_path / 'demo'}"])
    assert seen == [load_config(ROOT / "examples/smollm2-lora.yaml", [f"train.output_dir={tmp_path / 'demo'}"])]
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert [line.strip() for line in recipe.splitlines()[1:]] == ["$(VENV)/bin/turntune demo"]


# -- item 6: what the weighting does -------------------------------------------------------------------
def expected_shares(examples, weighting: str) -> dict[str, float]:
    """Share of the loss per reply index, from the definition of each weighting (not the weights):
    token: its share of the trained tokens; turn: its share of the replies; sample: the mean over
    conversations of its share of the conversation's trained tokens."""
    per_conv: dict[str, dict[int, int]] = {}
    for ex in examples:
        d = per_conv.setdefault(ex.source, {})
        for t, lab in zip(ex.turn, ex.labels):
            if lab != IGNORE_INDEX:
                d[t] = d.get(t, 0) + 1
    shares: dict[str, float] = {}
    if weighting == "token":
        total = sum(n for d in per_conv.values() for n in d.values())
        for d in per_conv.values():
            for t, n in d.items():
                shares[str(t + 1)] = shares.get(str(t + 1), 0) + n / total
    elif weighting == "turn":
        total = sum(len(d) for d in per_conv.values())
        for d in per_conv.values():
            for t in d:
                shares[str(t + 1)] = shares.get(str(t + 1), 0) + 1 / total
    else:
        for d in per_conv.values():
            conv = sum(d.values())
            for t, n in d.items():
                shares[str(t + 1)] = shares.get(str(t + 1), 0) + n / conv / len(per_conv)
    return shares


@pytest.mark.parametrize("weighting", ["token", "turn", "sample"])
def test_encode_report_shows_what_the_weighting_does(weighting, smollm2_path, tmp_path):
    from turntune.data import load_conversations
    from turntune.encoding import EncodeOptions, encode_conversations, resolve_template
    from turntune.models import load_tokenizer

    data = subset(tmp_path, "train", 20)
    code, out, err = run(["encode", str(data), "--model", str(smollm2_path), "--chat-template", str(CHATML_TOOLS),
                          "--weighting", weighting])
    assert code == 0, err
    tok = load_tokenizer(smollm2_path)
    exs = encode_conversations(load_conversations(data).conversations,
                               resolve_template(tok, "auto", CHATML_TOOLS.read_text()), EncodeOptions(max_length=1024))
    want = expected_shares(exs, weighting)
    lines = out.splitlines()
    at = lines.index(f"weighting {weighting}: share of the trained tokens -> share of the loss")
    got = {}
    for line in lines[at + 1:]:
        parts = line.split()
        if parts[:1] != ["reply"]:
            break
        assert parts[2].endswith("%") and parts[3] == "->" and parts[4].endswith("%")
        got[parts[1]] = float(parts[4][:-1])
    assert list(got) == sorted(want, key=int)
    for k, v in want.items():  # printed to 0.1%
        assert abs(got[k] - 100 * v) <= 0.05 + 1e-9, (k, got[k], 100 * v)
    if weighting != "token":  # the point of the view: it moves the loss away from the token shares
        token = expected_shares(exs, "token")
        assert any(abs(want[k] - token[k]) > 0.01 for k in want)
    kinds = [line.split()[0] for line in lines[at + 1:] if line.split()[:1] in (["answer"], ["tool_call"])]
    assert kinds == ["answer", "tool_call"]
