"""A causal language model + its tokenizer: the generative student and victim.

    gen = load_generator("smollm2-135m")                          # builtin, directory or hub id
    attach_generator_adapter(gen, AdapterConfig(kind="lora", r=8))
    out = gen(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    out.logits                                                    # [B, L, V], aligned with input_ids
    out = gen(**batch)                                            # with labels: the lean path
    out.response_logits, out.targets                              # [N, V], [N]: labelled tokens only
    feats = gen.features(**batch)                                 # last prompt token, response mean
    gen.save("out/adapter"); gen.save("out/merged", merge=True)

``batch`` as ``kdshield.generation.prompt.collate`` or ``kdshield.data.batching.collate`` build it
(labels -100 on prompt and padding, position ids counting real tokens). Without position ids they
are computed from the attention mask the same way, so left and right padding give the same logits.

The lean path computes logits only at the positions that predict a labelled token
(``labels[:, t + 1] != -100``), through transformers' ``logits_to_keep`` with a boolean mask: the
model's own head and logit post-processing, on ``N`` rows instead of ``B x L``.

Prompt tuning and p-tuning prepend virtual tokens. Here they are run by hand instead of through
peft's forward (which drops ``position_ids``, so left padding would shift every position): the
virtual tokens take positions ``0 .. n-1`` and the real tokens ``n + position_ids`` -- what peft's
own forward gives a right-padded batch -- and the virtual positions are cut off again, so logits,
hidden states and labels line up with ``input_ids`` whatever the adapter.

Saved generators are ordinary Hugging Face directories (merged or full) or an ``adapter/`` folder
(peft, safetensors) whose base is recorded in ``kdshield.json`` (``"format": "kdshield-generator"``).
All weights are safetensors; ``trust_remote_code`` only when the user asks (``LoadOptions``).

The weights load as ``LoadOptions`` says, as a classifier's do: ``dtype`` (auto: bf16 where the
device computes it natively, fp32 on a CPU without it), or a bitsandbytes base (``quantize``:
4bit NF4 / 8bit, CUDA only) for PEFT; peft keeps LoRA / prompt weights fp32 on a half-precision
base. A ``full`` adapter trains every weight: it needs fp32 weights (loaded again in fp32 under
dtype auto, a ConfigError otherwise). ``Generator.load_dtype`` is what a results record's
``load_dtype`` says.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from kdshield import assets
from kdshield.errors import ConfigError, ModelLoadError
from kdshield.models import label_head
from kdshield.models.adapters import AdapterConfig
from kdshield.models.classifier import FORMAT as CLASSIFIER_FORMAT
from kdshield.models.classifier import META_FILE, _load_tokenizer, is_encoder_config
from kdshield.models.loading import (
    LoadOptions,
    load_pretrained,
    read_json,
    resolve_model_ref,
    warn_ignored_remote_code,
)
from kdshield.profiling import phase

FORMAT = "kdshield-generator"
IGNORE_INDEX = -100
DEFAULT_MAX_NEW_TOKENS = 48


@dataclass
class GeneratorOutput:
    """What ``Generator.forward`` returns.

    Without labels: ``logits`` ``[B, L, V]`` (``logits[:, t]`` predicts token ``t + 1``). With
    labels: ``response_logits`` ``[N, V]`` at the ``N`` positions that predict a labelled token,
    in (row, position) order, with the token each predicts (``targets``) and its batch row
    (``rows``); ``logits`` is None. ``hidden``: last-layer hidden states ``[B, L, H]`` when asked.
    """

    logits: torch.Tensor | None = None
    response_logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    batch_size: int = 0

    def token_nll(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: (summed NLL of the labelled tokens, their count), as ``masked_token_nll``."""
        if self.response_logits is None:
            raise ValueError("token_nll needs the lean output: call the generator with labels")
        per_token = nn.functional.cross_entropy(self.response_logits.float(), self.targets, reduction="none")
        nll = torch.zeros(self.batch_size, device=per_token.device).index_add(0, self.rows, per_token)
        count = torch.bincount(self.rows, minlength=self.batch_size)
        return nll, count


@dataclass
class PooledFeatures:
    """Per-example features ``[B, H]``: at the last prompt token (the position that emits the first
    response token) and the mean over the response tokens' own positions (EOS included)."""

    last_prompt: torch.Tensor
    response_mean: torch.Tensor


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only (0 on padding), as ``generation.prompt.collate``."""
    mask = attention_mask.long()
    return (mask.cumsum(dim=1) - 1).clamp(min=0) * mask


def predicting_mask(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[B, L]`` bool: True at positions ``t`` whose next token ``labels[:, t + 1]`` is labelled."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != ignore_index
    return keep


def pool_features(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  ) -> PooledFeatures:
    """Last-prompt-token and response-mean features of ``hidden`` ``[B, L, H]`` (see PooledFeatures);
    the prompt is everything before a row's first labelled position (correct under any padding)."""
    labelled = labels != ignore_index
    if not bool(labelled.any(dim=1).all()):
        raise ValueError("pool_features: a row has no labelled (response) token")
    first = labelled.long().argmax(dim=1)
    if bool((first == 0).any()):
        raise ValueError("pool_features: a row is labelled from its first position and has no prompt")
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last_prompt = hidden[rows, first - 1]
    weights = labelled.to(hidden.dtype).unsqueeze(-1)
    response_mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
    return PooledFeatures(last_prompt=last_prompt, response_mean=response_mean)


class Generator(nn.Module):
    """A causal LM (``model``: the HF model, peft-wrapped once an adapter is attached) + tokenizer.

    ``max_length``: tokens per example it was trained with (saved in kdshield.json; None = unknown);
    ``max_new_tokens``: the decoding budget its evaluations default to.
    """

    def __init__(self, model: nn.Module, tokenizer, *, source: str = ""):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.adapter_spec: dict | None = None
        self.max_length: int | None = None
        self.max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
        # The weights as loaded: fp32 / bf16 / fp16, or nf4 / int8 for a quantised base.
        self.load_dtype: str = "fp32"
        self.load_options: LoadOptions | None = None  # the options it was loaded with

    @property
    def base_config(self):
        model = self.model
        return model.get_base_model().config if hasattr(model, "get_base_model") else model.config

    @property
    def hidden_size(self) -> int:
        return self.base_config.hidden_size

    @property
    def prompt_learning(self) -> bool:
        """Whether a prompt-tuning / p-tuning adapter prepends virtual tokens."""
        cfg = getattr(self.model, "active_peft_config", None)
        return bool(cfg is not None and cfg.is_prompt_learning)

    @property
    def num_virtual_tokens(self) -> int:
        return self.model.active_peft_config.num_virtual_tokens if self.prompt_learning else 0

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # --- forward --------------------------------------------------------------------------------
    def _run(self, input_ids, attention_mask, position_ids, keep, output_hidden: bool):
        """The model on the batch; ``keep`` (``[B, L]`` bool or None = all) selects logit positions."""
        if position_ids is None:
            position_ids = real_positions(attention_mask)
        kwargs = {"use_cache": False, "output_hidden_states": output_hidden}
        n = self.num_virtual_tokens
        if n:
            # virtual tokens by hand (see the module doc): positions 0..n-1, real tokens after them
            peft_model, b = self.model, input_ids.shape[0]
            embeds = peft_model.word_embeddings(input_ids)
            prompts = peft_model.get_prompt(batch_size=b).to(embeds.dtype)
            ones = torch.ones(b, n, dtype=attention_mask.dtype, device=attention_mask.device)
            virtual = torch.arange(n, device=position_ids.device).expand(b, n)
            if keep is not None:
                keep = torch.cat([torch.zeros(b, n, dtype=torch.bool, device=keep.device), keep], dim=1)
            out = peft_model.base_model(inputs_embeds=torch.cat([prompts, embeds], dim=1),
                                        attention_mask=torch.cat([ones, attention_mask], dim=1),
                                        position_ids=torch.cat([virtual, position_ids + n], dim=1),
                                        logits_to_keep=keep if keep is not None else 0, **kwargs)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             logits_to_keep=keep if keep is not None else 0, **kwargs)
        hidden = out.hidden_states[-1][:, n:] if output_hidden else None
        logits = out.logits if keep is not None or not n else out.logits[:, n:]
        return logits, hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                output_hidden: bool = False, **_ignored) -> GeneratorOutput:
        """Logits at every position, or with ``labels`` only where they are needed (GeneratorOutput)."""
        if labels is None:
            logits, hidden = self._run(input_ids, attention_mask, position_ids, None, output_hidden)
            return GeneratorOutput(logits=logits, hidden=hidden, batch_size=input_ids.shape[0])
        keep = predicting_mask(labels)
        logits, hidden = self._run(input_ids, attention_mask, position_ids, keep, output_hidden)
        rows, cols = keep.nonzero(as_tuple=True)  # row-major, as the boolean mask selects
        return GeneratorOutput(response_logits=logits, targets=labels[rows, cols + 1], rows=rows,
                               hidden=hidden, batch_size=input_ids.shape[0])

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 position_ids: torch.Tensor | None = None, **_ignored) -> PooledFeatures:
        """Pooled last-layer features of a labelled batch, without computing any logits."""
        none = torch.zeros_like(labels, dtype=torch.bool)
        _, hidden = self._run(input_ids, attention_mask, position_ids, none, True)
        return pool_features(hidden, labels)

    # --- saving ---------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {"format": FORMAT, "task": "generation", "source": self.source, "adapter": self.adapter_spec,
                "max_length": self.max_length, "max_new_tokens": self.max_new_tokens}

    @property
    def label_head(self):
        """The answer split refit for a label task (``models.label_head``), None when there is none."""
        return label_head.installed(self.model)

    @phase("model save")
    def save(self, path: str | Path, *, merge: bool = False) -> Path:
        """Safetensors only. With an adapter: ``adapter/`` alone (its base recorded), or merged into
        the weights with ``merge`` (LoRA; prompt tuning / p-tuning cannot merge: ConfigError)."""
        path = Path(path)
        meta = self.metadata()
        head = label_head.remove(self.model)  # saved on its own: the weights keep their usual names
        try:
            return self._save(path, meta, merge, head)
        finally:
            if head is not None:
                label_head.install(self.model, head.token_ids, head.split_weight, head.split_bias)

    def _save(self, path: Path, meta: dict, merge: bool, head) -> Path:
        model = self.model
        if self.adapter_spec is not None and merge:
            if self.adapter_spec["kind"] != "lora":
                raise ConfigError(f"a {self.adapter_spec['kind']} adapter cannot be merged into the weights; "
                                  "save the adapter instead (without --merge)")
            model = copy.deepcopy(self.model).merge_and_unload()
            meta["adapter"], meta["merged_from"] = None, self.adapter_spec
        path.mkdir(parents=True, exist_ok=True)
        if self.adapter_spec is not None and not merge:
            model.save_pretrained(str(path / "adapter"), safe_serialization=True)
        else:
            model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))
        if head is not None:
            meta["label_head"] = label_head.save(head, path)
        (path / META_FILE).write_text(json.dumps(meta, indent=2))
        return path


# --- adapters -------------------------------------------------------------------------------------
def _peft_config(cfg: AdapterConfig):
    from peft import LoraConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    if cfg.kind == "lora":
        kwargs = {"target_modules": list(cfg.target_modules)} if cfg.target_modules else {}
        return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                          task_type=TaskType.CAUSAL_LM, **kwargs)
    if cfg.kind == "prompt-tuning":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.kind == "p-tuning":
        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                                   encoder_hidden_size=cfg.encoder_hidden_size)
    raise ConfigError(f"adapter kind {cfg.kind!r} has no peft config")


def attach_generator_adapter(gen: Generator, cfg: AdapterConfig) -> Generator:
    """Freeze the model and add the adapter in place (``full``: every weight trainable). Returns gen."""
    if gen.adapter_spec is not None:
        raise ConfigError("this generator already has an adapter; load the merged model instead")
    if cfg.kind == "full":
        options = gen.load_options
        if gen.load_dtype in ("bf16", "fp16") and options is not None and options.dtype == "auto":
            _reload_fp32(gen, options)  # auto = what suits the run: fp32 where every weight trains
        if gen.load_dtype != "fp32":
            # the commands check this before any work (LoadOptions.for_full_training); this is the backstop
            raise ConfigError(f"full fine-tuning trains every weight and needs fp32 weights; this generator was "
                              f"loaded as {gen.load_dtype} (quantised weights cannot train, and AdamW on "
                              "half-precision weights loses the steps below their resolution). Load it with "
                              "--dtype fp32 and without --quantize")
        for p in gen.model.parameters():
            p.requires_grad_(True)
        return gen
    from peft import get_peft_model

    for p in gen.model.parameters():
        p.requires_grad_(False)
    try:
        gen.model = get_peft_model(gen.model, _peft_config(cfg))
    except ValueError as err:
        raise ConfigError(f"cannot add {cfg.kind} to {gen.base_config.model_type}: {err}. "
                          "Set --adapter.target-modules to the model's attention projections.") from err
    gen.adapter_spec = {"kind": cfg.kind, "base": gen.source, "config": cfg.to_dict()}
    return gen


def _reload_fp32(gen: Generator, options: LoadOptions) -> None:
    """Replace ``gen``'s half-precision model (loaded under dtype auto) by the checkpoint's fp32
    weights: full fine-tuning needs them, and casting the loaded copy up would start from rounded
    weights."""
    import logging

    logging.getLogger(__name__).info("full fine-tuning: loading %s again in fp32 (dtype auto had loaded %s)",
                                     gen.source, gen.load_dtype)
    fp32 = options.for_full_training()
    pad = gen.model.config.pad_token_id
    path = resolve_model_ref(gen.source, fp32)
    gen.model = None  # the half-precision copy is freed before the fp32 one loads
    gen.model = _load_causal_lm(path, fp32, torch.float32)
    gen.model.config.pad_token_id = pad
    gen.load_dtype, gen.load_options = "fp32", fp32


# --- loading --------------------------------------------------------------------------------------
def _check_meta(meta, meta_path: Path) -> dict:
    """A generator's kdshield.json, else ModelLoadError naming the file (and the right loader)."""
    def damaged(why: str) -> ModelLoadError:
        return ModelLoadError(f"{meta_path} is damaged or from another tool ({why}); re-run the kdshield step "
                              "that wrote this directory")

    if not isinstance(meta, dict):
        raise damaged("not a JSON object")
    if meta.get("format") == CLASSIFIER_FORMAT:
        raise ModelLoadError(f"{meta_path.parent} is a kdshield classifier ({CLASSIFIER_FORMAT}), not a generative "
                             "model: load it with load_classifier (a classification dataset), or pass a causal "
                             "LM or a kdshield generator")
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{meta_path}: unknown format {meta.get('format')!r}")
    for key in ("max_length", "max_new_tokens"):
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise damaged(f"{key} {value!r} is not a positive integer")
    adapter = meta.get("adapter")
    if adapter is not None and (not isinstance(adapter, dict) or not adapter.get("base")
                                or not isinstance(adapter.get("kind"), str)):
        raise damaged("its 'adapter' entry records no base model and kind")
    return meta


def read_generator_meta(path: str | Path) -> dict | None:
    """The checked kdshield.json of a generator directory, None when it has none."""
    meta_path = Path(path) / META_FILE
    return _check_meta(read_json(meta_path), meta_path) if meta_path.is_file() else None


def is_generator_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory kdshield saved a generator in (its kdshield.json says so)."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _load_causal_lm(path: str, options: LoadOptions, dtype: torch.dtype):
    def decoder_only(config) -> None:
        if getattr(config, "is_encoder_decoder", False) or is_encoder_config(config):
            raise ModelLoadError(f"{path} is a {config.model_type} model, not a decoder-only causal LM; "
                                 "generative tasks need one (e.g. smollm2-135m)")

    try:
        model, _ = load_pretrained(AutoModelForCausalLM, path, options, dtype, check_config=decoder_only)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ModelLoadError(f"{path} has no causal-LM head in transformers; generative tasks need a "
                                 "causal LM") from err
        raise
    return model


def _load_adapter_generator(path: Path, meta: dict, *, options: LoadOptions, dtype: torch.dtype) -> Generator:
    """The recorded base model + the saved peft adapter (frozen, as loaded for evaluation)."""
    from peft import PeftModel

    spec = meta["adapter"]
    adapter_dir = path / "adapter"
    if not list(adapter_dir.glob("*.safetensors")):
        raise ModelLoadError(f"{adapter_dir} has no safetensors adapter weights")
    gen = load_generator(spec["base"], options=options, dtype=dtype)
    gen.model = PeftModel.from_pretrained(gen.model, str(adapter_dir))
    gen.adapter_spec = spec
    return gen


@phase("model load")
def load_generator(ref: str | Path, *, options: LoadOptions = LoadOptions(),
                   dtype: torch.dtype | None = None) -> Generator:
    """A generator from a builtin name, a directory (a Hugging Face causal LM, a merged or full
    kdshield generator, or a kdshield adapter directory: its recorded base + ``adapter/``) or a hub
    id. The tokenizer pads with EOS when it has no pad token. The weights load in ``dtype`` (None:
    ``options.dtype`` resolved by ``resolve_load_dtype``; auto is fp32 on a CPU without native
    bf16), or quantised per ``options.quantize``."""
    from kdshield.inference import load_dtype_name, resolve_load_dtype

    if dtype is None:
        dtype = resolve_load_dtype(options.dtype)
    path = resolve_model_ref(ref, options)
    meta = read_generator_meta(path)
    if meta is not None and meta.get("adapter"):
        gen = _load_adapter_generator(Path(path), meta, options=options, dtype=dtype)
    else:
        warn_ignored_remote_code(path, options)
        model = _load_causal_lm(path, options, dtype)
        tokenizer = _load_tokenizer(path, options)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        gen = Generator(model, tokenizer)
    # a local directory is recorded absolute: an adapter saved from it must find its base from anywhere
    local = Path(str(ref)).expanduser()
    gen.source = str(local.resolve()) if str(ref) not in assets.ASSETS and local.is_dir() else str(ref)
    if meta is not None and meta.get("label_head"):
        label_head.load(gen.model, path, meta["label_head"])
    if meta is not None:
        gen.max_length = meta.get("max_length")
        gen.max_new_tokens = meta.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
    gen.load_dtype = {"4bit": "nf4", "8bit": "int8"}.get(options.quantize) or load_dtype_name(dtype)
    gen.load_options = options
    return gen
