"""Fit a generator's label head (``models.label_head``) on clean rows of a label task.

    train = encode_sft(gen.tokenizer, data.split("train"), max_length=80)
    info = refit_label_head(gen, train, num_labels=len(data.label_words), l2=1e-3, dev=dev_encoded)

The features are the inputs of the output layer at the position that emits the first answer token
(captured with a hook, so they are exactly what the layer reads, final norm included), for every
clean train row; the classes are the rows' labels; the fit is ``training.logistic.fit_logistic``
from zero. Only the label words' first tokens change, and only how the model splits its label
probability between them. No trigger, no test row: the clean train rows fit it, the clean dev rows
score it (first-token accuracy before and after, and the mean cross-entropy of the split).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from kdshield.data.batching import Encoded, collate, epoch_batches
from kdshield.errors import ConfigError
from kdshield.models import label_head
from kdshield.models.generator import IGNORE_INDEX
from kdshield.training.logistic import accuracy, fit_logistic

log = logging.getLogger(__name__)


def first_answer_tokens(encoded: Encoded, num_labels: int) -> list[int]:
    """Each label's first answer token, read off the encoded rows; a ConfigError when a label's rows
    start with different tokens or two labels share one (the split would then be undefined)."""
    seen: dict[int, Counter] = {}
    for y, labels in zip(encoded.labels, encoded.token_labels or []):
        first = next((t for t in labels if t != IGNORE_INDEX), None)
        if first is not None:
            seen.setdefault(int(y), Counter())[int(first)] += 1
    missing = [c for c in range(num_labels) if c not in seen]
    if missing:
        raise ConfigError(f"label refit: no train row answers with label(s) {missing}; every label word needs rows")
    mixed = {c: dict(n) for c, n in seen.items() if len(n) > 1}
    if mixed:
        raise ConfigError(f"label refit: a label's answers start with different tokens ({mixed}, label: token id "
                          "-> rows); the label words must tokenise the same way in every row")
    tokens = [next(iter(seen[c])) for c in range(num_labels)]
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"label refit: label words share their first token ({tokens}); pick label words "
                          "whose first tokens differ")
    return tokens


@torch.no_grad()
def answer_features(gen, encoded: Encoded, *, batch_size: int = 16) -> torch.Tensor:
    """``[N, H]``: the output layer's input at each row's first answer position, in row order."""
    layer = label_head.output_layer(gen.model)
    grabbed: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, args, _out: grabbed.append(args[0].detach().float().cpu()))
    was_training = gen.training
    gen.eval()
    device = next(gen.parameters()).device
    out = torch.empty(len(encoded), gen.hidden_size)
    try:
        for indices in epoch_batches(encoded.lengths(), batch_size, 0, 0, shuffle=False):
            batch = {k: v.to(device) for k, v in collate(encoded, indices).items()}
            labels = batch["labels"]
            first = (labels != IGNORE_INDEX).long().argmax(dim=1)
            only_first = torch.full_like(labels, IGNORE_INDEX)  # one logit row per example: the first answer token
            rows = torch.arange(len(labels), device=labels.device)
            only_first[rows, first] = labels[rows, first]
            grabbed.clear()
            gen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch.get("position_ids"), labels=only_first)
            h = grabbed[-1].reshape(-1, gen.hidden_size)
            if h.shape[0] != len(indices):
                raise RuntimeError(f"label refit: the output layer saw {h.shape[0]} positions for {len(indices)} rows")
            out[torch.as_tensor(indices)] = h
    finally:
        hook.remove()
        gen.train(was_training)
    return out


def _split_scores(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict:
    logp = torch.log_softmax(x.double() @ weight.double().T + bias.double(), dim=1)
    return {"acc": accuracy(x, y, weight, bias),
            "nll": round(float(-logp[torch.arange(len(y)), y.long()].mean()), 4)}


def refit_label_head(gen, train: Encoded, *, num_labels: int, l2: float, dev: Encoded | None = None,
                     batch_size: int = 16) -> dict:
    """Fit and install ``gen``'s label head on the clean ``train`` rows (module doc); returns what
    the record keeps: the tokens, the fit, and first-token accuracy on train / dev before and after."""
    tokens = first_answer_tokens(train, num_labels)
    x = answer_features(gen, train, batch_size=batch_size)
    y = torch.as_tensor(train.labels)
    lm_rows = label_head.output_layer(gen.model).weight
    old_w = lm_rows[torch.as_tensor(tokens, device=lm_rows.device)].detach().float().cpu()
    old_b = torch.zeros(num_labels)
    x_dev = answer_features(gen, dev, batch_size=batch_size) if dev is not None and len(dev) else None
    y_dev = torch.as_tensor(dev.labels) if x_dev is not None else None
    weight, bias, objective = fit_logistic(x, y, num_labels, l2)
    info = {"token_ids": tokens, "l2": l2, "n": len(y), "objective": round(objective, 5),
            "train_before": _split_scores(x, y, old_w, old_b), "train_after": _split_scores(x, y, weight, bias)}
    if x_dev is not None:
        info["dev_before"] = _split_scores(x_dev, y_dev, old_w, old_b)
        info["dev_after"] = _split_scores(x_dev, y_dev, weight, bias)
    label_head.install(gen.model, tokens, weight.float(), bias.float())
    log.info("label refit: first-answer-token accuracy on the train rows %.3f -> %.3f%s", info["train_before"]["acc"],
             info["train_after"]["acc"], f", dev {info['dev_before']['acc']:.3f} -> {info['dev_after']['acc']:.3f}"
             if x_dev is not None else "")
    return info
