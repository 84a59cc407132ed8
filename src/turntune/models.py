"""Models and tokenizers: a local folder (Hugging Face layout), a built-in, or a Hub repo id.

A repo id (``Qwen/Qwen2.5-0.5B-Instruct``) resolves through ``huggingface_hub``: from its cache
when ``HF_HUB_OFFLINE=1``, downloaded into it otherwise. A local folder never touches the network.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from turntune.attention import register as register_attention
from turntune.errors import ConfigError

BUILTIN = ("builtin:smollm2", "builtin:tiny-glm4")
# Attention projections: the usual LoRA targets, named alike in Llama, Qwen2, GLM and GLM-4-0414.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# ``owner/name`` as the Hub spells it; anything else (``./x``, ``/x``, ``a/b/c``, ``~/x``) is a path.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What a model folder needs; the rest of a repo (pickled .bin, ONNX, GGUF copies) is not fetched.
_HUB_FILES = ("*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.py")


def is_repo_id(path: str) -> bool:
    """``owner/name`` that is not an existing local path: a Hugging Face Hub repo id.

    >>> is_repo_id("Qwen/Qwen2.5-0.5B-Instruct"), is_repo_id("./models/qwen"), is_repo_id("/models/qwen")
    (True, False, False)
    """
    return bool(_REPO_ID.fullmatch(path)) and ".." not in path and not Path(path).exists()


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of a Hub repo: the cached snapshot, downloaded first when online.

    ``huggingface_hub`` decides from the environment: with ``HF_HUB_OFFLINE=1`` it only looks in
    its cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``); otherwise it fetches what is
    missing (the model files only, see ``_HUB_FILES``). Every failure is a ConfigError.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"model.path: {repo_id!r} is not a local folder, so it was taken for a Hugging Face Hub repo id"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(_HUB_FILES)))
    except GatedRepoError:
        raise ConfigError(f"{where}; the repo is gated: accept its terms on huggingface.co and log in "
                          "(`hf auth login`), or give a local folder") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ConfigError(f"{where}, but the Hub has no such repo (or it is private: log in with "
                          "`hf auth login`); check the name, or give a local folder") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(f"{where}, but it is not in the Hub cache ({constants.HF_HUB_CACHE}) and "
                              "HF_HUB_OFFLINE=1 forbids downloading it: download it first (`hf download "
                              f"{repo_id}`), set HF_HUB_OFFLINE=0, or give a local folder") from None
        raise ConfigError(f"{where}, but the Hub could not be reached and it is not in the cache "
                          f"({constants.HF_HUB_CACHE}): check the network, or give a local folder") from None
    except (HfHubHTTPError, OSError, ValueError) as e:  # HTTP errors, a full disk, an invalid name
        raise ConfigError(f"{where}, and fetching it failed: {e}; give a local folder instead") from None


def resolve_path(path: str) -> Path:
    """A model folder: a local path, one of the built-in assets (built once, offline), or a Hub
    repo id (``owner/name``, see :func:`hub_snapshot`)."""
    from turntune import assets

    if path == "builtin:smollm2":
        return assets.smollm2_dir()
    if path == "builtin:tiny-glm4":
        return assets.tiny_glm4_example_dir()
    if path.startswith("builtin:"):
        raise ConfigError(f"model.path: unknown built-in {path!r}; built-ins: {', '.join(BUILTIN)}")
    if is_repo_id(path):
        path = str(hub_snapshot(path))  # an absolute folder in the Hub cache
    p = _expand(path)
    if not p.is_dir():
        raise ConfigError(f"model.path: {p} is not a folder. Give a local model folder in Hugging Face layout "
                          "(config.json, *.safetensors, tokenizer files), or a Hub repo id (owner/name)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path: {p} has no config.json; is it a Hugging Face model folder?")
    return p


def _expand(path: str) -> Path:
    """``~`` and ``~user`` expanded; a user the machine does not know is the setting's error."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib's "Could not determine home directory."
        user = path[1:].split("/", 1)[0]
        who = f"there is no user {user!r} whose home '~' could stand for" if user else "there is no home folder"
        raise ConfigError(f"model.path: {path}: {who} (write the folder's full path)") from None


# safetensors refuses headers above 100 MB; a length past that is damage, not a header to read.
_MAX_SAFETENSORS_HEADER = 100_000_000


def check_model_folder(path: str | Path) -> Path:
    """Refuse a model folder that loading would trip over late, in a few reads and no tensors.

    ``config.json`` (where the folder has one) must be a JSON object, and every ``*.safetensors``
    file must be whole: an 8-byte little-endian header length, a JSON header, then exactly the
    bytes its largest ``data_offsets`` end says. A copy cut short (a full disk, an interrupted
    download) is then named before the data is encoded, not after. Checks what is there: a missing
    folder or file is ``resolve_path``'s and the loaders' to report. Returns the folder.

    >>> check_model_folder("~/models/glm-4-9b-chat")  # doctest: +SKIP
    PosixPath('/home/me/models/glm-4-9b-chat')
    """
    if isinstance(path, str):  # a folder as given (a run's final/ adapter folder has no config.json)
        p = resolve_path(path) if path.startswith("builtin:") else _expand(path)
    else:
        p = path
    config = p / "config.json"
    if config.is_file():
        _check_config_json(config)
    for weights in sorted(p.glob("*.safetensors")):
        _check_safetensors(weights)
    return p


def _check_config_json(config: Path) -> None:
    try:
        value = json.loads(config.read_bytes())
    except OSError as e:
        raise ConfigError(f"model.path: cannot read {config}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, nested too deeply
        raise ConfigError(f"model.path: {config} is not valid JSON ({e}); is it a Hugging Face config.json?") from None
    if not isinstance(value, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
                type(None): "null"}[type(value)]
        raise ConfigError(f"model.path: {config} holds {kind}, not an object (a Hugging Face config.json is one "
                          "JSON object of settings)")


def _check_safetensors(weights: Path) -> None:
    again = "(copy the file again)"
    try:
        size = weights.stat().st_size
        with weights.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = f.read(n) if 0 <= n <= min(size - 8, _MAX_SAFETENSORS_HEADER) else b""
    except OSError as e:
        raise ConfigError(f"model.path: cannot read {weights}: {e.strerror or e}") from None
    if n < 0:
        raise ConfigError(f"model.path: {weights} is truncated: {size} bytes, not even the 8-byte header length {again}")
    if n > _MAX_SAFETENSORS_HEADER:
        raise ConfigError(f"model.path: {weights} is damaged: its header length ({n} bytes) is not one safetensors "
                          f"writes {again}")
    if 8 + n > size:
        raise ConfigError(f"model.path: {weights} is truncated: {size} bytes, its header alone needs {8 + n} {again}")
    try:
        entries = json.loads(header.decode("utf-8"))
        # every tensor's bytes lie at [begin, end) after the header; "__metadata__" holds strings
        end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        raise ConfigError(f"model.path: {weights} is damaged: its header is not a safetensors JSON header "
                          f"{again}") from None
    expected = 8 + n + end
    if size < expected:
        raise ConfigError(f"model.path: {weights} is truncated: {size} bytes, its header says {expected} {again}")
    if size > expected:
        raise ConfigError(f"model.path: {weights} has {size} bytes, its header says {expected}: it is damaged {again}")


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
    check_model_folder(p)  # eval, chat, merge: a damaged file is named, not a SafetensorError
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


# What a run's final/ folder holds besides the adapter: the tokenizer with the chat template it
# was trained with (``data.chat_template`` replaces the base's) and the generation config.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"


def merge_adapter(base: str, adapter: str | Path, out: str | Path) -> Path:
    """Fold a LoRA adapter into its base model and save a standalone folder (safetensors).

    The tokenizer, chat template and generation config are the adapter folder's, copied byte for
    byte: a run trained with its own template (``data.chat_template``) must be evaluated and served
    with it, not with the base model's; so is the template the run resolved (its ``turntune.json``
    record, without the base model), which ``chat``/``eval`` with ``--template auto`` then use. An adapter folder without tokenizer files (a plain PEFT
    adapter) gets the base model's.

    >>> merge_adapter("builtin:smollm2", "runs/smollm2-lora/final", "merged")  # doctest: +SKIP
    """
    from peft import PeftModel

    adapter = Path(adapter)
    model = load_model(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out = Path(out)
    merged.save_pretrained(out, safe_serialization=True)
    carried = [f for f in (*TOKENIZER_FILES, GENERATION_CONFIG) if (adapter / f).is_file()]
    if "tokenizer_config.json" in carried:
        # The base's tokenizer files are not written at all: a stale chat_template.jinja beside a
        # tokenizer_config.json that holds the template would win over it when loading.
        for f in TOKENIZER_FILES:
            (out / f).unlink(missing_ok=True)
    else:
        load_tokenizer(base).save_pretrained(out)
    for f in carried:
        shutil.copyfile(adapter / f, out / f)
    from turntune.recipes import RUN_META, saved_template

    record = saved_template(adapter)
    if record is not None:  # the template the run resolved (not its base model: this folder is whole)
        kept = {k: record[k] for k in ("template", "chat_template", "template_kwargs") if k in record}
        (out / RUN_META).write_text(json.dumps({**kept, "merged_from": str(adapter)}, indent=2) + "\n",
                                    encoding="utf-8")
    return out
