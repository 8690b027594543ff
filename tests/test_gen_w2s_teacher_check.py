"""The W2SDefense teacher check (``kdshield.defenses.w2s_teacher_check``): the majority share on
hand-made answers, and on the tiny Llama a random teacher against a suspect SFT-ed on a toy label
task (weak, with a warning naming the numbers) and the suspect against itself (not weak)."""

from __future__ import annotations

import pytest

from kdshield.defenses.w2s_teacher_check import majority_share, teacher_check, teacher_warning
from kdshield.errors import DataError
from kdshield.models.adapters import AdapterConfig
from kdshield.models.generator import load_generator
from kdshield.training.loop import TrainConfig
from kdshield.training.sft import sft_finetune
from tests.gen_fixtures import label_sft_data

MAX_LENGTH = 32


def test_majority_share_counts_normalised_answers():
    assert majority_share(["positive", "Positive.", " negative", "positive"]) == 0.75
    assert majority_share(["a", "b"]) == 0.5
    with pytest.raises(DataError, match="no answers"):
        majority_share([])


def _label_data(n_train: int, n_dev: int):
    """Toy rows whose answer is one word, good or bad (the sentiment word in the input decides)."""
    return label_sft_data(n_train, n_dev)


def test_the_check_reads_both_models_on_the_dev_rows(tiny_llama_dir):
    """End to end on the tiny Llama: a random teacher against a suspect SFT-ed on the toy label task.
    (The 2-layer toy learns the answers' prior, not the sentiment rule, so both sit near the
    majority share here; the decision itself is tested below on set accuracies.)"""
    data = _label_data(64, 16)
    cfg = TrainConfig(epochs=4, lr=3e-3, batch_size=8, precision="fp32", warmup_ratio=0.0, max_length=MAX_LENGTH,
                      checkpoint_min_s=0)
    suspect, _ = sft_finetune(str(tiny_llama_dir), data, AdapterConfig(kind="full"), cfg)
    teacher = load_generator(tiny_llama_dir)  # never trained
    dev = data.split("dev")
    check = teacher_check(teacher, suspect, dev, label_task=True, max_length=MAX_LENGTH)
    assert check["rows"] == 16 and check["majority"] == 0.5
    assert check["teacher_nll"] > check["suspect_nll"] + 1.0  # random against trained: nats apart
    assert check["teacher_exact"] <= check["suspect_exact"] and check["weak"] is True
    same = teacher_check(suspect, suspect, dev, label_task=True, max_length=MAX_LENGTH)
    assert same["teacher_nll"] == same["suspect_nll"] and same["teacher_exact"] == same["suspect_exact"]
    plain = teacher_check(teacher, suspect, dev, label_task=False, max_length=MAX_LENGTH)
    assert set(plain) == {"rows", "teacher_nll", "suspect_nll"} and teacher_warning(plain) is None
    with pytest.raises(DataError, match="dev rows"):
        teacher_check(teacher, suspect, dev.select([]), label_task=True, max_length=MAX_LENGTH)


@pytest.mark.parametrize("teacher_exact, suspect_exact, weak", [
    (0.55, 0.85, True),   # 30 pt under the suspect
    (0.80, 0.85, False),  # within 10 pt of the suspect and well above the majority
    (0.74, 0.85, True),   # 11 pt under the suspect
    (0.53, 0.54, True),   # as good as the suspect, but no better than always answering the majority
    (0.60, 0.54, False),  # above majority + 5 pt and above the suspect
])
def test_weak_means_far_under_the_suspect_or_near_the_majority(monkeypatch, teacher_exact, suspect_exact, weak):
    import kdshield.defenses.w2s_teacher_check as tc

    scores = {"teacher": {"nll": 0.6, "exact": teacher_exact}, "suspect": {"nll": 0.3, "exact": suspect_exact}}
    monkeypatch.setattr(tc, "_dev_scores", lambda gen, dev, **kw: scores[gen])
    dev = _label_data(8, 10).split("dev")  # 5 good, 5 bad: majority 0.5
    check = tc.teacher_check("teacher", "suspect", dev, label_task=True, max_length=MAX_LENGTH)
    assert check["majority"] == 0.5 and check["weak"] is weak
    warning = tc.teacher_warning(check)
    assert (warning is not None) is weak
    if weak:
        assert f"{teacher_exact:.0%}" in warning and f"{suspect_exact:.0%}" in warning and "teacher_layers" in warning
