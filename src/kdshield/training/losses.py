"""Loss functions as pure functions of tensors (tested on small random tensors with known answers).

    ce = cross_entropy(logits, labels)
    kd = distillation_kl(student_logits, teacher_logits, temperature=2.0)   # T^2 * KL(t || s)
    fa = feature_alignment(student_feat, teacher_feat)                       # mean_i ||h_s,i - h_t,i||^2
    idx, logp = topk_log_probs(teacher_logits, k=32, temperature=2.0)         # top k + a tail bin
    kd = topk_distillation_kl(student_logits, idx, logp, temperature=2.0)     # T^2 * KL over k + 1 bins
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean (Hinton et al.)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (t * t)


def feature_alignment(student_features: torch.Tensor, teacher_features: torch.Tensor,
                      normalize: str = "none") -> torch.Tensor:
    """Mean over examples of the squared L2 distance between the features **of the same example**.

    ``normalize``: ``none`` (paper), ``l2`` (unit vectors: distance in [0, 4]), or ``rms`` (each vector
    divided by its root-mean-square, so the distance no longer scales with the hidden-state norm).
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"feature shapes differ: student {tuple(student_features.shape)} vs teacher "
                         f"{tuple(teacher_features.shape)}; project the teacher to the student's width")
    s, t = student_features.float(), teacher_features.float()
    if normalize == "l2":
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    elif normalize == "rms":
        s = s / s.pow(2).mean(dim=-1, keepdim=True).add(1e-6).sqrt()
        t = t / t.pow(2).mean(dim=-1, keepdim=True).add(1e-6).sqrt()
    elif normalize != "none":
        raise ValueError(f"normalize={normalize!r} is not one of none, l2, rms")
    return (s - t).pow(2).sum(dim=-1).mean()


def bedkd_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       student_features: torch.Tensor, teacher_features: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """BeDKD's distillation term: ``KL(log_softmax(s/T), softmax(t/T)) + MSE(h_s, h_t)``."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, p_t, reduction="batchmean")
    return kl + F.mse_loss(student_features.float(), teacher_features.float())


def masked_token_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (summed next-token NLL over the labelled positions, number of such positions).

    ``logits[:, t]`` predicts ``labels[:, t + 1]`` (a causal LM's alignment); positions labelled
    ``ignore_index`` (prompt, padding) count nothing. The response CE of SFT is
    ``nll.sum() / count.sum()`` (token mean over the batch); a row's NLL is ``nll / count``.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in "
                         "(batch, length)")
    targets = labels[:, 1:]
    keep = targets != ignore_index
    nll = torch.zeros(labels.shape[0], device=logits.device)
    if keep.any():
        rows = keep.nonzero(as_tuple=True)[0]
        per_token = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="none")
        nll = nll.index_add(0, rows, per_token)
    return nll, keep.sum(dim=1)


def response_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """SFT loss: next-token CE on the labelled (response) positions, token mean over the batch."""
    nll, count = masked_token_nll(logits, labels, ignore_index)
    return nll.sum() / count.sum().clamp(min=1)


def topk_log_probs(logits: torch.Tensor, k: int, temperature: float = 1.0,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A distribution ``softmax(logits / T)`` ``[..., V]`` kept as ``k + 1`` bins: its ``k`` most
    probable tokens and one tail bin holding the rest of the mass.

    Returns ``(indices [..., k], log_probs [..., k + 1])``: the top-k log-probabilities in
    descending order, then the log of the remaining mass (``-inf`` when ``k >= V``, where nothing
    is left). What a teacher's token distribution is cached as (``topk_distillation_kl``).
    """
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    k = min(int(k), log_p.shape[-1])
    top, indices = log_p.topk(k, dim=-1)
    if k == log_p.shape[-1]:
        tail = torch.full_like(top[..., :1], float("-inf"))
    else:
        rest = log_p.scatter(-1, indices, float("-inf"))
        tail = torch.logsumexp(rest, dim=-1, keepdim=True)
    return indices, torch.cat([top, tail], dim=-1)


def topk_distillation_kl(student_logits: torch.Tensor, teacher_indices: torch.Tensor,
                         teacher_log_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` over ``k + 1`` bins, mean over rows (tokens).

    ``teacher_indices`` ``[N, k]`` and ``teacher_log_probs`` ``[N, k + 1]`` are the teacher's bins
    from ``topk_log_probs`` at the same temperature; the student's distribution ``softmax(s / T)``
    ``[N, V]`` is gathered at the same ``k`` token ids, its remaining mass forming its own tail bin.
    Merging tokens into one bin can only lose information, so this is ``>= 0`` and at most the full
    KL, which it equals when ``k = V`` (both tails empty) -- ``distillation_kl`` on full logits.
    """
    if teacher_log_probs.shape[-1] != teacher_indices.shape[-1] + 1:
        raise ValueError(f"teacher_log_probs {tuple(teacher_log_probs.shape)} must hold k + 1 = "
                         f"{teacher_indices.shape[-1] + 1} bins (the top k, then the tail)")
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    idx = teacher_indices.long()
    top_q = log_q.gather(-1, idx)
    if idx.shape[-1] >= log_q.shape[-1]:  # nothing outside the top k: an empty tail (and no NaN gradient)
        tail_q = torch.zeros_like(top_q[..., :1])
    else:
        tail_q = torch.logsumexp(log_q.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True)
    log_q_bins = torch.cat([top_q, tail_q], dim=-1)
    log_p = teacher_log_probs.float()
    p = log_p.exp()
    # 0 * log 0 = 0: an empty teacher bin adds nothing whatever the student puts there
    terms = torch.where(p > 0, p * (log_p - log_q_bins), torch.zeros_like(p))
    return terms.sum(dim=-1).mean() * (t * t)
