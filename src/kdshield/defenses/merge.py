"""Model merging (Arora et al. 2024): average the suspect with a model adapted from the same base.

    kdshield defend --method merge --student runs/poisoned/model --data rotten-tomatoes \
        --merge.base smollm2-135m --merge.method average

"Here's a free lunch": a backdoor is a narrow feature of one fine-tuned model; merging it with other
models fine-tuned from the same pre-trained base dilutes that feature while the shared task
knowledge survives. Then the shared adapter is trained on clean data (the plain PEFT row, on the
merged model).

Methods: ``average`` (weight averaging, WAG in the paper): ``sum_i w_i theta_i`` with the weights
normalised to sum 1 (default uniform); ``task-arithmetic``: ``theta_base + sum_i w_i (theta_i -
theta_base)`` with the weights used as given (uniform 1/n equals averaging; larger weights keep
more of each fine-tune). Model 0 is the suspect, then ``other`` in order. Classification heads are
merged too (``merge_head``); task arithmetic averages them, since the base has no trained head.
Integer buffers are the suspect's.

``other`` empty (default): one model is built by fine-tuning ``base`` on the defender's clean
training data (full parameters by default) and cached under ``output_dir/other``. The models must
have identical architectures (same parameter names and shapes); anything else is a clear error.
Arora et al. merge with models fine-tuned on other data sets of the same task family; any such
model directory can be passed in ``other``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult, Timer, finish
from kdshield.defenses.fine_tuning import FULL_LR, keep_edited, load_suspect
from kdshield.defenses.lora import train_victim
from kdshield.errors import ConfigError
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import META_FILE, load_classifier
from kdshield.training.peft import peft_finetune

log = logging.getLogger(__name__)

MERGE_METHODS = ("average", "task-arithmetic")
HEAD_PREFIX = "head."


def check_same_architecture(
    states: Sequence[dict[str, torch.Tensor]],
    names: Sequence[str],
    keys: Sequence[str] | None = None,
) -> None:
    """ConfigError unless every state dict has the same parameter names and shapes (on ``keys``)."""
    ref = states[0]
    want = set(keys) if keys is not None else set(ref)
    for name, state in zip(names[1:], states[1:]):
        have = set(state) if keys is None else set(state) & want
        missing, extra = sorted(want - set(state)), sorted(have - want)
        shapes = [
            k for k in sorted(want & set(state)) if tuple(state[k].shape) != tuple(ref[k].shape)
        ]
        if missing or extra or shapes:
            detail = []
            if missing:
                detail.append(f"missing {missing[:3]}")
            if extra:
                detail.append(f"unexpected {extra[:3]}")
            if shapes:
                k = shapes[0]
                detail.append(
                    f"{len(shapes)} shape mismatch(es), e.g. {k}: {tuple(ref[k].shape)} vs "
                    f"{tuple(state[k].shape)}"
                )
            raise ConfigError(
                f"merge needs models of identical architecture: {name} differs from "
                f"{names[0]} ({'; '.join(detail)}). Merge only models adapted from the same "
                "base model."
            )


def merge_weights(method: str, weights: Sequence[float], n: int) -> list[float]:
    """The per-model weights used: uniform when none are given; normalised for averaging."""
    if not weights:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ConfigError(
            f"merge.weights has {len(weights)} values for {n} models (the suspect first, "
            "then merge.other)"
        )
    total = float(sum(weights))
    if total <= 0:  # heads are averaged with normalised weights under either method
        raise ConfigError(f"merge.weights must sum to a positive number, got {total}")
    if method == "average":
        return [float(w) / total for w in weights]
    return [float(w) for w in weights]


@torch.no_grad()
def merge_state_dicts(
    states: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    method: str = "average",
    base: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge same-architecture state dicts. ``weights`` are used as given (see ``merge_weights``).

    ``average``: ``sum_i w_i s_i``. ``task-arithmetic``: ``base + sum_i w_i (s_i - base)`` for keys
    in ``base``; keys not in ``base`` (a head) get the average with the weights normalised.
    Non-float tensors are taken from ``states[0]``. Computed in fp32, returned in each dtype.
    """
    check_choice("merge.method", method, MERGE_METHODS)
    if method == "task-arithmetic" and base is None:
        raise ConfigError("merge.method=task-arithmetic needs the base model's weights")
    norm = float(sum(weights))
    out = {}
    for key, ref in states[0].items():
        if not torch.is_floating_point(ref):
            out[key] = ref.clone()
            continue
        if method == "task-arithmetic" and key in base:
            b = base[key].float()
            merged = b + sum(w * (s[key].float() - b) for w, s in zip(weights, states))
        elif method == "task-arithmetic":
            merged = sum(w * s[key].float() for w, s in zip(weights, states)) / norm
        else:
            merged = sum(w * s[key].float() for w, s in zip(weights, states))
        out[key] = merged.to(ref.dtype)
    return out


@dataclass
class MergeConfig:
    """Merge the suspect with models adapted from the same base, then train the shared adapter."""

    other: list[str] = cfg_field(
        [],
        help="Models to merge with (comma list of directories / names); "
        "empty: fine-tune `base` on the clean train data.",
    )
    base: str = cfg_field(
        "smollm2-135m",
        help="The clean pre-trained base the suspect was adapted from "
        "(builds the default `other`; task arithmetic subtracts it).",
    )
    method: str = cfg_field(
        "average",
        help="average (weight averaging) or task-arithmetic.",
        choices=list(MERGE_METHODS),
    )
    weights: list[float] = cfg_field(
        [], help="Per-model weights, suspect first (empty: uniform 1/n)."
    )
    merge_head: bool = cfg_field(
        True, help="Merge the classification heads too (off: keep the suspect's)."
    )
    other_adapter: str = cfg_field(
        "full",
        help="How the default `other` is fine-tuned: full (as in the "
        "paper) or lora (cheaper; merged into the weights).",
        choices=["full", "lora"],
    )
    other_epochs: int | None = cfg_field(
        None, help="Epochs for the default `other` (none: --train.epochs)."
    )
    other_lr: float | None = cfg_field(
        None,
        help=f"Learning rate for the default `other` (none: {FULL_LR:g} "
        "for full, --train.lr for lora).",
    )
    save_edited: bool = cfg_field(
        True,
        help="Save the merged model under output_dir so a saved adapter can be reloaded on it.",
    )

    def __post_init__(self):
        check_choice("merge.method", self.method, MERGE_METHODS)
        check_choice("merge.other_adapter", self.other_adapter, ["full", "lora"])
        if any(w < 0 for w in self.weights):
            raise ConfigError(f"merge.weights={self.weights!r}: weights must be >= 0")
        if self.other_epochs is not None:
            check_range("merge.other_epochs", self.other_epochs, 1, 1000)
        if self.other_lr is not None:
            check_range("merge.other_lr", self.other_lr, 0, 1, lo_open=True)


def build_other(ctx: DefenseContext, config: MergeConfig) -> Path:
    """Fine-tune ``config.base`` on the clean train split; cached in ``output_dir/other/model``."""
    root = ctx.output_dir / "other"
    full = config.other_adapter == "full"
    train_cfg = dataclasses.replace(
        ctx.train,
        epochs=config.other_epochs or ctx.train.epochs,
        lr=config.other_lr or (FULL_LR if full else ctx.train.lr),
    )
    adapter = AdapterConfig(kind="full") if full else dataclasses.replace(ctx.adapter, kind="lora")
    key = {
        "base": str(config.base),
        "adapter": adapter.to_dict(),
        "train": config_to_dict(train_cfg),
        "n_train": len(ctx.task.split("train")),
        "labels": ctx.task.label_names,
    }
    card = root / "other.json"
    model_dir = root / "model"
    if (
        (model_dir / META_FILE).is_file()
        and card.is_file()
        and json.loads(card.read_text())["key"] == key
    ):
        log.info("merge: reusing the fine-tuned base in %s", model_dir)
        return model_dir
    torch.manual_seed(train_cfg.seed)
    clf = load_classifier(
        config.base,
        num_labels=ctx.task.num_labels,
        label_names=ctx.task.label_names,
        options=ctx.options,
    )
    attach_adapter(clf, adapter)
    clf, res = peft_finetune(
        config.base,
        ctx.task,
        adapter,
        train_cfg,
        root / "run",
        resume=ctx.resume,
        options=ctx.options,
        model=clf,
        desc=f"merge: fine-tune base ({adapter.kind})",
    )
    clf.save(model_dir, merge=not full)
    card.write_text(json.dumps({"key": key, "train": res.to_dict()}, indent=2, default=str))
    return model_dir


@DEFENSES.register(
    "merge",
    "merge the suspect with a model adapted from the same base (weight averaging "
    "/ task arithmetic), then PEFT (Arora et al. 2024)",
)
class Merge(Defense):
    reads_victim = True
    name = "merge"
    config_class = MergeConfig
    paper = (
        "Arora et al., Here's a Free Lunch: Sanitizing Backdoored Models with Model Merge, "
        "Findings of ACL 2024; the Merge row of W2SDefense Table 9"
    )

    def run(self, ctx: DefenseContext, config: MergeConfig) -> DefenseResult:
        with Timer() as timer:
            others = [str(o) for o in config.other] or [str(build_other(ctx, config))]
            suspect = load_suspect(ctx)
            states = [suspect.state_dict()] + [
                load_suspect(ctx, ref).state_dict() for ref in others
            ]
            names = [str(ctx.student), *others]
            check_same_architecture(states, names)
            base_state = None
            if config.method == "task-arithmetic":
                base = load_classifier(
                    config.base, num_labels=ctx.task.num_labels, options=ctx.options
                )
                # the base's head is untrained: only its backbone is a reference point
                base_state = {
                    k: v for k, v in base.state_dict().items() if not k.startswith(HEAD_PREFIX)
                }
                backbone_keys = [k for k in states[0] if not k.startswith(HEAD_PREFIX)]
                check_same_architecture(
                    [states[0], base_state], [names[0], str(config.base)], backbone_keys
                )
                del base
            weights = merge_weights(config.method, config.weights, len(states))
            merged = merge_state_dicts(states, weights, method=config.method, base=base_state)
            if not config.merge_head:
                merged.update({k: v for k, v in states[0].items() if k.startswith(HEAD_PREFIX)})
            suspect.load_state_dict(merged)
            del states, merged, base_state
            log.info("merge (%s): %s with weights %s", config.method, names, weights)
            keep_edited(ctx, suspect, "merged", config.save_edited)
            clf, res = train_victim(ctx, model=suspect, desc=f"merge+{ctx.adapter.kind}")
        logs = {
            "config": config_to_dict(config),
            "models": names,
            "weights": weights,
            "train": res.to_dict(),
        }
        return finish(
            DefenseResult(model=clf, trainable_params=res.trainable_params, train=res, logs=logs), timer
        )
