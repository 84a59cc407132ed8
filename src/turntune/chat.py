"""Talk to a model turn by turn with the same template it was trained with."""
from __future__ import annotations

from pathlib import Path

import torch

from turntune.conversation import Conversation, Message


def load_for_chat(model_dir: str | Path, adapter: str | Path | None = None, *, trust_remote_code: bool = False,
                  dtype: str = "float32", attn_implementation: str = "sdpa_varlen"):
    """A model folder (or a trained run's ``final`` adapter folder with its base) ready to generate.

    The tokenizer comes from the adapter folder where it has one (a run's result carries the chat
    template it was trained with), else from the model.
    """
    from turntune.models import load_model, load_tokenizer, resolve_path
    from turntune.recipes import adapter_base, has_tokenizer, tokenizer_folder

    folder = Path(str(model_dir)).expanduser()
    base_name = adapter_base(folder) if adapter is None and folder.is_dir() else None
    if base_name is not None:  # a LoRA result (a run's final/ folder): the adapter, with its base named inside
        adapter, base = folder, resolve_path(base_name)
    else:
        base = resolve_path(str(model_dir))
    own = adapter is not None and has_tokenizer(Path(str(adapter)).expanduser())
    tokenizer = load_tokenizer(Path(str(adapter)).expanduser() if own else tokenizer_folder(base),
                               trust_remote_code=trust_remote_code)
    model = load_model(base, dtype=dtype, attn_implementation=attn_implementation,
                       trust_remote_code=trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, tokenizer


def chat_template_for(tokenizer, template: str = "auto", *folders: str | Path | None):
    """The template to chat with: ``template`` when it names one; for ``auto``, the one a run's
    result in ``folders`` (the adapter folder first) was trained with, else what ``auto`` makes of
    the tokenizer. A GLM-4 run trained with its own ``data.chat_template`` must chat with that
    template, not with the native format its tokenizer would get."""
    from turntune.encoding import resolve_template
    from turntune.recipes import saved_template, template_from_record

    if template == "auto":
        for folder in folders:
            if folder is None:
                continue
            record = saved_template(Path(str(folder)).expanduser())
            if record is not None:
                return template_from_record(tokenizer, record)
    return resolve_template(tokenizer, template)


@torch.no_grad()
def reply(model, template, conversation: Conversation, *, max_new_tokens: int = 128) -> str:
    """Greedy reply to the conversation so far; stops on the template's stop tokens."""
    ids = torch.tensor([template.generation_prompt(conversation)])
    stops = template.stop_ids()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stops, pad_token_id=stops[0], use_cache=True)
    new = out[0, ids.shape[1]:].tolist()
    while new and new[-1] in stops:
        new.pop()
    return template.tokenizer.decode(new, skip_special_tokens=True).strip()


def chat_loop(model, template, *, system: str | None = None, inputs=None, echo=print) -> list[Message]:
    """Read user lines (``inputs`` or stdin) and print replies until EOF or /exit."""
    msgs: list[Message] = [Message("system", system)] if system else []
    lines = iter(inputs) if inputs is not None else None
    while True:
        try:
            text = next(lines) if lines is not None else input("you> ")
        except (EOFError, StopIteration):
            break
        if text.strip() in ("/exit", "/quit"):
            break
        if lines is not None:
            echo(f"you> {text}")
        msgs.append(Message("user", text))
        answer = reply(model, template, Conversation(tuple(msgs)))
        echo(f"assistant> {answer}")
        msgs.append(Message("assistant", answer))
    return msgs
