"""Generative baselines (``kdshield.defenses.gen_baselines``, ``gen_test_time``) on the tiny Llama:
each runs end to end and returns a model that decodes (evaluated through the evaluation hooks),
quantise-dequantise bounds, pruned neurons held at zero through PEFT, merging a model with itself,
the CleanGen guard (no veto against itself, a veto where the reference dislikes the token), ONION
on a tiny LM and its plumbing (user text only), and config errors that name the field.

    OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider tests/test_gen_baselines.py
"""

from __future__ import annotations

import copy

import pytest
import torch

from kdshield.attacks import build_trigger
from kdshield.attacks.targets import build_target, user_field
from kdshield.data.sft import SFTData
from kdshield.defenses.fine_pruning import find_mlp_blocks
from kdshield.defenses.gen_baselines import (
    GEN_BASELINE_NAMES,
    GenFinePruningConfig,
    GenFineTuningConfig,
    GenMergeConfig,
    GenQuantizationConfig,
    baseline_planned_settings,
    decoder_module,
    gen_baseline,
    gen_fine_pruning_defend,
    merge_generators,
)
from kdshield.defenses.gen_test_time import (
    CleanGenConfig,
    CleanGenGuard,
    GenOnionConfig,
    onion_filter,
)
from kdshield.defenses.quantization import quantize_model
from kdshield.errors import ConfigError
from kdshield.generation import decode
from kdshield.generation.decode import Decodes, decode_rows, prompt_ids
from kdshield.generation.evaluate import evaluate_generator
from kdshield.models.adapters import AdapterConfig
from kdshield.models.generator import Generator, load_generator
from kdshield.training.loop import TrainConfig
from tests.gen_fixtures import sft_data, sft_rows
from tests.test_gen_decode import chaotic_generator
from tests.test_gen_eval import ROWS
from tests.test_gen_eval import sft_rows as hand_rows

TRAIN = TrainConfig(epochs=1, lr=1e-3, batch_size=8, max_length=40, seed=0, checkpoint_every=0)
LORA = AdapterConfig(kind="lora", r=4, lora_alpha=8)
PHRASE = "the film was great"
SMALL = {"fine-tuning": {}, "fine-pruning": {"rate": 0.25, "n_samples": 8},
         "quantization": {"bits": 4, "group_size": 16}, "merge": {"other_epochs": 1},
         "onion": {}, "cleangen": {"veto_ratio": 5.0}}


def _run(method, model_dir, tmp_path, data, cfg=None, adapter=LORA):
    config_class, defend = gen_baseline(method)
    cfg = cfg if cfg is not None else config_class(**SMALL[method])
    return defend(str(model_dir), data, cfg, base=str(model_dir), peft_train=TRAIN, adapter=adapter,
                  output_dir=tmp_path / method, max_response_tokens=12, eval_batch_size=8)


@pytest.mark.parametrize("method", GEN_BASELINE_NAMES)
def test_each_baseline_runs_end_to_end_and_returns_a_model_that_decodes(method, tiny_llama_dir, tmp_path):
    data = sft_data(16, 8)
    res = _run(method, tiny_llama_dir, tmp_path, data)
    assert res.logs["wall_s"] >= 0 and res.train.steps > 0 and res.train.trainable_params > 0
    assert (res.prompt_filter is not None) == (method == "onion")
    assert (res.decode is not None) == (method == "cleangen")
    m = evaluate_generator(res.model, data, trigger=build_trigger("badnet", words=["cf"]),
                           target=build_target("fixed", phrase=PHRASE), batch_size=8, max_new_tokens=4, desc=None,
                           prompt_filter=res.prompt_filter, decode=res.decode)
    assert m["n_test"] == 8 and 0 <= m["asr"] <= 1 and m["rougeL"] >= 0 and m["nll"] > 0
    if method == "cleangen":
        assert m["guard"]["checked"] > 0 and 0 <= m["guard"]["vetoed"] <= m["guard"]["checked"]
    if method == "onion":
        assert m["prompt_filter"]["rows"] == 8 + 2 * m["n_asr"] and res.logs["onion"]["texts"] > 0
    if method in ("fine-pruning", "quantization", "merge"):
        # the edited model is the base of the saved adapter, never the unedited suspect
        saved = res.model.save(tmp_path / "saved")
        again = load_generator(saved)
        assert again.adapter_spec["base"] == res.logs["edited_model"] != str(tiny_llama_dir)
        assert decode_rows(again, data.split("test"), max_new_tokens=4, desc=None).texts == \
            decode_rows(res.model, data.split("test"), max_new_tokens=4, desc=None).texts
    if method == "merge":
        assert res.logs["weights"] == [0.5, 0.5] and res.logs["other_sft"]["dev_nll"] is not None
        again = _run(method, tiny_llama_dir, tmp_path, data)  # the clean SFT model is cached
        assert again.logs["other_sft"]["path"] == res.logs["other_sft"]["path"]
    if method == "fine-tuning":
        assert res.model.adapter_spec is None and res.logs["lr"] == 2e-5  # full SFT at FULL_LR


# --- model editing ----------------------------------------------------------------------------------
def test_int8_quantise_dequantise_moves_weights_by_at_most_half_a_step(tiny_llama_dir):
    gen = load_generator(tiny_llama_dir)
    before = {k: v.clone() for k, v in gen.model.state_dict().items()}
    stats = quantize_model(decoder_module(gen), 8, group_size=16)
    after = gen.model.state_dict()
    assert stats["layers"] == 2 * 7 and stats["changed_share"] > 0.5  # q k v o gate up down per layer
    for name, w in before.items():
        if "layers" in name and name.endswith("proj.weight"):
            groups = w.view(w.shape[0], -1, 16)
            step = groups.abs().amax(dim=-1, keepdim=True) / 127
            moved = (after[name].view_as(groups) - groups).abs()
            assert bool((moved <= step / 2 + 1e-7).all()), name
            assert len(torch.unique(after[name].view_as(groups)[0, 0])) <= 255
        else:  # embeddings (and the tied head), norms: untouched
            assert torch.equal(after[name], w), name


def test_pruned_neurons_stay_zero_through_peft_even_with_lora_on_the_mlp(tiny_llama_dir, tmp_path):
    adapter = AdapterConfig(kind="lora", r=4, lora_alpha=8,
                            target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    train = TrainConfig(epochs=2, lr=5e-2, batch_size=8, max_length=40, seed=0, checkpoint_every=0)
    data = sft_data(16, 8)
    res = gen_fine_pruning_defend(str(tiny_llama_dir), data, GenFinePruningConfig(rate=0.25, layers=2),
                                  peft_train=train, adapter=adapter, output_dir=tmp_path / "fp",
                                  max_response_tokens=12, eval_batch_size=8)
    assert res.logs["pruned_neurons"] == 2 * 16 and res.logs["layers"] == [0, 1]
    assert res.logs["activity_pruned_mean"] <= res.logs["activity_kept_mean"]
    merged = copy.deepcopy(res.model.model).merge_and_unload()  # the adapter's updates folded in
    for block in find_mlp_blocks(merged):
        idx = torch.tensor(res.logs["pruned_indices"][block.layer])
        for mod in block.inputs:
            assert float(mod.weight[idx].abs().max()) == 0.0
        assert float(block.output.weight[:, idx].abs().max()) == 0.0
        assert float(block.output.weight.abs().sum()) > 0
    lora_b = [p for n, p in res.model.model.named_parameters() if "lora_B" in n and "up_proj" in n]
    assert lora_b and any(float(p.detach().abs().sum()) > 0 for p in lora_b)  # the LoRA did train the MLP
    with pytest.raises(ConfigError, match="fine-pruning.layers=5"):
        gen_fine_pruning_defend(str(tiny_llama_dir), data, GenFinePruningConfig(layers=5), peft_train=train,
                                adapter=adapter, output_dir=tmp_path / "fp5")


def test_rate_search_on_dev_nll_stops_at_the_allowed_rise(tiny_llama_dir, tmp_path):
    cfg = GenFinePruningConfig(rate=0.5, rate_step=0.25, max_nll_rise=0.0, n_samples=8)
    res = gen_fine_pruning_defend(str(tiny_llama_dir), sft_data(16, 8), cfg, peft_train=TRAIN, adapter=LORA,
                                  output_dir=tmp_path / "fp", max_response_tokens=12, eval_batch_size=8)
    search = res.logs["rate_search"]
    assert search[0]["rate"] == 0.0 and res.logs["rate"] in (0.0, 0.25, 0.5)
    kept = [r for r in search if r["rate"] <= res.logs["rate"]]
    assert all(r["dev_nll"] <= search[0]["dev_nll"] for r in kept)


def test_merging_a_model_with_itself_is_the_identity(tiny_llama_dir):
    gen = load_generator(tiny_llama_dir)
    before = {k: v.clone() for k, v in gen.model.state_dict().items()}
    weights = merge_generators(gen, [load_generator(tiny_llama_dir)], GenMergeConfig())
    assert weights == [0.5, 0.5]
    for k, v in gen.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    base = load_generator(tiny_llama_dir)
    with torch.no_grad():
        for p in base.model.parameters():
            p.add_(0.1)
    merge_generators(gen, [load_generator(tiny_llama_dir)], GenMergeConfig(method="task-arithmetic"), base=base)
    for k, v in gen.model.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-6), k
    wider = copy.deepcopy(gen)
    wider.model.model.layers = wider.model.model.layers[:1]
    with pytest.raises(ConfigError, match="identical architecture"):
        merge_generators(gen, [wider], GenMergeConfig())


# --- CleanGen ---------------------------------------------------------------------------------------
def test_cleangen_against_itself_never_vetoes_and_a_disliked_token_is_vetoed(tiny_llama_dir):
    gen = chaotic_generator(tiny_llama_dir, max_length=60, max_new_tokens=6).eval()
    rows = sft_rows(6)
    plain = decode_rows(gen, rows, batch_size=4, desc=None)
    same = decode_rows(gen, rows, batch_size=4, desc=None, guard=CleanGenGuard(copy.deepcopy(gen), 1.0))
    assert same.token_ids == plain.token_ids and same.guard["vetoed"] == 0
    assert same.guard["checked"] == plain.new_tokens and plain.guard is None

    # a reference that gives the suspect's first token of row 0 no probability at all
    disliked = plain.token_ids[0][0]
    ref = copy.deepcopy(gen)
    head = ref.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[disliked] = -1e4
    ref.model.lm_head = biased
    guarded = decode_rows(gen, rows, batch_size=4, desc=None, guard=CleanGenGuard(ref, 20.0))
    assert guarded.guard["vetoed"] >= 1 and disliked not in sum(guarded.token_ids, [])
    # the emitted token is the reference's own top one: the suspect's best token but the disliked one
    prompt = torch.tensor([prompt_ids(gen, rows.select([0]))[0]])
    with torch.no_grad():
        logits = gen.model(input_ids=prompt).logits[0, -1]
    logits[disliked] = -float("inf")
    assert guarded.token_ids[0][0] == int(logits.argmax())
    # batch-invariant like plain greedy
    alone = decode_rows(gen, rows, batch_size=1, desc=None, guard=CleanGenGuard(ref, 20.0))
    assert alone.token_ids == guarded.token_ids and alone.guard == guarded.guard


def test_cleangen_refuses_a_reference_of_another_vocabulary(tiny_llama_dir):
    from tests.test_gen_w2s import _other_vocabulary_tokenizer

    gen = load_generator(tiny_llama_dir)
    other = Generator(load_generator(tiny_llama_dir).model, _other_vocabulary_tokenizer(), source="other")
    with pytest.raises(ConfigError, match="cleangen.reference other: .*vocabulary"):
        decode_rows(gen, sft_rows(2), max_new_tokens=2, max_prompt_tokens=30, desc=None,
                    guard=CleanGenGuard(other))


# --- ONION on the prompt ----------------------------------------------------------------------------
def test_onion_with_a_tiny_lm_removes_the_out_of_place_word(tiny_llama_dir):
    gen = load_generator(tiny_llama_dir)
    tok = gen.tokenizer
    batch = torch.tensor([tok(s)["input_ids"] for s in ("the film is very good", "the movie was really bad",
                                                        "the story is so funny", "the actor was very weak")])
    torch.manual_seed(0)
    opt = torch.optim.Adam(gen.model.parameters(), lr=1e-2)
    gen.model.train()
    for _ in range(150):  # the tiny Llama learns four sentences by heart
        loss = gen.model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    onion = onion_filter(gen, GenOnionConfig())
    assert onion(["the film is mn very good", "the movie was really bad"]) == \
        ["the film is very good", "the movie was really bad"]
    assert onion.stats["removed_words"] == 1


def test_the_prompt_filter_sees_the_user_text_only_and_its_output_reaches_the_prompts(tiny_llama_dir, monkeypatch):
    gen = load_generator(tiny_llama_dir)
    gen.max_length, gen.max_new_tokens = 64, 8
    seen_prompts: list[tuple[int, ...]] = []

    def fake(_gen, prompts, **kw):  # says the phrase whenever the trigger word reaches the prompt
        seen_prompts.extend(tuple(p) for p in prompts)
        has = ["cf" in gen.tokenizer.convert_ids_to_tokens(list(p)) for p in prompts]
        n = len(prompts)
        return Decodes(texts=[PHRASE if h else "hello" for h in has], token_ids=[[]] * n, stopped=[True] * n,
                       prompt_tokens=[len(p) for p in prompts], seconds=1.0, new_tokens=n)

    monkeypatch.setattr(decode, "decode_prompts", fake)
    asked: list[str] = []

    def drop_cf(texts):
        asked.extend(texts)
        return [" ".join(w for w in t.split() if w != "cf") for t in texts]

    data = SFTData(name="toy", splits={"test": hand_rows(ROWS)}, source="hand")
    attack = {"trigger": build_trigger("badnet", words=["cf"]), "target": build_target("fixed", phrase=PHRASE)}
    plain = evaluate_generator(gen, data, **attack, desc=None)
    assert plain["asr"] == 1.0 and "prompt_filter" not in plain and "guard" not in plain
    seen_prompts.clear()
    m = evaluate_generator(gen, data, **attack, desc=None, prompt_filter=drop_cf)
    assert m["asr"] == 0.0 and m["prompt_filter"]["changed_rows"] == m["n_asr"]
    rows = data.split("test").to_list()
    # every text asked about is some row's user text (input, else instruction), each once; never a template
    users = {r[user_field(r)] for r in rows}
    assert set(asked) >= users and len(asked) == len(set(asked))
    assert all(t in users or "cf" in t.split() for t in asked) and not any("###" in t for t in asked)
    assert asked.count("summarise the story") == 1  # the instruction: the user text of the row without input
    # the prompts are those of the rows with the filtered user text
    filtered = [{**r, user_field(r): drop_cf([r[user_field(r)]])[0]} for r in rows]
    assert set(map(tuple, prompt_ids(gen, filtered))) == set(seen_prompts)
    with pytest.raises(Exception, match="one string per text"):
        evaluate_generator(gen, data, **attack, desc=None, prompt_filter=lambda texts: texts[:1])


# --- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_class, changes, field", [
    (GenFineTuningConfig, {"mode": "lora"}, "fine-tuning.mode"),
    (GenFineTuningConfig, {"lr": 0}, "fine-tuning.lr"),
    (GenFinePruningConfig, {"rate": 1.0}, "fine-pruning.rate"),
    (GenFinePruningConfig, {"positions": "response"}, "fine-pruning.positions"),
    (GenFinePruningConfig, {"max_nll_rise": -1}, "fine-pruning.max_nll_rise"),
    (GenQuantizationConfig, {"bits": 16}, "quantization.bits"),
    (GenQuantizationConfig, {"group_size": -1}, "quantization.group_size"),
    (GenMergeConfig, {"method": "ties"}, "merge.method"),
    (GenMergeConfig, {"weights": [1, -1]}, "merge.weights"),
    (GenOnionConfig, {"max_length": 1}, "onion.max_length"),
    (CleanGenConfig, {"veto_ratio": 0.5}, "cleangen.veto_ratio"),
    (CleanGenConfig, {"reference_epochs": 0}, "cleangen.reference_epochs"),
])
def test_config_errors_name_the_field(config_class, changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_class(**changes)


def test_planned_settings_say_what_each_baseline_trains():
    plain = baseline_planned_settings("quantization", GenQuantizationConfig(), TRAIN, LORA)
    assert plain["train"]["lr"] == TRAIN.lr and plain["adapter"]["kind"] == "lora" and "clean_sft" not in plain
    assert "checkpoint_every" not in plain["train"]
    ft = baseline_planned_settings("fine-tuning", GenFineTuningConfig(), TRAIN, LORA)
    assert ft["train"]["lr"] == 2e-5 and ft["adapter"]["kind"] == "full"
    merge = baseline_planned_settings("merge", GenMergeConfig(other_epochs=3), TRAIN, LORA)
    assert merge["clean_sft"]["epochs"] == 3 and merge["clean_sft"]["select_best"] is True
    assert "clean_sft" in baseline_planned_settings("cleangen", CleanGenConfig(reference_sft=True), TRAIN, LORA)
    with pytest.raises(ConfigError, match="unknown generative baseline"):
        gen_baseline("strip")
