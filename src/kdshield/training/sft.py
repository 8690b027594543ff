"""Supervised fine-tuning of a causal LM on SFT rows (loss on response tokens only), on the one loop.

    from kdshield.data.sft import load_sft
    data = load_sft("bbc-lead", n_train=500, n_test=100, seed=0)
    victim, result = sft_finetune("smollm2-135m", data, AdapterConfig(kind="lora"),
                                  TrainConfig(max_length=160, batch_size=8), output_dir="runs/sft/train")
    victim.save("runs/sft/model")                      # adapter/ + kdshield.json

The generative victim (LoRA / prompt tuning / p-tuning on clean rows) and, with ``kind="full"``,
the attacker's full SFT. Rows are encoded once by ``generation.prompt.encode_example`` (the input
field is cut to fit ``max_length``; labels -100 on the prompt); the loop sees them as an
``Encoded`` with token labels. The loss is the response CE, token mean over the batch, computed
on the lean logits (only the positions that predict a response token). Dev evaluation is the
teacher-forced response NLL (``score = -nll``: higher is better, as the loop selects).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from datasets import Dataset

from kdshield.config import config_to_dict
from kdshield.data.batching import Encoded, collate, epoch_batches
from kdshield.data.core import rows_digest
from kdshield.data.sft import SFTData
from kdshield.generation.prompt import encode_example
from kdshield.models.adapters import AdapterConfig
from kdshield.models.generator import Generator, attach_generator_adapter, load_generator
from kdshield.models.loading import LoadOptions
from kdshield.training.loop import EvalFn, TrainConfig, TrainResult, train

log = logging.getLogger(__name__)

ROW_COLUMNS = ("system", "history", "instruction", "input", "output")


def encode_sft(tokenizer, ds: Dataset, *, max_length: int, max_response_tokens: int | None = None,
               padding_side: str = "right") -> Encoded:
    """Every row of ``ds`` encoded once (prompt + response + EOS, labels on the response only);
    ``Encoded.labels`` holds a label task's class (``label``), else 0."""
    examples = [encode_example(row, tokenizer, max_length=max_length, max_response_tokens=max_response_tokens)
                for row in ds]
    cut = sum(e.input_tokens_cut > 0 for e in examples)
    capped = sum(e.response_cut for e in examples)
    if cut or capped:
        log.info("encode_sft: %d of %d rows had their input cut to fit max_length=%d, %d responses were capped",
                 cut, len(examples), max_length, capped)
    labels = [int(y) for y in ds["label"]] if "label" in ds.column_names else [0] * len(examples)
    return Encoded(input_ids=[e.input_ids for e in examples], labels=labels, pad_id=tokenizer.pad_token_id,
                   padding_side=padding_side, token_labels=[e.labels for e in examples])


def sft_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Response CE, token mean over the batch (``response_ce``), from the lean logits."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch.get("position_ids"), labels=batch["labels"])
    nll, count = out.token_nll()
    loss = nll.sum() / count.sum().clamp(min=1)
    return loss, {"ce": loss.detach()}


@torch.no_grad()
def response_nll(gen: Generator, encoded: Encoded, *, batch_size: int = 16) -> dict:
    """Teacher-forced NLL of the responses: ``nll`` (token mean, as the loss), ``nll_per_row`` (mean of
    each row's token mean), ``tokens``. Runs in eval mode; the caller's mode is restored."""
    was_training = gen.training
    gen.eval()
    device = next(gen.parameters()).device
    total, tokens, row_means = 0.0, 0, []
    for indices in epoch_batches(encoded.lengths(), batch_size, 0, 0, shuffle=False):
        batch = {k: v.to(device) for k, v in collate(encoded, indices).items()}
        nll, count = gen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"], labels=batch["labels"]).token_nll()
        total += float(nll.sum())
        tokens += int(count.sum())
        row_means += (nll / count.clamp(min=1)).tolist()
    gen.train(was_training)
    nll = total / max(1, tokens)
    return {"nll": nll, "nll_per_row": sum(row_means) / max(1, len(row_means)), "tokens": tokens}


def dev_nll_eval_fn(ds: Dataset, *, max_length: int, max_response_tokens: int | None = None,
                    batch_size: int = 16) -> EvalFn:
    """An ``eval_fn`` for ``train``: ``{"score": -nll, "nll": ..., ...}`` on ``ds`` (encoded once,
    with the tokenizer of the first model it sees)."""
    cache: dict[int, Encoded] = {}

    def evaluate(gen: Generator) -> dict:
        key = id(gen.tokenizer)
        if key not in cache:
            cache[key] = encode_sft(gen.tokenizer, ds, max_length=max_length,
                                    max_response_tokens=max_response_tokens)
        metrics = response_nll(gen, cache[key], batch_size=batch_size)
        return {"score": -metrics["nll"], **metrics}

    return evaluate


def sft_finetune(model: str | Path | Generator, data: SFTData, adapter: AdapterConfig, train_cfg: TrainConfig, *,
                 split: str = "train", output_dir: str | Path | None = None, resume: bool = False,
                 eval_fn: EvalFn | None = None, run_settings: dict | None = None,
                 dtype: torch.dtype = torch.float32, options: LoadOptions = LoadOptions(),
                 max_response_tokens: int | None = None, desc: str = "sft") -> tuple[Generator, TrainResult]:
    """SFT of ``model`` (a reference to load, or a Generator) with ``adapter`` on ``data.split(split)``.

    Dev evaluation: ``eval_fn``, else the response NLL on the ``dev`` split when there is one
    (every epoch with ``select_best``, else the last only). A checkpoint in ``output_dir`` resumes
    only for the same model, adapter, data and ``run_settings``, besides the loop's own checks
    (the encoded training rows, token labels included).
    """
    torch.manual_seed(train_cfg.seed)  # adapter initialisation (LoRA A, prompt embeddings)
    gen = model if isinstance(model, Generator) else load_generator(model, options=options, dtype=dtype)
    if gen.adapter_spec is None:
        attach_generator_adapter(gen, adapter)
    encoded = encode_sft(gen.tokenizer, data.split(split), max_length=train_cfg.max_length,
                         max_response_tokens=max_response_tokens)
    dev = data.splits.get("dev")
    if eval_fn is None and dev is not None and len(dev):
        eval_fn = dev_nll_eval_fn(dev, max_length=train_cfg.max_length, max_response_tokens=max_response_tokens,
                                  batch_size=train_cfg.batch_size)
    settings = {"model": gen.source if isinstance(model, Generator) else str(model),
                "adapter": config_to_dict(adapter),
                "sft_data": {"name": data.name, "split": split, "max_response_tokens": max_response_tokens,
                         "dev": rows_digest(dev, ROW_COLUMNS) if dev is not None else None},
                **(run_settings or {})}
    result = train(gen, None, train_cfg, encoded=encoded, loss_fn=sft_loss, eval_fn=eval_fn,
                   output_dir=output_dir, resume=resume, desc=desc, run_settings=settings,
                   eval_epochs="all" if train_cfg.select_best else "last")
    return gen, result
