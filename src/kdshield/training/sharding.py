"""Sharded training (FSDP2 through accelerate) with a plain model for everything around it.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 8 -m kdshield attack ...

Under ``distributed_type: FSDP`` (``fsdp_version: 2``) ``train`` does not shard the caller's model
itself. It shards a *shadow*: a copy of the module tree that shares the caller's parameter and
buffer tensors (``shadow_of``), so no weight is copied. accelerate's ``fully_shard`` then gives
the shadow its DTensor shards and the caller's module releases its full tensors (``release``):
while training, each process holds its shard of the weights, gradients and AdamW state. For
evaluation during training and once training ends, ``gather_into`` all-gathers every parameter
into the caller's module, which is then an ordinary module holding the full weights on every
process: evaluation, decoding, ``save`` and ``save_pretrained`` run on it exactly as after a
single-process run, without any collective (so a process may evaluate or save alone).

The trainable weights the loop keeps (checkpoints, the best evaluation, the weight average) are
gathered to full tensors by name (``full_state``) and loaded back into the shards by name
(``load_state``): a checkpoint written under FSDP has the same names and shapes as a
single-process one. The optimizer state is saved as a full state dict keyed by parameter name
(``torch.distributed.checkpoint.state_dict``). Every function here that gathers is a collective:
all processes call it, in the same order.

FSDP version 1 (``fsdp_version: 1``) wraps submodules and renames parameters; it is refused.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable

import torch

from kdshield.errors import ConfigError

OPTIMIZER_FORMAT = "fqn"  # state.json's optimizer_format for a full, name-keyed optimizer state


def uses_fsdp(accelerator) -> bool:
    """Whether ``accelerator`` shards models with FSDP2; FSDP1 is a ConfigError."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    if not accelerator.is_fsdp2:
        raise ConfigError("kdshield trains under FSDP version 2 only (torch's fully_shard): set fsdp_version: 2 in "
                          "the accelerate config (configs/accelerate/fsdp.yaml does)")
    return True


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor all-gathered (a collective), any other tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def shadow_of(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are ``model``'s own tensor
    objects (nothing is copied but the modules and small attributes; tied weights stay tied).
    The tokenizer, when there is one, is shared too."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        memo[id(tokenizer)] = tokenizer
    return copy.deepcopy(model, memo)


def release(model: torch.nn.Module, shadow: torch.nn.Module) -> None:
    """Free the full weights of ``model`` (the caller's module while its ``shadow`` trains): every
    parameter the shadow no longer shares keeps its object, dtype and ``requires_grad`` but holds
    an empty tensor."""
    shared = {id(p) for p in shadow.parameters()}
    for p in model.parameters():
        if id(p) not in shared:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def gather_into(model: torch.nn.Module, shadow: torch.nn.Module) -> None:
    """All-gather every parameter of the sharded ``shadow`` into ``model`` (same names), and take
    the shadow's buffers (moved to the device by sharding). A collective."""
    params = dict(model.named_parameters())
    for name, p in shadow.named_parameters():
        target = params[name]
        if target is not p:  # (a parameter left unsharded is still the same object)
            target.data = full_tensor(p.detach()).to(target.dtype)
    modules = dict(model.named_modules())
    for name, buf in shadow.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        if leaf in module._buffers:
            module._buffers[leaf] = buf


def full_state(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Name -> full tensor on the CPU, contiguous and detached (DTensors gathered: a collective)."""
    return {n: full_tensor(t.detach()).cpu().clone().contiguous() for n, t in tensors}


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) as ``param`` holds it: its local shard when ``param`` is a DTensor
    (no communication: every process holds the same full value), else on its device and dtype."""
    value = value.to(param.device, param.dtype)
    if not _is_dtensor(param) or _is_dtensor(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The full optimizer state keyed by parameter name (on the main process; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    raw = getattr(optimizer, "optimizer", optimizer)
    return get_optimizer_state_dict(model, raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state (``optimizer_state``) into ``optimizer``'s shards;
    every process passes the same full state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    raw = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, raw, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def fit_wrap_policy(accelerator, model: torch.nn.Module) -> list[str]:
    """Point a transformer-based wrap policy at the layers of *this* model; returns the class names.

    One launch trains several models (the W2SDefense teacher, a BERT-like encoder, then the Llama
    student): accelerate's policy names one layer class (``fsdp_transformer_layer_cls_to_wrap``)
    and fails on a model without it, and it keeps the first model's policy for every later one.
    Here each model gets the configured classes it has, else its transformers models' own
    ``_no_split_modules`` (their decoder / encoder layers)."""
    import functools

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from kdshield.training.memory import hf_models

    plugin = accelerator.state.fsdp_plugin
    policy = plugin.auto_wrap_policy
    base = policy.func if isinstance(policy, functools.partial) else policy
    if base is not transformer_auto_wrap_policy:
        return []
    configured = [n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()]
    configured = configured or list(plugin.transformer_cls_names_to_wrap or [])
    present = {type(m).__name__ for m in model.modules()}
    names = [n for n in configured if n in present]
    if not names:
        names = sorted({n for hf in hf_models(model) for n in (getattr(hf, "_no_split_modules", None) or [])
                        if n in present})
    plugin.auto_wrap_policy = base
    plugin.transformer_cls_names_to_wrap = names
    return names
