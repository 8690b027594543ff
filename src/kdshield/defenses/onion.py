"""ONION (Qi et al. 2021): remove the words whose deletion lowers an LM's perplexity the most.

    kdshield defend --method onion --student runs/poisoned/model --data rotten-tomatoes

For a test input of words ``w_1..w_n``, the suspicion score of ``w_i`` is
``ppl(x) - ppl(x without w_i)`` under a small causal LM (``DefenseContext.lm``, the embedded
SmolLM2 by default); words scoring above ``threshold`` are removed. A rare-word trigger such as
"mn" makes a sentence less fluent, so removing it lowers the perplexity a lot. ONION is
input-level: the suspect model gets plain PEFT (the papers apply ONION to the PEFT-adapted victim)
and the filter is returned as ``input_transform`` for every evaluated input.

    onion = OnionFilter.load("smollm2-135m", OnionConfig())
    onion(["a gripping mn film ."])      # -> ['a gripping film .']

Perplexities of every leave-one-out variant of many sentences are computed together: a variant
shares its tokens before the removed word with the original, so one packed row holds a sentence
plus the suffixes of its variants under a block attention mask (``PackedRow``; about half the tokens
of scoring each variant alone, identical results). Rows are batched by length, with bf16 autocast
where it helps and the LM head in fp32; padding is masked out of attention and never a scored
token; results are cached per unique text. Measured on 2 shared CPU cores (load ~4) with SmolLM2:
15 SST-2 sentences (about 20 words) in 20-30 s; a GPU is much faster.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from kdshield.config import cfg_field, check_choice, check_range
from kdshield.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult, Timer, finish
from kdshield.defenses.lora import train_victim
from kdshield.errors import ConfigError, ModelLoadError
from kdshield.inference import predict, resolve_precision
from kdshield.models.loading import LoadOptions, resolve_model_ref

log = logging.getLogger(__name__)

HEAD_CHUNK = 1024  # positions per LM-head matmul: bounds the [positions, vocab] logits in memory


@dataclass
class OnionConfig:
    """ONION's word filter. Defaults follow the reference implementation (OpenBackdoor, bar 0)."""

    threshold: float = cfg_field(
        0.0,
        help="Remove words whose suspicion score (ppl(x) - ppl(x without "
        "the word)) is above this (ONION's t_s; 0 = any word whose "
        "removal makes the sentence more fluent).",
    )
    tune: bool = cfg_field(
        False,
        help="Pick the threshold on the clean dev split instead: the smallest "
        "value of --thresholds whose dev CA drop stays within max_ca_drop.",
    )
    thresholds: list[float] = cfg_field(
        [0.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0],
        help="Candidate thresholds for tune (ascending order is not required).",
    )
    max_ca_drop: float = cfg_field(0.02, help="tune: largest dev accuracy loss allowed (fraction).")
    batch_tokens: int = cfg_field(4096, help="LM tokens per forward pass (rows x longest row).")
    pack_tokens: int = cfg_field(
        512,
        help="Longest packed row: an original sentence plus the suffixes "
        "of its leave-one-out variants (see PackedRow).",
    )
    max_length: int = cfg_field(128, help="LM tokens per sentence (longer ones are truncated).")
    prefix: str = cfg_field(
        "",
        help="Text prepended as context and never scored, e.g. '<|endoftext|>' "
        "so that the first word is scored too ('' = as ONION with GPT-2: "
        "the first token has no context and is not scored).",
    )
    precision: str = cfg_field(
        "auto",
        help="auto = bf16 autocast where supported, else fp32.",
        choices=["auto", "bf16", "fp32"],
    )

    def __post_init__(self):
        check_range("onion.max_ca_drop", self.max_ca_drop, 0, 1)
        check_range("onion.batch_tokens", self.batch_tokens, 1, 10_000_000)
        check_range("onion.pack_tokens", self.pack_tokens, 1, 1_000_000)
        check_range("onion.max_length", self.max_length, 2, 100_000)
        check_choice("onion.precision", self.precision, ["auto", "bf16", "fp32"])
        if self.tune and not self.thresholds:
            raise ConfigError(
                "onion.thresholds must hold at least one value when onion.tune is set"
            )


def split_words(text: str) -> list[str]:
    return text.split()


def leave_one_out(words: Sequence[str]) -> list[str]:
    """The sentence without each of its words, in word order."""
    return [" ".join([*words[:i], *words[i + 1 :]]) for i in range(len(words))]


@dataclass
class PackedRow:
    """One LM input row: an original sentence, then the suffixes of some of its variants.

    A variant shares its leading tokens with the original (everything before the removed word), so
    only the tokens after that point are added; they see the shared part of the original through
    the attention mask, at the positions they have in the variant. Variant i of n words then costs
    its suffix instead of the whole sentence: about half the work of scoring every variant alone.
    ``requests`` are the scored tokens: (row index whose hidden state predicts it, token id, owner).
    """

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)  # 0 = the original, i = the i-th suffix
    visible: list[int] = field(default_factory=list)  # original tokens a suffix token may see
    requests: list[tuple[int, int, str]] = field(default_factory=list)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pack_group(
    text: str, orig: list[int], n_ctx: int, variants: list[tuple[str, list[int]]], max_tokens: int
) -> list[PackedRow]:
    """Rows scoring ``text`` (token ids ``orig``, the first ``n_ctx`` of them context only) and its
    ``variants`` (text, ids); a row holds the original plus as many suffixes as fit ``max_tokens``.

    Token t >= max(1, n_ctx) of a sequence is scored from the hidden state at t - 1: the
    original's own for the shared prefix, the original's last shared position for the first
    suffix token, the suffix's own after that. The shared prefix is found on token ids, so no
    assumption about the tokenizer is needed.
    """
    first = max(1, n_ctx)

    def new_row() -> PackedRow:
        n = len(orig)
        return PackedRow(list(orig), list(range(n)), [0] * n, [0] * n)

    row = new_row()
    row.requests = [(t - 1, orig[t], text) for t in range(first, len(orig))]
    rows = [row]
    for seg, (vtext, ids) in enumerate(variants, start=1):
        p = common_prefix(orig, ids)
        suffix = ids[p:]
        if len(row.segments) > len(orig) and len(row.ids) + len(suffix) > max_tokens:
            row = new_row()
            rows.append(row)
        off = len(row.ids)
        row.ids += suffix
        row.positions += range(p, p + len(suffix))
        row.segments += [seg] * len(suffix)
        row.visible += [p] * len(suffix)
        for t in range(first, len(ids)):
            at = t - 1 if t <= p else off + t - p - 1
            row.requests.append((at, ids[t], vtext))
    return rows


class OnionFilter:
    """Suspicion scores and filtered texts under one causal LM; perplexities cached per text."""

    def __init__(self, lm: torch.nn.Module, tokenizer, config: OnionConfig = OnionConfig()):
        self.lm = lm.eval().requires_grad_(False)  # the LM only scores, it is never trained
        self.tokenizer = tokenizer
        self.config = config
        self.threshold = config.threshold
        self.cache: dict[str, float] = {}
        self.stats = {"texts": 0, "filtered_texts": 0, "words": 0, "removed_words": 0}
        self._prefix_ids = (
            tokenizer(config.prefix, add_special_tokens=False)["input_ids"] if config.prefix else []
        )
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if pad is None:
            raise ModelLoadError(
                "the ONION language model's tokenizer has neither a pad nor an eos token"
            )
        self._pad_id = int(pad)

    @classmethod
    def load(
        cls, ref: str, config: OnionConfig = OnionConfig(), options: LoadOptions = LoadOptions()
    ) -> OnionFilter:
        """Load the causal LM ``ref`` (builtin name, directory or hub id; safetensors only)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model_ref(ref, options)
        lm = AutoModelForCausalLM.from_pretrained(
            path,
            use_safetensors=not options.allow_pickle,
            trust_remote_code=options.trust_remote_code,
            dtype=torch.float32,
        )
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
        return cls(lm.to("cuda" if torch.cuda.is_available() else "cpu"), tok, config)

    # --- perplexity ---------------------------------------------------------------------------
    def _encode(self, text: str) -> tuple[list[int], int]:
        """Token ids (prefix + text) and how many leading positions are context only."""
        ids = self.tokenizer(text, truncation=True, max_length=self.config.max_length)["input_ids"]
        return self._prefix_ids + list(ids), len(self._prefix_ids)

    def _rows(self, groups: list[tuple[str, list[str]]]) -> list[PackedRow]:
        rows = []
        for text, variants in groups:
            orig, n_ctx = self._encode(text)
            encoded = [(v, self._encode(v)[0]) for v in dict.fromkeys(variants) if v != text]
            rows.extend(pack_group(text, orig, n_ctx, encoded, self.config.pack_tokens))
        return rows

    def _attention_mask(self, seg: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, T]: causal within a segment; a suffix also sees the first ``vis`` tokens of the
        original (segment 0). Padding (segment -1) is never seen by a real token."""
        idx = torch.arange(seg.shape[1], device=seg.device)
        causal = idx[None, None, :] <= idx[None, :, None]
        same = seg[:, None, :] == seg[:, :, None]
        shared = (seg[:, None, :] == 0) & (idx[None, None, :] < vis[:, :, None])
        mask = (causal & (same | shared)).unsqueeze(1)
        if (
            getattr(self.lm.config, "_attn_implementation", "sdpa") == "eager"
        ):  # eager adds the mask
            return torch.zeros(mask.shape, dtype=torch.float32, device=seg.device).masked_fill(
                ~mask, torch.finfo(torch.float32).min
            )
        return mask

    @torch.no_grad()
    def _score_rows(self, rows: list[PackedRow], sums: dict, counts: dict) -> None:
        device = next(self.lm.parameters()).device
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        seg = torch.full((len(rows), width), -1, dtype=torch.long)
        vis = torch.zeros((len(rows), width), dtype=torch.long)
        req_at, req_target, owners = [], [], []
        for b, r in enumerate(rows):
            n = len(r.ids)
            ids[b, :n], pos[b, :n] = torch.tensor(r.ids), torch.tensor(r.positions)
            seg[b, :n], vis[b, :n] = torch.tensor(r.segments), torch.tensor(r.visible)
            for at, target, owner in r.requests:
                req_at.append(b * width + at)
                req_target.append(target)
                owners.append(owner)
        ids, pos, seg, vis = ids.to(device), pos.to(device), seg.to(device), vis.to(device)
        bf16 = resolve_precision(self.config.precision) == "bf16"
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = self.lm.base_model(
                input_ids=ids, attention_mask=self._attention_mask(seg, vis), position_ids=pos
            ).last_hidden_state
        if not req_at:
            return
        # The head in fp32 (bf16 logits would add noise of the order of the score differences), and
        # only at positions some target is predicted from; padding is never one of them.
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        at = torch.tensor(req_at, device=device)
        target = torch.tensor(req_target, device=device)
        head = self.lm.get_output_embeddings()
        weight = head.weight.float()
        bias = None if head.bias is None else head.bias.float()
        cap = getattr(self.lm.config, "final_logit_softcapping", None)

        def capped(x):
            return torch.tanh(x / cap) * cap if cap else x

        uniq, inverse = torch.unique(at, return_inverse=True)
        lse = torch.cat(
            [
                torch.logsumexp(
                    capped(torch.nn.functional.linear(flat[chunk], weight, bias)), dim=-1
                )
                for chunk in uniq.split(HEAD_CHUNK)
            ]
        )
        logit = (flat[at] * weight[target]).sum(-1) + (0 if bias is None else bias[target])
        for owner, value in zip(owners, (lse[inverse] - capped(logit)).tolist()):
            sums[owner] = sums.get(owner, 0.0) + value
            counts[owner] = counts.get(owner, 0) + 1

    def _compute(self, groups: list[tuple[str, list[str]]], desc: str | None) -> None:
        """Perplexity of every text and variant of ``groups`` into the cache, in packed batches."""
        rows = sorted(self._rows(groups), key=lambda r: len(r.ids))
        batches, current = [], []
        for r in rows:  # sorted by length: the last row of a batch is its widest
            if current and (len(current) + 1) * len(r.ids) > self.config.batch_tokens:
                batches.append(current)
                current = []
            current.append(r)
        if current:
            batches.append(current)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for batch in tqdm(
            batches,
            desc=desc,
            disable=desc is None or len(batches) < 4,
            unit="batch",
            mininterval=5,
        ):
            self._score_rows(batch, sums, counts)
        for text, variants in groups:
            for t in (text, *variants):
                # No scorable token (a one-token text without context): perplexity undefined.
                self.cache[t] = math.exp(sums[t] / counts[t]) if counts.get(t) else float("nan")

    def perplexities(
        self, texts: Sequence[str], desc: str | None = "ONION perplexity"
    ) -> np.ndarray:
        """Perplexity of each text (NaN when no token can be scored); cached per unique text."""
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if todo:
            self._compute([(t, []) for t in todo], desc)
        return np.array([self.cache[t] for t in texts], dtype=float)

    # --- scores and filtering -----------------------------------------------------------------
    def suspicion_scores(self, texts: Sequence[str]) -> list[list[float]]:
        """Per text, one score per whitespace word: ``ppl(text) - ppl(text without the word)``.

        Texts of fewer than two words get no scores (nothing would be left to judge). Every
        variant of every text is scored in one packed pass (see ``pack_group``).
        """
        words = [split_words(t) for t in texts]
        groups = {}
        for w in words:
            full = " ".join(w)
            if len(w) > 1 and full not in groups:
                variants = leave_one_out(w)
                if full not in self.cache or any(v not in self.cache for v in variants):
                    groups[full] = variants
        if groups:
            self._compute(list(groups.items()), "ONION perplexity")
        out = []
        for w in words:
            if len(w) < 2:
                out.append([])
                continue
            variants = leave_one_out(w)
            ppl = self.perplexities([" ".join(w), *variants], desc=None)  # cached: a lookup
            out.append([float(ppl[0] - p) for p in ppl[1:]])
        return out

    def filter_words(self, words: Sequence[str], scores: Sequence[float], threshold: float) -> str:
        # NaN scores (nothing scorable) compare False: such words are kept.
        return " ".join(w for w, s in zip(words, scores) if not s > threshold)

    def __call__(self, texts: Sequence[str]) -> list[str]:
        return self.transform(texts, self.threshold)

    def transform(
        self, texts: Sequence[str], threshold: float, *, record: bool = True
    ) -> list[str]:
        texts = list(texts)
        all_scores = self.suspicion_scores(texts)
        out = []
        for text, scores in zip(texts, all_scores):
            if not scores:
                out.append(text)
                continue
            words = split_words(text)
            kept = self.filter_words(words, scores, threshold)
            if record:
                removed = len(words) - len(kept.split())
                self.stats["words"] += len(words)
                self.stats["removed_words"] += removed
                self.stats["filtered_texts"] += int(removed > 0)
            out.append(kept)
        if record:
            self.stats["texts"] += len(texts)
        return out


def tune_threshold(
    onion: OnionFilter,
    model,
    texts: Sequence[str],
    labels: Sequence[int],
    config: OnionConfig,
    max_length: int = 64,
) -> tuple[float, list[dict]]:
    """The smallest candidate threshold whose clean dev accuracy drop is within ``max_ca_drop``.

    Lower thresholds remove more words (and more triggers); the search keeps the most aggressive
    one that the clean data tolerates. Without any acceptable candidate, the largest one is used.
    """
    labels = np.asarray(labels)
    base = float((predict(model, texts, max_length=max_length).labels == labels).mean())
    rows = []
    for t in sorted(config.thresholds):
        filtered = onion.transform(texts, t, record=False)
        acc = float((predict(model, filtered, max_length=max_length).labels == labels).mean())
        rows.append({"threshold": t, "dev_ca": acc, "drop": base - acc})
    ok = [r["threshold"] for r in rows if r["drop"] <= config.max_ca_drop]
    chosen = min(ok) if ok else max(config.thresholds)
    log.info("ONION threshold %.3g chosen on dev (clean accuracy %.4f): %s", chosen, base, rows)
    return chosen, rows


@DEFENSES.register("onion", "ONION: drop words whose removal lowers LM perplexity (input-level)")
class Onion(Defense):
    reads_victim = True
    name = "onion"
    config_class = OnionConfig
    paper = (
        "Qi et al. 2021, ONION: A Simple and Effective Defense Against Textual Backdoor Attacks "
        "(EMNLP)"
    )

    def run(self, ctx: DefenseContext, config: OnionConfig) -> DefenseResult:
        with Timer() as timer:
            # The LM first: a missing LM should fail before minutes of training, not after.
            onion = OnionFilter.load(ctx.lm, config, ctx.options)
            clf, res = train_victim(ctx)
            logs = {"train": res.to_dict(), "lm": ctx.lm, "threshold": config.threshold}
            if config.tune:
                dev = ctx.task.split("dev")
                onion.threshold, logs["tuning"] = tune_threshold(
                    onion, clf, dev["text"], dev["label"], config, max_length=ctx.train.max_length
                )
                logs["threshold"] = onion.threshold
            # Same dict object: the filter keeps counting while the evaluation applies it.
            logs["onion"] = onion.stats
        return finish(
            DefenseResult(
                model=clf, input_transform=onion, trainable_params=res.trainable_params, train=res, logs=logs
            ),
            timer,
        )
