"""The one training loop: attack, finetune and every defense train through ``train``.

    result = train(model, train_data, TrainConfig(epochs=2, lr=2e-4), loss_fn=ce_loss,
                   eval_fn=lambda m: {"score": accuracy_on_dev(m)}, output_dir="runs/x", resume=True)

Built on ``accelerate``: unchanged on one CPU and under ``accelerate launch`` on several GPUs.
Seeded batch order, gradient accumulation, bf16 autocast where the hardware has it, periodic
checkpoints (trainable weights as safetensors, optimizer state loaded with ``weights_only``), and
``resume`` that continues a killed run where it stopped with the same result as an uninterrupted
one. Dev-set model selection keeps the trainable weights of the best evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kdshield import threads
from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.data.batching import BatchDataset, Encoded, encode_dataset, epoch_batches
from kdshield.errors import RunStateError
from kdshield.inference import resolve_precision
from kdshield.profiling import phase
from kdshield.results import settings_diff, settings_hash
from kdshield.training.losses import cross_entropy
from kdshield.training.memory import CHECKPOINTING, enable_activation_checkpointing
from kdshield.training.optim import adamw, implementation
from kdshield.training.sharding import (
    OPTIMIZER_FORMAT,
    fit_wrap_policy,
    full_state,
    gather_into,
    load_optimizer_state,
    optimizer_state,
    release,
    shadow_of,
    shard_like,
    uses_fsdp,
)

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "constant", "cosine")

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]
EvalFn = Callable[[torch.nn.Module], dict]


@dataclass
class TrainConfig:
    """Optimisation settings shared by every method that trains."""

    epochs: int = cfg_field(2, help="Passes over the training data.")
    lr: float = cfg_field(2e-4, help="Peak learning rate (AdamW). finetune / defend without one: the "
                                      "adapter's default (LoRA 2e-4, prompt tuning and p-tuning 2e-3).")
    batch_size: int = cfg_field(16, help="Examples per forward pass (per process).")
    grad_accum: int = cfg_field(1, help="Batches per optimizer step.")
    weight_decay: float = cfg_field(0.0, help="AdamW weight decay.")
    warmup_ratio: float = cfg_field(0.06, help="Share of optimizer steps with linear warm-up.")
    schedule: str = cfg_field("linear", help="Learning-rate schedule after warm-up.",
                              choices=list(SCHEDULES))
    max_grad_norm: float = cfg_field(1.0, help="Gradient clipping norm (0 = off).")
    max_length: int = cfg_field(64, help="Tokens per example (longer inputs are truncated).")
    seed: int = cfg_field(0, help="Seed of batch order, initialisation and dropout.")
    precision: str = cfg_field("auto", help="auto = bf16 autocast where the CPU/GPU supports it, else fp32.",
                               choices=["auto", "bf16", "fp32"])
    checkpoint_every: int = cfg_field(50, help="Optimizer steps between checkpoints (0 = epoch ends only).")
    checkpoint_min_s: float = cfg_field(120.0, help="Skip a step checkpoint while the last one is younger than this "
                                                    "many seconds (epoch ends always checkpoint): a killed run "
                                                    "loses at most this much work, and a fast run does not spend "
                                                    "its time writing optimizer states. 0 = every checkpoint_every "
                                                    "steps.")
    eval_every: int = cfg_field(0, help="Optimizer steps between dev evaluations (0 = epoch ends only).")
    select_best: bool = cfg_field(True, help="Keep the weights of the best dev evaluation, not the last.")
    ema: float = cfg_field(0.0, help="Exponential moving average of the trainable weights, decay per optimizer "
                                     "step (0 = off; 0.99 averages ~the last 100 steps). When on, evaluations "
                                     "and the returned weights are the averaged ones.")
    bucket_batches: int = cfg_field(32, help="Batches per length-sorting chunk (1 = no bucketing).")
    activation_checkpointing: str = cfg_field(
        "auto", help="Keep only each layer's input and recompute the layer in backward: less memory, about one "
                     "more forward per step, the same loss. auto = on for models of 1B parameters or more.",
        choices=list(CHECKPOINTING))

    def __post_init__(self):
        check_range("train.epochs", self.epochs, 1, 1000)
        check_range("train.lr", self.lr, 0, 1, lo_open=True)
        check_range("train.batch_size", self.batch_size, 1, 65536)
        check_range("train.grad_accum", self.grad_accum, 1, 4096)
        check_range("train.weight_decay", self.weight_decay, 0, 1)
        check_range("train.warmup_ratio", self.warmup_ratio, 0, 1, hi_open=True)
        check_choice("train.schedule", self.schedule, SCHEDULES)
        check_range("train.max_grad_norm", self.max_grad_norm, 0, None)
        check_range("train.max_length", self.max_length, 2, 100_000)
        check_choice("train.precision", self.precision, ["auto", "bf16", "fp32"])
        check_range("train.checkpoint_every", self.checkpoint_every, 0, None)
        check_range("train.checkpoint_min_s", self.checkpoint_min_s, 0, None)
        check_range("train.eval_every", self.eval_every, 0, None)
        check_range("train.bucket_batches", self.bucket_batches, 1, 100_000)
        check_range("train.ema", self.ema, 0, 1, hi_open=True)
        check_choice("train.activation_checkpointing", self.activation_checkpointing, CHECKPOINTING)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_score: float | None = None
    best_step: int | None = None
    steps: int = 0
    wall_s: float = 0.0
    train_s: float = 0.0
    examples_seen: int = 0
    trainable_params: int = 0
    precision: str = "fp32"
    optimizer: str = "adamw"  # training.optim.implementation: the fused kernel or torch's default
    stopped_early: bool = False
    resumed_from_step: int | None = None
    prior_wall_s: float = 0.0  # wall time of earlier processes of this run (kept in its checkpoint)
    config: dict = field(default_factory=dict)  # the TrainConfig that ran
    settings_hash: str | None = None

    def to_dict(self) -> dict:
        return config_to_dict(self)


def _accelerator(mixed_precision: str):
    """An Accelerator with this precision. accelerate keeps one global state per process; runs of
    different precision in one process (a fp32 teacher, then a bf16 student) reset its precision
    part, never the process group."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def _first(items: list):
    return items[0]


def ce_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = cross_entropy(out.logits, batch["labels"])
    return loss, {"ce": loss.detach()}


def _lr_lambda(schedule: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return fn


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights by name, full tensors on the CPU (under FSDP gathered from the shards:
    every process calls it)."""
    return full_state((n, p) for n, p in model.named_parameters() if p.requires_grad)


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise RunStateError(f"checkpoint does not match the model: unknown parameters {missing[:3]}")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(shard_like(v, params[n]))  # (under FSDP: this process's shard of v)


def load_trained_weights(model: torch.nn.Module, train_dir: str | Path, which: str = "best") -> str:
    """Load the trainable weights a finished ``train(..., output_dir=train_dir)`` left in its checkpoint
    (``best``: the weights ``train`` returns: the selected ones, else the weight average with
    ``ema``, else the last; ``last``: the raw weights of the last step). ``model`` must carry the
    same adapter. Returns the file loaded (safetensors only)."""
    ckpt = Path(train_dir) / "checkpoint"
    names = {"best": ["best.safetensors", "ema.safetensors", "trainable.safetensors"],
             "last": ["trainable.safetensors"]}
    if which not in names:
        raise ValueError(f"which={which!r}: use best or last")
    for name in names[which]:
        if (ckpt / name).is_file():
            load_trainable(model, load_file(str(ckpt / name)))
            return str(ckpt / name)
    raise FileNotFoundError(f"{ckpt} holds no trained weights (expected {names[which][0]}); "
                            "is train_dir the 'train' folder of a finished run?")


@torch.no_grad()
def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float, step: int) -> None:
    """One step of the weight average; the warm-up ``(1 + step) / (10 + step)`` keeps the first
    steps from being dominated by the initial weights."""
    d = min(decay, (1 + step) / (10 + step))
    for n, p in model.named_parameters():
        if n in ema:
            ema[n].mul_(d).add_(p.detach().float(), alpha=1 - d)


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a fresh temporary folder that then replaces ``target`` whole: a crash
    leaves either the old folder or the new one, never a mix."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def read_json_state(path: Path) -> dict:
    """A checkpoint's ``state.json``; a damaged one is a clear error, not a traceback."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunStateError(f"the checkpoint {path.parent} is damaged ({path.name}: {err}); delete that "
                            "folder to start this run afresh (or rerun with --fresh)") from err


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for cut or garbled files
        raise RunStateError(f"the checkpoint file {path} is damaged ({err}); delete {path.parent} to start "
                            "this run afresh (or rerun with --fresh)") from err


def check_saved_settings(where: Path, saved: dict | None, settings: dict) -> None:
    """Saved work in ``where`` continues only under the settings it was made with."""
    if saved is None:
        raise RunStateError(f"{where} was written by an older kdshield that did not record its settings, "
                            "so it cannot be resumed safely; delete it (or rerun with --fresh)")
    if settings_hash(saved) != settings_hash(settings):
        raise RunStateError(f"{where} belongs to a run with other settings ({settings_diff(saved, settings)}); "
                            "resume with the settings it was made with, use another output directory, or "
                            "rerun with --fresh to replace it")


OPTIMIZER_FILES = ("optimizer.pt", "rng.safetensors")
# when checkpoints are written, and whether activations are recomputed, do not change what a run
# computes: left out of its settings
CHECKPOINT_OPTIONS = ("checkpoint_every", "checkpoint_min_s", "activation_checkpointing")


def keyed_train_settings(cfg: TrainConfig) -> dict:
    """The training settings as they key cached work (poisoned models, grid cells): every field but
    the checkpoint options, which change memory and restarts, not results, and ``precision`` as this
    machine resolves it (``auto`` is bf16 autocast where the CPU or GPU has it, else fp32): a result
    computed under bf16 is not reused, nor its record taken as done, where ``auto`` means fp32."""
    out = {k: v for k, v in config_to_dict(cfg).items() if k not in CHECKPOINT_OPTIONS}
    out["precision"] = resolve_precision(cfg.precision)
    return out


class Checkpointer:
    """Atomic checkpoints in ``dir/checkpoint``: a new one is complete before the old one goes.

    ``state.json`` holds the run's resolved settings; a resume under other settings stops with the
    settings that differ instead of continuing someone else's run.

    Several processes: every one calls ``save`` (under FSDP gathering the weights and optimizer
    state is a collective), only the one with ``write`` writes. ``sharded``: the model is FSDP's,
    its optimizer state is saved full and keyed by parameter name (``optimizer_format: fqn``)."""

    def __init__(self, output_dir: Path | None, *, write: bool = True, sharded: bool = False):
        self.dir = Path(output_dir) / "checkpoint" if output_dir else None
        self.write, self.sharded = write, sharded

    def exists(self) -> bool:
        return self.dir is not None and (self.dir / "state.json").is_file()

    def save(self, model, optimizer, scheduler, state: dict, best: dict | None,
             ema: dict | None = None) -> None:
        if self.dir is None:
            return
        with phase("checkpoint"):
            self._save(model, optimizer, scheduler, state, best, ema)

    def _save(self, model, optimizer, scheduler, state: dict, best: dict | None, ema: dict | None) -> None:
        if not self.write and not self.sharded:
            return  # (nothing to gather: another process writes)
        weights = trainable_state(model)
        averaged = full_state(ema.items()) if ema is not None else None
        optim = optimizer_state(model, optimizer) if self.sharded else optimizer.state_dict()
        saved = dict(state, scheduler=scheduler.state_dict())
        if self.sharded:
            saved["optimizer_format"] = OPTIMIZER_FORMAT
        if not self.write:
            return

        def write(tmp: Path) -> None:
            save_file(weights, str(tmp / "trainable.safetensors"))
            if best is not None:
                save_file(best, str(tmp / "best.safetensors"))
            if averaged is not None:
                save_file(averaged, str(tmp / "ema.safetensors"))
            torch.save(optim, tmp / "optimizer.pt")
            save_file({"cpu_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
            (tmp / "state.json").write_text(json.dumps(saved, indent=1, default=float))

        write_dir_atomically(self.dir, write)

    def check_settings(self, settings: dict) -> dict:
        """The saved state, after checking it was made under ``settings``."""
        state = read_json_state(self.dir / "state.json")
        check_saved_settings(self.dir, state.get("settings"), settings)
        return state

    def load(self, model, optimizer, scheduler, state: dict) -> tuple[dict | None, dict | None]:
        load_trainable(model, read_weights(self.dir / "trainable.safetensors"))
        if (self.dir / "optimizer.pt").is_file():
            by_name = state.get("optimizer_format") == OPTIMIZER_FORMAT
            if self.sharded and not by_name:
                raise RunStateError(f"{self.dir} was written by a run without FSDP; resume it the way it was "
                                    "launched, or rerun with --fresh")
            try:
                saved = torch.load(self.dir / "optimizer.pt", weights_only=True)
                if by_name:  # written under FSDP: full and keyed by parameter name
                    load_optimizer_state(model, optimizer, saved)
                else:
                    optimizer.load_state_dict(saved)
            except Exception as err:
                raise RunStateError(f"the checkpoint file {self.dir / 'optimizer.pt'} is damaged ({err}); delete "
                                    f"{self.dir} to start afresh (or rerun with --fresh)") from err
            torch.set_rng_state(read_weights(self.dir / "rng.safetensors")["cpu_rng"])
        elif not state.get("finished"):
            raise RunStateError(f"{self.dir} has no optimizer state but its run did not finish; delete it to "
                                "start afresh (or rerun with --fresh)")
        scheduler.load_state_dict(state.pop("scheduler"))
        best_path, ema_path = self.dir / "best.safetensors", self.dir / "ema.safetensors"
        best = read_weights(best_path) if best_path.is_file() else None
        ema = read_weights(ema_path) if ema_path.is_file() else None
        return best, ema

    def finalize(self, state: dict, scheduler, *, keep_optimizer: bool, keep_weights: bool = True) -> None:
        """A finished run keeps what resuming and reloading it need (its settings, history and
        trained weights); the optimizer moments (2x the trainable weights) go unless asked for.
        ``keep_weights=False`` drops the weights too, for callers that saved the model elsewhere."""
        if self.dir is None or not self.write or not self.dir.is_dir():
            return
        final = dict(state, scheduler=scheduler.state_dict(), finished=True)
        if self.sharded:
            final["optimizer_format"] = OPTIMIZER_FORMAT
        (self.dir / "state.json").write_text(json.dumps(final, indent=1, default=float))
        drop = [] if keep_optimizer else list(OPTIMIZER_FILES)
        if not keep_weights:
            drop += ["trainable.safetensors", "best.safetensors", "ema.safetensors"]
        for name in drop:
            (self.dir / name).unlink(missing_ok=True)


def drop_checkpoint_weights(output_dir: str | Path) -> None:
    """Remove the weight copies from a finished run's checkpoint once the caller saved the model
    elsewhere (a full fine-tune's checkpoint is a second copy of the whole model); its state.json
    (settings, history) stays."""
    ckpt = Path(output_dir) / "checkpoint"
    for name in ("trainable.safetensors", "best.safetensors", "ema.safetensors", *OPTIMIZER_FILES):
        (ckpt / name).unlink(missing_ok=True)


def _data_digest(encoded: Encoded) -> str:
    h = hashlib.sha256()
    for ids, y in zip(encoded.input_ids, encoded.labels):
        h.update(json.dumps([y, ids]).encode())
    for token_labels in encoded.token_labels or ():  # generative data: other responses, other data
        h.update(json.dumps(token_labels).encode())
    for name, values in sorted((encoded.extras or {}).items()):
        h.update(name.encode())
        h.update(values.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_settings_of(config: TrainConfig, encoded: Encoded, model: torch.nn.Module, extra: dict | None) -> dict:
    """What a training run is: its optimisation settings (checkpoint spacing left out: it does not
    change the result), the exact tokenised data, the trainable parameters' names and shapes (so an
    adapter of another rank never loads into this run), and the caller's own settings."""
    train = {k: v for k, v in config_to_dict(config).items() if k not in CHECKPOINT_OPTIONS}
    params = [[n, list(p.shape)] for n, p in model.named_parameters() if p.requires_grad]
    return {"train": train, "data": _data_digest(encoded), "trainable": settings_hash(params), **(extra or {})}


def train(model: torch.nn.Module, train_data: Dataset | None, config: TrainConfig, *, tokenizer=None,
          loss_fn: LossFn = ce_loss, eval_fn: EvalFn | None = None,
          stop_fn: Callable[[dict], bool] | None = None, output_dir: str | Path | None = None,
          resume: bool = False, extra_columns: Sequence[str] = (), desc: str = "train",
          parameters: Sequence[torch.nn.Parameter] | None = None, run_settings: dict | None = None,
          keep_optimizer: bool = False, keep_weights: bool = True, eval_epochs: str = "all",
          encoded: Encoded | None = None) -> TrainResult:
    """Train the parameters of ``model`` that require grad; return history and cost.

    ``eval_fn(model) -> {"score": float, ...}`` runs at epoch ends (``eval_epochs="last"``: the last
    one only, for runs whose evaluations decide nothing) and every ``eval_every`` steps;
    with ``select_best`` the best-scoring trainable weights are restored at the end. ``stop_fn``
    sees each evaluation and may end training early (e.g. the attack once ASR reaches its target).

    With ``output_dir`` the run checkpoints there and ``resume`` continues it, but only when it was
    made under the same settings (``run_settings_of``: these options, the data, the trainable
    parameters, plus the caller's ``run_settings`` such as the model it started from); otherwise a
    ``RunStateError`` names what differs. A finished run drops its optimizer state unless
    ``keep_optimizer``, and its weights too with ``keep_weights=False`` (the caller saved them).
    ``wall_s`` counts the earlier processes of a resumed run too (``prior_wall_s``).

    ``encoded``: data the caller tokenised already (e.g. SFT rows with token labels,
    ``kdshield.training.sft.encode_sft``); ``train_data`` is then unused and may be None.
    """
    from accelerate.utils import set_seed

    if eval_epochs not in ("all", "last"):
        raise ValueError(f"eval_epochs={eval_epochs!r}: use all or last")

    start = time.perf_counter()
    precision = resolve_precision(config.precision)
    accelerator = _accelerator("bf16" if precision == "bf16" else "no")
    set_seed(config.seed)
    if encoded is None:
        tokenizer = tokenizer or getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("train() needs a tokenizer (model.tokenizer or tokenizer=...)")
        if train_data is None:
            raise ValueError("train() needs train_data or encoded=...")
        with phase("encode"):
            encoded = encode_dataset(tokenizer, train_data, config.max_length, extra_columns)
    lengths = encoded.lengths()
    n_batches = math.ceil(len(encoded) / config.batch_size)
    per_process = math.ceil(n_batches / accelerator.num_processes)
    steps_per_epoch = math.ceil(per_process / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs

    enable_activation_checkpointing(model, config.activation_checkpointing)
    params = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: attach an adapter or unfreeze something")
    optimizer = adamw(params, lr=config.lr, weight_decay=config.weight_decay)
    optimizer_impl = implementation(optimizer)
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.schedule, warmup, total_steps))
    caller = model  # the module the caller holds: it keeps (or, under FSDP, gets back) the full weights
    if hasattr(caller, "max_length"):  # saved in kdshield.json; evaluate defaults to it
        caller.max_length = config.max_length
    sharded = uses_fsdp(accelerator)
    if sharded:  # training.sharding: a shadow of the caller's module is sharded, the caller's releases its weights
        names = {id(p): n for n, p in model.named_parameters()}
        param_names = [names[id(p)] for p in params]
        fit_wrap_policy(accelerator, model)
        model, optimizer = accelerator.prepare(shadow_of(caller), optimizer)
        by_name = dict(model.named_parameters())
        params = [by_name[n] for n in param_names]
        release(caller, model)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = model if sharded else accelerator.unwrap_model(model)

    def gathered() -> torch.nn.Module:
        """The caller's module with the full weights (under FSDP gathered from the shards: a collective)."""
        if sharded:
            gather_into(caller, unwrapped)
        return caller if sharded else unwrapped

    settings = run_settings_of(config, encoded, unwrapped, run_settings)
    ckpt = Checkpointer(output_dir, write=accelerator.is_main_process, sharded=sharded)
    # the moving average lives beside the weights, in fp32 (names of the unwrapped model)
    ema = ({n: p.detach().float().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
           if config.ema else None)
    result = TrainResult(trainable_params=sum(p.numel() for p in params), precision=precision,
                         optimizer=optimizer_impl, settings_hash=settings_hash(settings), config=config_to_dict(config))
    best: dict | None = None
    epoch, batches_done, step = 0, 0, 0
    stop = False
    resume_dir = Checkpointer(output_dir, sharded=sharded)
    if resume and resume_dir.exists():
        state = resume_dir.check_settings(settings)
        best, saved_ema = resume_dir.load(unwrapped, optimizer, scheduler, state)
        if ema is not None:
            ema = {n: shard_like(v, ema[n]) for n, v in saved_ema.items()} if saved_ema is not None else ema
        epoch, batches_done, step = state["epoch"], state["batches_done"], state["step"]
        result.history, result.best_score, result.best_step = state["history"], state["best_score"], state["best_step"]
        result.examples_seen, result.train_s = state["examples_seen"], state.get("train_s", 0.0)
        result.prior_wall_s = state.get("wall_s", 0.0)
        result.resumed_from_step = step
        stop = bool(state.get("stopped"))  # a run that stopped early is finished, not unfinished
        log.info("%s: %s at epoch %d, step %d", desc, "finished run reused" if state.get("finished") else "resumed",
                 epoch, step)
    elif resume:
        log.info("%s: no checkpoint in %s, starting fresh", desc, output_dir)

    def snapshot_state() -> dict:
        return {"epoch": epoch, "batches_done": batches_done, "step": step, "history": result.history,
                "best_score": result.best_score, "best_step": result.best_step,
                "examples_seen": result.examples_seen, "train_s": result.train_s, "stopped": stop,
                "wall_s": result.prior_wall_s + time.perf_counter() - start, "settings": settings,
                "config": config_to_dict(config)}

    def evaluate(tag: str) -> bool:
        nonlocal best
        if eval_fn is None:
            return False
        current = trainable_state(unwrapped) if ema is not None else None
        if ema is not None:
            load_trainable(unwrapped, ema)  # evaluate what training would return
        model.eval()
        target = gathered()
        target.eval()
        with phase("dev eval"), torch.no_grad(), accelerator.autocast():
            metrics = dict(eval_fn(target))
        model.train()
        if sharded:
            release(caller, unwrapped)  # back to the shards alone
        metrics.update(step=step, epoch=epoch, at=tag)
        result.history.append(metrics)
        score = metrics.get("score")
        if score is not None and (result.best_score is None or score > result.best_score):
            result.best_score, result.best_step = float(score), step
            if config.select_best:
                best = trainable_state(unwrapped)
        if current is not None:
            load_trainable(unwrapped, current)
        log.info("%s eval %s: %s", desc, tag, {k: round(v, 4) if isinstance(v, float) else v
                                               for k, v in metrics.items()})
        return bool(stop_fn and stop_fn(metrics))

    saved_step = step if resume_dir.exists() and resume else None
    last_saved = time.perf_counter()

    def save_now() -> None:  # the weights as they are now, for a resume (kdshield.threads.Restart)
        nonlocal t0
        if saved_step != step:
            result.train_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            ckpt.save(unwrapped, optimizer, scheduler, snapshot_state(), best, ema)
        bar.close()
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not accelerator.is_main_process,
               mininterval=2 if os.environ.get("CI") is None else 30, dynamic_ncols=True)
    while epoch < config.epochs and not stop:
        batches = epoch_batches(lengths, config.batch_size, config.seed, epoch,
                                bucket_batches=config.bucket_batches)
        loader = torch.utils.data.DataLoader(BatchDataset(encoded, batches[batches_done:]), batch_size=1,
                                             shuffle=False, collate_fn=_first, generator=torch.Generator())
        # (an own generator: creating a loader iterator must not consume the global RNG that
        # dropout uses, or a resumed run would diverge from an uninterrupted one)
        loader = accelerator.prepare_data_loader(loader) if accelerator.num_processes > 1 else loader
        t0 = time.perf_counter()
        pending = 0
        for batch in loader:
            if pending == 0:  # between optimizer steps: a grid worker offered more cores restarts here
                threads.check(save_now)
            with phase("train step"):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    loss, logs = loss_fn(model, batch)
                accelerator.backward(loss / config.grad_accum)
                pending += 1
                batches_done += accelerator.num_processes
                result.examples_seen += len(batch["labels"]) * accelerator.num_processes
                last = batches_done >= len(batches)
                if pending < config.grad_accum and not last:
                    continue
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            pending = 0
            step += 1
            if ema is not None:
                _ema_update(ema, unwrapped, config.ema, step)
            bar.update(1)
            bar.set_postfix({k: f"{float(v):.4f}" for k, v in logs.items()}, refresh=False)
            if config.eval_every and step % config.eval_every == 0 and not last:
                stop = evaluate(f"step {step}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and not last \
                    and time.perf_counter() - last_saved >= config.checkpoint_min_s:
                result.train_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                ckpt.save(unwrapped, optimizer, scheduler, snapshot_state(), best, ema)
                saved_step, last_saved = step, time.perf_counter()
            if stop:
                break
        result.train_s += time.perf_counter() - t0
        if not stop:
            epoch, batches_done = epoch + 1, 0
            if eval_epochs == "all" or epoch == config.epochs:
                stop = evaluate(f"epoch {epoch}")
            ckpt.save(unwrapped, optimizer, scheduler, snapshot_state(), best, ema)
            saved_step = step
    bar.close()
    if saved_step != step:  # stopped inside an epoch: the last checkpoint is older than the weights
        ckpt.save(unwrapped, optimizer, scheduler, snapshot_state(), best, ema)
    result.stopped_early = stop and epoch < config.epochs
    if config.select_best and best is not None:
        load_trainable(unwrapped, best)
    elif ema is not None:
        load_trainable(unwrapped, ema)
    if sharded:  # the caller's module gets the full trained weights; the shards go with this function
        gathered().train()
    result.steps = step
    result.wall_s = result.prior_wall_s + time.perf_counter() - start
    ckpt.finalize(snapshot_state(), scheduler, keep_optimizer=keep_optimizer, keep_weights=keep_weights)
    accelerator.wait_for_everyone()
    return result
