"""W2SDefense: loss terms with known answers, gradient flow, teacher cache, tiny end to end."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from kdshield.attacks.config import AttackConfig, poisoned_proxy
from kdshield.data.core import TaskData
from kdshield.defenses import DEFENSES, DefenseContext
from kdshield.defenses.w2s import (
    W2SConfig,
    make_w2s_loss_fn,
    prepare_teacher,
    w2s_loss,
)
from kdshield.errors import ConfigError
from kdshield.evaluation import evaluate_model
from kdshield.inference import predict
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import load_classifier
from kdshield.training.loop import TrainConfig, train
from kdshield.training.losses import distillation_kl, feature_alignment


def test_identical_logits_give_zero_kd_and_identical_features_zero_fa():
    z = torch.randn(5, 3)
    h = torch.randn(5, 8)
    assert distillation_kl(z, z.clone(), 2.0).abs() < 1e-6
    assert feature_alignment(h, h.clone()) == 0
    for norm in ("l2", "rms"):
        assert feature_alignment(h, h.clone(), norm).abs() < 1e-6


def test_feature_alignment_known_value_and_per_example():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    assert feature_alignment(s, t).item() == pytest.approx((1 + 4) / 2)
    # per example: pairing each student row with another example's teacher row changes the loss
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    assert not torch.isclose(feature_alignment(s, t), feature_alignment(s, t[torch.randperm(6)]))
    with pytest.raises(ValueError, match="shapes differ"):
        feature_alignment(torch.randn(2, 3), torch.randn(2, 4))


def test_kd_known_value():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[0.0, 2 * torch.log(torch.tensor(3.0)).item()]])  # T=2 -> p_t = (1/4, 3/4)
    expected = 4 * (0.25 * torch.log(torch.tensor(0.5)) + 0.75 * torch.log(torch.tensor(1.5)))
    assert distillation_kl(s, t, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_weights_combine_terms():
    zs, zt = torch.randn(4, 2), torch.randn(4, 2)
    hs, ht = torch.randn(4, 6), torch.randn(4, 6)
    y = torch.tensor([0, 1, 1, 0])
    only_ce, _ = w2s_loss(zs, hs, y, zt, ht, W2SConfig(alpha=1, beta=0, gamma=0))
    full, logs = w2s_loss(zs, hs, y, zt, ht, W2SConfig(alpha=2, beta=3, gamma=0.5))
    assert set(logs) == {"ce", "kd", "fa"}
    assert full.item() == pytest.approx(2 * only_ce.item() + 3 * logs["kd"].item() + 0.5 * logs["fa"].item(),
                                        rel=1e-5)


def test_config_validation():
    with pytest.raises(ConfigError, match="w2s.gamma"):
        W2SConfig(gamma=-1)
    with pytest.raises(ConfigError, match="all 0"):
        W2SConfig(alpha=0, beta=0, gamma=0)
    with pytest.raises(ConfigError, match="unknown w2s preset"):
        W2SConfig.from_preset("nope")
    assert W2SConfig.from_preset("paper-badnet").alpha == 5.0
    assert W2SConfig() == W2SConfig.from_preset("embedded")  # the defaults are the tuned embedded preset
    with pytest.raises(ConfigError, match="w2s.lora_r"):
        W2SConfig(lora_r=0)
    # the tuning history's knobs are gone from the method's config (docs/w2sdefense.md says what they did)
    for removed in ("insert_share", "ema", "feature_norm", "select"):
        with pytest.raises(TypeError):
            W2SConfig(**{removed: None})


def test_student_adapter_overrides_only_lora():
    from kdshield.defenses.w2s import student_adapter

    lora = AdapterConfig(kind="lora", r=8, lora_alpha=16.0)
    assert student_adapter(lora, W2SConfig(lora_r=32, lora_alpha=64.0)) == AdapterConfig(kind="lora", r=32,
                                                                                           lora_alpha=64.0)
    assert student_adapter(lora, W2SConfig(lora_r=None, lora_alpha=None)) == lora
    prompt = AdapterConfig(kind="prompt-tuning")
    assert student_adapter(prompt, W2SConfig(lora_r=32)) == prompt


def _task(toy_dataset):
    return TaskData(name="toy", label_names=["negative", "positive"], source="test",
                    splits={"proxy": toy_dataset(32, 9), "train": toy_dataset(48, 1), "dev": toy_dataset(24, 2),
                            "test": toy_dataset(32, 3)})


def test_gradients_reach_only_adapter_and_head(tiny_llama_dir, tiny_bert_dir, toy_dataset):
    task = _task(toy_dataset)
    teacher = prepare_teacher(W2SConfig(teacher=str(tiny_bert_dir), teacher_epochs=1), task, 32,
                              TrainConfig(precision="fp32"))
    student = load_classifier(tiny_llama_dir, num_labels=2)
    attach_adapter(student, AdapterConfig(kind="lora", r=4))
    loss_fn = make_w2s_loss_fn(teacher.logits, teacher.features, W2SConfig())
    batch = student.encode(task.split("train")["text"][:4])
    batch.update(labels=torch.tensor(task.split("train")["label"][:4]), index=torch.arange(4))
    loss, _ = loss_fn(student, batch)
    loss.backward()
    with_grad = {name for name, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # lora_B starts at zero, so lora_A gets no gradient on the first step: B and the head do
    expected = {name for name, _ in student.named_parameters() if "lora_B" in name or name.startswith("head.")}
    assert len(expected) == 2 * 2 + 2  # q_proj, v_proj in each of 2 layers; head weight and bias
    assert with_grad == expected
    assert all(p.grad is None for p in teacher.model.parameters())
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_teacher_cache_hit(tiny_bert_dir, toy_dataset, tmp_path):
    task = _task(toy_dataset)
    cfg = W2SConfig(teacher=str(tiny_bert_dir), teacher_epochs=1)
    first = prepare_teacher(cfg, task, 32, TrainConfig(precision="fp32"), cache_root=tmp_path)
    second = prepare_teacher(cfg, task, 32, TrainConfig(precision="fp32"), cache_root=tmp_path)
    assert first.trained and not second.trained
    assert torch.equal(first.logits, second.logits) and torch.equal(first.features, second.features)
    assert first.features.shape == (48, 32)
    other = prepare_teacher(W2SConfig(teacher=str(tiny_bert_dir), teacher_epochs=2), task, 32,
                            TrainConfig(precision="fp32"), cache_root=tmp_path)
    assert other.trained and other.path != first.path


def test_teacher_cache_key_ignores_new_options_while_off():
    from kdshield.defenses.w2s import _cache_train_key

    key = _cache_train_key(TrainConfig())
    assert "ema" not in key and key["lr"] == 2e-4  # caches written before train.ema still hit
    assert _cache_train_key(TrainConfig(ema=0.9))["ema"] == 0.9


def test_w2s_end_to_end_tiny(tiny_llama_dir, tiny_bert_dir, toy_dataset, tmp_path):
    task = _task(toy_dataset)
    ctx = DefenseContext(student=str(tiny_llama_dir), task=task, output_dir=tmp_path / "w2s",
                         train=TrainConfig(epochs=2, batch_size=8, precision="fp32"),
                         adapter=AdapterConfig(kind="lora", r=4))
    defense = DEFENSES.get("w2s")()
    start = time.perf_counter()
    res = defense.run(ctx, W2SConfig(teacher=str(tiny_bert_dir), teacher_epochs=1, lr=5e-3, epochs=2, lora_r=6,
                                     lora_alpha=12.0))
    outer = time.perf_counter() - start
    # rank 6 on q_proj (32 -> 32) and v_proj (32 -> 16: one KV head of 16) in 2 layers, plus Linear(32, 2)
    lora = 2 * (6 * (32 + 32) + 6 * (32 + 16))
    assert res.trainable_params == lora + 32 * 2 + 2
    assert res.trainable_params == sum(p.numel() for p in res.model.parameters() if p.requires_grad)
    assert 0.5 * outer < res.wall_s <= outer  # the run's own wall time, in seconds
    assert res.model.adapter_spec["config"]["r"] == 6  # the defense's own rank, not --adapter.r
    assert res.adapter["r"] == 6 and res.adapter["lora_alpha"] == 12.0  # recorded as trained
    assert res.logs["train"]["steps"] == 12
    test = task.split("test")
    metrics = evaluate_model(res.model, task, None)
    probs = predict(res.model, list(test["text"])).probs
    assert metrics["ca"] == pytest.approx(float(np.mean(probs.argmax(1) == np.asarray(test["label"]))))
    assert metrics["n_ca"] == 32
    res.model.save(tmp_path / "adapter")
    again = load_classifier(tmp_path / "adapter")
    assert again.adapter_spec["kind"] == "lora" and again.adapter_spec["config"]["r"] == 6
    np.testing.assert_allclose(predict(again, list(test["text"])).probs, probs, atol=1e-5)


def test_w2s_keeps_last_weights_and_logs_dev_asr(tiny_llama_dir, tiny_bert_dir, toy_dataset, tmp_path):
    from safetensors.torch import load_file

    task = _task(toy_dataset)
    cfg = W2SConfig(teacher=str(tiny_bert_dir), teacher_epochs=1, lr=5e-3, epochs=3, lora_r=4, lora_alpha=8.0,
                    head_refit=False)  # the refit replaces the head after training (tested on its own below)
    ctx = DefenseContext(student=str(tiny_llama_dir), task=task, output_dir=tmp_path / "run",
                         train=TrainConfig(epochs=3, batch_size=8, precision="fp32", select_best=True),
                         adapter=AdapterConfig(kind="lora", r=4), attack=AttackConfig(attack="badnet"),
                         monitor=True)
    res = DEFENSES.get("w2s")().run(ctx, cfg)
    history = res.logs["train"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and all("asr" in h for h in history)  # per epoch
    # the returned student is the last epoch's (even with --train.select-best): its dev metrics are the last entry
    assert res.train.config["select_best"] is False
    dev = evaluate_model(res.model, task, AttackConfig(attack="badnet"), split="dev")
    assert history[-1]["asr"] == pytest.approx(dev["asr"]) and history[-1]["ca"] == pytest.approx(dev["ca"])
    last = load_file(str(tmp_path / "run" / "train" / "checkpoint" / "trainable.safetensors"))
    params = dict(res.model.named_parameters())
    assert all(torch.equal(params[n].detach().cpu(), v) for n, v in last.items())


def test_w2s_without_monitor_evaluates_only_its_last_epoch(tiny_llama_dir, tiny_bert_dir, toy_dataset, tmp_path):
    task = _task(toy_dataset)
    cfg = W2SConfig(teacher=str(tiny_bert_dir), teacher_epochs=1, lr=5e-3, epochs=3, lora_r=4, lora_alpha=8.0,
                    head_refit=False)
    ctx = DefenseContext(student=str(tiny_llama_dir), task=task, output_dir=tmp_path / "run",
                         train=TrainConfig(epochs=3, batch_size=8, precision="fp32"),
                         adapter=AdapterConfig(kind="lora", r=4), attack=AttackConfig(attack="badnet"))
    history = DEFENSES.get("w2s")().run(ctx, cfg).logs["train"]["history"]
    assert [h["epoch"] for h in history] == [3] and "asr" not in history[0]  # the last student, not monitored


def test_w2s_seed_changes_the_student_not_the_teacher(tiny_llama_dir, tiny_bert_dir, toy_dataset, tmp_path,
                                                      monkeypatch):
    monkeypatch.setenv("KDSHIELD_CACHE", str(tmp_path / "cache"))
    task = _task(toy_dataset)
    cfg = dict(teacher=str(tiny_bert_dir), teacher_epochs=1, lr=5e-3, epochs=1, lora_r=4, lora_alpha=8.0)
    runs = {}
    for seed in (None, 0, 1):
        ctx = DefenseContext(student=str(tiny_llama_dir), task=task, output_dir=tmp_path / f"s{seed}",
                             train=TrainConfig(epochs=1, batch_size=8, precision="fp32", seed=0),
                             adapter=AdapterConfig(kind="lora", r=4))
        res = DEFENSES.get("w2s")().run(ctx, W2SConfig(seed=seed, **cfg))
        runs[seed] = ({n: p.detach().clone() for n, p in res.model.named_parameters() if p.requires_grad},
                      res.logs["teacher_trained"])
    assert runs[None][1] and not runs[0][1] and not runs[1][1]  # one teacher for every student seed
    same = all(torch.equal(v, runs[0][0][n]) for n, v in runs[None][0].items())
    other = all(torch.equal(v, runs[1][0][n]) for n, v in runs[None][0].items())
    assert same and not other  # seed none follows --train.seed (0); seed 1 trains another student
    ran = {k: res.train.config[k] for k in ("lr", "epochs", "schedule", "seed", "select_best")}
    assert ran == {"lr": 5e-3, "epochs": 1, "schedule": "linear", "seed": 1, "select_best": False}
    with pytest.raises(ConfigError, match="w2s.seed"):
        W2SConfig(seed=-1)


def test_w2s_schedule_overrides_the_shared_one(tiny_llama_dir, tiny_bert_dir, toy_dataset, tmp_path):
    task = _task(toy_dataset)
    ctx = DefenseContext(student=str(tiny_llama_dir), task=task, output_dir=tmp_path / "run",
                         train=TrainConfig(epochs=1, batch_size=8, precision="fp32", schedule="linear"),
                         adapter=AdapterConfig(kind="lora", r=4))
    cfg = W2SConfig(teacher=str(tiny_bert_dir), teacher_epochs=1, lr=5e-3, epochs=1, lora_r=4, lora_alpha=8.0,
                    schedule="constant")
    res = DEFENSES.get("w2s")().run(ctx, cfg)
    assert res.train.config["schedule"] == "constant"
    with pytest.raises(ConfigError, match="w2s.schedule"):
        W2SConfig(schedule="step")


def test_head_refit_drops_weights_on_directions_clean_data_leaves_unused():
    from kdshield.models.classifier import ClassificationHead

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    x[:, 7] = 0.0  # a direction the clean features never use (the trigger's, say)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    head = ClassificationHead(8, 2)
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.weight[:, 0] = torch.tensor([-1.0, 1.0])
        head.out.weight[:, 7] = torch.tensor([5.0, -5.0])  # a dormant readout: "direction 7 means label 0"
    triggered = torch.zeros(1, 8)
    triggered[0, 0], triggered[0, 7] = 1.0, 1.0
    assert head(triggered)[0].argmax().item() == 0  # the dormant weight wins
    info = head.refit(x, y, l2=1e-3)
    assert torch.allclose(head.out.weight[:, 7], torch.zeros(2))  # fit from zero: nothing along 7
    assert head(triggered)[0].argmax().item() == 1
    assert info["train_acc_after"] >= 0.97 and info["n"] == 400
    with torch.no_grad():
        own = (head(x)[0].argmax(1) == y).double().mean().item()
    assert info["train_acc_after"] == pytest.approx(own, abs=1e-4)
    # a stronger penalty gives smaller weights
    strong = ClassificationHead(8, 2)
    strong.refit(x, y, l2=1.0)
    assert strong.out.weight.norm() < head.out.weight.norm()


def test_head_refit_keeps_a_projection_and_rejects_bad_input():
    from kdshield.models.classifier import ClassificationHead

    head = ClassificationHead(6, 3, kind="projection", proj_dim=5)
    proj = head.proj.weight.detach().clone()
    x = torch.randn(60, 6)
    y = torch.arange(60) % 3
    head.refit(x, y)
    assert torch.equal(head.proj.weight, proj)
    with pytest.raises(ConfigError, match="width 6"):
        head.refit(torch.randn(60, 5), y)
    with pytest.raises(ConfigError, match="labels must be in 0..2"):
        head.refit(x, y + 1)
    with pytest.raises(ConfigError, match="head_refit_l2"):
        W2SConfig(head_refit_l2=-1.0)


def test_w2s_head_refit_end_to_end(tiny_llama_dir, tiny_bert_dir, toy_dataset, tmp_path):
    from safetensors.torch import load_file


    task = _task(toy_dataset)
    ctx = DefenseContext(student=str(tiny_llama_dir), task=task, output_dir=tmp_path / "run",
                         train=TrainConfig(epochs=1, batch_size=8, precision="fp32"),
                         adapter=AdapterConfig(kind="lora", r=4), attack=AttackConfig(attack="badnet"))
    cfg = W2SConfig(teacher=str(tiny_bert_dir), teacher_epochs=1, lr=5e-3, epochs=1, lora_r=4, lora_alpha=8.0,
                    head_refit=True)
    res = DEFENSES.get("w2s")().run(ctx, cfg)
    refit = res.logs["head_refit"]
    clean = task.split("train")
    train_acc = float(np.mean(predict(res.model, list(clean["text"])).labels == np.asarray(clean["label"])))
    assert refit["n"] == 48 and refit["train_acc_after"] == pytest.approx(train_acc, abs=1e-4)
    dev = evaluate_model(res.model, task, AttackConfig(attack="badnet"), split="dev")
    assert refit["dev_after"]["asr"] == pytest.approx(dev["asr"])  # the monitor sees the refit student
    assert refit["dev_after"]["ca"] == pytest.approx(dev["ca"])
    trained = load_file(str(tmp_path / "run" / "train" / "checkpoint" / "trainable.safetensors"))
    params = dict(res.model.named_parameters())
    assert not torch.equal(params["head.out.weight"].detach().cpu(), trained["head.out.weight"])  # refit
    lora = [n for n in trained if "lora_" in n]
    assert lora and all(torch.equal(params[n].detach().cpu(), trained[n]) for n in lora)  # backbone kept
    assert DEFENSES.get("w2s")().run(ctx, dataclasses.replace(cfg, head_refit=False)).logs["head_refit"] is None


def test_w2s_head_refit_chooses_its_l2_weight_on_dev_rows(tiny_llama_dir, tiny_bert_dir, toy_dataset, tmp_path):
    """Several head_refit_l2 weights: each is fit on the clean train rows and scored on the clean dev
    rows; the one of lowest dev cross-entropy is the head the student ends with."""
    from kdshield.defenses.w2s import head_scores

    task = _task(toy_dataset)
    ctx = DefenseContext(student=str(tiny_llama_dir), task=task, output_dir=tmp_path / "run",
                         train=TrainConfig(epochs=1, batch_size=8, precision="fp32"),
                         adapter=AdapterConfig(kind="lora", r=4), attack=AttackConfig(attack="badnet"))
    cfg = W2SConfig(teacher=str(tiny_bert_dir), teacher_epochs=1, lr=5e-3, epochs=1, lora_r=4, lora_alpha=8.0,
                    head_refit_l2=[1e-4, 1.0, 100.0])
    res = DEFENSES.get("w2s")().run(ctx, cfg)
    refit = res.logs["head_refit"]
    assert [r["l2"] for r in refit["sweep"]] == [1e-4, 1.0, 100.0]
    best = min(refit["sweep"], key=lambda r: r["dev_nll"])
    assert refit["l2"] == best["l2"]
    dev = task.split("dev")
    feats = torch.from_numpy(predict(res.model, list(dev["text"]), with_features=True).features)
    nll, _ = head_scores(res.model.head, feats, torch.as_tensor(list(dev["label"])))
    assert nll == pytest.approx(best["dev_nll"], abs=1e-3)  # the kept head is the chosen fit
    with pytest.raises(ConfigError, match="empty list"):
        W2SConfig(head_refit_l2=[])
    with pytest.raises(ConfigError, match="head_refit_l2"):
        W2SConfig(head_refit_l2=[1e-3, -1.0])


def test_head_refit_is_on_by_default_and_off_in_the_paper_presets():
    assert W2SConfig().head_refit and W2SConfig.from_preset("embedded").head_refit
    assert not any(W2SConfig.from_preset(p).head_refit for p in ("paper-badnet", "paper-insent", "paper-syntactic"))


def test_w2s_lowers_the_asr_that_plain_lora_keeps(tiny_llama_dir, tiny_bert_dir, tmp_path):
    """A tiny Llama, fully fine-tuned on a proxy set with 60 dirty-label "mn" (BadNet) rows, keeps its
    backdoor through plain LoRA on clean data; W2SDefense on the same data, seed and shared settings
    removes a clear part of it and keeps CA.

    W2SConfig's defaults (tuned for the embedded MiniLM -> SmolLM2 pair) do not beat plain LoRA here:
    ASR 0.74 against LoRA's 0.80 at seed 0, and margins -0.17..0.06 over defense seeds 0-4. The
    changes from the defaults, and why:

    - teacher_epochs 5, teacher_lr 3e-3, teacher_batch_size 16: the random tiny BERT stays at chance
      (dev CA 0.5) with the defaults, which are meant for a pretrained MiniLM; these reach dev CA 1.0;
    - lr 3e-3, epochs 8 (defaults 1e-3, 4): the student needs more and larger steps for distillation
      to move its features (seeds 0-4: W2S ASR 0.20-0.39 against LoRA's 0.66-0.85). The same schedule
      with the distillation terms off (beta = gamma = 0) leaves ASR 0.50-0.71, so the schedule alone
      does not pass at seed 0 (0.68 against 0.80).

    gamma, beta, rank and the head refit keep their defaults.
    """
    from datasets import Dataset

    from .conftest import make_sentiment_texts

    def toy(n, seed):
        texts, labels = make_sentiment_texts(n, seed)
        return Dataset.from_dict({"text": texts, "label": labels})

    task = TaskData(name="toy", label_names=["negative", "positive"], source="test",
                    splits={"proxy": toy(200, 1), "train": toy(160, 2), "dev": toy(80, 3), "test": toy(200, 4)})
    attack = AttackConfig(attack="badnet", trigger={"words": ["mn"]}, clean_label=False, poison_count=60,
                          target_label=0)
    torch.manual_seed(0)
    attacker = load_classifier(tiny_llama_dir, num_labels=2)
    attach_adapter(attacker, AdapterConfig(kind="full"))
    train(attacker, poisoned_proxy(task, attack), TrainConfig(epochs=15, lr=3e-3, batch_size=16, precision="fp32",
                                                              warmup_ratio=0.0, checkpoint_every=0))
    attacker.save(tmp_path / "poisoned")
    poisoned = evaluate_model(attacker, task, attack, precision="fp32")

    shared = TrainConfig(epochs=2, lr=3e-3, batch_size=16, max_length=32, precision="fp32", seed=0,
                         checkpoint_every=0, select_best=False)

    def defend(method, config):
        ctx = DefenseContext(student=str(tmp_path / "poisoned"), task=task, output_dir=tmp_path / method,
                             train=shared, adapter=AdapterConfig(kind="lora", r=4))
        res = DEFENSES.get(method)().run(ctx, config)
        return res, evaluate_model(res.model, task, attack, precision="fp32")

    _, lora = defend("lora", DEFENSES.get("lora").config_class())
    w2s_res, w2s = defend("w2s", W2SConfig(teacher=str(tiny_bert_dir), teacher_epochs=5, teacher_lr=3e-3,
                                           teacher_batch_size=16, lr=3e-3, epochs=8))
    seen = {"poisoned": poisoned, "lora": lora, "w2s": w2s}
    assert poisoned["asr"] >= 0.8 and poisoned["ca"] >= 0.9, seen  # the backdoor is there
    assert lora["asr"] >= 0.6, seen  # plain LoRA on clean data keeps it
    assert w2s_res.logs["teacher_dev_ca"] >= 0.9, w2s_res.logs  # a teacher that learned the task
    assert w2s["asr"] < lora["asr"] - 0.2, seen  # W2SDefense removes a clear part of it
    assert w2s["ca"] >= 0.9, seen  # without losing the task (chance is 0.5)
