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

from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.data.batching import BatchDataset, encode_dataset, epoch_batches
from kdshield.inference import resolve_precision
from kdshield.training.losses import cross_entropy

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "constant", "cosine")

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]
EvalFn = Callable[[torch.nn.Module], dict]


@dataclass
class TrainConfig:
    """Optimisation settings shared by every method that trains."""

    epochs: int = cfg_field(2, help="Passes over the training data.")
    lr: float = cfg_field(2e-4, help="Peak learning rate (AdamW).")
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
    eval_every: int = cfg_field(0, help="Optimizer steps between dev evaluations (0 = epoch ends only).")
    select_best: bool = cfg_field(True, help="Keep the weights of the best dev evaluation, not the last.")
    ema: float = cfg_field(0.0, help="Exponential moving average of the trainable weights, decay per optimizer "
                                     "step (0 = off; 0.99 averages ~the last 100 steps). When on, evaluations "
                                     "and the returned weights are the averaged ones.")
    bucket_batches: int = cfg_field(32, help="Batches per length-sorting chunk (1 = no bucketing).")

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
        check_range("train.eval_every", self.eval_every, 0, None)
        check_range("train.bucket_batches", self.bucket_batches, 1, 100_000)
        check_range("train.ema", self.ema, 0, 1, hi_open=True)


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
    stopped_early: bool = False
    resumed_from_step: int | None = None

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


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint does not match the model: unknown parameters {missing[:3]}")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v.to(params[n].device, params[n].dtype))


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
            _load_trainable(model, load_file(str(ckpt / name)))
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


class Checkpointer:
    """Atomic checkpoints in ``dir/checkpoint``: a new one is complete before the old one goes."""

    def __init__(self, output_dir: Path | None):
        self.dir = Path(output_dir) / "checkpoint" if output_dir else None

    def exists(self) -> bool:
        return self.dir is not None and (self.dir / "state.json").is_file()

    def save(self, model, optimizer, scheduler, state: dict, best: dict | None,
             ema: dict | None = None) -> None:
        if self.dir is None:
            return
        tmp = self.dir.with_name("checkpoint.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
        if best is not None:
            save_file(best, str(tmp / "best.safetensors"))
        if ema is not None:
            save_file({n: v.detach().cpu().contiguous() for n, v in ema.items()}, str(tmp / "ema.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file({"cpu_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        state = dict(state, scheduler=scheduler.state_dict())
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float))
        old = self.dir.with_name("checkpoint.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(old)
        tmp.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def load(self, model, optimizer, scheduler) -> tuple[dict, dict | None, dict | None]:
        state = json.loads((self.dir / "state.json").read_text())
        _load_trainable(model, load_file(str(self.dir / "trainable.safetensors")))
        optimizer.load_state_dict(torch.load(self.dir / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(state.pop("scheduler"))
        torch.set_rng_state(load_file(str(self.dir / "rng.safetensors"))["cpu_rng"])
        best_path = self.dir / "best.safetensors"
        best = load_file(str(best_path)) if best_path.is_file() else None
        ema_path = self.dir / "ema.safetensors"
        ema = load_file(str(ema_path)) if ema_path.is_file() else None
        return state, best, ema


def train(model: torch.nn.Module, train_data: Dataset, config: TrainConfig, *, tokenizer=None,
          loss_fn: LossFn = ce_loss, eval_fn: EvalFn | None = None,
          stop_fn: Callable[[dict], bool] | None = None, output_dir: str | Path | None = None,
          resume: bool = False, extra_columns: Sequence[str] = (), desc: str = "train",
          parameters: Sequence[torch.nn.Parameter] | None = None) -> TrainResult:
    """Train the parameters of ``model`` that require grad; return history and cost.

    ``eval_fn(model) -> {"score": float, ...}`` runs at epoch ends (and every ``eval_every`` steps);
    with ``select_best`` the best-scoring trainable weights are restored at the end. ``stop_fn``
    sees each evaluation and may end training early (e.g. the attack once ASR reaches its target).
    """
    from accelerate.utils import set_seed

    start = time.perf_counter()
    precision = resolve_precision(config.precision)
    accelerator = _accelerator("bf16" if precision == "bf16" else "no")
    set_seed(config.seed)
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("train() needs a tokenizer (model.tokenizer or tokenizer=...)")
    encoded = encode_dataset(tokenizer, train_data, config.max_length, extra_columns)
    lengths = encoded.lengths()
    n_batches = math.ceil(len(encoded) / config.batch_size)
    per_process = math.ceil(n_batches / accelerator.num_processes)
    steps_per_epoch = math.ceil(per_process / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs

    params = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: attach an adapter or unfreeze something")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.schedule, warmup, total_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    ckpt = Checkpointer(output_dir if accelerator.is_main_process else None)
    # the moving average lives beside the weights, in fp32 (names of the unwrapped model)
    ema = ({n: p.detach().float().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
           if config.ema else None)
    result = TrainResult(trainable_params=sum(p.numel() for p in params), precision=precision)
    best: dict | None = None
    epoch, batches_done, step = 0, 0, 0
    resume_dir = Checkpointer(output_dir)
    if resume and resume_dir.exists():
        state, best, saved_ema = resume_dir.load(unwrapped, optimizer, scheduler)
        if ema is not None:
            if saved_ema is None:
                raise RuntimeError(f"{output_dir}: the checkpoint has no weight average but train.ema is "
                                   f"{config.ema}; resume with the settings it was made with or start afresh")
            ema = {n: v.to(ema[n].device) for n, v in saved_ema.items()}
        epoch, batches_done, step = state["epoch"], state["batches_done"], state["step"]
        result.history, result.best_score, result.best_step = state["history"], state["best_score"], state["best_step"]
        result.examples_seen, result.train_s = state["examples_seen"], state.get("train_s", 0.0)
        result.resumed_from_step = step
        log.info("%s: resumed at epoch %d, step %d", desc, epoch, step)
    elif resume:
        log.info("%s: no checkpoint in %s, starting fresh", desc, output_dir)

    def snapshot_state() -> dict:
        return {"epoch": epoch, "batches_done": batches_done, "step": step, "history": result.history,
                "best_score": result.best_score, "best_step": result.best_step,
                "examples_seen": result.examples_seen, "train_s": result.train_s,
                "config": config_to_dict(config)}

    def evaluate(tag: str) -> bool:
        nonlocal best
        if eval_fn is None:
            return False
        current = _trainable_state(unwrapped) if ema is not None else None
        if ema is not None:
            _load_trainable(unwrapped, ema)  # evaluate what training would return
        model.eval()
        with torch.no_grad(), accelerator.autocast():
            metrics = dict(eval_fn(unwrapped))
        model.train()
        metrics.update(step=step, epoch=epoch, at=tag)
        result.history.append(metrics)
        score = metrics.get("score")
        if score is not None and (result.best_score is None or score > result.best_score):
            result.best_score, result.best_step = float(score), step
            if config.select_best:
                best = _trainable_state(unwrapped)
        if current is not None:
            _load_trainable(unwrapped, current)
        log.info("%s eval %s: %s", desc, tag, {k: round(v, 4) if isinstance(v, float) else v
                                               for k, v in metrics.items()})
        return bool(stop_fn and stop_fn(metrics))

    stop = False
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
            if config.checkpoint_every and step % config.checkpoint_every == 0 and not last:
                result.train_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                ckpt.save(unwrapped, optimizer, scheduler, snapshot_state(), best, ema)
            if stop:
                break
        result.train_s += time.perf_counter() - t0
        if not stop:
            epoch, batches_done = epoch + 1, 0
            stop = evaluate(f"epoch {epoch}")
            ckpt.save(unwrapped, optimizer, scheduler, snapshot_state(), best, ema)
    bar.close()
    result.stopped_early = stop and epoch < config.epochs
    if config.select_best and best is not None:
        _load_trainable(unwrapped, best)
    elif ema is not None:
        _load_trainable(unwrapped, ema)
    result.steps = step
    result.wall_s = time.perf_counter() - start
    accelerator.wait_for_everyone()
    return result
