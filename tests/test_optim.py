"""The fused AdamW every training step builds: same update as torch's default, same state format."""

from __future__ import annotations

import copy

import torch

from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import load_classifier
from kdshield.training.loop import TrainConfig, train
from kdshield.training.optim import adamw, fused_supported, implementation


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(30, 20, generator=g), torch.randn(400, generator=g), torch.randn(5, 5, 3, generator=g)]


def _steps(opt, params, n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_fused_update_equals_the_default_one():
    start = _params()
    a = [p.clone().requires_grad_(True) for p in start]
    b = [p.clone().requires_grad_(True) for p in start]
    fused = adamw(a, lr=1e-2, weight_decay=0.01)
    assert implementation(fused) == "adamw-fused"
    _steps(fused, a, 50)
    _steps(torch.optim.AdamW(b, lr=1e-2, weight_decay=0.01), b, 50)
    moved = max((x - s).abs().max().item() for x, s in zip(b, start))
    assert moved > 0.1  # the steps did something, so equality below says something
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) < 1e-5


def test_a_default_optimizer_state_resumes_under_the_fused_one():
    start = _params()
    a = [p.clone().requires_grad_(True) for p in start]
    b = [p.clone().requires_grad_(True) for p in start]
    first = torch.optim.AdamW(a, lr=1e-2)
    _steps(first, a, 10)
    with torch.no_grad():
        for x, y in zip(b, a):
            x.copy_(y)
    resumed = adamw(b, lr=1e-2)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))  # as read back from a checkpoint
    _steps(first, a, 10, seed=2)
    _steps(resumed, b, 10, seed=2)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) < 1e-5


def test_fused_only_where_the_kernel_runs():
    assert fused_supported([torch.zeros(3, requires_grad=True), torch.zeros(2, dtype=torch.bfloat16)])
    assert not fused_supported([])
    assert not fused_supported([torch.zeros(3, device="meta")])
    assert not fused_supported([torch.zeros(3, dtype=torch.int64)])
    meta = adamw([torch.zeros(3, device="meta", requires_grad=True)], lr=1e-3)
    assert implementation(meta) == "adamw"


def test_training_records_the_optimizer_that_ran(tiny_llama_dir, toy_dataset):
    clf = load_classifier(tiny_llama_dir, num_labels=2)
    attach_adapter(clf, AdapterConfig(kind="lora", r=4))
    res = train(clf, toy_dataset(32), TrainConfig(epochs=1, batch_size=16, precision="fp32", checkpoint_every=0))
    assert res.optimizer == "adamw-fused"
    assert res.to_dict()["optimizer"] == "adamw-fused"
