"""Generative baselines that edit the suspect causal LM's weights, then run plain PEFT on clean data.

    from kdshield.defenses.gen_baselines import GenFinePruningConfig, gen_fine_pruning_defend
    res = gen_fine_pruning_defend("runs/p/model", data, GenFinePruningConfig(rate=0.2),
                                  base="smollm2-135m", peft_train=TrainConfig(max_length=192, batch_size=8),
                                  adapter=AdapterConfig(kind="lora"), output_dir="runs/fp",
                                  max_response_tokens=48)
    res.model.save("runs/fp/adapter")          # its base is the edited model saved in runs/fp
    evaluate_generator(res.model, data, attack, prompt_filter=res.prompt_filter, decode=res.decode)

Every function has the signature of ``gen_w2s_defend`` (suspect, data, cfg, *, base, peft_train,
adapter, output_dir, max_response_tokens, eval_batch_size, resume, options) and returns a
``GenBaselineResult`` (model, train, logs, decode=None, prompt_filter=None); ``logs`` holds
``wall_s`` and what the baseline did. ``gen_baseline(name)`` gives a method's (config class,
function), ``GEN_BASELINE_NAMES`` lists them; ``baseline_planned_settings`` gives the training
settings a method runs with (for a grid cell's key). The baselines are not in the grid or the CLI
yet; the tests (tests/test_gen_baselines.py) run each on the tiny Llama.

- ``fine-tuning`` (``GenFineTuningConfig``): full SFT of the suspect on the clean train split at
  ``FULL_LR`` (2e-5, the classification baseline's rate; the shared lr is a LoRA rate), the
  shared epochs; ``mode=peft`` trains the shared adapter instead (its own lr / epochs). No
  further PEFT: the continued training is the defense.
- ``fine-pruning`` (``GenFinePruningConfig``, Liu et al. 2018): the mean absolute activation of
  every MLP neuron (the input of ``down_proj``) over the tokens of ``n_samples`` clean train rows
  (``positions``: all tokens, or the prompt's only) ranks the neurons of the last ``layers``
  decoder layers; the ``rate`` least active of each layer are zeroed. The rate is **fixed** by
  default (as in the classification baseline); ``max_nll_rise`` turns on Liu et al.'s search
  with dev NLL in place of accuracy (the largest rate, in ``rate_step`` steps up to ``rate``,
  whose clean dev response NLL rises by at most that many nats per token). The pruned neurons stay
  zero through the PEFT (``fine_pruning.hold_pruned``: activation mask hooks, LoRA factors on
  them zeroed).
- ``quantization`` (``GenQuantizationConfig``): weight-only symmetric round-to-nearest
  quantise-dequantise (``quantization.quantize_model``) of every linear layer of the decoder
  (``bits`` 8 or 4, ``group_size`` input weights per scale); embeddings, norms and the (tied) LM
  head keep full precision.
- ``merge`` (``GenMergeConfig``, Arora et al. 2024): weight averaging (or task arithmetic against
  ``base``) of the suspect with ``other`` models of the same architecture; by default one model,
  ``base`` fully SFT-ed on the clean train split (``clean_sft_generator``: cached by its settings
  under ``other_cache``, default ``output_dir/other``, so a shared directory serves every cell).
- ``onion`` and ``cleangen``: the test-time baselines (ONION on the prompt, CleanGen-style
  guarded decoding), in ``kdshield.defenses.gen_test_time``; they return the same result with
  ``prompt_filter`` / ``decode`` set.

The editing baselines merge a LoRA suspect (an adapter directory) into its weights first, edit in
fp32, save the edited model as ``output_dir/<tag>-model`` (in the dtype the PEFT loads it in) and
load it again with the shared options: an adapter saved later records that directory as its base,
so it can never be reloaded onto the unedited (backdoored) weights. The PEFT afterwards is the
plain PEFT row on the edited model: the shared adapter and training settings, dev NLL on the
clean dev split, checkpoints in ``output_dir/train``. All defaults are untuned for generation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.data.batching import Encoded, collate, epoch_batches
from kdshield.data.core import rows_digest
from kdshield.data.sft import SFTData
from kdshield.defenses.base import Timer
from kdshield.defenses.fine_pruning import (
    hold_pruned,
    last_blocks,
    mask_hooks,
    prune_mlp_neurons,
    select_dormant,
)
from kdshield.defenses.fine_tuning import FULL_LR
from kdshield.defenses.merge import (
    MERGE_METHODS,
    check_same_architecture,
    merge_state_dicts,
    merge_weights,
)
from kdshield.defenses.quantization import quantize_model
from kdshield.defenses.w2s import _cache_train_key
from kdshield.errors import ConfigError
from kdshield.generation.decode import DecodeGuard
from kdshield.models.adapters import AdapterConfig
from kdshield.models.generator import Generator, attach_generator_adapter, load_generator
from kdshield.models.loading import LoadOptions, resolve_model_ref
from kdshield.results import settings_hash
from kdshield.training.loop import (
    CHECKPOINT_OPTIONS,
    TrainConfig,
    TrainResult,
    drop_checkpoint_weights,
)
from kdshield.training.sft import (
    ROW_COLUMNS,
    dev_nll_eval_fn,
    encode_sft,
    response_nll,
    sft_finetune,
)

log = logging.getLogger(__name__)

FT_MODES = ("full", "peft")
ACTIVITY_POSITIONS = ("all", "prompt")


@dataclass
class GenBaselineResult:
    model: Generator
    train: TrainResult
    logs: dict  # wall_s and what the baseline did
    decode: DecodeGuard | None = None  # evaluate_generator(..., decode=...)
    prompt_filter: Callable[[Sequence[str]], Sequence[str]] | None = None  # evaluate_generator(..., prompt_filter=)


# --- shared steps ---------------------------------------------------------------------------------
def _check_editable(options: LoadOptions, what: str) -> None:
    if options.quantize != "none":
        raise ConfigError(f"{what} edits the suspect's weights and cannot run on a quantised ({options.quantize}) "
                          "base; drop --quantize")


def load_editable(suspect: str | Path, options: LoadOptions, what: str) -> Generator:
    """The suspect with plain fp32 weights to edit: an adapter directory is merged into them."""
    _check_editable(options, what)
    gen = load_generator(suspect, options=options, dtype=torch.float32)
    if gen.adapter_spec is not None:
        if gen.adapter_spec["kind"] != "lora":
            raise ConfigError(f"{what}: {suspect} is a {gen.adapter_spec['kind']} adapter, which has no weights to "
                              "merge and edit; give a full or merged model")
        gen.model = gen.model.merge_and_unload()
        gen.adapter_spec = None
        log.info("%s: %s is an adapter directory: editing its merged weights", what, suspect)
    return gen


def save_edited(gen: Generator, output_dir: Path, tag: str, options: LoadOptions) -> Generator:
    """Save the edited model as ``output_dir/<tag>-model`` (in the dtype the shared options load it
    in) and load it again with them: the base any adapter attached afterwards records."""
    from kdshield.inference import resolve_load_dtype

    path = output_dir / f"{tag}-model"
    gen.model.to(resolve_load_dtype(options.dtype))
    gen.save(path)
    log.info("edited model (%s) saved to %s", tag, path)
    return load_generator(path, options=options)


def load_suspect_for_peft(suspect: str | Path, output_dir: Path, options: LoadOptions, what: str) -> Generator:
    """The suspect as the shared options load it, ready for a new adapter: an adapter directory is
    merged and saved as ``output_dir/merged-model`` first (a new adapter needs a plain base)."""
    from kdshield.models.generator import read_generator_meta

    path = Path(str(suspect))
    if path.is_dir() and (read_generator_meta(path) or {}).get("adapter"):
        return save_edited(load_editable(suspect, options, what), output_dir, "merged", options)
    return load_generator(suspect, options=options)


def _dev_eval_fn(data: SFTData, max_length: int, max_response_tokens: int | None, batch_size: int):
    dev = data.splits.get("dev")
    if dev is None or not len(dev):
        return None
    return dev_nll_eval_fn(dev, max_length=max_length, max_response_tokens=max_response_tokens, batch_size=batch_size)


def plain_peft(model: str | Path | Generator, data: SFTData, *, peft_train: TrainConfig, adapter: AdapterConfig,
               output_dir: Path, max_response_tokens: int | None, eval_batch_size: int, resume: bool,
               options: LoadOptions, run_settings: dict, desc: str) -> tuple[Generator, TrainResult]:
    """The plain PEFT row (shared adapter and training settings, dev NLL) on ``model``."""
    eval_fn = _dev_eval_fn(data, peft_train.max_length, max_response_tokens, eval_batch_size)
    return sft_finetune(model, data, adapter, peft_train, output_dir=output_dir / "train", resume=resume,
                        eval_fn=eval_fn, run_settings=run_settings, options=options,
                        max_response_tokens=max_response_tokens, desc=desc)


def clean_sft_train_config(peft_train: TrainConfig, epochs: int | None, lr: float | None) -> TrainConfig:
    """Full SFT of the clean base: the shared length, seed, batch and precision; ``FULL_LR`` and the
    shared epochs unless given; the epoch of best dev NLL kept (clean dev data)."""
    return dataclasses.replace(peft_train, lr=lr if lr is not None else FULL_LR, epochs=epochs or peft_train.epochs,
                               select_best=True, checkpoint_every=0)


def clean_sft_generator(base: str, data: SFTData, train_cfg: TrainConfig, *, cache_root: Path,
                        max_response_tokens: int | None, eval_batch_size: int = 16,
                        options: LoadOptions = LoadOptions(), desc: str = "clean sft") -> tuple[Path, dict]:
    """``base`` fully SFT-ed on ``data``'s clean train split, cached under ``cache_root`` keyed by
    its settings (model, data, dev, training); returns (model directory, its card)."""
    options = options.for_full_training(desc)
    train_rows, dev = data.split("train"), data.splits.get("dev")
    key_src = {"base": str(base), "resolved": str(resolve_model_ref(base, options)),
               "data": rows_digest(train_rows, ROW_COLUMNS),
               "dev": rows_digest(dev, ROW_COLUMNS) if dev is not None else None,
               "max_response_tokens": max_response_tokens, "train": _cache_train_key(train_cfg)}
    key = settings_hash(key_src)
    path = Path(cache_root) / f"{Path(str(base)).name}-sft-{key}"
    card_path = path / "card.json"
    if card_path.is_file():  # written last: the entry is whole
        log.info("reusing the clean SFT model %s", path)
        return path / "model", json.loads(card_path.read_text())
    eval_fn = _dev_eval_fn(data, train_cfg.max_length, max_response_tokens, eval_batch_size)
    gen, result = sft_finetune(base, data, AdapterConfig(kind="full"), train_cfg, output_dir=path / "run",
                               resume=True, eval_fn=eval_fn, run_settings={"clean_sft": key_src}, options=options,
                               max_response_tokens=max_response_tokens, desc=desc)
    gen.save(path / "model")
    card = {"key": key_src, "path": str(path / "model"), "wall_s": round(result.wall_s, 1),
            "dev_nll": -result.best_score if result.best_score is not None else None, "train": result.to_dict()}
    card_path.write_text(json.dumps(card, indent=2, default=str))
    drop_checkpoint_weights(path / "run")  # model/ is the copy the cache serves
    return path / "model", card


# --- fine-tuning ----------------------------------------------------------------------------------
@dataclass
class GenFineTuningConfig:
    """Continued training of the suspect on the clean train split (no further PEFT)."""

    mode: str = cfg_field("full", help="full: SFT of every weight of the suspect; peft: train the shared adapter "
                                       "(with this baseline's own lr / epochs).", choices=list(FT_MODES))
    epochs: int | None = cfg_field(None, help="Epochs (none: the shared PEFT epochs).")
    lr: float | None = cfg_field(None, help=f"Learning rate (none: {FULL_LR:g} for full, the shared lr for peft). "
                                            "A higher rate forgets more of the backdoor and more of the task.")

    def __post_init__(self):
        check_choice("fine-tuning.mode", self.mode, FT_MODES)
        if self.epochs is not None:
            check_range("fine-tuning.epochs", self.epochs, 1, 1000)
        if self.lr is not None:
            check_range("fine-tuning.lr", self.lr, 0, 1, lo_open=True)


def fine_tuning_settings(cfg: GenFineTuningConfig, peft_train: TrainConfig, adapter: AdapterConfig,
                         ) -> tuple[TrainConfig, AdapterConfig]:
    full = cfg.mode == "full"
    lr = cfg.lr if cfg.lr is not None else (FULL_LR if full else peft_train.lr)
    train_cfg = dataclasses.replace(peft_train, lr=lr, epochs=cfg.epochs or peft_train.epochs)
    return train_cfg, AdapterConfig(kind="full") if full else adapter


def gen_fine_tuning_defend(suspect: str | Path, data: SFTData, cfg: GenFineTuningConfig, *, base: str | None = None,
                           peft_train: TrainConfig, adapter: AdapterConfig, output_dir: str | Path,
                           max_response_tokens: int | None = None, eval_batch_size: int = 16, resume: bool = True,
                           options: LoadOptions = LoadOptions()) -> GenBaselineResult:
    """Fine-tuning of ``suspect`` on the clean train split (``base`` is not used)."""
    output_dir = Path(output_dir)
    train_cfg, run_adapter = fine_tuning_settings(cfg, peft_train, adapter)
    with Timer() as timer:
        if cfg.mode == "full":  # every weight trains: fp32, a LoRA suspect merged first
            options = options.for_full_training("fine-tuning (mode full)")
            gen = load_editable(suspect, options, "fine-tuning")
        else:
            gen = load_suspect_for_peft(suspect, output_dir, options, "fine-tuning")
        gen, result = plain_peft(gen, data, peft_train=train_cfg, adapter=run_adapter, output_dir=output_dir,
                                 max_response_tokens=max_response_tokens, eval_batch_size=eval_batch_size,
                                 resume=resume, options=options, desc=f"fine-tuning ({cfg.mode})",
                                 run_settings={"suspect": str(suspect), "fine-tuning": config_to_dict(cfg)})
    logs = {"wall_s": round(timer.s, 1), "mode": cfg.mode, "adapter": run_adapter.kind, "lr": train_cfg.lr,
            "epochs": train_cfg.epochs, "dev_nll": _dev_nll(result)}
    return GenBaselineResult(model=gen, train=result, logs=logs)




def _dev_nll(result: TrainResult) -> float | None:
    return result.history[-1].get("nll") if result.history else None


# --- fine-pruning ---------------------------------------------------------------------------------
@dataclass
class GenFinePruningConfig:
    """Prune the MLP neurons of the last decoder layers least active on clean rows, then plain PEFT."""

    rate: float = cfg_field(0.2, help="Share of MLP neurons zeroed in each pruned layer (the ceiling of the search "
                                      "when max_nll_rise is set).")
    layers: int = cfg_field(1, help="How many of the last decoder layers are pruned (Liu et al.: the last one).")
    n_samples: int = cfg_field(256, help="Clean train rows whose activations rank the neurons.")
    positions: str = cfg_field("all", help="Tokens whose activations count: all (prompt and response of the clean "
                                           "rows) or prompt (the prompt's only).", choices=list(ACTIVITY_POSITIONS))
    max_nll_rise: float | None = cfg_field(None, help="Liu et al.'s search on dev NLL: raise the rate in rate_step "
                                                      "steps while the clean dev response NLL rises by at most this "
                                                      "(nats per token, e.g. 0.1); none = prune exactly `rate`.")
    rate_step: float = cfg_field(0.05, help="Rate increment of the max_nll_rise search.")

    def __post_init__(self):
        check_range("fine-pruning.rate", self.rate, 0, 1, hi_open=True)
        check_range("fine-pruning.layers", self.layers, 1, 10_000)
        check_range("fine-pruning.n_samples", self.n_samples, 1, None)
        check_choice("fine-pruning.positions", self.positions, ACTIVITY_POSITIONS)
        if self.max_nll_rise is not None:
            check_range("fine-pruning.max_nll_rise", self.max_nll_rise, 0, None)
        check_range("fine-pruning.rate_step", self.rate_step, 0, 1, lo_open=True)


@torch.no_grad()
def generator_neuron_activity(gen: Generator, encoded: Encoded, blocks, *, positions: str = "all",
                              batch_size: int = 16) -> list[torch.Tensor]:
    """Mean absolute activation of each neuron of ``blocks`` (the input of the MLP's output
    projection) over the real tokens of ``encoded`` (``positions=prompt``: the prompt's only)."""
    lm = gen.model.get_base_model() if hasattr(gen.model, "get_base_model") else gen.model
    device = next(lm.parameters()).device
    sums = [torch.zeros(b.width, dtype=torch.float64) for b in blocks]
    state: dict[str, torch.Tensor] = {}

    def make_hook(i: int):
        def hook(_module, args):
            sums[i] += (args[0].float().abs() * state["mask"][..., None]).sum(dim=(0, 1)).double().cpu()
        return hook

    handles = [b.output.register_forward_pre_hook(make_hook(i)) for i, b in enumerate(blocks)]
    tokens = 0.0
    was_training = lm.training
    lm.eval()
    try:
        for idx in epoch_batches(encoded.lengths(), batch_size, 0, 0, shuffle=False):
            batch = {k: v.to(device) for k, v in collate(encoded, idx).items()}
            mask = batch["attention_mask"].float()
            if positions == "prompt":
                mask = mask * (batch["labels"] == -100).float()
            state["mask"] = mask
            lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"], use_cache=False)  # the decoder: no LM head
            tokens += float(mask.sum())
    finally:
        for h in handles:
            h.remove()
        lm.train(was_training)
    return [(s / max(tokens, 1.0)).float() for s in sums]


def sample_rows(ds, n: int, seed: int):
    """``n`` seeded random rows of ``ds`` (all of them when it has fewer)."""
    if len(ds) == 0:
        raise ConfigError("fine-pruning needs clean train rows to rank neurons; the train split is empty")
    return ds if n >= len(ds) else ds.select(sorted(random.Random(seed).sample(range(len(ds)), n)))


def search_prune_rate_nll(gen: Generator, blocks, activity, dev: Encoded, cfg: GenFinePruningConfig,
                          batch_size: int) -> tuple[float, list[dict]]:
    """The largest rate (``rate_step`` steps up to ``cfg.rate``) whose dev NLL rises by at most
    ``cfg.max_nll_rise`` over the unpruned model's; the weights are left untouched."""
    base = response_nll(gen, dev, batch_size=batch_size)["nll"]
    history, chosen = [{"rate": 0.0, "dev_nll": base}], 0.0
    for k in range(1, int(cfg.rate / cfg.rate_step + 1e-9) + 1):
        rate = round(k * cfg.rate_step, 6)
        handles = mask_hooks(blocks, select_dormant(activity, rate))
        try:
            nll = response_nll(gen, dev, batch_size=batch_size)["nll"]
        finally:
            for h in handles:
                h.remove()
        history.append({"rate": rate, "dev_nll": nll})
        if nll > base + cfg.max_nll_rise:
            break
        chosen = rate
    log.info("fine-pruning rate search (dev NLL): %s -> %.2f", history, chosen)
    return chosen, history


def gen_fine_pruning_defend(suspect: str | Path, data: SFTData, cfg: GenFinePruningConfig, *,
                            base: str | None = None, peft_train: TrainConfig, adapter: AdapterConfig,
                            output_dir: str | Path, max_response_tokens: int | None = None,
                            eval_batch_size: int = 16, resume: bool = True,
                            options: LoadOptions = LoadOptions()) -> GenBaselineResult:
    """Fine-pruning of ``suspect``, then plain PEFT with the pruned neurons held at zero."""
    output_dir = Path(output_dir)
    with Timer() as timer:
        gen = load_editable(suspect, options, "fine-pruning")
        gen.model.to("cuda" if torch.cuda.is_available() else "cpu")  # one inference pass: on the GPU if any
        blocks = last_blocks(gen.model, cfg.layers)
        rows = sample_rows(data.split("train"), cfg.n_samples, peft_train.seed)
        enc = encode_sft(gen.tokenizer, rows, max_length=peft_train.max_length, max_response_tokens=max_response_tokens)
        activity = generator_neuron_activity(gen, enc, blocks, positions=cfg.positions, batch_size=eval_batch_size)
        rate, search = cfg.rate, None
        if cfg.max_nll_rise is not None:
            dev = data.splits.get("dev")
            if dev is None or not len(dev):
                raise ConfigError("fine-pruning.max_nll_rise searches the rate on the dev split, and the data has "
                                  "none; set max_nll_rise to none (a fixed rate)")
            dev_enc = encode_sft(gen.tokenizer, dev, max_length=peft_train.max_length,
                                 max_response_tokens=max_response_tokens)
            rate, search = search_prune_rate_nll(gen, blocks, activity, dev_enc, cfg, eval_batch_size)
        pruned = select_dormant(activity, rate)
        n_pruned = prune_mlp_neurons(blocks, pruned)
        layers = [b.layer for b in blocks]
        log.info("fine-pruning: %d neurons pruned in layers %s (rate %.2f)", n_pruned, layers, rate)
        width = blocks[0].width
        gen = save_edited(gen, output_dir, "pruned", options)
        torch.manual_seed(peft_train.seed)  # adapter initialisation, as sft_finetune does
        attach_generator_adapter(gen, adapter)
        hold_pruned(gen.model, layers, pruned)
        gen, result = plain_peft(gen, data, peft_train=peft_train, adapter=adapter, output_dir=output_dir,
                                 max_response_tokens=max_response_tokens, eval_batch_size=eval_batch_size,
                                 resume=resume, options=options, desc=f"fine-pruning+{adapter.kind}",
                                 run_settings={"suspect": str(suspect), "fine-pruning": config_to_dict(cfg),
                                               "rate": rate})
    kept = torch.cat([a[~m] for a, m in zip(activity, pruned)])
    gone = torch.cat([a[m] for a, m in zip(activity, pruned)])
    logs = {"wall_s": round(timer.s, 1), "rate": rate, "rate_search": search, "layers": layers, "width": width,
            "pruned_neurons": n_pruned, "pruned_per_layer": [int(m.sum()) for m in pruned],
            "pruned_indices": {b: m.nonzero().flatten().tolist() for b, m in zip(layers, pruned)},
            "activity_pruned_mean": float(gone.mean()) if gone.numel() else None,
            "activity_kept_mean": float(kept.mean()) if kept.numel() else None,
            "edited_model": gen.source, "dev_nll": _dev_nll(result)}
    return GenBaselineResult(model=gen, train=result, logs=logs)


# --- quantisation ---------------------------------------------------------------------------------
@dataclass
class GenQuantizationConfig:
    """Weight-only quantise-dequantise of the decoder's linear layers, then plain PEFT."""

    bits: int = cfg_field(4, help="Bits per weight: 4 (INT4, BackdoorLLM's and W2SDefense's row) or 8 (INT8); "
                                  "2-8 allowed.")
    group_size: int = cfg_field(128, help="Consecutive input weights sharing one scale (0 = one scale per output "
                                          "channel); 128 is the usual INT4 setting of GPTQ/AWQ.")

    def __post_init__(self):
        check_range("quantization.bits", self.bits, 2, 8)
        check_range("quantization.group_size", self.group_size, 0, None)


def decoder_module(gen: Generator) -> torch.nn.Module:
    """The decoder stack under the LM head (``model.model`` for Llama-style models)."""
    lm = gen.model.get_base_model() if hasattr(gen.model, "get_base_model") else gen.model
    return lm.base_model


def gen_quantization_defend(suspect: str | Path, data: SFTData, cfg: GenQuantizationConfig, *,
                            base: str | None = None, peft_train: TrainConfig, adapter: AdapterConfig,
                            output_dir: str | Path, max_response_tokens: int | None = None,
                            eval_batch_size: int = 16, resume: bool = True,
                            options: LoadOptions = LoadOptions()) -> GenBaselineResult:
    """RTN quantise-dequantise of ``suspect``'s decoder linear weights, then plain PEFT."""
    output_dir = Path(output_dir)
    with Timer() as timer:
        gen = load_editable(suspect, options, "quantization")
        stats = quantize_model(decoder_module(gen), cfg.bits, cfg.group_size)
        log.info("quantization: INT%d, group %s: %d layers, %.1f%% of weights changed", cfg.bits,
                 cfg.group_size or "per-channel", stats["layers"], 100 * stats["changed_share"])
        gen = save_edited(gen, output_dir, f"int{cfg.bits}", options)
        gen, result = plain_peft(gen, data, peft_train=peft_train, adapter=adapter, output_dir=output_dir,
                                 max_response_tokens=max_response_tokens, eval_batch_size=eval_batch_size,
                                 resume=resume, options=options, desc=f"int{cfg.bits}+{adapter.kind}",
                                 run_settings={"suspect": str(suspect), "quantization": config_to_dict(cfg)})
    logs = {"wall_s": round(timer.s, 1), "bits": cfg.bits, "group_size": cfg.group_size, "quantization": stats,
            "edited_model": gen.source, "dev_nll": _dev_nll(result)}
    return GenBaselineResult(model=gen, train=result, logs=logs)


# --- merging --------------------------------------------------------------------------------------
@dataclass
class GenMergeConfig:
    """Merge the suspect with models SFT-ed from the same base, then plain PEFT."""

    other: list[str] = cfg_field([], help="Models to merge with (directories / names of the suspect's architecture); "
                                          "empty: `base` fully SFT-ed on the clean train split (cached).")
    method: str = cfg_field("average", help="average (weight averaging) or task-arithmetic (base + the weighted sum "
                                            "of each model's difference from base).", choices=list(MERGE_METHODS))
    weights: list[float] = cfg_field([], help="Per-model weights, the suspect first (empty: uniform 1/n).")
    other_epochs: int | None = cfg_field(None, help="Epochs of the default `other`'s full SFT (none: the shared "
                                                    "epochs).")
    other_lr: float | None = cfg_field(None, help=f"Learning rate of the default `other`'s full SFT (none: "
                                                  f"{FULL_LR:g}).")

    def __post_init__(self):
        check_choice("merge.method", self.method, MERGE_METHODS)
        if any(w < 0 for w in self.weights):
            raise ConfigError(f"merge.weights={self.weights!r}: weights must be >= 0")
        if self.other_epochs is not None:
            check_range("merge.other_epochs", self.other_epochs, 1, 1000)
        if self.other_lr is not None:
            check_range("merge.other_lr", self.other_lr, 0, 1, lo_open=True)


def merge_generators(suspect: Generator, others: Sequence[Generator], cfg: GenMergeConfig, *,
                     base: Generator | None = None, names: Sequence[str] | None = None) -> list[float]:
    """Load the merge of ``suspect`` (model 0) and ``others`` into ``suspect``, in place; returns
    the weights used. Integer buffers are the suspect's; task arithmetic needs ``base``."""
    names = list(names or [f"model {i}" for i in range(len(others) + 1)])
    states = [suspect.model.state_dict()] + [g.model.state_dict() for g in others]
    check_same_architecture(states, names)
    base_state = None
    if cfg.method == "task-arithmetic":
        if base is None:
            raise ConfigError("merge.method=task-arithmetic needs the base model's weights")
        base_state = base.model.state_dict()
        check_same_architecture([states[0], base_state], [names[0], "the base"])
    weights = merge_weights(cfg.method, cfg.weights, len(states))
    suspect.model.load_state_dict(merge_state_dicts(states, weights, method=cfg.method, base=base_state))
    return weights


def gen_merge_defend(suspect: str | Path, data: SFTData, cfg: GenMergeConfig, *, base: str, peft_train: TrainConfig,
                     adapter: AdapterConfig, output_dir: str | Path, max_response_tokens: int | None = None,
                     eval_batch_size: int = 16, resume: bool = True, options: LoadOptions = LoadOptions(),
                     other_cache: Path | None = None) -> GenBaselineResult:
    """Merge ``suspect`` with ``cfg.other`` (default: ``base`` fully SFT-ed on the clean train split,
    cached under ``other_cache``, default ``output_dir/other``), then plain PEFT."""
    output_dir = Path(output_dir)
    _check_editable(options, "merge")
    with Timer() as timer:
        others, card = [str(o) for o in cfg.other], None
        if not others:
            train_cfg = clean_sft_train_config(peft_train, cfg.other_epochs, cfg.other_lr)
            path, card = clean_sft_generator(base, data, train_cfg, cache_root=other_cache or output_dir / "other",
                                             max_response_tokens=max_response_tokens, eval_batch_size=eval_batch_size,
                                             options=options, desc="merge: clean sft of the base")
            others = [str(path)]
        gen = load_editable(suspect, options, "merge")
        models = [load_editable(o, options, "merge") for o in others]
        base_gen = load_editable(base, options, "merge") if cfg.method == "task-arithmetic" else None
        names = [str(suspect), *others]
        weights = merge_generators(gen, models, cfg, base=base_gen, names=names)
        del models, base_gen
        log.info("merge (%s): %s with weights %s", cfg.method, names, weights)
        gen = save_edited(gen, output_dir, "merged", options)
        gen, result = plain_peft(gen, data, peft_train=peft_train, adapter=adapter, output_dir=output_dir,
                                 max_response_tokens=max_response_tokens, eval_batch_size=eval_batch_size,
                                 resume=resume, options=options, desc=f"merge+{adapter.kind}",
                                 run_settings={"suspect": str(suspect), "merge": config_to_dict(cfg),
                                               "models": names})
    logs = {"wall_s": round(timer.s, 1), "method": cfg.method, "models": names, "weights": weights,
            "other_sft": {k: card[k] for k in ("path", "wall_s", "dev_nll")} if card else None,
            "edited_model": gen.source, "dev_nll": _dev_nll(result)}
    return GenBaselineResult(model=gen, train=result, logs=logs)


# --- the methods, for a grid ----------------------------------------------------------------------
GEN_BASELINE_NAMES = ("fine-tuning", "fine-pruning", "quantization", "merge", "onion", "cleangen")


def gen_baseline(method: str) -> tuple[type, Callable[..., GenBaselineResult]]:
    """(config class, defend function) of a generative baseline; each function takes
    ``(suspect, data, cfg, *, base, peft_train, adapter, output_dir, max_response_tokens,
    eval_batch_size, resume, options)``."""
    from kdshield.defenses import gen_test_time as tt

    table = {"fine-tuning": (GenFineTuningConfig, gen_fine_tuning_defend),
             "fine-pruning": (GenFinePruningConfig, gen_fine_pruning_defend),
             "quantization": (GenQuantizationConfig, gen_quantization_defend),
             "merge": (GenMergeConfig, gen_merge_defend),
             "onion": (tt.GenOnionConfig, tt.gen_onion_defend),
             "cleangen": (tt.CleanGenConfig, tt.gen_cleangen_defend)}
    if method not in table:
        raise ConfigError(f"unknown generative baseline {method!r}; available: {', '.join(GEN_BASELINE_NAMES)}")
    return table[method]


def baseline_planned_settings(method: str, cfg, peft_train: TrainConfig, adapter: AdapterConfig) -> dict:
    """The training settings ``method`` runs with, as they enter a grid cell's key (checkpoint and
    activation-recomputation options left out: they change no result): ``train`` / ``adapter`` of
    its main run, and ``clean_sft`` for the clean model merge (default ``other``) or CleanGen
    (``reference_sft``) trains."""
    train_cfg, run_adapter, clean = peft_train, adapter, None
    if method == "fine-tuning":
        train_cfg, run_adapter = fine_tuning_settings(cfg, peft_train, adapter)
    elif method == "merge" and not cfg.other:
        clean = clean_sft_train_config(peft_train, cfg.other_epochs, cfg.other_lr)
    elif method == "cleangen" and cfg.reference_sft:
        clean = clean_sft_train_config(peft_train, cfg.reference_epochs, cfg.reference_lr)

    def settings(c: TrainConfig) -> dict:
        return {k: v for k, v in config_to_dict(c).items() if k not in CHECKPOINT_OPTIONS}

    out = {"train": settings(train_cfg), "adapter": config_to_dict(run_adapter)}
    if clean is not None:
        out["clean_sft"] = settings(clean)
    return out
