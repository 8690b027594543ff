"""The generative head refit (``models.label_head``, ``defenses.label_refit``): the label words'
answer split refit from zero on clean rows, everything else the model's own; saved and loaded."""

from __future__ import annotations

import pytest
import torch

from kdshield.data.batching import collate
from kdshield.defenses.label_refit import answer_features, first_answer_tokens, refit_label_head
from kdshield.errors import ConfigError, ModelLoadError
from kdshield.models import label_head
from kdshield.models.adapters import AdapterConfig
from kdshield.models.generator import attach_generator_adapter, load_generator
from kdshield.training.logistic import fit_logistic
from kdshield.training.sft import encode_sft
from tests.gen_fixtures import label_sft_data

MAX_LENGTH = 40


def _label_data(n_train: int = 32, n_dev: int = 16):
    return label_sft_data(n_train, n_dev)


def _encoded(gen, data, split="train"):
    return encode_sft(gen.tokenizer, data.split(split), max_length=MAX_LENGTH)


def test_a_direction_clean_rows_never_use_gets_no_weight():
    """Why a refit from zero can drop a trigger's route: with L2, a feature that is 0 on every
    clean row gets weight 0, so moving a row along it changes nothing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    x[:, 4] = 0.0  # the "trigger" direction: unused by clean rows
    y = (x[:, 0] > 0).long()
    w, b, _ = fit_logistic(x, y, 2, l2=1e-3)
    assert torch.allclose(w[:, 4], torch.zeros(2, dtype=w.dtype))
    assert float(w[1, 0] - w[0, 0]) > 1.0  # and the clean direction is read
    triggered = x.clone()
    triggered[:, 4] = 50.0
    assert torch.equal((x.double() @ w.T + b).argmax(1), (triggered.double() @ w.T + b).argmax(1))


def test_the_head_keeps_every_other_logit_and_the_label_mass(tiny_llama_dir):
    gen = load_generator(tiny_llama_dir)
    ids = gen.tokenizer.convert_tokens_to_ids(["bad", "good"])
    batch = gen.tokenizer(["the film was", "it is very"], return_tensors="pt", padding=True)
    before = gen(batch["input_ids"], batch["attention_mask"]).logits
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(2, gen.hidden_size, generator=g), torch.randn(2, generator=g)
    label_head.install(gen.model, ids, weight, bias)
    assert gen.label_head is not None
    after = gen(batch["input_ids"], batch["attention_mask"]).logits
    others = [i for i in range(before.shape[-1]) if i not in ids]
    assert torch.equal(after[..., others], before[..., others])
    mass = lambda z: torch.logsumexp(z[..., ids], dim=-1)  # noqa: E731
    assert torch.allclose(mass(after), mass(before), atol=1e-5)
    # the split is the fit's softmax of the output layer's input
    label_head.install(gen.model, ids, torch.zeros_like(weight), torch.tensor([0.0, 3.0]))  # replaces, never stacks
    assert not isinstance(gen.label_head.base, label_head.LabelHead)
    z = gen(batch["input_ids"], batch["attention_mask"]).logits[..., ids]
    assert torch.allclose(z[..., 1] - z[..., 0], torch.full(z.shape[:-1], 3.0), atol=1e-5)
    assert label_head.remove(gen.model) is not None and gen.label_head is None
    assert torch.equal(gen(batch["input_ids"], batch["attention_mask"]).logits, before)


def test_refit_fits_the_first_answer_token_and_survives_save_and_load(tiny_llama_dir, tmp_path):
    data = _label_data()
    gen = load_generator(tiny_llama_dir)
    attach_generator_adapter(gen, AdapterConfig(kind="lora", r=4))
    train, dev = _encoded(gen, data), _encoded(gen, data, "dev")
    assert first_answer_tokens(train, 2) == gen.tokenizer.convert_tokens_to_ids(["bad", "good"])
    x = answer_features(gen, train)
    assert x.shape == (len(train), gen.hidden_size)
    info = refit_label_head(gen, train, num_labels=2, l2=1e-3, dev=dev)
    # a toy with a random backbone: its split is at chance before, the fit separates the train rows
    assert info["train_after"]["acc"] > info["train_before"]["acc"]
    assert info["train_after"]["acc"] >= 0.75 and set(info) >= {"dev_before", "dev_after", "token_ids"}
    assert torch.allclose(answer_features(gen, train), x)  # features are the wrapped layer's input
    # the split the model now gives at the first answer position is the fit's
    ids = torch.as_tensor(info["token_ids"])
    batch = collate(train, list(range(4)))
    labels = batch["labels"]
    first = (labels != -100).long().argmax(1)
    out = gen(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    z = out.logits[torch.arange(4), first - 1][:, ids]
    head = gen.label_head
    expected = torch.log_softmax(x[:4] @ head.split_weight.T + head.split_bias, dim=-1)
    assert torch.allclose(torch.log_softmax(z, dim=-1), expected, atol=1e-4)

    for merge in (False, True):
        path = gen.save(tmp_path / f"saved-{merge}", merge=merge)
        assert gen.label_head is not None  # saving puts it back
        again = load_generator(path)
        assert again.label_head is not None
        z2 = again(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).logits
        assert torch.allclose(z2, out.logits, atol=1e-5), merge
    (tmp_path / "saved-False" / label_head.LABEL_HEAD_FILE).unlink()
    with pytest.raises(ModelLoadError, match="label head but .* is missing"):
        load_generator(tmp_path / "saved-False")


def test_label_words_that_cannot_be_split_are_named(tiny_llama_dir):
    gen = load_generator(tiny_llama_dir)
    data = _label_data(8, 4)
    enc = _encoded(gen, data)
    with pytest.raises(ConfigError, match="no train row answers with label"):
        first_answer_tokens(enc, 3)
    enc.labels = [0] * len(enc.labels)  # both answers under one label
    with pytest.raises(ConfigError, match="start with different tokens"):
        first_answer_tokens(enc, 1)


def test_w2s_label_refit_runs_after_the_training_it_does_not_key(tiny_llama_dir, tmp_path):
    """``w2s.label_refit``: the student's training is the same run with the option on or off (a
    finished one is resumed, not repeated); on a label task the refit is installed and recorded, on
    another task it is skipped and says so."""
    from kdshield.defenses.w2s_generation import GenW2SConfig, gen_w2s_defend
    from kdshield.training.loop import TrainConfig
    from tests.gen_fixtures import sft_data

    def defend(data, out, **changes):
        cfg = GenW2SConfig(teacher_layers=1, teacher_cut="first", teacher_epochs=1, epochs=1, **changes)
        return gen_w2s_defend(str(tiny_llama_dir), data, cfg, base=str(tiny_llama_dir),
                              peft_train=TrainConfig(epochs=1, batch_size=8, max_length=MAX_LENGTH, seed=0,
                                                     checkpoint_every=0),
                              adapter=AdapterConfig(kind="lora"), output_dir=tmp_path / out, max_response_tokens=12,
                              teacher_cache=tmp_path / "teachers")

    data = _label_data(16, 8)
    plain = defend(data, "one")
    assert plain.model.label_head is None and "label_refit" not in plain.logs
    refit = defend(data, "one", label_refit=True)
    assert refit.train.resumed_from_step == plain.train.steps  # the same training, picked up where it ended
    info = refit.logs["label_refit"]
    assert refit.model.label_head is not None and info["token_ids"] == refit.model.label_head.token_ids.tolist()
    assert info["train_after"]["acc"] >= info["train_before"]["acc"] and "dev_after" in info
    other = defend(sft_data(16, 8), "two", label_refit=True)
    assert other.logs["label_refit"] == {"skipped": "not a label task"} and other.model.label_head is None
    with pytest.raises(ConfigError, match="label_refit must be true or false"):
        GenW2SConfig(label_refit="yes")
