"""Generative tasks: prompts and their encoding (``prompt``), utility and attack metrics (``metrics``).

    from kdshield.generation import encode_example, collate, rouge, exact_match
    ex = encode_example(row, tokenizer, max_length=160)
    rouge(["the cat sat"], ["the cat sat down"])        # {'rouge1': ..., 'rouge2': ..., 'rougeL': ...}

No training or decoding lives here yet (see docs/generation.md for what exists).
"""

from kdshield.generation.metrics import (
    attack_success_rate_generative,
    exact_match,
    false_trigger_rate,
    lcs_length,
    rouge,
    rouge_l,
    rouge_n,
    target_hits,
    words,
)
from kdshield.generation.prompt import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    EncodedExample,
    collate,
    encode_example,
    encode_prompt,
    fit_inputs,
    fit_prompt,
    pad_sequences,
    render_prompt,
    user_content,
)

__all__ = [
    "IGNORE_INDEX",
    "PLAIN_TEMPLATE",
    "EncodedExample",
    "attack_success_rate_generative",
    "collate",
    "encode_example",
    "encode_prompt",
    "exact_match",
    "false_trigger_rate",
    "fit_inputs",
    "fit_prompt",
    "lcs_length",
    "pad_sequences",
    "render_prompt",
    "rouge",
    "rouge_l",
    "rouge_n",
    "target_hits",
    "user_content",
    "words",
]
