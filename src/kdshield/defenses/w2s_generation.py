"""W2SDefense on tokens: a weak clean teacher distils into the PEFT adapter of a suspect causal LM.

    kdshield bench configs/gen-bbc-lead.yaml --set 'methods=[none,lora,w2s]'

    from kdshield.defenses.w2s_generation import GenW2SConfig, gen_w2s_defend
    res = gen_w2s_defend("runs/p/model", data, GenW2SConfig(), base="smollm2-135m",
                         peft_train=TrainConfig(max_length=128, batch_size=8),
                         adapter=AdapterConfig(kind="lora"), output_dir="runs/w2s", max_response_tokens=48)
    res.model.save("runs/w2s/adapter")

The teacher is the student's clean base model cut to ``teacher_layers`` of its layers (final norm
and tied head kept, so it has the student's tokenizer and width): by default the first a and the
last N - a, with a chosen by the untrained cut's NLL on clean dev rows (``choose_ends_cut``), then
fully SFT-ed on the clean train split. It is cached on disk keyed by its settings (model, layers, tokenizer, data, training
settings), so every cell of a grid reuses it, and its outputs on the training rows are cached once
per encoding: per response token the top-k log-probs at temperature T with their token ids plus
one tail bin, and the pooled features of every example. No full-vocabulary logits are ever kept.

The student (suspect model + LoRA) trains on response tokens with

    alpha * CE + beta * T^2 * KL_topk(p_t || p_s) + gamma * mean_i ||h_s,i - h_t,i||^2

(``training.losses.topk_distillation_kl``, ``feature_alignment``), where ``h`` is the pooled
last-layer feature of example ``i`` itself (``feature_position``: the last prompt token, which
emits the first response token, or the response mean). The teacher is frozen: eval(),
requires_grad_(False), outputs computed under no_grad before the student starts.

A teacher of another tokenizer (``teacher: smollm2-135m`` for a gemma-3-270m student, with
``teacher_layers: none`` for the whole teacher) cannot share token KD: ``kd: auto`` turns it off
(``kd: on`` is a ConfigError naming the mismatch) and the record says so (``teacher.kd_off``). The
teacher then keeps its own tokenizer: it is SFT-ed on, and its features computed on, its own
encoding of the same rows, and the student trains on ``alpha * CE + gamma * ||h_s,i - P(h_t,i)||^2``,
example i's pooled teacher feature (cached in row order of the train split) through a frozen
projection P into the student's space. A teacher of another width (same tokenizer) keeps token KD
and aligns through the same projection. P is fitted by ridge regression to the clean base's
features (``kdshield.defenses.w2s_projection``, which says why and what the alternative is).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kdshield import assets
from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.data.batching import Encoded, collate, epoch_batches
from kdshield.data.core import rows_digest
from kdshield.data.sft import SFTData
from kdshield.defenses.base import Timer
from kdshield.defenses.w2s import _cache_train_key, check_w2s_common
from kdshield.defenses.w2s_projection import (  # noqa: F401 (vocabulary_mismatch, resolve_kd: re-exported)
    Projection,
    encoded_digest,
    kd_decision,
    resolve_kd,
    student_targets,
    tokenizer_digest,
    vocabulary_mismatch,
)
from kdshield.defenses.w2s_teacher_check import teacher_check, teacher_warning
from kdshield.errors import ConfigError
from kdshield.models.adapters import AdapterConfig
from kdshield.models.classifier import _load_tokenizer
from kdshield.models.generator import (
    Generator,
    GeneratorOutput,
    attach_generator_adapter,
    load_generator,
    pool_features,
)
from kdshield.models.loading import LoadOptions, resolve_model_ref
from kdshield.profiling import phase
from kdshield.results import settings_hash
from kdshield.training.loop import (
    SCHEDULES,
    TrainConfig,
    TrainResult,
    drop_checkpoint_weights,
    train,
)
from kdshield.training.losses import feature_alignment, topk_distillation_kl, topk_log_probs
from kdshield.training.sft import (
    ROW_COLUMNS,
    dev_nll_eval_fn,
    encode_sft,
    response_nll,
    sft_finetune,
)

log = logging.getLogger(__name__)

KD_MODES = ("auto", "on", "off")
FEATURE_POSITIONS = ("last_prompt", "response_mean")
TEACHER_CUTS = ("auto", "first")
WEAK_TEACHER = ("warn", "deepen")


@dataclass
class GenW2SConfig:
    """W2SDefense for causal-LM SFT. **The defaults are untuned** (no generative run has chosen
    them yet; choose them on dev data, never on ASR). They start from the classification defense's
    measured settings (docs/w2sdefense.md) for the same SmolLM2 student: alpha 1, beta 1, T 2,
    gamma 0.01 on raw (unnormalised) features, lr 1e-3, 4 epochs, LoRA r16 / alpha 32. There the
    alignment only unlearned with an lr high enough to move the features, and KD alone did not;
    nothing says this transfers to tokens. The teacher is SmolLM2 cut to 12 of its 30 layers
    (~71M parameters, the weak same-tokenizer teacher of ../shared/GENERATION.md). Its first 12
    layers alone were unusable (untrained dev NLL 25 nats, 17.8 after SFT, against 3.4 for the
    whole model), so the cut keeps the first a and the last 12 - a layers, a chosen on clean dev
    NLL (bbc-lead: a = 3, 8.2 nats before SFT); full SFT at 1e-4 (twice the attacker's
    poison_lr), 3 epochs. k = 32 keeps the cache at rows x response tokens x 33 floats. A teacher
    of another tokenizer or width aligns through a ridge projection (``projection_ridge``, untuned;
    its dev R^2 is recorded) and, with another tokenizer, runs without token KD."""

    teacher: str | None = cfg_field(None, help="Clean teacher: builtin name, directory or hub id of a causal LM "
                                               "(none: the student's clean base model, e.g. smollm2-135m).")
    teacher_layers: int | None = cfg_field(12, help="Keep N of the teacher's decoder layers (its embeddings, final "
                                                    "norm and head stay); none: all of them.")
    teacher_cut: str = cfg_field("auto", help="Which N layers: first (the first N) or auto (the first a and the last "
                                              "N - a, with a chosen by the cut model's NLL on the clean dev split "
                                              "before any training).", choices=list(TEACHER_CUTS))
    teacher_cut_rows: int = cfg_field(32, help="Dev rows the auto cut scores each candidate on.")
    kd: str = cfg_field("auto", help="Token KD: on (needs the student's vocabulary), off (CE + feature alignment "
                                     "only), auto (on when the vocabularies match).", choices=list(KD_MODES))
    top_k: int = cfg_field(32, help="Teacher tokens kept per response position; the rest of its mass is one "
                                    "tail bin (KL over k + 1 bins).")
    alpha: float = cfg_field(1.0, help="Weight of the response cross-entropy.")
    beta: float = cfg_field(1.0, help="Weight of the T^2-scaled top-k KL distillation (token mean).")
    gamma: float = cfg_field(0.01, help="Weight of the per-example feature alignment (squared distance between "
                                        "the student's pooled last-layer feature and the teacher's).")
    temperature: float = cfg_field(2.0, help="Distillation temperature T.")
    feature_position: str = cfg_field("last_prompt", help="Pooled feature aligned: last_prompt (the position that "
                                                          "emits the first response token) or response_mean.",
                                      choices=list(FEATURE_POSITIONS))
    lr: float | None = cfg_field(1e-3, help="Student learning rate (none: the shared PEFT lr).")
    epochs: int | None = cfg_field(4, help="Student epochs (none: the shared PEFT epochs).")
    schedule: str | None = cfg_field(None, help="Student lr schedule (none: the shared one).",
                                     choices=list(SCHEDULES))
    lora_r: int | None = cfg_field(16, help="LoRA rank of the student's adapter (none: the shared rank); LoRA "
                                            "adapters only.")
    lora_alpha: float | None = cfg_field(32.0, help="LoRA alpha of the student's adapter (none: the shared one).")
    lora_targets: list[str] | None = cfg_field(None, help="Modules the student's LoRA adapts, e.g. [q_proj, k_proj, "
                                                          "v_proj, o_proj, gate_proj, up_proj, down_proj] or "
                                                          "[all-linear] (none: the shared targets, peft's q_proj / "
                                                          "v_proj for Llama). Plain LoRA keeps the shared ones.")
    seed: int | None = cfg_field(None, help="Seed of the student's training (none: the shared seed). The teacher "
                                            "keeps the shared seed, so its cache is reused.")
    teacher_epochs: int = cfg_field(3, help="Epochs of the teacher's full SFT.")
    teacher_lr: float = cfg_field(1e-4, help="Learning rate of the teacher's full SFT.")
    teacher_batch_size: int = cfg_field(8, help="Batch size of the teacher's SFT and of its cached outputs.")
    weak_teacher: str = cfg_field("warn", help="When the dev check calls a cut teacher weak (label tasks: exactly "
                                               "right far less often than the suspect, or barely more often than "
                                               "always giving the most common answer): warn (train the student "
                                               "with it anyway) or deepen (train the whole teacher, every layer, "
                                               "check it again and use it). Reads clean dev rows only.",
                                  choices=list(WEAK_TEACHER))
    projection_ridge: float = cfg_field(0.1, help="Ridge penalty of the projection from a teacher of another "
                                                  "tokenizer or width to the student's features (fitted to the "
                                                  "clean base's features, per standardised teacher dimension, "
                                                  "times the rows; 0: plain least squares). Unused when teacher "
                                                  "and student share tokenizer and width.")
    label_refit: bool = cfg_field(False, help="Label tasks only (not in the paper): after training, fit the "
                                              "student's split between the label words anew, from zero, on its "
                                              "hidden states at the first answer position of the clean train rows "
                                              "(L2-regularised logistic regression; the label words' total "
                                              "probability stays the model's). The generative twin of the "
                                              "classification defense's head_refit (models/label_head.py). "
                                              "Ignored, and recorded as such, on other tasks.")
    label_refit_l2: float = cfg_field(1e-3, help="L2 weight of the label refit (mean cross-entropy + l2/2 * ||A||^2, "
                                                 "as w2s.head_refit_l2).")

    # options added after results were keyed: they enter a key (grid cell, student run) only when set
    # away from their default, so adding one re-keys nothing already computed (``keyed_settings``)
    KEYED_AWAY_FROM_DEFAULT: ClassVar[tuple[str, ...]] = ("projection_ridge", "weak_teacher", "label_refit",
                                                          "label_refit_l2", "lora_targets")
    # options of what runs after the student's training: never part of the training's own key, so a
    # finished training is resumed, not repeated, when only these change
    AFTER_TRAINING: ClassVar[tuple[str, ...]] = ("label_refit", "label_refit_l2")

    def __post_init__(self):
        check_w2s_common(self)
        if self.teacher_layers is not None:
            check_range("w2s.teacher_layers", self.teacher_layers, 1, 10_000)
        check_choice("w2s.teacher_cut", self.teacher_cut, TEACHER_CUTS)
        check_range("w2s.teacher_cut_rows", self.teacher_cut_rows, 1, 100_000)
        check_choice("w2s.kd", self.kd, KD_MODES)
        check_range("w2s.top_k", self.top_k, 1, 1_000_000)
        check_choice("w2s.feature_position", self.feature_position, FEATURE_POSITIONS)
        check_range("w2s.teacher_epochs", self.teacher_epochs, 1, 100)
        check_range("w2s.teacher_lr", self.teacher_lr, 0, 1, lo_open=True)
        check_range("w2s.teacher_batch_size", self.teacher_batch_size, 1, 65536)
        check_range("w2s.projection_ridge", self.projection_ridge, 0, 1e6)
        check_choice("w2s.weak_teacher", self.weak_teacher, WEAK_TEACHER)
        if not isinstance(self.label_refit, bool):
            raise ConfigError(f"w2s.label_refit must be true or false, got {self.label_refit!r}")
        check_range("w2s.label_refit_l2", self.label_refit_l2, 0, 1e4)
        if self.lora_targets is not None and not self.lora_targets:
            raise ConfigError("w2s.lora_targets is an empty list; give module names, or null for the shared targets")


def keyed_settings(cfg: GenW2SConfig) -> dict:
    """``config_to_dict(cfg)`` less the ``KEYED_AWAY_FROM_DEFAULT`` options left at their default."""
    d = config_to_dict(cfg)
    for f in dataclasses.fields(cfg):
        if f.name in cfg.KEYED_AWAY_FROM_DEFAULT and getattr(cfg, f.name) == f.default:
            d.pop(f.name)
    return d


# --- the teacher ----------------------------------------------------------------------------------
def _decoder_layers(gen: Generator):
    model = gen.model.get_base_model() if hasattr(gen.model, "get_base_model") else gen.model
    decoder = getattr(model, "model", None)
    blocks = getattr(decoder, "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ConfigError(f"w2s.teacher_layers: cannot find the decoder layers of {model.config.model_type} "
                          "(model.model.layers); set teacher_layers to none to use the whole teacher")
    return model, decoder, blocks


def keep_layers(gen: Generator, keep: list[int]) -> Generator:
    """Keep the decoder layers ``keep`` (ascending indices) of ``gen``'s model, in place: embeddings,
    final norm and the tied head stay, so the tokenizer and width are the student's. Attention
    modules are renumbered, so a KV cache and a saved copy see layers 0..len(keep)-1."""
    model, decoder, blocks = _decoder_layers(gen)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= len(blocks):
        raise ConfigError(f"w2s: layers {keep} are not ascending indices of {gen.source or 'the teacher'}'s "
                          f"{len(blocks)} layers")
    decoder.layers = torch.nn.ModuleList([blocks[i] for i in keep])
    for j, block in enumerate(decoder.layers):
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = j
    model.config.num_hidden_layers = len(keep)
    if isinstance(getattr(model.config, "layer_types", None), list):  # per-layer attention kinds (Qwen3, Gemma3)
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return gen


def truncate_generator(gen: Generator, layers: int) -> Generator:
    """Keep the first ``layers`` decoder layers of ``gen``'s model, in place (``keep_layers``)."""
    _, _, blocks = _decoder_layers(gen)
    if layers > len(blocks):
        raise ConfigError(f"w2s.teacher_layers={layers} but {gen.source or 'the teacher'} has {len(blocks)} "
                          "layers; give at most that many (or none for all)")
    return keep_layers(gen, list(range(layers)))


def ends_cut(total: int, layers: int, first: int) -> list[int]:
    """The first ``first`` and the last ``layers - first`` of ``total`` layers."""
    return list(range(first)) + list(range(total - layers + first, total))


def choose_ends_cut(gen: Generator, layers: int, dev: Encoded, *, batch_size: int = 16) -> tuple[list[int], dict]:
    """The cut (first a, last N - a layers) whose untrained model has the lowest response NLL on
    ``dev`` (clean rows a defender has), and every candidate's NLL. Why: a stack cut at its top hands
    the final norm and head a residual stream they were never trained on (SmolLM2's first 12 of 30
    layers: dev NLL 25 nats against 3.4 for the whole model), while the last layers map back to
    the head's space (first 3 + last 9: 8.2); the best split varies with the model, so it is
    measured, not fixed. Costs N + 1 forward passes over ``dev``."""
    model, decoder, blocks = _decoder_layers(gen)
    total = len(blocks)
    if layers > total:
        raise ConfigError(f"w2s.teacher_layers={layers} but {gen.source or 'the teacher'} has {total} "
                          "layers; give at most that many (or none for all)")
    attns = [getattr(b, "self_attn", None) for b in blocks]
    saved = ([getattr(a, "layer_idx", None) for a in attns], list(getattr(model.config, "layer_types", None) or []))

    def restore():
        decoder.layers = blocks
        model.config.num_hidden_layers = total
        for a, idx in zip(attns, saved[0]):
            if idx is not None:
                a.layer_idx = idx
        if saved[1]:
            model.config.layer_types = list(saved[1])

    scores: dict[int, float] = {}
    try:
        for first in tqdm(range(layers + 1), desc="w2s teacher cut", unit="cut", leave=False):
            keep_layers(gen, ends_cut(total, layers, first))
            scores[first] = response_nll(gen, dev, batch_size=batch_size)["nll"]
            restore()  # the next candidate cuts the whole stack again
    finally:
        restore()
    best = min(scores, key=lambda a: (scores[a], -a))
    return ends_cut(total, layers, best), {f"first{a}": round(v, 4) for a, v in scores.items()}


def teacher_train_config(cfg: GenW2SConfig, *, max_length: int, seed: int, precision: str = "auto") -> TrainConfig:
    """The teacher's full SFT (it shares only length, seed and precision with the student); the
    epoch of best dev NLL is kept (dev data is clean, so that choice cannot see a backdoor)."""
    return TrainConfig(epochs=cfg.teacher_epochs, lr=cfg.teacher_lr, batch_size=cfg.teacher_batch_size,
                       max_length=max_length, seed=seed, precision=precision, checkpoint_every=0, select_best=True)


@dataclass
class GenTeacher:
    gen: Generator
    path: Path  # the cache entry: model/, teacher.json, outputs-*.safetensors
    ref: str
    layers: int | None
    dev_nll: float | None
    trained: bool  # False when loaded from the cache
    kd: bool = True  # whether token KD runs with this teacher and student (kd: auto resolved)
    kept: list[int] | None = None  # the base model's layers the teacher kept (None: all)
    cut_nll: dict | None = None  # the auto cut's candidates: untrained dev NLL per "first<a>"
    own_tokenizer: bool = False  # another vocabulary than the student's: it reads its own encoding of the rows
    kd_off: str | None = None  # why token KD is off where the models decided it (a vocabulary mismatch)
    projection: Projection | None = None  # teacher -> student features (another tokenizer or width), once fitted

    def describe(self) -> dict:
        out = {"ref": self.ref, "layers": self.layers, "kept": self.kept, "cut_nll": self.cut_nll,
               "path": str(self.path), "dev_nll": self.dev_nll, "trained": self.trained,
               "parameters": sum(p.numel() for p in self.gen.parameters()), "hidden_size": self.gen.hidden_size}
        if self.own_tokenizer:  # the foreign-teacher keys only where they apply (same-tokenizer records unchanged)
            out["own_tokenizer"] = True
        if self.kd_off:
            out["kd_off"] = self.kd_off
        if self.projection is not None:
            out["projection"] = self.projection.describe()
        return out


def prepare_gen_teacher(cfg: GenW2SConfig, data: SFTData, student: Generator, *, base: str, max_length: int,
                        max_response_tokens: int | None, seed: int, precision: str = "auto",
                        options: LoadOptions = LoadOptions(), cache_root: Path | None = None) -> GenTeacher:
    """The clean teacher, fully SFT-ed on ``data``'s train split (dev NLL selects the epoch), or
    reused from the cache. With one vocabulary it reads the student's token ids: its SFT and its
    cached outputs use the student's tokenizer (and chat template), so every position lines up. A
    teacher of another vocabulary keeps its own tokenizer (``own_tokenizer``; its SFT and outputs
    use its own encoding of the rows, and its key names that tokenizer). A teacher that cannot
    serve ``student`` (``kd_decision``) is a ConfigError before any training."""
    student_tokenizer = student.tokenizer
    options = options.for_full_training("the W2SDefense teacher")
    ref = str(cfg.teacher or base)
    resolved = resolve_model_ref(ref, options)
    # its vocabulary decides which tokenizer it reads, hence its cache key: the tokenizer alone is loaded here
    teacher_tokenizer = _load_tokenizer(resolved, options)
    own_tokenizer = teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab()
    teacher_train = teacher_train_config(cfg, max_length=max_length, seed=seed, precision=precision)
    train_rows, dev = data.split("train"), data.splits.get("dev")
    cut = None if cfg.teacher_layers is None else \
        {"mode": cfg.teacher_cut, **({"rows": cfg.teacher_cut_rows} if cfg.teacher_cut == "auto" else {})}
    if cut and cut["mode"] == "auto" and (dev is None or not len(dev)):
        raise ConfigError("w2s.teacher_cut=auto chooses the teacher's layers on the clean dev split, and this data "
                          "has none: give a dev split or set w2s.teacher_cut: first")
    key_src = {"teacher": ref, "resolved": str(resolved), "layers": cfg.teacher_layers,
               "cut": cut,
               "tokenizer": tokenizer_digest(student_tokenizer), "data": rows_digest(train_rows, ROW_COLUMNS),
               "dev": rows_digest(dev, ROW_COLUMNS) if dev is not None else None,
               "max_response_tokens": max_response_tokens, "train": _cache_train_key(teacher_train)}
    if own_tokenizer:  # only here: a same-tokenizer teacher keeps the key it always had
        key_src["tokenizer"] = tokenizer_digest(teacher_tokenizer)
        key_src["own_tokenizer"] = True
    key = settings_hash(key_src)
    root = cache_root or assets.cache_dir() / "gen-teachers"
    layers = "all" if cfg.teacher_layers is None else cfg.teacher_layers
    path = root / f"{Path(ref).name}-L{layers}-{key}"
    info_path = path / "teacher.json"
    if info_path.is_file():  # written last: the entry is whole
        log.info("reusing cached teacher %s", path)
        gen = load_generator(path / "model", options=options)
        info = json.loads(info_path.read_text())
        kd, kd_off = kd_decision(cfg, gen, student)
        return _frozen(GenTeacher(gen, path, ref, cfg.teacher_layers, info.get("dev_nll"), trained=False, kd=kd,
                                  kept=info.get("kept"), cut_nll=info.get("cut_nll"), own_tokenizer=own_tokenizer,
                                  kd_off=kd_off))

    torch.manual_seed(seed)
    gen = load_generator(ref, options=options)
    kd, kd_off = kd_decision(cfg, gen, student)  # before any training (the cut changes neither vocabulary nor width)
    if not own_tokenizer:
        gen.tokenizer = student_tokenizer  # one vocabulary: the student's prompts, token for token
    kept, cut_nll = None, None
    if cfg.teacher_layers is not None and cfg.teacher_cut == "first":
        kept = list(range(cfg.teacher_layers))
        truncate_generator(gen, cfg.teacher_layers)
    elif cfg.teacher_layers is not None:
        rows = dev.select(range(min(len(dev), cfg.teacher_cut_rows)))
        scored = encode_sft(gen.tokenizer, rows, max_length=max_length, max_response_tokens=max_response_tokens)
        with phase("teacher cut"):
            kept, cut_nll = choose_ends_cut(gen, cfg.teacher_layers, scored, batch_size=cfg.teacher_batch_size)
        keep_layers(gen, kept)
        log.info("w2s teacher cut: layers %s (untrained dev NLL per first-a split: %s)", kept, cut_nll)
    dev_fn = dev_nll_eval_fn(dev, max_length=max_length, max_response_tokens=max_response_tokens,
                             batch_size=cfg.teacher_batch_size) if dev is not None and len(dev) else None
    gen, result = sft_finetune(gen, data, AdapterConfig(kind="full"), teacher_train, output_dir=path / "run",
                               resume=True, eval_fn=dev_fn, run_settings={"teacher": key_src},
                               max_response_tokens=max_response_tokens, desc="w2s teacher")
    dev_nll = -result.best_score if result.best_score is not None else None
    gen.save(path / "model")
    info_path.write_text(json.dumps({"key": key_src, "dev_nll": dev_nll, "kept": kept, "cut_nll": cut_nll,
                                     **({"own_tokenizer": True} if own_tokenizer else {}),
                                     "train": result.to_dict()}, indent=2, default=str))
    drop_checkpoint_weights(path / "run")  # model/ is the copy the cache serves
    log.info("w2s teacher %s (%s layers): dev NLL %s (%.0f s)", ref, layers, dev_nll, result.wall_s)
    return _frozen(GenTeacher(gen, path, ref, cfg.teacher_layers, dev_nll, trained=True, kd=kd, kept=kept,
                              cut_nll=cut_nll, own_tokenizer=own_tokenizer, kd_off=kd_off))


def _frozen(teacher: GenTeacher) -> GenTeacher:
    teacher.gen.eval().requires_grad_(False)  # frozen from here on
    return teacher


# --- the teacher's outputs on the training rows ---------------------------------------------------
@dataclass
class TeacherOutputs:
    """Per training row: its response tokens' top-k teacher bins (padded to the longest response)
    and its pooled teacher features."""

    indices: torch.Tensor  # [N, R, k] int32 token ids
    log_probs: torch.Tensor  # [N, R, k + 1] at temperature T: top k, then the tail
    lengths: torch.Tensor  # [N] response tokens per row (EOS included)
    last_prompt: torch.Tensor  # [N, H]
    response_mean: torch.Tensor  # [N, H]

    def extras(self, feature_position: str) -> dict[str, torch.Tensor]:
        """What the student's batches carry (``Encoded.extras``, indexed per row by the collator)."""
        return {"t_idx": self.indices, "t_logp": self.log_probs, "t_len": self.lengths,
                "t_feat": getattr(self, feature_position)}


@torch.no_grad()
def compute_teacher_outputs(teacher: Generator, encoded: Encoded, *, top_k: int, temperature: float,
                            batch_size: int = 8) -> TeacherOutputs:
    """The frozen teacher on every row of ``encoded`` (lean logits at response positions only)."""
    teacher.eval()
    device = next(teacher.parameters()).device
    n = len(encoded)
    lengths = torch.tensor([sum(t != -100 for t in labels) for labels in encoded.token_labels], dtype=torch.long)
    width, k = int(lengths.max()), min(top_k, teacher.base_config.vocab_size)
    indices = torch.zeros(n, width, k, dtype=torch.int32)
    log_probs = torch.zeros(n, width, k + 1)
    hidden = teacher.hidden_size
    last_prompt, response_mean = torch.zeros(n, hidden), torch.zeros(n, hidden)
    for rows in epoch_batches(encoded.lengths(), batch_size, 0, 0, shuffle=False):
        batch = {name: v.to(device) for name, v in collate(encoded, rows).items()}
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], labels=batch["labels"], output_hidden=True)
        idx, logp = topk_log_probs(out.response_logits, k, temperature)
        j = _ordinals(out)
        ids = torch.tensor(rows)[out.rows.cpu()]
        indices[ids, j.cpu()] = idx.cpu().to(torch.int32)
        log_probs[ids, j.cpu()] = logp.cpu()
        feats = pool_features(out.hidden, batch["labels"])
        last_prompt[rows] = feats.last_prompt.float().cpu()
        response_mean[rows] = feats.response_mean.float().cpu()
    return TeacherOutputs(indices, log_probs, lengths, last_prompt, response_mean)


def teacher_outputs(teacher: GenTeacher, encoded: Encoded, cfg: GenW2SConfig) -> TeacherOutputs:
    """``compute_teacher_outputs``, cached in the teacher's entry per (encoding, k, T)."""
    key = settings_hash({"encoded": encoded_digest(encoded), "top_k": cfg.top_k, "temperature": cfg.temperature})
    path = teacher.path / f"outputs-{key}.safetensors"
    if path.is_file():
        return TeacherOutputs(**load_file(str(path)))
    with phase("teacher outputs"):
        out = compute_teacher_outputs(teacher.gen, encoded, top_k=cfg.top_k, temperature=cfg.temperature,
                                      batch_size=cfg.teacher_batch_size)
    tmp = path.with_suffix(".tmp")
    save_file({f.name: getattr(out, f.name).contiguous() for f in dataclasses.fields(out)}, str(tmp))
    tmp.replace(path)
    return out


def teacher_extras(teacher: GenTeacher, student: Generator, encoded: Encoded, data: SFTData, cfg: GenW2SConfig,
                   *, base: str, max_length: int, max_response_tokens: int | None,
                   options: LoadOptions = LoadOptions()) -> tuple[dict[str, torch.Tensor], int]:
    """What the student's batches carry (row i of ``encoded``, the student's encoding of the train
    split, gets row i's teacher data) and the floats cached for them (``student_targets``; one
    tokenizer: ``TeacherOutputs.extras``, the features projected where ``needs_projection``)."""
    outputs = None if teacher.own_tokenizer else teacher_outputs(teacher, encoded, cfg)
    extras, floats, teacher.projection = student_targets(
        teacher.gen, teacher.path, student, encoded, data, cfg, outputs=outputs, base=base, max_length=max_length,
        max_response_tokens=max_response_tokens, options=options)
    return extras, floats


# --- the student's objective ----------------------------------------------------------------------
def _ordinals(out: GeneratorOutput) -> torch.Tensor:
    """For each lean row (in row-major order): its index among its own example's response tokens."""
    count = torch.bincount(out.rows, minlength=out.batch_size)
    starts = count.cumsum(0) - count
    return torch.arange(out.rows.shape[0], device=out.rows.device) - starts[out.rows]


def gen_w2s_loss(out: GeneratorOutput, labels: torch.Tensor, teacher: dict[str, torch.Tensor], cfg: GenW2SConfig,
                 *, kd: bool) -> tuple[torch.Tensor, dict]:
    """The objective on one batch; ``out``: the student's lean output with hidden states,
    ``teacher``: the batch's cached rows (``TeacherOutputs.extras``; a teacher of another tokenizer
    gives ``t_feat`` alone, already projected, its token rows not being the student's). Returns
    (loss, logs)."""
    nll, count = out.token_nll()
    if "t_len" in teacher and not torch.equal(count.cpu(), teacher["t_len"].long().cpu()):
        raise RuntimeError("w2s: the batch's response tokens differ from the teacher's cached ones; the cache "
                           "was computed on another encoding")
    ce = nll.sum() / count.sum().clamp(min=1)
    loss, logs = cfg.alpha * ce, {"ce": ce.detach()}
    if kd:
        rows, j = out.rows, _ordinals(out)
        kl = topk_distillation_kl(out.response_logits, teacher["t_idx"][rows, j], teacher["t_logp"][rows, j],
                                  cfg.temperature)
        loss = loss + cfg.beta * kl
        logs["kd"] = kl.detach()
    if cfg.gamma:
        feats = getattr(pool_features(out.hidden, labels), cfg.feature_position)
        fa = feature_alignment(feats, teacher["t_feat"])  # example i against its own teacher row
        loss = loss + cfg.gamma * fa
        logs["fa"] = fa.detach()
    return loss, logs


def make_gen_w2s_loss_fn(cfg: GenW2SConfig, *, kd: bool, seen: dict | None = None):
    """A ``train`` loss function reading the teacher's rows from the batch (``Encoded.extras``);
    ``seen`` (optional) receives the first and the latest batch's loss terms."""
    def loss_fn(model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch.get("position_ids"), labels=batch["labels"], output_hidden=bool(cfg.gamma))
        loss, logs = gen_w2s_loss(out, batch["labels"], batch, cfg, kd=kd)
        if seen is not None:
            terms = {k: round(float(v), 5) for k, v in logs.items()}
            seen.setdefault("first", terms)
            seen["last"] = terms
        return loss, logs

    return loss_fn


# --- the defense ----------------------------------------------------------------------------------
def student_settings(cfg: GenW2SConfig, peft_train: TrainConfig, adapter: AdapterConfig,
                     ) -> tuple[TrainConfig, AdapterConfig]:
    """The student's training and adapter settings: the shared ones with this defense's own
    (lr, epochs, schedule, seed, LoRA rank / alpha / targets); the last epoch's weights are kept."""
    overrides = {k: v for k, v in (("lr", cfg.lr), ("epochs", cfg.epochs), ("schedule", cfg.schedule),
                                    ("seed", cfg.seed)) if v is not None}
    train_cfg = dataclasses.replace(peft_train, select_best=False, **overrides)
    if adapter.kind == "lora":
        changes = {k: v for k, v in (("r", cfg.lora_r), ("lora_alpha", cfg.lora_alpha)) if v is not None}
        if cfg.lora_targets is not None:
            changes["target_modules"] = list(cfg.lora_targets)
        adapter = dataclasses.replace(adapter, **changes)
    return train_cfg, adapter


def planned_settings(cfg: GenW2SConfig, peft_train: TrainConfig, adapter: AdapterConfig) -> dict:
    """The settings this defense runs with, as they enter a grid cell's key (checkpoint and
    activation-recomputation options left out: they change no result)."""
    from kdshield.training.loop import CHECKPOINT_OPTIONS

    train_cfg, adapter = student_settings(cfg, peft_train, adapter)
    teacher = teacher_train_config(cfg, max_length=peft_train.max_length, seed=peft_train.seed,
                                   precision=peft_train.precision)
    drop = set(CHECKPOINT_OPTIONS)
    return {"train": {k: v for k, v in config_to_dict(train_cfg).items() if k not in drop},
            "adapter": config_to_dict(adapter),
            "teacher_train": {k: v for k, v in config_to_dict(teacher).items() if k not in drop}}


@dataclass
class GenW2SResult:
    model: Generator
    train: TrainResult
    teacher: GenTeacher
    kd: bool  # whether token KD ran (kd: auto resolved)
    logs: dict


def _checked_teacher(cfg: GenW2SConfig, data: SFTData, student: Generator, dev, *, base: str,
                     max_length: int, max_response_tokens: int | None, seed: int, precision: str,
                     options: LoadOptions, cache_root: Path | None, eval_batch_size: int):
    """The teacher and the teacher check against the suspect as it is (None without dev rows)."""
    with phase("teacher"):
        teacher = prepare_gen_teacher(cfg, data, student, base=base, max_length=max_length,
                                      max_response_tokens=max_response_tokens, seed=seed, precision=precision,
                                      options=options, cache_root=cache_root)
    check = None
    if dev is not None and len(dev):  # clean dev rows only, before the student's adapter exists
        with phase("teacher check"):
            check = teacher_check(teacher.gen, student, dev, label_task=data.is_label_task, max_length=max_length,
                                  max_response_tokens=max_response_tokens, batch_size=eval_batch_size)
    return teacher, check


def _label_refit(student: Generator, data: SFTData, cfg: GenW2SConfig, dev, *, max_length: int,
                 max_response_tokens: int | None, batch_size: int, encoded: Encoded) -> dict:
    """``label_refit`` after the student's training: the fit's record, or why it did not run."""
    from kdshield.defenses.label_refit import refit_label_head

    if not data.is_label_task:
        log.info("w2s: label_refit is on but %s is not a label task: nothing refit", data.name)
        return {"skipped": "not a label task"}
    with phase("label refit"):
        dev_enc = encode_sft(student.tokenizer, dev, max_length=max_length, max_response_tokens=max_response_tokens) \
            if dev is not None and len(dev) else None
        return refit_label_head(student, encoded, num_labels=len(data.label_words), l2=cfg.label_refit_l2,
                                dev=dev_enc, batch_size=batch_size)


def gen_w2s_defend(suspect: str | Path, data: SFTData, cfg: GenW2SConfig, *, base: str, peft_train: TrainConfig,
                   adapter: AdapterConfig, output_dir: str | Path, max_response_tokens: int | None = None,
                   eval_batch_size: int = 16, resume: bool = True, options: LoadOptions = LoadOptions(),
                   teacher_cache: Path | None = None) -> GenW2SResult:
    """W2SDefense of the suspect generator ``suspect`` on ``data``'s clean train split. ``base``:
    the clean model the suspect was made from (the default teacher); ``peft_train`` / ``adapter``:
    the shared PEFT settings, which this defense's own options override (``student_settings``)."""
    output_dir = Path(output_dir)
    train_cfg, adapter = student_settings(cfg, peft_train, adapter)
    if adapter.kind == "lora":  # a misspelt target fails before the teacher's training, not after it
        from kdshield.models.adapters import check_lora_targets

        check_lora_targets(suspect, adapter.target_modules, trust_remote_code=options.trust_remote_code,
                           what="w2s.lora_targets" if cfg.lora_targets is not None else "adapter.target_modules")
    with Timer() as timer:
        torch.manual_seed(train_cfg.seed)  # adapter initialisation
        student = load_generator(suspect, options=options)
        with Timer() as t_teacher:
            encoded = encode_sft(student.tokenizer, data.split("train"), max_length=train_cfg.max_length,
                                 max_response_tokens=max_response_tokens)
            dev = data.splits.get("dev")
            teacher_kw = dict(base=base, max_length=peft_train.max_length, max_response_tokens=max_response_tokens,
                              seed=peft_train.seed, precision=peft_train.precision, options=options,
                              cache_root=teacher_cache, eval_batch_size=eval_batch_size)
            teacher, check = _checked_teacher(cfg, data, student, dev, **teacher_kw)
            first = None
            if check is not None and check.get("weak") and cfg.weak_teacher == "deepen" \
                    and cfg.teacher_layers is not None:
                # a weak cut teacher flattens the student's answers (w2s_teacher_check): train the whole one
                log.warning("w2s: the %s-layer teacher is weak on the clean dev rows; training the whole teacher "
                            "(weak_teacher: deepen)", cfg.teacher_layers)
                first = {"teacher": teacher.describe(), "teacher_check": check}
                del teacher  # its outputs on the train rows were never computed
                teacher, check = _checked_teacher(dataclasses.replace(cfg, teacher_layers=None), data, student, dev,
                                                  **teacher_kw)
            kd = teacher.kd
            with phase("teacher"):  # the outputs of the teacher that teaches, only
                extras, cache_floats = teacher_extras(teacher, student, encoded, data, cfg, base=base,
                                                      max_length=train_cfg.max_length,
                                                      max_response_tokens=max_response_tokens, options=options)
        encoded.extras = extras
        if (warning := teacher_warning(check or {})) is not None:
            log.warning(warning)
        attach_generator_adapter(student, adapter)
        eval_fn = dev_nll_eval_fn(dev, max_length=train_cfg.max_length, max_response_tokens=max_response_tokens,
                                  batch_size=eval_batch_size) if dev is not None and len(dev) else None
        seen: dict = {}
        with Timer() as t_student:
            loss_fn = make_gen_w2s_loss_fn(cfg, kd=kd, seen=seen)
            result = train(student, None, train_cfg, encoded=encoded, loss_fn=loss_fn, eval_fn=eval_fn,
                           output_dir=output_dir / "train", resume=resume, desc="w2s", eval_epochs="last",
                           run_settings={"student": str(suspect), "adapter": config_to_dict(adapter),
                                         "teacher": teacher.path.name, "w2s": {
                                             k: v for k, v in keyed_settings(cfg).items()
                                             if k not in cfg.AFTER_TRAINING}})
        refit = None
        if cfg.label_refit:
            refit = _label_refit(student, data, cfg, dev, max_length=train_cfg.max_length,
                                 max_response_tokens=max_response_tokens, batch_size=eval_batch_size,
                                 encoded=encoded)
    dev_nll = result.history[-1].get("nll") if result.history else None
    logs = {"teacher": teacher.describe(), "kd": kd, "teacher_s": round(t_teacher.s, 1),
            "student_s": round(t_student.s, 1), "wall_s": round(timer.s, 1), "dev_nll": dev_nll,
            "loss_terms": seen or None, "cache_floats": cache_floats, "teacher_check": check}
    if refit is not None:
        logs["label_refit"] = refit
    if first is not None:  # the weak teacher the defense replaced, and why
        logs["weak_teacher_replaced"] = first
    if teacher.kd_off:
        logs["kd_off"] = teacher.kd_off
    log.info("w2s: teacher %.0f s (trained: %s), student %.0f s, dev NLL %s, loss terms %s%s", t_teacher.s,
             teacher.trained, t_student.s, dev_nll, seen, f" (token KD off: {teacher.kd_off})" if teacher.kd_off else "")
    return GenW2SResult(model=student, train=result, teacher=teacher, kd=kd, logs=logs)
