"""Generators honour the load options as classifiers do: the load dtype, fp32 where every weight
trains, the quantised-base message on CPU, the generative CLI's rules, and activation
checkpointing reaching the causal LM inside a Generator (same loss on and off).

    OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider tests/test_gen_dtype.py
"""

from __future__ import annotations

import argparse

import pytest
import torch

from kdshield.data.batching import collate
from kdshield.errors import ConfigError
from kdshield.models.adapters import AdapterConfig
from kdshield.models.generator import attach_generator_adapter, load_generator
from kdshield.models.loading import LoadOptions
from kdshield.training.memory import enable_activation_checkpointing, hf_models
from kdshield.training.sft import encode_sft, sft_loss
from tests.gen_fixtures import sft_rows


def test_default_is_fp32_here_and_options_dtype_is_used(tiny_llama_dir):
    gen = load_generator(tiny_llama_dir)
    assert gen.load_dtype == "fp32" and {p.dtype for p in gen.parameters()} == {torch.float32}
    half = load_generator(tiny_llama_dir, options=LoadOptions(dtype="bf16"))
    assert half.load_dtype == "bf16" and {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    # an explicit dtype still wins over the options
    forced = load_generator(tiny_llama_dir, options=LoadOptions(dtype="bf16"), dtype=torch.float32)
    assert forced.load_dtype == "fp32" and {p.dtype for p in forced.parameters()} == {torch.float32}


def test_lora_on_a_bf16_base_trains_fp32_adapter_weights(tiny_llama_dir):
    gen = load_generator(tiny_llama_dir, options=LoadOptions(dtype="bf16"))
    attach_generator_adapter(gen, AdapterConfig(kind="lora", r=4))
    trainable = [p for p in gen.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in gen.parameters() if not p.requires_grad} == {torch.bfloat16}
    batch = collate(encode_sft(gen.tokenizer, sft_rows(4), max_length=40), [0, 1, 2, 3])
    loss, _ = sft_loss(gen, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in trainable)
    assert any(float(p.grad.abs().sum()) > 0 for p in trainable)  # (LoRA A's gradient is 0 while B = 0)


def test_full_training_needs_fp32(tiny_llama_dir, monkeypatch):
    explicit = load_generator(tiny_llama_dir, options=LoadOptions(dtype="bf16"))
    with pytest.raises(ConfigError, match="needs fp32 weights"):
        attach_generator_adapter(explicit, AdapterConfig(kind="full"))
    # dtype auto where auto means bf16 (a GPU): the full adapter loads the checkpoint again in fp32
    from kdshield import inference

    monkeypatch.setattr(inference, "resolve_precision", lambda p: "bf16" if p == "auto" else p)
    auto = load_generator(tiny_llama_dir, options=LoadOptions(dtype="auto"))
    assert auto.load_dtype == "bf16"
    attach_generator_adapter(auto, AdapterConfig(kind="full"))
    assert auto.load_dtype == "fp32" and {p.dtype for p in auto.parameters()} == {torch.float32}
    ref = load_generator(tiny_llama_dir, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(auto.parameters(), ref.parameters()))  # not rounded by bf16


def test_quantised_base_on_cpu_is_a_clear_error_before_loading(tiny_llama_dir, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    import transformers

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_generator(tiny_llama_dir, options=LoadOptions(quantize="4bit"))


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"allow_pickle": False, "trust_remote_code": False, "dtype": "auto",
                                 "quantize": "none", **kw})


def test_generative_cli_follows_the_classification_rules():
    from kdshield.cli.generative import generator_load_options

    assert generator_load_options(_args(dtype="bf16")).dtype == "bf16"  # PEFT / evaluate: as asked
    # auto stays auto (fp32 here): the run keys of fp32 work are those written before the option
    options = generator_load_options(_args())
    assert options.dtype == "auto" and options.resolved_dtype == "fp32" and "dtype" not in options.run_settings()
    assert generator_load_options(_args(), full_training="adapter.kind=full").dtype == "fp32"
    with pytest.raises(ConfigError, match="needs fp32 weights"):
        generator_load_options(_args(dtype="bf16"), full_training="adapter.kind=full")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            generator_load_options(_args(quantize="4bit"))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_activation_checkpointing_reaches_the_causal_lm_same_loss(tiny_llama_dir, kind):
    def loss_and_grads(on: bool):
        torch.manual_seed(0)
        gen = load_generator(tiny_llama_dir)
        attach_generator_adapter(gen, AdapterConfig(kind=kind, r=4))
        assert enable_activation_checkpointing(gen, "on" if on else "off") is on
        hf = hf_models(gen)
        flag = getattr(hf[0], "is_activation_checkpointing", None)
        flag = hf[0].is_gradient_checkpointing if flag is None else flag
        assert len(hf) == 1 and flag is on
        gen.train()
        batch = collate(encode_sft(gen.tokenizer, sft_rows(6), max_length=40), list(range(6)))
        loss, _ = sft_loss(gen, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in gen.named_parameters() if p.requires_grad}

    loss_off, grads_off = loss_and_grads(False)
    loss_on, grads_on = loss_and_grads(True)
    assert torch.allclose(loss_on, loss_off, rtol=1e-5)
    assert grads_on.keys() == grads_off.keys()
    for n in grads_off:
        assert torch.allclose(grads_on[n], grads_off[n], rtol=1e-4, atol=1e-6), n
