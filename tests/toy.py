"""A tokenizer whose ids can be computed by hand: one token per character.

ids 0..9 are GLM-4's special tokens (in SPECIALS order), then one id per printable ASCII
character and newline: ``id(c) = 10 + CHARS.index(c)``.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
            "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
SP = {t: i for i, t in enumerate(SPECIALS)}


def cid(text: str) -> list[int]:
    """Hand-computed ids of plain text."""
    return [10 + CHARS.index(c) for c in text]


def toy_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({c: 10 + i for i, c in enumerate(CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[MASK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="[MASK]")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    if chat_template:
        fast.chat_template = chat_template
    return fast
