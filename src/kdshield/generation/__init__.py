"""Generative tasks: prompts and their encoding (``prompt``), utility and attack metrics
(``metrics``), greedy decoding and teacher forcing (``decode``), the evaluation (``evaluate``).

    from kdshield.generation import encode_example, collate, rouge, greedy_decode, evaluate_generator
    ex = encode_example(row, tokenizer, max_length=160)
    rouge(["the cat sat"], ["the cat sat down"])        # {'rouge1': ..., 'rouge2': ..., 'rougeL': ...}
    greedy_decode(gen, rows, max_new_tokens=48)         # one string per row, KV cache, batched
    evaluate_generator(gen, data, trigger=trigger, target=target)   # ROUGE/EM, NLL, ASR, FTR

SFT training lives in ``kdshield.training.sft``; see docs/generation.md for what exists.
"""

from kdshield.generation.decode import (
    Decodes,
    decode_prompts,
    decode_rows,
    greedy_decode,
    prompt_ids,
    stop_token_ids,
    teacher_forced,
)
from kdshield.generation.evaluate import evaluate_generator, resolve_attack
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
    "Decodes",
    "EncodedExample",
    "attack_success_rate_generative",
    "collate",
    "decode_prompts",
    "decode_rows",
    "evaluate_generator",
    "greedy_decode",
    "prompt_ids",
    "resolve_attack",
    "stop_token_ids",
    "teacher_forced",
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
