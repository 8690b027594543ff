"""The Generator wrapper on conftest's tiny random Llama: logits, the lean loss path, padding,
virtual tokens, features, adapters, saving and safe loading.

    OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider tests/test_gen_model.py
"""

from __future__ import annotations

import json

import pytest
import torch

from kdshield.errors import ConfigError, ModelLoadError, UnsafeModelError
from kdshield.generation.prompt import collate, encode_example
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import load_classifier
from kdshield.models.generator import (
    FORMAT,
    Generator,
    attach_generator_adapter,
    is_generator_dir,
    load_generator,
    pool_features,
    predicting_mask,
)
from kdshield.training.losses import masked_token_nll, response_ce
from tests.gen_fixtures import sft_rows

ADAPTERS = ["none", "lora", "prompt-tuning", "p-tuning"]


def _gen(path, kind="none", seed=0) -> Generator:
    torch.manual_seed(seed)
    gen = load_generator(path)
    if kind != "none":
        attach_generator_adapter(gen, AdapterConfig(kind=kind, r=4, num_virtual_tokens=3,
                                                    encoder_hidden_size=16))
        _perturb(gen)
    return gen.eval()


@torch.no_grad()
def _perturb(gen, scale=0.5):
    """LoRA starts as a no-op (B = 0); random trainable weights make adapter bugs visible."""
    g = torch.Generator().manual_seed(1)
    for p in gen.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _examples(gen, n=4, seed=0, max_length=40):
    return [encode_example(r, gen.tokenizer, max_length=max_length) for r in sft_rows(n, seed)]


def _batch(gen, examples, side="right"):
    return collate(examples, pad_token_id=gen.tokenizer.pad_token_id, side=side)


def test_loads_causal_lm_with_its_tokenizer(tiny_llama_dir):
    gen = load_generator(tiny_llama_dir)
    assert gen.tokenizer.pad_token_id == 0 and gen.tokenizer.eos_token_id == 3
    assert gen.max_length is None and gen.max_new_tokens == 48 and gen.adapter_spec is None
    assert gen.hidden_size == 32 and gen.num_virtual_tokens == 0
    batch = _batch(gen, _examples(gen))
    with torch.no_grad():
        out = gen(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        ref = gen.model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1]).logits
    assert out.logits.shape == (*batch["input_ids"].shape, len(gen.tokenizer))
    n = int(batch["attention_mask"][0].sum())
    assert torch.allclose(out.logits[0, :n], ref[0, :n], atol=1e-5)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_lean_loss_equals_full_logits_loss(tiny_llama_dir, kind):
    gen = _gen(tiny_llama_dir, kind)
    batch = _batch(gen, _examples(gen, 5))
    with torch.no_grad():
        full = gen(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).logits
        lean = gen(**batch)
    assert lean.logits is None and lean.response_logits.shape[0] == int((batch["labels"] != -100).sum())
    want_nll, want_count = masked_token_nll(full, batch["labels"])
    nll, count = lean.token_nll()
    assert torch.equal(count, want_count)
    assert torch.allclose(nll, want_nll, atol=1e-4)
    assert torch.allclose(nll.sum() / count.sum(), response_ce(full, batch["labels"]), atol=1e-5)
    # every kept logit row is the full logit row at that position, predicting the next label
    rows, cols = predicting_mask(batch["labels"]).nonzero(as_tuple=True)
    assert torch.allclose(lean.response_logits, full[rows, cols], atol=1e-4)
    assert torch.equal(lean.targets, batch["labels"][rows, cols + 1])


@pytest.mark.parametrize("kind", ADAPTERS)
def test_left_and_right_padding_give_the_same_per_row_loss(tiny_llama_dir, kind):
    """Also with virtual tokens (peft's own forward drops position_ids, which shifts left-padded rows)."""
    gen = _gen(tiny_llama_dir, kind)
    examples = _examples(gen, 4)
    assert len({len(e.input_ids) for e in examples}) > 1  # padding happens
    per_row = {}
    with torch.no_grad():
        for side in ("left", "right"):
            nll, count = gen(**_batch(gen, examples, side)).token_nll()
            per_row[side] = nll / count
        alone = torch.cat([(lambda o: o[0] / o[1])(gen(**_batch(gen, [e])).token_nll()) for e in examples])
    assert torch.allclose(per_row["right"], alone, atol=1e-5)
    assert torch.allclose(per_row["left"], alone, atol=1e-5)


@pytest.mark.parametrize("kind", ["none", "prompt-tuning"])
def test_features_at_last_prompt_token_and_response_mean(tiny_llama_dir, kind):
    gen = _gen(tiny_llama_dir, kind)
    examples = _examples(gen, 3)
    feats = {}
    with torch.no_grad():
        for side in ("left", "right"):
            feats[side] = gen.features(**_batch(gen, examples, side))
        for i, e in enumerate(examples):
            one = _batch(gen, [e])
            hidden = gen(one["input_ids"], one["attention_mask"], output_hidden=True).hidden[0]
            assert hidden.shape == (len(e.input_ids), 32)
            for side in ("left", "right"):
                assert torch.allclose(feats[side].last_prompt[i], hidden[e.prompt_length - 1], atol=1e-5)
                assert torch.allclose(feats[side].response_mean[i], hidden[e.prompt_length:].mean(0), atol=1e-5)


def test_pool_features_by_hand():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])  # row 1 right-padded
    f = pool_features(hidden, labels)
    assert f.last_prompt.flatten().tolist() == [1.0, 4.0]
    assert f.response_mean.flatten().tolist() == [2.5, 5.0]
    with pytest.raises(ValueError, match="no labelled"):
        pool_features(hidden, torch.full((2, 4), -100))


@pytest.mark.parametrize("kind", ["lora", "prompt-tuning", "p-tuning", "full"])
def test_adapters_train_only_their_weights(tiny_llama_dir, kind):
    gen = load_generator(tiny_llama_dir)
    total = sum(p.numel() for p in gen.parameters())
    attach_generator_adapter(gen, AdapterConfig(kind=kind, r=4, num_virtual_tokens=3, encoder_hidden_size=16))
    trainable = [n for n, p in gen.named_parameters() if p.requires_grad]
    if kind == "full":
        assert gen.trainable_parameters() == total and gen.adapter_spec is None
        return
    assert trainable and 0 < gen.trainable_parameters() < total
    assert all(("lora_" in n) if kind == "lora" else ("prompt_encoder" in n) for n in trainable)
    assert gen.adapter_spec["kind"] == kind and gen.adapter_spec["base"] == str(tiny_llama_dir)
    with pytest.raises(ConfigError, match="already has an adapter"):
        attach_generator_adapter(gen, AdapterConfig(kind="lora"))


@pytest.mark.parametrize("kind,merge", [("lora", False), ("lora", True), ("prompt-tuning", False),
                                        ("p-tuning", False), ("full", False)])
def test_save_and_reload_give_identical_logits(tiny_llama_dir, tmp_path, kind, merge):
    gen = _gen(tiny_llama_dir, kind)
    gen.max_length, gen.max_new_tokens = 40, 12
    batch = _batch(gen, _examples(gen, 3), side="left")
    with torch.no_grad():
        before = gen(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).logits
    gen.save(tmp_path / "g", merge=merge)
    meta = json.loads((tmp_path / "g" / "kdshield.json").read_text())
    assert meta["format"] == FORMAT and meta["task"] == "generation"
    assert meta["max_length"] == 40 and meta["max_new_tokens"] == 12
    adapter_saved = kind not in ("full",) and not merge
    assert (tmp_path / "g" / "adapter").is_dir() == adapter_saved
    assert (tmp_path / "g" / "model.safetensors").is_file() == (not adapter_saved)
    assert not list((tmp_path / "g").rglob("*.bin"))
    assert is_generator_dir(tmp_path / "g") and not is_generator_dir(tiny_llama_dir)
    again = load_generator(tmp_path / "g").eval()
    assert again.max_length == 40 and again.max_new_tokens == 12
    assert (again.adapter_spec or {}).get("kind") == (kind if adapter_saved else None)
    with torch.no_grad():
        after = again(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(before, load_generator(tiny_llama_dir)(
        batch["input_ids"], batch["attention_mask"], batch["position_ids"]).logits, atol=1e-3)


def test_prompt_tuning_cannot_merge(tiny_llama_dir, tmp_path):
    gen = _gen(tiny_llama_dir, "prompt-tuning")
    with pytest.raises(ConfigError, match="cannot be merged"):
        gen.save(tmp_path / "m", merge=True)
    assert not (tmp_path / "m").exists()


def test_classifier_and_generator_dirs_name_the_right_loader(tiny_llama_dir, tmp_path):
    clf = load_classifier(tiny_llama_dir, num_labels=2)
    attach_adapter(clf, AdapterConfig(kind="lora", r=4))
    clf.save(tmp_path / "clf-adapter")
    load_classifier(tiny_llama_dir, num_labels=2).save(tmp_path / "clf")
    for name in ("clf", "clf-adapter"):
        with pytest.raises(ModelLoadError, match="classifier.*load_classifier"):
            load_generator(tmp_path / name)
        assert not is_generator_dir(tmp_path / name)
    load_generator(tiny_llama_dir).save(tmp_path / "gen")
    with pytest.raises(ModelLoadError, match="generat.*load_generator"):
        load_classifier(tmp_path / "gen", num_labels=2)


def test_refuses_encoders_pickle_and_damaged_metadata(tiny_llama_dir, tiny_bert_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="not a decoder-only causal LM"):
        load_generator(tiny_bert_dir)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(UnsafeModelError, match="pickle"):
        load_generator(pickled)
    gen = _gen(tiny_llama_dir, "lora")
    gen.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "kdshield.json").read_text())
    (tmp_path / "a" / "kdshield.json").write_text(json.dumps(dict(meta, max_length="long")))
    with pytest.raises(ModelLoadError, match="max_length"):
        load_generator(tmp_path / "a")
    (tmp_path / "a" / "kdshield.json").write_text(json.dumps(meta))
    for f in (tmp_path / "a" / "adapter").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_generator(tmp_path / "a")


@pytest.mark.parametrize("kind", ["prompt-tuning", "p-tuning"])
def test_virtual_tokens_follow_peft_on_right_padding(tiny_llama_dir, kind):
    """The hand-run virtual tokens give what peft's own forward gives where that one is right
    (right padding): virtual tokens at positions 0..n-1, the real tokens after them."""
    gen = _gen(tiny_llama_dir, kind)
    batch = _batch(gen, _examples(gen, 3), side="right")
    with torch.no_grad():
        ours = gen(batch["input_ids"], batch["attention_mask"]).logits
        peft_out = gen.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert peft_out.shape[1] == ours.shape[1] + 3
    real = batch["attention_mask"].bool()
    assert torch.allclose(ours[real], peft_out[:, 3:][real], atol=1e-5)
