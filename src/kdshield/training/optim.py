"""AdamW as every kdshield training step builds it: torch's fused kernel where it runs.

    optimizer = adamw(params, lr=2e-4, weight_decay=0.0)

torch's ``AdamW`` without arguments runs its for-loop implementation on CPU (the multi-tensor one
only on GPUs), about ten passes over every parameter per step. For a full fine-tuning of SmolLM2-135M
that is most of a step: 0.78 s of the step's optimizer update against 0.09 s with ``fused=True``
(2 cores of an Intel Xeon with avx512_bf16, one process at 2 threads; ``benchmarks/optimizer_step.py``).
The fused kernel computes the same update (within fp32 rounding: 6e-8 after 50 steps in
``tests/test_optim.py``), keeps the same state-dict format, so checkpoints resume across the two,
and runs on CPU and CUDA for fp32, bf16 and fp16 parameters. Anywhere else (another device, a
parameter type the kernel does not take) it falls back to torch's default choice.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes every one of ``params`` (plain tensors on one CPU or CUDA device)."""
    if not params:
        return False
    devices = {p.device for p in params}
    if len(devices) != 1 or next(iter(devices)).type not in FUSED_DEVICES:
        return False
    # sharded (DTensor) or quantised parameters are subclasses: leave them to torch's own choice
    return all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.dtype in FUSED_DTYPES for p in params)


def adamw(params: Iterable[torch.Tensor], *, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over ``params``: the fused kernel where :func:`fused_supported`, else torch's default."""
    params = list(params)
    if fused_supported(params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def implementation(optimizer: torch.optim.Optimizer) -> str:
    """``adamw-fused`` or ``adamw``: what a record says ran."""
    return "adamw-fused" if optimizer.defaults.get("fused") else "adamw"
