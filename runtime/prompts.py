"""From text prompts to the left-padded ``input_ids`` / ``attention_mask`` the decode loop takes.

Chat models (a tokenizer with a chat template) get the template applied with a generation prompt.

Example::

    ids, mask = encode_prompts(tokenizer, ["What is the capital of France?"])
    out = opt.generate(ids, attention_mask=mask, max_new_tokens=32)
    print(decode_new_tokens(tokenizer, out, ids.shape[1])[0])
"""

from __future__ import annotations

import torch

from tokopt.errors import PromptError


def encode_prompts(tokenizer, prompts, chat: bool | None = None):
    """Tokenize prompts (chat template applied when the tokenizer has one, unless ``chat=False``)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise PromptError("empty prompt: give at least one non-blank prompt text")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    rows = []
    for text in prompts:
        if use_chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        rows.append(list(ids))
    return left_pad(rows, pad_id=_pad_id(tokenizer))


def left_pad(rows, pad_id: int):
    """Lists of ids -> (``[B, T]`` ids, ``[B, T]`` mask), padded on the left as decoder-only models need."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def decode_new_tokens(tokenizer, sequences, prompt_len: int):
    """The generated text of each row (special tokens such as EOS and padding removed)."""
    return [tokenizer.decode(row[prompt_len:], skip_special_tokens=True) for row in sequences]


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
