"""SFT on the one training loop, on conftest's tiny random Llama: token-label batches, encoding
masks, the loss, learning, kill-and-resume, prompt tuning.

    OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider tests/test_gen_training.py
"""

from __future__ import annotations

import pytest
import torch

from kdshield.data.batching import Encoded, collate, epoch_batches
from kdshield.data.sft import SFTData, sft_dataset
from kdshield.errors import RunStateError
from kdshield.generation import prompt
from kdshield.models.adapters import AdapterConfig
from kdshield.models.generator import attach_generator_adapter, load_generator
from kdshield.training.loop import TrainConfig, train
from kdshield.training.losses import response_ce
from kdshield.training.sft import (
    dev_nll_eval_fn,
    encode_sft,
    response_nll,
    sft_finetune,
    sft_loss,
)
from tests.gen_fixtures import make_sft_rows, sft_data, sft_rows

MAX_LENGTH = 40


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, lr=3e-3, batch_size=8, precision="fp32", warmup_ratio=0.0, max_length=MAX_LENGTH,
                checkpoint_min_s=0)
    return TrainConfig(**{**base, **kw})


def _weights(gen):
    return {n: p.detach().clone() for n, p in gen.named_parameters() if p.requires_grad}


def test_collate_pads_token_labels_and_counts_real_positions():
    enc = Encoded(input_ids=[[5, 6, 7], [8]], labels=[0, 1], pad_id=0,
                  token_labels=[[-100, 6, 7], [8]])
    for side in ("right", "left"):
        enc.padding_side = side
        b = collate(enc, [0, 1])
        ref = prompt.collate([prompt.EncodedExample(ids, lab, 0) for ids, lab in
                              zip(enc.input_ids, enc.token_labels)], pad_token_id=0, side=side)
        for key in ("input_ids", "attention_mask", "labels", "position_ids"):
            assert torch.equal(b[key], ref[key]), (side, key)
    assert b["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    # classification batches are as before: one label per example, no position ids
    plain = collate(Encoded(input_ids=[[5, 6, 7], [8]], labels=[0, 1], pad_id=0), [1, 0])
    assert plain["labels"].tolist() == [1, 0] and "position_ids" not in plain
    assert plain["input_ids"].tolist() == [[8, 0, 0], [5, 6, 7]]


def test_encode_sft_masks_exactly_prompt_and_padding(tiny_llama_dir):
    tok = load_generator(tiny_llama_dir).tokenizer
    ds = sft_rows(6)
    enc = encode_sft(tok, ds, max_length=MAX_LENGTH)
    assert len(enc) == 6 and enc.labels == [0] * 6 and enc.pad_id == 0
    for row, ids, labels in zip(ds, enc.input_ids, enc.token_labels):
        response = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        p = len(ids) - len(response)
        assert p > 0 and ids[p:] == response
        assert labels == [-100] * p + response
    for side in ("right", "left"):
        enc.padding_side = side
        b = collate(enc, list(range(6)))
        real = b["attention_mask"].bool()
        assert (b["labels"][~real] == -100).all()
        for j, labels in enumerate(enc.token_labels):
            assert b["labels"][j][real[j]].tolist() == labels


def test_encode_sft_cuts_the_input_and_carries_label_classes(tiny_llama_dir):
    tok = load_generator(tiny_llama_dir).tokenizer
    cols = make_sft_rows(4)
    cols["input"] = [" ".join(["the film"] * 30)] * 4
    cols["label"] = [0, 1, 1, 0]
    enc = encode_sft(tok, sft_dataset(cols), max_length=30, max_response_tokens=3)
    assert max(enc.lengths()) <= 30 and enc.labels == [0, 1, 1, 0]
    assert all(sum(t != -100 for t in labels) == 3 for labels in enc.token_labels)  # capped, no EOS


@pytest.mark.parametrize("side", ["right", "left"])
def test_sft_loss_equals_response_ce_on_full_logits(tiny_llama_dir, side):
    gen = load_generator(tiny_llama_dir)
    attach_generator_adapter(gen, AdapterConfig(kind="lora", r=4))
    enc = encode_sft(gen.tokenizer, sft_rows(6), max_length=MAX_LENGTH, padding_side=side)
    b = collate(enc, list(range(6)))
    loss, logs = sft_loss(gen, b)
    full = gen(b["input_ids"], b["attention_mask"], b["position_ids"]).logits
    assert torch.allclose(loss, response_ce(full, b["labels"]), atol=1e-5)
    loss.backward()  # gradients reach the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["lora", "full", "prompt-tuning", "p-tuning"])
def test_sft_lowers_the_response_loss(tiny_llama_dir, kind, tmp_path):
    """On held-out rows, from 4.44 nats (measured: LoRA 3.97, full 3.11, prompt tuning 4.37,
    p-tuning 4.36). A random model of width 32 barely follows virtual tokens (no lr tried did
    better), so their bar is lower; it still fails if no gradient reaches them."""
    data = sft_data(n_train=32, n_dev=8)
    lr = {"lora": 1e-2, "full": 3e-3, "prompt-tuning": 3e-1, "p-tuning": 3e-2}[kind]
    drop = {"lora": 0.3, "full": 0.8, "prompt-tuning": 0.04, "p-tuning": 0.04}[kind]
    adapter = AdapterConfig(kind=kind, r=8, num_virtual_tokens=8, encoder_hidden_size=32,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])
    gen = load_generator(tiny_llama_dir)
    before = response_nll(gen, encode_sft(gen.tokenizer, data.split("dev"), max_length=MAX_LENGTH))["nll"]
    gen, res = sft_finetune(gen, data, adapter, _cfg(epochs=4, lr=lr))
    after = response_nll(gen, encode_sft(gen.tokenizer, data.split("dev"), max_length=MAX_LENGTH))["nll"]
    assert after < before - drop, (before, after)
    assert res.steps == 4 * 4 and res.examples_seen == 4 * 32
    assert [h["at"] for h in res.history] == [f"epoch {i}" for i in range(1, 5)]
    assert all(h["score"] == -h["nll"] for h in res.history)
    assert res.best_score == max(h["score"] for h in res.history)
    assert gen.max_length == MAX_LENGTH
    gen.save(tmp_path / "g")
    again = load_generator(tmp_path / "g")
    assert again.max_length == MAX_LENGTH
    dev = encode_sft(again.tokenizer, data.split("dev"), max_length=MAX_LENGTH)
    assert response_nll(again, dev)["nll"] == pytest.approx(after, abs=1e-5)


def test_resume_continues_to_identical_result(tiny_llama_dir, tmp_path, monkeypatch):
    """A generative run killed after a checkpoint and resumed equals the uninterrupted one (LoRA
    dropout on, so the RNG state must come back too)."""
    from kdshield.training import sft as sft_module

    data = sft_data(n_train=40, n_dev=8)
    adapter = AdapterConfig(kind="lora", r=4, lora_dropout=0.1)
    cfg = _cfg(epochs=2, lr=1e-3, checkpoint_every=3)  # 5 steps per epoch: checkpoints at 3, 5, 6, 9, 10
    ref, _ = sft_finetune(tiny_llama_dir, data, adapter, cfg, output_dir=tmp_path / "ref")

    class Killed(Exception):
        pass

    calls = {"n": 0}

    def dying_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # mid second epoch, after the checkpoint at step 6
            raise Killed
        return sft_loss(model, batch)

    with monkeypatch.context() as m:
        m.setattr(sft_module, "sft_loss", dying_loss)
        with pytest.raises(Killed):
            sft_finetune(tiny_llama_dir, data, adapter, cfg, output_dir=tmp_path / "run")
    # a new process: nothing survives but the checkpoint
    fresh, res = sft_finetune(tiny_llama_dir, data, adapter, cfg, output_dir=tmp_path / "run", resume=True)
    assert res.resumed_from_step == 6
    wr, wf = _weights(ref), _weights(fresh)
    assert wr.keys() == wf.keys() and wr
    for n in wr:
        assert torch.allclose(wr[n], wf[n], atol=1e-6), n
    assert [h["nll"] for h in res.history] == pytest.approx([h["nll"] for h in _history(tmp_path / "ref")])


def _history(run_dir):
    import json

    return json.loads((run_dir / "checkpoint" / "state.json").read_text())["history"]


def test_resume_with_other_responses_is_other_data(tiny_llama_dir, tmp_path):
    data = sft_data(n_train=16, n_dev=4)
    adapter = AdapterConfig(kind="lora", r=4)
    cfg = _cfg(epochs=1)
    sft_finetune(tiny_llama_dir, data, adapter, cfg, output_dir=tmp_path / "run")
    cols = data.split("train").to_dict()
    cols["output"] = ["it is good ."] * len(cols["output"])  # same prompts, other responses
    other = SFTData(name=data.name, splits={**data.splits, "train": sft_dataset(cols)}, source="tests")
    with pytest.raises(RunStateError, match="data"):
        sft_finetune(tiny_llama_dir, other, adapter, cfg, output_dir=tmp_path / "run", resume=True)
    # the unchanged data reuses the finished run
    _, res = sft_finetune(tiny_llama_dir, data, adapter, cfg, output_dir=tmp_path / "run", resume=True)
    assert res.resumed_from_step == res.steps == 2


def test_train_takes_pre_encoded_data_and_needs_one_kind(tiny_llama_dir):
    gen = load_generator(tiny_llama_dir)
    attach_generator_adapter(gen, AdapterConfig(kind="lora", r=4))
    enc = encode_sft(gen.tokenizer, sft_rows(8), max_length=MAX_LENGTH)
    eval_fn = dev_nll_eval_fn(sft_rows(4, seed=9), max_length=MAX_LENGTH)
    res = train(gen, None, _cfg(epochs=1), encoded=enc, loss_fn=sft_loss, eval_fn=eval_fn)
    assert res.steps == 1 and res.history[0]["tokens"] > 0
    with pytest.raises(ValueError, match="train_data or encoded"):
        train(gen, None, _cfg(epochs=1), loss_fn=sft_loss)
    assert len(epoch_batches(enc.lengths(), 8, 0, 0)) == 1
