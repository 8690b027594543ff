"""Activation checkpointing (training/memory.py): the same loss and gradients as without it, fewer
tensors saved for backward, auto off below AUTO_MIN_PARAMS. Peak memory and step time are measured
in benchmarks/memory_options.py, not here."""

from __future__ import annotations

import pytest
import torch

from kdshield.errors import ConfigError
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import load_classifier
from kdshield.models.loading import LoadOptions
from kdshield.training import memory

TEXTS = ["a fine film with a good cast", "dull and long", "good", "not good at all, a dull film"]


def _step(model_dir, kind: str, checkpointing: str):
    """Loss, gradients and the bytes autograd saved for one forward/backward in train mode."""
    torch.manual_seed(0)
    clf = load_classifier(model_dir, num_labels=2, options=LoadOptions(dtype="fp32"))
    attach_adapter(clf, AdapterConfig(kind=kind, r=4))
    on = memory.enable_activation_checkpointing(clf, checkpointing)
    clf.train()
    batch = clf.encode(TEXTS, max_length=16)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)  # dropout masks (BERT) drawn the same way in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = clf(**batch)
        loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([1, 0, 1, 0]))
    forward_saved = sum(saved)
    loss.backward()
    # (BERT's pooler is outside the graph: no gradient either way)
    grads = {n: p.grad.clone() for n, p in clf.named_parameters() if p.requires_grad and p.grad is not None}
    return on, loss.detach(), grads, forward_saved


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_bert_dir"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_checkpointing_gives_the_same_loss_and_gradients(fixture, kind, request):
    model_dir = request.getfixturevalue(fixture)
    off_on, off_loss, off_grads, off_saved = _step(model_dir, kind, "off")
    on_on, on_loss, on_grads, on_saved = _step(model_dir, kind, "on")
    assert (off_on, on_on) == (False, True)
    assert torch.allclose(on_loss, off_loss, rtol=1e-5, atol=1e-6)
    assert on_grads.keys() == off_grads.keys() and on_grads
    for name, g in off_grads.items():
        assert torch.allclose(on_grads[name], g, rtol=1e-4, atol=1e-6), name
    # what the forward keeps for backward: each layer's input instead of all its activations
    assert on_saved < 0.75 * off_saved, (on_saved, off_saved)


def test_auto_is_off_below_the_threshold_and_on_above(tiny_llama_dir, monkeypatch):
    clf = load_classifier(tiny_llama_dir, num_labels=2)
    assert memory.wants_checkpointing("auto", clf) is False
    assert memory.enable_activation_checkpointing(clf, "auto") is False
    assert not any(getattr(m, "gradient_checkpointing", False) for m in clf.modules())
    n = sum(p.numel() for p in clf.parameters())
    monkeypatch.setattr(memory, "AUTO_MIN_PARAMS", n)
    assert memory.wants_checkpointing("auto", clf) is True
    assert memory.wants_checkpointing("off", clf) is False


def test_frozen_embeddings_get_input_grads_under_peft(tiny_llama_dir):
    clf = load_classifier(tiny_llama_dir, num_labels=2)
    attach_adapter(clf, AdapterConfig(kind="lora", r=4))
    assert memory.enable_activation_checkpointing(clf, "on")
    [hf] = memory.hf_models(clf)
    assert hf.is_activation_checkpointing if hasattr(hf, "is_activation_checkpointing") else hf.is_gradient_checkpointing
    emb = hf.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert emb.requires_grad  # enable_input_require_grads' hook


def test_bad_setting_and_unsupported_model():
    with pytest.raises(ConfigError, match="activation_checkpointing='yes'"):
        memory.wants_checkpointing("yes", torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="does not support activation checkpointing"):
        memory.enable_activation_checkpointing(torch.nn.Linear(2, 2), "on")
    assert memory.enable_activation_checkpointing(torch.nn.Linear(2, 2), "auto") is False


def test_train_with_checkpointing_ends_at_the_same_weights(tiny_llama_dir, toy_dataset, tmp_path):
    from kdshield.training.loop import TrainConfig, train

    weights = {}
    for setting in ("off", "on"):
        torch.manual_seed(0)
        clf = load_classifier(tiny_llama_dir, num_labels=2, options=LoadOptions(dtype="fp32"))
        attach_adapter(clf, AdapterConfig(kind="lora", r=4))
        train(clf, toy_dataset(32), TrainConfig(epochs=1, batch_size=4, max_length=16, lr=1e-2,
                                            activation_checkpointing=setting), output_dir=tmp_path / setting)
        [hf] = memory.hf_models(clf)
        assert hf.is_activation_checkpointing == (setting == "on")
        weights[setting] = {n: p.detach().clone() for n, p in clf.named_parameters() if p.requires_grad}
    for name, w in weights["off"].items():
        assert torch.allclose(weights["on"][name], w, rtol=1e-4, atol=1e-6), name


def test_train_config_checks_the_setting():
    from kdshield.training.loop import CHECKPOINT_OPTIONS, TrainConfig

    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        TrainConfig(activation_checkpointing="always")
    assert "activation_checkpointing" in CHECKPOINT_OPTIONS  # not part of any settings key: same result
