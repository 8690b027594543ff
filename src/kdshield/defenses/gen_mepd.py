"""MEPD on tokens: which rows of a suspect generator's SFT data are poisoned, from a directional
mapping module (DMM). BeDKD's detection step (``kdshield.defenses.bedkd_generation`` runs it
before its cycles, caches it under ``output_dir/detection`` and re-thresholds it on resume); on its
own:

    from kdshield.defenses.bedkd_generation import GenBeDKDConfig
    from kdshield.defenses.gen_mepd import gen_mepd, write_gen_detection
    cfg = GenBeDKDConfig()                               # the detection reads its n_dmm, dmm_*, top_k, mepd_pool, gamma...
    suspect = load_generator("runs/p/model").eval().requires_grad_(False)
    det = gen_mepd(suspect, dmm_rows, suspect_rows, cfg, TrainConfig(max_length=128), AdapterConfig(kind="lora"),
                   max_response_tokens=48, seed=0)       # dmm_rows: clean SFT rows; suspect_rows: the suspect's own
    det.summary()                # {"far": .., "frr": .., "flagged": n, "gamma": 0.1, ...}
    write_gen_detection(det, suspect_rows, "runs/bedkd/detection", cfg)

Every choice below is ours (neither paper's code covers generation); **the defaults are untuned**.

1. **DMM.** A copy of the suspect + LoRA (``dmm_adapter``) trained on ``n_dmm`` clean train rows
   whose responses are remapped (``dmm_responses``), with
   ``dmm_alpha * CE + (1 - dmm_alpha) * T^2 * KL_topk(suspect || DMM)`` on those sequences (the
   suspect's top-k bins computed once). This is the classification DMM's flipped labels on tokens:
   the prompt -> response mapping is destroyed, the trigger -> target mapping is never touched.
   ``derange``: row ``i`` gets the response of row ``pi(i)``, ``pi`` a seeded permutation without
   fixed points (``derangement``): right for free text, whose responses are all different. On a
   task whose answers come from a small set (a label word), a derangement hands about half of the
   rows their own answer back (two labels: ``p^2 + (1-p)^2``), so the DMM learns the labels'
   marginal, not a direction, and barely moves the clean rows. ``shift``: each response becomes
   the next of the rows' distinct responses in sorted order (``shifted_rows``): the
   classification DMM's ``c -> c + 1 mod K`` on answer words, and on all-distinct responses just
   another derangement. ``auto`` (default) shifts when the responses repeat (at most half as
   many distinct responses as rows), else deranges; the record says which ran.
2. **MEPD.** Per suspect row, the mean over its response tokens of the total variation
   ``0.5 * sum_v |p_suspect(v) - p_DMM(v)|`` between the two models' full next-token softmaxes
   (teacher-forced on the row's own response; computed batch by batch, no full-vocabulary logits
   are kept). The classification MEPD (mean over k classes of ``|p - q|``) equals TV for two
   classes and shrinks to nothing over a 49k vocabulary, hence TV, on [0, 1]. As in
   ``detection.mepd_flags`` a row is flagged when its score is **below** ``gamma``: a poisoned row's
   target is the mapping both models still share. The label filter's analogue (the suspect
   predicts the sample's own label) is ``match_filter``: flag only rows whose response tokens are
   the suspect's teacher-forced argmax at least that often (0 = off, the default: the suspect was
   trained on its clean rows too, so the filter separates little, and it would drop ``append``
   rows, whose clean part the suspect need not reproduce). FAR/FRR against ``poisoned`` and the
   curve over ``gamma_grid`` as ``detection`` computes them (the curve ignores ``match_filter``).
   ``write_gen_detection`` writes ``gen_mepd_scores.jsonl``, ``gen_mepd_detection.json`` and
   ``gen_mepd_far_frr.png``; the scores depend only on ``DETECTION_KEYS`` (``gamma`` and
   ``match_filter`` only threshold them, ``threshold``).

The config is ``GenBeDKDConfig`` (it lives with the defense; here it is only a type, so this
module never imports ``bedkd_generation`` and there is no cycle). ``distill_terms`` (the DMM's
objective, also the trust phase's), ``_lean`` and ``_device_batches`` live here and the cycles
import them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset

from kdshield.config import config_to_dict
from kdshield.data.batching import Encoded, collate, epoch_batches
from kdshield.defenses.w2s_generation import compute_teacher_outputs
from kdshield.detection import plot_far_frr
from kdshield.errors import ConfigError, DataError
from kdshield.evaluation import far_frr, far_frr_curve
from kdshield.inference import autocast_for, resolve_precision
from kdshield.models.adapters import AdapterConfig
from kdshield.models.generator import Generator, GeneratorOutput, attach_generator_adapter
from kdshield.training.loop import TrainConfig, read_json_state, train
from kdshield.training.losses import topk_distillation_kl
from kdshield.training.sft import encode_sft

if TYPE_CHECKING:  # annotations only: bedkd_generation imports this module
    from kdshield.defenses.bedkd_generation import GenBeDKDConfig

log = logging.getLogger(__name__)

MEPD_POOLS = ("mean", "max")
DMM_ADAPTERS = ("lora", "full")
DMM_RESPONSES = ("auto", "derange", "shift")
DETECTION_DIR = "detection"
SCORES_FILE, SUMMARY_FILE, PLOT_FILE = "gen_mepd_scores.jsonl", "gen_mepd_detection.json", "gen_mepd_far_frr.png"
DETECTION_KEYS = ("n_dmm", "dmm_alpha", "dmm_temperature", "dmm_lr", "dmm_epochs", "dmm_batch_size",
                  "dmm_adapter", "dmm_responses", "top_k", "mepd_pool")  # what the scores depend on (gamma and match_filter only threshold)


# --- pure pieces ------------------------------------------------------------------------------------
def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` with no fixed points (uniform over derangements: seeded
    rejection sampling, about e draws on average)."""
    if n < 2:
        raise ConfigError(f"a derangement needs at least 2 rows, got {n}")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def deranged_rows(rows: Dataset, seed: int) -> tuple[Dataset, float]:
    """``rows`` with row ``i``'s response replaced by row ``derangement(i)``'s; also the share of
    rows whose new response happens to equal their own (duplicate responses: those keep the
    mapping, so a high share weakens the DMM)."""
    perm = derangement(len(rows), seed)
    outputs = list(rows["output"])
    new = [outputs[int(j)] for j in perm]
    same = float(np.mean([a == b for a, b in zip(outputs, new)]))
    return rows.remove_columns("output").add_column("output", new), same


def shifted_rows(rows: Dataset) -> tuple[Dataset, float]:
    """``rows`` with each response replaced by the next of the distinct responses in sorted order
    (the last by the first); also the share of rows that keep their own response (0)."""
    outputs = list(rows["output"])
    distinct = sorted(set(outputs))
    if len(distinct) < 2:
        raise DataError(f"the DMM's {len(outputs)} clean rows all have the same response ({distinct[0]!r}): "
                        "no other answer to map them to; give rows with at least two different responses")
    nxt = {a: distinct[(i + 1) % len(distinct)] for i, a in enumerate(distinct)}
    new = [nxt[a] for a in outputs]
    return rows.remove_columns("output").add_column("output", new), 0.0


def resolve_dmm_responses(mode: str, outputs: list[str]) -> str:
    """``auto`` -> ``shift`` when the responses repeat (at most half as many distinct ones as rows:
    answers from a label set), else ``derange``; the other modes as given."""
    if mode != "auto":
        return mode
    return "shift" if len(set(outputs)) * 2 <= len(outputs) else "derange"


def remapped_rows(rows: Dataset, mode: str, seed: int) -> tuple[Dataset, float, str]:
    """The DMM's training rows under ``dmm_responses`` = ``mode``: (rows, share of rows that kept
    their own response, the mode that ran)."""
    ran = resolve_dmm_responses(mode, list(rows["output"]))
    new, same = shifted_rows(rows) if ran == "shift" else deranged_rows(rows, seed)
    return new, same, ran


def total_variation(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum_v |softmax(p) - softmax(q)|`` per row ([N, V] -> [N], in [0, 1])."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logits differ in shape: {tuple(p_logits.shape)} vs {tuple(q_logits.shape)}")
    p, q = F.softmax(p_logits.float(), dim=-1), F.softmax(q_logits.float(), dim=-1)
    return 0.5 * (p - q).abs().sum(dim=-1)


def response_ordinals(out: GeneratorOutput) -> torch.Tensor:
    """For each lean row (row-major): its index among its own example's response tokens."""
    count = torch.bincount(out.rows, minlength=out.batch_size)
    starts = count.cumsum(0) - count
    return torch.arange(out.rows.shape[0], device=out.rows.device) - starts[out.rows]


def distill_terms(out: GeneratorOutput, batch: dict, alpha: float, temperature: float,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a*CE + (1-a)*T^2*KL_topk, CE, KL)`` of a lean student output against the teacher bins the
    batch carries (``t_idx``, ``t_logp``, ``t_len`` from ``compute_teacher_outputs``)."""
    nll, count = out.token_nll()
    if not torch.equal(count.cpu(), batch["t_len"].long().cpu()):
        raise RuntimeError("bedkd: the batch's response tokens differ from the teacher's cached ones")
    ce = nll.sum() / count.sum().clamp(min=1)
    if alpha >= 1:
        return ce, ce, torch.zeros_like(ce)
    j = response_ordinals(out)
    kd = topk_distillation_kl(out.response_logits, batch["t_idx"][out.rows, j], batch["t_logp"][out.rows, j],
                              temperature)
    return alpha * ce + (1 - alpha) * kd, ce, kd


def _device_batches(encoded: Encoded, batch_size: int, device):
    for rows in epoch_batches(encoded.lengths(), batch_size, 0, 0, shuffle=False):
        yield rows, {k: v.to(device) for k, v in collate(encoded, rows).items()}


def _lean(gen: Generator, batch: dict) -> GeneratorOutput:
    return gen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
               position_ids=batch["position_ids"], labels=batch["labels"])


@torch.no_grad()
def mepd_scores(suspect: Generator, dmm: Generator, encoded: Encoded, *, batch_size: int = 16,
                precision: str = "fp32", pool: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``encoded``: the mean (``pool="max"``: the largest) over its response tokens of
    the TV between the suspect's and the DMM's next-token softmax, and the share of its response tokens that are the suspect's
    teacher-forced argmax. Computed batch by batch: no full-vocabulary logits outlive a batch."""
    suspect.eval()
    dmm.eval()
    device = next(suspect.parameters()).device
    scores, match = np.zeros(len(encoded)), np.zeros(len(encoded))
    for rows, batch in _device_batches(encoded, batch_size, device):
        with autocast_for(precision, device):
            a, b = _lean(suspect, batch), _lean(dmm, batch)
        count = torch.bincount(a.rows, minlength=a.batch_size).clamp(min=1).float()
        tv = total_variation(a.response_logits, b.response_logits)
        zeros = torch.zeros(a.batch_size, device=device)
        if pool == "max":
            row_tv = zeros.scatter_reduce(0, a.rows, tv, reduce="amax", include_self=True)
        else:
            row_tv = zeros.index_add(0, a.rows, tv) / count
        hit = (a.response_logits.argmax(dim=-1) == a.targets).float()
        scores[rows] = row_tv.cpu().numpy()
        match[rows] = (zeros.index_add(0, a.rows, hit) / count).cpu().numpy()
    return scores, match


# --- detection ----------------------------------------------------------------------------------------
@dataclass
class GenDetection:
    """MEPD of every suspect row, its flags at ``gamma``, FAR/FRR and the curve when the truth is
    known; ``match``: share of each row's response tokens that are the suspect's argmax."""

    scores: np.ndarray
    match: np.ndarray
    flags: np.ndarray
    gamma: float
    match_filter: float = 0.0
    truth: np.ndarray | None = None
    far: float | None = None
    frr: float | None = None
    curve: list[dict] | None = None
    info: dict = field(default_factory=dict)
    key: str | None = None  # settings hash of the scores (resume)

    @property
    def n_flagged(self) -> int:
        return int(self.flags.sum())

    @property
    def flagged_indices(self) -> np.ndarray:
        return np.flatnonzero(self.flags)

    def summary(self) -> dict:
        out = {"far": self.far, "frr": self.frr, "flagged": self.n_flagged, "gamma": self.gamma,
               "n": len(self.scores), "match_filter": self.match_filter}
        if self.truth is not None:
            out["n_poisoned"] = int(self.truth.sum())
        return out | self.info


def threshold(scores: np.ndarray, match: np.ndarray, truth: np.ndarray | None, gamma: float,
              match_filter: float, gamma_grid: list[float], *, info: dict | None = None,
              key: str | None = None) -> GenDetection:
    """Flags ``score < gamma`` (and ``match >= match_filter``), FAR/FRR and the curve over the grid."""
    flags = (np.asarray(scores) < gamma) & (np.asarray(match) >= match_filter)
    det = GenDetection(np.asarray(scores, dtype=float), np.asarray(match, dtype=float), flags, gamma,
                       match_filter, info=dict(info or {}), key=key)
    if truth is not None:
        det.truth = np.asarray(truth, dtype=bool)
        det.far, det.frr = far_frr(flags, det.truth)
        det.curve = far_frr_curve(det.scores, det.truth, gamma_grid, flag_below=True)
    return det


def write_gen_detection(det: GenDetection, rows: Dataset, out_dir: str | Path, cfg: GenBeDKDConfig) -> Path:
    """Scores and flags (JSONL), summary + curve + config (JSON), the FAR/FRR plot (PNG)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = rows["id"] if "id" in rows.column_names else [None] * len(rows)
    with (out / SCORES_FILE).open("w", encoding="utf-8") as fh:
        for i in range(len(det.scores)):
            row = {"index": i, "id": ids[i], "mepd": float(det.scores[i]), "match": float(det.match[i]),
                   "flagged": bool(det.flags[i])}
            if det.truth is not None:
                row["poisoned"] = bool(det.truth[i])
            fh.write(json.dumps(row) + "\n")
    meta = {"summary": det.summary(), "curve": det.curve, "config": config_to_dict(cfg), "key": det.key}
    tmp = out / (SUMMARY_FILE + ".tmp")  # written last: a whole summary means whole scores
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(out / SUMMARY_FILE)
    if det.curve:
        plot_far_frr(det.curve, out / PLOT_FILE, gamma=det.gamma, title="bedkd (generation): FAR and FRR over gamma")
    return out


def read_gen_detection(out_dir: str | Path) -> tuple[dict, list[dict]] | None:
    """The summary and the score rows ``write_gen_detection`` left, or None."""
    out = Path(out_dir)
    if not (out / SUMMARY_FILE).is_file() or not (out / SCORES_FILE).is_file():
        return None
    meta = read_json_state(out / SUMMARY_FILE)
    rows = [json.loads(line) for line in (out / SCORES_FILE).read_text().splitlines() if line.strip()]
    return meta, rows


def train_dmm(suspect: Generator, rows: Dataset, cfg: GenBeDKDConfig, train_cfg: TrainConfig, adapter: AdapterConfig,
              *, max_response_tokens: int | None, seed: int, eval_batch_size: int = 16) -> tuple[Generator, dict]:
    """The DMM: a copy of the frozen ``suspect`` + ``adapter`` trained on ``rows`` with remapped
    responses (``cfg.dmm_responses``) against the suspect's top-k bins on those same sequences."""
    remapped, same, mode = remapped_rows(rows, cfg.dmm_responses, seed)
    if same > 0.25:
        log.warning("the DMM's remapped responses equal the rows' own on %.0f%% of them: it will learn little "
                    "direction; dmm_responses: shift maps each answer to another", 100 * same)
    enc = encode_sft(suspect.tokenizer, remapped, max_length=train_cfg.max_length,
                     max_response_tokens=max_response_tokens)
    bins = compute_teacher_outputs(suspect, enc, top_k=cfg.top_k, temperature=cfg.dmm_temperature,
                                   batch_size=eval_batch_size)
    enc.extras = {"t_idx": bins.indices, "t_logp": bins.log_probs, "t_len": bins.lengths}
    dmm = copy.deepcopy(suspect)
    attach_generator_adapter(dmm, adapter)
    dmm_cfg = dataclasses.replace(train_cfg, epochs=cfg.dmm_epochs, lr=cfg.dmm_lr, batch_size=cfg.dmm_batch_size,
                                  grad_accum=1, warmup_ratio=0.0, schedule="constant", weight_decay=0.0,
                                  eval_every=0, select_best=False, checkpoint_every=0, seed=seed, ema=0.0)

    def loss_fn(model, batch):
        loss, ce, kd = distill_terms(_lean(model, batch), batch, cfg.dmm_alpha, cfg.dmm_temperature)
        return loss, {"ce": ce.detach(), "kd": kd.detach()}

    # no checkpoints: a few hundred steps, and the finished detection is what a resume reuses
    res = train(dmm, None, dmm_cfg, encoded=enc, loss_fn=loss_fn, desc="bedkd DMM")
    dmm.eval().requires_grad_(False)
    info = {"dmm_rows": len(rows), "dmm_steps": res.steps, "dmm_wall_s": round(res.wall_s, 2),
            "dmm_adapter": adapter.kind, "dmm_responses": mode, "dmm_same_response": round(same, 4)}
    return dmm, info


def detection_warnings(flagged_share: float, clean_above_gamma: float, gamma: float) -> list[str]:
    """What a user should be told about one detection, from numbers the run has without the truth.

    ``clean_above_gamma``: the share of the DMM's own clean rows that it moved by ``gamma`` or more.
    When that share is low, the DMM did not learn, and it will flag clean rows too. When the DMM did
    learn and MEPD still flags most suspect rows, either most rows really are poisoned (bbc-lead's
    attacker poisoned half of them, and MEPD flagged 82 of 160 with FAR 0.025) or gamma sits too high
    on this data. The run cannot tell which, so the warning names both and points to the curve.
    """
    out = []
    if clean_above_gamma < 0.5:
        out.append(f"the DMM moved only {100 * clean_above_gamma:.0f}% of its own clean rows by gamma={gamma:g} or "
                   "more: MEPD will flag clean rows too; raise dmm_lr or dmm_epochs")
    if flagged_share > 0.5:
        if clean_above_gamma < 0.5:
            out.append(f"MEPD flagged {100 * flagged_share:.0f}% of the suspect rows: the DMM probably kept the "
                       "clean mapping")
        else:
            out.append(f"MEPD flagged {100 * flagged_share:.0f}% of the suspect rows although the DMM moved "
                       f"{100 * clean_above_gamma:.0f}% of its own clean rows by gamma={gamma:g}: either most rows "
                       "are poisoned or gamma is too high for this data; check the detection curve in the record")
    return out


def gen_mepd(suspect: Generator, dmm_rows: Dataset, suspect_rows: Dataset, cfg: GenBeDKDConfig,
             train_cfg: TrainConfig, adapter: AdapterConfig, *, max_response_tokens: int | None, seed: int,
             eval_batch_size: int = 16, key: str | None = None) -> GenDetection:
    """Train the DMM on ``dmm_rows`` and score every row of ``suspect_rows`` (``GenDetection``)."""
    if len(suspect_rows) == 0:
        raise DataError("the suspect data set is empty: nothing to detect")
    precision = resolve_precision(train_cfg.precision)
    dmm, info = train_dmm(suspect, dmm_rows, cfg, train_cfg, adapter, max_response_tokens=max_response_tokens,
                          seed=seed, eval_batch_size=eval_batch_size)
    kw = {"batch_size": eval_batch_size, "precision": precision, "pool": cfg.mepd_pool}
    enc = encode_sft(suspect.tokenizer, suspect_rows, max_length=train_cfg.max_length,
                     max_response_tokens=max_response_tokens)
    scores, match = mepd_scores(suspect, dmm, enc, **kw)
    # what a clean row scores: the DMM's own rows with their true responses (>= gamma is wanted)
    own = encode_sft(suspect.tokenizer, dmm_rows, max_length=train_cfg.max_length,
                     max_response_tokens=max_response_tokens)
    clean, _ = mepd_scores(suspect, dmm, own, **kw)
    del dmm
    info |= {"dmm_clean_mepd": round(float(clean.mean()), 5),
             "dmm_clean_above_gamma": round(float((clean >= cfg.gamma).mean()), 4)}
    truth = suspect_rows["poisoned"] if "poisoned" in suspect_rows.column_names else None
    det = threshold(scores, match, truth, cfg.gamma, cfg.match_filter, cfg.gamma_grid, info=info, key=key)
    for message in detection_warnings(float(det.flags.mean()), info["dmm_clean_above_gamma"], cfg.gamma):
        log.warning(message)
    log.info("MEPD: %d of %d rows flagged at gamma=%g (FAR %s, FRR %s)", det.n_flagged, len(scores), cfg.gamma,
             det.far, det.frr)
    return det

