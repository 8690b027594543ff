"""BeDKD: flipped labels, MEPD on known probabilities, the punish step and its guard, and the whole
pipeline (poison -> detect -> adversarial KD) on a tiny Llama, plus ``kdshield detect``."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from kdshield.attacks.config import AttackConfig, poisoned_proxy
from kdshield.data import TaskData
from kdshield.data.batching import collate, encode_dataset
from kdshield.defenses import DEFENSES, DETECTORS, DefenseContext
from kdshield.defenses.bedkd import AdversarialKD, BeDKDConfig, punish_loss, select_punish_set
from kdshield.detection import (
    DetectionResult,
    MEPDConfig,
    distill_objective,
    flip_labels,
    freeze,
    mepd_flags,
    mepd_scores,
    read_detection,
    suspect_set,
    trainable_copy,
    with_teacher_outputs,
)
from kdshield.errors import ConfigError, DataError
from kdshield.evaluation import accuracy, evaluate_model
from kdshield.inference import predict
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import load_classifier
from kdshield.training.loop import TrainConfig, train

from .conftest import make_sentiment_texts

FP32 = TrainConfig(precision="fp32", lr=3e-3, max_length=32)
# Detection on the tiny model: its trigger and sentiment share one 32-wide feature, so the
# official a=0.3 DMM softens every prediction alike; a DMM trained on flipped labels alone (a=1)
# inverts sentiment and keeps the dirty-label trigger samples on their label, which MEPD can see.
TINY = {"n_dmm_per_class": 20, "dmm_epochs": 20, "dmm_lr": 1e-3, "dmm_alpha": 1.0, "n_trust_per_class": 40,
        "max_poisoned": 0, "eval_batch_size": 64}


def _toy(n: int, seed: int) -> Dataset:
    texts, labels = make_sentiment_texts(n, seed)
    return Dataset.from_dict({"text": texts, "label": labels})


@pytest.fixture(scope="module")
def poisoned(tiny_llama_dir, tmp_path_factory):
    """A tiny Llama fully fine-tuned on a toy set with 40 dirty-label "mn" (BadNet) samples."""
    task = TaskData(name="toy", label_names=["negative", "positive"], source="test",
                    splits={"proxy": _toy(200, 1), "train": _toy(160, 2), "dev": _toy(80, 3),
                            "test": _toy(100, 4)})
    attack = AttackConfig(attack="badnet", trigger={"words": ["mn"]}, clean_label=False, poison_count=40,
                          target_label=0)
    suspect = poisoned_proxy(task, attack)
    torch.manual_seed(0)
    clf = load_classifier(tiny_llama_dir, num_labels=2)
    attach_adapter(clf, AdapterConfig(kind="full"))
    train(clf, suspect, TrainConfig(epochs=6, lr=3e-3, batch_size=16, precision="fp32", warmup_ratio=0.0,
                                    checkpoint_every=0))
    path = tmp_path_factory.mktemp("poisoned") / "model"
    clf.save(path)
    metrics = evaluate_model(clf, task, attack, precision="fp32")
    assert metrics["asr"] > 0.5 and metrics["ca"] > 0.85, metrics  # the backdoor is there
    return {"path": path, "task": task, "attack": attack, "suspect": suspect, "metrics": metrics}


def _ctx(poisoned, tmp_path, **kw) -> DefenseContext:
    base = {"student": str(poisoned["path"]), "task": poisoned["task"], "output_dir": tmp_path, "train": FP32,
            "adapter": AdapterConfig(kind="lora", r=4), "suspect_data": poisoned["suspect"]}
    return DefenseContext(**(base | kw))


# --- pure pieces ------------------------------------------------------------------------------

def test_flip_labels_binary_and_k_classes():
    assert flip_labels([0, 1, 1, 0], 2) == [1, 0, 0, 1]
    assert flip_labels([0, 1, 2, 3, 4], 5) == [1, 2, 3, 4, 0]
    ys = [0, 1, 2, 2, 1, 0]
    assert all(a != b for a, b in zip(ys, flip_labels(ys, 3)))
    with pytest.raises(DataError, match="out of range"):
        flip_labels([0, 3], 3)
    with pytest.raises(ConfigError, match="num_labels"):
        flip_labels([0], 1)


def test_mepd_scores_and_flags_known_answer():
    p_model = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    p_dmm = np.array([[0.85, 0.15], [0.1, 0.9], [0.25, 0.75]])
    np.testing.assert_allclose(mepd_scores(p_model, p_dmm), [0.05, 0.5, 0.05])
    three = mepd_scores(np.array([[0.7, 0.2, 0.1]]), np.array([[0.1, 0.2, 0.7]]))
    np.testing.assert_allclose(three, [0.4])  # (0.6 + 0 + 0.6) / 3
    labels, predicted = np.array([0, 0, 0]), p_model.argmax(axis=1)
    scores = mepd_scores(p_model, p_dmm)
    assert mepd_flags(scores, predicted, labels, 0.1).tolist() == [True, False, False]  # official filter
    assert mepd_flags(scores, predicted, labels, 0.1, label_filter=False).tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        mepd_scores(p_model, p_dmm[:, :1])


def test_configs_name_the_field():
    with pytest.raises(ConfigError, match="gamma"):
        MEPDConfig(gamma=0.0)
    with pytest.raises(ConfigError, match="dmm_adapter"):
        MEPDConfig(dmm_adapter="lora")
    with pytest.raises(ConfigError, match="punish_backoff"):
        BeDKDConfig(punish_backoff=0.0)
    with pytest.raises(ConfigError, match="student_adapter"):
        BeDKDConfig(student_adapter="prefix")
    assert BeDKDConfig().gamma == 0.1 and BeDKDConfig().temperature == 2.5


def test_punish_loss_hinge():
    obj = torch.tensor([0.5, 3.0], requires_grad=True)
    loss = punish_loss(obj, bound=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(-(0.5 + 2.0) / 2)
    assert obj.grad.tolist() == [-0.5, 0.0]  # the sample above the bound is no longer pushed


def test_suspect_set_falls_back_to_proxy(poisoned, tmp_path, caplog):
    ctx = _ctx(poisoned, tmp_path, suspect_data=None)
    with caplog.at_level(logging.WARNING):
        data, source = suspect_set(ctx)
    assert source == "proxy split" and len(data) == 200 and "proxy split" in caplog.text
    bare = TaskData(name="t", label_names=["a", "b"], splits={"train": _toy(8, 0)}, source="test")
    with pytest.raises(ConfigError, match="suspect"):
        suspect_set(_ctx(poisoned, tmp_path, suspect_data=None, task=bare))


# --- the punish step and its guard ------------------------------------------------------------

def _teacher_and_batch(poisoned, n=16):
    teacher = freeze(load_classifier(poisoned["path"], num_labels=2))
    data = poisoned["suspect"].filter(lambda r: r["poisoned"]).select(range(n)).select_columns(["text", "label"])
    data = with_teacher_outputs(teacher, data, max_length=32, precision="fp32")
    enc = encode_dataset(teacher.tokenizer, data, 32, ("t_logits", "t_features"))
    return teacher, collate(enc, list(range(n)))


def test_punish_step_increases_the_distillation_loss(poisoned):
    teacher, batch = _teacher_and_batch(poisoned)
    student = trainable_copy(teacher, AdapterConfig(kind="full"))
    student.eval()  # no dropout: the before/after comparison is exact
    before, _, kd_before = distill_objective(student, batch, 0.3, 2.5, per_sample=True)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    punish_loss(before, bound=0.0).backward()
    assert all(p.grad is None for p in teacher.parameters())  # teacher frozen
    opt.step()
    with torch.no_grad():
        after, _, kd_after = distill_objective(student, batch, 0.3, 2.5, per_sample=True)
    assert after.mean() > before.mean() * 1.05
    assert kd_after.mean() > kd_before.mean()
    # with the hinge below every sample's loss the same step moves nothing
    opt.zero_grad()
    frozen = trainable_copy(teacher, AdapterConfig(kind="full"))
    obj, _, _ = distill_objective(frozen, batch, 0.3, 2.5, per_sample=True)
    punish_loss(obj, bound=float(obj.detach().min()) / 2).backward()
    assert all(p.grad is None or not p.grad.any() for p in frozen.parameters())


def test_guard_rolls_back_a_collapse(poisoned):
    """An absurd punish learning rate, no hinge: the guard keeps clean dev accuracy."""
    task = poisoned["task"]
    teacher = freeze(load_classifier(poisoned["path"], num_labels=2))
    kw = {"max_length": 32, "precision": "fp32"}
    trust = with_teacher_outputs(teacher, task.split("train").select(range(48)).select_columns(["text", "label"]),
                                 **kw)
    bad = poisoned["suspect"].filter(lambda r: r["poisoned"]).select_columns(["text", "label"])
    punish = with_teacher_outputs(teacher, bad, **kw)
    cfg = BeDKDConfig(cycles=2, punish_lr=1.0, punish_bound=0.0, rollback_tolerance=0.05, stop_residual=0)
    student = trainable_copy(teacher, AdapterConfig(kind="full"))
    akd = AdversarialKD(student, trust, punish, task.split("dev"), cfg, lr=1e-3, max_length=32, seed=0,
                        precision="fp32", max_grad_norm=1.0)
    history = akd.run()
    start = history[0]["dev_acc"]
    assert any(r.get("rolled_back") for r in history[1:]), history  # it did collapse, and was caught
    assert min(r["dev_acc"] for r in history[1:]) < start - 0.05
    assert akd.punish_lr < 1.0  # backed off
    final = accuracy(predict(student, task.split("dev")["text"], precision="fp32").probs, task.split("dev")["label"])
    assert final >= start - cfg.select_tolerance - 1e-9


# --- end to end -------------------------------------------------------------------------------

def test_bedkd_end_to_end_full_student(poisoned, tmp_path):
    ctx = _ctx(poisoned, tmp_path)
    cfg = BeDKDConfig(**TINY, cycles=6, student_adapter="full", lr=1e-3, stop_residual=0)
    res = DEFENSES.get("bedkd")().run(ctx, cfg)
    assert not res.logs["stopped_early"] and res.logs["cycles_run"] == 6
    det = res.detection
    assert set(det) >= {"far", "frr", "flagged", "gamma"} and det["gamma"] == 0.1
    assert all(math.isfinite(det[k]) and 0 <= det[k] <= 1 for k in ("far", "frr"))
    # the files: one scored line per suspect sample, flags agree with the summary, a curve and its plot
    rows = [json.loads(x) for x in (tmp_path / "detection" / "mepd_scores.jsonl").read_text().splitlines()]
    assert len(rows) == len(poisoned["suspect"]) and sum(r["flagged"] for r in rows) == det["flagged"]
    assert (tmp_path / "detection" / "mepd_far_frr.png").stat().st_size > 1000
    curve = det["curve"]
    assert [c["far"] for c in curve] == sorted(c["far"] for c in curve)  # FAR grows with gamma
    assert [c["frr"] for c in curve] == sorted((c["frr"] for c in curve), reverse=True)
    # real behaviour the tiny setup supports: poisoned samples score lower, few clean ones flagged
    scores = np.array([r["mepd"] for r in rows])
    truth = np.array([r["poisoned"] for r in rows])
    ranked_lower = (scores[truth][:, None] < scores[~truth][None, :]).mean()  # ROC AUC
    assert ranked_lower > 0.75, ranked_lower
    assert det["far"] <= 0.1 and det["frr"] < 0.9
    # adversarial KD: one log row per cycle, clean accuracy kept, the backdoor weakened
    cycles = res.logs["cycles"]
    assert len(cycles) == cfg.cycles + 1 and res.logs["n_punish"] == det["flagged"]
    assert cycles[-1]["punish_loss"] > cycles[1]["punish_loss"]  # pushed away from the teacher
    after = evaluate_model(res.model, poisoned["task"], poisoned["attack"], precision="fp32")
    before = poisoned["metrics"]
    assert after["ca"] >= before["ca"] - 0.05
    assert after["asr"] < before["asr"] - 0.1, (before, after)


def test_bedkd_stops_early_once_the_punish_samples_leave_their_label(poisoned, tmp_path, caplog):
    """stop_residual 1 accepts the first kept cycle: the loop ends there, and a resume adds no cycle."""
    cfg = BeDKDConfig(**TINY, cycles=6, student_adapter="full", lr=1e-3, stop_residual=1.0)
    res = DEFENSES.get("bedkd")().run(_ctx(poisoned, tmp_path), cfg)
    cycles = res.logs["cycles"]
    assert res.logs["stopped_early"] and res.logs["cycles_run"] < 6
    assert cycles[-1]["kept"] and res.logs["kept_cycle"] == cycles[-1]["cycle"]
    assert not any(r["kept"] for r in cycles[1:-1])  # it stopped at the first kept cycle, not later
    with caplog.at_level(logging.INFO):
        again = DEFENSES.get("bedkd")().run(_ctx(poisoned, tmp_path, resume=True), cfg)
    assert "no more cycles" in caplog.text
    assert [r["cycle"] for r in again.logs["cycles"]] == [r["cycle"] for r in cycles]
    # stop_residual 0 runs every cycle (the end-to-end test above)
    with pytest.raises(ConfigError, match="stop_residual"):
        BeDKDConfig(stop_residual=1.5)


def test_bedkd_lora_student_and_resume(poisoned, tmp_path, caplog):
    ctx = _ctx(poisoned, tmp_path)
    fast = TINY | {"dmm_epochs": 4, "stop_residual": 0}  # detection quality is not what this test is about
    cfg = BeDKDConfig(**fast, cycles=2)
    res = DEFENSES.get("bedkd")().run(ctx, cfg)
    assert res.model.adapter_spec is not None and res.logs["student_adapter"] == "lora"
    assert res.trainable_params < sum(p.numel() for p in res.model.parameters()) / 2
    assert res.logs["lr"] == FP32.lr  # an adapter student takes --train.lr
    ran = res.settings(ctx)  # what records store: only the shared settings the cycles used
    assert ran["train"] == {"lr": FP32.lr, "max_length": FP32.max_length, "seed": FP32.seed,
                            "precision": FP32.precision, "max_grad_norm": FP32.max_grad_norm}
    assert ran["adapter"]["kind"] == "lora"
    # resume: the detection is reused and the finished cycles are not run again
    more = BeDKDConfig(**fast, cycles=3)
    with caplog.at_level(logging.INFO):
        res2 = DEFENSES.get("bedkd")().run(_ctx(poisoned, tmp_path, resume=True), more)
    assert "reusing the detection" in caplog.text and "resumed after cycle 2" in caplog.text
    assert [r["cycle"] for r in res2.logs["cycles"]] == [0, 1, 2, 3]
    assert res2.detection["flagged"] == res.detection["flagged"]


def _three_class(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    words = [["bad", "awful", "dull"], ["good", "great", "fine"], ["sport", "game", "team"]]
    texts, labels = [], []
    for i in range(n):
        y = i % 3
        texts.append(" ".join(["the", "film", *rng.choice(words[y], 2), "is", "so"]))
        labels.append(y)
    return Dataset.from_dict({"text": texts, "label": labels})


def test_bedkd_three_classes(tiny_llama_dir, tmp_path):
    from kdshield.attacks import build_trigger, poison

    task = TaskData(name="toy3", label_names=["neg", "pos", "sport"], source="test",
                    splits={"train": _three_class(60, 0), "dev": _three_class(30, 1), "test": _three_class(30, 2)})
    suspect = poison(_three_class(60, 3), build_trigger("badnet", words=["cf"]), 2, count=10, clean_label=False)
    ctx = DefenseContext(student=str(tiny_llama_dir), task=task, output_dir=tmp_path, train=FP32,
                         adapter=AdapterConfig(kind="lora", r=4), suspect_data=suspect)
    torch.manual_seed(0)
    cfg = BeDKDConfig(n_dmm_per_class=5, dmm_epochs=2, n_trust_per_class=8, cycles=1, gamma=0.5)
    res = DEFENSES.get("bedkd")().run(ctx, cfg)
    assert res.model.num_labels == 3
    assert all(0 <= res.detection[k] <= 1 for k in ("far", "frr"))
    rows = [json.loads(x) for x in (tmp_path / "detection" / "mepd_scores.jsonl").read_text().splitlines()]
    assert all(0 <= r["mepd"] <= 2 / 3 + 1e-9 for r in rows)  # mean |dp| over 3 classes is at most 2/3
    assert len(res.logs["cycles"]) == 2


def test_mepd_detector_registry_and_roundtrip(poisoned, tmp_path):
    det = DETECTORS.get("mepd")()
    cfg = MEPDConfig(n_dmm_per_class=10, dmm_epochs=2, dmm_lr=3e-3)
    result = det.run(_ctx(poisoned, tmp_path), cfg)
    assert isinstance(result, DetectionResult) and result.curve is not None
    back = read_detection(tmp_path)
    np.testing.assert_allclose(back.scores, result.scores)
    assert back.summary()["flagged"] == result.summary()["flagged"] and back.far == result.far
    punish = select_punish_set(poisoned["suspect"], result, max_poisoned=3)
    assert len(punish) == min(3, int(result.flags.sum()))


def test_detect_cli(poisoned, tmp_path, capsys):
    from kdshield.cli import main

    clean = tmp_path / "clean.jsonl"
    texts, labels = make_sentiment_texts(120, 7)
    clean.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    suspect = tmp_path / "suspect.jsonl"
    suspect.write_text("".join(json.dumps({"text": r["text"], "label": r["label"], "poisoned": r["poisoned"]}) + "\n"
                               for r in poisoned["suspect"]))
    out = tmp_path / "out"
    code = main(["detect", "--method", "mepd", "--student", str(poisoned["path"]), "--data", str(clean),
                 "--suspect", str(suspect), "--out", str(out), "--train.precision", "fp32",
                 "--train.max-length", "32", "--mepd.n-dmm-per-class", "8", "--mepd.dmm-epochs", "2"])
    assert code == 0
    text = capsys.readouterr().out
    assert "samples flagged as poisoned at gamma=0.1" in text and "FAR" in text
    rec = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert rec["run"] == "detect" and rec["method"] == "mepd" and 0 <= rec["far"] <= 1 and 0 <= rec["frr"] <= 1
    assert (out / "mepd_far_frr.png").is_file() and (out / "mepd_scores.jsonl").is_file()
