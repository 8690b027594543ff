"""Teachers of another vocabulary or width: what they can share with the student, and the
projection that lets them align its features.

    from kdshield.defenses.w2s_projection import kd_decision, student_targets
    kd, why_off = kd_decision(cfg, teacher.gen, student)   # kd: auto -> off across vocabularies
    extras, floats, proj = student_targets(teacher.gen, teacher.path, student, encoded, data, cfg,
                                           outputs=None, base="smollm2-135m", max_length=128,
                                           max_response_tokens=48)
    encoded.extras = extras   # t_feat: row i's teacher feature through P, [N, student width]

Used by ``kdshield.defenses.w2s_generation`` when the teacher's tokenizer differs from the
student's (token KD is then off: CE + feature alignment only) or its width does. The pooled
features (last prompt token, response mean) are defined per example, so example i's teacher
feature, computed on the teacher's own encoding of row i, meets example i's student feature even
though their token positions do not line up.

**Which way P maps, and how it is trained.** P is affine, teacher width -> student width, and
the student's suspect features are pulled toward P(h_teacher), so the alignment is a squared
distance in the student's own feature space (the same scale as the same-width path, so gamma keeps
its meaning), and every direction of the student's space is constrained. The other way round
(Q: student -> teacher, aligning Q(h_student) with h_teacher) lets a wider student (gemma-3-270m,
640, under SmolLM2, 576) keep anything in Q's null space, a backdoor direction included, and puts
Q in the student's gradient path. P is fitted at teacher-preparation time, with clean data only,
by ridge regression from the SFT-ed teacher's pooled features to the pooled last-layer features
of the **clean base student** (``base``: the clean model the suspect was made from, loaded
once, run under no_grad on the student's own encoding of the same clean train rows, then freed),
so P(h_teacher) lives where a clean student's features live. It is never fitted to the suspect's
own features: the alignment would then start at zero and push nothing (../shared/GENERATION.md).
The teacher features are standardised per dimension before the fit and the ridge is
``projection_ridge`` times the number of rows (a penalty in units of one feature's variance), so
one value suits models whose hidden states differ in scale; the fit's R^2 (variance of the base's
features explained) is recorded on the train rows and, out of sample, on the clean dev rows.
P is saved as safetensors in the teacher's cache entry, keyed by everything it depends on (both
encodings of the rows, the base and its resolved path, the ridge, the dev encodings), and frozen
while the student trains (its targets are computed once).

The alternative, training P jointly with the teacher's SFT (an auxiliary branch, paper eq. 4: the
teacher's CE plus ||P h_teacher - h_base||^2 through the SFT), would let the teacher's features
adapt to the projection, at the price of one more forward pass of the base per teacher step and a
teacher that depends on the student's base; the closed-form fit costs one pass of each model over
the rows and leaves the teacher's SFT (and its cache) as it is. Neither is measured against the
other yet.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kdshield.data.batching import Encoded, collate, epoch_batches
from kdshield.data.sft import SFTData
from kdshield.errors import ConfigError
from kdshield.models.generator import Generator, load_generator
from kdshield.models.loading import LoadOptions, resolve_model_ref
from kdshield.profiling import phase
from kdshield.results import settings_hash
from kdshield.training.sft import encode_sft

if TYPE_CHECKING:
    from kdshield.defenses.w2s_generation import GenW2SConfig

log = logging.getLogger(__name__)

POSITIONS = ("last_prompt", "response_mean")
FIT = "ridge-standardised-v1"  # the fit's own version: a change to it must not reuse an old file


def encoded_digest(encoded: Encoded) -> str:
    """Digest of the exact token ids and labels the teacher's outputs are computed on."""
    h = hashlib.sha256()
    for ids, labels in zip(encoded.input_ids, encoded.token_labels or [[]] * len(encoded)):
        h.update(json.dumps([ids, labels]).encode())
    return h.hexdigest()[:16]


# --- which teachers can share what ---------------------------------------------------------------
def tokenizer_digest(tokenizer) -> str:
    """Short digest of a tokenizer's vocabulary and chat template (what token ids and prompts mean)."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()[:16]


def vocabulary_mismatch(teacher: Generator, student: Generator) -> str | None:
    """Why token KD cannot compare the two models' next-token distributions, or None if it can."""
    t_vocab, s_vocab = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    if t_vocab != s_vocab:
        return f"their tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens)"
    t_rows, s_rows = teacher.base_config.vocab_size, student.base_config.vocab_size
    if t_rows != s_rows:
        return f"their output layers differ ({t_rows} vs {s_rows} logits)"
    return None


def kd_decision(cfg: GenW2SConfig, teacher: Generator, student: Generator) -> tuple[bool, str | None]:
    """(whether token KD runs, why it is off where the models decided it rather than the settings);
    a ConfigError where the teacher cannot serve this student: ``kd: on`` across vocabularies, or a
    foreign teacher with nothing left to distil (gamma 0)."""
    mismatch = vocabulary_mismatch(teacher, student)
    if mismatch and cfg.kd == "on":
        raise ConfigError(f"w2s.kd=on: token KD needs one vocabulary, and teacher {teacher.source} and student "
                          f"{student.source} differ: {mismatch}. Use a teacher with the student's tokenizer "
                          "(the default: the student's base cut to teacher_layers), or kd: auto / off (feature "
                          "alignment through a projection only)")
    if mismatch and not cfg.gamma:
        raise ConfigError(f"w2s: teacher {teacher.source} and student {student.source} have different "
                          f"vocabularies ({mismatch}), so token KD is off and feature alignment is all such a "
                          "teacher can give, but gamma is 0: nothing would be distilled. Set gamma > 0 or use a "
                          "teacher with the student's tokenizer")
    if mismatch:
        return False, (f"vocabulary mismatch: {mismatch}; feature alignment only, through a projection "
                       f"{teacher.hidden_size} -> {student.hidden_size}")
    return cfg.kd != "off" and cfg.beta > 0, None


def resolve_kd(cfg: GenW2SConfig, teacher: Generator, student: Generator) -> bool:
    """Whether token KD runs (``kd_decision``); a ConfigError where the teacher cannot serve this student."""
    return kd_decision(cfg, teacher, student)[0]


def needs_projection(teacher: Generator, student: Generator) -> bool:
    """Whether the teacher's features live in another space than the student's: another tokenizer
    (another model, even at the same width) or another width."""
    return vocabulary_mismatch(teacher, student) is not None or teacher.hidden_size != student.hidden_size



# --- features and the projection ----------------------------------------------------------------
@torch.no_grad()
def pooled_features(gen: Generator, encoded: Encoded, *, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Every row's pooled last-layer features (``POSITIONS``, each ``[N, H]`` float32, row order of
    ``encoded``), without any logits; the caller's train/eval mode is restored."""
    was_training = gen.training
    gen.eval()
    device = next(gen.parameters()).device
    out = {p: torch.zeros(len(encoded), gen.hidden_size) for p in POSITIONS}
    for rows in epoch_batches(encoded.lengths(), batch_size, 0, 0, shuffle=False):
        batch = {k: v.to(device) for k, v in collate(encoded, rows).items()}
        feats = gen.features(**batch)
        for p in POSITIONS:
            out[p][rows] = getattr(feats, p).float().cpu()
    gen.train(was_training)
    return out


def cached_features(gen: Generator, encoded: Encoded, entry: Path, *, batch_size: int = 8,
                    ) -> dict[str, torch.Tensor]:
    """``pooled_features`` of the frozen teacher ``gen``, cached in its entry per encoding."""
    path = Path(entry) / f"features-{settings_hash({'encoded': encoded_digest(encoded)})}.safetensors"
    if path.is_file():
        return load_file(str(path))
    with phase("teacher features"):
        feats = pooled_features(gen, encoded, batch_size=batch_size)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp))
    tmp.replace(path)
    return feats


# --- the fit --------------------------------------------------------------------------------------
def fit_ridge(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine ``y ~ x @ W.T + b`` by ridge regression on per-dimension standardised ``x`` with
    penalty ``ridge * len(x)`` (0: minimum-norm least squares). Returns ``(W [Hy, Hx], b [Hy])``."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"fit_ridge: need the same rows (at least 2) in x and y, got {x.shape[0]} and {y.shape[0]}")
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    sx = x.std(0).clamp(min=1e-6)
    z, yc = (x - mx) / sx, y - my
    if ridge > 0:
        gram = z.T @ z + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=z.dtype)
        coef = torch.linalg.solve(gram, z.T @ yc)  # [Hx, Hy] on standardised x
    else:
        coef = torch.linalg.pinv(z) @ yc
    weight = (coef / sx.unsqueeze(1)).T  # back to raw x: W [Hy, Hx]
    bias = my - mx @ weight.T
    return weight.float(), bias.float()


def r_squared(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              centre: torch.Tensor | None = None) -> float:
    """Share of ``y``'s variance (about ``centre``, default its own mean) that ``x @ W.T + b`` explains."""
    y = y.double()
    centre = y.mean(0) if centre is None else centre.double()
    res = (y - (x.double() @ weight.double().T + bias.double())).pow(2).sum()
    tot = (y - centre).pow(2).sum().clamp(min=1e-12)
    return float(1 - res / tot)


@dataclass
class Projection:
    """Frozen affine maps teacher width -> student width, one per pooled position."""

    weights: dict[str, torch.Tensor]  # position -> [H_student, H_teacher]
    biases: dict[str, torch.Tensor]  # position -> [H_student]
    stats: dict = field(default_factory=dict)
    path: Path | None = None
    fitted: bool = False  # True when fitted by this call, False when read from the cache

    def apply(self, position: str, teacher_features: torch.Tensor) -> torch.Tensor:
        w, b = self.weights[position], self.biases[position]
        if teacher_features.shape[-1] != w.shape[1]:
            raise ValueError(f"projection: teacher features of width {teacher_features.shape[-1]}, "
                             f"the projection expects {w.shape[1]}")
        with torch.no_grad():
            return teacher_features.float() @ w.T + b

    def save(self, path: Path) -> None:
        tensors = {f"{p}.weight": self.weights[p].contiguous() for p in self.weights}
        tensors.update({f"{p}.bias": self.biases[p].contiguous() for p in self.biases})
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"stats": json.dumps(self.stats, default=str)})
        tmp.replace(path)
        self.path = path

    @classmethod
    def load(cls, path: Path) -> Projection:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            stats = json.loads((f.metadata() or {}).get("stats", "{}"))
        positions = sorted({k.rsplit(".", 1)[0] for k in tensors})
        return cls({p: tensors[f"{p}.weight"] for p in positions}, {p: tensors[f"{p}.bias"] for p in positions},
                   stats, path=path, fitted=False)

    def describe(self) -> dict:
        return {"path": self.path.name if self.path else None, "fitted": self.fitted,
                **{k: v for k, v in self.stats.items() if k != "key"}}


def fit_projection(teacher_train: dict[str, torch.Tensor], base_train: dict[str, torch.Tensor], ridge: float,
                   teacher_dev: dict[str, torch.Tensor] | None = None,
                   base_dev: dict[str, torch.Tensor] | None = None) -> Projection:
    """One ridge map per pooled position from the teacher's features to the clean base's, with R^2
    on the fitted rows and (given dev features) on held-out rows about the train mean."""
    weights, biases, stats = {}, {}, {"fit": FIT, "ridge": ridge, "rows": int(next(iter(base_train.values())).shape[0]),
                                      "teacher_width": int(next(iter(teacher_train.values())).shape[1]),
                                      "student_width": int(next(iter(base_train.values())).shape[1]),
                                      "train_r2": {}, "dev_r2": {} if teacher_dev is not None else None}
    for p in POSITIONS:
        w, b = fit_ridge(teacher_train[p], base_train[p], ridge)
        weights[p], biases[p] = w, b
        stats["train_r2"][p] = round(r_squared(teacher_train[p], base_train[p], w, b), 4)
        if teacher_dev is not None and base_dev is not None:
            stats["dev_r2"][p] = round(r_squared(teacher_dev[p], base_dev[p], w, b, base_train[p].mean(0)), 4)
    return Projection(weights, biases, stats, fitted=True)


def prepare_projection(entry: Path, teacher: Generator, student: Generator, data: SFTData, *, base: str,
                       student_train: Encoded, teacher_train: Encoded, teacher_features: dict[str, torch.Tensor],
                       max_length: int, max_response_tokens: int | None, ridge: float, batch_size: int = 8,
                       options: LoadOptions = LoadOptions()) -> Projection:
    """P fitted from the frozen ``teacher``'s pooled features (``teacher_features``, on its encoding
    ``teacher_train`` of the train rows) to the clean ``base``'s on the student's encoding
    ``student_train`` of the same rows, or read back from ``entry`` (see the module doc)."""
    dev = data.splits.get("dev")
    dev_enc = None
    if dev is not None and len(dev):
        dev_enc = tuple(encode_sft(g.tokenizer, dev, max_length=max_length, max_response_tokens=max_response_tokens)
                        for g in (teacher, student))
    key_src = {"fit": FIT, "ridge": ridge, "base": str(base), "base_resolved": str(resolve_model_ref(base, options)),
               "teacher_train": encoded_digest(teacher_train), "student_train": encoded_digest(student_train),
               "dev": [encoded_digest(e) for e in dev_enc] if dev_enc else None}
    path = Path(entry) / f"projection-{settings_hash(key_src)}.safetensors"
    if path.is_file():
        log.info("reusing the w2s projection %s", path)
        return Projection.load(path)
    teacher_dev = cached_features(teacher, dev_enc[0], entry, batch_size=batch_size) if dev_enc else None
    with phase("w2s projection"):
        clean = load_generator(base, options=options)
        if clean.tokenizer.get_vocab() != student.tokenizer.get_vocab():
            raise ConfigError(f"w2s: the base {base} the projection is fitted to has another tokenizer than the "
                              f"student {student.source}; give the clean model the suspect was made from as base")
        if clean.hidden_size != student.hidden_size:
            raise ConfigError(f"w2s: the base {base} has width {clean.hidden_size}, the student "
                              f"{student.source} {student.hidden_size}; give the clean model the suspect was made "
                              "from as base")
        clean.eval().requires_grad_(False)  # features only, under no_grad
        base_train = pooled_features(clean, student_train, batch_size=batch_size)
        base_dev = pooled_features(clean, dev_enc[1], batch_size=batch_size) if dev_enc else None
        del clean
        gc.collect()
        proj = fit_projection(teacher_features, base_train, ridge, teacher_dev, base_dev)
    proj.stats["key"] = key_src
    proj.save(path)
    log.info("w2s projection %d -> %d fitted on %d rows: R^2 train %s, dev %s", proj.stats["teacher_width"],
             proj.stats["student_width"], proj.stats["rows"], proj.stats["train_r2"], proj.stats["dev_r2"])
    return proj


def student_targets(teacher: Generator, entry: Path, student: Generator, encoded: Encoded, data: SFTData,
                    cfg: GenW2SConfig, *, outputs, base: str, max_length: int, max_response_tokens: int | None,
                    options: LoadOptions = LoadOptions()) -> tuple[dict[str, torch.Tensor], int, Projection | None]:
    """The extras the student's batches carry (row i of ``encoded``, the student's encoding of the
    train split, gets row i's teacher data), the floats cached for them, and the projection if any.
    ``outputs``: the same-tokenizer teacher's ``TeacherOutputs`` on ``encoded`` (its extras, token
    bins included), or None for a teacher of another tokenizer, whose pooled features are computed
    on its own encoding of the same rows (``t_feat`` alone). Where the features live in another
    space (``needs_projection``), ``t_feat`` is P(teacher features)."""
    if outputs is None:
        t_encoded = encode_sft(teacher.tokenizer, data.split("train"), max_length=max_length,
                               max_response_tokens=max_response_tokens)
        feats = cached_features(teacher, t_encoded, entry, batch_size=cfg.teacher_batch_size)
        extras: dict[str, torch.Tensor] = {"t_feat": feats[cfg.feature_position]}
        floats = int(feats[cfg.feature_position].numel())
    else:
        t_encoded, feats = encoded, {p: getattr(outputs, p) for p in POSITIONS}
        extras = outputs.extras(cfg.feature_position)
        floats = int(outputs.log_probs.numel() + outputs.indices.numel())
    projection = None
    if cfg.gamma and needs_projection(teacher, student):
        projection = prepare_projection(entry, teacher, student, data, base=base, student_train=encoded,
                                        teacher_train=t_encoded, teacher_features=feats, max_length=max_length,
                                        max_response_tokens=max_response_tokens, ridge=cfg.projection_ridge,
                                        batch_size=cfg.teacher_batch_size, options=options)
        extras["t_feat"] = projection.apply(cfg.feature_position, feats[cfg.feature_position])
    return extras, floats, projection
