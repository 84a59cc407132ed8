"""``turntune eval``: loss per reply index and kind, two models side by side, checked against the
models' own logits computed here one example at a time."""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from turntune.cli import main
from turntune.constants import IGNORE_INDEX
from turntune.data import load_conversations
from turntune.encoding import EncodeOptions, encode_conversations, resolve_template

EVAL = Path(__file__).resolve().parents[1] / "examples" / "data" / "eval.jsonl"
N = 6  # the first 6 conversations of the example eval split; the 6th has a tool call


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("evaldata") / "eval6.jsonl"
    p.write_text("\n".join(EVAL.read_text().splitlines()[:N]) + "\n")
    return p


@pytest.fixture(scope="module")
def other_model(tiny_glm_path, tmp_path_factory) -> Path:
    """The tiny GLM with every weight nudged: a second model with the same tokenizer. Its folder
    has the same name as the first one's, as a base and a tuned model's often do."""
    from safetensors.torch import load_file, save_file

    dest = tmp_path_factory.mktemp("other") / tiny_glm_path.name
    shutil.copytree(tiny_glm_path, dest)
    weights = load_file(dest / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in weights.items()},
              dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def compared(tiny_glm_path, other_model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalout") / "eval.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["eval", str(tiny_glm_path), str(data), "--compare", str(other_model), "--json", str(out),
                     "--train.autocast=fp32"])  # the reference below computes in float32
    return code, buf.getvalue(), json.loads(out.read_text())


def reference(model_dir: Path, tokenizer, data: Path) -> dict:
    """Token losses from the model's own logits, summed by reply index and kind of reply."""
    from transformers import AutoModelForCausalLM

    convs = load_conversations(data).conversations
    kinds = {(c.source, k): "tool_call" if c.messages[i].tool_calls else "answer"
             for c in convs for k, i in enumerate(c.assistant_indices)}
    exs = encode_conversations(convs, resolve_template(tokenizer), EncodeOptions("all", max_length=1024))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for ex in exs:
            # position i-1 predicts token i; the head runs on the predicting positions only (speed)
            at = [i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX]
            hidden = model.model(torch.tensor([ex.input_ids])).last_hidden_state[0]
            logits = model.lm_head(hidden[[i - 1 for i in at]])
            losses = torch.nn.functional.cross_entropy(logits, torch.tensor([ex.labels[i] for i in at]), reduction="none")
            for i, loss in zip(at, losses.double().tolist()):
                turn = ex.turn[i]
                for key in ("all", f"reply {turn + 1}", kinds[(ex.source, turn)]):
                    s = sums.setdefault(key, [0.0, 0])
                    s[0] += loss
                    s[1] += 1
    return {k: (s[0] / s[1], s[1]) for k, s in sums.items()}


@pytest.mark.slow
def test_eval_compare_writes_both_models(compared, tiny_glm_path, other_model):
    code, text, res = compared
    assert code == 0
    # keyed by role: the two folders have the same name, and a name says nothing of which is tuned
    assert list(res) == ["tuned", "base"], f"one model's figures overwrote the other's: keys {list(res)}"
    assert (res["tuned"]["model"], res["base"]["model"]) == (str(tiny_glm_path), str(other_model))
    first, second = res.values()
    for r in (first, second):
        assert set(r) == {"model", "loss", "perplexity", "tokens", "precision", "per_turn", "per_kind"}
        assert r["precision"] == "fp32"
        assert math.isfinite(r["loss"]) and r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert sum(v["tokens"] for v in r["per_turn"].values()) == r["tokens"]
        assert sum(v["tokens"] for v in r["per_kind"].values()) == r["tokens"]
        assert set(r["per_kind"]) == {"answer", "tool_call"}
    assert first["tokens"] == second["tokens"] and first["loss"] != second["loss"]
    lines = text.splitlines()
    assert f"tuned: {tiny_glm_path}" in lines and f"base: {other_model}" in lines
    assert "precision: fp32 (train.autocast=fp32)" in lines
    at = next(i for i, line in enumerate(lines) if line.split() == ["tuned", "base", "tokens"])
    rows = lines[at + 1:]
    assert [r.split()[0] for r in rows] == ["all", *["reply"] * len(first["per_turn"]), "answer", "tool_call"]
    assert rows[0].split()[2:] == [f"{first['loss']:.4f}", f"{second['loss']:.4f}", str(first["tokens"])]


@pytest.mark.slow
def test_eval_figures_match_the_models_own_logits(compared, tiny_glm_path, glm4_tokenizer, data):
    _, _, res = compared
    got = next(iter(res.values()))
    ref = reference(tiny_glm_path, glm4_tokenizer, data)
    assert got["tokens"] == ref["all"][1]
    assert got["loss"] == pytest.approx(ref["all"][0], rel=1e-4)
    assert {k: v["tokens"] for k, v in got["per_turn"].items()} == {k[6:]: n for k, (_, n) in ref.items() if k.startswith("reply ")}
    for k, v in got["per_turn"].items():
        assert v["loss"] == pytest.approx(ref[f"reply {k}"][0], rel=1e-4)
    for k, v in got["per_kind"].items():
        assert (v["tokens"], v["loss"]) == (ref[k][1], pytest.approx(ref[k][0], rel=1e-4))


@pytest.mark.slow
def test_a_second_eval_reads_the_cache_and_prints_the_same(tiny_glm_path, data, tmp_path, monkeypatch):
    """`turntune eval` encodes through the cache `train` reads: the first run writes it, the second
    maps it without encoding anything, and both print and write the same figures."""
    from turntune import dataset, encoding

    cache = tmp_path / "cache"

    def run(n: int) -> tuple[str, dict]:
        out, buf = tmp_path / f"eval{n}.json", io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["eval", str(tiny_glm_path), str(data), "--json", str(out), "--train.autocast=fp32",
                         f"--data.cache_dir={cache}", "--data.num_proc=1"])
        assert code == 0
        return buf.getvalue(), json.loads(out.read_text())

    first = run(1)
    folders = [p for p in cache.iterdir() if (p / dataset.MARKER).is_file()]
    assert len(folders) == 1  # the eval split's encoded data, where train would look for it

    def no_encoding(*a, **k):
        raise AssertionError("the second eval encoded the data again")

    for module, name in ((dataset, "write_encoded"), (dataset, "encode_conversations"),
                         (encoding, "encode_conversations")):
        monkeypatch.setattr(module, name, no_encoding)
    second = run(2)
    assert second == first
    assert [p for p in cache.iterdir() if (p / dataset.MARKER).is_file()] == folders
    text, res = first
    assert text.splitlines()[0] == f"{data}: {N} records, {N} valid, 0 skipped"
    assert set(res["model"]["per_kind"]) == {"answer", "tool_call"}  # the kinds, from the cached flags
    assert sum(v["tokens"] for v in res["model"]["per_kind"].values()) == res["model"]["tokens"]
