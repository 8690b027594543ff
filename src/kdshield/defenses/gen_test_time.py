"""Test-time generative baselines: ONION on the prompt, and CleanGen-style guarded decoding.

    from kdshield.defenses.gen_test_time import CleanGenConfig, gen_cleangen_defend
    res = gen_cleangen_defend("runs/p/model", data, CleanGenConfig(veto_ratio=20), base="smollm2-135m",
                              peft_train=TrainConfig(max_length=192, batch_size=8),
                              adapter=AdapterConfig(kind="lora"), output_dir="runs/cleangen",
                              max_response_tokens=48)
    m = evaluate_generator(res.model, data, attack, decode=res.decode)      # m["guard"]: vetoes
    res = gen_onion_defend(..., GenOnionConfig(threshold=0), ...)
    m = evaluate_generator(res.model, data, attack, prompt_filter=res.prompt_filter)

Both run plain PEFT of the suspect on the clean train split (the shared adapter and training
settings, as the victim would; ``gen_baselines.plain_peft``) and defend at test time only, through
the hooks of ``generation.evaluate.evaluate_generator``; the signature and result are those of
``gen_baselines`` (``GenBaselineResult``).

ONION (Qi et al. 2021, ``GenOnionConfig``): the result's ``prompt_filter`` is an
``onion.OnionFilter`` over a clean causal LM (``lm``; none: the clean base generator, whose
``model`` the filter scores with directly). For each prompt's user text (the input, else the
instruction; never the template, system text or history) it removes the words whose deletion
lowers the LM's perplexity by more than ``threshold``. ``max_length`` LM tokens of a text are
scored: words past them never score above 0 (a trigger there is not found), and each text costs
about its words x its tokens / 2 LM tokens, so long documents (bbc-lead bodies, ~300 words) are
slow on a CPU; ``filter.stats`` counts texts and removed words. The threshold is fixed (no dev
search: that would decode the dev split once per candidate).

CleanGen-style decoding (Li et al. 2024, ``CleanGenConfig``): ``CleanGenGuard`` is a decoding
guard (``generation.decode.DecodeGuard``). At each greedy step the suspect's top token ``x`` is
vetoed when ``p_suspect(x) / p_reference(x) > veto_ratio`` (CleanGen's suspicion score; log space,
fp32, with a 1e-4 margin for float noise), and the reference's own top token is emitted instead; both models then read the emitted
token (one KV cache each). CleanGen checks ``k`` forecast tokens per reference call and drops
those after a veto; under greedy decoding that gives the output of checking every token, which is
what is done here (the cost: one reference step per token). The reference is the clean base
(``reference``: any causal LM of the suspect's vocabulary, e.g. a cached W2S teacher directory),
fully SFT-ed on the clean train split with ``reference_sft`` (``gen_baselines.clean_sft_generator``,
cached under ``reference_cache``, default ``output_dir/reference``: the merge baseline's clean model
for the same settings). A reference of another vocabulary is a ConfigError. A reference equal to the
suspect never vetoes (the ratio is 1); ``veto_ratio`` must be >= 1. The defaults are untuned.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.data.sft import SFTData
from kdshield.defenses.base import Timer
from kdshield.defenses.gen_baselines import (
    GenBaselineResult,
    _dev_nll,
    clean_sft_generator,
    clean_sft_train_config,
    load_editable,
    load_suspect_for_peft,
    plain_peft,
)
from kdshield.defenses.onion import OnionConfig, OnionFilter
from kdshield.errors import ConfigError
from kdshield.generation.decode import _Runner
from kdshield.generation.prompt import pad_sequences
from kdshield.models.adapters import AdapterConfig
from kdshield.models.generator import Generator, load_generator
from kdshield.models.loading import LoadOptions
from kdshield.training.loop import TrainConfig

log = logging.getLogger(__name__)

# log-ratio margin: two runs of one model differ by ~1e-7 (kernel choice), which must not veto at ratio 1
VETO_TOLERANCE = 1e-4


# --- ONION on the prompt --------------------------------------------------------------------------
@dataclass
class GenOnionConfig:
    """ONION's word filter on each prompt's user text (plain PEFT otherwise)."""

    lm: str | None = cfg_field(None, help="Causal LM that scores perplexity (builtin, directory or hub id; none: "
                                          "the clean base model).")
    threshold: float = cfg_field(0.0, help="Remove words whose suspicion score (ppl(x) - ppl(x without the word)) "
                                           "is above this (ONION's t_s; 0: any word whose removal makes the text "
                                           "more fluent).")
    max_length: int = cfg_field(128, help="LM tokens scored per text (words past them are never removed).")
    prefix: str = cfg_field("", help="Context prepended and never scored, e.g. '<|endoftext|>' so that the first "
                                     "word is scored too.")
    batch_tokens: int = cfg_field(4096, help="LM tokens per forward pass.")
    pack_tokens: int = cfg_field(512, help="Longest packed row (a text plus suffixes of its variants).")
    precision: str = cfg_field("auto", help="auto = bf16 autocast where supported, else fp32.",
                               choices=["auto", "bf16", "fp32"])

    def __post_init__(self):
        check_range("onion.max_length", self.max_length, 2, 100_000)
        check_range("onion.batch_tokens", self.batch_tokens, 1, 10_000_000)
        check_range("onion.pack_tokens", self.pack_tokens, 1, 1_000_000)
        check_choice("onion.precision", self.precision, ["auto", "bf16", "fp32"])

    def onion_config(self) -> OnionConfig:
        return OnionConfig(threshold=self.threshold, max_length=self.max_length, prefix=self.prefix,
                           batch_tokens=self.batch_tokens, pack_tokens=self.pack_tokens, precision=self.precision)


def onion_filter(lm: Generator, cfg: GenOnionConfig = GenOnionConfig()) -> OnionFilter:
    """An ONION filter scoring with ``lm``'s causal LM (no adapter) and tokenizer."""
    if lm.adapter_spec is not None:
        raise ConfigError("onion.lm: the ONION language model must be a plain causal LM, not an adapter; merge it")
    return OnionFilter(lm.model, lm.tokenizer, cfg.onion_config())


def gen_onion_defend(suspect: str | Path, data: SFTData, cfg: GenOnionConfig, *, base: str, peft_train: TrainConfig,
                     adapter: AdapterConfig, output_dir: str | Path, max_response_tokens: int | None = None,
                     eval_batch_size: int = 16, resume: bool = True,
                     options: LoadOptions = LoadOptions()) -> GenBaselineResult:
    """Plain PEFT of ``suspect``; the result's ``prompt_filter`` is ONION over ``cfg.lm or base``."""
    output_dir = Path(output_dir)
    with Timer() as timer:
        ref = str(cfg.lm or base)
        # first: a missing LM fails before any training; it scores in fp32 (bf16 autocast per precision)
        lm = load_editable(ref, dataclasses.replace(options, quantize="none"), "onion")
        lm.model.to("cuda" if torch.cuda.is_available() else "cpu")
        onion = onion_filter(lm, cfg)
        gen = load_suspect_for_peft(suspect, output_dir, options, "onion")
        gen, result = plain_peft(gen, data, peft_train=peft_train, adapter=adapter, output_dir=output_dir,
                                 max_response_tokens=max_response_tokens, eval_batch_size=eval_batch_size,
                                 resume=resume, options=options, desc=f"{adapter.kind} sft (onion)",
                                 run_settings={"suspect": str(suspect)})
    # the same dict object: the filter keeps counting while the evaluation applies it
    logs = {"wall_s": round(timer.s, 1), "lm": ref, "threshold": cfg.threshold, "onion": onion.stats,
            "dev_nll": _dev_nll(result)}
    return GenBaselineResult(model=gen, train=result, logs=logs, prompt_filter=onion)


# --- CleanGen-style decoding ----------------------------------------------------------------------
@dataclass
class CleanGenConfig:
    """A clean reference model vetoes the tokens the suspect over-predicts (plain PEFT otherwise)."""

    reference: str | None = cfg_field(None, help="Reference causal LM with the suspect's vocabulary (builtin, "
                                                 "directory or hub id; none: the clean base model).")
    reference_sft: bool = cfg_field(False, help="Fully SFT the reference on the clean train split first (cached).")
    veto_ratio: float = cfg_field(20.0, help="CleanGen's alpha: the suspect's top token is replaced by the "
                                             "reference's top token when p_suspect / p_reference of it exceeds "
                                             "this (>= 1; 1 vetoes every token the reference finds less likely).")
    reference_epochs: int | None = cfg_field(None, help="Epochs of the reference's SFT (none: the shared epochs).")
    reference_lr: float | None = cfg_field(None, help="Learning rate of the reference's SFT (none: the full "
                                                      "fine-tuning rate, 2e-5).")

    def __post_init__(self):
        check_range("cleangen.veto_ratio", self.veto_ratio, 1, None)
        if self.reference_epochs is not None:
            check_range("cleangen.reference_epochs", self.reference_epochs, 1, 1000)
        if self.reference_lr is not None:
            check_range("cleangen.reference_lr", self.reference_lr, 0, 1, lo_open=True)


class CleanGenGuard:
    """The decoding guard (``DecodeGuard``) of CleanGen: see the module doc. ``counts`` per decode
    call: ``checked`` (tokens of unfinished rows) and ``vetoed``."""

    def __init__(self, reference: Generator, veto_ratio: float = 20.0):
        check_range("cleangen.veto_ratio", veto_ratio, 1, None)
        self.reference = reference
        self.reference.eval().requires_grad_(False)  # the reference only scores, it is never trained
        self.log_ratio = math.log(veto_ratio)
        self._checked: set[int] = set()

    def prepare(self, gen) -> None:
        """A ConfigError for a suspect of another vocabulary; the reference joins its device."""
        from kdshield.defenses.w2s_generation import vocabulary_mismatch

        if id(gen) not in self._checked:
            mismatch = vocabulary_mismatch(self.reference, gen)
            if mismatch:
                raise ConfigError(f"cleangen.reference {self.reference.source or '?'}: a reference must share the "
                                  f"suspect's vocabulary, and {mismatch}")
            self._checked.add(id(gen))
        device = next(gen.parameters()).device
        if next(self.reference.parameters()).device != device:
            self.reference.to(device)
        self.reference.eval()

    def begin(self, prompts: list[list[int]], pad_id: int) -> _CleanGenStep:
        return _CleanGenStep(_Runner(self.reference.model), prompts, pad_id, self.log_ratio)


class _CleanGenStep:
    """One batch: the reference's KV cache, its next-token log-probs, the counts."""

    def __init__(self, run: _Runner, prompts: list[list[int]], pad_id: int, log_ratio: float):
        self.run, self.log_ratio = run, log_ratio
        ids = pad_sequences(prompts, pad_id, "left").to(run.device)
        mask = pad_sequences([[1] * len(p) for p in prompts], 0, "left").to(run.device)
        self.cache = run.new_cache()
        with torch.inference_mode():
            logits, self.mask, positions = run(ids, mask, cache=self.cache, keep=1)
        self.last = positions[:, -1:]
        self.logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        self.counts = {"checked": 0, "vetoed": 0}

    def pick(self, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        s_logp = torch.log_softmax(logits.float(), dim=-1)
        top = s_logp.argmax(dim=-1)
        score = s_logp.gather(1, top[:, None])[:, 0] - self.logp.gather(1, top[:, None])[:, 0]
        veto = (score > self.log_ratio + VETO_TOLERANCE) & ~done
        self.counts["checked"] += int((~done).sum())
        self.counts["vetoed"] += int(veto.sum())
        return torch.where(veto, self.logp.argmax(dim=-1), top)

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.last = self.last + 1
        logits, _, _ = self.run(tokens[:, None].to(self.run.device), self.mask, cache=self.cache, positions=self.last)
        self.logp = torch.log_softmax(logits[:, -1].float(), dim=-1)


def gen_cleangen_defend(suspect: str | Path, data: SFTData, cfg: CleanGenConfig, *, base: str,
                        peft_train: TrainConfig, adapter: AdapterConfig, output_dir: str | Path,
                        max_response_tokens: int | None = None, eval_batch_size: int = 16, resume: bool = True,
                        options: LoadOptions = LoadOptions(), reference_cache: Path | None = None,
                        ) -> GenBaselineResult:
    """Plain PEFT of ``suspect``; the result's ``decode`` is a ``CleanGenGuard`` over the reference."""
    output_dir = Path(output_dir)
    with Timer() as timer:
        ref, card = str(cfg.reference or base), None
        if cfg.reference_sft:
            train_cfg = clean_sft_train_config(peft_train, cfg.reference_epochs, cfg.reference_lr)
            path, card = clean_sft_generator(ref, data, train_cfg, cache_root=reference_cache or output_dir / "reference",
                                             max_response_tokens=max_response_tokens, eval_batch_size=eval_batch_size,
                                             options=options, desc="cleangen: clean sft of the reference")
            ref = str(path)
        gen = load_suspect_for_peft(suspect, output_dir, options, "cleangen")
        reference = load_generator(ref, options=options)
        guard = CleanGenGuard(reference, cfg.veto_ratio)
        guard.prepare(gen)  # a reference of another vocabulary fails before any training
        gen, result = plain_peft(gen, data, peft_train=peft_train, adapter=adapter, output_dir=output_dir,
                                 max_response_tokens=max_response_tokens, eval_batch_size=eval_batch_size,
                                 resume=resume, options=options, desc=f"{adapter.kind} sft (cleangen)",
                                 run_settings={"suspect": str(suspect)})
    logs = {"wall_s": round(timer.s, 1), "reference": ref, "veto_ratio": cfg.veto_ratio,
            "reference_sft": {k: card[k] for k in ("path", "wall_s", "dev_nll")} if card else None,
            "config": config_to_dict(cfg), "dev_nll": _dev_nll(result)}
    return GenBaselineResult(model=gen, train=result, logs=logs, decode=guard)
