"""W2SDefense on tokens with a teacher of another tokenizer or width
(``kdshield.defenses.w2s_projection``), on tiny random Llamas: conftest's (hidden 32) as the
student and its clean base, and a second one of another vocabulary (the same words under other
ids, other special tokens) and hidden 24 as the teacher. Token KD goes off, the student trains on
CE + feature alignment through a ridge projection fitted to the clean base's features, cached in
the teacher's entry; a same-tokenizer teacher of another width keeps KD and aligns through the
same projection."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from kdshield.data.batching import collate
from kdshield.defenses.w2s_generation import (
    GenW2SConfig,
    gen_w2s_defend,
    gen_w2s_loss,
    prepare_gen_teacher,
)
from kdshield.defenses.w2s_projection import (
    Projection,
    fit_projection,
    fit_ridge,
    kd_decision,
    needs_projection,
    pooled_features,
    r_squared,
)
from kdshield.errors import ConfigError
from kdshield.models.adapters import AdapterConfig
from kdshield.models.generator import load_generator
from kdshield.training.loop import TrainConfig
from kdshield.training.sft import encode_sft
from tests.conftest import WORDS, _word_tokenizer
from tests.gen_fixtures import sft_data

MAX_LENGTH, MAX_RESPONSE = 40, 12


def _foreign_tokenizer():
    """The tiny words under other ids (reversed), other specials and two extra tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[END]", "<x1>", "[PAD]", "<x2>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS), reverse=True) + ["zebra", "quartz"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[END]")


def _save_llama(path, tokenizer, hidden: int, seed: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=2 * hidden, max_position_embeddings=128,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory):
    return _save_llama(tmp_path_factory.mktemp("foreign-llama"), _foreign_tokenizer(), hidden=24)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """The student's tokenizer, hidden 48: a same-vocabulary teacher of another width."""
    return _save_llama(tmp_path_factory.mktemp("wide-llama"), _word_tokenizer(encoder=False), hidden=48)


def _defend(student_dir, teacher_dir, tmp_path, out: str, data=None, **changes):
    cfg = GenW2SConfig(**{"teacher": str(teacher_dir), "teacher_layers": None, "teacher_epochs": 1, "epochs": 1,
                          "gamma": 0.5, **changes})
    return gen_w2s_defend(str(student_dir), data or sft_data(16, 8), cfg, base=str(student_dir),
                          peft_train=TrainConfig(epochs=1, batch_size=8, max_length=MAX_LENGTH, seed=0,
                                                 checkpoint_every=0),
                          adapter=AdapterConfig(kind="lora"), output_dir=tmp_path / out,
                          max_response_tokens=MAX_RESPONSE, teacher_cache=tmp_path / "teachers")


# --- the fit ---------------------------------------------------------------------------------------
def test_the_ridge_fit_recovers_an_affine_map_and_reports_r2():
    torch.manual_seed(0)
    x = torch.randn(200, 6) * torch.tensor([1.0, 10, 0.1, 3, 1, 50])  # scales far apart: standardised in the fit
    w_true, b_true = torch.randn(4, 6), torch.randn(4)
    y = x @ w_true.T + b_true
    w, b = fit_ridge(x, y, ridge=0.0)
    assert w.shape == (4, 6) and b.shape == (4,)
    assert torch.allclose(w, w_true, atol=1e-3) and torch.allclose(b, b_true, atol=1e-3)
    assert r_squared(x, y, w, b) > 0.9999
    w_small, b_small = fit_ridge(x, y, ridge=1e-4)
    assert r_squared(x, y, w_small, b_small) > 0.999
    shrunk, b_shrunk = fit_ridge(x, y, ridge=100.0)  # a heavy ridge shrinks predictions toward the mean
    assert (x @ shrunk.T + b_shrunk).std(0).max() < 0.05 * y.std(0).min() and r_squared(x, y, shrunk, b_shrunk) < 0.1
    # fewer rows than teacher dimensions: still a finite fit
    w_few, b_few = fit_ridge(x[:4], y[:4], ridge=0.1)
    assert torch.isfinite(w_few).all() and torch.isfinite(b_few).all()
    with pytest.raises(ValueError, match="same rows"):
        fit_ridge(x[:5], y[:4], 0.1)

    # one map per pooled position; its file round-trips with its stats; a width mismatch is refused
    feats_t = {"last_prompt": x[:150], "response_mean": x[:150] * 2}
    feats_s = {"last_prompt": y[:150], "response_mean": y[:150] - 1}
    proj = fit_projection(feats_t, feats_s, 1e-4, {"last_prompt": x[150:], "response_mean": x[150:] * 2},
                          {"last_prompt": y[150:], "response_mean": y[150:] - 1})
    assert proj.fitted and proj.stats["teacher_width"] == 6 and proj.stats["student_width"] == 4
    assert proj.stats["train_r2"]["last_prompt"] > 0.999 and proj.stats["dev_r2"]["last_prompt"] > 0.999
    assert torch.allclose(proj.apply("last_prompt", x[:3]), y[:3], atol=1e-2)
    with pytest.raises(ValueError, match="width 4"):
        proj.apply("last_prompt", y[:3])
    with pytest.raises(ConfigError, match="projection_ridge"):
        GenW2SConfig(projection_ridge=-1)


# --- which teachers can share what ---------------------------------------------------------------------
def test_kd_auto_is_off_across_vocabularies_and_kd_on_or_gamma_zero_is_an_error(tiny_llama_dir, foreign_dir,
                                                                                    tmp_path):
    student, foreign = load_generator(tiny_llama_dir), load_generator(foreign_dir)
    kd, why = kd_decision(GenW2SConfig(), foreign, student)
    assert kd is False and "tokenizers differ" in why and "24 -> 32" in why
    assert needs_projection(foreign, student) and not needs_projection(student, student)
    assert kd_decision(GenW2SConfig(kd="off"), foreign, student)[0] is False
    with pytest.raises(ConfigError, match="kd=on: token KD needs one vocabulary.*tokenizers differ"):
        kd_decision(GenW2SConfig(kd="on"), foreign, student)
    with pytest.raises(ConfigError, match="gamma is 0"):
        kd_decision(GenW2SConfig(gamma=0.0), foreign, student)
    # before any training: no cache entry is written
    with pytest.raises(ConfigError, match="token KD needs one vocabulary"):
        prepare_gen_teacher(GenW2SConfig(teacher=str(foreign_dir), teacher_layers=None, kd="on"), sft_data(16, 8),
                            student, base=str(tiny_llama_dir), max_length=MAX_LENGTH,
                            max_response_tokens=MAX_RESPONSE, seed=0, cache_root=tmp_path / "teachers")
    assert not (tmp_path / "teachers").exists() or not any((tmp_path / "teachers").iterdir())
    # the same vocabulary keeps what it had
    assert kd_decision(GenW2SConfig(), student, student) == (True, None)
    assert kd_decision(GenW2SConfig(kd="off"), student, student) == (False, None)


# --- end to end ------------------------------------------------------------------------------------------
def test_a_foreign_teacher_aligns_features_through_its_cached_projection(tiny_llama_dir, foreign_dir, tmp_path):
    data = sft_data(16, 8)
    res = _defend(tiny_llama_dir, foreign_dir, tmp_path, "w2s", data=data)
    teacher = res.teacher
    assert res.kd is False and res.logs["kd"] is False and "tokenizers differ" in res.logs["kd_off"]
    desc = res.logs["teacher"]
    assert desc["own_tokenizer"] is True and "tokenizers differ" in desc["kd_off"] and desc["hidden_size"] == 24
    for terms in (res.logs["loss_terms"]["first"], res.logs["loss_terms"]["last"]):
        assert set(terms) == {"ce", "fa"} and all(math.isfinite(v) for v in terms.values())
    assert math.isfinite(res.logs["dev_nll"])
    # the teacher is the foreign model, whole, SFT-ed on its own encoding of the rows, and frozen
    assert teacher.trained and teacher.layers is None and teacher.kept is None
    assert teacher.gen.tokenizer.get_vocab() == _foreign_tokenizer().get_vocab()
    assert len(teacher.gen.model.model.layers) == 2 and math.isfinite(teacher.dev_nll)
    assert not any(p.requires_grad for p in teacher.gen.parameters()) and not teacher.gen.training
    # the projection: in the entry, 24 -> 32 per pooled position, its fit recorded
    files = sorted(p.name for p in teacher.path.glob("projection-*.safetensors"))
    assert len(files) == 1 and desc["projection"]["path"] == files[0] and desc["projection"]["fitted"] is True
    tensors = load_file(str(teacher.path / files[0]))
    assert tensors["last_prompt.weight"].shape == (32, 24) and tensors["response_mean.bias"].shape == (32,)
    stats = desc["projection"]
    assert stats["rows"] == 16 and stats["teacher_width"] == 24 and stats["student_width"] == 32
    assert all(math.isfinite(v) for v in [*stats["train_r2"].values(), *stats["dev_r2"].values()])
    assert not list(teacher.path.glob("outputs-*.safetensors"))  # no token bins across vocabularies
    # teacher features per train row (its own encoding), [16, 24]; the extras are P of them, [16, 32]
    t_enc = encode_sft(teacher.gen.tokenizer, data.split("train"), max_length=MAX_LENGTH,
                       max_response_tokens=MAX_RESPONSE)
    s_enc = encode_sft(res.model.tokenizer, data.split("train"), max_length=MAX_LENGTH,
                       max_response_tokens=MAX_RESPONSE)
    assert t_enc.input_ids != s_enc.input_ids  # two encodings of the same rows
    feats = [load_file(str(p)) for p in teacher.path.glob("features-*.safetensors")]
    own = pooled_features(teacher.gen, t_enc)
    assert any(torch.allclose(f["last_prompt"], own["last_prompt"], atol=1e-5) for f in feats)
    assert own["last_prompt"].shape == own["response_mean"].shape == (16, 24)
    target = teacher.projection.apply("last_prompt", own["last_prompt"])
    assert target.shape == (16, 32) and torch.isfinite(target).all()

    # a second call reuses the teacher, its features and its projection
    again = _defend(tiny_llama_dir, foreign_dir, tmp_path, "w2s-again", data=data)
    assert not again.teacher.trained and again.teacher.path == teacher.path and again.kd is False
    assert again.logs["teacher"]["projection"]["fitted"] is False
    assert again.logs["teacher"]["projection"]["path"] == files[0]
    assert sorted(p.name for p in teacher.path.glob("projection-*.safetensors")) == files
    assert torch.equal(again.teacher.projection.weights["last_prompt"], teacher.projection.weights["last_prompt"])
    assert set(again.logs["loss_terms"]["first"]) == {"ce", "fa"}
    # another ridge: another projection file, the same teacher
    ridge = _defend(tiny_llama_dir, foreign_dir, tmp_path, "w2s-ridge", data=data, projection_ridge=1.0)
    assert not ridge.teacher.trained and len(list(teacher.path.glob("projection-*.safetensors"))) == 2
    assert ridge.logs["teacher"]["projection"]["fitted"] is True


def test_foreign_teacher_rows_meet_their_own_student_example(tiny_llama_dir, foreign_dir):
    """Example i's student feature is aligned with P(teacher feature of row i), whatever the batch."""
    data = sft_data(8, 4)
    student, teacher = load_generator(tiny_llama_dir).eval(), load_generator(foreign_dir).eval()
    rows = data.split("train")
    s_enc = encode_sft(student.tokenizer, rows, max_length=MAX_LENGTH, max_response_tokens=MAX_RESPONSE)
    t_enc = encode_sft(teacher.tokenizer, rows, max_length=MAX_LENGTH, max_response_tokens=MAX_RESPONSE)
    t_feats = pooled_features(teacher, t_enc, batch_size=3)
    # a row's teacher feature does not depend on the rows it was batched with
    alone = pooled_features(teacher, encode_sft(teacher.tokenizer, rows.select([5]), max_length=MAX_LENGTH,
                                                max_response_tokens=MAX_RESPONSE))
    assert torch.allclose(alone["last_prompt"][0], t_feats["last_prompt"][5], atol=1e-5)
    proj = Projection({"last_prompt": torch.randn(32, 24)}, {"last_prompt": torch.zeros(32)})
    target = proj.apply("last_prompt", t_feats["last_prompt"])
    s_enc.extras = {"t_feat": target}
    cfg = GenW2SConfig(gamma=1.0, kd="auto")

    def fa(batch_rows):
        batch = collate(s_enc, batch_rows)
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], labels=batch["labels"], output_hidden=True)
        loss, logs = gen_w2s_loss(out, batch["labels"], batch, cfg, kd=False)
        assert set(logs) == {"ce", "fa"}
        return float(logs["fa"]), student.features(**batch).last_prompt

    with torch.no_grad():
        a, feats = fa([0, 1, 2, 3])
        b, _ = fa([3, 1, 0, 2])
        assert abs(a - b) < 1e-4 * a
        assert abs(a - float((feats - target[:4]).pow(2).sum(-1).mean())) < 1e-3 * a
        # targets equal to the student's own features: zero only where each example meets its own row
        s_enc.extras = {"t_feat": pooled_features(student, s_enc)["last_prompt"]}
        assert fa([0, 1, 2, 3])[0] < 1e-6 and fa([6, 2, 7])[0] < 1e-6
        s_enc.extras = {"t_feat": s_enc.extras["t_feat"][[1, 0, 3, 2, 5, 4, 7, 6]]}
        assert fa([0, 1, 2, 3])[0] > 1e-3


def test_a_same_tokenizer_teacher_of_another_width_keeps_kd_and_projects(tiny_llama_dir, wide_dir, tmp_path):
    res = _defend(tiny_llama_dir, wide_dir, tmp_path, "w2s-wide", top_k=8)
    assert res.kd is True and "kd_off" not in res.logs and "own_tokenizer" not in res.logs["teacher"]
    assert set(res.logs["loss_terms"]["first"]) == {"ce", "kd", "fa"}
    assert res.teacher.gen.hidden_size == 48
    assert res.teacher.gen.tokenizer.get_vocab() == res.model.tokenizer.get_vocab()
    assert len(list(res.teacher.path.glob("outputs-*.safetensors"))) == 1  # its token bins, as ever
    proj = res.logs["teacher"]["projection"]
    assert proj["teacher_width"] == 48 and proj["student_width"] == 32 and proj["fitted"]
    # gamma 0: nothing to project, nothing fitted
    plain = _defend(tiny_llama_dir, wide_dir, tmp_path, "w2s-wide-kd", top_k=8, gamma=0.0)
    assert plain.kd is True and "projection" not in plain.logs["teacher"]
    assert set(plain.logs["loss_terms"]["first"]) == {"ce", "kd"}
