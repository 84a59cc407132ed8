"""Models and tokenizers from local folders (Hugging Face layout). Nothing is fetched from a hub."""
from __future__ import annotations

from pathlib import Path

import torch

from turntune.attention import register as register_attention
from turntune.errors import ConfigError

BUILTIN = ("builtin:smollm2", "builtin:tiny-glm4")
# Attention projections: the usual LoRA targets, named alike in Llama, Qwen2, GLM and GLM-4-0414.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def resolve_path(path: str) -> Path:
    """A model folder: a local path, or one of the built-in assets (built once, offline)."""
    from turntune import assets

    if path == "builtin:smollm2":
        return assets.smollm2_dir()
    if path == "builtin:tiny-glm4":
        return assets.tiny_glm4_example_dir()
    if path.startswith("builtin:"):
        raise ConfigError(f"model.path: unknown built-in {path!r}; built-ins: {', '.join(BUILTIN)}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"model.path: {p} is not a folder. Give a local model folder in Hugging Face layout "
                          "(config.json, *.safetensors, tokenizer files); nothing is downloaded at run time")
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path: {p} has no config.json; is it a Hugging Face model folder?")
    return p


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    p = resolve_path(str(path)) if isinstance(path, str) else path
    try:
        tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise ConfigError(f"model.path: the tokenizer in {p} needs code from the folder itself; set "
                              "model.trust_remote_code=true only if you trust it") from None
        raise ConfigError(f"model.path: cannot load a tokenizer from {p}: {e}") from None
    if tok.pad_token_id is None:  # padding only fills positions that are masked and unlabelled
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, *, dtype: str = "float32", attn_implementation: str = "sdpa_varlen",
               trust_remote_code: bool = False):
    """A causal LM from a local folder; weights only from safetensors (no pickle is ever loaded)."""
    from transformers import AutoModelForCausalLM

    p = resolve_path(str(path)) if isinstance(path, str) else path
    if not any(p.glob("*.safetensors")):
        raise ConfigError(f"model.path: {p} has no *.safetensors weights; turntune does not load pickled "
                          "checkpoints (convert them with safetensors first)")
    register_attention()  # turntune's "sdpa_varlen"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=getattr(torch, dtype), attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code, use_safetensors=True)
    except ImportError as e:  # flash_attention_2 without the flash-attn package, or without a GPU
        raise ConfigError(f"model.attn_implementation={attn_implementation}: not available here ({e}); "
                          "use sdpa_varlen (or sdpa)") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ConfigError(f"model.path: {p} needs code from the folder itself; set model.trust_remote_code=true "
                              "only if you trust it") from None
        raise ConfigError(f"model.path: cannot load a model from {p}: {e}") from None
    model.config.use_cache = False  # training; packing is only exact without the cache (DESIGN.md §4)
    return model


def lora_targets(model, wanted: tuple[str, ...] = ()) -> list[str]:
    """Module names to adapt: ``wanted``, else the attention projections the model has."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if wanted:
        missing = [w for w in wanted if w not in names]
        if missing:
            raise ConfigError(f"lora.target_modules: {missing} not in the model; its linear layers: "
                              f"{', '.join(sorted(names))}")
        return list(wanted)
    found = [n for n in ATTENTION_PROJECTIONS if n in names]
    if not found:
        raise ConfigError("lora.target_modules: this architecture has no q_proj/k_proj/v_proj/o_proj; name "
                          f"its modules explicitly (linear layers: {', '.join(sorted(names))})")
    return found


def add_lora(model, r: int, alpha: int, dropout: float, targets: tuple[str, ...] = ()):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_targets(model, targets),
                     task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, cfg)


def merge_adapter(base: str, adapter: str | Path, out: str | Path) -> Path:
    """Fold a LoRA adapter into its base model and save a standalone folder (safetensors)."""
    from peft import PeftModel

    model = load_model(base)
    tok = load_tokenizer(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out = Path(out)
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
