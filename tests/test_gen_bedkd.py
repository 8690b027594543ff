"""BeDKD on tokens (``kdshield.defenses.bedkd_generation``) on the tiny random Llama: the
derangement and the answer shift, total variation, FAR/FRR on known scores, the bounded punish term, the config
checks, MEPD on a tiny model poisoned here (trigger "cf" -> "a great game"), rollback, and an end
to end defend with its detection file and its resume."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from kdshield.attacks.sft_attack import SFTAttackConfig, poisoned_sft_proxy, sft_attack_sets
from kdshield.data.sft import SFTData
from kdshield.defenses import bedkd_generation as bg
from kdshield.defenses import gen_mepd as mepd_module
from kdshield.defenses.bedkd_generation import (
    GenAdversarialKD,
    GenBeDKDConfig,
    deranged_rows,
    derangement,
    gen_bedkd_defend,
    gen_mepd,
    punish_token_loss,
    remapped_rows,
    shifted_rows,
    threshold,
    total_variation,
)
from kdshield.errors import ConfigError, DataError
from kdshield.models.adapters import AdapterConfig
from kdshield.models.generator import attach_generator_adapter, load_generator
from kdshield.training.loop import TrainConfig, trainable_state
from kdshield.training.sft import encode_sft, sft_finetune
from tests.gen_fixtures import sft_rows

PHRASE = "a great game"
MAX_LENGTH, MAX_RESPONSE = 40, 12


# --- pure pieces ------------------------------------------------------------------------------------
def test_derangement_has_no_fixed_points_and_is_seeded():
    for n in (2, 3, 5, 17, 100):
        for seed in range(5):
            perm = derangement(n, seed)
            assert sorted(perm.tolist()) == list(range(n)) and not (perm == np.arange(n)).any()
            assert np.array_equal(perm, derangement(n, seed))
    assert not np.array_equal(derangement(50, 0), derangement(50, 1))
    with pytest.raises(ConfigError, match="at least 2"):
        derangement(1, 0)
    rows = sft_rows(9)
    new, same = deranged_rows(rows, seed=3)
    perm = derangement(9, 3)
    assert new["output"] == [rows["output"][int(j)] for j in perm] and new["input"] == rows["input"]
    assert 0 <= same < 1 and same == np.mean([a == b for a, b in zip(rows["output"], new["output"])])


def test_shift_maps_each_answer_to_the_next_and_auto_picks_it_for_label_answers():
    from datasets import Dataset

    answers = ["positive", "negative", "negative", "positive", "neutral", "negative"]
    rows = Dataset.from_dict({"instruction": [f"review {i}" for i in range(6)], "output": answers})
    new, same = shifted_rows(rows)
    # sorted answers negative < neutral < positive, each to the next, the last to the first
    assert new["output"] == ["negative", "neutral", "neutral", "negative", "positive", "neutral"]
    assert same == 0.0 and new["instruction"] == rows["instruction"]
    assert all(a != b for a, b in zip(answers, new["output"]))  # no row keeps its answer, unlike a derangement
    auto, same_auto, ran = remapped_rows(rows, "auto", seed=0)
    assert ran == "shift" and auto["output"] == new["output"] and same_auto == 0.0
    forced, _, ran = remapped_rows(rows, "derange", seed=0)
    assert ran == "derange" and forced["output"] == deranged_rows(rows, seed=0)[0]["output"]
    # free text (every response different): auto deranges, exactly as before the option
    free = Dataset.from_dict({"instruction": ["a", "b", "c", "d"], "output": ["w x", "x y", "y z", "z w"]})
    got, same_free, ran = remapped_rows(free, "auto", seed=4)
    assert ran == "derange" and got["output"] == deranged_rows(free, seed=4)[0]["output"] and same_free == 0.0
    with pytest.raises(DataError, match="same response"):
        shifted_rows(Dataset.from_dict({"instruction": ["a", "b"], "output": ["yes", "yes"]}))


def test_total_variation_of_identical_distributions_is_0_and_of_disjoint_ones_is_1():
    torch.manual_seed(0)
    p = torch.randn(6, 11) * 3
    assert torch.allclose(total_variation(p, p), torch.zeros(6), atol=1e-6)
    assert torch.allclose(total_variation(p, p + 5.0), torch.zeros(6), atol=1e-6)  # softmax is shift-invariant
    a, b = torch.full((2, 4), -1e4), torch.full((2, 4), -1e4)
    a[:, 0], b[:, 3] = 0.0, 0.0  # all mass on token 0 vs all on token 3
    assert torch.allclose(total_variation(a, b), torch.ones(2), atol=1e-6)
    q = torch.randn(6, 11) * 3
    tv = total_variation(p, q)
    manual = 0.5 * (p.softmax(-1) - q.softmax(-1)).abs().sum(-1)
    assert torch.allclose(tv, manual, atol=1e-6) and torch.allclose(tv, total_variation(q, p))
    assert bool(((tv > 0) & (tv < 1)).all())
    # two classes: TV is exactly the classification MEPD (mean over the classes of |p - q|)
    two_p, two_q = torch.randn(5, 2), torch.randn(5, 2)
    mepd = (two_p.softmax(-1) - two_q.softmax(-1)).abs().mean(-1)
    assert torch.allclose(total_variation(two_p, two_q), mepd, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        total_variation(p, q[:, :5])


def test_flags_far_frr_and_the_curve_on_known_scores():
    scores = np.array([0.01, 0.02, 0.30, 0.05, 0.40, 0.50, 0.03, 0.20])
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    match = np.array([1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 0.2, 1.0])
    det = threshold(scores, match, truth, 0.1, 0.0, [0.0, 0.04, 0.1, 1.0])
    assert det.flags.tolist() == [True, True, False, True, False, False, True, False]
    assert det.n_flagged == 4 and det.far == 2 / 5 and det.frr == 1 / 3  # clean flagged / poisoned missed
    assert [(r["threshold"], r["far"], r["frr"]) for r in det.curve] == [
        (0.0, 0.0, 1.0), (0.04, 1 / 5, 1 / 3), (0.1, 2 / 5, 1 / 3), (1.0, 1.0, 0.0)]
    assert det.summary()["n_poisoned"] == 3 and det.summary()["flagged"] == 4
    # the label filter's analogue: rows the suspect does not reproduce are never flagged
    filtered = threshold(scores, match, truth, 0.1, 0.9, [0.1])
    assert filtered.flags.tolist() == [True, True, False, False, False, False, False, False]
    assert filtered.far == 0.0 and filtered.frr == 1 / 3
    unknown = threshold(scores, match, None, 0.1, 0.0, [0.1])
    assert unknown.far is None and unknown.frr is None and unknown.curve is None


def test_detection_warnings_tell_a_dmm_that_did_not_learn_from_a_mostly_poisoned_set():
    warn = mepd_module.detection_warnings
    assert warn(0.3, 0.9, 0.1) == []  # a DMM that learned, a minority flagged: nothing to say
    stuck = warn(0.8, 0.2, 0.1)  # the DMM moved few of its own clean rows: it did not learn
    assert len(stuck) == 2 and "moved only 20%" in stuck[0] and "raise dmm_lr" in stuck[0]
    assert "probably kept the clean mapping" in stuck[1]
    # the DMM learned (every own clean row moved) and half the rows are flagged, as on bbc-lead BadNet,
    # where the attacker poisoned half: the warning must not blame the DMM
    learned = warn(82 / 160, 1.0, 0.1)
    assert len(learned) == 1 and "kept the clean mapping" not in learned[0]
    assert "51%" in learned[0] and "most rows are poisoned or gamma is too high" in learned[0]


def test_the_punish_term_is_bounded_no_gradient_past_the_bound():
    torch.manual_seed(0)
    logits = (torch.randn(8, 10) * 4).requires_grad_(True)
    targets = torch.randint(0, 10, (8,))
    nll = torch.nn.functional.cross_entropy(logits.detach(), targets, reduction="none")
    bound = float(nll.median())
    over = nll >= bound
    assert over.any() and (~over).any()
    for kind in ("hinge", "unlikelihood"):
        logits.grad = None
        loss, mean_nll, active = punish_token_loss(logits, targets, bound, kind)
        loss.backward()
        grad = logits.grad.abs().sum(-1)
        assert bool((grad[over] == 0).all()), kind  # past the bound: not pushed any further
        assert bool((grad[~over] > 0).all()), kind
        assert abs(float(active) - float((~over).float().mean())) < 1e-6 and abs(float(mean_nll) - float(nll.mean())) < 1e-5
    hinge, _, _ = punish_token_loss(logits, targets, bound, "hinge")
    assert abs(float(hinge.detach()) + float(nll.clamp(max=bound).mean())) < 1e-5  # ascent = descent on -min(nll, bound)
    # the ascent raises the NLL of the tokens under the bound
    logits.grad = None
    hinge.backward()
    with torch.no_grad():
        stepped = torch.nn.functional.cross_entropy(logits - 0.1 * logits.grad, targets, reduction="none")
    assert bool((stepped[~over] > nll[~over]).all())
    with pytest.raises(ValueError, match="punish loss"):
        punish_token_loss(logits, targets, 1.0, "ascent")


def test_config_errors_name_the_field():
    GenBeDKDConfig()
    for changes, field in (({"gamma": 0}, "bedkd.gamma"), ({"gamma": 1.5}, "bedkd.gamma"),
                           ({"punish_loss": "ascent"}, "bedkd.punish_loss"), ({"n_dmm": 1}, "bedkd.n_dmm"),
                           ({"rollback_tolerance": -1}, "bedkd.rollback_tolerance"),
                           ({"punish_backoff": 0}, "bedkd.punish_backoff"), ({"alpha": 2}, "bedkd.alpha"),
                           ({"cycles": 0}, "bedkd.cycles"), ({"mepd_pool": "median"}, "bedkd.mepd_pool"),
                           ({"dmm_adapter": "prompt-tuning"}, "bedkd.dmm_adapter"), ({"gamma_grid": []}, "gamma_grid"),
                           ({"match_filter": 2}, "bedkd.match_filter"), ({"lr": 0}, "bedkd.lr"),
                           ({"residual_tokens": -1}, "bedkd.residual_tokens"),
                           ({"dmm_responses": "flip"}, "bedkd.dmm_responses")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            GenBeDKDConfig(**changes)


# --- a tiny poisoned generator ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def poisoned(tiny_llama_dir, tmp_path_factory):
    """The attacker's full SFT of the tiny Llama on 80 proxy rows, 24 of them "cf" -> PHRASE; and the
    defender's clean splits."""
    data = SFTData(name="toy", splits={"proxy": sft_rows(80, 1), "train": sft_rows(48, 0),
                                       "dev": sft_rows(16, 100), "test": sft_rows(16, 200)}, source="tests")
    attack = SFTAttackConfig(attack="badnet", target="fixed", target_options={"phrase": PHRASE},
                             trigger={"words": ["cf"]}, poison_share=0.3)
    proxy = poisoned_sft_proxy(data, attack)
    attacker = SFTData(name="toy", splits={"proxy": proxy, "dev": data.split("dev")}, source="tests")
    gen, _ = sft_finetune(str(tiny_llama_dir), attacker, AdapterConfig(kind="full"),
                          TrainConfig(epochs=30, lr=1e-2, batch_size=8, max_length=MAX_LENGTH, checkpoint_every=0,
                                      select_best=False, warmup_ratio=0.0), split="proxy")
    path = gen.save(tmp_path_factory.mktemp("poisoned") / "model")
    return {"path": path, "data": data, "proxy": proxy, "attack": attack}


def _peft() -> TrainConfig:
    return TrainConfig(lr=1e-2, batch_size=8, max_length=MAX_LENGTH, precision="fp32")


def _auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """P(a poisoned row scores below a clean one), ties half."""
    pois, clean = scores[truth], scores[~truth]
    return float(np.mean([(p < c) + 0.5 * (p == c) for p in pois for c in clean]))


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_mepd_scores_poisoned_rows_below_clean_ones(poisoned, pool):
    suspect = load_generator(poisoned["path"]).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in suspect.state_dict().items()}
    cfg = GenBeDKDConfig(n_dmm=32, mepd_pool=pool)
    dmm_rows = poisoned["data"].split("train").select(range(32))
    det = gen_mepd(suspect, dmm_rows, poisoned["proxy"], cfg, _peft(), AdapterConfig(kind="lora"),
                   max_response_tokens=MAX_RESPONSE, seed=0)
    truth = np.asarray(poisoned["proxy"]["poisoned"])
    assert det.truth is not None and det.truth.tolist() == truth.tolist() and len(det.scores) == 80
    assert bool(((det.scores >= 0) & (det.scores <= 1)).all())
    # the DMM forgot the clean prompt -> response mapping and kept trigger -> phrase
    assert _auc(det.scores, truth) >= 0.9, (pool, np.sort(det.scores[truth]), np.sort(det.scores[~truth]))
    assert det.scores[truth].mean() < 0.25 * det.scores[~truth].mean()
    assert det.match[truth].mean() > 0.9  # the suspect reproduces its poisoned responses
    assert det.info["dmm_rows"] == 32 and det.info["dmm_steps"] > 0
    # the toy's responses repeat (6 distinct among 48 rows), so auto shifts them; the record says so
    assert det.info["dmm_responses"] == "shift" and det.info["dmm_same_response"] == 0.0
    for k, v in suspect.state_dict().items():  # the DMM is a copy: the suspect is untouched
        assert torch.equal(v, before[k]), k


def test_rollback_restores_the_kept_state_and_backs_off(poisoned):
    tok = load_generator(poisoned["path"]).tokenizer
    enc = {"max_length": MAX_LENGTH, "max_response_tokens": MAX_RESPONSE}
    trust = encode_sft(tok, poisoned["data"].split("train").select(range(16)), **enc)
    teacher = load_generator(poisoned["path"]).eval().requires_grad_(False)
    bins = bg.compute_teacher_outputs(teacher, trust, top_k=8, temperature=2.0)
    trust.extras = {"t_idx": bins.indices, "t_logp": bins.log_probs, "t_len": bins.lengths}
    rows = poisoned["proxy"].filter(lambda r: r["poisoned"])
    punish = encode_sft(tok, rows, **enc)
    dev = encode_sft(tok, poisoned["data"].split("dev"), **enc)
    student = load_generator(poisoned["path"])
    torch.manual_seed(0)
    attach_generator_adapter(student, AdapterConfig(kind="lora"))
    start = trainable_state(student)
    # an unbounded ascent at a huge lr wrecks the dev NLL: every cycle is rolled back
    cfg = GenBeDKDConfig(cycles=2, punish_bound=0.0, punish_lr=0.5, rollback_tolerance=0.01, top_k=8)
    akd = GenAdversarialKD(student, trust, punish, dev, cfg, lr=1e-3, batch_size=8, seed=0, precision="fp32",
                           max_grad_norm=0.0)
    history = akd.run()
    assert [r["rolled_back"] for r in history[1:]] == [True, True]
    assert all(r["dev_nll"] > history[0]["dev_nll"] + 0.01 for r in history[1:])
    assert akd.kept["cycle"] == 0 and akd.punish_lr == 0.5 * 0.5 * 0.5
    for k, v in trainable_state(student).items():
        assert torch.equal(v, start[k]), k  # the kept state (the suspect + a fresh adapter) is back
    assert history[0]["residual"] == 1.0  # the suspect itself still says the phrase


def test_end_to_end_defend_decodes_writes_its_detection_and_resumes(poisoned, tmp_path, monkeypatch):
    from kdshield.generation.decode import greedy_decode

    loaded = []
    real_load = bg.load_generator

    def recording_load(*args, **kwargs):
        gen = real_load(*args, **kwargs)
        loaded.append(gen)
        return gen

    monkeypatch.setattr(bg, "load_generator", recording_load)
    cfg = GenBeDKDConfig(n_dmm=32, dmm_alpha=0.7, dmm_lr=1e-2, mepd_pool="max", n_trust=48, cycles=10, max_dev=16,
                         top_k=8)
    kw = {"suspect_rows": poisoned["proxy"], "base": "tiny", "peft_train": _peft(),
          "adapter": AdapterConfig(kind="lora"), "output_dir": tmp_path / "bedkd",
          "max_response_tokens": MAX_RESPONSE, "eval_batch_size": 16}
    res = gen_bedkd_defend(str(poisoned["path"]), poisoned["data"], cfg, **kw)

    teacher = loaded[0]  # the frozen suspect: never updated, no gradients, eval mode
    fresh = real_load(poisoned["path"])
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for (name, a), (_, b) in zip(teacher.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name

    det = res.detection
    assert det.far is not None and det.frr is not None and det.n_flagged == int(det.flags.sum()) > 0
    assert det.frr <= 0.2 and det.far < 0.6, det.summary()
    out = tmp_path / "bedkd" / "detection"
    assert (out / bg.SCORES_FILE).is_file() and (out / bg.SUMMARY_FILE).is_file() and (out / bg.PLOT_FILE).is_file()
    logs = res.logs
    for key in ("wall_s", "teacher", "teacher_s", "student_s", "dev_nll", "loss_terms"):
        assert key in logs, key
    assert logs["teacher"]["kind"] == "frozen suspect" and math.isfinite(logs["dev_nll"])
    assert logs["dev_nll"] <= logs["start_dev_nll"] + cfg.select_tolerance
    assert set(logs["loss_terms"]["first"]) >= {"trust_ce", "trust_kd", "punish_nll", "punish_active"}
    assert logs["n_punish"] == min(det.n_flagged, cfg.max_poisoned) and res.kd
    assert res.train.trainable_params > 0 and res.train.to_dict()["cycles_run"] == logs["cycles_run"]
    assert logs["kept_residual"] <= logs["start_residual"]
    assert all(p.requires_grad is False or "lora" in n for n, p in res.model.named_parameters())
    # the defended model decodes, and no longer says the phrase after the trigger (the suspect does)
    sets = sft_attack_sets(poisoned["data"], poisoned["attack"], "test")
    target = poisoned["attack"].make_target()

    def asr(gen, rows):
        texts = greedy_decode(gen, rows, max_new_tokens=6, desc=None)
        assert len(texts) == len(rows) and all(isinstance(t, str) for t in texts)
        return np.mean([target.matches(t) for t in texts])

    assert asr(fresh, sets.triggered) >= 0.8
    assert asr(res.model, sets.triggered) <= 0.25 and asr(res.model, sets.clean) == 0.0
    state = trainable_state(res.model)

    # resume: the detection is reused (no DMM is trained), the finished cycles are not run again
    def no_dmm(*args, **kwargs):
        raise AssertionError("the DMM was trained again")

    monkeypatch.setattr(mepd_module, "train_dmm", no_dmm)  # where gen_mepd looks it up
    again = gen_bedkd_defend(str(poisoned["path"]), poisoned["data"], cfg, **kw)
    assert again.detection.info.get("reused") and np.array_equal(again.detection.scores, det.scores)
    assert again.logs["cycles"] == logs["cycles"]
    for k, v in trainable_state(again.model).items():
        assert torch.equal(v, state[k]), k
    # another gamma re-thresholds the same scores; it flags other rows, so the cycles start again
    other = gen_bedkd_defend(str(poisoned["path"]), poisoned["data"], dataclasses.replace(cfg, gamma=0.05),
                             **kw)
    assert np.array_equal(other.detection.scores, det.scores) and other.detection.gamma == 0.05
    assert other.detection.flags.tolist() == (det.scores < 0.05).tolist()
    assert other.logs["n_punish"] == min(int((det.scores < 0.05).sum()), cfg.max_poisoned)
