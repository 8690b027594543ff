"""Load dtype (auto | bf16 | fp16 | fp32) and quantised bases (4bit | 8bit): resolution, what trains in
fp32, the keys of cached work, and the errors before any work on a machine that cannot run them."""

from __future__ import annotations

import pytest
import torch

from kdshield import inference
from kdshield.cli import main
from kdshield.config import config_to_dict
from kdshield.errors import ConfigError
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import load_classifier
from kdshield.models.loading import LoadOptions, check_load_options
from kdshield.results import KEYS, make_record, settings_hash
from kdshield.runs import RunDir


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: False)


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU with avx512_bf16 / AMX: auto resolves to bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: True)


def test_auto_is_fp32_without_native_bf16_and_bf16_with_it(no_native_bf16, monkeypatch):
    assert inference.resolve_load_dtype("auto") == torch.float32
    assert LoadOptions().resolved_dtype == "fp32"
    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: True)
    assert inference.resolve_load_dtype("auto") == torch.bfloat16
    assert [inference.resolve_load_dtype(n) for n in ("bf16", "fp16", "fp32")] == [
        torch.bfloat16, torch.float16, torch.float32]


def test_unknown_dtype_and_quantize_are_config_errors():
    with pytest.raises(ConfigError, match="dtype='fp64'"):
        LoadOptions(dtype="fp64")
    with pytest.raises(ConfigError, match="quantize='3bit'"):
        LoadOptions(quantize="3bit")
    with pytest.raises(ConfigError, match="dtype='int4'"):
        inference.resolve_load_dtype("int4")


def test_bf16_base_keeps_head_and_adapters_fp32_and_trains(tiny_llama_dir, no_native_bf16):
    for kind in ("lora", "prompt-tuning", "p-tuning"):
        clf = load_classifier(tiny_llama_dir, num_labels=2, options=LoadOptions(dtype="bf16"))
        assert clf.load_dtype == "bf16"
        assert {p.dtype for p in clf.backbone.parameters()} == {torch.bfloat16}
        attach_adapter(clf, AdapterConfig(kind=kind, r=4))
        trainable = [p for p in clf.parameters() if p.requires_grad]
        assert trainable and {p.dtype for p in trainable} == {torch.float32}, kind
        frozen = {p.dtype for p in clf.parameters() if not p.requires_grad}
        assert frozen == {torch.bfloat16}, kind
        out = clf(**clf.encode(["a fine film", "dull"], max_length=16))
        assert out.logits.dtype == torch.float32
        torch.nn.functional.cross_entropy(out.logits, torch.tensor([1, 0])).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable), kind


def test_default_load_is_fp32_here(tiny_bert_dir, no_native_bf16):
    clf = load_classifier(tiny_bert_dir, num_labels=2)
    assert clf.load_dtype == "fp32"
    assert {p.dtype for p in clf.parameters()} == {torch.float32}


def test_bf16_logits_close_to_fp32(tiny_llama_dir, no_native_bf16):
    batch = None
    logits = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)  # the same fresh head
        clf = load_classifier(tiny_llama_dir, num_labels=2, options=LoadOptions(dtype=dtype)).eval()
        batch = batch or clf.encode(["a fine film", "dull and long"], max_length=16)
        with torch.no_grad():
            logits[dtype] = clf(**batch).logits
    assert torch.allclose(logits["bf16"], logits["fp32"], atol=3e-2, rtol=3e-2)
    assert not torch.equal(logits["bf16"], logits["fp32"])  # it really ran in bf16


def test_full_training_needs_fp32(tiny_llama_dir, no_native_bf16):
    assert LoadOptions().for_full_training().dtype == "fp32"
    assert LoadOptions(dtype="fp32").for_full_training().dtype == "fp32"
    with pytest.raises(ConfigError, match="needs fp32 weights"):
        LoadOptions(dtype="bf16").for_full_training("weight poisoning")
    with pytest.raises(ConfigError, match="quantised"):
        LoadOptions(quantize="4bit").for_full_training("weight poisoning")
    clf = load_classifier(tiny_llama_dir, num_labels=2, options=LoadOptions(dtype="bf16"))
    with pytest.raises(ConfigError, match="loaded as bf16"):
        attach_adapter(clf, AdapterConfig(kind="full"))


def test_auto_half_base_loads_again_in_fp32_for_full_training(tiny_llama_dir, native_bf16):
    clf = load_classifier(tiny_llama_dir, num_labels=2)  # auto: bf16 on this (simulated) CPU
    assert clf.load_dtype == "bf16"
    attach_adapter(clf, AdapterConfig(kind="full"))
    assert clf.load_dtype == "fp32"
    ref = load_classifier(tiny_llama_dir, num_labels=2, options=LoadOptions(dtype="fp32"))
    for (name, p), (_, q) in zip(clf.backbone.named_parameters(), ref.backbone.named_parameters(), strict=True):
        assert p.dtype == torch.float32 and p.requires_grad
        assert torch.equal(p, q), name  # the checkpoint's weights, not a cast-up bf16 copy


def test_keys_leave_fp32_out_and_take_the_resolved_dtype(no_native_bf16, monkeypatch):
    # fp32 (the format of every key made before the option) adds nothing: old keys stay valid
    assert LoadOptions().key() == {} and LoadOptions(dtype="fp32").key() == {}
    # the run directories' "load" entry as config_to_dict wrote it before the new fields
    assert LoadOptions().run_settings() == {"allow_pickle": False, "trust_remote_code": False}
    assert {k: v for k, v in config_to_dict(LoadOptions()).items() if k in ("allow_pickle", "trust_remote_code")} \
        == LoadOptions().run_settings()
    assert LoadOptions(dtype="bf16").key() == {"dtype": "bf16"}
    assert LoadOptions(quantize="4bit").key() == {"quantize": "4bit"}
    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: True)
    assert LoadOptions().key() == {"dtype": "bf16"}  # auto enters as what it resolved to
    assert settings_hash(LoadOptions().run_settings()) != settings_hash(LoadOptions(dtype="fp32").run_settings())


def test_a_bf16_run_does_not_reuse_an_fp32_run_dir(tmp_path, no_native_bf16):
    from kdshield.errors import RunStateError

    settings = {"model": "m", "load": LoadOptions().run_settings()}
    RunDir(tmp_path, "finetune", settings).open().finish(wall_s=1.0)
    RunDir(tmp_path, "finetune", {"model": "m", "load": LoadOptions(dtype="fp32").run_settings()},
           resume=True).open()  # fp32 either way: reused
    with pytest.raises(RunStateError, match="load.dtype"):
        RunDir(tmp_path, "finetune", {"model": "m", "load": LoadOptions(dtype="bf16").run_settings()},
               resume=True).open()


def test_records_carry_load_dtype():
    assert "load_dtype" in KEYS
    assert make_record("finetune", "lora", load_dtype="bf16")["load_dtype"] == "bf16"
    assert make_record("finetune", "lora")["load_dtype"] is None


def test_quantize_without_cuda_or_bitsandbytes_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for q in ("4bit", "8bit"):
        with pytest.raises(ConfigError, match=f"--quantize {q} needs a CUDA GPU"):
            check_load_options(LoadOptions(quantize=q))
    with pytest.raises(ConfigError, match="--dtype fp16 needs a CUDA GPU"):
        check_load_options(LoadOptions(dtype="fp16"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        real(name, *a))
    with pytest.raises(ConfigError, match=r"kdshield\[gpu\]"):
        check_load_options(LoadOptions(quantize="4bit"))


def test_loader_refuses_quantize_on_cpu(tiny_llama_dir, no_native_bf16):
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_classifier(tiny_llama_dir, num_labels=2, options=LoadOptions(quantize="4bit"))


@pytest.mark.parametrize("command,flags,match", [
    ("finetune", ["--quantize", "4bit"], "needs a CUDA GPU"),
    ("finetune", ["--dtype", "fp16"], "fp16 needs a CUDA GPU"),
    ("finetune", ["--adapter.kind", "full", "--dtype", "bf16"], "needs fp32 weights"),
    ("attack", ["--dtype", "bf16", "--attack", "badnet"], "weight poisoning trains every weight"),
    ("defend", ["--method", "w2s", "--quantize", "8bit"], "needs a CUDA GPU"),
    ("detect", ["--method", "strip", "--quantize", "4bit"], "needs a CUDA GPU"),
    ("evaluate", ["--quantize", "4bit"], "needs a CUDA GPU"),
])
def test_cli_refuses_before_the_data_loads(command, flags, match, tiny_llama_dir, tmp_path, monkeypatch, capsys,
                                           no_native_bf16):
    import kdshield.cli.common as common
    import kdshield.models.classifier as classifier
    from kdshield.cli import build_parser

    build_parser()  # every command module imported now, so none binds the patched functions below

    def must_not_run(*a, **k):
        raise AssertionError("data or model loaded before the load options were checked")

    monkeypatch.setattr(common, "build_task", must_not_run)
    monkeypatch.setattr(classifier, "_load_backbone", must_not_run)
    for name in ("finetune", "attack", "defend", "detect", "evaluate"):
        module = __import__(f"kdshield.cli.{name}", fromlist=["x"])
        if hasattr(module, "build_task"):
            monkeypatch.setattr(module, "build_task", must_not_run)
    model_flag = {"finetune": "--model", "evaluate": "--model"}.get(command, "--student")
    argv = [command, model_flag, str(tiny_llama_dir), "--data", "rotten-tomatoes", *flags]
    if command != "evaluate":
        argv += ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out" / "kdshield_run.json").exists()


def test_plan_takes_the_commands_names(capsys):
    """kdshield plan's --dtype auto and --activation-checkpointing auto resolve as the training
    options do: an 8B LoRA on a GPU plans bf16 weights with checkpointing on; full stays fp32."""
    import json
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "llama3-8b-config.json"
    assert main(["plan", "--model", str(fixture), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["settings"]
    assert (s["dtype"], s["activation_checkpointing"]) == ("bf16", True)
    assert main(["plan", "--model", str(fixture), "--mode", "full", "--activation-checkpointing", "off", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["settings"]
    assert (s["dtype"], s["activation_checkpointing"]) == ("fp32", False)
