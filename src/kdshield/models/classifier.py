"""One sequence classifier for encoders and decoders: logits and a per-example pooled feature.

    clf = load_classifier("smollm2-135m", num_labels=2)
    batch = clf.encode(["a fine film", "dull"], max_length=64)
    out = clf(**batch)            # out.logits [B, k], out.features [B, hidden]

The feature is what W2SDefense aligns and BeDKD distils: for decoders the final hidden state of the
last non-pad token (correct under left or right padding), for encoders the first ([CLS]) token.
A ``projection`` head (``Linear(d -> d_proj) -> ReLU -> Linear(d_proj -> k)``, the W2SDefense
teacher) also returns the projected feature ``g(h)`` that has the student's width (paper eq. 4).

Saved classifiers are ordinary Hugging Face backbone directories plus ``kdshield_head.safetensors``
and ``kdshield.json``; all weights are safetensors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from kdshield.errors import ConfigError, ModelLoadError
from kdshield.models.loading import (
    LoadOptions,
    load_pretrained,
    read_json,
    resolve_model_ref,
    warn_ignored_remote_code,
)
from kdshield.profiling import phase
from kdshield.training.logistic import accuracy, fit_logistic

log = logging.getLogger(__name__)

FORMAT = "kdshield-classifier"
HEAD_FILE = "kdshield_head.safetensors"
META_FILE = "kdshield.json"


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    features: torch.Tensor
    projected: torch.Tensor | None = None
    loss: torch.Tensor | None = None


class ClassificationHead(nn.Module):
    """``linear``: Linear(d, k). ``projection``: Linear(d, p) -> ReLU -> Linear(p, k)."""

    def __init__(self, hidden: int, num_labels: int, kind: str = "linear", proj_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if kind not in ("linear", "projection"):
            raise ConfigError(f"head={kind!r} is not one of ['linear', 'projection']")
        if kind == "projection" and not proj_dim:
            raise ConfigError("a projection head needs proj_dim (the student's hidden size)")
        self.kind, self.hidden, self.num_labels, self.proj_dim = kind, hidden, num_labels, proj_dim
        self.dropout = nn.Dropout(dropout)
        if kind == "linear":
            self.out = nn.Linear(hidden, num_labels)
        else:
            self.proj = nn.Linear(hidden, proj_dim)
            self.out = nn.Linear(proj_dim, num_labels)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.dropout(features)
        if self.kind == "linear":
            return self.out(x), None
        projected = self.proj(x)
        return self.out(torch.relu(projected)), projected

    def spec(self) -> dict:
        return {"kind": self.kind, "hidden": self.hidden, "num_labels": self.num_labels,
                "proj_dim": self.proj_dim}

    @torch.no_grad()
    def refit(self, features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-3, max_iter: int = 500) -> dict:
        """Fit the output layer anew, from zero, on fixed ``features`` (L2-regularised logistic regression).

        Minimises ``mean_i CE(W x_i + b, y_i) + l2 / 2 * ||W||^2`` (bias not penalised) with L-BFGS in
        float64; for a projection head ``x`` is ``relu(proj(features))``, ``proj`` stays. Returns the
        fit's training accuracy before and after and the objective at the end.
        """
        x = features.detach().to(torch.float64).cpu()
        y = labels.detach().long().cpu()
        if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != self.hidden:
            raise ConfigError(f"head refit: features {tuple(x.shape)} and labels {tuple(y.shape)} do not match a "
                              f"head of width {self.hidden}")
        if y.numel() == 0 or y.min() < 0 or y.max() >= self.num_labels:
            raise ConfigError(f"head refit: labels must be in 0..{self.num_labels - 1}")
        if self.kind == "projection":
            x = torch.relu(x @ self.proj.weight.double().cpu().T + self.proj.bias.double().cpu())

        before = accuracy(x, y, self.out.weight, self.out.bias)
        weight, bias, loss = fit_logistic(x, y, self.num_labels, l2, max_iter=max_iter)
        self.out.weight.copy_(weight.to(self.out.weight))
        self.out.bias.copy_(bias.to(self.out.bias))
        return {"train_acc_before": before, "train_acc_after": accuracy(x, y, weight, bias),
                "objective": round(loss, 5), "l2": l2, "n": int(y.numel())}


def is_encoder_config(config) -> bool:
    """BERT-like (masked LM family) models pool [CLS]; everything else pools the last token."""
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{config.model_type}: encoder-decoder models are not supported as classifiers")
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and config.model_type not in (
        "llama", "mistral", "qwen2", "gemma", "gemma3_text")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token per row; right, left or no padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


class Classifier(nn.Module):
    """A backbone (``AutoModel``, optionally wrapped by peft) + a head, with pooled features."""

    def __init__(self, backbone: nn.Module, tokenizer, head: ClassificationHead, *, encoder: bool,
                 label_names: list[str] | None = None, source: str = ""):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.label_names = label_names or [str(i) for i in range(head.num_labels)]
        self.source = source
        self.adapter_spec: dict | None = None
        # Tokens per example the classifier was trained with (saved in kdshield.json; None = unknown).
        self.max_length: int | None = None
        # The backbone's weights as loaded: fp32 / bf16 / fp16, or nf4 / int8 for a quantised base.
        self.load_dtype: str = "fp32"
        self.load_options: LoadOptions | None = None  # the options it was loaded with

    @property
    def num_labels(self) -> int:
        return self.head.num_labels

    @property
    def hidden_size(self) -> int:
        return self.head.hidden

    @property
    def base_config(self):
        model = self.backbone
        return getattr(model, "config", None) or model.get_base_model().config

    def encode(self, texts: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # peft prompt learning prepends virtual tokens: the real tokens sit after that offset.
        offset = hidden.shape[1] - attention_mask.shape[1]
        if self.encoder:
            return hidden[:, offset]
        idx = last_token_index(attention_mask) + offset
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_ignored) -> ClassifierOutput:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        features = self.pool(hidden, attention_mask)
        logits, projected = self.head(features.to(self.head.out.weight.dtype))
        return ClassifierOutput(logits=logits, features=features, projected=projected)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # --- saving -------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {"format": FORMAT, "encoder": self.encoder, "label_names": self.label_names,
                "head": self.head.spec(), "source": self.source, "adapter": self.adapter_spec,
                "max_length": self.max_length}

    @phase("model save")
    def save(self, path: str | Path, *, merge: bool = False) -> Path:
        """Save as safetensors. With an adapter: the adapter alone, or merged when ``merge``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = self.metadata()
        backbone = self.backbone
        if self.adapter_spec is not None:
            if merge:
                from kdshield.models.adapters import merged_backbone

                backbone = merged_backbone(self)
                meta["adapter"] = None
                meta["merged_from"] = self.adapter_spec
            else:
                backbone.save_pretrained(str(path / "adapter"), safe_serialization=True)
                backbone = None
        if backbone is not None:
            backbone.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(path / HEAD_FILE), metadata={"format": "pt"})
        (path / META_FILE).write_text(json.dumps(meta, indent=2))
        return path


def _load_tokenizer(path: str, options: LoadOptions):
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    except Exception as err:
        # A damaged tokenizer.json: json's ValueError, or the tokenizers library's plain Exception.
        if not isinstance(err, (OSError, ValueError, TypeError, KeyError)) and type(err) is not Exception:
            raise
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"{path}: the tokenizer needs custom code; pass --trust-remote-code only if "
                                 f"you trust its source ({err})") from err
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {err}. Its tokenizer files may be damaged: "
                             "re-download the model or re-run the step that wrote it") from err
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"{path}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _load_backbone(path: str, options: LoadOptions, dtype: torch.dtype):
    return load_pretrained(AutoModel, path, options, dtype)


def _check_meta(meta: dict, meta_path: Path) -> dict:
    """kdshield.json with the fields loading needs, else ModelLoadError naming the file."""
    def damaged(why: str) -> ModelLoadError:
        return ModelLoadError(f"{meta_path} is damaged or from another tool ({why}); re-run the kdshield step "
                              "that wrote this directory")

    if not isinstance(meta, dict):
        raise damaged("not a JSON object")
    if meta.get("format") == "kdshield-generator":
        raise ModelLoadError(f"{meta_path.parent} is a kdshield generator (kdshield-generator), not a "
                             "classifier: load it with load_generator (a generative dataset)")
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{meta_path}: unknown format {meta.get('format')!r}")
    spec = meta.get("head")
    if (not isinstance(spec, dict) or not all(isinstance(spec.get(k), int) for k in ("hidden", "num_labels"))
            or spec.get("kind") not in ("linear", "projection")):
        raise damaged("no valid 'head' entry {kind, hidden, num_labels}")
    names = meta.get("label_names")
    if names is not None and (not isinstance(names, list) or len(names) != spec["num_labels"]):
        raise damaged(f"label_names {names!r} do not name the head's {spec['num_labels']} classes")
    max_length = meta.get("max_length")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise damaged(f"max_length {max_length!r} is not a positive integer")
    return meta


def _load_head_state(head: ClassificationHead, file: Path) -> None:
    try:
        state = load_file(str(file))
    except Exception as err:  # safetensors' own error type for a damaged file; FileNotFoundError
        raise ModelLoadError(f"cannot load the classification head {file}: {err}. Re-run the kdshield step "
                             "that wrote it") from err
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise ModelLoadError(f"{file} does not fit the head described in {META_FILE}: {err}") from err


@phase("model load")
def load_classifier(ref: str | Path, *, num_labels: int | None = None, label_names: list[str] | None = None,
                    head: str = "linear", proj_dim: int | None = None, options: LoadOptions = LoadOptions(),
                    dtype: torch.dtype | None = None) -> Classifier:
    """Load a classifier from a builtin name, a local directory or a hub id.

    A kdshield directory restores its head (and adapter); any other model gets a fresh head with
    ``num_labels`` outputs (or ``len(label_names)``). The backbone's weights are loaded in ``dtype``
    (None: ``options.dtype`` resolved by ``resolve_load_dtype``; auto is fp32 on a CPU without native
    bf16), or quantised per ``options.quantize``; the head stays fp32, as do PEFT adapters (peft
    casts them up on a half-precision base), so training updates fp32 parameters.
    """
    from kdshield.inference import load_dtype_name, resolve_load_dtype

    if dtype is None:
        dtype = resolve_load_dtype(options.dtype)
    path = resolve_model_ref(ref, options)
    meta_path = Path(path) / META_FILE
    meta = _check_meta(read_json(meta_path), meta_path) if meta_path.is_file() else None
    if meta is not None and meta.get("adapter"):
        from kdshield.models.adapters import load_adapter_classifier

        clf = load_adapter_classifier(Path(path), meta, options=options, dtype=dtype)
        clf.max_length = meta.get("max_length")  # the adapter's training length, not its base model's
        return clf
    warn_ignored_remote_code(path, options)
    backbone, config = _load_backbone(path, options, dtype)
    tokenizer = _load_tokenizer(path, options)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
        backbone.config.pad_token_id = tokenizer.pad_token_id
    encoder = is_encoder_config(config)
    hidden = config.hidden_size
    if meta is not None:
        spec = meta["head"]
        if num_labels is not None and num_labels != spec["num_labels"]:
            raise ConfigError(f"{path} is a {spec['num_labels']}-class classifier; the data has {num_labels} "
                              "classes. Use a model trained for this task or a base model.")
        clf_head = ClassificationHead(spec["hidden"], spec["num_labels"], spec["kind"], spec.get("proj_dim"))
        _load_head_state(clf_head, Path(path) / HEAD_FILE)
        label_names = label_names or meta.get("label_names")
    else:
        k = num_labels or (len(label_names) if label_names else None)
        if not k or k < 2:
            raise ConfigError("num_labels must be >= 2 for a model without a kdshield head")
        clf_head = ClassificationHead(hidden, k, head, proj_dim)
    clf = Classifier(backbone, tokenizer, clf_head, encoder=encoder, label_names=label_names, source=str(ref))
    clf.max_length = meta.get("max_length") if meta is not None else None
    clf.load_dtype = {"4bit": "nf4", "8bit": "int8"}.get(options.quantize) or load_dtype_name(dtype)
    clf.load_options = options
    return clf
