"""Fine-pruning (Liu et al. 2018): prune MLP neurons dormant on clean data, then fine-tune.

    kdshield defend --method fine-pruning --student runs/poisoned/model --data rotten-tomatoes \
        --fine-pruning.rate 0.2 --fine-pruning.layers 1

The idea: a backdoor needs neurons that only the trigger activates; on clean inputs they sit idle.
We record the mean absolute activation of every MLP neuron (the input of the MLP's output
projection) over the non-pad tokens of clean training samples, zero the ``rate`` least active
neurons of each of the last ``layers`` transformer layers, and then train the shared adapter on
clean data (the plain PEFT row, on the pruned model).

Defaults and why: ``layers=1`` follows Liu et al., who prune the last convolutional layer, and the
DESIGN ("prune last-layer MLP neurons"); ``rate=0.2`` is a fixed share that costs one pass over a
few hundred clean samples. Liu et al. instead prune in increasing order until clean validation
accuracy drops by more than 4%; ``max_acc_drop=0.04`` reproduces that rule (``rate`` then caps the
search). Pruning is per layer, so differently scaled layers do not compete for one budget.

A pruned neuron is one whose input rows (Llama ``gate_proj``/``up_proj``, BERT
``intermediate.dense``, GPT-2 ``c_fc``) and output column (``down_proj``, ``output.dense``,
``c_proj``) are zero. It stays pruned during training: a forward pre-hook multiplies the output
projection's input by the keep mask, so neither the forward pass nor any gradient (full
fine-tuning or a LoRA on the MLP) can revive it, and the LoRA factors touching pruned neurons are
zeroed so a merged adapter keeps them at zero too. With peft's default LoRA targets (attention
only) the MLP weights are frozen anyway.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from kdshield.config import cfg_field, check_range, config_to_dict
from kdshield.data.batching import collate, encode_dataset, epoch_batches
from kdshield.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult, Timer, finish
from kdshield.defenses.fine_tuning import keep_edited, load_suspect
from kdshield.defenses.lora import train_victim
from kdshield.errors import ConfigError
from kdshield.evaluation import evaluate_model
from kdshield.models.adapters import attach_adapter
from kdshield.models.classifier import Classifier

log = logging.getLogger(__name__)

# MLP layouts: (family, modules whose output units are the neurons, module whose input units are,
# weights stored transposed as in GPT-2's Conv1D). Matched by structure, not by model_type, so
# Llama, Mistral, Qwen2, Gemma (gated) and BERT, RoBERTa, ELECTRA (BERT-style) all work.
MLP_LAYOUTS: tuple[tuple[str, tuple[str, ...], str, bool], ...] = (
    ("gated", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", False),
    ("bert", ("intermediate.dense",), "output.dense", False),
    ("gpt2", ("mlp.c_fc",), "mlp.c_proj", True),
)


@dataclass
class MLPBlock:
    """The MLP of one transformer layer: ``inputs`` produce the neurons, ``output`` reads them."""

    layer: int
    family: str
    inputs: list[nn.Module]
    output: nn.Module
    transposed: bool

    @property
    def width(self) -> int:
        w = _weight_of(self.output)
        return w.shape[0] if self.transposed else w.shape[1]


def _weight_of(module: nn.Module) -> torch.Tensor:
    # peft wraps a targeted layer; its frozen original sits in ``base_layer``
    return getattr(module, "base_layer", module).weight


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _match(layer: nn.Module):
    for family, ins, out, transposed in MLP_LAYOUTS:
        mods = [_get(layer, p) for p in ins]
        out_mod = _get(layer, out)
        if out_mod is not None and all(m is not None for m in mods):
            return family, mods, out_mod, transposed
    return None


def find_mlp_blocks(model: nn.Module) -> list[MLPBlock]:
    """The MLP of every transformer layer, in depth order; ConfigError for unknown layouts."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for _name, mod in base.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and _match(mod[0]) is not None:
            blocks = []
            for i, layer in enumerate(mod):
                family, ins, out, transposed = _match(layer)
                blocks.append(MLPBlock(i, family, ins, out, transposed))
            return blocks
    model_type = getattr(getattr(base, "config", None), "model_type", type(base).__name__)
    raise ConfigError(
        f"fine-pruning does not know the MLP layout of {model_type!r}. Supported: gated MLPs "
        "(mlp.gate_proj/up_proj/down_proj: Llama, Mistral, Qwen2, Gemma), BERT-style "
        "(intermediate.dense/output.dense) and GPT-2 (mlp.c_fc/c_proj); add a layout to "
        "kdshield.defenses.fine_pruning.MLP_LAYOUTS for others"
    )


def last_blocks(model: nn.Module, n_layers: int) -> list[MLPBlock]:
    blocks = find_mlp_blocks(model)
    if n_layers > len(blocks):
        raise ConfigError(f"fine-pruning.layers={n_layers} but the model has {len(blocks)} layers")
    return blocks[len(blocks) - n_layers :]


@torch.no_grad()
def neuron_activity(
    clf: Classifier,
    texts: Sequence[str],
    blocks: Sequence[MLPBlock],
    *,
    batch_size: int = 32,
    max_length: int = 64,
) -> list[torch.Tensor]:
    """Mean absolute activation of each MLP neuron over the non-pad tokens of ``texts``.

    Absolute, because SwiGLU/GELU neurons also fire negatively; "dormant" means near zero.
    """
    enc = encode_dataset(clf.tokenizer, Dataset.from_dict({"text": list(texts)}), max_length)
    batches = epoch_batches(enc.lengths(), batch_size, 0, 0, shuffle=False)
    sums = [torch.zeros(b.width, dtype=torch.float64) for b in blocks]
    state: dict[str, torch.Tensor] = {}

    def make_hook(i: int):
        def hook(_module, args):
            x, mask = args[0], state["mask"]
            if x.shape[1] != mask.shape[1]:  # prompt learning prepends always-attended tokens
                extra = mask.new_ones(mask.shape[0], x.shape[1] - mask.shape[1])
                mask = torch.cat([extra, mask], dim=1)
            sums[i] += (x.float().abs() * mask[..., None]).sum(dim=(0, 1)).double().cpu()

        return hook

    handles = [b.output.register_forward_pre_hook(make_hook(i)) for i, b in enumerate(blocks)]
    device = next(clf.parameters()).device
    tokens = 0.0
    was_training = clf.training
    clf.eval()
    try:
        for idx in tqdm(batches, desc="neuron activity", mininterval=5):
            batch = collate(enc, idx)
            state["mask"] = batch["attention_mask"].to(device).float()
            clf(input_ids=batch["input_ids"].to(device), attention_mask=state["mask"].long())
            tokens += float(batch["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
        clf.train(was_training)
    return [(s / max(tokens, 1.0)).float() for s in sums]


def select_dormant(activity: Sequence[torch.Tensor], rate: float) -> list[torch.Tensor]:
    """Per layer, a bool mask of the ``round(rate * width)`` least active neurons.

    Ties go to the lower index (a stable sort), so the choice is deterministic.
    """
    masks = []
    for act in activity:
        n = int(rate * act.numel() + 0.5)
        pruned = torch.zeros(act.numel(), dtype=torch.bool)
        pruned[torch.argsort(act, stable=True)[:n]] = True
        masks.append(pruned)
    return masks


@torch.no_grad()
def prune_mlp_neurons(blocks: Sequence[MLPBlock], pruned: Sequence[torch.Tensor]) -> int:
    """Zero the weights of the pruned neurons in place; returns how many neurons were pruned."""
    for block, mask in zip(blocks, pruned, strict=True):
        for mod in block.inputs:
            base = getattr(mod, "base_layer", mod)
            m = mask.to(base.weight.device)
            if block.transposed:
                base.weight[:, m] = 0
            else:
                base.weight[m, :] = 0
            if getattr(base, "bias", None) is not None:
                base.bias[m] = 0
        w = _weight_of(block.output)
        m = mask.to(w.device)
        if block.transposed:
            w[m, :] = 0
        else:
            w[:, m] = 0
    return int(sum(int(m.sum()) for m in pruned))


def mask_hooks(blocks: Sequence[MLPBlock], pruned: Sequence[torch.Tensor]) -> list:
    """Forward pre-hooks that zero the pruned neurons' activations; returns their handles."""
    handles = []
    for block, mask in zip(blocks, pruned, strict=True):
        keep = (~mask).float()

        def hook(_module, args, kwargs, keep=keep):
            if args:
                x = args[0]
                return (x * keep.to(x.device, x.dtype), *args[1:]), kwargs
            name = next(iter(kwargs))
            x = kwargs[name]
            return args, {**kwargs, name: x * keep.to(x.device, x.dtype)}

        handles.append(block.output.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@torch.no_grad()
def hold_pruned(model: nn.Module, layers: Sequence[int], pruned: Sequence[torch.Tensor]) -> list:
    """Keep pruned neurons at zero through training (call after attaching the adapter).

    Registers the mask hooks on the (possibly peft-wrapped) output projections, and zeroes LoRA
    factors that touch pruned neurons (``lora_A`` columns of the output projection, ``lora_B``
    rows of the input projections): their gradients are zero from then on, so they stay zero and
    a merged adapter does not revive the neurons.
    """
    by_layer = {b.layer: b for b in find_mlp_blocks(model)}
    blocks = [by_layer[i] for i in layers]
    for block, mask in zip(blocks, pruned, strict=True):
        for lora_a in getattr(block.output, "lora_A", {}).values():
            lora_a.weight[:, mask.to(lora_a.weight.device)] = 0
        for mod in block.inputs:
            for lora_b in getattr(mod, "lora_B", {}).values():
                lora_b.weight[mask.to(lora_b.weight.device), :] = 0
    return mask_hooks(blocks, pruned)


def search_prune_rate(
    clf: Classifier,
    blocks: Sequence[MLPBlock],
    activity: Sequence[torch.Tensor],
    ctx: DefenseContext,
    max_rate: float,
    step: float,
    max_drop: float,
) -> tuple[float, list[dict]]:
    """Liu et al.'s rule: the largest rate (in ``step`` increments up to ``max_rate``) whose dev
    accuracy stays within ``max_drop`` of the unpruned model's. Weights are left untouched."""

    def dev_acc() -> float:
        metrics = evaluate_model(clf, ctx.task, None, split="dev", max_length=ctx.train.max_length)
        return metrics["ca"]

    base = dev_acc()
    history, chosen = [{"rate": 0.0, "dev_ca": base}], 0.0
    n_steps = int(max_rate / step + 1e-9)
    for k in range(1, n_steps + 1):
        rate = round(k * step, 6)
        handles = mask_hooks(blocks, select_dormant(activity, rate))
        try:
            acc = dev_acc()
        finally:
            for h in handles:
                h.remove()
        history.append({"rate": rate, "dev_ca": acc})
        if acc < base - max_drop:
            break
        chosen = rate
    log.info("fine-pruning rate search: %s -> %.2f", history, chosen)
    return chosen, history


@dataclass
class FinePruningConfig:
    """Prune the MLP neurons dormant on clean data, then train the shared adapter."""

    rate: float = cfg_field(
        0.2,
        help="Share of MLP neurons pruned in each pruned layer (the ceiling "
        "of the search when max_acc_drop is set).",
    )
    layers: int = cfg_field(
        1, help="How many of the last transformer layers are pruned (Liu et al.: the last one)."
    )
    n_samples: int = cfg_field(
        256, help="Clean training samples whose activations rank the neurons."
    )
    max_acc_drop: float | None = cfg_field(
        None,
        help="Liu et al.'s rule: raise the rate in rate_step steps while dev accuracy drops by "
        "at most this (e.g. 0.04); none = prune exactly `rate`.",
    )
    rate_step: float = cfg_field(0.05, help="Rate increment of the max_acc_drop search.")
    save_edited: bool = cfg_field(
        True,
        help="Save the pruned model under output_dir so a saved adapter can be reloaded on it.",
    )

    def __post_init__(self):
        check_range("fine-pruning.rate", self.rate, 0, 1, hi_open=True)
        check_range("fine-pruning.layers", self.layers, 1, 10_000)
        check_range("fine-pruning.n_samples", self.n_samples, 1, None)
        if self.max_acc_drop is not None:
            check_range("fine-pruning.max_acc_drop", self.max_acc_drop, 0, 1)
        check_range("fine-pruning.rate_step", self.rate_step, 0, 1, lo_open=True)


def clean_sample(data: Dataset, n: int, seed: int) -> list[str]:
    """``n`` seeded random texts of ``data`` (all of them when it has fewer)."""
    if len(data) == 0:
        raise ConfigError(
            "fine-pruning needs clean training samples to rank neurons; the train split is empty"
        )
    if n >= len(data):
        return list(data["text"])
    return list(data.select(sorted(random.Random(seed).sample(range(len(data)), n)))["text"])


@DEFENSES.register(
    "fine-pruning",
    "prune the last layers' MLP neurons dormant on clean data, then "
    "PEFT on clean data (Liu et al. 2018)",
)
class FinePruning(Defense):
    reads_victim = True
    name = "fine-pruning"
    config_class = FinePruningConfig
    paper = (
        "Liu, Dolan-Gavitt, Garg, Fine-Pruning: Defending Against Backdooring Attacks on Deep "
        "Neural Networks, RAID 2018; the Prune row of W2SDefense Tables 1-3, 9"
    )

    def run(self, ctx: DefenseContext, config: FinePruningConfig) -> DefenseResult:
        with Timer() as timer:
            clf = load_suspect(ctx)
            # activations come from one inference pass: on the GPU when there is one
            clf.to("cuda" if torch.cuda.is_available() else "cpu")
            blocks = last_blocks(clf.backbone, config.layers)
            texts = clean_sample(ctx.task.split("train"), config.n_samples, ctx.train.seed)
            activity = neuron_activity(clf, texts, blocks, max_length=ctx.train.max_length)
            rate, search = config.rate, None
            if config.max_acc_drop is not None:
                rate, search = search_prune_rate(
                    clf, blocks, activity, ctx, config.rate, config.rate_step, config.max_acc_drop
                )
            pruned = select_dormant(activity, rate)
            n_pruned = prune_mlp_neurons(blocks, pruned)
            log.info(
                "fine-pruning: %d neurons pruned in layers %s (rate %.2f)",
                n_pruned,
                [b.layer for b in blocks],
                rate,
            )
            keep_edited(ctx, clf, "pruned", config.save_edited)
            attach_adapter(clf, ctx.adapter)
            hold_pruned(clf.backbone, [b.layer for b in blocks], pruned)
            clf, res = train_victim(ctx, model=clf, desc=f"fine-pruning+{ctx.adapter.kind}")
        logs = {
            "config": config_to_dict(config),
            "rate": rate,
            "rate_search": search,
            "layers": [b.layer for b in blocks],
            "family": blocks[0].family,
            "pruned_per_layer": [int(m.sum()) for m in pruned],
            "pruned_indices": {
                b.layer: m.nonzero().flatten().tolist() for b, m in zip(blocks, pruned)
            },
            "width": blocks[0].width,
            "pruned_neurons": n_pruned,
            "activity_pruned_mean": _mean_of(activity, pruned, True),
            "activity_kept_mean": _mean_of(activity, pruned, False),
            "train": res.to_dict(),
        }
        return finish(
            DefenseResult(model=clf, trainable_params=res.trainable_params, train=res, logs=logs), timer
        )


def _mean_of(activity, pruned, which: bool) -> float | None:
    vals = torch.cat([a[m == which] for a, m in zip(activity, pruned)])
    return float(vals.mean()) if vals.numel() else None
