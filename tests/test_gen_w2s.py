"""W2SDefense on tokens (``kdshield.defenses.w2s_generation``) on the tiny random Llama: the top-k
KL against the full KL, the truncated teacher and its cache, per-example alignment and position
alignment of the cached teacher rows, the vocabulary checks, and a toy grid with method w2s."""

from __future__ import annotations

import math

import pytest
import torch

import tests.test_gen_attack as gen_attack
from kdshield.data.batching import collate
from kdshield.defenses.w2s_generation import (
    GenW2SConfig,
    choose_ends_cut,
    compute_teacher_outputs,
    gen_w2s_loss,
    keep_layers,
    prepare_gen_teacher,
    resolve_kd,
    teacher_outputs,
)
from kdshield.errors import ConfigError
from kdshield.generation.grid import GenGridConfig, GenGridRunner
from kdshield.models.generator import Generator, load_generator
from kdshield.training.losses import distillation_kl, topk_distillation_kl, topk_log_probs
from kdshield.training.sft import encode_sft, response_nll
from tests.gen_fixtures import sft_data, sft_rows


# --- the top-k KL -------------------------------------------------------------------------------
def test_topk_kl_equals_the_full_kl_when_k_is_the_vocabulary():
    torch.manual_seed(0)
    s, t = torch.randn(7, 20) * 3, torch.randn(7, 20) * 3
    for k in (20, 50):  # k >= V keeps every token: empty tails
        idx, logp = topk_log_probs(t, k, temperature=2.0)
        assert idx.shape == (7, 20) and torch.isinf(logp[:, -1]).all()
        kl = topk_distillation_kl(s, idx, logp, temperature=2.0)
        assert torch.allclose(kl, distillation_kl(s, t, 2.0), atol=1e-5)
    s.requires_grad_(True)
    idx, logp = topk_log_probs(t, 20, temperature=1.0)
    topk_distillation_kl(s, idx, logp).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_topk_kl_is_nonnegative_at_most_the_full_kl_and_zero_for_the_same_distribution():
    torch.manual_seed(1)
    for trial in range(5):
        s, t = torch.randn(9, 30) * (1 + trial), torch.randn(9, 30) * (1 + trial)
        full = distillation_kl(s, t, 1.5)
        for k in (1, 4, 29):
            idx, logp = topk_log_probs(t, k, temperature=1.5)
            assert torch.allclose(torch.logsumexp(logp, dim=-1), torch.zeros(9), atol=1e-5)  # the bins sum to 1
            kl = topk_distillation_kl(s, idx, logp, temperature=1.5)
            assert -1e-6 <= float(kl) <= float(full) + 1e-5
            same = topk_distillation_kl(t, idx, logp, temperature=1.5)
            assert abs(float(same)) < 1e-5
    idx, logp = topk_log_probs(t, 4)
    with pytest.raises(ValueError, match="k \\+ 1"):
        topk_distillation_kl(s, idx, logp[:, :4])
    # the gradient flows into the student's logits only: the teacher's bins are plain data
    s = s.clone().requires_grad_(True)
    topk_distillation_kl(s, idx, logp).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 and not logp.requires_grad


# --- the teacher ----------------------------------------------------------------------------------
def _teacher(tiny_llama_dir, tmp_path, data=None, **changes):
    student = load_generator(tiny_llama_dir)
    cfg = GenW2SConfig(**{"teacher_layers": 1, "teacher_epochs": 1, **changes})
    teacher = prepare_gen_teacher(cfg, data or sft_data(16, 8), student, base=str(tiny_llama_dir), max_length=40,
                                  max_response_tokens=12, seed=0, cache_root=tmp_path / "teachers")
    return student, cfg, teacher


def test_truncated_teacher_keeps_tokenizer_and_width_and_its_cache_reloads(tiny_llama_dir, tmp_path):
    student, cfg, teacher = _teacher(tiny_llama_dir, tmp_path)
    model = teacher.gen.model
    assert teacher.trained and teacher.kd and len(model.model.layers) == 1 and model.config.num_hidden_layers == 1
    assert teacher.gen.hidden_size == student.hidden_size
    assert teacher.gen.tokenizer.get_vocab() == student.tokenizer.get_vocab()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # the tied head
    assert teacher.dev_nll is not None and math.isfinite(teacher.dev_nll)
    assert not any(p.requires_grad for p in teacher.gen.parameters()) and not teacher.gen.training
    encoded = encode_sft(student.tokenizer, sft_data(16, 8).split("train"), max_length=40, max_response_tokens=12)
    outs = teacher_outputs(teacher, encoded, cfg)
    assert outs.indices.shape[:2] == outs.log_probs.shape[:2] == (16, int(outs.lengths.max()))
    assert outs.log_probs.shape[-1] == cfg.top_k + 1 and outs.last_prompt.shape == (16, student.hidden_size)

    _, _, again = _teacher(tiny_llama_dir, tmp_path)
    assert not again.trained and again.path == teacher.path and again.dev_nll == teacher.dev_nll
    assert len(again.gen.model.model.layers) == 1
    for (name, a), (_, b) in zip(teacher.gen.model.state_dict().items(), again.gen.model.state_dict().items()):
        assert torch.equal(a, b), name
    cached = teacher_outputs(again, encoded, cfg)  # read back from the entry, not recomputed
    assert torch.equal(cached.indices, outs.indices) and torch.equal(cached.last_prompt, outs.last_prompt)
    assert len(list(teacher.path.glob("outputs-*.safetensors"))) == 1

    with pytest.raises(ConfigError, match="has 2 layers"):
        _teacher(tiny_llama_dir, tmp_path, teacher_layers=5)


def test_the_auto_cut_keeps_the_split_of_least_dev_nll_and_restores_the_stack(tiny_llama_dir, tmp_path):
    base = load_generator(tiny_llama_dir)
    dev = encode_sft(base.tokenizer, sft_data(16, 8).split("dev"), max_length=40, max_response_tokens=12)
    names = [n for n, _ in base.model.named_parameters()]
    kept, nll = choose_ends_cut(base, 1, dev)
    assert set(nll) == {"first0", "first1"} and kept == ([1] if nll["first0"] < nll["first1"] else [0])
    # every candidate was scored on a cut model, and the whole stack is back afterwards
    assert len(base.model.model.layers) == 2 and base.model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in base.model.model.layers] == [0, 1]
    assert [n for n, _ in base.model.named_parameters()] == names
    whole = response_nll(base, dev)["nll"]
    assert all(math.isfinite(v) and v != whole for v in nll.values())
    # keep_layers renumbers the kept block; its weights are the base's
    other = load_generator(tiny_llama_dir)
    last = other.model.model.layers[1].mlp.down_proj.weight.clone()
    keep_layers(other, [1])
    assert other.model.model.layers[0].self_attn.layer_idx == 0 and other.model.config.num_hidden_layers == 1
    assert torch.equal(other.model.model.layers[0].mlp.down_proj.weight, last)
    with pytest.raises(ConfigError, match="ascending"):
        keep_layers(load_generator(tiny_llama_dir), [1, 0])

    # the teacher records the cut and keeps it through the cache
    _, _, teacher = _teacher(tiny_llama_dir, tmp_path)
    assert teacher.kept in ([0], [1]) and set(teacher.cut_nll) == {"first0", "first1"}
    _, _, again = _teacher(tiny_llama_dir, tmp_path)
    assert not again.trained and again.kept == teacher.kept and again.describe()["cut_nll"] == teacher.cut_nll
    _, _, first = _teacher(tiny_llama_dir, tmp_path, teacher_cut="first")
    assert first.path != teacher.path and first.kept == [0] and first.cut_nll is None
    no_dev = sft_data(16, 8)
    del no_dev.splits["dev"]
    with pytest.raises(ConfigError, match="teacher_cut=auto .* dev split"):
        _teacher(tiny_llama_dir, tmp_path, data=no_dev)
    with pytest.raises(ConfigError, match="teacher_cut"):
        GenW2SConfig(teacher_cut="middle")


def test_the_teacher_cache_key_changes_with_the_data_not_with_the_distillation_settings(tiny_llama_dir, tmp_path):
    _, _, teacher = _teacher(tiny_llama_dir, tmp_path)
    _, _, other = _teacher(tiny_llama_dir, tmp_path, data=sft_data(16, 8, seed=3))
    assert other.trained and other.path != teacher.path
    _, _, same = _teacher(tiny_llama_dir, tmp_path, gamma=0.5, top_k=8, temperature=1.0)
    assert not same.trained and same.path == teacher.path
    _, _, deeper = _teacher(tiny_llama_dir, tmp_path, teacher_layers=2)
    assert deeper.trained and deeper.path != teacher.path


def _other_vocabulary_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[SEP]", "it", "is", "good", "bad", "."])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[SEP]")


def test_a_teacher_of_another_vocabulary_or_width_is_a_clear_error(tiny_llama_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    student = load_generator(tiny_llama_dir)
    other_vocab = Generator(load_generator(tiny_llama_dir).model, _other_vocabulary_tokenizer(), source="other")
    with pytest.raises(ConfigError, match="token KD needs one vocabulary"):
        resolve_kd(GenW2SConfig(kd="on"), other_vocab, student)
    # kd: auto across vocabularies: token KD off, feature alignment through a projection
    # (tests/test_gen_w2s_cross.py runs that path)
    assert resolve_kd(GenW2SConfig(kd="auto"), other_vocab, student) is False
    with pytest.raises(ConfigError, match="gamma is 0"):
        resolve_kd(GenW2SConfig(kd="auto", gamma=0.0), other_vocab, student)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=student.base_config.vocab_size, hidden_size=48,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        intermediate_size=64, tie_word_embeddings=True))
    wider = Generator(wide, student.tokenizer, source="wide")
    assert resolve_kd(GenW2SConfig(), wider, student)  # KD, and alignment through a projection 48 -> 32
    assert resolve_kd(GenW2SConfig(gamma=0.0), wider, student)  # KD only: no features to align
    assert not resolve_kd(GenW2SConfig(kd="off"), student, student)
    assert resolve_kd(GenW2SConfig(), student, student)
    with pytest.raises(ConfigError, match="kd"):
        GenW2SConfig(kd="maybe")
    with pytest.raises(ConfigError, match="top_k"):
        GenW2SConfig(top_k=0)
    with pytest.raises(ConfigError, match="feature_position"):
        GenW2SConfig(feature_position="first_token")


# --- the objective on batches -----------------------------------------------------------------------
def _loss_terms(gen, encoded, rows, cfg, *, kd=True):
    batch = collate(encoded, rows)
    out = gen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch["position_ids"], labels=batch["labels"], output_hidden=True)
    loss, logs = gen_w2s_loss(out, batch["labels"], batch, cfg, kd=kd)
    return loss, {k: float(v) for k, v in logs.items()}


def test_cached_teacher_rows_line_up_with_the_students_positions_and_examples(tiny_llama_dir):
    gen = load_generator(tiny_llama_dir).eval()
    vocab = gen.base_config.vocab_size
    encoded = encode_sft(gen.tokenizer, sft_rows(8), max_length=40, max_response_tokens=12)
    cfg = GenW2SConfig(top_k=vocab, gamma=1.0)
    # the student as its own teacher, every token kept: the KL is 0 only if every cached token row
    # is read at its own example and response position
    own = compute_teacher_outputs(gen, encoded, top_k=vocab, temperature=cfg.temperature, batch_size=3)
    encoded.extras = own.extras("last_prompt")
    with torch.no_grad():
        for rows in ([0, 1, 2, 3], [3, 1, 0, 2], [7, 2, 5]):
            _, logs = _loss_terms(gen, encoded, rows, cfg)
            assert abs(logs["kd"]) < 1e-5 and abs(logs["fa"]) < 1e-6 and logs["ce"] > 0
        # token rows shifted by one position: no longer zero
        shifted = own.extras("last_prompt")
        shifted["t_logp"] = torch.roll(own.log_probs, 1, dims=1)
        shifted["t_idx"] = torch.roll(own.indices, 1, dims=1)
        encoded.extras = shifted
        assert _loss_terms(gen, encoded, [0, 1, 2, 3], cfg)[1]["kd"] > 1e-3

        # per-example alignment: another teacher's features; a shuffled batch gives the same loss
        # (each example meets its own teacher row), teacher rows given to other examples do not
        torch.manual_seed(0)
        feats = torch.randn(8, gen.hidden_size)
        encoded.extras = {**own.extras("last_prompt"), "t_feat": feats}
        _, a = _loss_terms(gen, encoded, [0, 1, 2, 3], cfg)
        _, b = _loss_terms(gen, encoded, [2, 0, 3, 1], cfg)
        assert a["fa"] > 1 and abs(a["fa"] - b["fa"]) < 1e-4 * a["fa"] and abs(a["ce"] - b["ce"]) < 1e-5
        batch = collate(encoded, [0, 1, 2, 3])
        student = gen.features(**batch).last_prompt
        assert abs(a["fa"] - float((student - feats[:4]).pow(2).sum(-1).mean())) < 1e-3
        encoded.extras = {**own.extras("last_prompt"), "t_feat": feats[[1, 0, 3, 2, 5, 4, 7, 6]]}
        _, c = _loss_terms(gen, encoded, [0, 1, 2, 3], cfg)
        assert abs(c["fa"] - a["fa"]) > 1e-3 * a["fa"]
        # the other pooled position is another feature
        encoded.extras = own.extras("response_mean")
        cfg_mean = GenW2SConfig(top_k=vocab, gamma=1.0, feature_position="response_mean")
        assert abs(_loss_terms(gen, encoded, [0, 1], cfg_mean)[1]["fa"]) < 1e-6
        # a cache computed on another encoding is refused, not misread
        encoded.extras = {**own.extras("last_prompt"), "t_len": own.lengths + 1}
        with pytest.raises(RuntimeError, match="another encoding"):
            _loss_terms(gen, encoded, [0, 1], cfg)
    # every term is finite and gives the student a gradient
    encoded.extras = {**own.extras("last_prompt"), "t_feat": feats}
    gen.train()
    loss, logs = _loss_terms(gen, encoded, [0, 1, 2, 3], GenW2SConfig(top_k=8, gamma=0.01), kd=True)
    loss.backward()
    assert all(math.isfinite(v) for v in logs.values()) and set(logs) == {"ce", "kd", "fa"}
    grads = [p.grad for p in gen.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# --- the grid -------------------------------------------------------------------------------------
def test_grid_options_for_w2s_are_checked_at_config_build(tmp_path):
    GenGridConfig(methods=["none", "lora", "w2s"], method_config={"w2s": {"gamma": 0.02}}, clean_methods=["w2s"])
    with pytest.raises(ConfigError, match="w2s.gamma=-1"):
        GenGridConfig(methods=["w2s"], method_config={"w2s": {"gamma": -1}})
    with pytest.raises(ConfigError, match="unknown option"):
        GenGridConfig(methods=["w2s"], method_config={"w2s": {"gama": 0.1}})
    with pytest.raises(ConfigError, match="has no options"):
        GenGridConfig(method_config={"lora": {}})
    with pytest.raises(ConfigError, match="clean_methods"):
        GenGridConfig(clean_methods=["lora"])


def test_toy_grid_with_w2s_runs_records_and_keys_its_cells(tiny_llama_dir, tmp_path):
    w2s = {"teacher_layers": 1, "teacher_epochs": 2, "epochs": 2}
    cfg = gen_attack.grid_config(tmp_path, tiny_llama_dir, methods=["none", "lora", "w2s"], clean_methods=["w2s"],
                                 method_config={"w2s": w2s})
    runner = GenGridRunner(cfg)
    runner.run()
    recs = {(r["method"], r["poisoned_model"]): r for r in runner.grid_records()}
    assert set(recs) == {("lora", False), ("none", True), ("lora", True), ("w2s", False), ("w2s", True)}
    defended, clean = recs[("w2s", True)], recs[("w2s", False)]
    for r in (defended, clean):
        assert r["task"] == "generation" and r["attack"] == "badnet:fixed" and r["kd"] is True
        assert r["teacher"]["layers"] == 1 and r["teacher"]["hidden_size"] == 32
        assert math.isfinite(r["teacher"]["dev_nll"]) and math.isfinite(r["dev_nll"])
        assert r["config"]["method_config"]["teacher_layers"] == 1
        assert r["config"]["planned"]["train"]["lr"] == 1e-3 and r["config"]["planned"]["adapter"]["r"] == 16
        assert set(r["loss_terms"]["first"]) == {"ce", "kd", "fa"}
        assert all(math.isfinite(v) for v in r["loss_terms"]["first"].values())
        assert r["rougeL"] is not None and r["asr"] is not None and r["trainable_params"] > 0
        check = r["teacher_check"]  # the teacher against the suspect on clean dev rows (not a label task)
        assert check["rows"] > 0 and math.isfinite(check["teacher_nll"]) and math.isfinite(check["suspect_nll"])
        assert "weak" not in check
    assert defended["teacher"]["path"] == clean["teacher"]["path"]  # one teacher serves every cell
    assert [clean["teacher"]["trained"], defended["teacher"]["trained"]] == [True, False]
    assert clean["poison_hash"] is None and defended["poison_hash"] == recs[("none", True)]["poison_hash"]
    # a never-poisoned model defended keeps its utility, loosely: the toy floor barely learns the task in
    # two epochs (ROUGE-L near 0), so the response NLL is the number that can move here
    assert clean["nll"] <= recs[("lora", False)]["nll"] + 0.25

    again = GenGridRunner(cfg)
    again.run()
    assert again.cells_run == 0
    # the w2s options do not enter the none / lora keys; w2s replaces the shared lr with its own
    plain = GenGridRunner(gen_attack.grid_config(tmp_path, tiny_llama_dir))
    plain.run()
    assert plain.cells_run == 0
    other_lr = GenGridRunner(gen_attack.grid_config(tmp_path, tiny_llama_dir, lr=2e-3, methods=["w2s"],
                                                    floor=False, method_config={"w2s": w2s}))
    other_lr.run()
    assert other_lr.cells_run == 0
    gamma = GenGridRunner(gen_attack.grid_config(tmp_path, tiny_llama_dir, methods=["none", "lora", "w2s"],
                                                 method_config={"w2s": {**w2s, "gamma": 0.05}}))
    gamma.run()
    assert gamma.cells_run == 1 and gamma.records[0]["method"] == "w2s"
    assert gamma.records[0]["teacher"]["trained"] is False
