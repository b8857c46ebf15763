"""The numbers of taskfit, on small arrays (features already chosen): one-vs-rest feature choice from per-class sums,
exact AUROC and average precision, k-sparse logistic probes fit over a tile of classes at once, and the rank
correlation across models with its sample size.

Feature choice (services.taskfit.run folds the sums in one pass over the training images): a feature's standardized
difference for class c is (mean on c - mean on the rest) / sqrt((var on c + var on the rest) / 2), from per-class
sums and sums of squares in float64. SAE codes are non-negative: a feature detects a class by firing on it, so the
features are ranked by the signed difference, the largest first (ties: the lower feature id). The 1-D probe is the
first of them; the k-sparse probe's features are the first k (as in Gao et al. 2024's k-sparse probing, which ranks
by the difference of class-conditional means).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata, spearmanr

__all__ = ["MIN_STD", "WARNING", "auroc", "average_precision", "balanced_accuracy", "fit_sparse", "rank_correlation",
           "ranked", "sparse_logits", "standardized_difference"]

MIN_STD = 1e-6
"""A probe input whose training std is below this is left unscaled (a constant column: dead on these images)."""


def standardized_difference(sums: np.ndarray, squares: np.ndarray, n_class: np.ndarray, total: np.ndarray,
                            total_squares: np.ndarray, n_total: int) -> np.ndarray:
    """(classes, features) float64 standardized difference of each feature between each class and the rest, from
    the class sums (classes, features), sums of squares, counts (classes,) and the same over all training images;
    NaN for a class without training images (or with nothing else)."""
    n_in = n_class[:, None].astype(np.float64)
    n_out = n_total - n_in
    with np.errstate(divide="ignore", invalid="ignore"):
        m_in, m_out = sums / n_in, (total - sums) / n_out
        v_in = np.maximum(squares / n_in - m_in ** 2, 0)
        v_out = np.maximum((total_squares - squares) / n_out - m_out ** 2, 0)
        diff = m_in - m_out
        d = diff / np.sqrt((v_in + v_out) / 2)
    d[diff == 0] = 0.0  # dead on both sides (0 / 0), or no difference at all
    d[((n_in == 0) | (n_out == 0))[:, 0]] = np.nan
    return d


def ranked(d: np.ndarray, k: int) -> np.ndarray:
    """(classes, k) the k features of largest standardized difference per class, largest first, ties by feature id
    (a class without training images ranks its features in id order)."""
    key = np.where(np.isnan(d), 0.0, -d)
    return np.argsort(key, axis=1, kind="stable")[:, :k]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Exact area under the ROC curve of `scores` for the boolean `positive` (ties count one half): the rank-sum
    (Mann-Whitney) form; NaN without both positives and negatives."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision: sum over the distinct score thresholds, highest first, of precision times the recall
    gained (scikit-learn's definition: no interpolation, tied scores one threshold); NaN without positives."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    s, hits = scores[order], np.cumsum(positive[order])
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # the last row of each tied run
    precision, recall = hits[last] / (last + 1), hits[last] / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """The mean over the classes present in `y` of the share of their rows predicted as them."""
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def fit_sparse(x: torch.Tensor, y: torch.Tensor, steps: int, weight_decay: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic regressions, one per class of a tile, each on its own k inputs: x (rows, classes, k)
    float32, y (rows, classes) float (1: the row is of that class). Inputs are standardized on these rows; each
    class's loss is the mean binary cross-entropy plus weight_decay times its squared weights, and the classes'
    losses are summed and minimized together (full-batch L-BFGS; the classes do not interact). Returns (weight
    (classes, k), bias (classes,), mean, std (classes, k)): logit = ((x - mean) / std) . weight + bias."""
    var, mean = torch.var_mean(x, 0, correction=0)
    std = torch.where(var.sqrt() > MIN_STD, var.sqrt(), 1.0)
    z = (x - mean) / std
    prevalence = y.mean(0).clamp(1e-4, 1 - 1e-4)
    w = torch.zeros(x.shape[1:], requires_grad=True)
    b = torch.log(prevalence / (1 - prevalence)).requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.einsum("nck,ck->nc", z, w) + b
        loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0).sum()
        loss = loss + weight_decay * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), mean, std


def sparse_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                  std: torch.Tensor) -> torch.Tensor:
    """(rows, classes) logits of fit_sparse's probes on x (rows, classes, k)."""
    return torch.einsum("nck,ck->nc", (x - mean) / std, weight) + bias


WARNING = ("a rank correlation over a handful of models is a weak test: with n = {n} models a perfect agreement "
           "arises by chance once in {orders} orderings, and one model moved changes rho by a lot; read it as a "
           "hint, not as evidence")


def rank_correlation(scores: Sequence[float], dense: Sequence[float], score: str) -> dict[str, Any]:
    """Spearman's rho between a feature-based score and the dense probe's accuracy across models, with its sample
    size n and what it is worth: None with a reason where n < 3 or either side does not vary."""
    n = len(scores)
    out: dict[str, Any] = {"score": score, "against": "dense probe accuracy", "n": n, "rho": None}
    if n < 3:
        out["note"] = f"n = {n} model(s): no rank correlation can be computed (it needs at least 3)"
        return out
    if np.ptp(scores) == 0 or np.ptp(dense) == 0:
        out["note"] = f"n = {n} models: a score is the same for every model, so no rank correlation is defined"
        return out
    out["rho"] = float(spearmanr(scores, dense).statistic)
    out["note"] = f"n = {n} models: " + WARNING.format(n=n, orders=math.factorial(n))
    return out
