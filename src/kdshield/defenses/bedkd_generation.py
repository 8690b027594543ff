"""BeDKD on tokens: find the poisoned rows of the suspect's SFT data with a directional mapping
module (DMM), then adversarial distillation from the frozen suspect into its PEFT adapter.

    from kdshield.defenses.bedkd_generation import GenBeDKDConfig, gen_bedkd_defend
    proxy = poisoned_sft_proxy(data, attack)             # the suspect set: the attacker's SFT rows
    res = gen_bedkd_defend("runs/p/model", data, GenBeDKDConfig(), suspect_rows=proxy, base="smollm2-135m",
                           peft_train=TrainConfig(max_length=128, batch_size=8, lr=1e-3),
                           adapter=AdapterConfig(kind="lora"), output_dir="runs/bedkd", max_response_tokens=48)
    res.detection.summary()      # {"far": .., "frr": .., "flagged": n, "gamma": 0.1, ...}
    res.model.save("runs/bedkd/adapter")

It needs the suspect training set (``suspect_rows``, SFT rows; a ``poisoned`` column, when there,
gives FAR/FRR), the defender's clean ``train`` split (DMM and trust rows) and a clean ``dev`` split
(rollback and selection). Every choice below is ours (neither paper's code covers generation);
**the defaults are untuned**: they are the classification BeDKD's where a setting transfers.
Measured on the embedded SmolLM2 on two cells (``benchmarks/RESULTS.md``: bbc-lead InSent -> fixed,
and rotten-tomatoes-instruct clean-label BadNet -> "negative", the latter only once the DMM shifted
label answers instead of deranging them); not at scale.

1. **DMM** and 2. **MEPD** (``kdshield.defenses.gen_mepd``, whose doc says how): a copy of the
   suspect trained on clean rows with remapped responses (deranged or shifted to the next
   answer: ``dmm_responses``; ``n_dmm``, ``dmm_*``), then per suspect row the mean
   per-token total variation between the two models' next-token softmaxes; a row is flagged when
   it is **below** ``gamma`` (and ``match_filter``, off by default). FAR/FRR and the curve over
   ``gamma_grid`` when a ``poisoned`` column is there. The detection is written to
   ``output_dir/detection`` (``gen_mepd_scores.jsonl``, ``gen_mepd_detection.json``,
   ``gen_mepd_far_frr.png``) and keyed by its settings: a resumed run reuses the scores and
   re-thresholds them at the current ``gamma``.
3. **Adversarial KD.** Teacher = the frozen suspect (eval(), requires_grad_(False), outputs under
   no_grad, its top-k bins on the trust rows cached once); student = the suspect + the shared
   adapter (``lora_r`` / ``lora_alpha`` may replace the rank). A cycle is one epoch on ``n_trust``
   clean train rows minimising ``alpha * CE + (1 - alpha) * T^2 * KL_topk`` (the DMM rows are the
   start of the same seeded draw, so they lie inside the trust rows), then one epoch on the flagged
   rows (lowest MEPD first, at most ``max_poisoned``) *ascending* their response CE, bounded per
   token: ``punish_loss=hinge`` maximises ``min(nll, punish_bound)`` (no gradient once a token's NLL
   passes the bound), ``unlikelihood`` minimises ``-log(1 - p(target))`` on tokens still under the
   bound. Two AdamW optimizers (descent and ascent kept apart), gradients clipped at
   ``--train.max-grad-norm``, bf16 autocast where ``--train.precision`` resolves to it.
4. **Rollback, selection, early stop** on the clean dev split's response NLL (token mean, nats):
   a cycle whose dev NLL rises more than ``rollback_tolerance`` above the kept state's is undone
   (kept state restored, optimizer moments reset, punish lr times ``punish_backoff``). States
   within ``select_tolerance`` of the suspect's dev NLL tie, and the tie goes to the lowest
   residual (then the lower dev NLL, then the later cycle). The **residual** is the share of
   punished rows whose first ``residual_tokens`` response tokens (0 = all of them, EOS included)
   are all still the student's teacher-forced argmax -- exactly the rows whose greedy decode still
   begins with those target tokens. The loop stops after a kept cycle with residual at most
   ``stop_residual``. Cycles checkpoint to ``output_dir/akd`` and a resumed run continues after
   the last finished one (optimizer moments restart), under the same settings only (under
   other ones, e.g. another ``gamma`` that flags other rows, the cycles start again).

Measured on the toy only (tests/test_gen_bedkd.py: a two-layer Llama, 80 proxy rows, 24 of them
"cf" -> "a great game", 5-token responses): with the defaults poisoned rows score ~0.001 and clean
ones 0.00-0.06, so the ranking separates (AUC > 0.9) but ``gamma`` 0.1 flags every row (the DMM
warns); ``mepd_pool=max, dmm_alpha=0.7, dmm_lr=1e-2`` gave FAR 0.29 / FRR 0 at gamma 0.1, and the
cycles then took the triggered ASR from 1.0 to 0.0 (clean decodes unchanged, dev NLL lower) in 6
cycles. Choose ``gamma`` from the FAR/FRR curve of a run whose truth is known, never on test ASR.

Untested at scale: whether deranged responses leave a SmolLM2 backdoor in the DMM while moving
clean rows past ``gamma`` (the toy tests show it on a two-layer model only), where ``gamma`` sits
on TV for long summaries (many tokens are fixed by their prefix, which lowers every row's score),
whether ascent on a refusal phrase erases ordinary refusals, and what ``append`` targets do (their
punished responses start with a clean answer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import save_file
from tqdm.auto import tqdm

from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.data.batching import Encoded, collate, epoch_batches
from kdshield.data.core import rows_digest
from kdshield.data.sft import SFTData
from kdshield.defenses.base import Timer
from kdshield.defenses.gen_mepd import (  # noqa: F401 (the detection's public names: re-exported)
    DETECTION_DIR,
    DETECTION_KEYS,
    DMM_ADAPTERS,
    DMM_RESPONSES,
    MEPD_POOLS,
    PLOT_FILE,
    SCORES_FILE,
    SUMMARY_FILE,
    GenDetection,
    _device_batches,
    _lean,
    deranged_rows,
    derangement,
    distill_terms,
    gen_mepd,
    mepd_scores,
    read_gen_detection,
    remapped_rows,
    response_ordinals,
    shifted_rows,
    threshold,
    total_variation,
    train_dmm,
    write_gen_detection,
)
from kdshield.defenses.w2s_generation import compute_teacher_outputs, encoded_digest
from kdshield.detection import GAMMA_GRID
from kdshield.errors import ConfigError, DataError
from kdshield.inference import autocast_for, resolve_precision
from kdshield.models.adapters import AdapterConfig
from kdshield.models.generator import (
    Generator,
    GeneratorOutput,
    attach_generator_adapter,
    load_generator,
)
from kdshield.models.loading import LoadOptions
from kdshield.results import settings_hash
from kdshield.training.loop import (
    TrainConfig,
    load_trainable,
    read_json_state,
    read_weights,
    trainable_state,
    write_dir_atomically,
)
from kdshield.training.optim import adamw
from kdshield.training.sft import ROW_COLUMNS, encode_sft, response_nll

log = logging.getLogger(__name__)

PUNISH_LOSSES = ("hinge", "unlikelihood")


@dataclass
class GenBeDKDConfig:
    """BeDKD for causal-LM SFT (see the module doc). **Untuned**: the classification BeDKD's
    defaults where they transfer (alpha 0.3, T 2.5 / 1.5, 30 cycles, stop at residual 0.05, hinge
    bound 2, punish backoff 0.5, at most 64 punished rows, 320 trust rows); gamma 0.1 because the
    classification MEPD of two classes is exactly this TV; tolerances in nats of dev NLL."""

    # detection
    n_dmm: int = cfg_field(160, help="Clean train rows (responses remapped) that train the DMM.")
    dmm_alpha: float = cfg_field(0.3, help="Weight a of CE in a*CE + (1-a)*T^2*KL_topk for the DMM.")
    dmm_temperature: float = cfg_field(1.5, help="Distillation temperature of the DMM.")
    dmm_lr: float = cfg_field(1e-3, help="DMM learning rate (AdamW, constant; 1e-3 for LoRA, lower it for full).")
    dmm_epochs: int = cfg_field(10, help="DMM epochs over its remapped rows.")
    dmm_batch_size: int = cfg_field(8, help="DMM batch size.")
    dmm_responses: str = cfg_field("auto", help="What the DMM learns to answer: derange = another row's response "
                                                "(free text), shift = the next distinct response (label words: "
                                                "c -> c + 1 as in classification), auto = shift when the "
                                                "responses repeat, else derange.",
                                   choices=list(DMM_RESPONSES))
    dmm_adapter: str = cfg_field("lora", help="lora = the DMM trains a LoRA on a copy of the suspect (the shared "
                                              "LoRA settings when --adapter.kind is lora); full = every weight.",
                                 choices=list(DMM_ADAPTERS))
    top_k: int = cfg_field(32, help="Suspect tokens kept per response position for the DMM's and the trust "
                                    "phase's KL (the rest of the mass is one tail bin).")
    gamma: float = cfg_field(0.1, help="A row whose MEPD (mean per-token total variation, in [0, 1]) is below "
                                       "gamma is flagged as poisoned.")
    mepd_pool: str = cfg_field("mean", help="A row's MEPD: the mean of its response tokens' TV (the proposal), or "
                                            "max (the token that moved most: short responses whose other "
                                            "tokens follow from their prefix dilute the mean).",
                               choices=list(MEPD_POOLS))
    gamma_grid: list[float] = cfg_field(GAMMA_GRID, help="Thresholds of the FAR/FRR curve (comma list).")
    match_filter: float = cfg_field(0.0, help="Flag only rows whose response tokens are the suspect's "
                                              "teacher-forced argmax at least this often (0 = off).")
    # adversarial distillation
    n_trust: int = cfg_field(320, help="Clean train rows of trust distillation (the DMM rows are among them).")
    max_poisoned: int = cfg_field(64, help="At most this many flagged rows (lowest MEPD first) are punished "
                                           "(0 = all flagged).")
    alpha: float = cfg_field(0.3, help="Weight a of CE in the trust objective a*CE + (1-a)*T^2*KL_topk.")
    temperature: float = cfg_field(2.5, help="Distillation temperature T of the trust phase.")
    cycles: int = cfg_field(30, help="Most trust + punish cycles (official 50); see stop_residual.")
    stop_residual: float = cfg_field(0.05, help="Stop after a kept cycle (within select_tolerance of the suspect's "
                                                "dev NLL) whose residual is at most this (0 = run every cycle).")
    residual_tokens: int = cfg_field(4, help="A punished row is residual while its first N response tokens are all "
                                             "the student's teacher-forced argmax (0 = every response token).")
    batch_size: int | None = cfg_field(None, help="Batch size of the trust and punish epochs (none: the shared one).")
    lr: float | None = cfg_field(None, help="Trust learning rate (AdamW; none: the shared PEFT lr).")
    punish_lr: float | None = cfg_field(None, help="Punish learning rate (none: the trust learning rate).")
    punish_loss: str = cfg_field("hinge", help="hinge = ascend min(nll, punish_bound) per response token; "
                                               "unlikelihood = minimise -log(1 - p) on tokens below the bound.",
                                 choices=list(PUNISH_LOSSES))
    punish_bound: float = cfg_field(2.0, help="A punished token is pushed only while its NLL (nats) is below this "
                                              "(0 = unbounded; hinge only).")
    rollback_tolerance: float = cfg_field(0.1, help="Roll back when dev NLL rises more than this many nats above "
                                                    "the kept state's.")
    punish_backoff: float = cfg_field(0.5, help="The punish lr is multiplied by this at each rollback.")
    select_tolerance: float = cfg_field(0.05, help="States whose dev NLL is at most this many nats above the "
                                                   "suspect's tie; the tie goes to the lowest residual.")
    max_dev: int = cfg_field(200, help="Dev rows scored after each cycle (seeded subset; 0 = all).")
    lora_r: int | None = cfg_field(None, help="LoRA rank of the student's adapter (none: the shared rank).")
    lora_alpha: float | None = cfg_field(None, help="LoRA alpha of the student's adapter (none: the shared one).")
    seed: int | None = cfg_field(None, help="Seed of the row draws, the derangement and the cycles (none: the "
                                            "shared seed).")

    def __post_init__(self):
        check_range("bedkd.n_dmm", self.n_dmm, 2, 1_000_000)
        for name in ("dmm_alpha", "alpha"):
            check_range(f"bedkd.{name}", getattr(self, name), 0, 1)
        for name in ("dmm_temperature", "temperature"):
            check_range(f"bedkd.{name}", getattr(self, name), 0, 100, lo_open=True)
        check_range("bedkd.dmm_lr", self.dmm_lr, 0, 1, lo_open=True)
        check_range("bedkd.dmm_epochs", self.dmm_epochs, 1, 10_000)
        check_range("bedkd.dmm_batch_size", self.dmm_batch_size, 1, 65536)
        check_choice("bedkd.dmm_adapter", self.dmm_adapter, DMM_ADAPTERS)
        check_choice("bedkd.dmm_responses", self.dmm_responses, DMM_RESPONSES)
        check_range("bedkd.top_k", self.top_k, 1, 1_000_000)
        check_choice("bedkd.mepd_pool", self.mepd_pool, MEPD_POOLS)
        check_range("bedkd.gamma", self.gamma, 0, 1, lo_open=True)
        if not self.gamma_grid:
            raise ConfigError("bedkd.gamma_grid is empty: give at least one threshold in [0, 1]")
        for g in self.gamma_grid:
            check_range("bedkd.gamma_grid value", g, 0, 1)
        check_range("bedkd.match_filter", self.match_filter, 0, 1)
        check_range("bedkd.n_trust", self.n_trust, 1, 1_000_000)
        check_range("bedkd.max_poisoned", self.max_poisoned, 0, None)
        check_range("bedkd.cycles", self.cycles, 1, 10_000)
        check_range("bedkd.stop_residual", self.stop_residual, 0, 1)
        check_range("bedkd.residual_tokens", self.residual_tokens, 0, 100_000)
        if self.batch_size is not None:
            check_range("bedkd.batch_size", self.batch_size, 1, 65536)
        for name in ("lr", "punish_lr"):
            if getattr(self, name) is not None:
                check_range(f"bedkd.{name}", getattr(self, name), 0, 1, lo_open=True)
        check_choice("bedkd.punish_loss", self.punish_loss, PUNISH_LOSSES)
        check_range("bedkd.punish_bound", self.punish_bound, 0, 1e4)
        if self.punish_loss == "hinge" and self.punish_bound == 0:
            log.warning("bedkd.punish_bound=0: the hinge is off and the ascent is unbounded")
        check_range("bedkd.rollback_tolerance", self.rollback_tolerance, 0, 1e4)
        check_range("bedkd.punish_backoff", self.punish_backoff, 0, 1, lo_open=True)
        check_range("bedkd.select_tolerance", self.select_tolerance, 0, 1e4)
        check_range("bedkd.max_dev", self.max_dev, 0, None)
        if self.lora_r is not None:
            check_range("bedkd.lora_r", self.lora_r, 1, 65536)
        if self.lora_alpha is not None:
            check_range("bedkd.lora_alpha", self.lora_alpha, 0, 1e6, lo_open=True)
        if self.seed is not None:
            check_range("bedkd.seed", self.seed, 0, 2**32 - 1)


# --- pure pieces ------------------------------------------------------------------------------------
def punish_token_loss(logits: torch.Tensor, targets: torch.Tensor, bound: float, kind: str = "hinge",
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The punish term over response tokens (to be *minimised*), their NLL and the share of tokens
    still under ``bound`` (the ones that get a gradient). ``hinge``: ``-mean(min(nll, bound))``;
    ``unlikelihood``: ``mean(-log(1 - p) * [nll < bound])``. Both are bounded: no gradient flows
    into a token past the bound."""
    nll = F.cross_entropy(logits.float(), targets, reduction="none")
    active = nll.detach() < bound if bound > 0 else torch.ones_like(nll, dtype=torch.bool)
    if kind == "hinge":
        loss = -torch.where(active, nll, torch.full_like(nll, bound)).mean()  # min(nll, bound), no grad at it
    elif kind == "unlikelihood":
        p = torch.exp(-nll).clamp(max=1 - 1e-6)
        loss = (-torch.log1p(-p) * active).mean()
    else:
        raise ValueError(f"punish loss {kind!r} is not one of {', '.join(PUNISH_LOSSES)}")
    return loss, nll.detach().mean(), active.float().mean()


def _prefix_hits(out: GeneratorOutput, first_tokens: int) -> torch.Tensor:
    """Per batch row: all of its first ``first_tokens`` (0 = all) response tokens are the argmax."""
    miss = out.response_logits.argmax(dim=-1) != out.targets
    if first_tokens:
        miss &= response_ordinals(out) < first_tokens
    misses = torch.zeros(out.batch_size, device=miss.device).index_add(0, out.rows, miss.float())
    return misses == 0


@torch.no_grad()
def response_residual(gen: Generator, encoded: Encoded | None, *, first_tokens: int, batch_size: int = 16,
                      precision: str = "fp32") -> float | None:
    """Share of rows whose first ``first_tokens`` response tokens (0 = all) are all ``gen``'s
    teacher-forced argmax: the rows whose greedy decode still starts with them. None: no rows."""
    if encoded is None or not len(encoded):
        return None
    was_training = gen.training
    gen.eval()
    device = next(gen.parameters()).device
    hits = 0
    for _, batch in _device_batches(encoded, batch_size, device):
        with autocast_for(precision, device):
            hits += int(_prefix_hits(_lean(gen, batch), first_tokens).sum())
    gen.train(was_training)
    return hits / len(encoded)


# --- punished rows ------------------------------------------------------------------------------------
def select_punish_rows(rows: Dataset, det: GenDetection, max_poisoned: int) -> Dataset:
    """Flagged rows, lowest MEPD (most confident) first, at most ``max_poisoned`` (0 = all)."""
    idx = det.flagged_indices
    idx = idx[np.argsort(det.scores[idx], kind="stable")]
    if max_poisoned:
        idx = idx[:max_poisoned]
    return rows.select([int(i) for i in idx])


# --- adversarial distillation -------------------------------------------------------------------------
class GenAdversarialKD:
    """The cycle loop on tokens: trust epoch, punish epoch, dev NLL, rollback, selection."""

    def __init__(self, student: Generator, trust: Encoded, punish: Encoded | None, dev: Encoded,
                 cfg: GenBeDKDConfig, *, lr: float, batch_size: int, seed: int, precision: str,
                 max_grad_norm: float, eval_batch_size: int = 16, output_dir: Path | None = None):
        self.student, self.cfg, self.trust, self.punish, self.dev = student, cfg, trust, punish, dev
        self.lr, self.punish_lr = lr, cfg.punish_lr or lr
        self.batch_size, self.seed, self.max_grad_norm = batch_size, seed, max_grad_norm
        self.precision, self.eval_batch_size = resolve_precision(precision), eval_batch_size
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.device = next(student.parameters()).device
        self.ckpt_dir = output_dir / "akd" if output_dir is not None else None
        self._reset_optimizers()
        self.history: list[dict] = []
        self.kept: dict = {}
        self.start: dict = {}
        self.kept_state: dict[str, torch.Tensor] = {}
        self.start_cycle = 1
        self.steps = self.examples = 0
        self.train_s = 0.0

    def _reset_optimizers(self) -> None:
        # Adam normalises gradient size: only a separate lr (not a loss weight) makes the ascent gentler
        self.opt_trust = adamw(self.params, lr=self.lr)
        self.opt_punish = adamw(self.params, lr=self.punish_lr)

    def _phase(self, enc: Encoded, optimizer, cycle: int, punish: bool) -> dict:
        cfg = self.cfg
        # seeded by (seed, cycle): a resumed run sees the batches an uninterrupted one would
        batches = epoch_batches(enc.lengths(), self.batch_size, self.seed + (7919 if punish else 0), cycle)
        names = ("nll", "active") if punish else ("loss", "ce", "kd")
        sums, n = dict.fromkeys(names, 0.0), 0
        self.student.train()
        with Timer() as t:
            for idx in batches:
                batch = {k: v.to(self.device) for k, v in collate(enc, idx).items()}
                with autocast_for(self.precision, self.device):
                    out = _lean(self.student, batch)
                    if punish:
                        loss, nll, active = punish_token_loss(out.response_logits, out.targets, cfg.punish_bound,
                                                              cfg.punish_loss)
                        terms = {"nll": nll, "active": active}
                    else:
                        loss, ce, kd = distill_terms(out, batch, cfg.alpha, cfg.temperature)
                        terms = {"loss": loss.detach(), "ce": ce.detach(), "kd": kd.detach()}
                if not torch.isfinite(loss):
                    log.warning("non-finite %s loss at cycle %d: batch skipped", "punish" if punish else "trust", cycle)
                    optimizer.zero_grad(set_to_none=True)
                    continue
                loss.backward()
                if self.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for k, v in terms.items():
                    sums[k] += float(v) * len(idx)
                n += len(idx)
                self.steps += 1
        self.examples += n
        self.train_s += t.s
        prefix = "punish" if punish else "trust"
        return {f"{prefix}_{k}": round(v / max(n, 1), 5) for k, v in sums.items()}

    def evaluate(self) -> dict:
        dev_nll = response_nll(self.student, self.dev, batch_size=self.eval_batch_size)["nll"]
        residual = response_residual(self.student, self.punish, first_tokens=self.cfg.residual_tokens,
                                     batch_size=self.eval_batch_size, precision=self.precision)
        return {"dev_nll": round(dev_nll, 5), "residual": residual}

    def _better(self, new: dict) -> bool:
        """Does the state scored ``new`` replace the kept one? (module doc: rollback, selection)"""
        ceiling = self.start["dev_nll"] + self.cfg.select_tolerance
        old = self.kept
        new_ok, old_ok = new["dev_nll"] <= ceiling, old["dev_nll"] <= ceiling
        if new_ok != old_ok:
            return new_ok
        if not new_ok:  # neither keeps the clean behaviour: the lower dev NLL
            return new["dev_nll"] < old["dev_nll"]
        if new["residual"] is not None and old["residual"] is not None and new["residual"] != old["residual"]:
            return new["residual"] < old["residual"]
        return new["dev_nll"] <= old["dev_nll"]  # a full tie goes to the later cycle

    def _done(self) -> bool:
        kept, cfg = self.kept, self.cfg
        return (cfg.stop_residual > 0 and kept["cycle"] > 0 and kept["residual"] is not None
                and kept["residual"] <= cfg.stop_residual
                and kept["dev_nll"] <= self.start["dev_nll"] + cfg.select_tolerance)

    def run(self, resume: bool = False) -> list[dict]:
        cfg = self.cfg
        if not (resume and self._load_checkpoint()):
            self.kept = dict(self.evaluate(), cycle=0)
            self.start = dict(self.kept)
            self.kept_state = trainable_state(self.student)
            self.history = [dict(self.kept, kept=True)]
            log.info("bedkd start: dev NLL %.4f, residual %s", self.kept["dev_nll"], self.kept["residual"])
        bar = tqdm(range(self.start_cycle, cfg.cycles + 1), desc="bedkd cycles", initial=self.start_cycle - 1,
                   total=cfg.cycles, mininterval=5)
        for cycle in bar:
            if self._done():
                break
            row = {"cycle": cycle, "punish_lr": self.punish_lr}
            row.update(self._phase(self.trust, self.opt_trust, cycle, punish=False))
            if self.punish is not None:
                row.update(self._phase(self.punish, self.opt_punish, cycle, punish=True))
            row.update(self.evaluate())
            row["rolled_back"] = row["dev_nll"] > self.kept["dev_nll"] + cfg.rollback_tolerance
            row["kept"] = False
            if row["rolled_back"]:
                load_trainable(self.student, self.kept_state)
                self.punish_lr *= cfg.punish_backoff
                self._reset_optimizers()
                log.warning("cycle %d: dev NLL %.4f rose above the kept %.4f (cycle %d) by more than %g: rolled "
                            "back, punish lr -> %.3g", cycle, row["dev_nll"], self.kept["dev_nll"],
                            self.kept["cycle"], cfg.rollback_tolerance, self.punish_lr)
            elif self._better(row):
                self.kept = {"dev_nll": row["dev_nll"], "residual": row["residual"], "cycle": cycle}
                self.kept_state = trainable_state(self.student)
                row["kept"] = True
            self.history.append(row)
            bar.set_postfix(dev=f"{row['dev_nll']:.3f}", res=row["residual"], refresh=False)
            log.info("cycle %d: %s", cycle, row)
            self._save_checkpoint(cycle)
        bar.close()
        load_trainable(self.student, self.kept_state)
        log.info("bedkd done: kept cycle %d (dev NLL %.4f, residual %s)", self.kept["cycle"], self.kept["dev_nll"],
                 self.kept["residual"])
        return self.history

    def settings(self) -> dict:
        """What this loop is (a checkpoint resumes only under the same); ``cycles`` is left out, so a
        finished run may be extended."""
        config = {k: v for k, v in config_to_dict(self.cfg).items() if k != "cycles"}
        return {"config": config, "lr": self.lr, "batch_size": self.batch_size, "seed": self.seed,
                "precision": self.precision, "max_grad_norm": self.max_grad_norm,
                "trust": encoded_digest(self.trust), "dev": encoded_digest(self.dev),
                "punish": encoded_digest(self.punish) if self.punish is not None else None}

    def _save_checkpoint(self, cycle: int) -> None:
        if self.ckpt_dir is None:
            return
        state = {"cycle": cycle, "punish_lr": self.punish_lr, "kept": self.kept, "start": self.start,
                 "history": self.history, "steps": self.steps, "examples": self.examples,
                 "train_s": self.train_s, "settings": settings_hash(self.settings())}

        def write(tmp: Path) -> None:
            save_file(trainable_state(self.student), str(tmp / "current.safetensors"))
            save_file(self.kept_state, str(tmp / "kept.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state, indent=1))

        write_dir_atomically(self.ckpt_dir, write)

    def _load_checkpoint(self) -> bool:
        if self.ckpt_dir is None or not (self.ckpt_dir / "state.json").is_file():
            return False
        state = read_json_state(self.ckpt_dir / "state.json")
        if state.get("settings") != settings_hash(self.settings()):
            # e.g. another gamma flags other rows: the reused detection stands, the cycles start again
            log.warning("%s holds bedkd cycles run under other settings (punished rows, options or learning "
                        "rate): the cycles start again", self.ckpt_dir)
            return False
        load_trainable(self.student, read_weights(self.ckpt_dir / "current.safetensors"))
        self.kept_state = read_weights(self.ckpt_dir / "kept.safetensors")
        self.kept, self.history, self.punish_lr = state["kept"], state["history"], state["punish_lr"]
        self.start, self.start_cycle = state["start"], state["cycle"] + 1
        self.steps, self.examples, self.train_s = state["steps"], state["examples"], state["train_s"]
        self._reset_optimizers()
        log.info("bedkd resumed after cycle %d", state["cycle"])
        return True


# --- the defense --------------------------------------------------------------------------------------
@dataclass
class GenBeDKDTrain:
    """The cycle loop's cost, in the fields the grid reads from a ``TrainResult``."""

    trainable_params: int
    steps: int
    examples_seen: int
    train_s: float
    wall_s: float
    cycles_run: int
    kept_cycle: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GenBeDKDResult:
    model: Generator  # the student with the kept cycle's adapter
    train: GenBeDKDTrain
    kd: bool  # whether the trust phase distils (alpha < 1)
    detection: GenDetection
    logs: dict


def _place(gen: Generator) -> Generator:
    if gen.load_dtype in ("nf4", "int8"):  # bitsandbytes placed it already
        return gen
    return gen.to("cuda" if torch.cuda.is_available() else "cpu")


def _subset(ds: Dataset, n: int, seed: int) -> Dataset:
    if not n or len(ds) <= n:
        return ds
    keep = np.random.default_rng(seed).choice(len(ds), size=n, replace=False)
    return ds.select(sorted(int(i) for i in keep))


def student_adapter(cfg: GenBeDKDConfig, adapter: AdapterConfig) -> AdapterConfig:
    """The shared adapter with this defense's LoRA rank / alpha."""
    if adapter.kind != "lora":
        return adapter
    changes = {k: v for k, v in (("r", cfg.lora_r), ("lora_alpha", cfg.lora_alpha)) if v is not None}
    return dataclasses.replace(adapter, **changes)


def gen_bedkd_defend(suspect: str | Path, data: SFTData, cfg: GenBeDKDConfig, *, suspect_rows: Dataset, base: str,
                     peft_train: TrainConfig, adapter: AdapterConfig, output_dir: str | Path,
                     max_response_tokens: int | None = None, eval_batch_size: int = 16, resume: bool = True,
                     options: LoadOptions = LoadOptions()) -> GenBeDKDResult:
    """BeDKD of the suspect generator ``suspect`` (module doc). ``suspect_rows``: the SFT rows the
    suspect was trained on (``poisoned`` column optional); ``data``: the defender's clean splits
    (``train`` for the DMM and trust rows, ``dev`` for rollback and selection); ``base`` is only
    recorded (the teacher is the suspect itself); ``peft_train`` / ``adapter``: the shared PEFT
    settings (lr, batch size, length, seed, precision, clipping; the adapter's kind and rank)."""
    output_dir = Path(output_dir)
    seed = peft_train.seed if cfg.seed is None else cfg.seed
    clean, dev = data.split("train"), data.splits.get("dev")
    if dev is None or not len(dev):
        raise ConfigError(f"bedkd needs a clean dev split for rollback and selection; {data.name!r} has none")
    missing = [c for c in ("instruction", "input", "output") if c not in suspect_rows.column_names]
    if missing or not len(suspect_rows):
        raise DataError(f"suspect_rows must be SFT rows (instruction, input, output); missing {missing}, "
                        f"{len(suspect_rows)} rows")
    precision, max_length = resolve_precision(peft_train.precision), peft_train.max_length
    enc_kw = {"max_length": max_length, "max_response_tokens": max_response_tokens}
    s_adapter = student_adapter(cfg, adapter)
    d_adapter = AdapterConfig(kind="full") if cfg.dmm_adapter == "full" else (
        s_adapter if s_adapter.kind == "lora" else AdapterConfig(kind="lora"))
    with Timer() as timer:
        torch.manual_seed(seed)
        with Timer() as t_teacher:
            teacher = _place(load_generator(suspect, options=options))
            teacher.eval().requires_grad_(False)  # the frozen suspect teacher: never updated
        order = np.random.default_rng(seed).permutation(len(clean))  # the DMM rows lie inside the trust rows
        dmm_rows = clean.select(sorted(int(i) for i in order[:cfg.n_dmm]))
        trust_rows = clean.select(sorted(int(i) for i in order[:cfg.n_trust]))
        if len(dmm_rows) < cfg.n_dmm or len(trust_rows) < cfg.n_trust:
            log.warning("bedkd: the train split has %d rows (asked for %d DMM and %d trust rows)", len(clean),
                        cfg.n_dmm, cfg.n_trust)

        with Timer() as t_detect:
            det_dir = output_dir / DETECTION_DIR
            key = settings_hash({"suspect": str(suspect), "rows": rows_digest(suspect_rows, (*ROW_COLUMNS, "poisoned")),
                                 "dmm_rows": rows_digest(dmm_rows, ROW_COLUMNS), "adapter": config_to_dict(d_adapter),
                                 "dmm": {k: getattr(cfg, k) for k in DETECTION_KEYS}, "seed": seed,
                                 "precision": precision, **enc_kw})
            done = read_gen_detection(det_dir) if resume else None
            if done is not None and done[0].get("key") == key and len(done[1]) == len(suspect_rows):
                meta, rows = done
                log.info("resume: reusing the detection in %s (re-thresholded at gamma=%g)", det_dir, cfg.gamma)
                truth = suspect_rows["poisoned"] if "poisoned" in suspect_rows.column_names else None
                info = {k: v for k, v in meta["summary"].items()
                        if k.startswith("dmm_")} | {"reused": True}
                detection = threshold(np.array([r["mepd"] for r in rows]), np.array([r["match"] for r in rows]),
                                      truth, cfg.gamma, cfg.match_filter, cfg.gamma_grid, info=info, key=key)
            else:
                if done is not None:
                    log.warning("bedkd: the detection in %s was made under other settings: detecting again", det_dir)
                detection = gen_mepd(teacher, dmm_rows, suspect_rows, cfg, peft_train, d_adapter,
                                     max_response_tokens=max_response_tokens, seed=seed,
                                     eval_batch_size=eval_batch_size, key=key)
            write_gen_detection(detection, suspect_rows, det_dir, cfg)

        punish_rows = select_punish_rows(suspect_rows, detection, cfg.max_poisoned)
        if not len(punish_rows):
            log.warning("MEPD flagged no row: bedkd runs trust distillation only (no punish phase)")
        tok = teacher.tokenizer
        with Timer() as t_outputs:
            trust = encode_sft(tok, trust_rows, **enc_kw)
            bins = compute_teacher_outputs(teacher, trust, top_k=cfg.top_k, temperature=cfg.temperature,
                                           batch_size=eval_batch_size)
            trust.extras = {"t_idx": bins.indices, "t_logp": bins.log_probs, "t_len": bins.lengths}
        punish = encode_sft(tok, punish_rows, **enc_kw) if len(punish_rows) else None
        dev_enc = encode_sft(tok, _subset(dev, cfg.max_dev, seed), **enc_kw)

        with Timer() as t_student:
            s_options = options.for_full_training("the bedkd student") if s_adapter.kind == "full" else options
            student = load_generator(suspect, options=s_options)
            attach_generator_adapter(student, s_adapter)
            _place(student)
            lr = cfg.lr or peft_train.lr
            akd = GenAdversarialKD(student, trust, punish, dev_enc, cfg, lr=lr,
                                   batch_size=cfg.batch_size or peft_train.batch_size, seed=seed, precision=precision,
                                   max_grad_norm=peft_train.max_grad_norm, eval_batch_size=eval_batch_size,
                                   output_dir=output_dir)
            history = akd.run(resume=resume)
            student.eval()
    trust_rows_h = [r for r in history if "trust_ce" in r]
    terms = [{k: v for k, v in r.items() if k.startswith(("trust_", "punish_")) and k != "punish_lr"}
             for r in trust_rows_h]
    teacher_info = {"ref": str(suspect), "kind": "frozen suspect", "layers": None, "path": str(suspect),
                    "dev_nll": akd.start["dev_nll"], "trained": False,
                    "parameters": sum(p.numel() for p in teacher.parameters()), "hidden_size": teacher.hidden_size}
    logs = {"teacher": teacher_info, "teacher_s": round(t_teacher.s + t_outputs.s, 1),
            "detection_s": round(t_detect.s, 1), "student_s": round(t_student.s, 1), "wall_s": round(timer.s, 1),
            "dev_nll": akd.kept["dev_nll"], "start_dev_nll": akd.start["dev_nll"],
            "loss_terms": {"first": terms[0], "last": terms[-1]} if terms else None,
            "cycles": history, "kept_cycle": akd.kept["cycle"], "kept_residual": akd.kept["residual"],
            "start_residual": akd.start["residual"], "cycles_run": history[-1]["cycle"],
            "stopped_early": history[-1]["cycle"] < cfg.cycles,
            "rollbacks": sum(bool(r.get("rolled_back")) for r in history), "n_trust": len(trust_rows),
            "n_punish": len(punish_rows), "lr": lr, "punish_lr_final": akd.punish_lr, "base": base,
            "student_adapter": config_to_dict(s_adapter), "detection": detection.summary(),
            "detection_curve": detection.curve, "residual_tokens": cfg.residual_tokens}
    result_train = GenBeDKDTrain(trainable_params=student.trainable_parameters(), steps=akd.steps,
                                 examples_seen=akd.examples, train_s=round(akd.train_s, 2), wall_s=round(timer.s, 2),
                                 cycles_run=history[-1]["cycle"], kept_cycle=akd.kept["cycle"])
    log.info("bedkd: detection %.0f s (%d flagged, FAR %s, FRR %s), cycles %.0f s, kept cycle %d (dev NLL %.4f, "
             "residual %s)", t_detect.s, detection.n_flagged, detection.far, detection.frr, t_student.s,
             akd.kept["cycle"], akd.kept["dev_nll"], akd.kept["residual"])
    student.max_length = max_length  # what it was trained with (saved in kdshield.json; evaluate's default)
    return GenBeDKDResult(model=student, train=result_train, kd=cfg.alpha < 1, detection=detection, logs=logs)
