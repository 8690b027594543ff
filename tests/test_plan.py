"""The memory plan (kdshield.plan, ``kdshield plan``): parameter counts of a real 8B config, the
activation rules against the tensors autograd really saves in a small random Llama, fit / no-fit
verdicts, the inverted batch-size formula, and the command line. No weights are loaded."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from kdshield.cli import main
from kdshield.errors import ConfigError
from kdshield.plan import (
    GIB,
    NF4_BYTES_PER_PARAM,
    ModelShape,
    PlanSettings,
    activations,
    model_shape,
    plan_memory,
)

FIXTURE = Path(__file__).parent / "fixtures" / "llama3-8b-config.json"


@pytest.fixture(scope="module")
def llama8b() -> ModelShape:
    return model_shape(FIXTURE)


def test_8b_parameter_count(llama8b):
    # Meta-Llama-3-8B has 8.03e9 parameters (8,030,261,248)
    total = llama8b.causal_lm_params()
    assert abs(total - 8.03e9) / 8.03e9 < 0.01
    assert total == 8_030_261_248
    # the classifier loads the backbone only: the untied LM head (128256 x 4096) is not part of it
    assert llama8b.backbone_params() == total - 128_256 * 4096


def test_lora_r16_qv_trainable_count_by_hand(llama8b):
    # q_proj: 4096 -> 32 heads x 128 = 4096:  r (in + out) = 16 x (4096 + 4096) = 131,072
    # v_proj: 4096 ->  8 heads x 128 = 1024:  r (in + out) = 16 x (4096 + 1024) =  81,920
    # per layer 212,992; x 32 layers = 6,815,744; + the 2-class head 4096 x 2 + 2 = 8,194
    plan = plan_memory(llama8b, PlanSettings(mode="lora", lora_r=16, target_modules=("q_proj", "v_proj")))
    assert plan.params_trainable == 6_815_744 + 8_194 == 6_823_938
    assert plan.params_total == llama8b.backbone_params() + 8_194 + 6_815_744


def test_lora_count_matches_peft(tiny_llama_dir):
    """The plan's trainable count is the one peft + kdshield's head really create."""
    from kdshield.models.adapters import AdapterConfig, attach_adapter
    from kdshield.models.classifier import load_classifier

    clf = load_classifier(tiny_llama_dir, num_labels=3)
    attach_adapter(clf, AdapterConfig(kind="lora", r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    plan = plan_memory(model_shape(tiny_llama_dir),
                       PlanSettings(lora_r=4, target_modules=("q_proj", "v_proj", "down_proj"), num_labels=3))
    assert plan.params_trainable == clf.trainable_parameters()
    assert plan.params_total == sum(p.numel() for p in clf.parameters())


def test_full_fp32_8b_does_not_fit_80gib(llama8b):
    plan = plan_memory(llama8b, PlanSettings(mode="full", dtype="fp32", gpu_memory_gib=80))
    # weights + gradients + 2 moments, 16 bytes per parameter, before any activation
    assert plan.weights + plan.gradients + plan.optimizer == 16 * plan.params_total
    assert plan.peak > 1.4 * 80 * GIB
    assert plan.fits is False and plan.fit_batch_size == 0


def test_full_bf16_8b_sharded_over_8_gpus(llama8b):
    one = plan_memory(llama8b, PlanSettings(mode="full", dtype="bf16", batch_size=1, max_length=512,
                                            gpu_memory_gib=80))
    eight = plan_memory(llama8b, PlanSettings(mode="full", dtype="bf16", batch_size=1, max_length=512,
                                              processes=8, gpu_memory_gib=80))
    # bf16 weights and gradients, fp32 moments and an fp32 master copy: 2 + 2 + 8 + 4 bytes per parameter
    assert one.weights + one.gradients + one.optimizer + one.master == 16 * one.params_total
    assert eight.weights == pytest.approx(one.weights / 8)
    assert eight.optimizer == pytest.approx(one.optimizer / 8)
    assert eight.fsdp_gather > 0
    assert not one.fits and eight.fits


def test_qlora_8b_fits_24gib_at_batch_1_length_512(llama8b):
    plan = plan_memory(llama8b, PlanSettings(mode="qlora", batch_size=1, max_length=512, gpu_memory_gib=24))
    linear = 32 * llama8b.layer_linear_weights()
    others = llama8b.backbone_params() - linear + 8_194
    assert plan.weights == pytest.approx(linear * NF4_BYTES_PER_PARAM + others * 2 + 3_407_872 * 4)
    assert 4 * GIB < plan.weights < 5 * GIB
    assert plan.fits is True and plan.fit_batch_size >= 1
    assert plan.peak < 23 * GIB


def test_checkpointing_lowers_activations(llama8b):
    for mode in ("lora", "full", "qlora"):
        off = plan_memory(llama8b, PlanSettings(mode=mode, batch_size=4, max_length=512))
        on = plan_memory(llama8b, PlanSettings(mode=mode, batch_size=4, max_length=512,
                                               activation_checkpointing=True))
        assert on.activations < off.activations / 4, mode
        # full fine-tuning's peak is its optimizer step, which checkpointing does not change
        assert on.peak < off.peak if mode != "full" else on.peak == off.peak, mode


def test_fit_batch_size_inverts_the_peak_and_is_monotone(llama8b):
    fits = []
    for gib in range(8, 200, 4):
        plan = plan_memory(llama8b, PlanSettings(mode="lora", dtype="bf16", max_length=256, gpu_memory_gib=gib))
        budget = (gib - plan.reserve_gib) * GIB
        b = plan.fit_batch_size
        if b:
            assert plan.peak_for(b) <= budget < plan.peak_for(b + 1)
        fits.append(b)
    assert fits == sorted(fits) and fits[0] < fits[-1]
    assert fits[0] == 0  # 8 GiB hold no bf16 8B model


def test_classifier_never_materialises_the_logits(llama8b):
    settings = dict(mode="lora", dtype="bf16", batch_size=2, max_length=128)
    cls = activations(llama8b, PlanSettings(**settings))
    lm = activations(llama8b, PlanSettings(**settings, task="causal-lm"))
    # bf16 logits kept + their fp32 log-softmax: 6 bytes per vocabulary entry per token
    assert lm.per_token - cls.per_token == 128_256 * 6
    assert cls.per_example < 5 * 4096 * 4  # the head: one pooled feature per example


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="qk_proj"):
        PlanSettings(target_modules=("qk_proj",))
    with pytest.raises(ConfigError, match="mode"):
        PlanSettings(mode="prefix")
    with pytest.raises(ConfigError, match="batch_size"):
        PlanSettings(batch_size=0)


# --- the activation rules against autograd ----------------------------------------------------
TINY = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, max_position_embeddings=64)


def _saved_bytes(mode: str, dtype: torch.dtype, autocast: bool, padded: bool, checkpointing: bool,
                 batch: int, tokens: int) -> int:
    """Bytes of the distinct tensors autograd saves in the forward of a random tiny Llama (parameters
    excluded), under the same settings the plan models."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, LlamaConfig

    torch.manual_seed(0)
    model = AutoModel.from_config(LlamaConfig(**TINY)).to(dtype)
    if mode == "lora":
        model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if checkpointing:
        # the product's path (transformers 5's activation_checkpointing_enable, non-reentrant)
        from kdshield.training.memory import enable_activation_checkpointing

        assert enable_activation_checkpointing(model, "on")
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    mask = torch.ones(batch, tokens, dtype=torch.long)
    if padded:
        mask[0, tokens // 2:] = 0
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    ids = torch.randint(0, TINY["vocab_size"], (batch, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.requires_grad
    return sum(seen.values())


CASES = [  # mode, weights dtype, precision (autocast), padded
    ("lora", "fp32", "fp32", True), ("full", "fp32", "fp32", True), ("lora", "fp32", "fp32", False),
    ("lora", "bf16", "bf16", True), ("full", "bf16", "bf16", True),
    ("lora", "fp32", "bf16", True), ("full", "fp32", "bf16", True),
]


@pytest.mark.parametrize("mode,dtype,precision,padded", CASES)
def test_activation_rules_equal_autograds_saved_tensors(mode, dtype, precision, padded):
    from transformers import LlamaConfig

    batch, tokens = 3, 16
    shape = ModelShape.from_config(LlamaConfig(**TINY))
    settings = PlanSettings(mode=mode, dtype=dtype, precision=precision, batch_size=batch, max_length=tokens,
                            lora_r=4, padded=padded)
    acts = activations(shape, settings)
    planned = acts.forward_saved(batch, tokens) + acts.weight_copies
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    measured = _saved_bytes(mode, torch_dtype, precision == "bf16" and dtype == "fp32", padded, False, batch, tokens)
    assert planned == measured


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_checkpointing_saves_the_layer_inputs(mode):
    from transformers import LlamaConfig

    batch, tokens = 3, 16
    shape = ModelShape.from_config(LlamaConfig(**TINY))
    settings = PlanSettings(mode=mode, precision="fp32", batch_size=batch, max_length=tokens, lora_r=4,
                            activation_checkpointing=True)
    acts = activations(shape, settings)
    measured = _saved_bytes(mode, torch.float32, False, True, True, batch, tokens)
    without = _saved_bytes(mode, torch.float32, False, True, False, batch, tokens)
    # what checkpointing keeps: each layer's input plus the final norm's (cos/sin and mask aside)
    assert measured == pytest.approx(acts.forward_saved(batch, tokens), rel=0.05)
    assert measured < without / 3


# --- the command line -------------------------------------------------------------------------
def test_cli_qlora_8b_prints_the_table(capsys):
    assert main(["plan", "--model", str(FIXTURE), "--mode", "qlora", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "gradients", "optimizer", "activations", "peak", "24 GiB", "fits", "largest batch",
                 "7,508,340,738 total"):
        assert word in out, word
    assert "does NOT fit" not in out


def test_cli_json(capsys):
    assert main(["plan", "--model", str(FIXTURE), "--mode", "full", "--gpu-memory", "80", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["fit_batch_size"] == 0
    assert data["params_causal_lm"] == 8_030_261_248
    assert data["gib"]["peak"] > 112


def test_cli_bad_mode_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", str(FIXTURE), "--mode", "prefix"])
    assert exc.value.code == 2
    assert "invalid choice: 'prefix'" in capsys.readouterr().err


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "absent" / "config.json", "does not exist"),
    (lambda d: d / "absent-dir", "does not exist"),
    (lambda d: (d / "broken.json").write_text("{not json") and d / "broken.json", "not valid JSON"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no config.json"),
    (lambda d: (d / "bert.json").write_text(json.dumps({"model_type": "bert"})) and d / "bert.json",
     "Llama-style"),
])
def test_cli_bad_model_exits_2(tmp_path, capsys, make, message):
    assert main(["plan", "--model", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdshield: error:") and message in err and "Traceback" not in err


def test_cli_unprepared_builtin_exits_2(capsys):
    # tests run in an empty kdshield cache: the builtin is not prepared, and the plan converts nothing
    assert main(["plan", "--model", "smollm2-135m"]) == 2
    assert "kdshield assets" in capsys.readouterr().err


def test_cli_bad_target_module_exits_2(capsys):
    assert main(["plan", "--model", str(FIXTURE), "--target-modules", "q_proj,qkv"]) == 2
    assert "qkv" in capsys.readouterr().err
