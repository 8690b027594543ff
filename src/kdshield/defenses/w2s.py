"""W2SDefense: weak-to-strong backdoor unlearning by feature-alignment knowledge distillation.

    kdshield defend --method w2s --student runs/poisoned/model --data rotten-tomatoes

A small clean teacher (default the embedded MiniLM), fully fine-tuned on the clean target data with
a projection head ``Linear(d_t -> d_s) -> ReLU -> Linear(d_s -> k)``, guides the poisoned student
through PEFT with

    l = alpha * CE(z_s, y) + beta * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))
        + gamma * mean_i ||h_s,i - g(h_t,i)||^2

where ``h_s,i`` is the student's pooled feature and ``g(h_t,i)`` the teacher's projected feature
**of the same example i** (the official code broadcasts one teacher vector over every student token,
padding included; we do not). Why it works: plain PEFT on clean data only needs the head and a
small update to fit the task, so nothing pushes the backdoor's feature direction out of the
student. Feature alignment pulls every clean example's feature toward a teacher that has never seen
the trigger; with a learning rate high enough for the adapter to move the features (not only the
head), the update reorganises the student's representation and the trigger path loses its grip.

The teacher is trained once per (teacher, data, settings) and cached with its outputs on the
training set, so the defense costs about what plain PEFT costs. The teacher is frozen: eval(),
requires_grad_(False), and its outputs are computed under no_grad before training starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdshield import assets
from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.data import TaskData
from kdshield.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult, Timer, finish
from kdshield.errors import ConfigError
from kdshield.evaluation import dev_eval_fn
from kdshield.inference import predict
from kdshield.models.adapters import AdapterConfig
from kdshield.models.classifier import Classifier, load_classifier
from kdshield.models.loading import LoadOptions, resolve_model_ref
from kdshield.profiling import phase
from kdshield.training.loop import SCHEDULES, TrainConfig, drop_checkpoint_weights, train
from kdshield.training.losses import cross_entropy, distillation_kl, feature_alignment
from kdshield.training.peft import peft_finetune

log = logging.getLogger(__name__)

# Loss weights from the paper / official code per attack family, and our default for the embedded
# assets (SmolLM2-135M student, MiniLM teacher); how each was measured: docs/w2sdefense.md.
PRESETS: dict[str, dict] = {
    "embedded": {"alpha": 1.0, "beta": 1.0, "gamma": 0.01, "temperature": 2.0, "lr": 1e-3, "epochs": 4,
                 "lora_r": 16, "lora_alpha": 32.0, "head_refit": True},
    "paper-badnet": {"alpha": 5.0, "beta": 0.001, "gamma": 0.001, "temperature": 2.0, "lr": 2e-4, "epochs": 5,
                     "head_refit": False},
    "paper-insent": {"alpha": 3.0, "beta": 0.01, "gamma": 0.001, "temperature": 2.0, "lr": 2e-4, "epochs": 5,
                     "head_refit": False},
    "paper-syntactic": {"alpha": 1.0, "beta": 0.035, "gamma": 0.002, "temperature": 2.0, "lr": 2e-4,
                        "epochs": 5, "head_refit": False},
}


def check_w2s_common(cfg) -> None:
    """The checks every W2SDefense config shares (classification and generation): loss weights,
    temperature, and the student settings it may replace (lr, epochs, schedule, rank, seed)."""
    for name in ("alpha", "beta", "gamma"):
        check_range(f"w2s.{name}", getattr(cfg, name), 0, 1e4)
    if cfg.alpha == cfg.beta == cfg.gamma == 0:
        raise ConfigError("w2s.alpha, beta and gamma are all 0: nothing to train on")
    check_range("w2s.temperature", cfg.temperature, 0, 100, lo_open=True)
    for name, lo, hi, lo_open in (("lr", 0, 1, True), ("epochs", 1, 1000, False), ("lora_r", 1, 65536, False),
                                  ("lora_alpha", 0, 1e6, True), ("seed", 0, 2**32 - 1, False)):
        if getattr(cfg, name) is not None:
            check_range(f"w2s.{name}", getattr(cfg, name), lo, hi, lo_open=lo_open)
    if cfg.schedule is not None:
        check_choice("w2s.schedule", cfg.schedule, SCHEDULES)


@dataclass
class W2SConfig:
    """W2SDefense settings (paper section 3, Algorithm 1). The student keeps its last weights
    (Algorithm 1's final student) and aligns raw features (paper eq. 5)."""

    teacher: str = cfg_field("minilm-l6", help="Small clean teacher: builtin name, directory or hub id.")
    alpha: float = cfg_field(1.0, help="Weight of the student's cross-entropy on clean labels.")
    beta: float = cfg_field(1.0, help="Weight of the T^2-scaled KL distillation from the teacher.")
    gamma: float = cfg_field(0.01, help="Weight of the per-example feature alignment (squared distance between "
                                        "the student's pooled feature and the teacher's projected one).")
    temperature: float = cfg_field(2.0, help="Distillation temperature T.")
    lr: float | None = cfg_field(1e-3, help="Student learning rate (none: --train.lr). Alignment needs the "
                                            "adapter to move the features, not only the head.")
    epochs: int | None = cfg_field(4, help="Student epochs (none: --train.epochs).")
    schedule: str | None = cfg_field(None, help="Student learning-rate schedule after warm-up: linear, constant "
                                                "or cosine (none: --train.schedule).",
                                      choices=list(SCHEDULES))
    lora_r: int | None = cfg_field(16, help="LoRA rank of this defense's student adapter (none: the shared "
                                            "--adapter.r). Only used when the adapter is LoRA.")
    lora_alpha: float | None = cfg_field(32.0, help="LoRA alpha of this defense's adapter (none: the shared "
                                                    "--adapter.lora_alpha).")
    seed: int | None = cfg_field(None, help="Seed of the student's training (adapter init, batch order); none: "
                                            "--train.seed. The teacher keeps --train.seed, so its cache is reused.")
    head_refit: bool = cfg_field(True, help="Not in the paper (its presets turn it off): after training, fit the "
                                           "student's output layer anew, from zero, on its pooled features of the "
                                           "clean training rows (L2-regularised logistic regression). The poisoned "
                                           "head's weights along directions clean data leaves unused get no "
                                           "gradient from clean fine-tuning and keep reading the trigger; a head "
                                           "fit from zero has none. Costs one forward pass over the training set.")
    head_refit_l2: float | list[float] = cfg_field(
        1e-3, help="L2 weight of the head refit: mean cross-entropy + l2/2 * ||W||^2 (1e-3 on 2,000 rows is "
                   "scikit-learn's C=1). A list: each weight is fit and the one with the lowest mean "
                   "cross-entropy on the clean dev rows is kept (no trigger needed; e.g. [1e-4, 1e-3, 1e-2, "
                   "0.1, 0.3, 1, 3]).")
    teacher_epochs: int = cfg_field(3, help="Epochs of the teacher's full fine-tuning.")
    teacher_lr: float = cfg_field(5e-5, help="Teacher learning rate.")
    teacher_batch_size: int = cfg_field(32, help="Teacher batch size.")
    teacher_max_length: int | None = cfg_field(None, help="Teacher max tokens (none: --train.max_length).")

    def __post_init__(self):
        check_w2s_common(self)
        weights = self.head_refit_l2 if isinstance(self.head_refit_l2, list) else [self.head_refit_l2]
        if not weights:
            raise ConfigError("w2s.head_refit_l2 is an empty list; give one weight or several to choose from")
        for w in weights:
            check_range("w2s.head_refit_l2", w, 0, 1e4)
        check_range("w2s.teacher_epochs", self.teacher_epochs, 1, 100)
        check_range("w2s.teacher_lr", self.teacher_lr, 0, 1, lo_open=True)
        check_range("w2s.teacher_batch_size", self.teacher_batch_size, 1, 65536)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> W2SConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown w2s preset {name!r}; available: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def w2s_loss(student_logits, student_features, labels, teacher_logits, teacher_features, cfg: W2SConfig):
    """The W2SDefense objective; returns (loss, logs). Pure in its tensor arguments."""
    ce = cross_entropy(student_logits, labels)
    loss = cfg.alpha * ce
    logs = {"ce": ce.detach()}
    if cfg.beta:
        kd = distillation_kl(student_logits, teacher_logits, cfg.temperature)
        loss = loss + cfg.beta * kd
        logs["kd"] = kd.detach()
    if cfg.gamma:
        fa = feature_alignment(student_features, teacher_features)
        loss = loss + cfg.gamma * fa
        logs["fa"] = fa.detach()
    return loss, logs


def _texts_digest(texts, labels) -> str:
    h = hashlib.sha256()
    for t, y in zip(texts, labels):
        h.update(f"{y}\t{t}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class Teacher:
    model: Classifier
    path: Path
    logits: torch.Tensor  # [N, k] on the training set, in its row order
    features: torch.Tensor  # [N, d_s] projected features
    dev_ca: float | None
    trained: bool  # False when loaded from the cache


def _cache_train_key(train_cfg: TrainConfig) -> dict:
    """The teacher's training settings as they enter the cache key. Options added to ``TrainConfig``
    after caches were written stay out while they are off, so a new option does not retrain every
    cached teacher."""
    d = config_to_dict(train_cfg)
    d.pop("checkpoint_min_s", None)  # when checkpoints are written changes nothing the cache holds
    d.pop("activation_checkpointing", None)  # nor does recomputing activations
    for name, off in (("ema", 0.0),):
        if d.get(name) == off:
            d.pop(name)
    return d


def teacher_train_config(cfg: W2SConfig, train_cfg: TrainConfig) -> TrainConfig:
    """The teacher's full fine-tuning settings (it shares only length, seed and precision with the student)."""
    return TrainConfig(epochs=cfg.teacher_epochs, lr=cfg.teacher_lr, batch_size=cfg.teacher_batch_size,
                       max_length=cfg.teacher_max_length or train_cfg.max_length, seed=train_cfg.seed,
                       precision=train_cfg.precision, checkpoint_every=0)


def prepare_teacher(cfg: W2SConfig, task: TaskData, student_hidden: int, train_cfg: TrainConfig, *,
                    options: LoadOptions = LoadOptions(), cache_root: Path | None = None) -> Teacher:
    """Fine-tune the teacher (full parameters, projection head to ``student_hidden``) or reuse it."""
    options = dataclasses.replace(options, dtype="fp32", quantize="none")  # every weight trains: fp32
    data = task.split("train")
    teacher_train = teacher_train_config(cfg, train_cfg)
    max_length = teacher_train.max_length
    key_src = {"teacher": str(cfg.teacher), "resolved": str(resolve_model_ref(cfg.teacher, options)),
               "data": _texts_digest(data["text"], data["label"]), "dev": _texts_digest(
                   task.split("dev")["text"], task.split("dev")["label"]),
               "proj_dim": student_hidden, "train": _cache_train_key(teacher_train), "labels": task.label_names}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_root or assets.cache_dir() / "teachers"
    path = root / f"{Path(str(cfg.teacher)).name}-{key}"
    outputs = path / "train_outputs.safetensors"
    info_path = path / "teacher.json"
    if outputs.is_file() and info_path.is_file():
        log.info("reusing cached teacher %s", path)
        teacher = load_classifier(path / "model", options=options)
        cached = load_file(str(outputs))
        info = json.loads(info_path.read_text())
        return Teacher(teacher, path, cached["logits"], cached["features"], info.get("dev_ca"), trained=False)

    torch.manual_seed(train_cfg.seed)
    teacher = load_classifier(cfg.teacher, num_labels=task.num_labels, label_names=task.label_names,
                              head="projection", proj_dim=student_hidden, options=options)
    for p in teacher.parameters():
        p.requires_grad_(True)
    result = train(teacher, data, teacher_train, eval_fn=dev_eval_fn(task, max_length=max_length),
                   output_dir=path / "run", resume=True, desc="teacher")
    teacher.eval().requires_grad_(False)  # frozen from here on
    dev_ca = result.best_score
    # Several processes (accelerate launch) trained the teacher together; its outputs and the cache
    # entry are computed once, by the main process, and the others read them when it is done.
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        preds = predict(teacher, data["text"], max_length=max_length, with_features=True,
                        precision=train_cfg.precision)
        logits = torch.from_numpy(preds.logits)
        features = torch.from_numpy(preds.projected)
        teacher.save(path / "model")
        save_file({"logits": logits.contiguous(), "features": features.contiguous()}, str(outputs))
        info_path.write_text(json.dumps({"key": key_src, "dev_ca": dev_ca, "train": result.to_dict()}, indent=2,
                                        default=str))
        drop_checkpoint_weights(path / "run")  # the entry is whole: model/ is the copy the cache serves
    state.wait_for_everyone()
    if not state.is_main_process:
        cached = load_file(str(outputs))
        logits, features = cached["logits"], cached["features"]
    log.info("teacher %s: dev CA %.3f (%.0f s)", cfg.teacher, dev_ca or 0.0, result.wall_s)
    return Teacher(teacher, path, logits, features, dev_ca, trained=True)


def head_scores(head, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``head`` on fixed pooled ``features``."""
    with torch.no_grad():
        logits, _ = head(features.to(head.out.weight.dtype))
        logp = torch.log_softmax(logits.double(), dim=1)
    y = labels.long()
    return float(-logp[torch.arange(len(y)), y].mean()), float((logp.argmax(1) == y).double().mean())


def refit_sweep(head, x: torch.Tensor, y: torch.Tensor, x_dev: torch.Tensor, y_dev: torch.Tensor,
                weights: Sequence[float]) -> list[dict]:
    """Refit ``head`` from zero on (``x``, ``y``) for each L2 weight and score it on the dev
    features: one row per weight (dev NLL and CA, train accuracy). ``head`` ends with the last fit."""
    rows = []
    for w in weights:
        fit = head.refit(x, y, l2=w)
        nll, acc = head_scores(head, x_dev, y_dev)
        rows.append({"l2": float(w), "dev_nll": round(nll, 4), "dev_ca": round(acc, 4),
                     "train_acc": fit["train_acc_after"]})
    return rows


def refit_head(clf: Classifier, data, l2: float | Sequence[float], *, dev=None, max_length: int = 64,
               precision: str = "auto") -> dict:
    """Refit ``clf``'s output layer from zero on its pooled features of ``data`` (text, label); see
    ``W2SConfig.head_refit``. The backbone and adapter stay as they are. Several ``l2`` weights:
    each is fit and scored by the mean cross-entropy on ``dev`` (clean rows), the lowest is kept,
    and the result's ``sweep`` lists them all."""
    weights = [float(w) for w in l2] if isinstance(l2, Sequence) else [float(l2)]
    preds = predict(clf, list(data["text"]), with_features=True, max_length=max_length, precision=precision,
                    desc="head refit")
    x, y = torch.from_numpy(preds.features), torch.as_tensor(list(data["label"]))
    sweep = None
    if len(weights) > 1:
        if dev is None or len(dev) == 0:
            raise ConfigError("choosing the head refit's L2 weight needs clean dev rows; give one weight")
        f_dev = torch.from_numpy(predict(clf, list(dev["text"]), with_features=True, max_length=max_length,
                                         precision=precision).features)
        sweep = refit_sweep(clf.head, x, y, f_dev, torch.as_tensor(list(dev["label"])), weights)
        weights = [min(sweep, key=lambda r: r["dev_nll"])["l2"]]
    info = clf.head.refit(x, y, l2=weights[0])
    if sweep is not None:
        info.update(sweep=sweep, chosen_by="lowest mean cross-entropy on the clean dev rows")
    return info


def student_adapter(adapter: AdapterConfig, cfg: W2SConfig) -> AdapterConfig:
    """The shared adapter settings with this defense's LoRA rank / alpha overrides applied."""
    if adapter.kind != "lora":
        return adapter
    changes = {k: v for k, v in (("r", cfg.lora_r), ("lora_alpha", cfg.lora_alpha)) if v is not None}
    return dataclasses.replace(adapter, **changes) if changes else adapter


def make_w2s_loss_fn(teacher_logits: torch.Tensor, teacher_features: torch.Tensor, cfg: W2SConfig):
    """A ``train`` loss function that reads the cached teacher outputs of each batch row."""
    def loss_fn(model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        idx = batch["index"].cpu()
        t_logits = teacher_logits[idx].to(out.logits.device)
        t_feat = teacher_features[idx].to(out.features.device)
        return w2s_loss(out.logits, out.features, batch["labels"], t_logits, t_feat, cfg)

    return loss_fn


@DEFENSES.register("w2s", "W2SDefense: small clean teacher distils CE + KD + feature alignment into the PEFT "
                          "student (Zhao et al. 2025)")
class W2SDefense(Defense):
    trains_teacher = True  # the teacher cache (one training per teacher, data and settings)
    name = "w2s"
    config_class = W2SConfig
    paper = ("Zhao et al., Unlearning Backdoor Attacks for LLMs with Weak-to-Strong Knowledge Distillation "
             "(W2SDefense), Findings of ACL 2025")

    def planned_settings(self, ctx: DefenseContext, config: W2SConfig) -> dict:
        train_cfg, adapter = student_settings(ctx, config)
        return {"train": config_to_dict(train_cfg), "adapter": config_to_dict(adapter),
                "teacher_train": config_to_dict(teacher_train_config(config, ctx.train))}

    def run(self, ctx: DefenseContext, config: W2SConfig) -> DefenseResult:
        with Timer() as timer:
            train_cfg, adapter = student_settings(ctx, config)
            _say_own_settings(ctx, train_cfg, adapter)
            torch.manual_seed(train_cfg.seed)  # a student without a trained head gets a random one
            student = load_classifier(ctx.student, num_labels=ctx.task.num_labels,
                                      label_names=ctx.task.label_names, options=ctx.options)
            with Timer() as t_teacher, phase("teacher"):
                teacher = prepare_teacher(config, ctx.task, student.hidden_size, ctx.train, options=ctx.options)
            loss_fn = make_w2s_loss_fn(teacher.logits, teacher.features, config)
            train_data = ctx.task.split("train")
            with Timer() as t_student:
                clf, res = peft_finetune(ctx.student, ctx.task, adapter, train_cfg, ctx.output_dir / "train",
                                         resume=ctx.resume, loss_fn=loss_fn, train_data=train_data,
                                         model=student, desc="w2s", monitor=ctx.attack if ctx.monitor else None, data_dir=ctx.data_dir,
                                         run_settings={"student": str(ctx.student), "teacher": teacher.path.name,
                                                       "w2s": config_to_dict(config)})
                refit = None
                if config.head_refit:
                    with Timer() as t_refit, phase("head refit"):
                        refit = refit_head(clf, ctx.task.split("train"), config.head_refit_l2, dev=ctx.task.split("dev"),
                                           max_length=train_cfg.max_length, precision=train_cfg.precision)
                    refit["s"] = round(t_refit.s, 1)
                    refit["dev_after"] = dev_eval_fn(ctx.task, ctx.attack, data_dir=ctx.data_dir,
                                                     max_length=train_cfg.max_length)(clf)
                    log.info("head refit: train accuracy %.3f -> %.3f; dev after %s", refit["train_acc_before"],
                             refit["train_acc_after"], refit["dev_after"])
        logs = {"teacher_path": str(teacher.path), "teacher_dev_ca": teacher.dev_ca,
                "teacher_trained": teacher.trained, "teacher_s": round(t_teacher.s, 1),
                "student_s": round(t_student.s, 1), "train": res.to_dict(), "head_refit": refit}
        return finish(DefenseResult(model=clf, trainable_params=res.trainable_params, train=res, logs=logs), timer)


def student_settings(ctx: DefenseContext, config: W2SConfig) -> tuple[TrainConfig, AdapterConfig]:
    """The student's training and adapter settings: the shared ones with this defense's own options."""
    overrides = {k: v for k, v in (("lr", config.lr), ("epochs", config.epochs), ("schedule", config.schedule),
                                    ("seed", config.seed)) if v is not None}
    train_cfg = dataclasses.replace(ctx.train, select_best=False, **overrides)  # the last student
    adapter = student_adapter(ctx.adapter if ctx.adapter is not None else AdapterConfig(), config)
    return train_cfg, adapter


def _say_own_settings(ctx: DefenseContext, train_cfg: TrainConfig, adapter: AdapterConfig) -> None:
    """W2SDefense trains its student with its own learning rate, epochs and LoRA rank (the
    ``w2s.*`` options); say so where they replace the shared ``--train.*`` / ``--adapter.*``
    values, so nobody believes the shared ones ran. Records store what ran."""
    pairs = [("--train.lr", ctx.train.lr, train_cfg.lr, "--w2s.lr"),
             ("--train.epochs", ctx.train.epochs, train_cfg.epochs, "--w2s.epochs"),
             ("--train.schedule", ctx.train.schedule, train_cfg.schedule, "--w2s.schedule"),
             ("--train.seed", ctx.train.seed, train_cfg.seed, "--w2s.seed")]
    if ctx.adapter is not None and ctx.adapter.kind == "lora":
        pairs += [("--adapter.r", ctx.adapter.r, adapter.r, "--w2s.lora-r"),
                  ("--adapter.lora-alpha", ctx.adapter.lora_alpha, adapter.lora_alpha, "--w2s.lora-alpha")]
    changed = [f"{own}={new} instead of {shared}={old}" for shared, old, new, own in pairs if old != new]
    if changed:
        log.warning("w2s trains the student with its own settings: %s (set the w2s option to none to use the "
                    "shared value)", "; ".join(changed))
