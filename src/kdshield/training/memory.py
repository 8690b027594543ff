"""What training keeps in memory: activation (gradient) checkpointing of the Hugging Face model
inside a Classifier or a Generator (or any module holding one, under peft wrappers or not).

    on = enable_activation_checkpointing(clf, "auto")   # on from 1B parameters, else off
    # each decoder/encoder layer keeps only its input; backward recomputes the layer's forward

``train`` calls it with ``TrainConfig.activation_checkpointing``. The name is transformers 5's
(``activation_checkpointing_enable``; ``gradient_checkpointing_enable`` is its deprecated alias)
and ``kdshield plan --activation-checkpointing``'s. Non-reentrant checkpointing
(``use_reentrant=False``) gives the same loss and gradients as no checkpointing (the random
state is restored for the recomputation, so dropout masks match); it costs about one more forward
pass per step. ``benchmarks/memory_options.py`` measures both.
"""

from __future__ import annotations

import logging

import torch

from kdshield.errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINTING = ("auto", "on", "off")
# auto turns checkpointing on from this many parameters. Below it the weights are small and the
# activations of kdshield's batches (16 x 64 tokens) fit next to them: the embedded 135M student's
# saved activations are ~0.3 GB at 16 x 64, and the extra forward (~+30 % step time) buys nothing.
# From 1B (Llama-3.2-1B, Qwen2.5-1.5B, the 7B-8B students) a realistic batch's activations reach
# the size of the weights (kdshield plan: Llama-3-8B LoRA at 8 x 512 saves ~3x its bf16 weights'
# share of a 24 GB GPU) and checkpointing is what makes the batch fit.
AUTO_MIN_PARAMS = 1_000_000_000


def hf_models(model: torch.nn.Module) -> list:
    """The outermost transformers models inside ``model`` (a Classifier's backbone, under peft)."""
    from transformers import PreTrainedModel

    found, inner = [], set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and id(module) not in inner:
            found.append(module)
            inner.update(id(m) for m in module.modules())
    return found


def wants_checkpointing(setting: str, model: torch.nn.Module) -> bool:
    """``on`` / ``off`` as they are; ``auto``: on for a model of ``AUTO_MIN_PARAMS`` or more."""
    if setting not in CHECKPOINTING:
        raise ConfigError(f"activation_checkpointing={setting!r} is not one of {list(CHECKPOINTING)}")
    if setting != "auto":
        return setting == "on"
    return sum(p.numel() for p in model.parameters()) >= AUTO_MIN_PARAMS


def enable_activation_checkpointing(model: torch.nn.Module, setting: str = "auto") -> bool:
    """Turn non-reentrant activation checkpointing on in every transformers model inside ``model``
    when ``setting`` asks for it (see ``wants_checkpointing``); returns whether it is on. With a
    frozen input embedding (PEFT) its output is made to require grad, as peft does for
    checkpointed training. ``on`` for a model without checkpointing support is a ConfigError."""
    if not wants_checkpointing(setting, model):
        return False
    targets = [m for m in hf_models(model) if getattr(m, "supports_gradient_checkpointing", False)]
    if not targets:
        if setting == "on":
            names = ", ".join(type(m).__name__ for m in hf_models(model)) or type(model).__name__
            raise ConfigError(f"activation_checkpointing=on: {names} does not support activation checkpointing; "
                              "set it to off")
        return False
    kwargs = {"use_reentrant": False}
    for hf in targets:
        enable = getattr(hf, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        embeddings = hf.get_input_embeddings()
        if embeddings is not None and not any(p.requires_grad for p in embeddings.parameters()):
            hf.enable_input_require_grads()
    log.info("activation checkpointing on (%s)", ", ".join(type(m).__name__ for m in targets))
    return True
