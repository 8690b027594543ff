"""L2-regularised multinomial logistic regression on fixed features, fit from zero.

W2SDefense's head refits (the classifier's output layer, ``models.classifier.ClassifierHead.refit``,
and a generative label task's answer split, ``models.label_head``) both solve

    min_{W, b}  mean_i CE(W x_i + b, y_i) + l2 / 2 * ||W||^2        (b not penalised)

from W = 0, b = 0, in float64 with L-BFGS: the problem is convex, so the answer depends on the
features, the labels and ``l2`` only, never on where the weights were before (the point of a refit).
"""

from __future__ import annotations

import torch
from torch import nn


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                 max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(weight [k, d], bias [k], objective)`` of the fit above, float64 on the CPU."""
    x = x.detach().to(torch.float64).cpu()
    y = y.detach().long().cpu()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        with torch.enable_grad():
            loss = nn.functional.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
            loss.backward()
        return loss

    opt.step(objective)
    loss = float(objective().detach())
    return weight.detach(), bias.detach(), loss


def accuracy(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """Share of rows whose highest score ``x W^T + b`` is their label, rounded to 4 places."""
    x = x.detach().to(torch.float64).cpu()
    scores = x @ weight.detach().double().cpu().T + bias.detach().double().cpu()
    return round(float((scores.argmax(1) == y.long().cpu()).double().mean()), 4)
