"""Quantization baseline: quantise-dequantise the suspect model's linear weights, then plain PEFT.

    kdshield defend --method quantization --student runs/poisoned/model --data rotten-tomatoes \
        --quantization.bits 4 --quantization.group-size 128

The W2SDefense comparison row (Table 9, "utilizing INT4 quantization to eliminate backdoor
features"): rounding every weight to a coarse grid perturbs the small, precise weight changes a
backdoor may rest on, and the clean task is then restored by PEFT on clean data.

Scheme: weight-only, symmetric round-to-nearest. Each output channel (row of a Linear weight) is
split into groups of ``group_size`` consecutive input weights (``group_size=0``: the whole row, i.e.
per-output-channel); a group's scale is ``max|w| / (2^(bits-1) - 1)`` and its weights become
``scale * round(w / scale)``. No zero point, so at most ``2^bits - 1`` distinct values per group
and every weight moves by at most half a step. ``group_size=128`` is the usual INT4 setting of
GPTQ/AWQ; a row shorter than a group is one group. Only ``nn.Linear`` (and GPT-2's ``Conv1D``)
weights in the backbone are quantised, as weight-only quantisers do; embeddings, norms and biases
keep full precision, and the classification head too unless ``include_head``. The dequantised
weights are stored in the model's dtype (fp32), so the rest of kdshield sees an ordinary model.

Note: the embedded SmolLM2 is itself a dequantised Q4_1 GGUF (group 32, asymmetric); quantising it
again on another grid still changes almost every weight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdshield.config import cfg_field, check_range, config_to_dict
from kdshield.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult, Timer, finish
from kdshield.defenses.fine_tuning import keep_edited, load_suspect
from kdshield.defenses.lora import train_victim

log = logging.getLogger(__name__)


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer codes ``[out, in]`` and per-group scales ``[out, n_groups]`` of a weight.

    Groups run along the input dimension; the last group of a row may be shorter (zero padding does
    not change a group's max). An all-zero group gets scale 1 and codes 0.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    rows, cols = w.shape
    g = cols if group_size <= 0 or group_size >= cols else group_size
    padded = F.pad(w, (0, (-cols) % g)).view(rows, -1, g)
    qmax = 2 ** (bits - 1) - 1
    scale = padded.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(padded / scale), -qmax, qmax)
    return codes.view(rows, -1)[:, :cols].to(torch.int8), scale.squeeze(-1)


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, group_size: int = 0
) -> torch.Tensor:
    rows, cols = codes.shape
    g = cols if group_size <= 0 or group_size >= cols else group_size
    per_col = scale.repeat_interleave(g, dim=1)[:, :cols]
    return codes.float() * per_col


def quantize_dequantize(weight: torch.Tensor, bits: int, group_size: int = 0) -> torch.Tensor:
    """``weight`` rounded to its ``bits``-bit symmetric grid, in the weight's own dtype."""
    codes, scale = quantize_weight(weight, bits, group_size)
    return dequantize_weight(codes, scale, group_size).to(weight.dtype)


def _linear_weights(module: nn.Module):
    """(name, weight, transposed) of every Linear / GPT-2 Conv1D weight under ``module``."""
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear):
            yield name, mod.weight, False
        elif type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None:
            yield name, mod.weight, True  # Conv1D stores [in, out]: output channels are columns


@torch.no_grad()
def quantize_model(module: nn.Module, bits: int, group_size: int = 0) -> dict:
    """Quantise-dequantise every linear weight of ``module`` in place; returns what changed."""
    n_layers = n_weights = n_changed = 0
    abs_change = 0.0
    for _name, weight, transposed in _linear_weights(module):
        w = weight.t() if transposed else weight
        new = quantize_dequantize(w, bits, group_size)
        n_changed += int((new != w).sum())
        abs_change += float((new.float() - w.float()).abs().sum())
        w.copy_(new)  # a transposed view writes through to the stored weight
        n_layers += 1
        n_weights += w.numel()
    if not n_layers:
        raise ValueError("quantize_model found no linear layers to quantise")
    return {
        "layers": n_layers,
        "weights": n_weights,
        "changed_share": n_changed / n_weights,
        "mean_abs_change": abs_change / n_weights,
    }


@dataclass
class QuantizationConfig:
    """Weight-only quantise-dequantise of the suspect model, then plain PEFT."""

    bits: int = cfg_field(
        4, help="Bits per weight: 4 (INT4, the papers' row) or 8 (INT8); 2-8 allowed."
    )
    group_size: int = cfg_field(
        128, help="Input weights sharing one scale (0 = one scale per output channel)."
    )
    include_head: bool = cfg_field(False, help="Also quantise the suspect's classification head.")
    save_edited: bool = cfg_field(
        True,
        help="Save the quantised model under output_dir so a saved adapter can be reloaded on it.",
    )

    def __post_init__(self):
        check_range("quantization.bits", self.bits, 2, 8)
        check_range("quantization.group_size", self.group_size, 0, None)


@DEFENSES.register(
    "quantization",
    "INT4/INT8 quantise-dequantise of the suspect's linear weights, then PEFT on clean data",
)
class Quantization(Defense):
    reads_victim = True
    name = "quantization"
    config_class = QuantizationConfig
    # the paper cites "Li et al. 2024d" for this row, which in its bibliography is CleanGen (a
    # decoding-time defense); the row itself is described as INT4 quantisation, which is what we do
    paper = (
        "INT4 quantisation row of W2SDefense (Zhao et al. 2025) Table 9; symmetric "
        "round-to-nearest weight-only quantisation"
    )

    def run(self, ctx: DefenseContext, config: QuantizationConfig) -> DefenseResult:
        with Timer() as timer:
            clf = load_suspect(ctx)
            stats = quantize_model(clf.backbone, config.bits, config.group_size)
            if config.include_head:
                stats["head"] = quantize_model(clf.head, config.bits, config.group_size)
            log.info(
                "quantization: INT%d, group %s: %d layers, %.1f%% of weights changed",
                config.bits,
                config.group_size or "per-channel",
                stats["layers"],
                100 * stats["changed_share"],
            )
            keep_edited(ctx, clf, f"int{config.bits}", config.save_edited)
            clf, res = train_victim(ctx, model=clf, desc=f"int{config.bits}+{ctx.adapter.kind}")
        logs = {"config": config_to_dict(config), "quantization": stats, "train": res.to_dict()}
        return finish(
            DefenseResult(model=clf, trainable_params=res.trainable_params, train=res, logs=logs), timer
        )
