"""PEFT adapters (LoRA, prompt tuning, p-tuning) on a Classifier's backbone; the head stays trainable.

    clf = load_classifier("smollm2-135m", num_labels=2)
    attach_adapter(clf, AdapterConfig(kind="lora", r=8))
    clf.save("out/adapter")              # adapter + head only
    clf.save("out/merged", merge=True)   # LoRA merged into the backbone

These are the victims of the papers ("LoRA" row) and the trainable part of every defense.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from kdshield.config import cfg_field, check_choice, check_range
from kdshield.errors import ConfigError, ModelLoadError

ADAPTERS = ("lora", "prompt-tuning", "p-tuning", "full")

# The plain-PEFT learning rate each adapter gets when none is given. Prompt tuning and p-tuning
# train a few thousand weights in the input and need a larger step than LoRA: at LoRA's 2e-4 the
# never-poisoned SmolLM2 student reached dev CA 70.0 (prompt tuning) and 67.7 (p-tuning), at 2e-3
# 82.3 and 81.7, at 2e-2 81.3 and 57.7 (LoRA at 2e-4: 82.3). Chosen on dev accuracy of a model that
# was never poisoned, so no trigger and no test row entered: `python benchmarks/peft_lr_dev.py`,
# benchmarks/results/peft-lr-dev.jsonl. "full" keeps the shared value it always had.
DEFAULT_PEFT_LR = {"lora": 2e-4, "prompt-tuning": 2e-3, "p-tuning": 2e-3, "full": 2e-4}


def default_peft_lr(kind: str) -> float:
    """The learning rate plain PEFT with adapter ``kind`` uses when the user sets none."""
    check_choice("adapter.kind", kind, ADAPTERS)
    return DEFAULT_PEFT_LR[kind]


@dataclass
class AdapterConfig:
    """What part of the student is trained."""

    kind: str = cfg_field("lora", help="lora | prompt-tuning | p-tuning | full (all weights).",
                          choices=list(ADAPTERS))
    r: int = cfg_field(8, help="LoRA rank.")
    lora_alpha: float = cfg_field(16.0, help="LoRA scaling alpha (update is scaled by alpha/r).")
    lora_dropout: float = cfg_field(0.0, help="Dropout on the LoRA input.")
    target_modules: list[str] = cfg_field(
        [], help="Modules LoRA adapts (comma list); empty = peft's default for the architecture "
                 "(q_proj,v_proj for Llama; query,value for BERT).")
    num_virtual_tokens: int = cfg_field(20, help="Virtual tokens for prompt tuning / p-tuning.")
    encoder_hidden_size: int = cfg_field(128, help="Hidden size of the p-tuning prompt encoder (MLP).")

    def __post_init__(self):
        check_choice("adapter.kind", self.kind, ADAPTERS)
        check_range("adapter.r", self.r, 1, 4096)
        check_range("adapter.lora_alpha", self.lora_alpha, 0, None, lo_open=True)
        check_range("adapter.lora_dropout", self.lora_dropout, 0, 1, hi_open=True)
        check_range("adapter.num_virtual_tokens", self.num_virtual_tokens, 1, 512)
        check_range("adapter.encoder_hidden_size", self.encoder_hidden_size, 1, 65536)

    def to_dict(self) -> dict:
        from kdshield.config import config_to_dict

        return config_to_dict(self)


def linear_module_names(model_ref: str | Path, trust_remote_code: bool = False) -> set[str] | None:
    """The dotted names of the linear layers (what LoRA can adapt) of the model at ``model_ref``,
    read from its ``config.json`` alone: the architecture is built on the meta device, so no weight
    is read or allocated. None when no local config can be read (a hub id without a network, a
    kdshield adapter directory): the adapter's own attach reports a bad target then."""
    from transformers import AutoConfig, AutoModel
    from transformers.pytorch_utils import Conv1D

    path = Path(str(model_ref)).expanduser()
    if not (path / "config.json").is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an architecture transformers cannot build from its config: leave it to the load
        return None
    return {name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))}


def check_lora_targets(model_ref: str | Path, targets, *, trust_remote_code: bool = False,
                       what: str = "adapter.target_modules") -> None:
    """Before any work: every LoRA target names a linear layer of the model (peft's rule: the
    layer's dotted name equals the target or ends with ``.target``). peft itself says so only when
    the adapter is added, which in a grid or a W2SDefense run comes after a poisoning or a
    teacher's training. ``all-linear`` is peft's own shorthand and always passes."""
    targets = [str(t) for t in (targets or [])]
    if not targets or targets == ["all-linear"]:
        return
    from kdshield.models.loading import resolve_model_ref

    names = linear_module_names(resolve_model_ref(model_ref), trust_remote_code=trust_remote_code)
    if names is None:
        return
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"{what}: {', '.join(unknown)} {'is not a linear layer' if len(unknown) == 1 else 'are not linear layers'} "
                          f"of {model_ref}; its linear layers are {', '.join(leaves)} (or all-linear for every one)")


def _peft_config(cfg: AdapterConfig, model_config):
    from peft import LoraConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    if cfg.kind == "lora":
        kwargs = {"target_modules": list(cfg.target_modules)} if cfg.target_modules else {}
        return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          bias="none", task_type=TaskType.FEATURE_EXTRACTION, **kwargs)
    if cfg.kind == "prompt-tuning":
        return PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION,
                                  num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.kind == "p-tuning":
        return PromptEncoderConfig(task_type=TaskType.FEATURE_EXTRACTION,
                                   num_virtual_tokens=cfg.num_virtual_tokens,
                                   encoder_hidden_size=cfg.encoder_hidden_size)
    raise ConfigError(f"adapter kind {cfg.kind!r} has no peft config")


def attach_adapter(clf, cfg: AdapterConfig):
    """Freeze the backbone and add the adapter in place; the head stays trainable. Returns clf."""
    if clf.adapter_spec is not None:
        raise ConfigError("this classifier already has an adapter; load the merged model instead")
    for p in clf.head.parameters():
        p.requires_grad_(True)
    if cfg.kind == "full":
        options = getattr(clf, "load_options", None)
        if clf.load_dtype in ("bf16", "fp16") and options is not None and options.dtype == "auto":
            _reload_fp32(clf, options)  # auto = what suits the run: fp32 where every weight trains
        if getattr(clf, "load_dtype", "fp32") != "fp32":
            # the commands check this before any work (LoadOptions.for_full_training); this is the backstop
            raise ConfigError(f"full fine-tuning trains every weight and needs fp32 weights; this model was loaded "
                              f"as {clf.load_dtype} (quantised weights cannot train, and AdamW on half-precision "
                              "weights loses the steps below their resolution). Load it with --dtype fp32 and "
                              "without --quantize")
        for p in clf.backbone.parameters():
            p.requires_grad_(True)
        return clf
    from peft import get_peft_model

    for p in clf.backbone.parameters():
        p.requires_grad_(False)
    try:
        clf.backbone = get_peft_model(clf.backbone, _peft_config(cfg, clf.backbone.config))
    except ValueError as err:
        raise ConfigError(f"cannot add {cfg.kind} to {clf.backbone.config.model_type}: {err}. "
                          "Set --adapter.target-modules to the model's attention projections.") from err
    clf.adapter_spec = {"kind": cfg.kind, "base": clf.source, "config": cfg.to_dict()}
    return clf


def _reload_fp32(clf, options) -> None:
    """Replace ``clf``'s half-precision backbone (loaded under dtype auto) by the checkpoint's fp32
    weights: full fine-tuning needs them, and casting the loaded bf16 copy up would start from
    rounded weights."""
    import logging

    from kdshield.models.classifier import _load_backbone
    from kdshield.models.loading import resolve_model_ref

    logging.getLogger(__name__).info("full fine-tuning: loading %s again in fp32 (dtype auto had loaded %s)",
                                     clf.source, clf.load_dtype)
    fp32 = options.for_full_training()
    pad = clf.backbone.config.pad_token_id
    clf.backbone = None  # the half-precision copy is freed before the fp32 one loads
    clf.backbone, _ = _load_backbone(resolve_model_ref(clf.source, fp32), fp32, torch.float32)
    clf.backbone.config.pad_token_id = pad
    clf.load_dtype, clf.load_options = "fp32", fp32


def merged_backbone(clf):
    """A plain backbone with the LoRA update merged in (the classifier itself is left as it is)."""
    import copy

    if clf.adapter_spec is None:
        return clf.backbone
    if clf.adapter_spec["kind"] != "lora":
        raise ConfigError(f"a {clf.adapter_spec['kind']} adapter cannot be merged into the weights; "
                          "save the adapter instead (without --merge)")
    return copy.deepcopy(clf.backbone).merge_and_unload()


def load_adapter_classifier(path: Path, meta: dict, *, options, dtype=torch.float32):
    """Base classifier (from the recorded ``base`` reference) + saved adapter + saved head."""
    from peft import PeftModel

    from kdshield.models.classifier import HEAD_FILE, load_classifier

    spec = meta["adapter"]
    base = spec.get("base")
    if not base:
        raise ModelLoadError(f"{path}: adapter has no recorded base model")
    clf = load_classifier(base, num_labels=meta["head"]["num_labels"], label_names=meta.get("label_names"),
                          options=options, dtype=dtype)
    adapter_dir = path / "adapter"
    if not list(adapter_dir.glob("*.safetensors")):
        raise ModelLoadError(f"{adapter_dir} has no safetensors adapter weights")
    clf.backbone = PeftModel.from_pretrained(clf.backbone, str(adapter_dir))
    clf.head.load_state_dict(load_file(str(path / HEAD_FILE)))
    clf.adapter_spec = spec
    clf.source = str(path)
    return clf
