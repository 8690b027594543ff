"""A causal LM's answer split between label words, refit from zero: the generative head refit.

On a label task (the answer is one of ``SFTData.label_words``, e.g. "negative" / "positive") a
causal LM chooses the answer with its output layer, at the position that emits the first answer
token: the rows of ``lm_head`` for the label words' first tokens read the last hidden state there.
After clean fine-tuning those rows can still carry what the poisoning wrote into them: weights
along directions that clean rows leave unused get no gradient, and a trigger that moves the hidden
state along such a direction still moves the answer. The classification defense removes that part by
fitting the output layer anew, from zero (``W2SConfig.head_refit``); this module is the same step
for a generator.

``LabelHead`` wraps the model's output layer. Everywhere it returns the wrapped layer's logits,
except at the label words' first tokens, where it keeps the total probability the model gives to
the label words and re-splits it between them with a logistic regression fit from zero on clean
hidden states:

    z_j = logsumexp_l (W h)_{t_l} + log_softmax_j (A h + c)

``W`` is the wrapped layer, ``t_l`` the first token of label word ``l``, ``(A, c)`` the fit. Keeping
the mass means the refit decides *which* label word, never *whether* a label word comes (the model
still stops, answers in the task's format, and scores the same on every other token). The fit
(``kdshield.defenses.label_refit``) is L2-regularised: a direction that clean hidden states do not
use gets no weight. Whether the trigger's push lies along such a direction is an empirical question
(``docs/generation.md`` says what was measured).

A generator with a label head saves it as ``label_head.safetensors`` (token ids, ``A``, ``c``) beside
its weights or adapter, recorded in ``kdshield.json``; ``load_generator`` installs it again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdshield.errors import ModelLoadError

LABEL_HEAD_FILE = "label_head.safetensors"


class LabelHead(nn.Module):
    """The wrapped output layer (``base``) with the label words' answer split replaced (module doc).
    ``token_ids`` ``[k]``, ``weight`` ``[k, H]``, ``bias`` ``[k]``: buffers, never trained."""

    def __init__(self, base: nn.Module, token_ids, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.ndim != 1 or len(ids) < 2 or len(set(ids.tolist())) != len(ids):
            raise ValueError(f"a label head needs 2+ distinct token ids, got {ids.tolist()}")
        if weight.shape != (len(ids), base.weight.shape[1]) or bias.shape != (len(ids),):
            raise ValueError(f"label head: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit "
                             f"{len(ids)} tokens of width {base.weight.shape[1]}")
        self.base = base
        self.register_buffer("token_ids", ids.to(base.weight.device), persistent=False)
        self.register_buffer("split_weight", weight.detach().float().to(base.weight.device), persistent=False)
        self.register_buffer("split_bias", bias.detach().float().to(base.weight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # what code that reads ``get_output_embeddings().weight`` expects
        return self.base.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)
        mass = torch.logsumexp(logits.index_select(-1, self.token_ids).float(), dim=-1, keepdim=True)
        split = torch.log_softmax(hidden.float() @ self.split_weight.T + self.split_bias, dim=-1)
        return logits.index_copy(-1, self.token_ids, (mass + split).to(logits.dtype))

    def state(self) -> dict[str, torch.Tensor]:
        return {"token_ids": self.token_ids.cpu(), "weight": self.split_weight.cpu().contiguous(),
                "bias": self.split_bias.cpu().contiguous()}


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def installed(model: nn.Module) -> LabelHead | None:
    head = causal_lm(model).get_output_embeddings()
    return head if isinstance(head, LabelHead) else None


def output_layer(model: nn.Module) -> nn.Module:
    """``model``'s own output layer: the one a label head wraps, or the installed one if none does."""
    current = causal_lm(model).get_output_embeddings()
    return current.base if isinstance(current, LabelHead) else current


def install(model: nn.Module, token_ids, weight: torch.Tensor, bias: torch.Tensor) -> LabelHead:
    """Wrap ``model``'s output layer (replacing an earlier label head, never stacking one on it)."""
    head = LabelHead(output_layer(model), token_ids, weight, bias)
    causal_lm(model).set_output_embeddings(head)
    return head


def remove(model: nn.Module) -> LabelHead | None:
    """Put the wrapped output layer back; returns the label head that was installed, if any."""
    head = installed(model)
    if head is not None:
        causal_lm(model).set_output_embeddings(head.base)
    return head


def save(head: LabelHead, folder: str | Path) -> dict:
    """Write ``label_head.safetensors`` into ``folder``; returns what ``kdshield.json`` records."""
    save_file(head.state(), str(Path(folder) / LABEL_HEAD_FILE))
    return {"file": LABEL_HEAD_FILE, "token_ids": head.token_ids.tolist()}


def load(model: nn.Module, folder: str | Path, spec: dict) -> LabelHead:
    """Install the label head saved in ``folder`` (``spec``: what ``save`` recorded)."""
    path = Path(folder) / spec.get("file", LABEL_HEAD_FILE)
    if not path.is_file():
        raise ModelLoadError(f"{Path(folder) / 'kdshield.json'} records a label head but {path} is missing; "
                             "copy the whole model folder, or save the model again")
    state = load_file(str(path))
    try:
        return install(model, state["token_ids"], state["weight"], state["bias"])
    except (KeyError, ValueError) as err:
        raise ModelLoadError(f"{path} is not a label head kdshield wrote ({err}); save the model again") from None
