"""No defense: plain PEFT of the suspect model on clean target data (the papers' "LoRA" row).

    kdshield defend --method lora --student runs/poisoned/model --data rotten-tomatoes
"""

from __future__ import annotations

from dataclasses import dataclass

from kdshield.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult, Timer, finish
from kdshield.training.peft import peft_finetune


def train_victim(ctx: DefenseContext, *, model=None, desc: str | None = None):
    """Plain PEFT of the suspect model (or of ``model``, e.g. after pruning) on the clean train
    split with the shared adapter and training settings: the victim every baseline starts from.
    Plain PEFT of the suspect model itself goes to ``ctx.victim_dir`` when set (shared, resumed)."""
    out = ctx.victim_dir if model is None and ctx.victim_dir is not None else ctx.output_dir / "train"
    return peft_finetune(model.source if model is not None else ctx.student, ctx.task, ctx.adapter, ctx.train,
                         out, resume=ctx.resume or out == ctx.victim_dir, options=ctx.options, model=model,
                         desc=desc or ctx.adapter.kind)


@dataclass
class PlainPEFTConfig:
    """No options: the adapter and training settings are the shared ones (--adapter.*, --train.*)."""


@DEFENSES.register("lora", "plain PEFT on clean data, no defense (the papers' LoRA / p-tuning rows)")
class PlainPEFT(Defense):
    reads_victim = True
    name = "lora"
    config_class = PlainPEFTConfig
    paper = "Hu et al. 2022 (LoRA); baseline row of W2SDefense Tables 1-3"

    def run(self, ctx: DefenseContext, config: PlainPEFTConfig) -> DefenseResult:
        with Timer() as timer:
            clf, res = train_victim(ctx)
        return finish(DefenseResult(model=clf, trainable_params=res.trainable_params, train=res,
                                    logs={"train": res.to_dict()}), timer)
